"""Cost of sigmaReparam on a BERT-sized encoder stack, stock nn.Linear vs converted, CPU.

A post-LN transformer encoder built from plain torch (every projection an nn.Linear, attention through
F.scaled_dot_product_attention), 6 layers, seq 128, batch 8, hidden 384 and 768 (FFN 4x). Measured:

- train: forward + backward + AdamW step (one power-iteration step per layer per step in the converted model);
- eval: forward under torch.no_grad() in eval mode (the converted model checks each weight against its
  power-iteration vectors and folds s / sigma into the matmul; no cached effective weight).

Stock and converted are timed interleaved (stock, converted, stock, ...) after warm-up, with the wall clock or
the process CPU time (``--clock cpu``: steadier on a shared machine, with ``--threads 1``). The table gives the
medians, their ratio converted / stock, and the median of the per-repetition ratios (each converted run against
the stock run next to it: less sensitive to load that drifts during the run). Targets: train <= 1.05x,
eval <= 1.02x. The header states the load average before and after, to judge how quiet the machine was.

Usage::

    python benchmarks/bench_sigma_reparam.py            # both hidden sizes, 7 repetitions, wall clock
    python benchmarks/bench_sigma_reparam.py --hidden 384 --reps 15 --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from timing_options import add_timing_options, apply_timing_options  # noqa: E402

from hf_normsoftmax.sigma_reparam import sigma_reparam_  # noqa: E402


class EncoderLayer(nn.Module):
    """BERT-style post-LN encoder layer with separate q/k/v/o and FFN nn.Linear layers."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.ffn_in = nn.Linear(hidden, 4 * hidden)
        self.ffn_out = nn.Linear(4 * hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape

        def split(t):
            return t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

        attn = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        x = self.norm1(x + self.output(attn.transpose(1, 2).reshape(batch, length, hidden)))
        return self.norm2(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class Encoder(nn.Module):
    def __init__(self, hidden: int, layers: int, heads: int, classes: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads) for _ in range(layers))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x[:, 0])


def _timed(fn, clock) -> float:
    """Seconds of one call on ``clock``."""
    start = clock()
    fn()
    return clock() - start


def bench(hidden: int, layers: int, seq: int, batch: int, reps: int, warmup: int, clock) -> list[tuple]:
    torch.manual_seed(0)
    stock = Encoder(hidden, layers, heads=hidden // 64)
    converted = copy.deepcopy(stock)
    names = sigma_reparam_(converted)
    x = torch.randn(batch, seq, hidden)
    labels = torch.randint(0, 2, (batch,))
    with torch.no_grad():
        stock.eval(), converted.eval()
        diff = (stock(x) - converted(x)).abs().max().item()
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (stock, converted)}

    def train_step(model):
        def run():
            optimizer = optimizers[id(model)]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), labels).backward()
            optimizer.step()

        return run

    def eval_step(model):
        def run():
            with torch.no_grad():
                model(x)

        return run

    rows = []
    for phase, make in (("train step (fwd+bwd+AdamW)", train_step), ("eval forward", eval_step)):
        for model in (stock, converted):
            model.train(phase.startswith("train"))
        times = {"stock": [], "sigmaReparam": []}
        for rep in range(warmup + reps):
            for label, model in (("stock", stock), ("sigmaReparam", converted)):
                elapsed = _timed(make(model), clock)
                if rep >= warmup:
                    times[label].append(elapsed)
        stock_ms = statistics.median(times["stock"]) * 1e3
        reparam_ms = statistics.median(times["sigmaReparam"]) * 1e3
        paired = statistics.median(r / s for r, s in zip(times["sigmaReparam"], times["stock"], strict=True))
        rows.append((hidden, phase, stock_ms, reparam_ms, paired))
    print(
        f"hidden {hidden}: {len(names)} layers converted, max |output diff| after conversion {diff:.2e}",
        file=sys.stderr,
    )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[384, 768])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    add_timing_options(parser)
    args = parser.parse_args(argv)
    clock = apply_timing_options(parser, args)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for hidden in args.hidden:
        rows += bench(hidden, args.layers, args.seq, args.batch, args.reps, args.warmup, clock)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\nsigmaReparam cost, CPU, {torch.get_num_threads()} threads, {args.clock} clock, torch {torch.__version__}, "
        f"{args.layers} layers, seq {args.seq}, batch {args.batch}, median of {args.reps} interleaved reps, "
        f"load average {load_before:.2f} before / {load_after:.2f} after ({os.cpu_count()} CPUs)\n"
    )
    print("| hidden | measurement | stock (ms) | sigmaReparam (ms) | ratio of medians | median paired ratio | target |")
    print("|---|---|---|---|---|---|---|")
    for hidden, phase, stock_ms, reparam_ms, paired in rows:
        target = "<= 1.05x" if phase.startswith("train") else "<= 1.02x"
        print(
            f"| {hidden} | {phase} | {stock_ms:.1f} | {reparam_ms:.1f} | {reparam_ms / stock_ms:.3f}x "
            f"| {paired:.3f}x | {target} |"
        )


if __name__ == "__main__":
    main()
