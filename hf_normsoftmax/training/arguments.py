"""Command-line options of the example scripts in ``examples/``, checked before any data is loaded.

* :class:`BadInputError` and :func:`exit_on_bad_input`: bad input found while setting up (unknown dataset, missing
  columns, bad flag values, an output dir in the way) ends the program with exit status 2 and one clear message,
  before training starts.
* argparse types: :func:`positive_int`, :func:`non_negative_int`, :func:`positive_float`,
  :func:`non_negative_float`, :func:`fraction` (typed, range-checked values).
* :func:`add_variant_arguments` / :func:`variant_flags_from_args`: the variant flags as command-line options
  (``--attention-softmax``, ``--normsoftmax-gamma``, ``--loss-softmax``, ``--logit-inverse-temperature``,
  ``--sigma-reparam``, ...) turned into config kwargs and checked, with messages that name the command-line option
  (the config's own checks name the config field). A flag that would have no effect (``--normsoftmax-gamma``
  without NormSoftmax attention) is refused as well.
* :func:`add_run_arguments`: the options every example shares (``--dataset``, ``--output-dir``, ``--max-steps`` /
  ``--epochs``, ``--learning-rate``, ...), and the checks of their combinations (:func:`check_training_length`,
  :func:`check_output_dir`, :func:`resolve_resume_checkpoint`, :func:`resolve_learning_rate`; all of them and the
  variant flags in one call: :func:`check_run_options`).
* :func:`run_example`: an example's ``main``: parse, set up under :func:`exit_on_bad_input`, train.

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
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "BAD_INPUT_ERRORS",
    "BadInputError",
    "VARIANT_FLAG_OPTIONS",
    "add_run_arguments",
    "add_variant_arguments",
    "check_output_dir",
    "check_run_options",
    "check_training_length",
    "default_report_to",
    "exit_on_bad_input",
    "fraction",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "resolve_learning_rate",
    "resolve_resume_checkpoint",
    "run_example",
    "variant_flags_from_args",
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


def run_example(build_parser: Callable[[], argparse.ArgumentParser], prepare: Callable[[argparse.Namespace], Any],
                train: Callable[[argparse.Namespace, Any], Any], argv: list[str] | None = None) -> Any:
    """``train(args, prepare(args))`` for ``args = build_parser().parse_args(argv)``: bad input found by ``prepare``
    (every check, the data, the model) exits with status 2 before training starts (:func:`exit_on_bad_input`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with exit_on_bad_input(parser):
        setup = prepare(args)
    return train(args, setup)


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
    "qk_norm": "--qk-norm",
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
        "qk_norm": None,
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
    group.add_argument("--qk-norm", type=_qk_norm_choice, default=None, metavar="{none,rms,layer}",
                       help="QK-norm: RMSNorm or LayerNorm of every head's queries and keys (learned scale), "
                            "not function-preserving on pretrained weights " + default("qk_norm"))


def _qk_norm_choice(text: str) -> str | None:
    if text == "none":
        return None
    if text in ("rms", "layer"):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from 'none', 'rms', 'layer')")


def _cli_spelling(message: str) -> str:
    """Replace config field names (``normsoftmax_gamma`` or `` `normsoftmax_gamma` ``) by their option names."""
    for flag, option in VARIANT_FLAG_OPTIONS.items():
        message = re.sub(rf"`{flag}`|\b{flag}\b", option, message)
    return message


def _variant_config_classes() -> dict[str, type]:
    from ..configuration_normsoftmax import NormSoftmaxBertConfig, NormSoftmaxGPT2Config, NormSoftmaxViTConfig

    return {cls.model_type: cls for cls in (NormSoftmaxViTConfig, NormSoftmaxBertConfig, NormSoftmaxGPT2Config)}


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
    VARIANT_CONFIG_CLASSES = _variant_config_classes()
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


def check_run_options(args: argparse.Namespace, model_type: str, flag_defaults: Mapping[str, Any] | None = None
                      ) -> tuple[dict[str, Any], str | None, float]:
    """The checks an example starts with: :func:`check_training_length`, the variant flags
    (:func:`variant_flags_from_args` with ``model_type``'s config), the checkpoint to resume from (Trainer
    examples: ``--resume-from-checkpoint``), :func:`check_output_dir`, :func:`resolve_learning_rate` (AdamW).
    Returns ``(flags, resume checkpoint or None, learning rate)``."""
    check_training_length(args)
    flags = variant_flags_from_args(args, model_type, flag_defaults)
    resume = resolve_resume_checkpoint(getattr(args, "resume_from_checkpoint", None), args.output_dir)
    check_output_dir(args.output_dir, args.overwrite_output_dir, resume)
    return flags, resume, resolve_learning_rate(args, flags, optimizer="adamw")
