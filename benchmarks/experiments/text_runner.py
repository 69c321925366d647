"""Shared runner of the text experiments (exp5, exp6): data, models, training loop, resumable run grid, summaries.

The text experiments reuse the helpers of :mod:`exp_runner` (argument types, atomic JSON, mean ± std tables, figures)
but not its ViT-bound training loop and grid (``exp_runner.train_run`` and ``run_grid`` build the tiny ViT from
``exp_runner.BASE_SPEC``). Two tasks share one training loop here:

* ``sentiment``: the real all-MiniLM-L6-v2 checkpoint (a 6-layer, 384-wide ``BertModel``) loaded with
  ``hf_normsoftmax.from_stock(minilm_path(), task="text-classification", num_labels=2, **flags)``, its [CLS]
  pooler replaced by the checkpoint's own mean pooling (``pooling="mean"``, see :class:`MeanPooler`), fine-tuned on
  the Rotten Tomatoes snippets (``load_rotten_tomatoes``: 10,201 train / 2,551 test, stratified split, seed 0) with
  its own WordPiece tokenizer, dynamic padding (each batch padded to its longest text, texts cut at ``max_length``
  tokens). The token-embedding matrix is frozen (see ``freeze_word_embeddings``): on CPU its 11.7 M-entry AdamW
  update is a fifth of a step, and attention stability does not depend on it. Dropout stays as in the checkpoint
  (0.1), as in an ordinary fine-tune.
* ``char_lm``: a GPT-2 (``NormSoftmaxGPT2LMHeadModel``, random init: no package here ships GPT-2 weights) trained
  from scratch on Shakespeare (``load_shakespeare_text``: 38 works for training, 4 held out for validation, split by
  work) with character-level tokens: the vocabulary is the training text's characters (plus one id for characters
  only the validation text has). GPT-2's BPE vocabulary (50,257) would make the LM head 50x the cost of a 128-wide,
  4-layer model's blocks on CPU.

Every run is seeded: the seed sets the new weights (classifier head / whole GPT-2) and the order of the training
batches (and the dropout masks); the data split is fixed. Attention statistics come from
``hf_normsoftmax.training.diagnostics.collect_stability_stats`` on a fixed probe batch (an eval-mode, no-grad
forward that leaves the model and the RNG untouched). CPU cost is measured with ``time.process_time`` (the run's
whole process time, and the time of each training step: forward, backward, optimizer step).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exp_runner as R  # noqa: E402  (sets the offline environment variables before torch/transformers load)
import torch  # noqa: E402

TEXT_RESULT_VERSION = 1
TASKS = ("sentiment", "char_lm")

# Package flags every run sets explicitly (a spec names its variant by these).
FLAG_DEFAULTS: dict[str, Any] = {"attention_softmax": "softmax", "sigma_reparam": False, "qk_norm": None}

BASE_SPECS: dict[str, dict[str, Any]] = {
    "sentiment": {
        "task": "sentiment",
        **FLAG_DEFAULTS,
        "max_length": 32,  # tokens per text, [CLS] and [SEP] included (median text: 26 tokens, 95th percentile: 47)
        "freeze_word_embeddings": True,
        "pooling": "mean",  # "mean": all-MiniLM-L6-v2's own mean pooling feeds the classifier; "cls": BERT's pooler
        "n_test": 256,  # first N test texts of the fixed split (the final accuracy)
        "probe_examples": 16,  # first N test texts: attention-statistics probe and conversion-cost batch
        "optimizer": "adamw",
        "lr": 3e-5,
        "weight_decay": 0.01,
        "schedule": "linear",  # no warmup; linear decay to 0 at the last step
        "steps": 20,
        "batch_size": 8,
        "stability_every": 6,
        "seed": 0,
    },
    "char_lm": {
        "task": "char_lm",
        **FLAG_DEFAULTS,
        "n_layer": 4,
        "n_embd": 128,
        "n_head": 4,
        "context": 128,  # n_positions; every training / validation window is this long
        "n_val_windows": 64,  # evenly spaced windows of the held-out works (validation loss)
        "probe_examples": 8,  # the first validation windows: attention-statistics probe
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "schedule": "constant",  # no warmup
        "steps": 80,
        "batch_size": 8,
        "stability_every": 10,
        "seed": 0,
    },
}
SCHEDULES = ("constant", "linear")
QK_NORM_VALUES = (None, "rms", "layer")

# Loss spikes: a step whose training loss is above SPIKE_FACTOR times the median of the SPIKE_WINDOW previous
# finite losses (counted from step SPIKE_WINDOW + 1 on).
SPIKE_FACTOR = 2.0
SPIKE_WINDOW = 10


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def text_parser(description: str, default_output_dir: str, default_seeds: str) -> argparse.ArgumentParser:
    """The options every text experiment has (no --dataset: each experiment has its one data set)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke test only: a handful of steps on a reduced grid; the numbers mean nothing")
    parser.add_argument("--seeds", type=R.seed_list, default=R.seed_list(default_seeds),
                        help=f"seeds, e.g. '0,1,2' or '0-4' (default: {default_seeds}; --quick: the first one)")
    parser.add_argument("--output-dir", type=Path, default=Path(default_output_dir),
                        help=f"where runs/*.json, summary.json, summary.md and the figures go "
                             f"(default: {default_output_dir}); runs whose JSON exists are skipped (resume)")
    parser.add_argument("--jobs", type=R.positive_int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--threads", type=R.positive_int, default=1, help="torch threads per worker (default: 1)")
    parser.add_argument("--figures-dir", type=Path, default=None,
                        help="also write the figures there (e.g. docs/figures)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def check_distinct_lrs(lrs: Sequence[float], parser: argparse.ArgumentParser) -> None:
    """Run names carry the learning rate as ``f"{lr:g}"``: two values that print alike would share result files."""
    names = [f"{lr:g}" for lr in lrs]
    if len(set(names)) != len(names):
        parser.error(f"--lrs: expected distinct learning rates (as printed with 6 significant digits), got {names}")


def full_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` over its task's defaults; unknown tasks, keys and values are refused by name."""
    task = spec.get("task")
    if task not in BASE_SPECS:
        raise ValueError(f"unknown task {task!r}; allowed: {list(BASE_SPECS)}")
    full = {**BASE_SPECS[task], **spec}
    unknown = set(full) - set(BASE_SPECS[task]) - {"name", "group", "variant"}
    if unknown:
        raise ValueError(f"unknown spec keys {sorted(unknown)} for task {task!r}; allowed: "
                         f"{sorted(BASE_SPECS[task])} plus name, group, variant")
    if full["schedule"] not in SCHEDULES:
        raise ValueError(f"unknown schedule {full['schedule']!r}; allowed: {list(SCHEDULES)}")
    if full["optimizer"] != "adamw":
        raise ValueError(f"unknown optimizer {full['optimizer']!r}; allowed: adamw")
    if full["qk_norm"] not in QK_NORM_VALUES:
        raise ValueError(f"unknown qk_norm {full['qk_norm']!r}; allowed: {list(QK_NORM_VALUES)}")
    if full["task"] == "sentiment" and full["pooling"] not in ("mean", "cls"):
        raise ValueError(f"unknown pooling {full['pooling']!r}; allowed: ['mean', 'cls']")
    for key in ("steps", "batch_size", "probe_examples"):
        if not isinstance(full[key], int) or isinstance(full[key], bool) or full[key] < 1:
            raise ValueError(f"{key} must be a positive int, got {full[key]!r}")
    if not (isinstance(full["lr"], float | int) and math.isfinite(full["lr"]) and full["lr"] > 0):
        raise ValueError(f"lr must be a positive number, got {full['lr']!r}")
    return full


def variant_flags(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The package flags of ``spec`` (``qk_norm`` only when set: a package without the flag still runs the rest)."""
    flags = {"attention_softmax": spec["attention_softmax"], "sigma_reparam": bool(spec["sigma_reparam"])}
    if spec["qk_norm"] is not None:
        flags["qk_norm"] = spec["qk_norm"]
    return flags


def grid_specs(task: str, variants: Mapping[str, Mapping[str, Any]], chosen, lrs, seeds, **settings) -> list[dict]:
    """One spec per (lr, variant, seed), named ``lr<lr>_<variant>_s<seed>``: the flags at their defaults, then the
    variant's, then ``settings`` (steps, batch size, ...)."""
    return [{"name": f"lr{lr:g}_{variant}_s{seed}", "task": task, "variant": variant, **FLAG_DEFAULTS,
             **variants[variant], "lr": lr, **settings, "seed": seed}
            for lr in lrs for variant in chosen for seed in seeds]


# ---------------------------------------------------------------------------------------------------------------
# data (cached per process: a worker loads it once for all its runs)
# ---------------------------------------------------------------------------------------------------------------

_CACHE: dict[tuple, Any] = {}


def sentiment_data(max_length: int) -> dict[str, Any]:
    """Token ids (lists, cut at ``max_length``) and labels of the Rotten Tomatoes train and test splits.

    Tokenizing the 12,752 texts costs about 10 CPU-seconds, so the result is also cached on disk (JSON, written
    atomically, under the package's cache directory) for the other worker processes and later runs.
    """
    key = ("sentiment", max_length)
    if key in _CACHE:
        return _CACHE[key]
    from hf_normsoftmax.training.builtin_data import default_cache_dir

    cache = default_cache_dir() / "experiments" / f"rotten_tomatoes_minilm_len{max_length}_v1.json"
    data = None
    if cache.exists():
        try:
            data = json.loads(cache.read_text())
        except (OSError, ValueError):
            data = None  # unreadable: rebuilt below
    if not isinstance(data, dict) or not {"pad_id", "train_ids", "train_labels", "test_ids", "test_labels"} <= set(
            data) or any(len(data[f"{split}_ids"]) != len(data[f"{split}_labels"]) for split in ("train", "test")):
        from transformers import AutoTokenizer

        from hf_normsoftmax.training.builtin_data import load_rotten_tomatoes, minilm_path

        dataset = load_rotten_tomatoes()  # fixed stratified 80/20 split, seed 0
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        data = {"pad_id": tokenizer.pad_token_id}
        for split in ("train", "test"):
            encoded = tokenizer(list(dataset[split]["text"]), truncation=True, max_length=max_length)
            data[f"{split}_ids"] = encoded["input_ids"]
            data[f"{split}_labels"] = [int(label) for label in dataset[split]["label"]]
        R.write_json(cache, data)
    data["train_size"] = len(data["train_labels"])
    _CACHE[key] = data
    return data


def majority_rate(labels: Sequence[int]) -> float:
    """Accuracy of always predicting the most frequent label (the chance level of an unbalanced test set)."""
    return max(labels.count(label) for label in set(labels)) / len(labels)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Dynamic padding: right-pad to the longest sequence of the batch, with its attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, :len(sequence)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def shakespeare_chars() -> dict[str, Any]:
    """Character ids of the training and validation works and the vocabulary (the training text's characters)."""
    key = ("char_lm",)
    if key not in _CACHE:
        import numpy as np

        from hf_normsoftmax.training.builtin_data import load_shakespeare_text

        dataset = load_shakespeare_text()  # 4 of 42 works held out (validation_fraction 0.1, seed 0)
        train_text = "\n\n".join(dataset["train"]["text"])
        val_text = "\n\n".join(dataset["validation"]["text"])
        vocab = sorted(set(train_text))
        index = {char: i for i, char in enumerate(vocab)}
        unknown = len(vocab)  # one id for characters that only the validation text has

        def encode(text: str):
            return torch.from_numpy(np.fromiter((index.get(c, unknown) for c in text), dtype=np.int64,
                                                count=len(text)))

        _CACHE[key] = {"train": encode(train_text), "validation": encode(val_text), "vocab_size": len(vocab) + 1,
                       "validation_works": list(dataset["validation"]["title"]),
                       "unknown_in_validation": sum(1 for c in val_text if c not in index)}
    return _CACHE[key]


# ---------------------------------------------------------------------------------------------------------------
# tasks: model, batches, evaluation, probe
# ---------------------------------------------------------------------------------------------------------------


class _Task:
    model: Any
    probe: dict[str, torch.Tensor]
    extra: dict[str, Any]

    def batch(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError


class _Sentiment(_Task):
    def __init__(self, spec: Mapping[str, Any]):
        import hf_normsoftmax
        from hf_normsoftmax.training.builtin_data import minilm_path

        self.spec = spec
        self.data = sentiment_data(spec["max_length"])
        self.model = hf_normsoftmax.from_stock(minilm_path(), task="text-classification", num_labels=2,
                                               **variant_flags(spec))
        if spec["freeze_word_embeddings"]:
            self.model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
        if spec["pooling"] == "mean":
            MeanPooler.install(self.model.bert)
        self.model.train()
        probe_ids = self.data["test_ids"][:spec["probe_examples"]]
        self.probe = pad_batch(probe_ids, self.data["pad_id"])
        self.extra = {"conversion": conversion_cost(self.model, self.probe),
                      "majority_rate_test": majority_rate(self.data["test_labels"][:spec["n_test"]])}
        self._permutation, self._cursor = None, 0

    def batch(self, generator):
        n = self.data["train_size"]
        if self._permutation is None or self._cursor + self.spec["batch_size"] > n:
            self._permutation, self._cursor = torch.randperm(n, generator=generator).tolist(), 0
        index = self._permutation[self._cursor:self._cursor + self.spec["batch_size"]]
        self._cursor += self.spec["batch_size"]
        batch = pad_batch([self.data["train_ids"][i] for i in index], self.data["pad_id"])
        batch["labels"] = torch.tensor([self.data["train_labels"][i] for i in index], dtype=torch.long)
        return batch

    @torch.no_grad()
    def evaluate(self):
        """Loss and accuracy on the first ``n_test`` test texts (batches of similar length: little padding)."""
        ids, labels = self.data["test_ids"][:self.spec["n_test"]], self.data["test_labels"][:self.spec["n_test"]]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        self.model.eval()
        total_loss, correct = 0.0, 0
        try:
            for start in range(0, len(order), 64):
                chunk = order[start:start + 64]
                batch = pad_batch([ids[i] for i in chunk], self.data["pad_id"])
                target = torch.tensor([labels[i] for i in chunk])
                out = self.model(**batch, labels=target)
                total_loss += float(out.loss) * len(chunk)
                correct += int((out.logits.argmax(-1) == target).sum())
        finally:
            self.model.train()
        return {"loss": total_loss / len(ids), "accuracy": correct / len(ids)}


class MeanPooler(torch.nn.Module):
    """Replaces a ``BertModel``'s pooler (dense + tanh on [CLS]) by the masked mean of the last hidden states, the
    pooling all-MiniLM-L6-v2 was trained with; the mask comes from a forward pre-hook on the ``BertModel``."""

    def __init__(self):
        super().__init__()
        self.mask: torch.Tensor | None = None

    @classmethod
    def install(cls, bert) -> MeanPooler:
        pooler = cls()

        def remember_mask(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            pooler.mask = mask if mask is not None and mask.dim() == 2 else None

        bert.register_forward_pre_hook(remember_mask, with_kwargs=True)
        bert.pooler = pooler
        return pooler

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None or self.mask.shape != hidden_states.shape[:2]:
            return hidden_states.mean(dim=1)
        weights = self.mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _relative(changed: torch.Tensor, reference: torch.Tensor) -> float:
    return float((changed.double() - reference.double()).norm() / reference.double().norm())


@torch.no_grad()
def conversion_cost(variant, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """How far the converted encoder is from the stock checkpoint on ``batch``, before any training (eval mode).

    Relative Frobenius change ``||h_variant - h_stock|| / ||h_stock||`` of the last hidden states (valid tokens
    only), of the [CLS] vectors and of the mean-pooled sentence embeddings (all-MiniLM-L6-v2's own pooling: the
    mean over valid tokens). The stock model is transformers' ``BertModel`` from the same checkpoint.
    """
    from transformers import AutoModel

    from hf_normsoftmax.training.builtin_data import minilm_path

    stock = AutoModel.from_pretrained(minilm_path()).eval()
    was_training = variant.training
    variant.eval()
    try:
        h_variant = variant.bert(**batch).last_hidden_state
    finally:
        variant.train(was_training)
    h_stock = stock(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    weights = batch["attention_mask"].unsqueeze(-1).to(h_stock.dtype)

    def pooled(hidden):
        return (hidden * weights).sum(1) / weights.sum(1)

    return {"hidden_states": _relative(h_variant[mask], h_stock[mask]),
            "cls": _relative(h_variant[:, 0], h_stock[:, 0]),
            "mean_pooled": _relative(pooled(h_variant), pooled(h_stock))}


class _CharLM(_Task):
    def __init__(self, spec: Mapping[str, Any]):
        from hf_normsoftmax import NormSoftmaxGPT2Config, NormSoftmaxGPT2LMHeadModel

        self.spec = spec
        self.data = shakespeare_chars()
        config = NormSoftmaxGPT2Config(
            vocab_size=self.data["vocab_size"], n_positions=spec["context"], n_embd=spec["n_embd"],
            n_layer=spec["n_layer"], n_head=spec["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0, **variant_flags(spec))
        self.model = NormSoftmaxGPT2LMHeadModel(config)
        self.model.train()
        validation, context = self.data["validation"], spec["context"]
        starts = torch.linspace(0, len(validation) - context, spec["n_val_windows"]).long()
        self.val_windows = torch.stack([validation[s:s + context] for s in starts.tolist()])
        self.probe = {"input_ids": self.val_windows[:spec["probe_examples"]]}
        self.extra = {"vocab_size": self.data["vocab_size"], "validation_works": self.data["validation_works"],
                      "num_parameters": sum(p.numel() for p in self.model.parameters())}

    def batch(self, generator):
        train, context = self.data["train"], self.spec["context"]
        starts = torch.randint(0, len(train) - context, (self.spec["batch_size"],), generator=generator)
        ids = torch.stack([train[s:s + context] for s in starts.tolist()])
        return {"input_ids": ids, "labels": ids}

    @torch.no_grad()
    def evaluate(self):
        """Mean next-character cross-entropy (nats) over the validation windows."""
        self.model.eval()
        try:
            losses = [float(self.model(input_ids=chunk, labels=chunk).loss)
                      for chunk in self.val_windows.split(16)]
        finally:
            self.model.train()
        return {"loss": sum(losses) / len(losses)}


TASK_CLASSES: dict[str, Callable[[Mapping[str, Any]], _Task]] = {"sentiment": _Sentiment, "char_lm": _CharLM}


# ---------------------------------------------------------------------------------------------------------------
# training loop
# ---------------------------------------------------------------------------------------------------------------


def make_optimizer(spec: Mapping[str, Any], model) -> torch.optim.Optimizer:
    """AdamW, weight decay on weight matrices only (not biases, norms, embeddings, sigmaReparam scalars)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 and "embeddings" not in name and not name.startswith(("transformer.wte",
             "transformer.wpe")) else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": spec["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec["lr"])


def lr_at(spec: Mapping[str, Any], step: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based), no warmup: constant, or linear from lr to 0."""
    if spec["schedule"] == "constant":
        return spec["lr"]
    return spec["lr"] * (1.0 - (step - 1) / spec["steps"])


def attention_summary(stats: Mapping[str, float], layers: int) -> dict[str, list[float]]:
    """Per-layer attention entropy (mean over heads, and the lowest head) from ``collect_stability_stats``."""
    def per_layer(item: str) -> list[float]:
        return [float(stats.get(f"stability/entropy/layer_{i}/{item}", float("nan"))) for i in range(layers)]

    return {"entropy_mean": per_layer("mean"), "entropy_min": per_layer("min")}


def loss_spikes(losses: Sequence[float | None], factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW) -> list[int]:
    """Steps (1-based) whose loss exceeds ``factor`` x the median of the ``window`` previous finite losses."""
    spikes, history = [], []
    for step, value in enumerate(losses, start=1):
        if value is None or not math.isfinite(value):
            continue
        if len(history) >= window and value > factor * statistics.median(history[-window:]):
            spikes.append(step)
        history.append(value)
    return spikes


def diverged(result: Mapping[str, Any]) -> bool:
    """Non-finite loss, or the final loss (mean of the last 10% of steps, at least 5) above the first step's."""
    if result["diverged_at"] is not None:
        return True
    losses = [v for v in result["train_loss"] if v is not None]
    tail = losses[-max(5, len(losses) // 10):]
    return bool(losses) and sum(tail) / len(tail) > losses[0]


def train_text_run(spec: Mapping[str, Any], progress: bool = False) -> dict[str, Any]:
    """Train one spec; returns its result record. Deterministic for a given spec, machine and thread count."""
    from hf_normsoftmax.training.diagnostics import collect_stability_stats

    spec = full_spec(spec)
    started, cpu_started = time.time(), time.process_time()
    torch.manual_seed(spec["seed"])
    task = TASK_CLASSES[spec["task"]](spec)
    model = task.model
    layers = model.config.num_hidden_layers
    optimizer = make_optimizer(spec, model)
    generator = torch.Generator().manual_seed(10_000 + spec["seed"])
    record: dict[str, Any] = {"train_loss": [], "step_process_seconds": [], "stability": []}

    def measure(step: int) -> None:
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        stats = collect_stability_stats(model, task.probe, qk_spectral_norm=False) if finite else {}
        record["stability"].append({"step": step, **attention_summary(stats, layers)})

    measure(0)
    diverged_at = None
    steps = range(1, spec["steps"] + 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=spec.get("name", "run"), leave=False, mininterval=2.0)
    for step in steps:
        batch = task.batch(generator)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(spec, step)
        step_started = time.process_time()
        loss = model(**batch).loss
        value = float(loss.detach())
        if not math.isfinite(value):
            record["train_loss"].append(None)
            diverged_at = step
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record["step_process_seconds"].append(time.process_time() - step_started)
        record["train_loss"].append(value)
        if step % spec["stability_every"] == 0:
            measure(step)
    final = task.evaluate()
    if diverged_at is None and not math.isfinite(final["loss"]):
        diverged_at = spec["steps"]
    return {
        "version": TEXT_RESULT_VERSION,
        "spec": spec,
        "flags": {k: v for k, v in model.config.normsoftmax_flags().items() if not k.startswith("sigma_reparam_")},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "diverged_at": diverged_at,
        "final": final,
        **task.extra,
        **record,
        "process_seconds": time.process_time() - cpu_started,
        "seconds": time.time() - started,
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }


# ---------------------------------------------------------------------------------------------------------------
# grid of runs: resumable, parallel, progress bars
# ---------------------------------------------------------------------------------------------------------------


def run_path(output_dir: Path, spec: Mapping[str, Any]) -> Path:
    return Path(output_dir) / "runs" / f"{spec['name']}.json"


def existing_result(path: Path, spec: Mapping[str, Any]) -> dict | None:
    """The saved result of ``spec``, or None (no file, unreadable, or saved for another spec / result version)."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        warnings.warn(f"{path}: unreadable result, recomputing it", stacklevel=2)
        return None
    if not isinstance(result, dict) or result.get("version") != TEXT_RESULT_VERSION or \
            result.get("spec") != R._clean(full_spec(spec)):
        warnings.warn(f"{path}: saved for another spec (or result version), recomputing it", stacklevel=2)
        return None
    return result


def _run_and_save(spec: Mapping[str, Any], path: str, progress: bool) -> tuple[str, float, bool]:
    result = train_text_run(spec, progress=progress)
    R.write_json(Path(path), result)
    return spec["name"], result["process_seconds"], result["diverged_at"] is not None


def run_grid(specs: Sequence[Mapping[str, Any]], output_dir: Path, jobs: int = 2, threads: int = 1,
             progress: bool = True) -> dict[str, dict]:
    """Train every spec without a valid result file; return ``{name: result}`` for all specs."""
    names = [spec["name"] for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError("run names must be unique")
    for spec in specs:
        full_spec(spec)  # refuse a bad spec before anything trains
    todo = [spec for spec in specs if existing_result(run_path(output_dir, spec), spec) is None]
    label = Path(output_dir).name
    print(f"[{label}] {len(specs)} runs: {len(specs) - len(todo)} already done (skipped), {len(todo)} to train, "
          f"{min(jobs, max(1, len(todo)))} worker(s) x {threads} thread(s)", flush=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"{label} runs", unit="run")

    def done(name: str, cpu: float, failed: bool) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{name} {cpu:.0f} CPU-s" + (" DIVERGED" if failed else ""))
            bar.update()

    started = time.time()
    if todo and (jobs == 1 or len(todo) == 1):
        # in this process: the worker settings hold for these runs only
        from transformers.utils import logging as hf_logging

        previous_threads, previous_verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
        with warnings.catch_warnings():
            R._worker_init(threads)
            try:
                for spec in todo:
                    done(*_run_and_save(spec, str(run_path(output_dir, spec)), progress))
            finally:
                torch.set_num_threads(previous_threads)
                hf_logging.set_verbosity(previous_verbosity)
                hf_logging.enable_progress_bar()
    elif todo:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=R._worker_init,
                                 initargs=(threads,)) as pool:
            futures = [pool.submit(_run_and_save, dict(spec), str(run_path(output_dir, spec)), False)
                       for spec in todo]
            for future in as_completed(futures):
                done(*future.result())
    if bar is not None:
        bar.close()
    if todo:
        print(f"[{label}] trained {len(todo)} runs in {time.time() - started:.0f} s", flush=True)
    return {spec["name"]: json.loads(run_path(output_dir, spec).read_text()) for spec in specs}


# ---------------------------------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------------------------------


def cpu_seconds(results: Mapping[str, Mapping]) -> float:
    return float(sum(r["process_seconds"] for r in results.values()))


def write_summary(output_dir: Path, summary: Mapping[str, Any], markdown: str, command: Sequence[str],
                  results: Mapping[str, Mapping]) -> None:
    """summary.json (``summary``, the command, the summed CPU and wall time) and summary.md (``markdown``, then the
    total CPU time, below a comment naming the command)."""
    cpu, wall = cpu_seconds(results), R.total_seconds(results)
    summary = {**summary, "total_process_seconds": cpu, "total_train_seconds": wall, "command": " ".join(command)}
    R.write_json(Path(output_dir) / "summary.json", summary)
    header = f"<!-- generated by: {' '.join(command)} -->\n\n"
    footer = (f"\n\nCompute: {cpu:.0f} CPU-seconds ({cpu / 60:.1f} CPU-minutes: process time summed over the "
              f"{len(results)} runs, {results and next(iter(results.values()))['torch_threads']} thread(s) per run); "
              f"{wall:.0f} s of wall time summed over the runs.\n")
    (Path(output_dir) / "summary.md").write_text(header + markdown.rstrip() + footer)


def run_text_experiment(script: str, argv: Sequence[str] | None, build_parser: Callable[[], argparse.ArgumentParser],
                        make_specs: Callable, summarize: Callable,
                        check_args: Callable[[argparse.Namespace, argparse.ArgumentParser], None] | None = None) -> int:
    """The ``main`` of a text experiment script: parse and check the arguments, train the runs not done yet, write
    the summary (with the command that made it) and print it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if check_args is not None:
        check_args(args, parser)
    specs = make_specs(args)
    results = run_grid(specs, args.output_dir, jobs=args.jobs, threads=args.threads, progress=not args.no_progress)
    command = ["python", f"benchmarks/experiments/{script}", *(sys.argv[1:] if argv is None else argv)]
    summarize(args, specs, results, command)
    print((Path(args.output_dir) / "summary.md").read_text())
    return 0
