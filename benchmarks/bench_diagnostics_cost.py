"""Cost of StabilityCallback: Trainer training time with the callback (every_n_steps=50) vs without, CPU.

Small random GPT-2 and BERT variants with every flag on (NormSoftmax attention, sigmaReparam on every linear layer,
learnable gammas), real ``transformers.Trainer`` runs on a ``datasets.Dataset`` of random token ids, TensorBoard
reporting on in both runs. Runs alternate (without, with, without, ...) after one warm-up pair; the table gives the
median wall and process-CPU time of ``trainer.train()`` and the ratio with / without. Target: <= 1.05x.

The callback measures at step 0, every 50 steps and at the last step; over a short run the two extra measurements
weigh more than over a long one, so the steady-state cost is also given: the median time of one measurement
(eval-mode forward on the probe batch + statistics + logging + history line) divided by 50 median training steps.
The plots drawn once at the end of training are timed separately (``plot_at_end`` is off in the timed runs): a
one-off cost of about a second, independent of the run length.

Usage::

    python benchmarks/bench_diagnostics_cost.py                       # GPT-2 and BERT, 200 steps, 5 pairs
    python benchmarks/bench_diagnostics_cost.py --model gpt2 --steps 200 --reps 5 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import datasets  # noqa: E402
from timing_options import add_timing_options, apply_timing_options  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import hf_normsoftmax as H  # noqa: E402
from hf_normsoftmax.training.callbacks import StabilityCallback  # noqa: E402
from hf_normsoftmax.training.diagnostics import StabilityMonitor  # noqa: E402
from hf_normsoftmax.training.plots import plot_run_dir  # noqa: E402

FLAGS = dict(attention_softmax="normsoftmax", sigma_reparam=True, normsoftmax_learnable_gamma=True)


def build_model(kind: str, hidden: int, layers: int, heads: int, seq: int):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = H.NormSoftmaxGPT2Config(vocab_size=1000, n_positions=seq, n_embd=hidden, n_layer=layers,
                                         n_head=heads, bos_token_id=1, eos_token_id=2, pad_token_id=0, **FLAGS)
        return H.NormSoftmaxGPT2LMHeadModel(config)
    config = H.NormSoftmaxBertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * hidden,
                                     max_position_embeddings=seq, num_labels=2, **FLAGS)
    return H.NormSoftmaxBertForSequenceClassification(config)


def build_dataset(kind: str, count: int, seq: int) -> datasets.Dataset:
    ids = torch.randint(3, 1000, (count, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[count // 2:, seq * 3 // 4:] = 0  # half the examples padded
    columns = {"input_ids": (ids * mask).tolist(), "attention_mask": mask.tolist()}
    columns["labels"] = (ids * mask).tolist() if kind == "gpt2" else (ids[:, 0] % 2).tolist()
    return datasets.Dataset.from_dict(columns)


class _StepTimer(TrainerCallback):
    """Wall time of each optimizer step (on_step_begin -> on_step_end)."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def run(kind: str, with_callback: bool, options, dataset, out_dir: str):
    model = build_model(kind, options.hidden, options.layers, options.heads, options.seq)
    args = TrainingArguments(out_dir, max_steps=options.steps, per_device_train_batch_size=options.batch,
                             learning_rate=1e-4, logging_steps=options.every, save_strategy="no", use_cpu=True,
                             disable_tqdm=True, report_to=["tensorboard"], dataloader_num_workers=0, seed=0)
    timer = _StepTimer()
    callbacks = [timer]
    stability = None
    if with_callback:
        stability = StabilityCallback(every_n_steps=options.every, plot_at_end=False)
        callbacks.append(stability)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    wall, cpu = time.perf_counter(), time.process_time()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # the Trainer prints every log dict
        trainer.train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, timer.times, stability, trainer


