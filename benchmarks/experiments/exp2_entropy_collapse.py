#!/usr/bin/env python
"""Experiment 2: attention entropy collapse at high learning rate, baseline vs sigmaReparam (sigmaReparam paper).

Claim: trained with a high learning rate and no warmup, a Transformer's attention entropy collapses
(pathologically low entropy) and its loss oscillates or diverges; sigmaReparam (W_hat = s / sigma(W) * W on every
linear layer) prevents it, and even trains without warmup, LayerNorm or adaptive optimizers.

Here: the tiny ViT of experiment 1 (width 64, 4 layers, 4 heads, 17 tokens, so the largest possible entropy is
ln 17 = 2.83 nats) on Fashion-MNIST, constant learning rate, no warmup, no weight decay, no gradient clipping,
in two settings, each with a learning-rate sweep:

* ``adamw``: the standard block (pre-LayerNorm) with AdamW, lr in {1e-3, 3e-3, 1e-2, 3e-2, 0.1};
* ``noln_sgd``: the paper's harder setting: every LayerNorm replaced by the identity, SGD with momentum 0.9,
  lr in {0.01, 0.03, 0.1, 0.3, 1}.

Every 10 steps the attention entropy per layer and head is measured on a fixed probe batch of 256 test images
(``collect_stability_stats``). A run counts as *collapsed* when, averaged over its last 3 measurements (before a
divergence, if any), some layer's mean entropy is below 10% of its value at initialisation, and as *diverged* when
its loss becomes non-finite. The per-layer entropy figure of each setting shows the smallest learning rate at which
the baseline collapses or diverges in at least half of the seeds (the largest swept learning rate if it never
does).

Usage::

    python benchmarks/experiments/exp2_entropy_collapse.py --output-dir runs/exp2_entropy --figures-dir docs/figures
    python benchmarks/experiments/exp2_entropy_collapse.py --quick --dataset mnist5k --output-dir /tmp/exp2
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exp_runner as R  # noqa: E402

SETTINGS = {
    "adamw": {"label": "pre-LN ViT, AdamW, no warmup", "layernorm": True, "optimizer": "adamw",
              "lrs": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]},
    "noln_sgd": {"label": "ViT without LayerNorm, SGD (momentum 0.9), no warmup", "layernorm": False,
                 "optimizer": "sgd", "lrs": [0.01, 0.03, 0.1, 0.3, 1.0]},
}
METHODS = {"baseline": False, "sigmareparam": True}
COLLAPSE_FRACTION = 0.1
LAST_MEASUREMENTS = 3


def build_parser():
    parser = R.base_parser(__doc__.split("\n\n")[0], "runs/exp2_entropy", default_seeds="0,1")
    parser.add_argument("--settings", type=R.name_list(SETTINGS), default="adamw,noln_sgd",
                        help="comma-separated subset of: " + ", ".join(SETTINGS) + " (default: both)")
    parser.add_argument("--adamw-lrs", type=R.float_list, default=SETTINGS["adamw"]["lrs"],
                        help="learning rates of the adamw setting (default: 1e-3,3e-3,1e-2,3e-2,0.1)")
    parser.add_argument("--sgd-lrs", type=R.float_list, default=SETTINGS["noln_sgd"]["lrs"],
                        help="learning rates of the noln_sgd setting (default: 0.01,0.03,0.1,0.3,1)")
    parser.add_argument("--steps", type=R.positive_int, default=250, help="training steps per run (default: 250)")
    parser.add_argument("--stability-every", type=R.positive_int, default=10,
                        help="measure attention entropy every N steps (default: 10)")
    return parser


def make_specs(args) -> list[dict]:
    settings = args.settings
    lrs = {"adamw": args.adamw_lrs, "noln_sgd": args.sgd_lrs}
    seeds, steps, every = args.seeds, args.steps, args.stability_every
    if args.quick:
        lrs = {k: v[-1:] for k, v in lrs.items()}
        seeds, steps, every = seeds[:1], 6, 2
    specs = []
    for setting in settings:
        config = SETTINGS[setting]
        for lr in lrs[setting]:
            for method, sigma in METHODS.items():
                for seed in seeds:
                    specs.append({
                        "name": f"{setting}_lr{lr:g}_{method}_s{seed}", "group": setting,
                        **R.data_spec(args),
                        "layernorm": config["layernorm"], "optimizer": config["optimizer"], "lr": lr,
                        "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant", "steps": steps,
                        "sigma_reparam": sigma, "stability_every": every, "seed": seed,
                    })
    return specs


def _method(spec) -> str:
    return "sigmareparam" if spec["sigma_reparam"] else "baseline"


def run_metrics(result) -> dict:
    """Collapse / oscillation measures of one run."""
    stability = result["stability"]
    initial = stability[0]["entropy_mean"]
    tail = stability[-LAST_MEASUREMENTS:]
    layers = len(initial)

    def finite_mean(values):
        values = [v for v in values if v is not None and math.isfinite(v)]
        return sum(values) / len(values) if values else float("nan")

    final = [finite_mean([m["entropy_mean"][i] for m in tail]) for i in range(layers)]
    final_min_heads = [finite_mean([m["entropy_min"][i] for m in tail]) for i in range(layers)]
    fraction = [f / i if i else float("nan") for f, i in zip(final, initial, strict=True)]
    lowest_over_time = min((v for m in stability[1:] for v in m["entropy_mean"] if v is not None),
                           default=float("nan"))
    losses = [v for v in result["train_loss"] if v is not None]
    diverged = result["diverged_at"] is not None
    # loss level / oscillation over the last quarter of the steps: undefined for a run that diverged
    quarter = losses[len(losses) * 3 // 4:] if losses and not diverged else []
    collapsed = any(not math.isfinite(f) or f < COLLAPSE_FRACTION for f in fraction)
    tail_mean = sum(quarter) / len(quarter) if quarter else float("nan")
    tail_std = float("nan")
    if quarter:
        tail_std = (sum((v - tail_mean) ** 2 for v in quarter) / max(1, len(quarter) - 1)) ** 0.5
    return {
        "collapsed": collapsed, "diverged": diverged, "unstable": collapsed or diverged,
        "diverged_at": result["diverged_at"],
        "initial_entropy": initial, "final_entropy": final, "final_entropy_min_head": final_min_heads,
        "final_entropy_fraction_min_layer": min(fraction) if fraction else float("nan"),
        "final_entropy_min_layer": min(final) if final else float("nan"),
        "lowest_layer_entropy_over_time": lowest_over_time,
        "last_quarter_loss_mean": tail_mean, "last_quarter_loss_std": tail_std,
        "max_loss_after_start": max(losses[len(losses) // 10:], default=float("nan")),
        "test_accuracy": result["final"]["accuracy"] if not diverged else float("nan"),
        "test_accuracy_raw": result["final"]["accuracy"],
    }


def summarize(args, specs, results, command) -> dict:
    rows, markdown_parts, chosen = [], [], {}
    settings = list(dict.fromkeys(s["group"] for s in specs))
    for setting in settings:
        table = []
        lrs = sorted({s["lr"] for s in specs if s["group"] == setting})
        for lr in lrs:
            for method in METHODS:
                group = [s for s in specs if s["group"] == setting and s["lr"] == lr and _method(s) == method]
                metrics = [run_metrics(results[s["name"]]) for s in group]
                n = len(metrics)
                row = {
                    "setting": setting, "lr": lr, "method": method, "n": n,
                    "collapsed": sum(m["collapsed"] for m in metrics),
                    "unstable": sum(m["unstable"] for m in metrics),
                    "diverged": sum(m["diverged"] for m in metrics),
                    "final_entropy_min_layer": [m["final_entropy_min_layer"] for m in metrics],
                    "final_entropy_fraction_min_layer": [m["final_entropy_fraction_min_layer"] for m in metrics],
                    "lowest_layer_entropy_over_time": [m["lowest_layer_entropy_over_time"] for m in metrics],
                    "last_quarter_loss_mean": [m["last_quarter_loss_mean"] for m in metrics],
                    "last_quarter_loss_std": [m["last_quarter_loss_std"] for m in metrics],
                    "test_accuracy": [m["test_accuracy"] for m in metrics],
                    "per_run": {s["name"]: m for s, m in zip(group, metrics, strict=True)},
                }
                rows.append(row)
                table.append([
                    f"{lr:g}", method, f"{row['collapsed']}/{n}", f"{row['diverged']}/{n}",
                    R.fmt_mean_std(row["final_entropy_min_layer"]),
                    R.fmt_mean_std(row["lowest_layer_entropy_over_time"]),
                    R.fmt_mean_std(row["last_quarter_loss_mean"], digits=3),
                    R.fmt_mean_std(row["last_quarter_loss_std"], digits=3),
                    R.fmt_mean_std(row["test_accuracy"], 100),
                ])
        baseline_collapse = [r for r in rows if r["setting"] == setting and r["method"] == "baseline"
                             and r["unstable"] * 2 >= r["n"] and r["n"]]
        chosen[setting] = min(r["lr"] for r in baseline_collapse) if baseline_collapse else max(lrs)
        markdown_parts.append(
            f"**{SETTINGS[setting]['label']}** ({setting}; figure at lr = {chosen[setting]:g}, "
            + ("the smallest lr where the baseline collapses or diverges in at least half of the seeds"
               if baseline_collapse else "the largest lr swept: the baseline never collapsed nor diverged")
            + ")\n\n"
            + R.markdown_table(
                ["lr", "method", "collapsed", "diverged", "final entropy, lowest layer (nats)",
                 "lowest layer entropy at any time", "loss, last 25% of steps (finite runs)", "loss std, last 25%",
                 "test acc % (finite runs)"], table))
    markdown = "\n\n".join(markdown_parts)
    markdown += (f"\n\nEntropy: mean over heads and probe rows, natural log; maximum ln 17 = {math.log(17):.2f}. "
                 f"Collapsed: some layer's entropy (mean of the last {LAST_MEASUREMENTS} measurements) below "
                 f"{COLLAPSE_FRACTION:.0%} of its initial value (before a divergence, if any). "
                 f"Diverged: non-finite loss. n = {len(args_seeds(specs))} seeds per cell.")
    summary = {"experiment": "exp2_entropy_collapse", "rows": rows, "figure_lr": chosen}
    R.write_summary(args.output_dir, summary, markdown, command, results)
    for setting in settings:
        plot_entropy(args, specs, results, setting, chosen[setting])
    plot_sweep(args, rows, settings)
    return summary


def args_seeds(specs):
    return sorted({s["seed"] for s in specs})


def plot_entropy(args, specs, results, setting, lr):
    plt = R.pyplot()
    group = [s for s in specs if s["group"] == setting and s["lr"] == lr]
    layers = results[group[0]["name"]]["spec"]["num_layers"]
    figure, axes = plt.subplots(1, layers + 1, figsize=(3.0 * (layers + 1), 2.9))
    colors = {"baseline": "tab:blue", "sigmareparam": "tab:red"}
    labels = {"baseline": "baseline", "sigmareparam": "σReparam"}
    seeds = args_seeds(group)
    for spec in group:
        result = results[spec["name"]]
        method = _method(spec)
        first = spec["seed"] == seeds[0]
        style = {"color": colors[method], "alpha": 0.9 if first else 0.45, "linewidth": 1.4 if first else 0.8,
                 "label": labels[method] if first else None}
        steps = [m["step"] for m in result["stability"]]
        for layer in range(layers):
            values = [m["entropy_mean"][layer] for m in result["stability"]]
            axes[layer].plot(steps, [float("nan") if v is None else v for v in values], **style)
        losses = R.smoothed(result["train_loss"], 5)
        axes[-1].plot(range(1, len(losses) + 1), losses, **style)
        if result["diverged_at"] is not None:
            axes[-1].axvline(result["diverged_at"], color=colors[method], linestyle=":", alpha=0.7)
    for layer in range(layers):
        axes[layer].set_title(f"layer {layer}: attention entropy", fontsize=9)
        axes[layer].set_ylim(-0.05, math.log(17) + 0.1)
        axes[layer].axhline(math.log(17), color="gray", linestyle="--", linewidth=0.7)
        axes[layer].set_xlabel("step")
        axes[layer].grid(alpha=0.3)
    axes[0].set_ylabel("nats (dashed: ln 17)")
    axes[-1].set_title("train loss (5-step mean)", fontsize=9)
    axes[-1].set_xlabel("step")
    axes[-1].set_ylim(0, 4.0)  # chance level is ln 10 = 2.30; larger values (divergence) are cut
    axes[-1].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{SETTINGS[setting]['label']}, lr = {lr:g} (thick: seed {seeds[0]}, thin: other seeds; "
                    "dotted: divergence)", fontsize=10)
    R.save_figure(figure, args.output_dir, f"exp2_entropy_{setting}.png", args.figures_dir, quick=args.quick)


def plot_sweep(args, rows, settings):
    plt = R.pyplot()
    figure, axes = plt.subplots(2, len(settings), figsize=(4.6 * len(settings), 6.0), squeeze=False)
    colors = {"baseline": "tab:blue", "sigmareparam": "tab:red"}
    labels = {"baseline": "baseline", "sigmareparam": "σReparam"}
    for column, setting in enumerate(settings):
        for method in METHODS:
            points = [r for r in rows if r["setting"] == setting and r["method"] == method]
            lrs = [r["lr"] for r in points]
            for row_index, (key, scale, ylabel) in enumerate((
                    ("final_entropy_min_layer", 1, "final entropy of the lowest layer (nats)"),
                    ("test_accuracy", 100, "test accuracy % (diverged runs omitted)"))):
                ax = axes[row_index][column]
                stats = [R.mean_std(r[key]) for r in points]
                ax.errorbar(lrs, [scale * m for m, _, _ in stats], yerr=[scale * s for _, s, _ in stats],
                            marker="o", capsize=3, color=colors[method], label=labels[method])
                for r in points:
                    ax.scatter([r["lr"]] * len(r[key]), [scale * v if v is not None else float("nan")
                                                         for v in r[key]], s=8, color=colors[method], alpha=0.4)
                    if row_index == 1 and r["diverged"]:
                        ax.annotate(f"{labels[method]}: {r['diverged']}/{r['n']} diverged", (r["lr"], 0.5),
                                    xycoords=("data", "axes fraction"), fontsize=7, ha="center",
                                    rotation=90, color=colors[method])
                ax.set_xscale("log")
                ax.set_xlabel("learning rate (constant, no warmup)")
                ax.set_ylabel(ylabel, fontsize=8)
                ax.grid(alpha=0.3)
        axes[0][column].set_title(SETTINGS[setting]["label"], fontsize=9)
        axes[0][column].axhline(math.log(17), color="gray", linestyle="--", linewidth=0.7)
        axes[0][column].legend(fontsize=8)
    R.save_figure(figure, args.output_dir, "exp2_lr_sweep.png", args.figures_dir, quick=args.quick)


def main(argv=None) -> int:
    return R.run_experiment(Path(__file__).name, argv, build_parser, make_specs, summarize)


if __name__ == "__main__":
    R.main_guard(main)
