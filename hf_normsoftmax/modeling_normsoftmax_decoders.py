"""NormSoftmax variants of today's decoder families: Llama, Qwen2, Qwen3, Mistral, Gemma 2 and Phi-3.

Per family, a base model (``AutoModel``), a causal LM (``AutoModelForCausalLM``) and a sequence classifier
(``AutoModelForSequenceClassification``), each subclassing the stock class: stock checkpoints load key for key, every
flag of the table (``configuration_normsoftmax.py``) means what it means for GPT-2, grouped-query attention included
(learnable gammas are per query head). The logits each head returns are what its training softmax sees; generation
samples from them.

Gemma 2 passes ``attn_logit_softcapping`` to its attention: its variant's attention modules dispatch through
``"normsoftmax_softcap"`` (``"normsoftmax_softcap_reference"`` for eager; see ``SoftcapAttentionConfig``), which
runs the stock soft-capped softmax attention for ``attention_softmax="softmax"`` and refuses a cap with NormSoftmax
(see ``configuration_normsoftmax_decoders.py``); without a cap it is ``"normsoftmax"``.

Example:

```python
>>> import torch
>>> from hf_normsoftmax import NormSoftmaxQwen2Config, NormSoftmaxQwen2ForCausalLM

>>> config = NormSoftmaxQwen2Config(
...     vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
...     num_key_value_heads=2, attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True,
... )
>>> model = NormSoftmaxQwen2ForCausalLM(config)
>>> ids = torch.randint(0, 128, (1, 6))
>>> out = model(ids, labels=ids)
>>> model.generate(ids, max_new_tokens=4, do_sample=False).shape
torch.Size([1, 10])
```
"""

from __future__ import annotations

import types

import torch
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.models.gemma2.modeling_gemma2 import (
    Gemma2Attention,
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    Gemma2Model,
)
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager_attention_forward
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
)
from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralForCausalLM,
    MistralForSequenceClassification,
    MistralModel,
)
from transformers.models.phi3.modeling_phi3 import (
    Phi3Attention,
    Phi3ForCausalLM,
    Phi3ForSequenceClassification,
    Phi3Model,
)
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen2Model,
)
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Attention,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
    Qwen3Model,
)

from .configuration_normsoftmax_decoders import (
    NormSoftmaxGemma2Config,
    NormSoftmaxLlamaConfig,
    NormSoftmaxMistralConfig,
    NormSoftmaxPhi3Config,
    NormSoftmaxQwen2Config,
    NormSoftmaxQwen3Config,
    check_attention_softcapping,
)
from .hf_attention import (
    ATTENTION_IMPLEMENTATION,
    RECORDER_ATTRIBUTE,
    REFERENCE_ATTENTION_IMPLEMENTATION,
    normsoftmax_attention_forward,
    normsoftmax_reference_attention_forward,
    resolve_variant_attn_implementation,
)
from .hf_heads import normsoftmax_head_forward
from .hf_pretrained import NormSoftmaxPreTrainedMixin

SOFTCAP_ATTENTION_IMPLEMENTATION = "normsoftmax_softcap"
SOFTCAP_REFERENCE_ATTENTION_IMPLEMENTATION = "normsoftmax_softcap_reference"
# what a Gemma 2 variant runs for what the other variants run
_SOFTCAP_IMPLEMENTATIONS = {
    ATTENTION_IMPLEMENTATION: SOFTCAP_ATTENTION_IMPLEMENTATION,
    REFERENCE_ATTENTION_IMPLEMENTATION: SOFTCAP_REFERENCE_ATTENTION_IMPLEMENTATION,
}


def _softcapped_softmax_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, softcap):
    """Stock Gemma 2 attention (transformers' eager function) from the boolean mask the variants are given."""
    length, keys = query.shape[-2], key.shape[-2]
    if attention_mask is None:
        if is_causal and length > 1:  # transformers skips the mask for plain causal input: causality is ours
            attention_mask = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril(keys - length)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
        attention_mask = additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
        attention_mask = attention_mask.expand(query.shape[0], 1, length, keys) if attention_mask.dim() == 2 else \
            attention_mask
    return gemma2_eager_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap
    )


def _softcap_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, *, reference, softcap=None,
    **kwargs,
):
    inner = normsoftmax_reference_attention_forward if reference else normsoftmax_attention_forward
    if softcap is None:
        return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                     **kwargs)
    config = getattr(module, "config", None)
    check_attention_softcapping(getattr(config, "attention_softmax", "normsoftmax"), softcap)
    if getattr(module, RECORDER_ATTRIBUTE, None) is not None:
        raise ValueError(
            f"Invalid combination: attention diagnostics with `attn_logit_softcapping`={softcap!r}. The recorded "
            "statistics (entropy, logit std) are those of uncapped logits, which this attention does not use. "
            "Allowed: `attn_logit_softcapping`=None, or the monitor with attention=False (weights and logits only)."
        )
    is_causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    return _softcapped_softmax_attention(
        module, query, key, value, attention_mask, dropout, scaling, is_causal, softcap
    )


