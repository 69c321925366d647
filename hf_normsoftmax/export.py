"""Export a NormSoftmax variant to the stock transformers model it extends (peft's ``merge_and_unload`` convention).

``merge_and_unload(model)`` returns a new instance of the stock class (``BertForSequenceClassification``,
``GPT2LMHeadModel``, ``ViTForImageClassification``, ...) with a stock config (``model_type`` ``"bert"`` /
``"gpt2"`` / ``"vit"``, no variant flags, no ``auto_map``) that computes the variant's eval-mode outputs:

* every sigmaReparam layer is folded: its ``weight`` becomes ``W_hat = reparam_scale / sigma * W`` (the weight the
  layer's next forward uses), and ``reparam_scale`` / ``reparam_u`` / ``reparam_v`` are dropped;
* the inverse temperature beta (``logit_inverse_temperature``) is folded into the head's final linear layer
  (weight and bias times beta), except for regression heads, whose outputs beta never touches;
* a head whose weight is tied to the input embeddings (GPT-2 ``lm_head``, BERT's MLM decoder) but no longer equals
  them (sigmaReparam or beta folded into it) is untied: the exported config says ``tie_word_embeddings=False``
  and the checkpoint holds both matrices. Serving stacks that read ``tie_word_embeddings`` load it as such.

What cannot be folded is refused with a ValueError naming the flag: NormSoftmax (``attention_softmax=
"normsoftmax"``, ``loss_softmax="normsoftmax"``) divides every row of logits by its own standard deviation, a
data-dependent normalisation that no weight of a stock softmax model computes; learnable gammas scale those
normalised logits. There is no inexact mode.

The variant is left unchanged. The result loads and saves with stock transformers only::

    stock = hf_normsoftmax.merge_and_unload(model)   # or model.merge_and_unload()
    stock.save_pretrained("exported")                # AutoModelFor*.from_pretrained("exported"), no hf_normsoftmax

From the command line: ``hf-normsoftmax export RUN_DIR OUT_DIR``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from .configuration_normsoftmax import NORMSOFTMAX_FLAGS
from .hf_attention import LEARNABLE_GAMMA_PARAMETER
from .sigma_reparam import SigmaReparamMixin

__all__ = ["export_run_dir", "merge_and_unload", "stock_class_of"]

_VARIANT_STATE_SUFFIXES = (".reparam_scale", ".reparam_u", ".reparam_v", f".{LEARNABLE_GAMMA_PARAMETER}")

# The linear layer whose outputs are the logits beta scales, by stock class name.
_HEADS = {
    "BertForSequenceClassification": "classifier",
    "BertForMultipleChoice": "classifier",
    "BertForTokenClassification": "classifier",
    "BertForQuestionAnswering": "qa_outputs",
    "BertForMaskedLM": "cls.predictions.decoder",
    "BertLMHeadModel": "cls.predictions.decoder",
    "GPT2LMHeadModel": "lm_head",
    "GPT2ForSequenceClassification": "score",
    "GPT2ForTokenClassification": "classifier",
    "GPT2ForQuestionAnswering": "qa_outputs",
    "ViTForImageClassification": "classifier",
}
# the decoder families of modeling_normsoftmax_decoders.py
_DECODER_FAMILIES = ("Llama", "Qwen2", "Qwen3", "Mistral", "Gemma2", "Phi3")
_HEADS.update({f"{family}ForCausalLM": "lm_head" for family in _DECODER_FAMILIES})
_HEADS.update({f"{family}ForSequenceClassification": "score" for family in _DECODER_FAMILIES})
# Classes whose head may be a regression head (num_labels == 1 / problem_type "regression"): beta is not applied.
_MAY_REGRESS = ("BertForSequenceClassification", "GPT2ForSequenceClassification", "ViTForImageClassification",
                *(f"{family}ForSequenceClassification" for family in _DECODER_FAMILIES))


def stock_class_of(model_or_class: Any) -> type[PreTrainedModel]:
    """The stock transformers model class a variant (instance or class) extends, e.g. ``GPT2LMHeadModel``."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    for klass in cls.__mro__:
        if issubclass(klass, PreTrainedModel) and klass.__module__.startswith("transformers."):
            return klass
    raise ValueError(f"Invalid value for `model`: {cls.__name__} extends no stock transformers model class.")


