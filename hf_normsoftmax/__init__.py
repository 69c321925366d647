"""hf_normsoftmax: NormSoftmax, inverse-temperature cross-entropy and sigmaReparam for Hugging Face Transformers.

``import hf_normsoftmax`` registers

* the model types ``normsoftmax_vit``, ``normsoftmax_bert``, ``normsoftmax_gpt2`` and the decoder families
  ``normsoftmax_{llama,qwen2,qwen3,mistral,gemma2,phi3}`` (AutoModel, AutoModelForCausalLM,
  AutoModelForSequenceClassification) with ``AutoConfig`` and the
  Auto model classes (ViT: AutoModel, AutoModelForImageClassification, AutoModelForMaskedImageModeling; BERT:
  AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
  AutoModelForQuestionAnswering, AutoModelForMultipleChoice, AutoModelForCausalLM; GPT-2: AutoModel,
  AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
  AutoModelForQuestionAnswering);
* the attention implementation ``"normsoftmax"`` (and ``"normsoftmax_reference"``) with its mask function, so any
  stock model using transformers' attention interface runs NormSoftmax attention with
  ``attn_implementation="normsoftmax"``.

A variant with no flags computes exactly what the stock model computes; each flag switches one method on (see
:mod:`hf_normsoftmax.configuration_normsoftmax` for the table of flags).

Usage:

```python
>>> import hf_normsoftmax
>>> from transformers import AutoConfig, AutoModelForSequenceClassification

>>> # 1. the shortest way from a stock checkpoint (path or Hub id) to a variant
>>> model = hf_normsoftmax.from_stock("path/to/bert", task="text-classification", num_labels=2,
...                                   attention_softmax="normsoftmax", sigma_reparam=True)

>>> # 2. the same through the Auto API
>>> stock = AutoConfig.from_pretrained("path/to/bert")
>>> config = AutoConfig.for_model(
...     "normsoftmax_bert", **{k: v for k, v in stock.to_dict().items() if k != "model_type"}, sigma_reparam=True
... )
>>> model = AutoModelForSequenceClassification.from_pretrained("path/to/bert", config=config)

>>> # 3. an already loaded stock model
>>> variant = hf_normsoftmax.convert_stock_model(stock_model, loss_softmax="normsoftmax")
```
"""

from __future__ import annotations

from typing import Any

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedConfig,
    PreTrainedModel,
)

from . import (
    configuration_normsoftmax_decoders,
    modeling_normsoftmax_bert,
    modeling_normsoftmax_decoders,
    modeling_normsoftmax_gpt2,
    modeling_normsoftmax_vit,
)
from . import normsoftmax as _normsoftmax_module
from . import pretrained_features as _pretrained_features
from . import sigma_reparam_tools as _sigma_reparam_tools
from .attention import normsoftmax_attention, normsoftmax_attention_reference
from .configuration_normsoftmax import (
    DEFAULT_LOSS_NORMSOFTMAX_GAMMA,
    DEFAULT_NORMSOFTMAX_GAMMA,
    NORMSOFTMAX_FLAGS,
    STOCK_MODEL_TYPE,
    VARIANT_MODEL_TYPE,
    NormSoftmaxBertConfig,
    NormSoftmaxConfigMixin,
    NormSoftmaxGPT2Config,
    NormSoftmaxViTConfig,
)
from .configuration_normsoftmax_decoders import *  # noqa: F403 (the six decoder configs, exported)
from .entropy import attention_entropy
from .hf_attention import (
    ATTENTION_IMPLEMENTATION,
    LEARNABLE_GAMMA_PARAMETER,
    REFERENCE_ATTENTION_IMPLEMENTATION,
    register_normsoftmax_attention,
)
from .hf_heads import training_logits
from .hf_pretrained import NormSoftmaxPreTrainedMixin
from .hf_state import NEW_KEY, SigmaReparamConv1D, apply_sigma_reparam, logger
from .hub import save as _package_save
from .layers import NormSoftmax
from .losses import (
    InverseTemperatureCrossEntropyLoss,
    NormSoftmaxCrossEntropyLoss,
    inverse_temperature_cross_entropy,
    logits_and_cross_entropy,
    normsoftmax_cross_entropy,
)
from .modeling_normsoftmax_bert import (
    NormSoftmaxBertForMaskedLM,
    NormSoftmaxBertForMultipleChoice,
    NormSoftmaxBertForQuestionAnswering,
    NormSoftmaxBertForSequenceClassification,
    NormSoftmaxBertForTokenClassification,
    NormSoftmaxBertLMHeadModel,
    NormSoftmaxBertModel,
)
from .modeling_normsoftmax_decoders import *  # noqa: F403 (the decoder model classes, exported)
from .modeling_normsoftmax_gpt2 import (
    NormSoftmaxGPT2ForQuestionAnswering,
    NormSoftmaxGPT2ForSequenceClassification,
    NormSoftmaxGPT2ForTokenClassification,
    NormSoftmaxGPT2LMHeadModel,
    NormSoftmaxGPT2Model,
)
from .modeling_normsoftmax_vit import (
    NormSoftmaxViTForImageClassification,
    NormSoftmaxViTForMaskedImageModeling,
    NormSoftmaxViTModel,
)
from .normsoftmax import norm_softmax, normalize_logits
from .sigma_reparam import SigmaReparamConv2d, SigmaReparamLinear, SigmaReparamMixin
from .sigma_reparam_tools import sigma_reparam_
from .state_reset import reset_normsoftmax_state