def softcap_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """Attention function registered as ``"normsoftmax_softcap"``: ``"normsoftmax"`` when the module passes no
    ``softcap``; with one, the stock soft-capped softmax attention (``attention_softmax="softmax"``) or a
    ValueError (``"normsoftmax"``). Arguments and result as :func:`hf_attention.normsoftmax_attention_forward`."""
    return _softcap_attention_forward(module, query, key, value, attention_mask, reference=False, **kwargs)


def softcap_reference_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """``"normsoftmax_softcap_reference"``: as :func:`softcap_attention_forward` with ``"normsoftmax_reference"``."""
    return _softcap_attention_forward(module, query, key, value, attention_mask, reference=True, **kwargs)


def register_softcap_attention() -> None:
    """Register the two soft-capping-aware implementations (with ``sdpa_mask``, as ``"normsoftmax"``)."""
    AttentionInterface.register(SOFTCAP_ATTENTION_IMPLEMENTATION, softcap_attention_forward)
    AttentionInterface.register(SOFTCAP_REFERENCE_ATTENTION_IMPLEMENTATION, softcap_reference_attention_forward)
    AttentionMaskInterface.register(SOFTCAP_ATTENTION_IMPLEMENTATION, sdpa_mask)
    AttentionMaskInterface.register(SOFTCAP_REFERENCE_ATTENTION_IMPLEMENTATION, sdpa_mask)


# remote-code checkpoints import this file without the package: registering here makes them self-sufficient
register_softcap_attention()