def _check_foldable(config: Any) -> None:
    if getattr(config, "attention_softmax", "softmax") == "normsoftmax":
        raise ValueError(
            "Cannot export to a stock model: `attention_softmax`='normsoftmax' divides every attention row's logits "
            "by their own standard deviation over the valid keys (a data-dependent normalisation), which no weight "
            "of stock softmax attention computes. Only models trained with `attention_softmax`='softmax' export."
        )
    if getattr(config, "loss_softmax", "softmax") == "normsoftmax":
        raise ValueError(
            "Cannot export to a stock model: `loss_softmax`='normsoftmax' returns each row of head logits divided "
            "by its own standard deviation (a data-dependent normalisation), which no weight of a stock head "
            "computes. Only models trained with `loss_softmax`='softmax' (optionally with "
            "`logit_inverse_temperature`) export."
        )
    if getattr(config, "normsoftmax_learnable_gamma", False):
        raise ValueError(
            "Cannot export to a stock model: `normsoftmax_learnable_gamma`=True learns per-head gammas that scale "
            "NormSoftmax-normalised attention logits (a data-dependent normalisation) with no stock counterpart."
        )
    qk_norm = getattr(config, "qk_norm", None)
    if qk_norm is not None:
        raise ValueError(
            f"Cannot export to a stock model: `qk_norm`={qk_norm!r} normalises every head's queries and keys by their "
            "own norm (a data-dependent normalisation), which no weight of stock attention computes."
        )
    cap = getattr(config, "final_logit_softcapping", None)
    beta = getattr(config, "logit_inverse_temperature", 1.0)
    if cap is not None and beta != 1.0:
        raise ValueError(
            f"Cannot export to a stock model: `logit_inverse_temperature`={beta!r} scales the logits after "
            f"`final_logit_softcapping`={cap!r} (beta * cap * tanh(z / cap)), which no weight of the stock head "
            "computes. Only such models with `logit_inverse_temperature`=1.0, or without the final cap, export."
        )


def _stock_config(model: PreTrainedModel, stock_class: type[PreTrainedModel], untie: bool):
    config_dict = model.config.to_dict()
    for key in (*NORMSOFTMAX_FLAGS, "auto_map", "model_type", "transformers_version"):
        config_dict.pop(key, None)
    config_dict["architectures"] = [stock_class.__name__]
    if untie:
        config_dict["tie_word_embeddings"] = False
    return stock_class.config_class.from_dict(config_dict)


def _build(stock_class, config, reference: PreTrainedModel) -> PreTrainedModel:
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight comes from the variant
        stock = stock_class(config)
    stock.tie_weights()  # as loading ties them (skipped with the initialisation above)
    parameter = next(reference.parameters())
    return stock.to(device=parameter.device, dtype=parameter.dtype)


def _folded_state(model: PreTrainedModel, head: str | None, beta: float) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    replaced: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, SigmaReparamMixin):
                module._check_materialised("merge_and_unload")
                replaced[f"{name}.weight" if name else "weight"] = module.effective_weight().detach().clone()
        if head is not None and beta != 1.0:
            module = model.get_submodule(head)
            for kind in ("weight", "bias"):
                tensor = getattr(module, kind, None)
                if tensor is None:
                    continue
                # every key holding this tensor (BERT's decoder bias is also `cls.predictions.bias`)
                for key, value in state.items():
                    if value.data_ptr() == tensor.data_ptr() and value.shape == tensor.shape:
                        if kind == "bias" or key == f"{head}.weight":
                            replaced[key] = replaced.get(key, value) * beta
    folded = {}
    for key, value in state.items():
        if key.endswith(_VARIANT_STATE_SUFFIXES):
            continue
        folded[key] = replaced[key] if key in replaced else value.detach().clone()
    return folded


