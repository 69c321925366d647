"""Model cards for hf_normsoftmax checkpoints, rendered offline with huggingface_hub's ModelCard/ModelCardData.

A card is built from what a ``transformers.Trainer`` output directory ("run dir") holds, or from a model config
alone, and rendered with the Jinja template of the model family (``vit``, ``bert``, ``gpt2``, or a decoder family:
``llama``, ``qwen2``, ``qwen3``, ``mistral``, ``gemma2``, ``phi3``; see :func:`template_path`). Nothing here
touches the network.

Usage::

    from hf_normsoftmax.hub.card import render_card, write_card, card_inputs_from_config

    card = render_card("runs/bert-sst")                 # huggingface_hub.ModelCard
    print(card.data.to_dict()["model-index"])
    write_card("runs/bert-sst")                         # writes runs/bert-sst/README.md (atomically)
    card = render_card(card_inputs_from_config(model.config, model_name="tiny-bert"))

The card's content comes from :class:`~hf_normsoftmax.hub.card_inputs.CardInputs` (read from a run dir by
:func:`~hf_normsoftmax.hub.card_inputs.collect_run_dir`; see there what is read). Keys whose name looks like a
credential (token, secret, password, key, auth) are dropped from every table, and so are values that look like an
access token (a note names their keys); a card whose text would still hold a token is refused
(:mod:`hf_normsoftmax.hub.secrets`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..configuration_normsoftmax import DEFAULT_LOSS_NORMSOFTMAX_GAMMA
from ..normsoftmax import _is_number
from ..training.run_files import write_text_atomically
from .card_inputs import (
    DECODER_FAMILIES,
    FAMILIES,
    CardInputs,
    card_inputs_from_config,
    collect_run_dir,
    find_model_dir,
    model_family,
)
from .secrets import find_secret, known_tokens

__all__ = [
    "DECODER_FAMILIES",
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

# The one card template: a link to model_cards/model_card.md in a checkout (setuptools copies the file it points
# to into a built wheel).
_TEMPLATE = Path(__file__).resolve().parent / "model_card.md"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$|^[A-Za-z0-9][A-Za-z0-9._-]*$")

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
    "qk_norm": {
        "title": "QK-norm",
        "paper": "Dehghani et al., \"Scaling Vision Transformers to 22 Billion Parameters\", ICML 2023 "
                 "(arXiv:2302.05442); Wortsman et al., \"Small-scale proxies for large-scale Transformer training "
                 "instabilities\", ICLR 2024 (arXiv:2309.14322).",
        "summary": (
            "Each head's queries and keys are normalised over the head dimension (RMSNorm or LayerNorm, with a "
            "learned per-feature scale shared by the heads of a layer) before the dot product. This bounds the "
            "attention logits by the learned scales and keeps them from growing with the weights, the attention "
            "logit growth that Wortsman et al. reproduce at small scale; Qwen3, Gemma 3 and OLMo 2 ship it. It is "
            "not function-preserving: weights converted from a checkpoint without it need fine-tuning."
        ),
        "bibtex": (
            "@inproceedings{wortsman2024smallscale,\n"
            "  title     = {Small-scale proxies for large-scale Transformer training instabilities},\n"
            "  author    = {Wortsman, Mitchell and others},\n"
            "  booktitle = {International Conference on Learning Representations (ICLR)},\n"
            "  year      = {2024},\n"
            "  eprint    = {2309.14322},\n"
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
    "qk_norm": "QK-norm of every head's queries and keys (`rms`, `layer`; none = off)",
}
_FLAG_PREFIXES = ("attention_softmax", "normsoftmax_", "loss_softmax", "loss_normsoftmax", "logit_inverse",
                  "sigma_reparam", "qk_norm")

# The decoder families: (name shown in the card, prefix of transformers' class names).
_DECODER_NAMES = {"llama": ("Llama", "Llama"), "qwen2": ("Qwen2", "Qwen2"), "qwen3": ("Qwen3", "Qwen3"),
                  "mistral": ("Mistral", "Mistral"), "gemma2": ("Gemma 2", "Gemma2"), "phi3": ("Phi-3", "Phi3")}
_DECODER_HEADS = ("ForCausalLM", "ForSequenceClassification", "Model")

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



def template_path(family: str) -> Path:
    """Path of the packaged Jinja template that renders the cards of ``family`` (``vit``, ``bert``, ``gpt2`` or a
    decoder family of :data:`DECODER_FAMILIES`).

    One template serves every family: the text is shared and the family-specific parts are blocks selected
    by the ``family`` variable (one block for all the decoder families, which ``decoder`` selects). It is edited
    in the repository's ``model_cards/model_card.md``; the package holds a link to that file, which a built wheel
    replaces by the file itself.
    """
    if family not in FAMILIES + DECODER_FAMILIES:
        raise ValueError(f"family {family!r} is not one of {FAMILIES + DECODER_FAMILIES}")
    if not _TEMPLATE.is_file():
        raise FileNotFoundError(f"model card template missing at {_TEMPLATE} (broken installation?)")
    return _TEMPLATE


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
    """Which methods a set of flags enables (the three of the package, and QK-norm), as ``(method_key, where)``
    pairs."""
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
    if flags.get("qk_norm") in ("rms", "layer"):
        out.append(("qk_norm", "attention"))
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


def _decoder_stock_class(family: str, architecture: str | None) -> str:
    """The stock transformers class a decoder variant extends (``NormSoftmaxLlamaForCausalLM`` ->
    ``LlamaForCausalLM``); the family's causal LM when the architecture is not one of its variant classes."""
    prefix = _DECODER_NAMES[family][1]
    for head in _DECODER_HEADS:
        if architecture == f"NormSoftmax{prefix}{head}":
            return f"{prefix}{head}"
    return f"{prefix}ForCausalLM"


