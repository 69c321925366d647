"""Model cards for hf_normsoftmax checkpoints, rendered offline with huggingface_hub's ModelCard/ModelCardData.

A card is built from what a ``transformers.Trainer`` output directory ("run dir") holds, or from a model config
alone, and rendered with the Jinja template of the model family (``vit``, ``bert``, ``gpt2``; see
:func:`template_path`). Nothing here touches the network.

Usage::

    from hf_normsoftmax.hub.card import render_card, write_card, card_inputs_from_config

    card = render_card("runs/bert-sst")                 # huggingface_hub.ModelCard
    print(card.data.to_dict()["model-index"])
    write_card("runs/bert-sst")                         # writes runs/bert-sst/README.md (atomically)
    card = render_card(card_inputs_from_config(model.config, model_name="tiny-bert"))

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
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..configuration_normsoftmax import DEFAULT_LOSS_NORMSOFTMAX_GAMMA
from ..training.run_files import write_text_atomically
from .secrets import find_secret, known_tokens, looks_secret

__all__ = [
    "FAMILIES",
    "CardInputs",
    "METHODS",
    "card_inputs_from_config",
    "collect_run_dir",
    "find_model_dir",
    "model_family",
    "render_card",
    "template_path",
    "write_card",
]

FAMILIES = ("vit", "bert", "gpt2")
_TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
_SECRET_KEY_RE = re.compile(r"token|secret|passw|api[_-]?key|(^|_)auth($|_)|credential", re.I)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$|^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_BOOKKEEPING = {"epoch", "step", "total_flos", "train_runtime", "train_samples_per_second",
                "train_steps_per_second", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
                "test_runtime", "test_samples_per_second", "test_steps_per_second", "grad_norm",
                "learning_rate", "train_samples", "eval_samples", "test_samples", "num_input_tokens_seen"}
_TRAINING_ARG_KEYS = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                      "gradient_accumulation_steps", "num_train_epochs", "max_steps", "warmup_steps",
                      "warmup_ratio", "lr_scheduler_type", "optim", "weight_decay", "adam_beta1", "adam_beta2",
                      "adam_epsilon", "max_grad_norm", "label_smoothing_factor", "seed", "fp16", "bf16")

# ------------------------------------------------------------------------------------------------------------
# The methods: what each does and where it comes from. BibTeX entries written for this package from the
# publication records; fields that could not be checked are left out or flagged in a BibTeX comment.
# ------------------------------------------------------------------------------------------------------------
METHODS = {
    "normsoftmax": {
        "title": "NormSoftmax",
        "paper": "Jiang, Gu and Pan, \"NormSoftmax: Normalizing the Input of Softmax to Accelerate and Stabilize "
                 "Training\", IEEE COINS 2023 (an earlier version was an ICLR 2023 submission).",
        "summary": (
            "Before the softmax, each logit vector is shifted to zero mean and divided by a temperature "
            "T = std(x) / gamma computed over its valid (unmasked) entries only, so the softmax always sees "
            "logits with spread gamma, whatever the scale the network produces: "
            "NormSoftmax(x) = softmax((x - mean(x)) / T). An optional cap T <= max_temperature keeps it from "
            "becoming softer than a chosen temperature. In attention this is applied to every query row of every "
            "head; in the loss, to every example's class logits. The authors report faster, more stable early "
            "training and less sensitivity to hyperparameters and to the number of heads."
        ),
        "bibtex": (
            "% Given names of the second and third authors are not checked against the publisher's record.\n"
            "@inproceedings{jiang2023normsoftmax,\n"
            "  title     = {NormSoftmax: Normalizing the Input of Softmax to Accelerate and Stabilize Training},\n"
            "  author    = {Jiang, Zixuan and Gu, Jiaqi and Pan, David Z.},\n"
            "  booktitle = {2023 IEEE International Conference on Omni-layer Intelligent Systems (COINS)},\n"
            "  pages     = {1--6},\n"
            "  year      = {2023},\n"
            "  doi       = {10.1109/COINS57856.2023.10189242}\n"
            "}"
        ),
    },
    "inverse_temperature": {
        "title": "Inverse temperature beta for the cross-entropy",
        "paper": "Agarwala, Pennington, Dauphin and Schoenholz, \"Temperature check: theory and practice for "
                 "training models with softmax-cross-entropy losses\", TMLR 2023 (arXiv:2010.07344).",
        "summary": (
            "The loss is computed on softmax(beta * z) instead of softmax(z). The paper shows that early learning "
            "depends on beta and on the initial logit norm ||beta z||, that generalisation depends strongly on "
            "beta, and that tuning beta over [1e-2, 1e1] helped every architecture studied; a small beta can give "
            "better peak accuracy at the cost of stability. beta changes the effective learning rate of the "
            "logits, so a changed beta usually needs a retuned learning rate."
        ),
        "bibtex": (
            "@article{agarwala2023temperature,\n"
            "  title   = {Temperature check: theory and practice for training models with softmax-cross-entropy "
            "losses},\n"
            "  author  = {Agarwala, Atish and Pennington, Jeffrey and Dauphin, Yann and Schoenholz, Sam},\n"
            "  journal = {Transactions on Machine Learning Research},\n"
            "  year    = {2023},\n"
            "  url     = {https://openreview.net/forum?id=LBA2Jj5Gqn},\n"
            "  eprint  = {2010.07344},\n"
            "  archivePrefix = {arXiv}\n"
            "}"
        ),
    },
    "sigma_reparam": {
        "title": "sigmaReparam",
        "paper": "Zhai et al., \"Stabilizing Transformer Training by Preventing Attention Entropy Collapse\", "
                 "ICML 2023 (arXiv:2303.06296).",
        "summary": (
            "Each selected linear layer (and the patch-embedding convolution, flattened to a matrix) uses "
            "W_hat = (g / sigma(W)) * W, with sigma(W) the spectral norm estimated by one power-iteration step per "
            "training step and g a learned scalar initialised to sigma(W0), so the initial function is unchanged. "
            "Bounding the spectral norms bounds the attention logits and prevents attention entropy collapse "
            "(pathologically peaked attention), which the authors link to oscillating loss and divergence."
        ),
        "bibtex": (
            "@inproceedings{zhai2023stabilizing,\n"
            "  title     = {Stabilizing Transformer Training by Preventing Attention Entropy Collapse},\n"
            "  author    = {Zhai, Shuangfei and Likhomanenko, Tatiana and Littwin, Etai and Busbridge, Dan and\n"
            "               Ramapuram, Jason and Zhang, Yizhe and Gu, Jiatao and Susskind, Joshua M.},\n"
            "  booktitle = {Proceedings of the 40th International Conference on Machine Learning (ICML)},\n"
            "  series    = {Proceedings of Machine Learning Research},\n"
            "  volume    = {202},\n"
            "  year      = {2023},\n"
            "  eprint    = {2303.06296},\n"
            "  archivePrefix = {arXiv}\n"
            "}"
        ),
    },
}

_FLAG_MEANINGS = {
    "attention_softmax": "softmax used inside self-attention (`softmax` = stock, `normsoftmax`)",
    "normsoftmax_gamma": "spread (std) of the normalised attention logits; initial value if learnable",
    "normsoftmax_learnable_gamma": "one learned gamma per head and layer",
    "normsoftmax_max_temperature": "cap on the attention temperature T = spread / gamma (none = uncapped)",
    "normsoftmax_statistic": "spread statistic of the attention logits (`std` or `var`)",
    "normsoftmax_eps": "added to the variance of the logits",
    "loss_softmax": "softmax of the head (loss): `softmax` = stock, `normsoftmax` = normalised head logits",
    "loss_normsoftmax_gamma": "spread of the normalised head logits (bounds the reachable confidence)",
    "logit_inverse_temperature": "beta: the head returns beta * logits, and the loss uses them",
    "sigma_reparam": "sigmaReparam on the selected linear / Conv1D / Conv2d layers",
    "sigma_reparam_include": "layers converted by sigmaReparam (fnmatch patterns; none = all)",
    "sigma_reparam_exclude": "layers never converted by sigmaReparam (fnmatch patterns)",
}
_FLAG_PREFIXES = ("attention_softmax", "normsoftmax_", "loss_softmax", "loss_normsoftmax", "logit_inverse",
                  "sigma_reparam")

_TASKS = (  # (architecture-name suffix, pipeline tag, auto class)
    ("ForImageClassification", "image-classification", "AutoModelForImageClassification"),
    ("ForSequenceClassification", "text-classification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "token-classification", "AutoModelForTokenClassification"),
    ("ForMaskedLM", "fill-mask", "AutoModelForMaskedLM"),
    ("ForMaskedImageModeling", None, "AutoModelForMaskedImageModeling"),
    ("LMHeadModel", "text-generation", "AutoModelForCausalLM"),
    ("ForCausalLM", "text-generation", "AutoModelForCausalLM"),
    ("ForQuestionAnswering", "question-answering", "AutoModelForQuestionAnswering"),
    ("Model", "feature-extraction", "AutoModel"),
)


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------
def _read_json(path: Path, what: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} at {path} is not valid JSON: {exc}") from None


def _is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY_RE.search(str(key)))


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _cell(value) -> str:
    """Format a value for a markdown table cell."""
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def model_family(model_type: str) -> str:
    """Map a config ``model_type`` to a card family: ``vit``, ``bert`` or ``gpt2``.

    Accepts the stock types (``vit``, ``bert``, ``gpt2``) and the variants (``normsoftmax_vit``, ...).
    """
    if not isinstance(model_type, str):
        raise TypeError(f"model_type must be a string, got {model_type!r}")
    base = model_type[len("normsoftmax_"):] if model_type.startswith("normsoftmax_") else model_type
    if base not in FAMILIES:
        allowed = ", ".join(FAMILIES + tuple(f"normsoftmax_{f}" for f in FAMILIES))
        raise ValueError(f"model_type {model_type!r} has no model card template; allowed model types: {allowed}")
    return base


def template_path(family: str) -> Path:
    """Path of the packaged Jinja template of a family (``vit``, ``bert`` or ``gpt2``).

    The templates are edited in the repository's ``model_cards/`` folder and shipped as identical copies in
    ``hf_normsoftmax/hub/templates/`` (a test checks that both copies are byte-identical).
    """
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    path = _TEMPLATES_DIR / f"{family}.md"
    if not path.is_file():
        raise FileNotFoundError(f"model card template for {family!r} missing at {path} (broken installation?)")
    return path


def _task_for(architecture: str | None):
    if architecture:
        for suffix, tag, auto in _TASKS:
            if architecture.endswith(suffix):
                return tag, auto
    return None, "AutoModel"


def variant_flags(config: Mapping[str, Any]) -> dict:
    """The hf_normsoftmax flags present in a config dict (known names first, then any other matching prefix)."""
    flags = {}
    for key in _FLAG_MEANINGS:
        if key in config:
            flags[key] = config[key]
    for key in sorted(config):
        if key not in flags and key.startswith(_FLAG_PREFIXES):
            flags[key] = config[key]
    return flags


def active_methods(flags: Mapping[str, Any]) -> list:
    """Which of the three methods a set of flags enables, as ``(method_key, where)`` pairs."""
    out = []
    if str(flags.get("attention_softmax", "softmax")).lower() == "normsoftmax":
        out.append(("normsoftmax", "attention"))
    loss = str(flags.get("loss_softmax", "softmax")).lower()
    if loss == "normsoftmax":
        out.append(("normsoftmax", "loss"))
    beta = flags.get("logit_inverse_temperature")
    if loss in ("inverse_temperature", "temperature", "beta") or (_is_number(beta) and float(beta) != 1.0):
        out.append(("inverse_temperature", "loss"))
    sigma = flags.get("sigma_reparam")
    if sigma not in (None, False, "", "none", "off", [], ()):
        out.append(("sigma_reparam", "linear layers"))
    return out


def _confidence_bound(gamma: float, num_classes: int):
    """Largest probability NormSoftmax(gamma) can give one of ``num_classes`` classes, or None if unknown.

    NormSoftmax is shift and scale invariant, so the extreme input is a one-hot vector; computed with the
    package's own ``norm_softmax`` when it is importable.
    """
    try:
        import torch

        from ..normsoftmax import norm_softmax
    except Exception:  # noqa: BLE001 - the bound is an optional extra line in the card
        return None
    if not (_is_number(gamma) and gamma > 0 and isinstance(num_classes, int) and num_classes >= 2):
        return None
    x = torch.zeros(num_classes, dtype=torch.float64)
    x[0] = 1.0
    return float(norm_softmax(x, dim=-1, gamma=float(gamma))[0])


# ------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------
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


def _clean_base_model(value):
    """Return ``(hub_id_or_None, text)`` for a base model: only a plausible Hub id goes into the metadata."""
    if value in (None, "", "none", "scratch", "random"):
        return None, "none: trained from a random initialisation"
    text = str(value)
    if os.path.isabs(text) or text.startswith((".", "~")) or not _HUB_ID_RE.match(text):
        return None, "a local checkpoint (its path is not published)"
    return text, f"[{text}](https://huggingface.co/{text})"


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


def _summarise_log_history(history) -> dict:
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
                    and not key.startswith(("eval_", "test_")) and not _is_secret_key(key)):
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


def _last_eval_from_history(history) -> dict:
    for entry in reversed(history):
        if isinstance(entry, Mapping) and any(k.startswith("eval_") for k in entry):
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return {}


def _split_metrics(flat: Mapping, eval_split: str) -> dict:
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
        training_summary.update(_summarise_log_history(history))
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
        flat_metrics.update(_last_eval_from_history(history))
    for key, value in flat_metrics.items():
        if key.startswith("train_") and key not in _BOOKKEEPING and _is_number(value):
            training_summary[f"final {key}"] = value
    eval_metrics = _split_metrics(flat_metrics, eval_split)

    plots = sorted(p.name for p in run_dir.glob("stability*.png") if p.is_file())
    sources.extend(plots)
    code_in_repo = _has_remote_code(model_dir, config)

    if _is_number(hyper.get("max_steps")) and hyper["max_steps"] > 0:
        hyper.pop("num_train_epochs", None)  # Trainer ignores num_train_epochs when max_steps > 0
    tokens = known_tokens()
    withheld = sorted({k for k, v in (*hyper.items(), *training_summary.items())
                       if not _is_secret_key(k) and looks_secret(v, tokens)})
    hyper = {k: v for k, v in hyper.items() if not _is_secret_key(k) and not looks_secret(v, tokens)}
    training_summary = {k: v for k, v in training_summary.items()
                        if not _is_secret_key(k) and not looks_secret(v, tokens)}
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


def _image_mode(num_channels):
    """PIL mode the images must be converted to for a ViT with ``num_channels`` input channels (None: no PIL mode)."""
    return {1: "L", 3: "RGB", 4: "RGBA"}.get(num_channels if _is_number(num_channels) else 3)


# ------------------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------------------
def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("hf_normsoftmax")
    except Exception:  # noqa: BLE001 - not installed as a distribution (source checkout)
        return "source checkout"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-").lower() or "dataset"


def build_template_context(inputs: CardInputs) -> tuple:
    """Return ``(ModelCardData, template_kwargs)`` for :class:`CardInputs` (used by :func:`render_card`)."""
    from huggingface_hub import EvalResult, ModelCardData

    if not isinstance(inputs, CardInputs):
        raise TypeError(f"expected CardInputs, got {type(inputs).__name__}")
    if not inputs.model_name or not isinstance(inputs.model_name, str):
        raise ValueError(f"model_name must be a non-empty string, got {inputs.model_name!r}")
    family = inputs.family
    config = inputs.config
    flags = variant_flags(config)
    active = active_methods(flags)
    pipeline_tag, auto_class = _task_for(inputs.architecture)
    pipeline_tag = inputs.task or pipeline_tag
    base_id, base_text = _clean_base_model(inputs.base_model)

    flag_rows = [{"name": k, "value": _cell(v), "meaning": _FLAG_MEANINGS.get(k, "layer selection / option")}
                 for k, v in flags.items()]
    methods = []
    for key, method in METHODS.items():
        where = [w for k, w in active if k == key]
        methods.append({"key": key, "title": method["title"], "paper": method["paper"], "summary": method["summary"],
                        "bibtex": method["bibtex"], "active": bool(where), "where": ", ".join(where)})

    dataset_text = inputs.dataset_name or inputs.dataset_hub_id or None
    eval_rows, eval_results = [], []
    for split, metrics in sorted(inputs.eval_metrics.items()):
        for metric, value in sorted(metrics.items()):
            eval_rows.append({"split": split, "metric": metric, "value": _cell(value)})
            if dataset_text and pipeline_tag and _is_number(value) and math.isfinite(value):
                eval_results.append(EvalResult(
                    task_type=pipeline_tag, dataset_type=inputs.dataset_hub_id or _slug(dataset_text),
                    dataset_name=dataset_text, dataset_config=inputs.dataset_config, dataset_split=split,
                    metric_type=metric, metric_name=f"{split} {metric}", metric_value=float(value)))
    notes = list(inputs.notes)
    if eval_rows and not eval_results:
        notes.append("The evaluation results are not in the model-index metadata because the run does not name "
                     "its dataset (`dataset` in run_config.json) or task.")

    limitations = []
    for key, where in active:
        if key == "normsoftmax" and where == "loss":
            gamma = flags.get("loss_normsoftmax_gamma", DEFAULT_LOSS_NORMSOFTMAX_GAMMA)
            k = config.get("num_labels") or len(config.get("id2label") or {}) or None
            if family == "gpt2" or "LMHead" in (inputs.architecture or "") or "MaskedLM" in (inputs.architecture or ""):
                k = config.get("vocab_size")
            bound = _confidence_bound(gamma, k) if k else None
            text = ("NormSoftmax in the loss bounds the confidence the training objective can ask for "
                    f"(loss_normsoftmax_gamma = {_fmt(gamma)})")
            if bound is not None:
                shown = f"1 - {1.0 - bound:.1e}" if bound > 0.999 else f"{bound:.3f}"
                text += f": over {k} classes the largest reachable probability under NormSoftmax is {shown}"
            limitations.append(text + ". The model returns the normalised logits, so a softmax over its "
                               "outputs is the distribution the loss trained, with that bounded confidence.")
    if not inputs.eval_metrics:
        limitations.append("No evaluation results were found for this checkpoint.")
    nonfinite = inputs.training_summary.get("non-finite logged losses")
    if nonfinite:
        limitations.append(f"{nonfinite} logged training loss value(s) were not finite (NaN/inf): training "
                           "diverged at least once; inspect the stability plot.")

    card_data = ModelCardData(
        model_name=inputs.model_name,
        base_model=base_id,
        datasets=[inputs.dataset_hub_id] if inputs.dataset_hub_id else None,
        eval_results=eval_results or None,
        language=inputs.language,
        library_name="transformers",
        license=inputs.license,
        metrics=sorted({r.metric_type for r in eval_results}) or None,
        pipeline_tag=pipeline_tag,
        tags=["hf_normsoftmax", family] + [m["key"] for m in methods if m["active"]]
        + (["custom_code"] if inputs.is_variant else []),
    )
    if eval_results is None or not eval_results:
        card_data.model_name = None  # model_name is only meaningful inside model-index
    kwargs = {
        "model_name": inputs.model_name,
        "repo_id": inputs.repo_id or f"YOUR_NAMESPACE/{_slug(inputs.model_name)}",
        "repo_id_known": inputs.repo_id is not None,
        "description": inputs.description,
        "model_type": config.get("model_type"),
        "architecture": inputs.architecture or "unknown",
        "auto_class": auto_class,
        "pipeline_task": pipeline_tag,
        "is_variant": inputs.is_variant,
        "code_in_repo": bool(inputs.is_variant and inputs.code_in_repo),
        "num_channels": config.get("num_channels", 3),
        "image_mode": _image_mode(config.get("num_channels", 3)),
        "base_model_text": base_text,
        "size": {k: config.get(k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                             "n_layer", "n_embd", "n_head", "intermediate_size", "vocab_size",
                                             "image_size", "patch_size", "num_labels") if config.get(k) is not None},
        "flag_rows": flag_rows,
        "methods": methods,
        "any_method_active": any(m["active"] for m in methods),
        "dataset_text": dataset_text,
        "dataset_hub_id": inputs.dataset_hub_id,
        "dataset_description": inputs.dataset_description,
        "dataset_sizes": [{"name": k, "value": _cell(v)} for k, v in inputs.dataset_sizes.items()],
        "hyperparameters": [{"name": k, "value": _cell(v)} for k, v in sorted(inputs.hyperparameters.items())],
        "training_summary": [{"name": k, "value": _cell(v)} for k, v in inputs.training_summary.items()],
        "eval_rows": eval_rows,
        "plots": [{"path": p, "caption": Path(p).stem.replace("_", " ")} for p in inputs.plots],
        "limitations": limitations,
        "notes": notes,
        "sources": inputs.sources,
        "package_version": _package_version(),
    }
    return card_data, kwargs


def render_card(source, *, repo_id: str | None = None, model_name: str | None = None, template: str | None = None,
                refuse_secrets: bool = True):
    """Render a model card offline.

    Args:
        source: a run dir (path) read with :func:`collect_run_dir`, or :class:`CardInputs`.
        repo_id: the Hub repo the card is for (used in the loading snippets and as default model name).
        model_name: name in the title and model-index (default: run_config ``model_name``, repo name, dir name).
        template: path of a Jinja template to use instead of the packaged one of the model family.
        refuse_secrets: raise ``ValueError`` when the text would hold an access token (table values that look like
            one are always left out). ``False`` is for callers that scan the text themselves before it leaves the
            machine (the Hub push scans every staged file and refuses naming it).

    Returns:
        huggingface_hub.ModelCard: ``str(card)`` is the README.md text, ``card.data`` its metadata.
    """
    from huggingface_hub import ModelCard

    if isinstance(source, CardInputs):
        inputs = source
        if repo_id is not None:
            inputs.repo_id = repo_id
        if model_name is not None:
            inputs.model_name = model_name
    elif isinstance(source, (str, os.PathLike)):
        inputs = collect_run_dir(source, repo_id=repo_id, model_name=model_name)
    else:
        raise TypeError(f"source must be a run dir path or CardInputs, got {type(source).__name__}")
    card_data, kwargs = build_template_context(inputs)
    path = Path(template) if template is not None else template_path(inputs.family)
    if not path.is_file():
        raise FileNotFoundError(f"template {str(path)!r} does not exist")
    card = ModelCard.from_template(card_data, template_path=str(path), **kwargs)
    _check_rendered(card, refuse_secrets)
    return card


def _check_rendered(card, refuse_secrets: bool = True) -> None:
    """Fail loudly if a rendered card lost its metadata (e.g. a template without the YAML block), or would
    carry an access token (see :mod:`hf_normsoftmax.hub.secrets`; table values are withheld before this)."""
    text = str(card)
    found = find_secret(text, known_tokens()) if refuse_secrets else None
    if found:
        raise ValueError(f"refusing to write the model card: its text would contain {found}. It comes from the run "
                         "dir's files (run_config.json: description, dataset, model_name, ...) or the card fields: "
                         "remove the token there.")
    if not text.startswith("---\n"):
        raise ValueError("the rendered model card does not start with a YAML metadata block ('---')")
    if card.data is None or card.data.to_dict().get("library_name") != "transformers":
        raise ValueError("the rendered model card metadata lacks library_name: transformers")


def write_card(run_dir, output=None, *, repo_id: str | None = None, model_name: str | None = None) -> Path:
    """Render the card of ``run_dir`` and write it to ``output`` (default ``run_dir/README.md``), atomically.

    Returns the path written.
    """
    card = render_card(run_dir, repo_id=repo_id, model_name=model_name)
    target = Path(output) if output is not None else Path(run_dir) / "README.md"
    if target.is_dir() or (output is not None and str(output).endswith(("/", os.sep))):
        target = target / "README.md"
    return write_text_atomically(target, str(card))
