"""Plumbing shared by the example scripts in ``examples/``: command-line flags, input checks, run-dir files.

What lives here, and why:

* :func:`add_variant_arguments` / :func:`variant_flags_from_args`: the variant flags as command-line options
  (``--attention-softmax``, ``--normsoftmax-gamma``, ``--loss-softmax``, ``--logit-inverse-temperature``,
  ``--sigma-reparam``, ...) turned into config kwargs and checked *before* any data is loaded, with messages that
  name the command-line option (the config's own checks name the config field). A flag that would have no effect
  (``--normsoftmax-gamma`` without NormSoftmax attention) is refused as well.
* :func:`add_run_arguments`: the options every example shares (``--dataset``, ``--output-dir``, ``--max-steps`` /
  ``--epochs``, ``--learning-rate``, ...), with typed, range-checked values.
* :class:`BadInputError` and :func:`exit_on_bad_input`: bad input found while setting up (unknown dataset, missing
  columns, bad flag values, an output dir in the way) ends the program with exit status 2 and one clear message,
  before training starts.
* :func:`load_accuracy_metric`: accuracy as an ``evaluate`` metric that works offline (``evaluate.load("accuracy")``
  downloads its script from the Hub; see the function).
* Trainer plumbing: :func:`training_arguments_from_args`, :func:`stability_callbacks`, :func:`finish_trainer_run`
  (save, final evaluation, metrics, run files, card) and :func:`resumable_trainer_class` (a ``Trainer`` whose
  ``resume_from_checkpoint`` also restores weights saved under legacy key names, which transformers 5.23's own
  resume silently skips for ViT).
* run-dir files: :func:`save_results` (``{split}_results.json`` + ``all_results.json``, the layout of
  ``Trainer.save_metrics``), :func:`write_run_config` (``run_config.json``, read by the model card),
  :func:`finish_run_dir` (stability plots and the model card ``README.md``).
* distributed helpers: :func:`cpu_distributed_launch` (``accelerate launch --multi_gpu`` on a machine without GPUs
  starts independent single-process runs unless the CPU backend is requested: the examples request it),
  :func:`dump_rank_state` (each process's weights and buffers, to check that ranks agree), and the FSDP2 helpers
  :func:`fully_shard_model`, :func:`all_reduce_unsharded_grads`, :func:`clip_grad_norm_mixed`,
  :func:`full_state_dict`, :func:`stability_stats_fsdp2`.

Usage (inside an example)::

    parser = argparse.ArgumentParser(...)
    add_run_arguments(parser, default_dataset="mnist5k", default_output_dir="runs/vit", ...)
    add_variant_arguments(parser, defaults={"attention_softmax": "normsoftmax"})
    args = parser.parse_args(argv)
    with exit_on_bad_input(parser):
        flags = variant_flags_from_args(args, "normsoftmax_vit", defaults={"attention_softmax": "normsoftmax"})
        check_output_dir(args.output_dir, args.overwrite_output_dir, resume=None)
        ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "BAD_INPUT_ERRORS",
    "BadInputError",
    "VARIANT_FLAG_OPTIONS",
    "accuracy_from_logits",
    "add_run_arguments",
    "add_variant_arguments",
    "all_reduce_unsharded_grads",
    "check_output_dir",
    "check_training_length",
    "clip_grad_norm_mixed",
    "cpu_distributed_launch",
    "default_report_to",
    "dump_rank_state",
    "eval_split_name",
    "exit_on_bad_input",
    "finish_run_dir",
    "finish_trainer_run",
    "fraction",
    "full_state_dict",
    "fully_shard_model",
    "label_names_of",
    "load_accuracy_metric",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "resolve_learning_rate",
    "resolve_resume_checkpoint",
    "resumable_trainer_class",
    "save_results",
    "stability_callbacks",
    "stability_stats_fsdp2",
    "training_arguments_from_args",
    "variant_flags_from_args",
    "write_json",
    "write_run_config",
]


class BadInputError(ValueError):
    """Input that cannot work (a flag value, a flag combination, a dataset, an output dir), found before training."""


# Exceptions that, raised while an example sets up (before training), are the user's input rather than a bug:
# reported as one message with exit status 2 (argparse's convention for usage errors).
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, ConnectionError, ModuleNotFoundError)


@contextlib.contextmanager
def exit_on_bad_input(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Turn :data:`BAD_INPUT_ERRORS` raised inside the block into ``parser.error(message)`` (exit status 2).

    Wrap only the setup (argument checks, data loading, model building): errors during training keep their
    traceback.
    """
    try:
        yield
    except BAD_INPUT_ERRORS as error:
        message = str(error) or type(error).__name__
        if not isinstance(error, BadInputError):
            message = f"{message} [{type(error).__name__}]"
        parser.error(message)


# --------------------------------------------------------------------------------------------------------------------
# typed argparse values
# --------------------------------------------------------------------------------------------------------------------


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(text, 0)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = _finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def _optional_number(text: str) -> float | None:
    """argparse type for values that may be switched off: a number, or ``none``."""
    if text.strip().lower() in ("none", "off"):
        return None
    return _finite_float(text)