def measurement_time(trainer: Trainer, stability: StabilityCallback, reps: int) -> float:
    """Median wall time of one measurement as the callback makes it (forward + statistics + trainer.log)."""
    stability._monitor = StabilityMonitor(trainer.model, chunk_size=stability.chunk_size)  # dropped at train end
    times = []
    for _ in range(reps):
        stability._last_measured_step = None  # same step again: measure anyway
        start = time.perf_counter()
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            stability._measure(trainer.args, trainer.state)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(kind: str, options) -> dict:
    dataset = build_dataset(kind, max(options.batch * 16, 64), options.seq)
    results = {False: {"wall": [], "cpu": []}, True: {"wall": [], "cpu": []}}
    step_times, last = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(options.reps + 1):  # the first pair warms up caches and is discarded
            for with_callback in (False, True):
                wall, cpu, steps, stability, trainer = run(kind, with_callback, options, dataset,
                                                           os.path.join(tmp, f"{kind}-{rep}-{with_callback}"))
                print(f"  {kind} pair {rep}/{options.reps} {'with' if with_callback else 'without'}: {wall:.2f} s",
                      file=sys.stderr, flush=True)
                if rep:
                    results[with_callback]["wall"].append(wall)
                    results[with_callback]["cpu"].append(cpu)
                    if not with_callback:
                        step_times.extend(steps)
                if with_callback:
                    last = (stability, trainer)
        stability, trainer = last
        stability._history_path = None  # time measurements, not more history lines in a deleted dir
        one_measurement = measurement_time(trainer, stability, 5)
        plot_start = time.perf_counter()
        plot_run_dir(os.path.join(tmp, f"{kind}-{options.reps}-True"))
        plot_time = time.perf_counter() - plot_start
    median = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in results.items()}
    # each pair ran back to back: the median of per-pair ratios is less sensitive to slow load drifts
    paired = statistics.median(w / wo for w, wo in zip(results[True]["wall"], results[False]["wall"], strict=True))
    step = statistics.median(step_times)
    return {
        "kind": kind,
        "without_wall": median[False]["wall"], "with_wall": median[True]["wall"],
        "without_cpu": median[False]["cpu"], "with_cpu": median[True]["cpu"],
        "paired": paired, "step": step, "measurement": one_measurement, "plot": plot_time,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["gpt2", "bert", "both"], default="both")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per training run")
    parser.add_argument("--every", type=int, default=50, help="StabilityCallback every_n_steps")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    add_timing_options(parser, reps=5, reps_help="timed (without, with) pairs; the median is reported", clock=False)
    options = parser.parse_args(argv)
    if options.steps < options.every:
        parser.error("--steps must be at least --every")
    apply_timing_options(parser, options)
    hf_logging.set_verbosity_error()
    kinds = ["gpt2", "bert"] if options.model == "both" else [options.model]
    print(f"StabilityCallback cost, every_n_steps={options.every}, {options.steps} steps/run, hidden {options.hidden}, "
          f"{options.layers} layers, {options.heads} heads, seq {options.seq}, batch {options.batch}, "
          f"flags {FLAGS}, torch threads {torch.get_num_threads()}, median of {options.reps} interleaved pairs\n")
    header = (f"{'model':6} {'without s':>10} {'with s':>10} {'ratio':>7} {'paired':>7} {'cpu ratio':>9} "
              f"{'step ms':>8} {'measure ms':>10} {'steady':>7} {'plots s':>8}")
    print(header)
    print("-" * len(header))
    for kind in kinds:
        r = bench(kind, options)
        ratio = r["with_wall"] / r["without_wall"]
        cpu_ratio = r["with_cpu"] / r["without_cpu"]
        steady = 1 + r["measurement"] / (options.every * r["step"])
        print(f"{kind:6} {r['without_wall']:10.2f} {r['with_wall']:10.2f} {ratio:6.3f}x {r['paired']:6.3f}x "
              f"{cpu_ratio:8.3f}x {r['step'] * 1e3:8.1f} {r['measurement'] * 1e3:10.1f} {steady:6.3f}x "
              f"{r['plot']:8.2f}")
    print("\nratio: wall time of trainer.train() with / without the callback (medians); paired: median of the "
          "per-pair ratios;\ncpu ratio: ratio in process CPU time; steady: 1 + one measurement / (every_n_steps x "
          "median step), the long-run cost;\nplots: one-off drawing at train end (not in the timed runs). "
          "Target: <= 1.05x.")

if __name__ == "__main__":
    main()
