"""What a model card shows, read from a ``transformers.Trainer`` output directory ("run dir") or a model config.

:class:`CardInputs` holds everything a card shows; :func:`collect_run_dir` reads it from a run dir,
:func:`card_inputs_from_config` builds it from a config alone. :mod:`hf_normsoftmax.hub.card` renders it.

What is read from a run dir (every piece except the model config is optional: a missing piece is reported in
the card instead of failing; pickles such as ``training_args.bin`` are never read):

- ``config.json``: the model config (type, architecture, variant flags). Taken from the run dir itself when it
  holds a saved model (``Trainer.save_model``), otherwise from the highest ``checkpoint-N/``. Required.
- ``trainer_state.json`` (run dir first, then the model's checkpoint dir): ``log_history`` (loss summary,
  non-finite losses, last eval metrics, last value of other logged series; the ``stability/...`` series of
  ``StabilityCallback`` are reduced to a few headline numbers such as the final attention entropy),
  ``global_step``, ``epoch``, ``best_metric``, ``train_batch_size``, ``max_steps``, ``num_train_epochs``.
- ``train_results.json``, ``all_results.json``, ``eval_results.json``, ``test_results.json``: final metrics;
  ``eval_*`` and ``test_*`` keys become the model-index (when the dataset is named), ``train_*`` keys the
  training summary.
- ``run_config.json``, written by the training code. Known keys: ``model_name``, ``base_model`` (put in the
  metadata only when it looks like a Hub id, never a local path), ``dataset`` (a name, or a mapping with
  ``name``, ``hub_id``, ``config``, ``split``, ``eval_split``, ``description``, ``num_train``, ``num_eval``,
  ``num_test``), ``dataset_hub_id``, ``eval_split``, ``task`` (a pipeline tag), ``license``, ``language``,
  ``description``, ``hyperparameters`` / ``training_args`` (mappings). Other scalar top-level keys are listed
  as hyperparameters.
- ``training_args.json``: ``TrainingArguments.to_json_string()`` output; a curated subset is shown.
- ``stability*.png``: stability plots (e.g. ``stability_entropy.png`` from ``hf-normsoftmax plot``), embedded
  with their path relative to the run dir, which is also their path in a pushed repo.

Keys whose name looks like a credential (token, secret, password, key, auth) are dropped from every table, and so
are values that look like an access token (a note names their keys); a card whose text would still hold a token
is refused (:mod:`hf_normsoftmax.hub.secrets`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..normsoftmax import _is_number
from .secrets import is_secret_key, known_tokens, looks_secret

__all__ = [
    "DECODER_FAMILIES",
    "FAMILIES",
    "CardInputs",
    "card_inputs_from_config",
    "collect_run_dir",
    "find_model_dir",
    "is_variant_config",
    "last_eval_from_history",
    "model_family",
    "modeling_module",
    "split_metrics",
    "summarise_log_history",
]

FAMILIES = ("vit", "bert", "gpt2")
# The decoder families of modeling_normsoftmax_decoders.py: cards for their variants (``normsoftmax_llama``, ...)
# only; a stock checkpoint of these families is its publisher's, with its own card.
DECODER_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_BOOKKEEPING = {"epoch", "step", "total_flos", "train_runtime", "train_samples_per_second",
                "train_steps_per_second", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
                "test_runtime", "test_samples_per_second", "test_steps_per_second", "grad_norm",
                "learning_rate", "train_samples", "eval_samples", "test_samples", "num_input_tokens_seen"}
_TRAINING_ARG_KEYS = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                      "gradient_accumulation_steps", "num_train_epochs", "max_steps", "warmup_steps",
                      "warmup_ratio", "lr_scheduler_type", "optim", "weight_decay", "adam_beta1", "adam_beta2",
                      "adam_epsilon", "max_grad_norm", "label_smoothing_factor", "seed", "fp16", "bf16")



def _read_json(path: Path, what: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} at {path} is not valid JSON: {exc}") from None



def model_family(model_type: str) -> str:
    """Map a config ``model_type`` to a card family: ``vit``, ``bert``, ``gpt2`` or a decoder family.

    Accepts the stock types ``vit``, ``bert``, ``gpt2`` and the variants ``normsoftmax_vit``, ...,
    ``normsoftmax_gpt2``, ``normsoftmax_llama``, ... (see :data:`DECODER_FAMILIES`).
    """
    if not isinstance(model_type, str):
        raise TypeError(f"model_type must be a string, got {model_type!r}")
    variant = model_type.startswith("normsoftmax_")
    base = model_type[len("normsoftmax_"):] if variant else model_type
    if base not in FAMILIES and not (variant and base in DECODER_FAMILIES):
        allowed = ", ".join(FAMILIES + tuple(f"normsoftmax_{f}" for f in FAMILIES + DECODER_FAMILIES))
        raise ValueError(f"model_type {model_type!r} has no model card template; allowed model types: {allowed}")
    return base


def modeling_module(family: str) -> str:
    """Name of the package module that defines the variant classes of a card family."""
    if family in DECODER_FAMILIES:
        return "modeling_normsoftmax_decoders"
    if family in FAMILIES:
        return f"modeling_normsoftmax_{family}"
    raise ValueError(f"family {family!r} is not one of {FAMILIES + DECODER_FAMILIES}")



def is_variant_config(config) -> bool:
    """Whether ``config`` (a config object or a ``config.json`` dict) is one of a ``normsoftmax_*`` variant."""
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    return isinstance(model_type, str) and model_type.startswith("normsoftmax_")


@dataclass
class CardInputs:
    """Everything a card shows. Build it with :func:`collect_run_dir` or :func:`card_inputs_from_config`.

    ``config`` is the model config as a dict (``config.json``). ``plots`` are paths relative to the repo root.
    ``eval_metrics`` maps metric names without prefix to values, per split (``{"validation": {...}}``).
    """

    config: dict
    model_name: str
    repo_id: str | None = None
    base_model: str | None = None
    dataset_name: str | None = None
    dataset_hub_id: str | None = None
    dataset_description: str | None = None
    dataset_config: str | None = None
    dataset_sizes: dict = field(default_factory=dict)
    task: str | None = None
    license: str | None = None
    language: str | list | None = None
    description: str | None = None
    hyperparameters: dict = field(default_factory=dict)
    training_summary: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    plots: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    code_in_repo: bool | None = None  # the repo holds the remote code (auto_map + .py files); None: unknown = no

    @property
    def family(self) -> str:
        return model_family(self.config.get("model_type", ""))

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else None

    @property
    def is_variant(self) -> bool:
        return str(self.config.get("model_type", "")).startswith("normsoftmax_")




def card_inputs_from_config(config, *, model_name: str, repo_id: str | None = None, **fields) -> CardInputs:
    """Card inputs for a model without a run dir: ``config`` is a ``PretrainedConfig`` or a config dict.

    Extra keyword arguments set :class:`CardInputs` fields (``base_model``, ``dataset_name``, ``eval_metrics``,
    ``hyperparameters``, ``license``, ...).
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a PretrainedConfig or a mapping, got {type(config).__name__}")
    model_family(config.get("model_type", ""))  # validate early
    unknown = set(fields) - set(CardInputs.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown card field(s) {sorted(unknown)}; allowed: {sorted(CardInputs.__dataclass_fields__)}")
    return CardInputs(config=dict(config), model_name=model_name, repo_id=repo_id, **fields)


def find_model_dir(run_dir) -> Path:
    """The directory holding the model to publish: the run dir if it has ``config.json``, else the
    ``checkpoint-N`` subdirectory with the highest N that has one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir {str(run_dir)!r} does not exist or is not a directory")
    if (run_dir / "config.json").is_file():
        return run_dir
    checkpoints = []
    for child in run_dir.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and (child / "config.json").is_file():
            checkpoints.append((int(match.group(1)), child))
    if not checkpoints:
        raise FileNotFoundError(
            f"no model found in run dir {str(run_dir)!r}: expected config.json in it (Trainer.save_model) or in a "
            f"checkpoint-N/ subdirectory")
    return max(checkpoints)[1]


def _dataset_fields(run_config: Mapping) -> dict:
    out = {"dataset_sizes": {}}
    ds = run_config.get("dataset")
    if isinstance(ds, Mapping):
        out["dataset_name"] = ds.get("name")
        out["dataset_hub_id"] = ds.get("hub_id")
        out["dataset_config"] = ds.get("config")
        out["dataset_description"] = ds.get("description")
        for key in ("num_train", "num_eval", "num_test", "split", "eval_split"):
            if ds.get(key) is not None:
                out["dataset_sizes"][key] = ds[key]
    elif ds is not None:
        out["dataset_name"] = str(ds)
    if run_config.get("dataset_hub_id"):
        out["dataset_hub_id"] = run_config["dataset_hub_id"]
    if run_config.get("dataset_description") and not out.get("dataset_description"):
        out["dataset_description"] = run_config["dataset_description"]
    return out


_RUN_CONFIG_KNOWN = {"model_name", "base_model", "dataset", "dataset_hub_id", "dataset_description", "task",
                     "license", "language", "description", "hyperparameters", "training_args", "eval_split"}


def summarise_log_history(history) -> dict:
    summary = {}
    losses = [(e.get("step"), e["loss"]) for e in history if isinstance(e, Mapping) and _is_number(e.get("loss"))]
    if losses:
        finite = [v for _, v in losses if math.isfinite(v)]
        summary["logged training losses"] = len(losses)
        summary["first logged loss"] = losses[0][1]
        summary["last logged loss"] = losses[-1][1]
        if finite:
            summary["lowest logged loss"] = min(finite)
        bad = [(s, v) for s, v in losses if not math.isfinite(v)]
        summary["non-finite logged losses"] = len(bad)
        if bad:
            summary["first non-finite loss at step"] = bad[0][0]
    for entry in history:
        if isinstance(entry, Mapping) and "train_loss" in entry:
            summary["final train_loss"] = entry["train_loss"]
    # last value of any other logged numeric series; the StabilityCallback's ``stability/...`` series (per layer,
    # per head, per sigmaReparam layer: hundreds of keys) are summarised into a few headline numbers instead
    last, stability = {}, {}
    for entry in history:
        if not isinstance(entry, Mapping):
            continue
        for key, value in entry.items():
            if (_is_number(value) and key not in _BOOKKEEPING and key not in ("loss", "train_loss")
                    and not key.startswith(("eval_", "test_")) and not is_secret_key(key)):
                stripped = _stability_key(key)
                if stripped is not None:
                    stability[stripped] = value
                else:
                    last[key] = value
    for key in sorted(last):
        summary[f"last {key}"] = last[key]
    summary.update(_summarise_stability(stability))
    return summary


def _stability_key(key: str):
    """``stability/...`` or ``train/stability/...`` (as reporting integrations prefix it) -> the part after
    ``stability/``; None for other keys."""
    for prefix in ("stability/", "train/stability/"):
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def _finite(values) -> list:
    return [float(v) for v in values if _is_number(v) and math.isfinite(v)]


def _summarise_stability(last: Mapping) -> dict:
    """Headline numbers from the last value of each stability key (keys without the ``stability/`` prefix).

    Per-layer and per-head series are aggregated over layers / heads; per-layer sigmaReparam values are left out
    (the run dir's ``stability_history.jsonl`` and plots hold them all).
    """
    groups: dict = {}
    for key, value in last.items():
        quantity, _, rest = key.partition("/")
        item = rest.rpartition("/")[2] if rest else ""
        groups.setdefault(quantity, []).append((rest, item, value))

    def pick(quantity, items):
        return _finite(v for rest, item, v in groups.get(quantity, ()) if item in items
                       or (item.startswith("head_") and "head" in items))

    out = {}
    means = pick("entropy", ("mean",)) or pick("entropy", ("head",))
    if means:
        out["final attention entropy (mean over layers and heads)"] = sum(means) / len(means)
    mins = pick("entropy", ("min", "head"))
    if mins:
        out["final attention entropy (min over heads)"] = min(mins)
    stds = pick("logit_std", ("max", "head"))
    if stds:
        out["final attention logit std (max over heads)"] = max(stds)
    norms = pick("qk_spectral_norm", ("max", "head"))
    if norms:
        out["final W_Q W_K^T spectral norm (max over heads)"] = max(norms)
    for quantity, label in (("logit_norm", "final output logit norm"), ("probe_loss", "final probe loss"),
                            ("alarms", "stability alarms")):
        values = [v for rest, _, v in groups.get(quantity, ()) if not rest and _is_number(v)]
        if values:
            out[label] = int(values[-1]) if quantity == "alarms" else values[-1]
    return out


def last_eval_from_history(history) -> dict:
    for entry in reversed(history):
        if isinstance(entry, Mapping) and any(k.startswith("eval_") for k in entry):
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return {}


def split_metrics(flat: Mapping, eval_split: str) -> dict:
    """``{"eval_accuracy": 0.9, "test_loss": 1.2}`` -> ``{eval_split: {"accuracy": 0.9}, "test": {"loss": 1.2}}``."""
    out: dict = {}
    for key, value in flat.items():
        if key in _BOOKKEEPING or not _is_number(value):
            continue
        for prefix, split in (("eval_", eval_split), ("test_", "test")):
            if key.startswith(prefix):
                out.setdefault(split, {})[key[len(prefix):]] = value
    return out


def collect_run_dir(run_dir, *, repo_id: str | None = None, model_name: str | None = None) -> CardInputs:
    """Read a Trainer output dir into :class:`CardInputs` (see the module docstring for what is read)."""
    run_dir = Path(run_dir)
    model_dir = find_model_dir(run_dir)
    sources = [str((model_dir / "config.json").relative_to(run_dir))]
    config = _read_json(model_dir / "config.json", "model config")
    if not isinstance(config, Mapping):
        raise ValueError(f"model config at {model_dir / 'config.json'} must be a JSON object")
    model_family(config.get("model_type", ""))
    notes = []
    if model_dir != run_dir:
        notes.append(f"The weights are those of `{model_dir.name}/` (the run dir holds no final saved model).")

    run_config = {}
    if (run_dir / "run_config.json").is_file():
        run_config = _read_json(run_dir / "run_config.json", "run config")
        if not isinstance(run_config, Mapping):
            raise ValueError(f"run config at {run_dir / 'run_config.json'} must be a JSON object")
        sources.append("run_config.json")

    hyper = {}
    if (run_dir / "training_args.json").is_file():
        args = _read_json(run_dir / "training_args.json", "training arguments")
        if isinstance(args, Mapping):
            hyper.update({k: args[k] for k in _TRAINING_ARG_KEYS if k in args})
            sources.append("training_args.json")
    for sub in ("training_args", "hyperparameters"):
        if isinstance(run_config.get(sub), Mapping):
            hyper.update(run_config[sub])
    for key, value in run_config.items():
        if key not in _RUN_CONFIG_KNOWN and (isinstance(value, (str, int, float, bool)) or value is None):
            hyper[key] = value

    state = None
    for candidate in (run_dir / "trainer_state.json", model_dir / "trainer_state.json"):
        if candidate.is_file():
            state = _read_json(candidate, "trainer state")
            sources.append(str(candidate.relative_to(run_dir)))
            break
    training_summary = {}
    history = []
    if isinstance(state, Mapping):
        history = state.get("log_history") or []
        for key in ("global_step", "epoch", "best_metric"):
            if state.get(key) is not None:
                training_summary[key] = state[key]
        for key in ("train_batch_size", "max_steps"):
            if state.get(key) is not None:
                hyper.setdefault(key, state[key])
        if not _is_number(hyper.get("max_steps")) or hyper.get("max_steps") <= 0:
            if state.get("num_train_epochs") is not None:
                hyper.setdefault("num_train_epochs", state["num_train_epochs"])
        training_summary.update(summarise_log_history(history))
    else:
        notes.append("No `trainer_state.json` was found: the training log is not summarised.")

    dataset_entry = run_config.get("dataset")
    eval_split = str(run_config.get("eval_split")
                     or (dataset_entry.get("eval_split") if isinstance(dataset_entry, Mapping) else None)
                     or "validation")
    flat_metrics = {}
    for name in ("train_results.json", "all_results.json", "eval_results.json", "test_results.json"):
        if (run_dir / name).is_file():
            data = _read_json(run_dir / name, name)
            if isinstance(data, Mapping):
                flat_metrics.update(data)
                sources.append(name)
    if not any(k.startswith(("eval_", "test_")) for k in flat_metrics):
        flat_metrics.update(last_eval_from_history(history))
    for key, value in flat_metrics.items():
        if key.startswith("train_") and key not in _BOOKKEEPING and _is_number(value):
            training_summary[f"final {key}"] = value
    eval_metrics = split_metrics(flat_metrics, eval_split)

    plots = sorted(p.name for p in run_dir.glob("stability*.png") if p.is_file())
    sources.extend(plots)
    code_in_repo = _has_remote_code(model_dir, config)

    if _is_number(hyper.get("max_steps")) and hyper["max_steps"] > 0:
        hyper.pop("num_train_epochs", None)  # Trainer ignores num_train_epochs when max_steps > 0
    tokens = known_tokens()
    withheld = sorted({k for k, v in (*hyper.items(), *training_summary.items())
                       if not is_secret_key(k) and looks_secret(v, tokens)})
    hyper = {k: v for k, v in hyper.items() if not is_secret_key(k) and not looks_secret(v, tokens)}
    training_summary = {k: v for k, v in training_summary.items()
                        if not is_secret_key(k) and not looks_secret(v, tokens)}
    if withheld:
        notes.append("Not shown because the value looks like an access token: "
                     + ", ".join(f"`{k}`" for k in withheld) + ".")
    ds = _dataset_fields(run_config)
    return CardInputs(
        config=dict(config),
        model_name=model_name or run_config.get("model_name") or (repo_id.split("/")[-1] if repo_id else None)
        or run_dir.resolve().name,
        repo_id=repo_id,
        base_model=run_config.get("base_model"),
        dataset_name=ds.get("dataset_name"),
        dataset_hub_id=ds.get("dataset_hub_id"),
        dataset_description=ds.get("dataset_description"),
        dataset_config=ds.get("dataset_config"),
        dataset_sizes=ds["dataset_sizes"],
        task=run_config.get("task"),
        license=run_config.get("license"),
        language=run_config.get("language"),
        description=run_config.get("description"),
        hyperparameters=hyper,
        training_summary=training_summary,
        eval_metrics=eval_metrics,
        plots=plots,
        sources=sources,
        notes=notes,
        code_in_repo=code_in_repo,
    )


def _has_remote_code(model_dir: Path, config: Mapping) -> bool:
    """True when ``config.json`` has an ``auto_map`` and every Python file it names sits in ``model_dir``."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, Mapping) or not auto_map:
        return False
    for ref in auto_map.values():
        for item in (ref if isinstance(ref, (list, tuple)) else [ref]):
            if item and not (model_dir / f"{str(item).split('--')[-1].split('.')[0]}.py").is_file():
                return False
    return True