# --------------------------------------------------------------------------------------------------------------------
# variant flags
# --------------------------------------------------------------------------------------------------------------------

# config flag -> command-line option
VARIANT_FLAG_OPTIONS = {
    "attention_softmax": "--attention-softmax",
    "normsoftmax_gamma": "--normsoftmax-gamma",
    "normsoftmax_learnable_gamma": "--normsoftmax-learnable-gamma",
    "normsoftmax_max_temperature": "--normsoftmax-max-temperature",
    "normsoftmax_statistic": "--normsoftmax-statistic",
    "loss_softmax": "--loss-softmax",
    "loss_normsoftmax_gamma": "--loss-normsoftmax-gamma",
    "logit_inverse_temperature": "--logit-inverse-temperature",
    "sigma_reparam": "--sigma-reparam",
    "sigma_reparam_include": "--sigma-reparam-include",
    "sigma_reparam_exclude": "--sigma-reparam-exclude",
}
# Flags that only act when another flag has a given value: flag -> (governing flag, required value).
_FLAG_REQUIRES = {
    "normsoftmax_gamma": ("attention_softmax", "normsoftmax"),
    "normsoftmax_learnable_gamma": ("attention_softmax", "normsoftmax"),
    "normsoftmax_max_temperature": ("attention_softmax", "normsoftmax"),
    "normsoftmax_statistic": ("attention_softmax", "normsoftmax"),
    "loss_normsoftmax_gamma": ("loss_softmax", "normsoftmax"),
    "sigma_reparam_include": ("sigma_reparam", True),
    "sigma_reparam_exclude": ("sigma_reparam", True),
}


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(value)
    return str(value)


def add_variant_arguments(parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None) -> None:
    """Add the variant flags as options (group "variant flags"); ``defaults`` are this example's defaults.

    Every option defaults to ``None`` in the namespace (so :func:`variant_flags_from_args` can tell what the user
    gave); the effective default shown in ``--help`` is ``defaults[flag]``, else the config's own default.
    """
    from ..configuration_normsoftmax import (
        ATTENTION_SOFTMAX_CHOICES,
        DEFAULT_LOSS_NORMSOFTMAX_GAMMA,
        DEFAULT_NORMSOFTMAX_GAMMA,
        GAMMA_RANGE,
        INVERSE_TEMPERATURE_RANGE,
        LOSS_SOFTMAX_CHOICES,
        MAX_TEMPERATURE_RANGE,
        NORMSOFTMAX_STATISTIC_CHOICES,
    )

    def within(bounds: tuple[float, float]) -> str:
        return f"in [{bounds[0]:g}, {bounds[1]:g}]"

    config_defaults = {
        "attention_softmax": "softmax",
        "normsoftmax_gamma": DEFAULT_NORMSOFTMAX_GAMMA,
        "normsoftmax_learnable_gamma": False,
        "normsoftmax_max_temperature": None,
        "normsoftmax_statistic": "std",
        "loss_softmax": "softmax",
        "loss_normsoftmax_gamma": DEFAULT_LOSS_NORMSOFTMAX_GAMMA,
        "logit_inverse_temperature": 1.0,
        "sigma_reparam": False,
        "sigma_reparam_include": None,
        "sigma_reparam_exclude": None,
    }
    shown = {**config_defaults, **(defaults or {})}

    def default(flag: str) -> str:
        return f"(default: {_show(shown[flag])})"

    group = parser.add_argument_group(
        "variant flags",
        "Which stability methods the model uses (config flags of the normsoftmax_* variants; see "
        "hf_normsoftmax.configuration_normsoftmax). A flag that only acts together with another one (for example "
        "--normsoftmax-gamma with --attention-softmax normsoftmax) is refused when it would have no effect.",
    )
    group.add_argument("--attention-softmax", choices=ATTENTION_SOFTMAX_CHOICES, default=None,
                       help=f"softmax inside self-attention {default('attention_softmax')}")
    group.add_argument("--normsoftmax-gamma", type=_finite_float, default=None, metavar="GAMMA",
                       help=f"spread the attention logits are normalised to, {within(GAMMA_RANGE)} (initial value when "
                            "learnable) "
                            + default("normsoftmax_gamma"))
    group.add_argument("--normsoftmax-learnable-gamma", action=argparse.BooleanOptionalAction, default=None,
                       help="learn one gamma per head and layer " + default("normsoftmax_learnable_gamma"))
    group.add_argument("--normsoftmax-max-temperature", type=_optional_number, default=None, metavar="T",
                       help=f"cap on the attention temperature std/gamma, {within(MAX_TEMPERATURE_RANGE)}, or 'none' "
                            + default("normsoftmax_max_temperature"))
    group.add_argument("--normsoftmax-statistic", choices=NORMSOFTMAX_STATISTIC_CHOICES, default=None,
                       help="spread statistic of the attention logits " + default("normsoftmax_statistic"))
    group.add_argument("--loss-softmax", choices=LOSS_SOFTMAX_CHOICES, default=None,
                       help="softmax of the head / loss " + default("loss_softmax"))
    group.add_argument("--loss-normsoftmax-gamma", type=_finite_float, default=None, metavar="GAMMA",
                       help=f"spread of the normalised head logits, {within(GAMMA_RANGE)} "
                            "(bounds the reachable confidence) "
                            + default("loss_normsoftmax_gamma"))
    group.add_argument("--logit-inverse-temperature", type=_finite_float, default=None, metavar="BETA",
                       help="inverse temperature beta of the head softmax, "
                            f"{within(INVERSE_TEMPERATURE_RANGE)}: the loss sees "
                            "beta * logits "
                            + default("logit_inverse_temperature"))
    group.add_argument("--sigma-reparam", action=argparse.BooleanOptionalAction, default=None,
                       help="sigmaReparam on the linear layers (and the ViT patch embedding) "
                            + default("sigma_reparam"))
    group.add_argument("--sigma-reparam-include", nargs="+", default=None, metavar="PATTERN",
                       help="fnmatch patterns of the module names sigmaReparam converts (default: all)")
    group.add_argument("--sigma-reparam-exclude", nargs="+", default=None, metavar="PATTERN",
                       help="fnmatch patterns of module names sigmaReparam never converts")