__version__ = "0.1.0"

# Package-only features at the places users know them from; checkpoints carry neither (their remote code holds
# the math modules alone): the NormSoftmax module at hf_normsoftmax.normsoftmax.NormSoftmax, and the sigmaReparam
# layers' effective_weight() / to_plain() / power_iteration_() methods.
_normsoftmax_module.NormSoftmax = NormSoftmax
_sigma_reparam_tools.install()

# Auto class -> variant class, per config class.
_AUTO_REGISTRY: dict[type, dict[Any, type]] = {
    NormSoftmaxViTConfig: {
        AutoModel: NormSoftmaxViTModel,
        AutoModelForImageClassification: NormSoftmaxViTForImageClassification,
        AutoModelForMaskedImageModeling: NormSoftmaxViTForMaskedImageModeling,
    },
    NormSoftmaxBertConfig: {
        AutoModel: NormSoftmaxBertModel,
        AutoModelForMaskedLM: NormSoftmaxBertForMaskedLM,
        AutoModelForSequenceClassification: NormSoftmaxBertForSequenceClassification,
        AutoModelForTokenClassification: NormSoftmaxBertForTokenClassification,
        AutoModelForQuestionAnswering: NormSoftmaxBertForQuestionAnswering,
        AutoModelForMultipleChoice: NormSoftmaxBertForMultipleChoice,
        AutoModelForCausalLM: NormSoftmaxBertLMHeadModel,
    },
    NormSoftmaxGPT2Config: {
        AutoModel: NormSoftmaxGPT2Model,
        AutoModelForCausalLM: NormSoftmaxGPT2LMHeadModel,
        AutoModelForSequenceClassification: NormSoftmaxGPT2ForSequenceClassification,
        AutoModelForTokenClassification: NormSoftmaxGPT2ForTokenClassification,
        AutoModelForQuestionAnswering: NormSoftmaxGPT2ForQuestionAnswering,
    },
    # decoder families: NormSoftmax<Family>Config -> NormSoftmax<Family>Model, ...ForCausalLM,
    # ...ForSequenceClassification (modeling_normsoftmax_decoders.py)
    **{
        config_class: {
            auto_class: getattr(modeling_normsoftmax_decoders, config_class.__name__.removesuffix("Config") + suffix)
            for auto_class, suffix in ((AutoModel, "Model"), (AutoModelForCausalLM, "ForCausalLM"),
                                       (AutoModelForSequenceClassification, "ForSequenceClassification"))
        }
        for config_class in configuration_normsoftmax_decoders.DECODER_CONFIG_CLASSES
    },
}

VARIANT_CONFIG_CLASSES = {config_class.model_type: config_class for config_class in _AUTO_REGISTRY}



def _stock_class(variant_class: type) -> type:
    return next(k for k in variant_class.__mro__ if k.__module__.startswith("transformers.models."))


# Stock class name -> variant class (for convert_stock_model and checkpoints' `architectures`).
VARIANT_CLASS_FOR_STOCK_CLASS = {
    _stock_class(variant_class).__name__: variant_class
    for classes in _AUTO_REGISTRY.values()
    for variant_class in classes.values()
}