def _tie_groups(stock: PreTrainedModel) -> list[list[str]]:
    """State-dict keys of ``stock`` that hold one tensor (tied weights)."""
    groups: dict[tuple, list[str]] = {}
    for key, value in stock.state_dict().items():
        groups.setdefault((value.data_ptr(), tuple(value.shape)), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def _untied_keys(stock: PreTrainedModel, state: dict[str, torch.Tensor]) -> list[str]:
    return [
        key
        for keys in _tie_groups(stock)
        for key in keys[1:]
        if key in state and keys[0] in state and not torch.equal(state[key], state[keys[0]])
    ]


def merge_and_unload(model: PreTrainedModel) -> PreTrainedModel:
    """A stock transformers model with the variant's sigmaReparam and beta folded into its weights.

    Returns a new instance of :func:`stock_class_of` ``(model)`` in the variant's device, dtype and train/eval mode,
    whose eval-mode outputs equal the variant's (up to float rounding of the folded products). Raises ValueError for
    flags that cannot be folded (NormSoftmax in attention or in the loss, learnable gammas), naming the flag.
    See the module docstring for tied heads.
    """
    if (
        not isinstance(model, PreTrainedModel)
        or not hasattr(type(model), "_normsoftmax_attention_classes")  # the variants' mixin (duck-typed: remote code)
        or not all(hasattr(model.config, f) for f in NORMSOFTMAX_FLAGS)
    ):
        raise ValueError(
            f"Invalid value for `model`: {type(model).__name__} is not a NormSoftmax variant model. Allowed: "
            "instances of the model classes exported by hf_normsoftmax."
        )
    config = model.config
    _check_foldable(config)
    stock_class = stock_class_of(model)
    beta = float(getattr(config, "logit_inverse_temperature", 1.0))
    head = _HEADS.get(stock_class.__name__)
    if head is not None and stock_class.__name__ in _MAY_REGRESS:
        problem_type = getattr(config, "problem_type", None)
        if problem_type == "regression" or (problem_type is None and getattr(config, "num_labels", 2) == 1):
            head = None  # regression outputs are values: beta never scales them
    state = _folded_state(model, head, beta)
    stock = _build(stock_class, _stock_config(model, stock_class, untie=False), model)
    if _untied_keys(stock, state):
        stock = _build(stock_class, _stock_config(model, stock_class, untie=True), model)
        still = _untied_keys(stock, state)
        if still:
            raise ValueError(
                f"Cannot export to {stock_class.__name__}: the weights {still} are tied in the stock model, but "
                "differ after folding sigmaReparam / beta, and tie_word_embeddings=False does not untie them."
            )
    expected = set(stock.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"Cannot export {type(model).__name__} to {stock_class.__name__}: state-dict keys differ "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})."
        )
    stock.load_state_dict(state, strict=True)
    stock.train(model.training)
    return stock


def export_run_dir(run_dir, output_dir, *, overwrite: bool = False) -> Path:
    """Load the variant saved in ``run_dir`` (a model folder, or a Trainer output dir: its saved model, else its
    highest ``checkpoint-N/``), :func:`merge_and_unload` it and save the stock model (safetensors, stock
    ``config.json``, no code) plus the tokenizer / processor files found next to the model into ``output_dir``.
    Returns ``output_dir``. Refuses a non-empty ``output_dir`` unless ``overwrite``.
    """
    import os
    import shutil
    import tempfile

    from .hub.card import find_model_dir

    model_dir = find_model_dir(run_dir)
    output_dir = Path(output_dir)
    if output_dir.resolve() == model_dir.resolve():
        raise ValueError(f"Invalid output dir {str(output_dir)!r}: it is the model folder being exported.")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise ValueError(f"Invalid output dir {str(output_dir)!r}: it exists and is not an empty directory.")
    model = _load_variant(model_dir)
    model.eval()
    stock = merge_and_unload(model)
    # Written into a temporary sibling folder first: an interrupted export never leaves a half-written OUT_DIR.
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.export-", dir=output_dir.parent))
    try:
        stock.save_pretrained(staging)
        # tokenizer / processor files travel as they are (they do not depend on the variant)
        for name in _PROCESSOR_FILES:
            source = model_dir / name
            if source.is_file():
                shutil.copyfile(source, staging / name)
        if output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        if not output_dir.exists():
            os.replace(staging, output_dir)
        else:  # --overwrite into a non-empty folder: file by file, each replaced atomically
            for path in sorted(staging.rglob("*")):
                if path.is_file():
                    target = output_dir / path.relative_to(staging)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


_PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "added_tokens.json", "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
)


def _load_variant(model_dir: Path) -> PreTrainedModel:
    import hf_normsoftmax

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if not architectures:
        raise ValueError(f"{model_dir / 'config.json'} names no architecture: cannot tell which class to load.")
    model_class = getattr(hf_normsoftmax, architectures[0], None)
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise ValueError(
            f"Architecture {architectures[0]!r} of {model_dir / 'config.json'} is not an hf_normsoftmax variant "
            "class; only variant checkpoints export (a stock checkpoint is stock already)."
        )
    return model_class.from_pretrained(model_dir)