def _cli_spelling(message: str) -> str:
    """Replace config field names (``normsoftmax_gamma`` or `` `normsoftmax_gamma` ``) by their option names."""
    for flag, option in VARIANT_FLAG_OPTIONS.items():
        message = re.sub(rf"`{flag}`|\b{flag}\b", option, message)
    return message


def variant_flags_from_args(
    args: argparse.Namespace, model_type: str, defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Config kwargs for the variant flags, from the options of :func:`add_variant_arguments`, checked.

    ``defaults`` are the example's defaults (as given to :func:`add_variant_arguments`); options the user passed
    override them. The result is validated by building the variant config of ``model_type``
    (``"normsoftmax_vit"``, ``"normsoftmax_bert"``, ``"normsoftmax_gpt2"``). Raises :class:`BadInputError`
    naming the command-line option for an invalid value (e.g. ``--normsoftmax-gamma 0``,
    ``--logit-inverse-temperature 0``), an invalid combination, or an option that would have no effect.
    """
    from .. import VARIANT_CONFIG_CLASSES

    if model_type not in VARIANT_CONFIG_CLASSES:
        raise ValueError(f"Invalid value for `model_type`: {model_type!r}. Allowed: {sorted(VARIANT_CONFIG_CLASSES)}.")
    unknown = sorted(set(defaults or {}) - set(VARIANT_FLAG_OPTIONS))
    if unknown:
        raise ValueError(f"Invalid example defaults {unknown}. Allowed: {sorted(VARIANT_FLAG_OPTIONS)}.")
    given = {flag: getattr(args, flag) for flag in VARIANT_FLAG_OPTIONS if getattr(args, flag, None) is not None}
    # "--normsoftmax-max-temperature none" parses to None, which cannot be told apart from "not given": fine, both
    # mean "no cap".
    flags = {**(defaults or {}), **given}
    for flag in given:
        requirement = _FLAG_REQUIRES.get(flag)
        if requirement is None:
            continue
        governing, required = requirement
        current = flags.get(governing, False if governing == "sigma_reparam" else "softmax")
        if current != required:
            needed = VARIANT_FLAG_OPTIONS[governing] + ("" if required is True else f" {required}")
            raise BadInputError(
                f"{VARIANT_FLAG_OPTIONS[flag]} {_show(given[flag])} has no effect without {needed} (currently "
                f"{VARIANT_FLAG_OPTIONS[governing]} is {_show(current)}). Add {needed}, or drop "
                f"{VARIANT_FLAG_OPTIONS[flag]}."
            )
    config_class = VARIANT_CONFIG_CLASSES[model_type]
    try:
        config_class(**flags)
    except (ValueError, TypeError) as error:
        raise BadInputError(f"invalid variant flags: {_cli_spelling(str(error))}") from None
    return flags


# --------------------------------------------------------------------------------------------------------------------
# common run options
# --------------------------------------------------------------------------------------------------------------------


def default_report_to() -> str:
    """``"tensorboard"`` when the tensorboard package is installed, else ``"none"``."""
    import importlib.util

    return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"


def add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    default_dataset: str,
    default_output_dir: str,
    default_learning_rate: float,
    default_batch_size: int,
    default_epochs: float | None,
    default_max_steps: int | None,
    default_stability_every: int,
    trainer: bool,
    steps_without_epochs: int | None = None,
) -> None:
    """Options every example shares (group "run"). ``trainer`` adds the Trainer-only ones (resume, evaluation).

    ``steps_without_epochs``: the training length when neither ``--max-steps`` nor ``--epochs`` is given (then
    ``default_max_steps`` must be None, so that ``--epochs`` alone is honoured; apply it with
    :func:`check_training_length`).
    """
    if steps_without_epochs is not None and (default_max_steps is not None or default_epochs is not None):
        raise ValueError("steps_without_epochs needs default_max_steps=None and default_epochs=None")
    if steps_without_epochs is not None:
        max_steps_default = f"{steps_without_epochs}, or from --epochs when that is given"
    else:
        max_steps_default = str(default_max_steps) if default_max_steps is not None else "from --epochs"
    group = parser.add_argument_group("run")
    group.add_argument("--dataset", default=default_dataset,
                       help="a built-in offline dataset (mnist5k, fashion_mnist, digits, rotten_tomatoes, "
                            "shakespeare), a local file or folder (csv, json, jsonl, parquet, txt, arrow, saved "
                            "dataset, image folder), or a Hugging Face Hub dataset id ('owner/name[:config]', "
                            f"needs the network) (default: {default_dataset})")
    group.add_argument("--output-dir", default=default_output_dir,
                       help=f"where metrics, checkpoint, plots and model card go (default: {default_output_dir})")
    group.add_argument("--overwrite-output-dir", action="store_true",
                       help="write into an output dir that already holds files")
    group.add_argument("--max-steps", type=positive_int, default=default_max_steps,
                       help=f"number of optimizer steps; overrides --epochs when given (default: {max_steps_default})")
    group.add_argument("--epochs", type=positive_float, default=default_epochs,
                       help="number of passes over the training data (default: "
                            f"{default_epochs if default_epochs is not None else 'none: --max-steps'})")
    parser.set_defaults(_steps_without_epochs=steps_without_epochs)
    group.add_argument("--learning-rate", type=positive_float, default=default_learning_rate,
                       help=f"peak learning rate (default: {default_learning_rate})")
    group.add_argument("--scale-lr-for-beta", action="store_true",
                       help="treat --learning-rate as tuned for beta = 1 and rescale it for "
                            "--logit-inverse-temperature with hf_normsoftmax.training.lr.lr_for_inverse_temperature "
                            "(AdamW: lr / beta)")
    group.add_argument("--batch-size", type=positive_int, default=default_batch_size,
                       help=f"training batch size per process (default: {default_batch_size})")
    group.add_argument("--eval-batch-size", type=positive_int, default=None,
                       help="evaluation batch size per process (default: 2 x --batch-size)")
    group.add_argument("--weight-decay", type=non_negative_float, default=0.01,
                       help="AdamW weight decay (default: 0.01)")
    group.add_argument("--warmup-ratio", type=fraction, default=0.1,
                       help="fraction of the steps with linear warmup (default: 0.1)")
    group.add_argument("--max-grad-norm", type=non_negative_float, default=1.0,
                       help="gradient clipping norm, 0 = off (default: 1.0)")
    group.add_argument("--max-train-samples", type=positive_int, default=None,
                       help="keep only the first N training examples (default: all)")
    group.add_argument("--max-eval-samples", type=positive_int, default=None,
                       help="keep only the first N evaluation examples (default: all)")
    group.add_argument("--seed", type=non_negative_int, default=42, help="random seed (default: 42)")
    group.add_argument("--logging-steps", type=positive_int, default=10, help="log every N steps (default: 10)")
    group.add_argument("--stability-every", type=non_negative_int, default=default_stability_every,
                       help="stability diagnostics every N steps (attention entropy, logit std, sigma, ||beta z||); "
                            f"0 = off (default: {default_stability_every})")
    group.add_argument("--report-to", default=default_report_to(),
                       help="logging integrations, comma-separated ('none', 'tensorboard', ...) "
                            "(default: tensorboard if installed)")
    group.add_argument("--dump-rank-state", metavar="DIR", default=None,
                       help="after training, every process writes its weights and buffers to "
                            "DIR/rank<R>.safetensors (to check that distributed ranks agree)")
    if trainer:
        group.add_argument("--eval-steps", type=positive_int, default=None,
                           help="evaluate every N steps (default: at the end of every epoch)")
        group.add_argument("--save-steps", type=positive_int, default=None,
                           help="save a checkpoint every N steps (default: at the end of every epoch)")
        group.add_argument("--save-total-limit", type=positive_int, default=2,
                           help="keep at most N checkpoints (default: 2)")
        group.add_argument("--resume-from-checkpoint", metavar="PATH", default=None,
                           help="resume training from a checkpoint-N directory, or 'latest' for the newest one in "
                                "--output-dir")
        group.add_argument("--metric-source", choices=("local", "hub"), default="local",
                           help="'local': accuracy computed by an evaluate.Metric shipped with this package (works "
                                "offline); 'hub': evaluate.load('accuracy') (downloads the metric script, needs the "
                                "network or a warm cache) (default: local)")


def resolve_learning_rate(args: argparse.Namespace, flags: Mapping[str, Any], optimizer: str = "adamw") -> float:
    """``--learning-rate``, rescaled for beta by :func:`~hf_normsoftmax.training.lr.lr_for_inverse_temperature` when
    ``--scale-lr-for-beta`` is given."""
    if not getattr(args, "scale_lr_for_beta", False):
        return args.learning_rate
    beta = flags.get("logit_inverse_temperature", 1.0)
    if flags.get("loss_softmax", "softmax") == "normsoftmax":
        raise BadInputError("--scale-lr-for-beta has no effect with --loss-softmax normsoftmax (beta is 1 there)")
    from .lr import lr_for_inverse_temperature

    return lr_for_inverse_temperature(args.learning_rate, beta, optimizer=optimizer)


def check_training_length(args: argparse.Namespace) -> None:
    """Either ``--max-steps`` or ``--epochs`` must be set; with neither, the example's ``steps_without_epochs``
    (see :func:`add_run_arguments`) becomes ``args.max_steps``."""
    if args.max_steps is None and args.epochs is None:
        fallback = getattr(args, "_steps_without_epochs", None)
        if fallback is None:
            raise BadInputError("set the training length with --max-steps or --epochs")
        args.max_steps = fallback


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, resume: str | None) -> Path:
    """Refuse an output dir that holds files unless ``--overwrite-output-dir`` or a resume is requested."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise BadInputError(f"--output-dir {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite and resume is None:
        raise BadInputError(
            f"--output-dir {str(path)!r} already holds files; pass --overwrite-output-dir to write into it, "
            "--resume-from-checkpoint to continue the run, or choose another directory"
        )
    return path


def resolve_resume_checkpoint(resume: str | None, output_dir: str | os.PathLike) -> str | None:
    """``--resume-from-checkpoint``: a ``checkpoint-N`` directory, or ``latest`` (newest in ``output_dir``)."""
    if resume is None:
        return None
    if resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
        if last is None:
            raise BadInputError(f"--resume-from-checkpoint latest: no checkpoint-N directory in {str(output_dir)!r}")
        return last
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise BadInputError(f"--resume-from-checkpoint {resume!r} is not a directory")
    if not (path / "trainer_state.json").is_file():
        raise BadInputError(
            f"--resume-from-checkpoint {resume!r} is not a Trainer checkpoint (no trainer_state.json in it)"
        )
    return str(path)


def label_names_of(dataset: Any, label_column: str) -> list[str]:
    """Class names of a classification dataset: a ClassLabel's names, else the sorted distinct label values.

    Raises :class:`BadInputError` when the labels are not integers ``0..K-1`` (after the ClassLabel mapping) or
    there are fewer than 2 classes.
    """
    from datasets import ClassLabel

    feature = dataset.features.get(label_column)
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        values = sorted(set(dataset[label_column]))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise BadInputError(
                f"column {label_column!r} must hold integer class ids 0..K-1 or be a datasets ClassLabel; found "
                f"values such as {values[:5]!r}. Convert it with dataset.class_encode_column({label_column!r})."
            )
        if values and (values[0] < 0 or values[-1] >= 2 * len(values) + 10):
            raise BadInputError(
                f"column {label_column!r} holds class ids {values[:3]} ... {values[-3:]} ({len(values)} distinct): "
                "expected ids 0..K-1. Convert it with dataset.class_encode_column(...)."
            )
        names = [str(i) for i in range(values[-1] + 1)] if values else []
    if len(names) < 2:
        raise BadInputError(f"column {label_column!r} has {len(names)} class(es); classification needs at least 2")
    return names


# --------------------------------------------------------------------------------------------------------------------
# accuracy as an evaluate metric
# --------------------------------------------------------------------------------------------------------------------


def _accuracy_metric_class():
    import datasets
    import evaluate
    import numpy as np

    class OfflineAccuracy(evaluate.Metric):
        """Accuracy (fraction of predictions equal to the references), as an ``evaluate.Metric``.

        Same inputs and output as the Hub's ``accuracy`` module without ``normalize``/``sample_weight``:
        ``compute(predictions=[...], references=[...]) -> {"accuracy": float}``; ``add_batch`` works too.
        """

        def _info(self):
            return evaluate.MetricInfo(
                description="Accuracy: the proportion of predictions equal to their reference label.",
                citation="",
                inputs_description="predictions: predicted class ids (int); references: true class ids (int).",
                features=datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
            )

        def _compute(self, predictions, references):
            predictions, references = np.asarray(predictions), np.asarray(references)
            if predictions.size == 0:
                raise ValueError("accuracy of an empty set of predictions is undefined")
            return {"accuracy": float((predictions == references).mean())}

    return OfflineAccuracy


def load_accuracy_metric(source: str = "local"):
    """Accuracy as an ``evaluate`` metric module.

    ``evaluate.load("accuracy")`` resolves the name on the Hugging Face Hub and downloads the metric script: with no
    network (or ``HF_HUB_OFFLINE=1`` and a cold cache) it raises ``FileNotFoundError: Couldn't find a module script
    ... accuracy.py``. Checked with evaluate 0.4.6. So:

    * ``source="local"`` (the examples' default): an ``evaluate.Metric`` subclass defined here, computed by the
      evaluate library's own machinery (``compute`` / ``add_batch``), in memory; no network.
    * ``source="hub"``: ``evaluate.load("accuracy")``; a failure says what to do.
    """
    if source == "local":
        return _accuracy_metric_class()(keep_in_memory=True)
    if source == "hub":
        import evaluate

        try:
            return evaluate.load("accuracy")
        except (FileNotFoundError, ConnectionError, OSError) as error:
            raise BadInputError(
                f"--metric-source hub: evaluate.load('accuracy') failed ({type(error).__name__}: {error}). It "
                "downloads the metric from the Hugging Face Hub; without network use --metric-source local."
            ) from None
    raise ValueError(f"Invalid value for `source`: {source!r}. Allowed: 'local' or 'hub'.")


def accuracy_from_logits(metric):
    """A ``compute_metrics`` function for ``Trainer``: argmax of the logits against the labels, via ``metric``."""
    import numpy as np

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        if isinstance(logits, tuple):
            logits = logits[0]
        predictions = np.asarray(logits).argmax(axis=-1)
        references = np.asarray(eval_prediction.label_ids)
        return metric.compute(predictions=predictions.tolist(), references=references.tolist())

    return compute_metrics


# --------------------------------------------------------------------------------------------------------------------
# run-dir files
# --------------------------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` sets it: not thread-safe)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    return 0o022


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the whole new file to; when the block ends without error
    it is renamed over ``path`` (atomic within one file system), otherwise removed. A reader, or a crash at any
    point, sees the old file or the new one, never a part of it. The new file gets the usual permissions
    (0o666 minus the umask), not the 0o600 of a temporary file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically (:func:`atomic_output`)."""
    target = Path(path)
    with atomic_output(target) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(_jsonable(data), handle, indent=2, sort_keys=True)
        handle.write("\n")
    return target


def save_results(output_dir: str | os.PathLike, split: str, metrics: Mapping[str, Any]) -> None:
    """``{split}_results.json`` and the merged ``all_results.json``, as ``Trainer.save_metrics`` lays them out."""
    directory = Path(output_dir)
    write_json(directory / f"{split}_results.json", dict(metrics))
    all_path = directory / "all_results.json"
    merged = json.loads(all_path.read_text(encoding="utf-8")) if all_path.is_file() else {}
    merged.update(_jsonable(dict(metrics)))
    write_json(all_path, merged)


def write_run_config(output_dir: str | os.PathLike, **fields: Any) -> Path:
    """``run_config.json``: what the run was (model, dataset, task, flags, hyperparameters), for the model card.

    Known keys of the card renderer (:mod:`hf_normsoftmax.hub.card`): ``model_name``, ``base_model``, ``dataset``
    (name or mapping), ``task``, ``license``, ``language``, ``description``, ``hyperparameters``.
    """
    return write_json(Path(output_dir) / "run_config.json", {k: v for k, v in fields.items() if v is not None})


def finish_run_dir(output_dir: str | os.PathLike, *, model_name: str | None = None) -> dict[str, Any]:
    """Draw the stability plots (if the history exists and no plot was drawn yet) and write the model card.

    Returns ``{"plots": [paths], "card": path}``. The card is rendered by :func:`hf_normsoftmax.hub.card.write_card`
    into ``output_dir/README.md``.
    """
    directory = Path(output_dir)
    plots = sorted(directory.glob("stability*.png"))
    if not plots and (directory / "stability_history.jsonl").is_file():
        from .plots import plot_run_dir, read_stability_history

        try:
            read_stability_history(directory)
        except ValueError:
            pass  # losses only (diagnostics off: --stability-every 0): nothing to plot
        else:
            plot_run_dir(directory)
            plots = sorted(directory.glob("stability*.png"))
    from ..hub.card import write_card

    card = write_card(directory, model_name=model_name)
    return {"plots": plots, "card": card}


# --------------------------------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------------------------------


def cpu_distributed_launch() -> bool:
    """True when launched with several processes (``WORLD_SIZE`` > 1) on a machine without CUDA GPUs.

    ``accelerate launch --multi_gpu --num_processes 2`` (and ``torchrun``) then start the processes, but accelerate
    1.15 only sets up the CPU (gloo) process group when asked for the CPU (``Accelerator(cpu=True)``,
    ``TrainingArguments(use_cpu=True)`` or ``ACCELERATE_USE_CPU=1``): otherwise every process trains alone, on all
    the data, as ``DistributedType.NO``. The examples pass ``cpu=True`` / ``use_cpu=True`` when this returns True.
    """
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world_size > 1 and not torch.cuda.is_available()


def dump_rank_state(directory: str | os.PathLike, state_dict: Mapping[str, Any], process_index: int,
                    info: Mapping[str, Any] | None = None) -> Path:
    """Write one process's tensors to ``directory/rank<R>.safetensors`` (and ``info`` to ``rank<R>.json``), each
    file atomically (:func:`atomic_output`)."""
    import torch
    from safetensors.torch import save_file

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor):
            if hasattr(tensor, "full_tensor"):  # DTensor
                tensor = tensor.full_tensor()
            tensors[name] = tensor.detach().to("cpu").contiguous().clone()  # clone: tied weights share storage
    path = target / f"rank{process_index}.safetensors"
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp))
    write_json(target / f"rank{process_index}.json", dict(info or {}))
    return path


def fully_shard_model(model, block_modules: Iterable[Any]) -> list[Any]:
    """Shard ``model`` with FSDP2 (``torch.distributed.fsdp.fully_shard``): each block, then the root.

    FSDP2 refuses 0-dim parameters ("fully_shard doesn't support scalar parameters"), and sigmaReparam's
    ``reparam_scale`` is one. Such parameters are passed as ``ignored_params``: they stay whole and replicated on
    every rank, and FSDP does not reduce their gradients, so call :func:`all_reduce_unsharded_grads` on the
    returned list after each backward. Needs an initialised process group (``Accelerator(cpu=True)`` on CPU).
    Returns the list of ignored (scalar) parameters.
    """
    from torch.distributed.fsdp import fully_shard

    ignored = [parameter for parameter in model.parameters() if parameter.ndim == 0]
    ignored_set = set(ignored)
    for block in block_modules:
        fully_shard(block, ignored_params=ignored_set)
    fully_shard(model, ignored_params=ignored_set)
    return ignored


def all_reduce_unsharded_grads(parameters: Iterable[Any]) -> None:
    """Average the gradients of parameters FSDP does not manage across the processes (what DDP would do)."""
    import torch.distributed as dist

    world_size = dist.get_world_size()
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad.div_(world_size)


def clip_grad_norm_mixed(parameters: Iterable[Any], max_norm: float):
    """``clip_grad_norm_`` for a mix of sharded (DTensor) and ordinary gradients; returns the total norm.

    ``torch.nn.utils.clip_grad_norm_`` cannot stack DTensor norms with plain-tensor norms, which is the situation
    after :func:`fully_shard_model` (scalar parameters stay plain). The norms of the two groups are computed
    separately (the DTensor one over the whole, unsharded gradient) and combined.
    """
    import torch
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    sharded, plain = [], []
    for parameter in parameters:
        if parameter.grad is None:
            continue
        (sharded if hasattr(parameter.grad, "full_tensor") else plain).append(parameter)
    squares = []
    for group in (sharded, plain):
        if group:
            norm = get_total_norm([p.grad for p in group])
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            squares.append(norm.float() ** 2)
    if not squares:
        return torch.tensor(0.0)
    total = torch.stack(squares).sum().sqrt()
    for group in (sharded, plain):
        if group:
            clip_grads_with_norm_(group, max_norm, total)
    return total


def full_state_dict(model, sharded: bool) -> dict[str, Any]:
    """The whole state dict on every process: all-gathered under FSDP2, the model's own otherwise."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return model.state_dict()


# --------------------------------------------------------------------------------------------------------------------
# Trainer plumbing shared by the Trainer examples
# --------------------------------------------------------------------------------------------------------------------


def eval_split_name(dataset: Any) -> str:
    """Which split :func:`~hf_normsoftmax.training.data.train_eval_split` evaluates on, for the record."""
    for name in ("validation", "test"):
        if name in dataset:
            return name
    return "held-out part of train"


def stability_callbacks(args: argparse.Namespace) -> list[Any]:
    """``[StabilityCallback(every_n_steps=--stability-every)]``, or ``[]`` with ``--stability-every 0``."""
    if args.stability_every <= 0:
        return []
    from .callbacks import StabilityCallback

    return [StabilityCallback(every_n_steps=args.stability_every)]


def training_arguments_from_args(args: argparse.Namespace, learning_rate: float, **overrides: Any):
    """``TrainingArguments`` from the options of :func:`add_run_arguments` (``overrides`` win).

    ``use_cpu`` is set for multi-process launches on machines without CUDA (see :func:`cpu_distributed_launch`).
    """
    import torch
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or 2 * args.batch_size,
        learning_rate=learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps in transformers 5
        # 0 switches clipping off (Trainer tests `max_grad_norm > 0`; None fails that comparison)
        max_grad_norm=args.max_grad_norm,
        num_train_epochs=args.epochs if args.epochs is not None else 1.0,
        max_steps=args.max_steps if args.max_steps is not None else -1,
        eval_strategy="steps" if args.eval_steps else "epoch",
        eval_steps=args.eval_steps,
        save_strategy="steps" if args.save_steps else "epoch",
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        seed=args.seed,
        report_to=[] if args.report_to == "none" else args.report_to.split(","),
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=cpu_distributed_launch(),
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def finish_trainer_run(trainer, args: argparse.Namespace, train_result, run_config: Mapping[str, Any]) -> dict:
    """After ``trainer.train()``: save model + processor, final evaluation, metrics, state, run files, card.

    Writes (main process) ``model.safetensors``/``config.json`` and the processing class, ``train_results.json``,
    ``eval_results.json``, ``all_results.json``, ``trainer_state.json``, ``training_args.json``,
    ``run_config.json`` (``run_config`` plus the number of processes), the stability plots and ``README.md``;
    with ``--dump-rank-state`` every process writes its tensors. Returns the train and eval metrics merged.
    """
    trainer.save_model()
    train_metrics = dict(train_result.metrics, train_samples=len(trainer.train_dataset))
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    eval_metrics = dict(trainer.evaluate(), eval_samples=len(trainer.eval_dataset))
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()

    state = trainer.accelerator.state
    if args.dump_rank_state:
        dump_rank_state(args.dump_rank_state, trainer.model.state_dict(), state.process_index,
                        {"process_index": state.process_index, "num_processes": state.num_processes,
                         "distributed_type": str(state.distributed_type), "global_step": trainer.state.global_step})
    if trainer.is_world_process_zero():
        write_json(Path(args.output_dir) / "training_args.json", trainer.args.to_dict())
        config = dict(run_config)
        hyperparameters = dict(config.pop("hyperparameters", {}))
        hyperparameters.setdefault("num_processes", state.num_processes)
        write_run_config(args.output_dir, hyperparameters=hyperparameters, **config)
        finish_run_dir(args.output_dir)
    return {**train_metrics, **eval_metrics}


def stability_stats_fsdp2(model, batch: Mapping[str, Any]) -> dict[str, float]:
    """``collect_stability_stats`` for a model sharded with :func:`fully_shard_model`; call it on every process.

    Outside a forward, FSDP2 keeps the weights as sharded DTensors, which the weight statistics (sigma of the
    sigmaReparam layers, ``||W_Q W_K^T||``) cannot use. So the attention and output statistics come from the probe
    forward (FSDP2 gathers the weights itself there), and the weight statistics are read while every FSDP module
    is explicitly unsharded, then resharded.
    """
    from torch.distributed.fsdp import FSDPModule

    from .diagnostics import StabilityMonitor, collect_stability_stats

    stats = collect_stability_stats(model, batch, qk_spectral_norm=False, sigma_reparam=False)
    sharded_modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in sharded_modules:
        module.unshard()
    try:
        stats.update(StabilityMonitor(model, attention=False).weight_stats())
    finally:
        for module in sharded_modules:
            module.reshard()
    return stats


def _checkpoint_weight_names(checkpoint: Path) -> set[str] | None:
    """The weight names of a checkpoint folder's safetensors file (or sharded index); None if it has neither."""
    from safetensors import safe_open

    weights, index = checkpoint / "model.safetensors", checkpoint / "model.safetensors.index.json"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as handle:
            return set(handle.keys())
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    return None


def resumable_trainer_class():
    """A ``transformers.Trainer`` subclass whose resume loads checkpoint weights under their model key names and
    refuses checkpoints that lack trained sigmaReparam / learnable-gamma state.

    Why: in transformers 5.23, ``save_pretrained`` writes some models' weights under their *legacy* key names
    (``revert_weight_conversion``: ViT's ``vit.layers.0.attention.q_proj`` is saved as
    ``vit.encoder.layer.0.attention.attention.query``), and ``from_pretrained`` converts them back, but
    ``Trainer._load_from_checkpoint`` (used by ``train(resume_from_checkpoint=...)``) loads the file with a plain
    ``load_state_dict(strict=False)``: every renamed weight is silently left as it was (only a warning is logged).
    This happens for the stock ViT as well. Here, when the checkpoint file holds keys the model does not know, the
    weights are loaded through ``from_pretrained`` (which applies the key conversion) and copied in strictly, and a
    weight ``from_pretrained`` reports missing stops the resume; otherwise the Trainer's own loading runs.

    A checkpoint saved by a variant with ``sigma_reparam`` / ``normsoftmax_learnable_gamma`` (its config.json says
    so) must hold the ``reparam_scale`` / ``reparam_u`` / ``reparam_v`` / ``normsoftmax_scale`` entries of the
    layers whose weights it holds (:func:`hf_normsoftmax.integration.missing_trained_state`): the resume raises a
    ValueError naming any that is missing, before anything is loaded, instead of training on with other values.
    """
    from transformers import PreTrainedModel, Trainer

    from ..integration import _checkpoint_config_dict, _missing_trained_state_error, missing_trained_state

    class ResumableTrainer(Trainer):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            target = model if model is not None else self.model
            saved_keys = _checkpoint_weight_names(Path(resume_from_checkpoint))
            if isinstance(target, PreTrainedModel) and saved_keys is not None and not self.is_fsdp_enabled:
                if saved_keys - set(target.state_dict()):
                    loaded, info = type(target).from_pretrained(
                        resume_from_checkpoint, config=target.config, output_loading_info=True
                    )
                    if info["missing_keys"]:
                        raise _missing_trained_state_error(
                            resume_from_checkpoint, sorted(info["missing_keys"]), "Cannot resume training",
                            "weights of the model", "Allowed: a checkpoint holding every weight of the model.",
                        )
                    target.load_state_dict(loaded.state_dict(), strict=True)
                    return
                checkpoint_config = _checkpoint_config_dict(resume_from_checkpoint, {})
                lacking = missing_trained_state(target, checkpoint_config, saved_keys.__contains__)
                if lacking:
                    raise _missing_trained_state_error(
                        resume_from_checkpoint, lacking, "Cannot resume training",
                        allowed="Allowed: a checkpoint holding the trained state it was saved with.",
                    )
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    ResumableTrainer.__name__ = ResumableTrainer.__qualname__ = "ResumableTrainer"
    return ResumableTrainer
