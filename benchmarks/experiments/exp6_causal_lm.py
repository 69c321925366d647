#!/usr/bin/env python
"""Experiment 6: a small causal language model trained from scratch without warmup, across learning rates.

Claim tested: at high learning rates without warmup a GPT-2's attention entropy collapses and its loss spikes or
diverges; sigmaReparam, NormSoftmax attention and QK-norm keep it trainable.

Model: a small GPT-2 (``NormSoftmaxGPT2LMHeadModel`` from a ``NormSoftmaxGPT2Config``: 4 layers, 128 wide, 4 heads,
context 128, no dropout), random init (no package here ships GPT-2 weights), with the variant's flags:

* ``stock``: ``attention_softmax="softmax"`` (the package default: GPT-2's own attention);
* ``sigmareparam``: ``sigma_reparam=True``;
* ``normsoftmax``: ``attention_softmax="normsoftmax"`` (the package's default gamma);
* ``qknorm``: ``qk_norm="rms"`` (per-head RMSNorm of q and k over the head dimension, learnable scale from 1).

Data: Shakespeare's works (``load_shakespeare_text``: 38 works for training, 4 held out for validation: Coriolanus,
Love's Labour's Lost, The Passionate Pilgrim, Romeo and Juliet), character-level tokens (the training text's
characters plus one id for the rest). Character tokens because GPT-2's 50,257-entry BPE head would cost far more
than the whole 4-layer model on CPU. Training windows of 128 characters at seeded random offsets; the validation
loss is the mean next-character cross-entropy (nats) over 64 evenly spaced windows of the held-out works.

Training: AdamW (no weight decay), constant learning rate, no warmup, 80 steps of 8 windows (82k characters, 1.8% of
an epoch: what 30 CPU-minutes for the 32 runs allow at 0.4 to 0.5 CPU-s per step on the shared machine, see the
README). Learning rates 1e-3, 3e-3, 1e-2 and 3e-2, chosen from a probe of the stock model (120 steps, seed 0;
validation loss 2.64, 2.99, 3.08, 3.32 nats/char; lowest-head attention entropy at the end 3.3, 1.2, 0.7 and 0.0
nats): 1e-3 trains best, the loss stalls from 3e-3 on and the attention entropy collapses at 3e-2. 2 seeds
(weights and batch order).

Measured per run: validation loss; attention entropy per layer (``collect_stability_stats`` on 8 validation windows
at step 0 and every 10 steps; per layer the mean over heads and the lowest head); loss spikes (steps whose training
loss is above 2x the median of the 10 previous steps); divergence (non-finite loss, or the mean loss of the last 10%
of the steps, at least 5, above the first step's); CPU time per step.

Usage::

    python benchmarks/experiments/exp6_causal_lm.py --output-dir runs/exp6_causal_lm --figures-dir docs/figures
    python benchmarks/experiments/exp6_causal_lm.py --quick --output-dir /tmp/exp6
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exp_runner as R  # noqa: E402
import text_runner as T  # noqa: E402

VARIANTS = {
    "stock": {},
    "sigmareparam": {"sigma_reparam": True},
    "normsoftmax": {"attention_softmax": "normsoftmax"},
    "qknorm": {"qk_norm": "rms"},
}
LABELS = {"stock": "stock", "sigmareparam": "σReparam", "normsoftmax": "NormSoftmax", "qknorm": "QK-norm (RMS)"}
COLORS = {"stock": "tab:blue", "sigmareparam": "tab:red", "normsoftmax": "tab:orange", "qknorm": "tab:green"}
LRS = [1e-3, 3e-3, 1e-2, 3e-2]
STEPS = 80
BATCH_SIZE = 8


def build_parser():
    parser = T.text_parser(__doc__.split("\n\n")[0], "runs/exp6_causal_lm", default_seeds="0,1")
    parser.add_argument("--variants", type=R.name_list(VARIANTS), default=None,
                        help="comma-separated subset of: " + ", ".join(VARIANTS) + " (default: all; qknorm needs "
                             "a package with the qk_norm flag and is left out, with a message, when it has none)")
    parser.add_argument("--lrs", type=R.float_list, default=LRS,
                        help="learning rates (default: " + ",".join(f"{lr:g}" for lr in LRS) + ")")
    parser.add_argument("--steps", type=R.positive_int, default=STEPS,
                        help=f"training steps per run (default: {STEPS})")
    parser.add_argument("--batch-size", type=R.positive_int, default=BATCH_SIZE,
                        help=f"windows of 128 characters per step (default: {BATCH_SIZE})")
    parser.add_argument("--stability-every", type=R.positive_int, default=T.BASE_SPECS["char_lm"]["stability_every"],
                        help=f"measure attention entropy every N steps (default: "
                             f"{T.BASE_SPECS['char_lm']['stability_every']})")
    return parser


def check_args(args, parser) -> None:
    T.check_distinct_lrs(args.lrs, parser)
    if args.variants is None:
        args.variants = list(VARIANTS)


def make_specs(args) -> list[dict]:
    lrs, seeds, steps, every, batch, n_val = args.lrs, args.seeds, args.steps, args.stability_every, \
        args.batch_size, T.BASE_SPECS["char_lm"]["n_val_windows"]
    if args.quick:
        lrs, seeds, steps, every, batch, n_val = lrs[-1:], seeds[:1], 3, 1, 2, 8
    return T.grid_specs("char_lm", VARIANTS, args.variants, lrs, seeds, steps=steps, batch_size=batch,
                        stability_every=every, n_val_windows=n_val)


def _finite(values):
    return [v for v in values if v is not None and math.isfinite(v)]


def run_metrics(result) -> dict:
    """What the tables report for one run."""
    layers = len(result["stability"][0]["entropy_min"])
    per_layer = [min(_finite([m["entropy_min"][i] for m in result["stability"]]), default=float("nan"))
                 for i in range(layers)]
    per_layer_mean = [min(_finite([m["entropy_mean"][i] for m in result["stability"]]), default=float("nan"))
                      for i in range(layers)]
    steps = result["step_process_seconds"]
    return {
        "val_loss": result["final"]["loss"],
        "min_entropy_per_layer": per_layer,  # lowest head, lowest over the measurements
        "min_mean_entropy_per_layer": per_layer_mean,  # mean over heads, lowest over the measurements
        "min_entropy": min(_finite(per_layer), default=float("nan")),
        "loss_spikes": len(T.loss_spikes(result["train_loss"])),
        "diverged": T.diverged(result),
        "non_finite": result["diverged_at"] is not None,
        "seconds_per_step": sum(steps) / len(steps) if steps else float("nan"),
    }


def summarize(args, specs, results, command) -> dict:
    variants = list(dict.fromkeys(s["variant"] for s in specs))
    lrs = sorted({s["lr"] for s in specs})
    seeds = sorted({s["seed"] for s in specs})
    metrics = {s["name"]: run_metrics(results[s["name"]]) for s in specs}
    first = results[specs[0]["name"]]
    layers = len(first["stability"][0]["entropy_min"])
    rows, table = [], []
    for lr in lrs:
        for variant in variants:
            group = [metrics[s["name"]] for s in specs if s["lr"] == lr and s["variant"] == variant]
            n = len(group)
            row = {"lr": lr, "variant": variant, "n": n,
                   **{key: [m[key] for m in group] for key in ("val_loss", "min_entropy", "loss_spikes",
                                                               "seconds_per_step", "min_entropy_per_layer",
                                                               "min_mean_entropy_per_layer")},
                   "diverged": sum(m["diverged"] for m in group), "non_finite": sum(m["non_finite"] for m in group)}
            rows.append(row)
            per_layer = [R.mean_std([m["min_entropy_per_layer"][i] for m in group])[0] for i in range(layers)]
            table.append([f"{lr:g}", LABELS[variant], n, R.fmt_mean_std(row["val_loss"], digits=3),
                          " / ".join(f"{v:.2f}" for v in per_layer), R.fmt_mean_std(row["loss_spikes"], digits=1),
                          f"{row['diverged']}/{n}", R.fmt_mean_std(row["seconds_per_step"], digits=2)])
    spec0 = first["spec"]
    markdown = (
        f"**Character-level GPT-2 on Shakespeare** ({spec0['n_layer']} layers, {spec0['n_embd']} wide, "
        f"{spec0['n_head']} heads, context {spec0['context']}, random init, {first['num_parameters']:,} parameters; "
        f"AdamW, constant lr, no warmup, {spec0['steps']} steps of {spec0['batch_size']} windows; "
        "mean ± std over seeds)\n\n"
        + R.markdown_table(["lr", "variant", "n", "validation loss (nats/char)",
                            "min attention entropy per layer 0 / 1 / ... (nats)", "loss spikes", "diverged",
                            "CPU s / step"], table)
        + f"\n\nValidation loss: mean next-character cross-entropy over {spec0['n_val_windows']} windows of the "
          f"held-out works ({', '.join(first['validation_works'])}); vocabulary {first['vocab_size']} characters "
          f"(uniform: ln {first['vocab_size']} = {math.log(first['vocab_size']):.2f}). Min attention entropy per "
          f"layer: the lowest head of the layer, lowest over the measurements (step 0 and every "
          f"{spec0['stability_every']} steps) on {spec0['probe_examples']} validation windows, mean over seeds "
          f"(causal rows: row i has at most ln(i + 1) nats). Loss spikes: steps whose training loss is above "
          f"{T.SPIKE_FACTOR:g}x the median of the {T.SPIKE_WINDOW} previous steps. Diverged: non-finite loss, or the "
          "mean loss of the last 10% of the steps (at least 5) above the first step's. CPU s / step: process time "
          f"of forward + backward + optimizer step, one thread. n = {len(seeds)} seeds per cell.")
    summary = {"experiment": "exp6_causal_lm", "rows": rows, "per_run": metrics, "figure_lr": max(lrs)}
    T.write_summary(args.output_dir, summary, markdown, command, results)
    plot_sweep(args, rows, variants)
    plot_entropy(args, specs, results, variants, max(lrs), layers)
    plot_losses(args, specs, results, variants, max(lrs))
    return summary


def plot_sweep(args, rows, variants):
    plt = R.pyplot()
    figure, ax = plt.subplots(figsize=(5.5, 3.8))
    for variant in variants:
        points = [r for r in rows if r["variant"] == variant]
        stats = [R.mean_std(r["val_loss"]) for r in points]
        ax.errorbar([r["lr"] for r in points], [m for m, _, _ in stats], yerr=[s for _, s, _ in stats], marker="o",
                    capsize=3, color=COLORS[variant], label=LABELS[variant], alpha=0.85)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (constant, no warmup)")
    ax.set_ylabel("validation loss (nats / character)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("char-level GPT-2 on Shakespeare (mean ± std over seeds)", fontsize=10)
    R.save_figure(figure, args.output_dir, "exp6_val_loss_vs_lr.png", args.figures_dir, quick=args.quick)


def _style(spec, seeds):
    first = spec["seed"] == seeds[0]
    return {"color": COLORS[spec["variant"]], "alpha": 0.9 if first else 0.4, "linewidth": 1.4 if first else 0.8,
            "label": LABELS[spec["variant"]] if first else None}


def plot_entropy(args, specs, results, variants, lr, layers):
    plt = R.pyplot()
    figure, axes = plt.subplots(1, layers, figsize=(3.0 * layers, 3.0), sharey=True)
    seeds = sorted({s["seed"] for s in specs})
    for spec in [s for s in specs if s["lr"] == lr]:
        result = results[spec["name"]]
        steps = [m["step"] for m in result["stability"]]
        for layer in range(layers):
            values = [m["entropy_min"][layer] for m in result["stability"]]
            axes[layer].plot(steps, [float("nan") if v is None else v for v in values], **_style(spec, seeds))
    for layer in range(layers):
        axes[layer].set_title(f"layer {layer}: lowest head entropy", fontsize=9)
        axes[layer].set_xlabel("step")
        axes[layer].grid(alpha=0.3)
    axes[0].set_ylabel("nats")
    axes[0].legend(fontsize=7)
    figure.suptitle(f"attention entropy per layer at lr = {lr:g} (thick: seed {seeds[0]}, thin: other seeds)",
                    fontsize=10)
    R.save_figure(figure, args.output_dir, "exp6_entropy_per_layer.png", args.figures_dir, quick=args.quick)


def plot_losses(args, specs, results, variants, lr):
    plt = R.pyplot()
    figure, ax = plt.subplots(figsize=(5.5, 3.8))
    seeds = sorted({s["seed"] for s in specs})
    for spec in [s for s in specs if s["lr"] == lr]:
        result = results[spec["name"]]
        losses = [float("nan") if v is None else v for v in result["train_loss"]]
        ax.plot(range(1, len(losses) + 1), losses, **_style(spec, seeds))
        if result["diverged_at"] is not None:
            ax.axvline(result["diverged_at"], color=COLORS[spec["variant"]], linestyle=":", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / character)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"training loss at lr = {lr:g} (dotted: non-finite loss)", fontsize=10)
    R.save_figure(figure, args.output_dir, "exp6_loss_curves.png", args.figures_dir, quick=args.quick)


def main(argv=None) -> int:
    return T.run_text_experiment(Path(__file__).name, argv, build_parser, make_specs, summarize, check_args)


if __name__ == "__main__":
    R.main_guard(main)
