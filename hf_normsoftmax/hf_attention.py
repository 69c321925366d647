"""NormSoftmax attention inside transformers: the attention implementations a variant runs.

``"normsoftmax"`` (the fast exact path of :func:`hf_normsoftmax.attention.normsoftmax_attention`) and
``"normsoftmax_reference"`` (materialised logits, what a variant runs when asked for ``"eager"``) are registered in
transformers' ``AttentionInterface`` and, with ``sdpa_mask``, in ``AttentionMaskInterface`` (without a mask
function transformers would hand the attention ``attention_mask=None`` and the causal/padding mask would be lost).

A variant's config keeps the name the user asked for (``"sdpa"`` by default, ``"eager"``), as a stock model's does;
its attention modules see the config through a :class:`VariantAttentionConfig`, which names ``"normsoftmax"`` for
``"sdpa"`` and ``"normsoftmax_reference"`` for ``"eager"``.

Using NormSoftmax attention in any stock model that goes through transformers' attention interface:

```python
>>> import hf_normsoftmax  # registers "normsoftmax"
>>> from transformers import AutoModelForCausalLM
>>> model = AutoModelForCausalLM.from_pretrained("path/to/llama", attn_implementation="normsoftmax")
```

Such a stock model has no flags: it uses ``normsoftmax_gamma`` etc. from its config when present, else the
package defaults.

With the `qk_norm` flag, an attention module holds ``normsoftmax_q_norm`` / ``normsoftmax_k_norm``: the queries and
keys are normalised first, whatever runs next.

Diagnostics hook: if an attention module has a non-None attribute ``_normsoftmax_recorder``, it is called as
``recorder(module=..., query=..., key=..., attention_mask=<4D bool (True = attend) or None>, is_causal=...,
scaling=..., softmax="normsoftmax" | "softmax", gamma=..., max_temperature=..., eps=...)`` before every attention
computation, with the exact inputs the attention is computed from.

Copied into remote-code checkpoints: imports only torch, transformers and same-folder modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from .attention import (
    normsoftmax_attention,
    normsoftmax_attention_reference,
    softmax_attention_reference,
    valid_from_mask,
)
from .configuration_normsoftmax import DEFAULT_NORMSOFTMAX_GAMMA
from .normsoftmax import GAMMA_RANGE

try:  # private: tells whether a model forward is collecting attention weights (GPT-2 drops output_attentions)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - other transformers versions
    _active_collector = None

ATTENTION_IMPLEMENTATION = "normsoftmax"
REFERENCE_ATTENTION_IMPLEMENTATION = "normsoftmax_reference"
# Name of the learnable per-head gamma on attention modules (the loader renames keys containing "gamma"/"beta").
LEARNABLE_GAMMA_PARAMETER = "normsoftmax_scale"
# Names of the QK-norm modules (:class:`~hf_normsoftmax.qk_norm.HeadNorm`) on attention modules (`qk_norm` flag).
QUERY_NORM_MODULE, KEY_NORM_MODULE = "normsoftmax_q_norm", "normsoftmax_k_norm"
# Learned gammas are clamped into GAMMA_RANGE where the attention uses them (the parameter keeps its value): a
# gamma <= 0 would invert or flatten the attention, and the math is only finite for gammas inside the range.
MIN_LEARNED_GAMMA, MAX_LEARNED_GAMMA = GAMMA_RANGE
RECORDER_ATTRIBUTE = "_normsoftmax_recorder"

# The names a variant accepts for `attn_implementation` (kept on its config as given, as on a stock model; None
# becomes "sdpa", transformers' default) -> the function its attention modules run for that name. NormSoftmax
# variants run NormSoftmax (or, for attention_softmax="softmax", the stock computation) through these two: never a
# kernel that would silently compute plain softmax attention, and always with the diagnostics hook.
VARIANT_ATTENTION_FUNCTIONS = {
    "sdpa": ATTENTION_IMPLEMENTATION,
    "eager": REFERENCE_ATTENTION_IMPLEMENTATION,
    ATTENTION_IMPLEMENTATION: ATTENTION_IMPLEMENTATION,
    REFERENCE_ATTENTION_IMPLEMENTATION: REFERENCE_ATTENTION_IMPLEMENTATION,
}


def _attention_weights_requested(kwargs: dict) -> bool:
    if kwargs.get("output_attentions"):
        return True
    if _active_collector is None:
        return False
    collected = _active_collector.get()
    return bool(collected) and any("attentions" in key for key in collected)


def attention_gamma(module: nn.Module) -> float | torch.Tensor:
    """The gamma the attention of ``module`` uses: its learnable per-head gammas, else the config value."""
    learned = getattr(module, LEARNABLE_GAMMA_PARAMETER, None)
    if learned is not None:
        return learned.clamp(MIN_LEARNED_GAMMA, MAX_LEARNED_GAMMA)
    return getattr(getattr(module, "config", None), "normsoftmax_gamma", DEFAULT_NORMSOFTMAX_GAMMA)


def _with_position_bias(attention_mask, position_bias):
    """Fold an additive position bias into an additive float mask (masked entries: most negative value)."""
    bias = position_bias.to(torch.float32)
    if attention_mask is None:
        return bias
    if attention_mask.dtype == torch.bool:
        return bias.masked_fill(~attention_mask, torch.finfo(torch.float32).min)
    return bias + attention_mask.to(torch.float32)


def _normsoftmax_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, *, reference, **kwargs
):
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"Invalid value for `softcap`: {kwargs['softcap']!r}. NormSoftmax attention does not support logit "
            "soft-capping. Allowed: None."
        )
    config = getattr(module, "config", None)
    softmax_kind = getattr(config, "attention_softmax", "normsoftmax")
    query_norm = getattr(module, QUERY_NORM_MODULE, None)
    if query_norm is not None:  # QK-norm: the logits, the statistics and the diagnostics see the normalised q, k
        query, key = query_norm(query), getattr(module, KEY_NORM_MODULE)(key)
    B, H, L, D = query.shape
    scaling = D**-0.5 if scaling is None else float(scaling)
    is_causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    if attention_mask is None and is_causal and L > 1 and key.shape[-2] > L:
        # transformers only skips the causal mask here for a prefill into an empty static cache, where causality
        # is aligned top-left: the cache slots after the L new keys are still empty.
        key, value = key[:, :, :L], value[:, :, :L]
    causal = is_causal and L > 1  # a single query row (decoding) sees every key: bottom-right alignment
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        attention_mask = _with_position_bias(attention_mask, position_bias)
    want_weights = _attention_weights_requested(kwargs)

    gamma = attention_gamma(module)
    max_temperature = getattr(config, "normsoftmax_max_temperature", None)
    eps = getattr(config, "normsoftmax_eps", 1e-6)
    statistic = getattr(config, "normsoftmax_statistic", "std")

    recorder = getattr(module, RECORDER_ATTRIBUTE, None)
    if recorder is not None:
        recorder(
            module=module, query=query, key=key, attention_mask=valid_from_mask(attention_mask), is_causal=causal,
            scaling=scaling, softmax=softmax_kind, gamma=gamma, max_temperature=max_temperature, eps=eps,
        )

    if softmax_kind == "softmax":
        if not reference and not want_weights and position_bias is None:
            # exactly the stock SDPA computation (same function transformers runs for attn_implementation="sdpa")
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                **{k: v for k, v in kwargs.items() if k not in ("is_causal", "position_bias")},
            )
        out, weights = softmax_attention_reference(
            query, key, value, attn_mask=attention_mask, is_causal=causal, scale=scaling, dropout_p=dropout,
            return_weights=True,
        )
        return out.transpose(1, 2).contiguous(), weights

    op = normsoftmax_attention_reference if reference else normsoftmax_attention
    out, weights = op(
        query, key, value, attn_mask=attention_mask, is_causal=causal, scale=scaling, gamma=gamma,
        max_temperature=max_temperature, eps=eps, statistic=statistic, dropout_p=dropout,
        return_weights=want_weights,
    )
    return out.transpose(1, 2).contiguous(), weights


def normsoftmax_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function registered as ``"normsoftmax"``: the fast exact NormSoftmax attention.

    Follows transformers' attention-interface contract: ``query/key/value`` are ``(B, H, L|S, D)``, the result is
    ``(attn_output (B, L, H, D), attn_weights (B, H, L, S) or None)``. Weights are materialised only when the
    forward asks for attentions. For a variant config with ``attention_softmax="softmax"`` it runs the stock SDPA
    attention. Causality comes from ``module.is_causal`` (or an explicit ``is_causal``).
    """
    return _normsoftmax_attention_forward(
        module, query, key, value, attention_mask, dropout, scaling, is_causal, reference=False, **kwargs
    )


