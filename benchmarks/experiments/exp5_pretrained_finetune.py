#!/usr/bin/env python
"""Experiment 5: fine-tuning a real pretrained encoder, stock vs the package's variants, across learning rates.

Claim tested: converting a pretrained checkpoint (NormSoftmax attention, sigmaReparam, QK-norm) keeps fine-tuning
stable at learning rates where the stock model becomes unstable; and what each conversion costs before any
training (sigmaReparam is exact, NormSoftmax attention and QK-norm are not function-preserving).

Model and data: the real all-MiniLM-L6-v2 checkpoint (6 layers, 384 wide, 12 heads; a ``BertModel``) loaded with
``hf_normsoftmax.from_stock(minilm_path(), task="text-classification", num_labels=2, **flags)`` (a new, seeded
classifier head) and fine-tuned for sentiment on the Rotten Tomatoes snippets (fresh / rotten) with its own tokenizer
and dynamic padding (texts cut at 32 tokens). The classifier reads the checkpoint's own sentence embedding, the mean
of the last hidden states over the valid tokens, instead of BERT's [CLS] pooler: the pooler's features are nearly
constant in this checkpoint (a logistic regression fitted on 400 training texts scores 59.8% on 256 test texts from
them, 72.7% from the mean-pooled ones), and fine-tunes through it stayed at the majority class within the step budget
(1e-4, 1e-3 and 3e-3 for 30 steps of 8 texts, 3e-4 for 60 steps of 4). Variants (the ``flags``):

* ``stock``: no flags (``attention_softmax="softmax"``, the package default: a plain copy of the checkpoint);
* ``normsoftmax``: ``attention_softmax="normsoftmax"`` (the package's default gamma);
* ``sigmareparam``: ``sigma_reparam=True`` (exact conversion: scales initialised to sigma(W));
* ``normsoftmax_sigmareparam``: both;
* ``qknorm``: ``qk_norm="rms"`` (per-head RMSNorm of q and k over the head dimension, learnable scale set to 1).

Training: AdamW (weight decay 0.01 on weight matrices), no warmup, learning rate decaying linearly to 0, 20 steps of
8 texts (160 texts, 1.6% of the training split: what 30 CPU-minutes for the 45 runs allow at about 1.1 CPU-s per
step plus about 15 CPU-s of loading, conversion check, entropy probes and test evaluation per run, see the README),
the token-embedding matrix frozen (11.7 M of the 22.7 M weights; its update costs a fifth of a step and does not
touch attention). Learning rates 1e-4, 3e-4 and 1e-3, from probes of the stock model (seed 0): at 1e-4 it learns,
slowly (30 steps: 59.8% on the 256 test texts, majority class 57.4%); at 3e-4 (24 steps) it ends at the majority
class; at 1e-3 (30 steps) it becomes unstable (its loss ends above the first step's, majority class; through the
[CLS] pooler it did so at 3e-3 too). 3 seeds; the seed sets the classifier head, the batch order and the dropout
masks. At this budget the fine-tune is short: the experiment is about stability and the cost of conversion, not about
the accuracy a full fine-tune reaches.

Measured per run: test accuracy (first 256 texts of the fixed test split); minimum attention entropy over training
(``collect_stability_stats`` on 16 fixed test texts, at step 0 and every 6 steps; the lowest layer, mean over its
heads, and the lowest single head); loss spikes (steps whose training loss is above 2x the median of the 10 previous
steps); divergence (non-finite loss, or the mean loss of the last 5 steps above the first step's); CPU time per step
(``time.process_time`` of forward + backward + optimizer step). Before training, each run also measures the cost of
its conversion on the 16 probe texts: the relative change of the last hidden states, of the [CLS] vectors and of
the mean-pooled sentence embeddings against transformers' stock ``BertModel`` of the same checkpoint.

Usage::

    python benchmarks/experiments/exp5_pretrained_finetune.py --output-dir runs/exp5_pretrained \\
        --figures-dir docs/figures
    python benchmarks/experiments/exp5_pretrained_finetune.py --quick --output-dir /tmp/exp5
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
    "normsoftmax": {"attention_softmax": "normsoftmax"},
    "sigmareparam": {"sigma_reparam": True},
    "normsoftmax_sigmareparam": {"attention_softmax": "normsoftmax", "sigma_reparam": True},
    "qknorm": {"qk_norm": "rms"},
}
LABELS = {"stock": "stock", "normsoftmax": "NormSoftmax", "sigmareparam": "σReparam",
          "normsoftmax_sigmareparam": "NormSoftmax + σReparam", "qknorm": "QK-norm (RMS)"}
COLORS = {"stock": "tab:blue", "normsoftmax": "tab:orange", "sigmareparam": "tab:red",
          "normsoftmax_sigmareparam": "tab:purple", "qknorm": "tab:green"}
LRS = [1e-4, 3e-4, 1e-3]
QUICK_VARIANTS = ["stock", "normsoftmax_sigmareparam", "qknorm"]


def build_parser():
    parser = T.text_parser(__doc__.split("\n\n")[0], "runs/exp5_pretrained", default_seeds="0,1,2")
    parser.add_argument("--variants", type=R.name_list(VARIANTS), default=None,
                        help="comma-separated subset of: " + ", ".join(VARIANTS) + " (default: all; qknorm needs "
                             "a package with the qk_norm flag and is left out, with a message, when it has none)")
    parser.add_argument("--lrs", type=R.float_list, default=LRS,
                        help="peak learning rates (default: " + ",".join(f"{lr:g}" for lr in LRS) + ")")
    parser.add_argument("--steps", type=R.positive_int, default=T.BASE_SPECS["sentiment"]["steps"],
                        help=f"training steps per run (default: {T.BASE_SPECS['sentiment']['steps']})")
    parser.add_argument("--batch-size", type=R.positive_int, default=T.BASE_SPECS["sentiment"]["batch_size"],
                        help=f"texts per step (default: {T.BASE_SPECS['sentiment']['batch_size']})")
    parser.add_argument("--stability-every", type=R.positive_int,
                        default=T.BASE_SPECS["sentiment"]["stability_every"],
                        help="measure attention entropy every N steps (default: "
                             f"{T.BASE_SPECS['sentiment']['stability_every']})")
    return parser


def check_args(args, parser) -> None:
    T.check_distinct_lrs(args.lrs, parser)
    if args.variants is None:
        args.variants = list(QUICK_VARIANTS if args.quick else VARIANTS)


def make_specs(args) -> list[dict]:
    lrs, seeds, steps, every, batch, n_test = args.lrs, args.seeds, args.steps, args.stability_every, \
        args.batch_size, T.BASE_SPECS["sentiment"]["n_test"]
    if args.quick:
        lrs, seeds, steps, every, batch, n_test = lrs[-1:], seeds[:1], 2, 1, 4, 16
    return T.grid_specs("sentiment", VARIANTS, args.variants, lrs, seeds, steps=steps, batch_size=batch,
                        stability_every=every, n_test=n_test)


def run_metrics(result) -> dict:
    """What the tables report for one run."""
    entropies = [v for m in result["stability"] for v in m["entropy_min"] if v is not None and math.isfinite(v)]
    layer_means = [v for m in result["stability"] for v in m["entropy_mean"] if v is not None and math.isfinite(v)]
    is_diverged = T.diverged(result)
    accuracy = result["final"]["accuracy"]
    steps = result["step_process_seconds"]
    return {
        "test_accuracy": accuracy,
        "at_chance": accuracy is None or accuracy <= result["majority_rate_test"] + 0.01,
        "min_entropy": min(entropies) if entropies else float("nan"),
        "min_layer_entropy": min(layer_means) if layer_means else float("nan"),
        "initial_min_entropy": min((v for v in result["stability"][0]["entropy_min"] if v is not None),
                                   default=float("nan")),
        "loss_spikes": len(T.loss_spikes(result["train_loss"])),
        "diverged": is_diverged,
        "non_finite": result["diverged_at"] is not None,
        "seconds_per_step": sum(steps) / len(steps) if steps else float("nan"),
        "conversion": result["conversion"],
    }


def summarize(args, specs, results, command) -> dict:
    variants = list(dict.fromkeys(s["variant"] for s in specs))
    lrs = sorted({s["lr"] for s in specs})
    seeds = sorted({s["seed"] for s in specs})
    metrics = {s["name"]: run_metrics(results[s["name"]]) for s in specs}

    conversion_rows, conversion = [], {}
    for variant in variants:
        group = [metrics[s["name"]]["conversion"] for s in specs if s["variant"] == variant]
        conversion[variant] = {key: max(c[key] for c in group) for key in group[0]}
        conversion_rows.append([LABELS[variant]] + [f"{conversion[variant][key]:.2e}"
                                                    for key in ("hidden_states", "cls", "mean_pooled")])
    rows, table = [], []
    for lr in lrs:
        for variant in variants:
            group = [metrics[s["name"]] for s in specs if s["lr"] == lr and s["variant"] == variant]
            n = len(group)
            row = {"lr": lr, "variant": variant, "n": n,
                   **{key: [m[key] for m in group] for key in ("test_accuracy", "min_entropy", "min_layer_entropy",
                                                               "loss_spikes", "seconds_per_step")},
                   "diverged": sum(m["diverged"] for m in group), "non_finite": sum(m["non_finite"] for m in group),
                   "at_chance": sum(m["at_chance"] for m in group)}
            rows.append(row)
            table.append([f"{lr:g}", LABELS[variant], n, R.fmt_mean_std(row["test_accuracy"], 100, 1),
                          f"{row['at_chance']}/{n}", R.fmt_mean_std(row["min_layer_entropy"], digits=3),
                          R.fmt_mean_std(row["min_entropy"], digits=3),
                          R.fmt_mean_std(row["loss_spikes"], digits=1), f"{row['diverged']}/{n}",
                          R.fmt_mean_std(row["seconds_per_step"], digits=2)])
    first = results[specs[0]["name"]]
    spec0 = first["spec"]
    stock_initial = [metrics[s["name"]]["initial_min_entropy"] for s in specs if s["variant"] == "stock"]
    markdown = (
        "**Cost of the conversion** (before training; relative change against the stock checkpoint on "
        f"{spec0['probe_examples']} test texts; largest over the runs)\n\n"
        + R.markdown_table(["variant", "last hidden states", "[CLS] vector", "mean-pooled embedding"],
                           conversion_rows)
        + f"\n\n**Fine-tuning** (all-MiniLM-L6-v2, Rotten Tomatoes; AdamW, no warmup, linear decay, "
          f"{spec0['steps']} steps of {spec0['batch_size']} texts; mean ± std over seeds)\n\n"
        + R.markdown_table(["lr", "variant", "n", "test acc %", "at chance", "min layer entropy (nats)",
                            "min head entropy (nats)",
                            "loss spikes", "diverged", "CPU s / step"], table)
        + f"\n\nTest accuracy on the first {spec0['n_test']} test texts (majority class: "
          f"{100 * first['majority_rate_test']:.1f}%; *at chance*: at most 1 point above it). Attention entropy on "
          f"{spec0['probe_examples']} fixed test texts at step 0 and every {spec0['stability_every']} steps, lowest "
          "over those measurements: *min layer entropy* of the lowest layer (mean over its heads), *min head "
          "entropy* of the lowest single head; the stock checkpoint starts at "
          f"{R.fmt_mean_std(stock_initial, digits=3)} for the latter (its layer 0 has a nearly one-hot head). "
          f"Loss spikes: steps whose loss is above {T.SPIKE_FACTOR:g}x the "
          f"median of the {T.SPIKE_WINDOW} previous steps. Diverged: non-finite loss, or the mean loss of the last "
          f"5 steps above the first step's. CPU s / step: process time of forward + backward + optimizer step, one "
          f"thread. n = {len(seeds)} seeds per cell.")
    summary = {"experiment": "exp5_pretrained_finetune", "conversion": conversion, "rows": rows,
               "per_run": metrics}
    T.write_summary(args.output_dir, summary, markdown, command, results)
    plot_sweep(args, rows, variants)
    plot_curves(args, specs, results, variants, max(lrs))
    return summary


def plot_sweep(args, rows, variants):
    plt = R.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for variant in variants:
        points = [r for r in rows if r["variant"] == variant]
        lrs = [r["lr"] for r in points]
        for ax, key, scale in ((axes[0], "test_accuracy", 100), (axes[1], "min_layer_entropy", 1)):
            stats = [R.mean_std(r[key]) for r in points]
            ax.errorbar(lrs, [scale * m for m, _, _ in stats], yerr=[scale * s for _, s, _ in stats], marker="o",
                        capsize=3, color=COLORS[variant], label=LABELS[variant], alpha=0.85)
    axes[0].set_ylabel("test accuracy %")
    axes[1].set_ylabel("lowest layer entropy over training (nats)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate (no warmup, linear decay)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes (mean ± std over seeds)", fontsize=10)
    R.save_figure(figure, args.output_dir, "exp5_lr_sweep.png", args.figures_dir, quick=args.quick)


def plot_curves(args, specs, results, variants, lr):
    plt = R.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    seeds = sorted({s["seed"] for s in specs})
    for spec in [s for s in specs if s["lr"] == lr]:
        result = results[spec["name"]]
        first = spec["seed"] == seeds[0]
        style = {"color": COLORS[spec["variant"]], "alpha": 0.9 if first else 0.4,
                 "linewidth": 1.4 if first else 0.8, "label": LABELS[spec["variant"]] if first else None}
        losses = [float("nan") if v is None else v for v in result["train_loss"]]
        axes[0].plot(range(1, len(losses) + 1), losses, **style)
        steps = [m["step"] for m in result["stability"]]
        lowest = [min((v for v in m["entropy_min"] if v is not None), default=float("nan"))
                  for m in result["stability"]]
        axes[1].plot(steps, lowest, marker=".", **style)
    axes[0].set_ylabel("training loss")
    axes[1].set_ylabel("lowest head entropy, any layer (nats)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"lr = {lr:g} (thick: seed {seeds[0]}, thin: other seeds)", fontsize=10)
    R.save_figure(figure, args.output_dir, "exp5_curves.png", args.figures_dir, quick=args.quick)


def main(argv=None) -> int:
    return T.run_text_experiment(Path(__file__).name, argv, build_parser, make_specs, summarize, check_args)


if __name__ == "__main__":
    R.main_guard(main)