# pipeline task / short name -> Auto class.
TASK_AUTO_CLASSES = {
    "base": AutoModel,
    "feature-extraction": AutoModel,
    "image-feature-extraction": AutoModel,
    "image-classification": AutoModelForImageClassification,
    "masked-image-modeling": AutoModelForMaskedImageModeling,
    "text-classification": AutoModelForSequenceClassification,
    "sequence-classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "question-answering": AutoModelForQuestionAnswering,
    "multiple-choice": AutoModelForMultipleChoice,
    "fill-mask": AutoModelForMaskedLM,
    "masked-lm": AutoModelForMaskedLM,
    "text-generation": AutoModelForCausalLM,
    "causal-lm": AutoModelForCausalLM,
}


def register() -> None:
    """Register the variants with AutoConfig / the Auto model classes and the attention implementation.

    Runs on ``import hf_normsoftmax``; calling it again is harmless.
    """
    register_normsoftmax_attention()
    # the variant classes save with their code, push with the hf_normsoftmax card and export through the package
    _pretrained_features.install()
    for config_class, auto_classes in _AUTO_REGISTRY.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class, model_class in auto_classes.items():
            auto_class.register(config_class, model_class, exist_ok=True)


register()


def _variant_class(variant_model_type: str, task: str | None, architectures: list[str] | None) -> type:
    config_class = VARIANT_CONFIG_CLASSES[variant_model_type]
    classes = _AUTO_REGISTRY[config_class]
    if task is not None:
        auto_class = TASK_AUTO_CLASSES.get(task)
        if auto_class is None:
            raise ValueError(
                f"Invalid value for `task`: {task!r}. Allowed: None or one of {sorted(TASK_AUTO_CLASSES)}."
            )
        if auto_class not in classes:
            allowed = sorted(t for t, a in TASK_AUTO_CLASSES.items() if a in classes)
            raise ValueError(
                f"Invalid value for `task`: {task!r}: the {variant_model_type!r} variant has no such head. "
                f"Allowed for this architecture: {allowed}."
            )
        return classes[auto_class]
    for name in architectures or []:
        variant = VARIANT_CLASS_FOR_STOCK_CLASS.get(name) or next(
            (c for c in classes.values() if c.__name__ == name), None
        )
        if variant is not None and variant.config_class is config_class:
            return variant
    return classes[AutoModel]


def from_stock(stock: str | PreTrainedModel, task: str | None = None, **kwargs) -> PreTrainedModel:
    """Load a stock ViT/BERT/GPT-2/Llama/Qwen2/Qwen3/Mistral/Gemma 2/Phi-3 checkpoint (path or Hub id) or convert a
    loaded stock model into its variant.

    Args:
        stock: a checkpoint path / Hub id (``model_type`` ``"vit"``, ``"bert"``, ``"gpt2"``, ``"llama"``,
            ``"qwen2"``, ``"qwen3"``, ``"mistral"``, ``"gemma2"`` or ``"phi3"``; a variant checkpoint also works), or
            a stock model instance (see :func:`convert_stock_model`).
        task: which head to build, as a pipeline task (``"text-classification"``, ``"token-classification"``,
            ``"question-answering"``, ``"fill-mask"``, ``"text-generation"``, ``"image-classification"``,
            ``"multiple-choice"``, ``"feature-extraction"``...). Default: the checkpoint's own architecture,
            else the base model.
        **kwargs: variant flags and config overrides (``attention_softmax=...``, ``num_labels=...``) and
            ``from_pretrained`` options (``dtype``, ``cache_dir``...).

    Returns:
        The variant model. Weights come from the checkpoint; new entries (sigmaReparam scales, learnable gammas)
        are initialised from them, so with only ``sigma_reparam=True`` the outputs equal the stock model's.

    Example:

    ```python
    >>> model = hf_normsoftmax.from_stock("gpt2-dir", task="text-generation", attention_softmax="normsoftmax")
    ```
    """
    if isinstance(stock, PreTrainedModel):
        if task is not None:
            raise ValueError(
                f"Invalid value for `task`: {task!r}. A loaded model keeps its own head; allowed: None (or pass "
                "a checkpoint path to choose the head)."
            )
        return convert_stock_model(stock, **kwargs)
    if not isinstance(stock, str) and not hasattr(stock, "__fspath__"):
        raise TypeError(
            f"Invalid value for `stock`: {type(stock).__name__}. Allowed: a checkpoint path or Hub id (str or "
            "os.PathLike), or a stock PreTrainedModel."
        )
    hub_kwargs = {
        k: kwargs[k] for k in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
        if k in kwargs
    }
    config_dict, _ = PreTrainedConfig.get_config_dict(stock, **hub_kwargs)
    model_type = config_dict.get("model_type")
    variant_type = model_type if model_type in STOCK_MODEL_TYPE else VARIANT_MODEL_TYPE.get(model_type)
    if variant_type is None:
        raise ValueError(
            f"Checkpoint of another architecture: {stock!r} has model type {model_type!r}. Allowed: "
            f"{sorted(VARIANT_MODEL_TYPE)} (stock) or {sorted(STOCK_MODEL_TYPE)} (variants)."
        )
    model_class = _variant_class(variant_type, task, config_dict.get("architectures"))
    return model_class.from_pretrained(stock, **kwargs)


