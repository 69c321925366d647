#!/usr/bin/env python
"""Experiment 3: inverse-temperature sweep of the cross-entropy softmax (claim of "Temperature check").

Claim: with p = softmax(beta * z), tuning beta in [1e-2, 1e1] (with a matching learning rate) improves every
architecture studied; small beta can give better peak accuracy at some cost in stability.

Here: the tiny ViT of experiment 1 (width 64, 4 layers, 4 heads) on Fashion-MNIST with
``logit_inverse_temperature`` beta in {0.01, 0.03, 0.1, 0.3, 1, 3, 10}, the learning rate set by the package's rule
``hf_normsoftmax.training.lr.lr_for_inverse_temperature`` from a base learning rate tuned at beta = 1:

* ``sgd`` (momentum 0.9): lr = 0.1 / beta**2 (eta * beta**2 kept);
* ``adamw``: lr = 1e-3 / beta (eta * beta kept, approximately).

30 warmup steps then cosine to 0, batch 64, 300 steps, no weight decay, standard softmax attention. Reported: test
accuracy mean ± std over the seeds, per beta and optimizer, and the initial logit norm ||beta z_0||.
``--lr-rule none`` runs the same sweep with the base learning rate at every beta (a control; not run by default).

Usage::

    python benchmarks/experiments/exp3_temperature.py --output-dir runs/exp3_temperature --figures-dir docs/figures
    python benchmarks/experiments/exp3_temperature.py --quick --dataset mnist5k --output-dir /tmp/exp3
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exp_runner as R  # noqa: E402

BETAS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
BASE_LR = {"sgd": 0.1, "adamw": 1e-3}


def build_parser():
    parser = R.base_parser(__doc__.split("\n\n")[0], "runs/exp3_temperature")
    parser.add_argument("--betas", type=R.float_list, default=BETAS,
                        help="inverse temperatures (default: 0.01,0.03,0.1,0.3,1,3,10)")
    parser.add_argument("--optimizers", type=R.name_list(BASE_LR), default="sgd,adamw",
                        help="comma-separated subset of sgd, adamw (default: both)")
    parser.add_argument("--sgd-base-lr", type=float, default=BASE_LR["sgd"],
                        help=f"SGD learning rate at beta = 1 (default: {BASE_LR['sgd']})")
    parser.add_argument("--adamw-base-lr", type=float, default=BASE_LR["adamw"],
                        help=f"AdamW learning rate at beta = 1 (default: {BASE_LR['adamw']})")
    parser.add_argument("--lr-rule", choices=("scaled", "none"), default="scaled",
                        help="scaled: lr_for_inverse_temperature (default); none: the base lr at every beta")
    parser.add_argument("--steps", type=R.positive_int, default=300, help="training steps per run (default: 300)")
    return parser


def learning_rate(base_lr: float, beta: float, optimizer: str, rule: str) -> float:
    if rule == "none":
        return base_lr
    from hf_normsoftmax.training.lr import lr_for_inverse_temperature

    return lr_for_inverse_temperature(base_lr, beta=beta, optimizer=optimizer, base_beta=1.0)


def make_specs(args) -> list[dict]:
    optimizers = args.optimizers
    betas, seeds, steps = args.betas, args.seeds, args.steps
    if args.quick:
        betas, seeds, steps, optimizers = [betas[0], betas[-1]], seeds[:1], 6, optimizers[:1]
    base = {"sgd": args.sgd_base_lr, "adamw": args.adamw_base_lr}
    specs = []
    for optimizer in optimizers:
        for beta in betas:
            for seed in seeds:
                specs.append({
                    "name": f"{optimizer}_{args.lr_rule}_beta{beta:g}_s{seed}", "group": optimizer,
                    **R.data_spec(args),
                    "logit_inverse_temperature": beta, "optimizer": optimizer,
                    "lr": learning_rate(base[optimizer], beta, optimizer, args.lr_rule),
                    "weight_decay": 0.0, "warmup_steps": min(30, steps // 10), "schedule": "cosine",
                    "steps": steps, "seed": seed,
                })
    return specs


def summarize(args, specs, results, command) -> dict:
    optimizers = list(dict.fromkeys(s["optimizer"] for s in specs))
    betas = sorted({s["logit_inverse_temperature"] for s in specs})
    rows, table = [], []
    for beta in betas:
        line = [f"{beta:g}"]
        for optimizer in optimizers:
            group = [s for s in specs if s["optimizer"] == optimizer and s["logit_inverse_temperature"] == beta]
            runs = [results[s["name"]] for s in group]
            accuracy = [r["final"]["accuracy"] if r["diverged_at"] is None else None for r in runs]
            accuracy_raw = [r["final"]["accuracy"] for r in runs]
            norms = [r.get("initial_logit_norm") for r in runs]
            diverged = sum(r["diverged_at"] is not None for r in runs)
            mean, std, count = R.mean_std(accuracy)
            rows.append({"optimizer": optimizer, "beta": beta, "lr": group[0]["lr"], "accuracy_mean": mean,
                         "accuracy_std": std, "n_finite": count, "n": len(runs), "accuracies": accuracy_raw,
                         "diverged": diverged, "initial_logit_norm": R.mean_std(norms)[0],
                         "final_logit_norm": R.mean_std([r.get("final_logit_norm") for r in runs])[0],
                         "final_test_loss": [r["final"]["loss"] for r in runs]})
            line += [f"{group[0]['lr']:.3g}", R.fmt_mean_std(accuracy, 100),
                     f"{diverged}/{len(runs)}", f"{R.mean_std(norms)[0]:.3g}"]
        table.append(line)
    header = ["beta"]
    for optimizer in optimizers:
        header += [f"{optimizer} lr", f"{optimizer} test acc % (n={len(args_seeds(specs))})",
                   f"{optimizer} diverged", f"{optimizer} initial ‖βz‖"]
    markdown = R.markdown_table(header, table)
    best = {}
    for optimizer in optimizers:
        candidates = [r for r in rows if r["optimizer"] == optimizer and r["n_finite"]]
        if candidates:
            top = max(candidates, key=lambda r: r["accuracy_mean"])
            at_one = next((r for r in candidates if r["beta"] == 1.0), None)
            best[optimizer] = {"beta": top["beta"], "accuracy_mean": top["accuracy_mean"],
                               "accuracy_at_beta_1": at_one["accuracy_mean"] if at_one else None}
            markdown += (f"\n\n{optimizer}: best beta = {top['beta']:g} ({100 * top['accuracy_mean']:.2f}%)"
                         + (f"; beta = 1: {100 * at_one['accuracy_mean']:.2f}%" if at_one else "") + ".")
    markdown += (f"\n\nLearning-rate rule: {args.lr_rule}. Accuracy means/stds leave out diverged runs "
                 "(non-finite loss).")
    summary = {"experiment": "exp3_temperature", "lr_rule": args.lr_rule, "rows": rows, "best": best}
    R.write_summary(args.output_dir, summary, markdown, command, results)
    plot(args, rows, optimizers)
    return summary


def args_seeds(specs):
    return sorted({s["seed"] for s in specs})


def plot(args, rows, optimizers):
    plt = R.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"sgd": "tab:green", "adamw": "tab:purple"}
    for optimizer in optimizers:
        points = [r for r in rows if r["optimizer"] == optimizer]
        rule = "lr = 0.1/β²" if optimizer == "sgd" else "lr = 1e-3/β"
        if args.lr_rule == "none":
            rule = "fixed lr"
        axes[0].errorbar([r["beta"] for r in points], [100 * r["accuracy_mean"] for r in points],
                         yerr=[100 * r["accuracy_std"] for r in points], marker="o", capsize=3,
                         color=colors.get(optimizer), label=f"{optimizer} ({rule})")
        for r in points:
            axes[0].scatter([r["beta"]] * len(r["accuracies"]), [100 * a for a in r["accuracies"]], s=8,
                            color=colors.get(optimizer), alpha=0.35)
            if r["diverged"]:
                axes[0].annotate(f"{r['diverged']} div.", (r["beta"], 12), fontsize=7, ha="center",
                                 color=colors.get(optimizer))
        axes[1].plot([r["beta"] for r in points], [r["initial_logit_norm"] for r in points], marker="o",
                     color=colors.get(optimizer), label=f"{optimizer}: at init")
        axes[1].plot([r["beta"] for r in points], [r["final_logit_norm"] for r in points], marker="s",
                     linestyle="--", color=colors.get(optimizer), label=f"{optimizer}: after training")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("inverse temperature β")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title("Accuracy vs β (mean ± std; dots = seeds; diverged runs plotted at their raw accuracy)",
                      fontsize=8)
    axes[0].axhline(10, color="gray", linestyle=":", linewidth=0.8)
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("inverse temperature β")
    axes[1].set_ylabel("mean ‖βz‖ on the probe batch")
    axes[1].set_title("Logit norm the softmax sees", fontsize=9)
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    suffix = "" if args.lr_rule == "scaled" else "_fixed_lr"
    R.save_figure(figure, args.output_dir, f"exp3_temperature{suffix}.png", args.figures_dir, quick=args.quick)


def main(argv=None) -> int:
    return R.run_experiment(Path(__file__).name, argv, build_parser, make_specs, summarize)


if __name__ == "__main__":
    R.main_guard(main)
