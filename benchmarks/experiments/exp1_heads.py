#!/usr/bin/env python
"""Experiment 1: NormSoftmax attention and the number of heads (claim of the NormSoftmax paper).

Claim: a ViT with NormSoftmax attention is more robust to the number of heads than with softmax attention
(CIFAR-10, ViT-B: +4.63% averaged over head settings).

Here: a tiny ViT (width 64, 4 layers, MLP 128, 7x7 patches -> 17 tokens) trained from scratch on Fashion-MNIST
(first 10,000 training images, evaluated on the first 2,000 test images) with 1, 2, 4, 8 and 16 heads at the same
width (head dim 64 ... 4), softmax vs NormSoftmax attention (package default gamma), everything else equal:
AdamW lr 1e-3, weight decay 0.05, 50 warmup steps then cosine to 0, batch 64, a fixed budget of 400 steps
(about 2.6 epochs), standard cross-entropy. Reported: test accuracy mean ± std over the seeds.

Usage::

    python benchmarks/experiments/exp1_heads.py --output-dir runs/exp1_heads --figures-dir docs/figures
    python benchmarks/experiments/exp1_heads.py --quick --dataset mnist5k --output-dir /tmp/exp1   # CI smoke
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exp_runner as R  # noqa: E402

ATTENTIONS = ("softmax", "normsoftmax")


def build_parser():
    parser = R.base_parser(__doc__.split("\n\n")[0], "runs/exp1_heads")
    parser.add_argument("--heads", type=R.int_list, default=[1, 2, 4, 8, 16],
                        help="head counts, each must divide the width (default: 1,2,4,8,16)")
    parser.add_argument("--steps", type=R.positive_int, default=400, help="training steps per run (default: 400)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (default: 1e-3)")
    return parser


def make_specs(args) -> list[dict]:
    heads, seeds, steps = args.heads, args.seeds, args.steps
    if args.quick:
        heads, seeds, steps = [1, 4], seeds[:1], 6
    specs = []
    for num_heads in heads:
        for attention in ATTENTIONS:
            for seed in seeds:
                specs.append({
                    "name": f"h{num_heads}_{attention}_s{seed}",
                    "dataset": args.dataset, "n_train": args.n_train, "n_test": args.n_test,
                    "num_heads": num_heads, "attention_softmax": attention,
                    "optimizer": "adamw", "lr": args.lr, "weight_decay": 0.05,
                    "warmup_steps": min(50, steps // 10), "schedule": "cosine", "steps": steps,
                    "seed": seed,
                })
    return specs


def summarize(args, specs, results, command) -> dict:
    heads = sorted({s["num_heads"] for s in specs})
    table, summary_rows = [], []
    per_attention = {a: [] for a in ATTENTIONS}
    for num_heads in heads:
        row = [str(num_heads), str(64 // num_heads if 64 % num_heads == 0 else "-")]
        accs = {}
        for attention in ATTENTIONS:
            runs = [results[s["name"]] for s in specs
                    if s["num_heads"] == num_heads and s["attention_softmax"] == attention]
            values = [r["final"]["accuracy"] for r in runs]
            accs[attention] = values
            per_attention[attention].extend(values)
            mean, std, count = R.mean_std(values)
            summary_rows.append({"num_heads": num_heads, "attention": attention, "accuracy_mean": mean,
                                 "accuracy_std": std, "n": count, "accuracies": values,
                                 "diverged": sum(r["diverged_at"] is not None for r in runs)})
            row.append(R.fmt_mean_std(values, 100))
        diff = R.mean_std(accs["normsoftmax"])[0] - R.mean_std(accs["softmax"])[0]
        row.append(f"{100 * diff:+.2f}")
        table.append(row)
    average_gap = R.mean_std(per_attention["normsoftmax"])[0] - R.mean_std(per_attention["softmax"])[0]
    spread = {a: (max(r["accuracy_mean"] for r in summary_rows if r["attention"] == a)
                  - min(r["accuracy_mean"] for r in summary_rows if r["attention"] == a)) for a in ATTENTIONS}
    n_seeds = len({s["seed"] for s in specs})
    markdown = R.markdown_table(
        ["heads", "head dim", f"softmax acc % (n={n_seeds})", f"NormSoftmax acc % (n={n_seeds})",
         "NormSoftmax - softmax (points)"], table)
    markdown += (f"\n\nAverage over head settings: softmax {100 * R.mean_std(per_attention['softmax'])[0]:.2f}%, "
                 f"NormSoftmax {100 * R.mean_std(per_attention['normsoftmax'])[0]:.2f}% "
                 f"(difference {100 * average_gap:+.2f} points). Range of the mean accuracy across head counts: "
                 f"softmax {100 * spread['softmax']:.2f} points, NormSoftmax {100 * spread['normsoftmax']:.2f} "
                 f"points.")
    summary = {"experiment": "exp1_heads", "rows": summary_rows, "average_gap": average_gap,
               "accuracy_range_across_heads": spread,
               "flags_example": next(iter(results.values()))["flags"]}
    R.write_summary(args.output_dir, summary, markdown, command, results)
    plot(args, summary_rows, heads)
    return summary


def plot(args, rows, heads):
    plt = R.pyplot()
    figure, ax = plt.subplots(figsize=(5.2, 3.6))
    for attention, color, label in (("softmax", "tab:blue", "softmax attention"),
                                    ("normsoftmax", "tab:red", "NormSoftmax attention")):
        points = [r for r in rows if r["attention"] == attention]
        means = [100 * r["accuracy_mean"] for r in points]
        stds = [100 * r["accuracy_std"] for r in points]
        ax.errorbar([r["num_heads"] for r in points], means, yerr=stds, marker="o", capsize=3, color=color,
                    label=label)
        for r in points:  # individual seeds
            ax.scatter([r["num_heads"]] * len(r["accuracies"]), [100 * a for a in r["accuracies"]], s=8,
                       color=color, alpha=0.35)
    ax.set_xscale("log", base=2)
    ax.set_xticks(heads)
    ax.set_xticklabels([str(h) for h in heads])
    ax.set_xlabel("attention heads (width 64 fixed)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Tiny ViT, {args.dataset}: accuracy vs heads\n(mean ± std over seeds, dots = seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    R.save_figure(figure, args.output_dir, "exp1_heads.png", args.figures_dir, quick=args.quick)


def check_heads(args, parser) -> None:
    bad = [h for h in args.heads if 64 % h]
    if bad:
        parser.error(f"--heads {bad} do not divide the width 64")


def main(argv=None) -> int:
    return R.run_experiment(Path(__file__).name, argv, build_parser, make_specs, summarize, check_args=check_heads)


if __name__ == "__main__":
    R.main_guard(main)