class SoftcapAttentionConfig:
    """The config a Gemma 2 variant's attention module sees: the config it had, every attribute read and written
    through, except ``_attn_implementation``: ``"normsoftmax"`` there becomes ``"normsoftmax_softcap"`` (and the
    reference likewise), so the module's ``softcap`` reaches a function that knows what to do with it."""

    __slots__ = ("_normsoftmax_inner_config",)

    def __init__(self, config):
        object.__setattr__(self, "_normsoftmax_inner_config", config)

    @property
    def _attn_implementation(self) -> str:
        name = object.__getattribute__(self, "_normsoftmax_inner_config")._attn_implementation
        return _SOFTCAP_IMPLEMENTATIONS.get(name, name)

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):  # copy / pickle protocol lookups: this object's own
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "_normsoftmax_inner_config"), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(object.__getattribute__(self, "_normsoftmax_inner_config"), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(object.__getattribute__(self, "_normsoftmax_inner_config"), name)

    def __reduce__(self):
        return (type(self), (object.__getattribute__(self, "_normsoftmax_inner_config"),))


class _CausalLMLossType:
    """Causal LM heads name their loss type: Trainer then counts the *shifted* labels for `num_items_in_batch`
    (with the class-name default it counts every label and the loss comes out (L - 1) / L of the mean)."""

    def __init__(self, config):
        super().__init__(config)
        self.loss_type = "ForCausalLM"


# --------------------------------------------------------------------------------------------------------------
# The classes of each family: the same three heads over the family's stock classes
# --------------------------------------------------------------------------------------------------------------
def _named_class(name: str, bases: tuple[type, ...], doc: str | None = None, **attributes) -> type:
    """``class <name>(*bases)`` with ``attributes``, defined in this module (pickling and remote-code saves find the
    class by ``__module__`` and name)."""
    namespace = {"__module__": __name__, "__qualname__": name, "__doc__": doc, **attributes}
    return types.new_class(name, bases, exec_body=lambda ns: ns.update(namespace))


def _family_mixin(family: str, config_class: type, attention_class: type) -> type:
    """``NormSoftmax<family>PreTrainedMixin``: the variant mixin with the family's config and attention class."""
    return _named_class(f"NormSoftmax{family}PreTrainedMixin", (NormSoftmaxPreTrainedMixin,),
                        config_class=config_class, _normsoftmax_attention_classes=(attention_class,))


def _family_classes(family: str, shown_as: str, mixin: type, model: type, causal_lm: type, classifier: type,
                    causal_lm_note: str = "") -> tuple[type, type, type]:
    """``NormSoftmax<family>Model``, ``...ForCausalLM`` and ``...ForSequenceClassification``: ``mixin`` first, then
    the stock class (the heads' forward returns the logits their training softmax sees, hf_heads)."""
    base = _named_class(f"NormSoftmax{family}Model", (mixin, model),
                        f"{shown_as} decoder with the NormSoftmax flags; outputs as [`{model.__name__}`].")
    lm = _named_class(
        f"NormSoftmax{family}ForCausalLM", (mixin, _CausalLMLossType, causal_lm),
        f"{shown_as} with a language-modeling head: `logits` are what the training softmax over the vocabulary sees, "
        "`loss` is their next-token cross-entropy (labels shifted inside, -100 ignored, `num_items_in_batch` "
        f"honoured).{causal_lm_note}",
        forward=normsoftmax_head_forward(causal_lm.forward, "causal_lm"),
    )
    sequence = _named_class(
        f"NormSoftmax{family}ForSequenceClassification", (mixin, classifier),
        f"{shown_as} with a sequence classification head on the last non-padding token; logits/loss per problem "
        "type as in [`NormSoftmaxGPT2ForSequenceClassification`].",
        forward=normsoftmax_head_forward(classifier.forward, "sequence_classification"),
    )
    return base, lm, sequence


class NormSoftmaxGemma2PreTrainedMixin(NormSoftmaxPreTrainedMixin):
    config_class = NormSoftmaxGemma2Config
    _normsoftmax_attention_classes = (Gemma2Attention,)

    # Stock Gemma 2 refuses "sdpa" (SDPA has no soft-capping), also in the stock Gemma2Model a head builds inside:
    # the variant's config names "normsoftmax" for it, which transformers accepts as a registered function.
    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        resolved = resolve_variant_attn_implementation(requested_attention)
        return ATTENTION_IMPLEMENTATION if resolved == "sdpa" else resolved

    def _check_and_adjust_attn_implementation(self, attn_implementation: str | None, is_init_check: bool = False,
                                              **kwargs) -> str:
        return self.get_correct_attn_implementation(attn_implementation, is_init_check)

    def post_init(self):
        super().post_init()
        for module in self.modules():
            if isinstance(module, Gemma2Attention) and not isinstance(module.config, SoftcapAttentionConfig):
                module.config = SoftcapAttentionConfig(module.config)


NormSoftmaxLlamaPreTrainedMixin = _family_mixin("Llama", NormSoftmaxLlamaConfig, LlamaAttention)
NormSoftmaxLlamaModel, NormSoftmaxLlamaForCausalLM, NormSoftmaxLlamaForSequenceClassification = _family_classes(
    "Llama", "Llama", NormSoftmaxLlamaPreTrainedMixin, LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification
)
NormSoftmaxQwen2PreTrainedMixin = _family_mixin("Qwen2", NormSoftmaxQwen2Config, Qwen2Attention)
NormSoftmaxQwen2Model, NormSoftmaxQwen2ForCausalLM, NormSoftmaxQwen2ForSequenceClassification = _family_classes(
    "Qwen2", "Qwen2", NormSoftmaxQwen2PreTrainedMixin, Qwen2Model, Qwen2ForCausalLM, Qwen2ForSequenceClassification
)
NormSoftmaxQwen3PreTrainedMixin = _family_mixin("Qwen3", NormSoftmaxQwen3Config, Qwen3Attention)
NormSoftmaxQwen3Model, NormSoftmaxQwen3ForCausalLM, NormSoftmaxQwen3ForSequenceClassification = _family_classes(
    "Qwen3", "Qwen3", NormSoftmaxQwen3PreTrainedMixin, Qwen3Model, Qwen3ForCausalLM, Qwen3ForSequenceClassification
)
NormSoftmaxMistralPreTrainedMixin = _family_mixin("Mistral", NormSoftmaxMistralConfig, MistralAttention)
NormSoftmaxMistralModel, NormSoftmaxMistralForCausalLM, NormSoftmaxMistralForSequenceClassification = _family_classes(
    "Mistral", "Mistral", NormSoftmaxMistralPreTrainedMixin, MistralModel, MistralForCausalLM,
    MistralForSequenceClassification,
)
NormSoftmaxGemma2Model, NormSoftmaxGemma2ForCausalLM, NormSoftmaxGemma2ForSequenceClassification = _family_classes(
    "Gemma2", "Gemma 2", NormSoftmaxGemma2PreTrainedMixin, Gemma2Model, Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    causal_lm_note=" `final_logit_softcapping` is applied first: the capped logits are the `z` that beta scales and "
                   "NormSoftmax normalises.",
)
NormSoftmaxPhi3PreTrainedMixin = _family_mixin("Phi3", NormSoftmaxPhi3Config, Phi3Attention)
NormSoftmaxPhi3Model, NormSoftmaxPhi3ForCausalLM, NormSoftmaxPhi3ForSequenceClassification = _family_classes(
    "Phi3", "Phi-3", NormSoftmaxPhi3PreTrainedMixin, Phi3Model, Phi3ForCausalLM, Phi3ForSequenceClassification
)


__all__ = [
    "NormSoftmaxGemma2ForCausalLM",
    "NormSoftmaxGemma2ForSequenceClassification",
    "NormSoftmaxGemma2Model",
    "NormSoftmaxLlamaForCausalLM",
    "NormSoftmaxLlamaForSequenceClassification",
    "NormSoftmaxLlamaModel",
    "NormSoftmaxMistralForCausalLM",
    "NormSoftmaxMistralForSequenceClassification",
    "NormSoftmaxMistralModel",
    "NormSoftmaxPhi3ForCausalLM",
    "NormSoftmaxPhi3ForSequenceClassification",
    "NormSoftmaxPhi3Model",
    "NormSoftmaxQwen2ForCausalLM",
    "NormSoftmaxQwen2ForSequenceClassification",
    "NormSoftmaxQwen2Model",
    "NormSoftmaxQwen3ForCausalLM",
    "NormSoftmaxQwen3ForSequenceClassification",
    "NormSoftmaxQwen3Model",
    "SOFTCAP_ATTENTION_IMPLEMENTATION",
    "SOFTCAP_REFERENCE_ATTENTION_IMPLEMENTATION",
]
