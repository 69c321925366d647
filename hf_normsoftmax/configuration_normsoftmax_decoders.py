"""Configurations of the NormSoftmax variants of today's decoder families: Llama, Qwen2, Qwen3, Mistral, Gemma 2
and Phi-3 (``model_type="normsoftmax_llama"``, ...).

Each subclasses the stock config (every stock field keeps working, stock ``config.json`` files load into it) and
adds the flags of :class:`~hf_normsoftmax.configuration_normsoftmax.NormSoftmaxConfigMixin`, with the same table,
ranges and checks as the ViT / BERT / GPT-2 variants.

Gemma 2 soft-capping. ``attn_logit_softcapping`` (stock default 50.0) replaces every attention logit ``s`` by
``cap * tanh(s / cap)`` before the softmax. With ``attention_softmax="softmax"`` the variant runs exactly that
(transformers' own Gemma 2 attention). NormSoftmax attention refuses it: NormSoftmax already bounds the spread of
every row (normalised to std gamma), which is what the cap is for, and its statistics come from key moments
(no N x N tensor), which cannot see through a tanh. ``attention_softmax="normsoftmax"`` with a cap set raises
naming the value; pass ``attn_logit_softcapping=None``. ``final_logit_softcapping`` is part of the head's raw
logits ``z``: the capped logits are what ``logit_inverse_temperature`` scales and ``loss_softmax="normsoftmax"``
normalises.

Example:

```python
>>> from hf_normsoftmax import NormSoftmaxLlamaConfig, NormSoftmaxLlamaForCausalLM

>>> config = NormSoftmaxLlamaConfig(
...     vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
...     num_key_value_heads=2, attention_softmax="normsoftmax", sigma_reparam=True,
... )
>>> model = NormSoftmaxLlamaForCausalLM(config)
```
"""

from __future__ import annotations

from transformers import Gemma2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

from .configuration_normsoftmax import NormSoftmaxConfigMixin


class NormSoftmaxDecoderConfigMixin(NormSoftmaxConfigMixin):
    """The flags of [`NormSoftmaxConfigMixin`] for the decoder families, without `qk_norm`: their queries and keys
    reach the attention after the rotary embedding (see `configuration_normsoftmax`)."""

    supports_qk_norm = False


class NormSoftmaxLlamaConfig(NormSoftmaxDecoderConfigMixin, LlamaConfig):
    r"""Configuration of the NormSoftmax Llama variant (`model_type="normsoftmax_llama"`): every [`LlamaConfig`]
    field plus the flags of [`NormSoftmaxConfigMixin`]."""

    model_type = "normsoftmax_llama"


class NormSoftmaxQwen2Config(NormSoftmaxDecoderConfigMixin, Qwen2Config):
    r"""Configuration of the NormSoftmax Qwen2 variant (`model_type="normsoftmax_qwen2"`): every [`Qwen2Config`]
    field plus the flags of [`NormSoftmaxConfigMixin`]."""

    model_type = "normsoftmax_qwen2"


class NormSoftmaxQwen3Config(NormSoftmaxDecoderConfigMixin, Qwen3Config):
    r"""Configuration of the NormSoftmax Qwen3 variant (`model_type="normsoftmax_qwen3"`): every [`Qwen3Config`]
    field plus the flags of [`NormSoftmaxConfigMixin`]."""

    model_type = "normsoftmax_qwen3"


class NormSoftmaxMistralConfig(NormSoftmaxDecoderConfigMixin, MistralConfig):
    r"""Configuration of the NormSoftmax Mistral variant (`model_type="normsoftmax_mistral"`): every
    [`MistralConfig`] field plus the flags of [`NormSoftmaxConfigMixin`]."""

    model_type = "normsoftmax_mistral"


def check_attention_softcapping(attention_softmax, softcap) -> None:
    """Refuse NormSoftmax attention together with attention logit soft-capping (see the module docstring)."""
    if attention_softmax == "normsoftmax" and softcap is not None:
        raise ValueError(
            f"Invalid combination: `attn_logit_softcapping`={softcap!r} with `attention_softmax`='normsoftmax'. "
            "NormSoftmax attention normalises every row of logits to std gamma, which already bounds them, and "
            "computes its statistics from key moments, which cannot see through the tanh of the cap. Allowed: "
            "`attn_logit_softcapping`=None with `attention_softmax`='normsoftmax', or any cap with "
            "`attention_softmax`='softmax' (stock Gemma 2 attention)."
        )


class NormSoftmaxGemma2Config(NormSoftmaxDecoderConfigMixin, Gemma2Config):
    r"""Configuration of the NormSoftmax Gemma 2 variant (`model_type="normsoftmax_gemma2"`): every
    [`Gemma2Config`] field plus the flags of [`NormSoftmaxConfigMixin`]. `attention_softmax="normsoftmax"` needs
    `attn_logit_softcapping=None` (see the module docstring)."""

    model_type = "normsoftmax_gemma2"

    def validate(self) -> None:
        super().validate()
        check_attention_softcapping(self.attention_softmax, self.attn_logit_softcapping)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # a cap given with the flags (from_pretrained(path, attention_softmax="normsoftmax",
        # attn_logit_softcapping=None)) is set at construction with them, where the combination is checked
        if "attn_logit_softcapping" in kwargs:
            config_dict = {**config_dict, "attn_logit_softcapping": kwargs.pop("attn_logit_softcapping")}
        return super().from_dict(config_dict, **kwargs)


class NormSoftmaxPhi3Config(NormSoftmaxDecoderConfigMixin, Phi3Config):
    r"""Configuration of the NormSoftmax Phi-3 variant (`model_type="normsoftmax_phi3"`): every [`Phi3Config`]
    field plus the flags of [`NormSoftmaxConfigMixin`]."""

    model_type = "normsoftmax_phi3"


DECODER_CONFIG_CLASSES = (
    NormSoftmaxLlamaConfig,
    NormSoftmaxQwen2Config,
    NormSoftmaxQwen3Config,
    NormSoftmaxMistralConfig,
    NormSoftmaxGemma2Config,
    NormSoftmaxPhi3Config,
)

__all__ = [
    "DECODER_CONFIG_CLASSES",
    "NormSoftmaxGemma2Config",
    "NormSoftmaxLlamaConfig",
    "NormSoftmaxMistralConfig",
    "NormSoftmaxPhi3Config",
    "NormSoftmaxQwen2Config",
    "NormSoftmaxQwen3Config",
    "check_attention_softcapping",
]
