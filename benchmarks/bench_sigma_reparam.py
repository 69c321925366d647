"""Cost of sigmaReparam on a BERT-sized encoder stack, stock nn.Linear vs converted, CPU.

A post-LN transformer encoder built from plain torch (every projection an nn.Linear, attention through
F.scaled_dot_product_attention), 6 layers, seq 128, batch 8, hidden 384 and 768 (FFN 4x). Measured:

- train: forward + backward + AdamW step (one power-iteration step per layer per step in the converted model);
- eval: forward under torch.no_grad() in eval mode (the converted model uses its cached effective weights).

Stock and converted are timed interleaved (stock, converted, stock, ...) after warm-up; the table gives the
median of the repetitions and the ratio converted / stock. Targets: train <= 1.05x, eval <= 1.02x.

Usage::

    python benchmarks/bench_sigma_reparam.py            # both hidden sizes, 7 repetitions
    python benchmarks/bench_sigma_reparam.py --hidden 384 --reps 5 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

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


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench(hidden: int, layers: int, seq: int, batch: int, reps: int, warmup: int) -> list[tuple]:
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
        times = {(label, clock): [] for label in ("stock", "sigmaReparam") for clock in ("wall", "cpu")}
        for rep in range(warmup + reps):
            for label, model in (("stock", stock), ("sigmaReparam", converted)):
                wall, cpu = _timed(make(model))
                if rep >= warmup:
                    times[label, "wall"].append(wall)
                    times[label, "cpu"].append(cpu)
        medians = {key: statistics.median(values) * 1e3 for key, values in times.items()}
        rows.append(
            (
                hidden,
                phase,
                medians["stock", "wall"],
                medians["sigmaReparam", "wall"],
                medians["stock", "cpu"],
                medians["sigmaReparam", "cpu"],
            )
        )
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
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.reps < 5:
        parser.error("--reps must be at least 5 (the medians are reported)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for hidden in args.hidden:
        rows += bench(hidden, args.layers, args.seq, args.batch, args.reps, args.warmup)
    print(
        f"\nsigmaReparam cost, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{args.layers} layers, seq {args.seq}, batch {args.batch}, median of {args.reps} interleaved reps\n"
    )
    print(
        "| hidden | measurement | stock wall (ms) | sigmaReparam wall (ms) | wall ratio | stock CPU (ms) "
        "| sigmaReparam CPU (ms) | CPU ratio | target |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for hidden, phase, stock_wall, reparam_wall, stock_cpu, reparam_cpu in rows:
        target = "<= 1.05x" if phase.startswith("train") else "<= 1.02x"
        print(
            f"| {hidden} | {phase} | {stock_wall:.1f} | {reparam_wall:.1f} | {reparam_wall / stock_wall:.3f}x "
            f"| {stock_cpu:.1f} | {reparam_cpu:.1f} | {reparam_cpu / stock_cpu:.3f}x | {target} |"
        )


if __name__ == "__main__":
    main()