def normsoftmax_reference_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function registered as ``"normsoftmax_reference"``: materialised logits, same results.

    Arguments (``dropout``, ``scaling``, ``is_causal``, ...) and result as :func:`normsoftmax_attention_forward`.
    What a NormSoftmax variant runs when asked for ``attn_implementation="eager"``.
    """
    return _normsoftmax_attention_forward(module, query, key, value, attention_mask, reference=True, **kwargs)


def register_normsoftmax_attention() -> None:
    """Register ``"normsoftmax"`` and ``"normsoftmax_reference"`` with transformers (idempotent).

    Both get ``sdpa_mask`` (4D bool, True = attend) as mask function: without a registered mask function
    transformers passes ``attention_mask=None`` to the attention and padding/causality would be lost.
    """
    AttentionInterface.register(ATTENTION_IMPLEMENTATION, normsoftmax_attention_forward)
    AttentionInterface.register(REFERENCE_ATTENTION_IMPLEMENTATION, normsoftmax_reference_attention_forward)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
    AttentionMaskInterface.register(REFERENCE_ATTENTION_IMPLEMENTATION, sdpa_mask)


# The modeling files import this module: registering here makes remote-code checkpoints self-sufficient.
register_normsoftmax_attention()


def _allowed_variant_attn_implementations() -> str:
    return ", ".join(repr(name) for name in (None, *VARIANT_ATTENTION_FUNCTIONS))


def resolve_variant_attn_implementation(requested: str | None) -> str:
    """The ``attn_implementation`` a variant's config keeps for a request: the user's own name (``None`` ->
    ``"sdpa"``, transformers' default). Anything but ``"sdpa"``, ``"eager"``, ``"normsoftmax"`` and
    ``"normsoftmax_reference"`` (flash, flex, kernels, paged) raises: those would run plain softmax attention.

    What the attention modules run for the name is :func:`variant_attention_function`.
    """
    if requested is None:
        return "sdpa"
    if isinstance(requested, str) and requested in VARIANT_ATTENTION_FUNCTIONS:
        return requested
    raise ValueError(  # begins as transformers' own message for an unsupported name
        f'Specified `attn_implementation="{requested}"` is not supported by NormSoftmax variants: '
        f"they run their attention through {ATTENTION_IMPLEMENTATION!r} for 'sdpa' and "
        f"{REFERENCE_ATTENTION_IMPLEMENTATION!r} (materialised weights) for 'eager' (the `attention_softmax` flag "
        f"chooses softmax or NormSoftmax). Allowed: {_allowed_variant_attn_implementations()}."
    )


def variant_attention_function(attn_implementation: str | None) -> str:
    """The attention function (registered name) a variant's attention modules run when its config names
    ``attn_implementation``: ``"sdpa"`` (and None) -> ``"normsoftmax"``, ``"eager"`` -> ``"normsoftmax_reference"``."""
    if attn_implementation is None:
        return ATTENTION_IMPLEMENTATION
    function = VARIANT_ATTENTION_FUNCTIONS.get(attn_implementation) if isinstance(attn_implementation, str) else None
    if function is None:  # set on the config past the model's checks (e.g. `_attn_implementation_internal`)
        resolve_variant_attn_implementation(attn_implementation)  # raises, naming the value
    return function


class VariantAttentionConfig:
    """The config a variant's attention module sees: the model's config, every attribute read and written through
    (later flag changes are seen), except ``_attn_implementation``, which names the function the variant runs for
    the model's choice (:func:`variant_attention_function`).

    transformers' attention modules read ``self.config._attn_implementation`` at every forward and look it up in
    ``ALL_ATTENTION_FUNCTIONS`` (GPT-2 runs its own eager code for ``"eager"``): with this view the model's config
    keeps the user's ``"sdpa"`` / ``"eager"`` (what transformers and user code check, e.g. for
    ``output_attentions``) while its attention runs ``"normsoftmax"`` / ``"normsoftmax_reference"``. Copies and
    pickles keep the link: a deep copy of the model gives a view of the copied config.
    """

    __slots__ = ("_normsoftmax_model_config",)

    def __init__(self, model_config: Any):
        object.__setattr__(self, "_normsoftmax_model_config", model_config)

    @property
    def model_config(self) -> Any:
        """The model's config this view reads through to."""
        return object.__getattribute__(self, "_normsoftmax_model_config")

    @property
    def _attn_implementation(self) -> str:
        return variant_attention_function(self.model_config._attn_implementation)

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):  # copy / pickle protocol lookups: this object's own
            raise AttributeError(name)
        return getattr(self.model_config, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.model_config, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.model_config, name)

    def __reduce__(self):
        return (type(self), (self.model_config,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(of {type(self.model_config).__name__}, runs {self._attn_implementation!r})"


def use_variant_attention_config(model: nn.Module, attention_classes: tuple[type, ...]) -> int:
    """Give every attention module of ``model`` (instances of ``attention_classes``) a
    :class:`VariantAttentionConfig` of the config it holds. Returns how many modules were changed."""
    count = 0
    for module in model.modules():
        if not isinstance(module, attention_classes):
            continue
        config = getattr(module, "config", None)
        if isinstance(config, VariantAttentionConfig):
            config = config.model_config
        if config is None:
            continue
        module.config = VariantAttentionConfig(config)
        count += 1
    return count