# Stock config fields convert_stock_model also takes, per stock model type: NormSoftmax attention refuses Gemma 2's
# attention soft-capping (configuration_normsoftmax_decoders.py), so the conversion can switch it off.
_CONVERSION_OVERRIDES = {"gemma2": ("attn_logit_softcapping",)}


def convert_stock_model(model: PreTrainedModel, **flags) -> PreTrainedModel:
    """A variant copy of a loaded stock model (ViT, BERT, GPT-2 or a decoder family of
    ``modeling_normsoftmax_decoders.py``), with ``flags`` set (the input is left untouched).

    The variant class matches the stock class (``BertForSequenceClassification`` ->
    ``NormSoftmaxBertForSequenceClassification``, ...); every stock weight is copied, the new entries are
    initialised from the copied weights. The result has the model's dtype, device and train/eval mode.

    Example:

    ```python
    >>> stock = GPT2LMHeadModel.from_pretrained("gpt2-dir")
    >>> variant = hf_normsoftmax.convert_stock_model(stock, sigma_reparam=True)
    >>> torch.allclose(variant(ids).logits, stock(ids).logits, atol=1e-5)
    True
    ```
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"Invalid value for `model`: {type(model).__name__}. Allowed: a stock transformers model.")
    stock_type = model.config.model_type
    variant_type = VARIANT_MODEL_TYPE.get(stock_type)
    variant_class = VARIANT_CLASS_FOR_STOCK_CLASS.get(type(model).__name__)
    if variant_type is None or variant_class is None or variant_class.config_class.model_type != variant_type:
        allowed = sorted(VARIANT_CLASS_FOR_STOCK_CLASS)
        raise ValueError(
            f"Invalid value for `model`: a {type(model).__name__} (model type {stock_type!r}) has no NormSoftmax "
            f"variant. Allowed: instances of {allowed}."
        )
    allowed = [*NORMSOFTMAX_FLAGS, *_CONVERSION_OVERRIDES.get(stock_type, ())]
    unknown = sorted(set(flags) - set(allowed))
    if unknown:
        raise ValueError(f"Invalid flags {unknown} for convert_stock_model. Allowed: {allowed}.")
    config_dict = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "transformers_version")}
    config = variant_class.config_class(**{**config_dict, **flags})
    first_param = next(model.parameters())
    variant = variant_class(config).to(device=first_param.device, dtype=first_param.dtype)
    result = variant.load_state_dict(model.state_dict(), strict=False)
    new_keys = {k for k in variant.state_dict() if NEW_KEY.search(k)}  # sigmaReparam, gammas, QK-norms
    if result.unexpected_keys or set(result.missing_keys) - new_keys:
        raise ValueError(
            f"convert_stock_model: the state dict of {type(model).__name__} does not map onto "
            f"{variant_class.__name__} (missing {sorted(set(result.missing_keys) - new_keys)[:5]}, unexpected "
            f"{sorted(result.unexpected_keys)[:5]})."
        )
    variant.tie_weights()
    reset_normsoftmax_state(variant)
    if config.qk_norm is not None:
        logger.warning(
            f"convert_stock_model: `qk_norm`={config.qk_norm!r} starts its norms at weight 1 on the copied attention "
            "weights, so the variant computes another function than the stock model (QK-norm is not "
            "function-preserving); fine-tune it."
        )
    variant.train(model.training)
    return variant


def save_pretrained_with_code(model: PreTrainedModel, save_directory, auto_class: str | None = None, **kwargs):
    """``save_pretrained`` with the model's code, so the folder loads with ``trust_remote_code=True`` anywhere.

    A variant's plain ``model.save_pretrained(path)`` already does this by default (opt out with
    ``save_pretrained(path, save_remote_code=False)`` or ``model.save_remote_code = False``). This function saves
    the code whatever that default is, and lets you choose the Auto class written to ``auto_map``.

    Equivalent to ``model.save_pretrained(save_directory, save_remote_code=True, auto_class=auto_class)``; unlike
    ``config.register_for_auto_class(); model.register_for_auto_class(auto_class)`` it leaves no class-wide
    registration behind (which would make every later save in the process carry ``auto_map``).

    Args:
        model: a NormSoftmax variant model.
        save_directory: where to save.
        auto_class: the Auto class name to map (default: the one the variant is registered with, e.g.
            ``"AutoModelForSequenceClassification"``).
        **kwargs: passed to ``save_pretrained``.

    Example:

    ```python
    >>> hf_normsoftmax.save_pretrained_with_code(model, "out/")
    >>> AutoModelForSequenceClassification.from_pretrained("out/", trust_remote_code=True)  # no package needed
    ```
    """
    if not isinstance(model, NormSoftmaxPreTrainedMixin):
        raise ValueError(
            f"Invalid value for `model`: {type(model).__name__} is not a NormSoftmax variant class. Allowed: "
            "instances of the classes exported by hf_normsoftmax."
        )
    return _package_save.save_with_code(model, save_directory, auto_class=auto_class, **kwargs)


__all__ = [
    "ATTENTION_IMPLEMENTATION",
    "DEFAULT_LOSS_NORMSOFTMAX_GAMMA",
    "DEFAULT_NORMSOFTMAX_GAMMA",
    "InverseTemperatureCrossEntropyLoss",
    "LEARNABLE_GAMMA_PARAMETER",
    "NORMSOFTMAX_FLAGS",
    "NormSoftmax",
    "NormSoftmaxBertConfig",
    "NormSoftmaxConfigMixin",
    "NormSoftmaxCrossEntropyLoss",
    "NormSoftmaxGPT2Config",
    "NormSoftmaxViTConfig",
    "REFERENCE_ATTENTION_IMPLEMENTATION",
    "SigmaReparamConv1D",
    "StabilityCallback",  # noqa: F405 (lazy, see __getattr__)
    "SigmaReparamConv2d",
    "SigmaReparamLinear",
    "SigmaReparamMixin",
    "TASK_AUTO_CLASSES",
    "apply_sigma_reparam",
    "attention_entropy",
    "convert_stock_model",
    "from_stock",
    "inverse_temperature_cross_entropy",
    "logits_and_cross_entropy",
    "merge_and_unload",  # noqa: F405 (lazy, see __getattr__)
    "norm_softmax",
    "normalize_logits",
    "normsoftmax_attention",
    "normsoftmax_attention_reference",
    "normsoftmax_cross_entropy",
    "register",
    "save_pretrained_with_code",
    "sigma_reparam_",
    "training_logits",
    *modeling_normsoftmax_bert.__all__,
    *modeling_normsoftmax_gpt2.__all__,
    *modeling_normsoftmax_vit.__all__,
    *(name for name in modeling_normsoftmax_decoders.__all__ if name.startswith("NormSoftmax")),
    *(name for name in configuration_normsoftmax_decoders.__all__ if name.startswith("NormSoftmax")),
]


def __getattr__(name: str) -> Any:
    # StabilityCallback lives with the training code; importing it lazily keeps `import hf_normsoftmax` from
    # loading the Trainer stack.
    if name == "StabilityCallback":
        from .training.callbacks import StabilityCallback

        return StabilityCallback
    if name == "merge_and_unload":  # export to stock transformers (hf_normsoftmax/export.py)
        from .export import merge_and_unload

        return merge_and_unload
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