def _decoder_limitations(family: str, config: Mapping[str, Any], flags: Mapping[str, Any]) -> list:
    """What a decoder card says about the family's own settings that the flags table does not show."""
    if family != "gemma2":
        return []
    out = []
    if "attn_logit_softcapping" in config:
        cap = config["attn_logit_softcapping"]
        if cap is None:
            text = "Gemma 2's attention logit soft-capping is off (`attn_logit_softcapping` = none)"
            if str(flags.get("attention_softmax", "softmax")).lower() == "normsoftmax":
                text += ": NormSoftmax attention bounds every row of attention logits itself, and refuses the cap"
            out.append(text + ".")
        else:
            out.append(f"Attention logits are soft-capped as in stock Gemma 2 (`attn_logit_softcapping` = "
                       f"{_fmt(cap)}: cap * tanh(s / cap) before the softmax).")
    if config.get("final_logit_softcapping") is not None:
        out.append(f"The head's logits are soft-capped (`final_logit_softcapping` = "
                   f"{_fmt(config['final_logit_softcapping'])}): beta and the loss see cap * tanh(z / cap).")
    return out


def _clean_base_model(value):
    """Return ``(hub_id_or_None, text)`` for a base model: only a plausible Hub id goes into the metadata."""
    if value in (None, "", "none", "scratch", "random"):
        return None, "none: trained from a random initialisation"
    text = str(value)
    if os.path.isabs(text) or text.startswith((".", "~")) or not _HUB_ID_RE.match(text):
        return None, "a local checkpoint (its path is not published)"
    return text, f"[{text}](https://huggingface.co/{text})"


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
            if family in DECODER_FAMILIES and auto_class == "AutoModelForCausalLM":
                k = config.get("vocab_size")
            bound = _confidence_bound(gamma, k) if k else None
            text = ("NormSoftmax in the loss bounds the confidence the training objective can ask for "
                    f"(loss_normsoftmax_gamma = {_fmt(gamma)})")
            if bound is not None:
                shown = f"1 - {1.0 - bound:.1e}" if bound > 0.999 else f"{bound:.3f}"
                text += f": over {k} classes the largest reachable probability under NormSoftmax is {shown}"
            limitations.append(text + ". The model returns the normalised logits, so a softmax over its "
                               "outputs is the distribution the loss trained, with that bounded confidence.")
    decoder = family in DECODER_FAMILIES
    if decoder:
        limitations.extend(_decoder_limitations(family, config, flags))
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
    size_keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "n_layer", "n_embd", "n_head",
                 "intermediate_size", "vocab_size", "image_size", "patch_size", "num_labels")
    if decoder:  # a causal LM's config carries transformers' default num_labels, which no head uses
        size_keys = size_keys[:-1] + ("num_key_value_heads", "max_position_embeddings") + (
            () if auto_class == "AutoModelForCausalLM" else ("num_labels",))
    kwargs = {
        "family": family,
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
        "size": {k: config.get(k) for k in size_keys if config.get(k) is not None},
        "decoder": decoder,
        "decoder_name": _DECODER_NAMES[family][0] if decoder else None,
        "decoder_stock_class": _decoder_stock_class(family, inputs.architecture) if decoder else None,
        "causal_lm": auto_class == "AutoModelForCausalLM",
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
