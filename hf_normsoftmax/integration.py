"""Shared transformers integration of the NormSoftmax variants (ViT, BERT, GPT-2).

What lives here, used by the three ``modeling_normsoftmax_*`` files (and copied next to them into remote-code
checkpoints, so it only imports torch, transformers and same-folder modules):

* the attention implementations ``"normsoftmax"`` (fast exact path) and ``"normsoftmax_reference"`` (materialised
  logits, what a variant runs when asked for ``"eager"``), registered in transformers' ``AttentionInterface`` and,
  with ``sdpa_mask``, in ``AttentionMaskInterface`` (without a mask function transformers would hand the attention
  ``attention_mask=None`` and the causal/padding mask would be lost);
* ``SigmaReparamConv1D``, the sigmaReparam version of GPT-2's transposed ``Conv1D``, and the functions that convert
  the selected layers of a model and finish their initialisation from the weights actually loaded;
* the head helpers: the logits a head returns are exactly what its training softmax sees (``beta * z``, or the
  normalised logits under ``loss_softmax="normsoftmax"``) and the loss is the cross-entropy of those logits,
  computed by one fused, chunked op (cheap even for a 50k vocabulary); ``normsoftmax_head_forward`` builds every
  variant head's ``forward`` from the stock one (same signature, stock loss replaced);
* ``NormSoftmaxPreTrainedMixin``, the behaviour every variant model class shares (attention choice, conversion,
  init after loading, refusal of checkpoints of another architecture).

Using NormSoftmax attention in any stock model that goes through transformers' attention interface:

```python
>>> import hf_normsoftmax  # registers "normsoftmax"
>>> from transformers import AutoModelForCausalLM
>>> model = AutoModelForCausalLM.from_pretrained("path/to/llama", attn_implementation="normsoftmax")
```

Such a stock model has no flags: it uses ``normsoftmax_gamma`` etc. from its config when present, else the
package defaults.

Diagnostics hook: if an attention module has a non-None attribute ``_normsoftmax_recorder``, it is called as
``recorder(module=..., query=..., key=..., attention_mask=<4D bool (True = attend) or None>, is_causal=...,
scaling=..., softmax="normsoftmax" | "softmax", gamma=..., max_temperature=..., eps=...)`` before every attention
computation, with the exact inputs the attention is computed from.
"""

from __future__ import annotations

import contextvars
import fnmatch
import inspect
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .attention import normsoftmax_attention, normsoftmax_attention_reference, valid_from_mask
from .configuration_normsoftmax import DEFAULT_NORMSOFTMAX_GAMMA, NORMSOFTMAX_FLAGS, check_flag_combination
from .losses import inverse_temperature_cross_entropy
from .normsoftmax import GAMMA_RANGE, normalize_logits
from .sigma_reparam import SigmaReparamConv2d, SigmaReparamLinear, SigmaReparamMixin, sigma_reparam_

try:  # private: tells whether a model forward is collecting attention weights (GPT-2 drops output_attentions)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - other transformers versions
    _active_collector = None

logger = logging.get_logger(__name__)

ATTENTION_IMPLEMENTATION = "normsoftmax"
REFERENCE_ATTENTION_IMPLEMENTATION = "normsoftmax_reference"
# Name of the learnable per-head gamma on attention modules (the loader renames keys containing "gamma"/"beta").
LEARNABLE_GAMMA_PARAMETER = "normsoftmax_scale"
# Learned gammas are clamped into GAMMA_RANGE where the attention uses them (the parameter keeps its value): a
# gamma <= 0 would invert or flatten the attention, and the math is only finite for gammas inside the range.
MIN_LEARNED_GAMMA, MAX_LEARNED_GAMMA = GAMMA_RANGE
RECORDER_ATTRIBUTE = "_normsoftmax_recorder"
# State-dict entries a stock checkpoint does not have; initialised after loading (see finish_normsoftmax_init).
NEW_KEY_PATTERNS = (r"\.reparam_scale$", r"\.reparam_u$", r"\.reparam_v$", rf"\.{LEARNABLE_GAMMA_PARAMETER}$")
_NEW_KEY = re.compile("|".join(NEW_KEY_PATTERNS))
REPARAM_STATE_NAMES = ("reparam_scale", "reparam_u", "reparam_v")

# Requests a variant accepts for `attn_implementation`, and what it runs for them.
VARIANT_ATTN_IMPLEMENTATIONS = {
    None: ATTENTION_IMPLEMENTATION,
    "sdpa": ATTENTION_IMPLEMENTATION,
    ATTENTION_IMPLEMENTATION: ATTENTION_IMPLEMENTATION,
    "eager": REFERENCE_ATTENTION_IMPLEMENTATION,
    REFERENCE_ATTENTION_IMPLEMENTATION: REFERENCE_ATTENTION_IMPLEMENTATION,
}

# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------


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


def _softmax_attention_reference(query, key, value, attention_mask, is_causal, scaling, dropout):
    """Plain softmax attention with materialised weights (for `output_attentions` and the eager request).

    Rows without any valid key give zeros, as NormSoftmax attention does.
    """
    B, H, L, D = query.shape
    S = key.shape[-2]
    if key.shape[1] != H:
        key = key.repeat_interleave(H // key.shape[1], dim=1)
        value = value.repeat_interleave(H // value.shape[1], dim=1)
    compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    logits = torch.matmul(query.to(compute_dtype), key.to(compute_dtype).transpose(-1, -2)) * scaling
    valid = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            valid = attention_mask
        else:
            valid = valid_from_mask(attention_mask)
            logits = logits + torch.where(valid, attention_mask.to(compute_dtype), 0.0)
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril(diagonal=S - L)
        valid = causal if valid is None else valid & causal
    if valid is not None:
        logits = logits.masked_fill(~valid, torch.finfo(compute_dtype).min)
    weights = torch.softmax(logits, dim=-1)
    if valid is not None:
        weights = weights.masked_fill(~valid.any(dim=-1, keepdim=True), 0.0)
    probs = F.dropout(weights, p=dropout) if dropout > 0 else weights
    out = torch.matmul(probs, value.to(compute_dtype)).to(query.dtype)
    return out, weights.to(query.dtype)


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
        out, weights = _softmax_attention_reference(query, key, value, attention_mask, causal, scaling, dropout)
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


def resolve_variant_attn_implementation(requested: str | None) -> str:
    """Map an ``attn_implementation`` request on a variant to what it runs: never plain softmax silently.

    ``None``/``"sdpa"``/``"normsoftmax"`` -> ``"normsoftmax"``; ``"eager"``/``"normsoftmax_reference"`` ->
    ``"normsoftmax_reference"`` (materialised path). Anything else (flash, flex, kernels) raises.
    """
    if isinstance(requested, str) or requested is None:
        resolved = VARIANT_ATTN_IMPLEMENTATIONS.get(requested)
        if resolved is not None:
            return resolved
    allowed = ", ".join(repr(k) for k in VARIANT_ATTN_IMPLEMENTATIONS)
    raise ValueError(
        f"Invalid value for `attn_implementation`: {requested!r}. NormSoftmax variants always run their attention "
        f"through {ATTENTION_IMPLEMENTATION!r} (the `attention_softmax` flag chooses softmax or NormSoftmax). "
        f"Allowed: {allowed}."
    )


# ---------------------------------------------------------------------------------------------------------------
# heads: the logits the training softmax sees, and their losses
# ---------------------------------------------------------------------------------------------------------------


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _in_dtype_if_finite(computed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Head logits computed in float32 from ``dtype`` (half) logits, returned in ``dtype`` when they fit, else in
    float32: ``beta * z`` beyond 65504 would turn into inf in float16. Under torch.compile (no data-dependent
    branch in a graph) half logits always come back in float32."""
    if computed.dtype == dtype:
        return computed
    if torch.compiler.is_compiling():
        return computed
    narrow = computed.to(dtype)
    return computed if bool(torch.isinf(narrow).any()) else narrow


def training_logits(logits: torch.Tensor, config: Any, dim: int = -1) -> torch.Tensor:
    """The logits the training softmax of a head sees, from the raw head outputs ``z``.

    ``loss_softmax="normsoftmax"``: ``normalize_logits(z, gamma=loss_normsoftmax_gamma)`` over ``dim`` (the
    classes); otherwise ``beta * z`` with ``beta = logit_inverse_temperature`` (``z`` itself for beta 1).
    Half-precision logits are transformed in float32 and returned in their dtype, or in float32 where that dtype
    would overflow (e.g. ``beta * z`` beyond 65504 in float16).
    """
    normalize = getattr(config, "loss_softmax", "softmax") == "normsoftmax"
    beta = getattr(config, "logit_inverse_temperature", 1.0)
    if not normalize and beta == 1.0:
        return logits
    wide = logits.float() if logits.dtype in _HALF_DTYPES else logits
    if normalize:
        computed = normalize_logits(wide, dim=dim, gamma=config.loss_normsoftmax_gamma)
    else:
        computed = wide * beta
    return _in_dtype_if_finite(computed, logits.dtype)


# Logits per chunk of the fused head op (1 MB in float32): a chunk's intermediate passes stay in cache. Measured
# on a 1024 x 50257 LM head (CPU, 1 thread): normalise + cross-entropy 2.1 s fused vs 6.2 s as separate ops
# (plain cross-entropy: 1.5 s).
_HEAD_CHUNK_ELEMENTS = 1 << 18
HEAD_NORMSOFTMAX_EPS = 1e-6


class _HeadSoftmaxCrossEntropy(torch.autograd.Function):
    """Fused ``z -> (z', CE(z', target))`` with ``z' = beta * z`` or ``z' = gamma * (z - mean) / std``.

    Same values as :func:`training_logits` followed by a cross-entropy of the returned logits, but computed
    over chunks of rows: per chunk, every pass over the logits stays in cache, so the whole op reads and writes
    the (rows x classes) logits about as often as the plain cross-entropy does. That matters for language-model
    heads, where normalising 50k-wide rows with separate tensor ops costs several times the cross-entropy.

    Backward, with ``G`` the gradient reaching ``z'`` (from the loss and from any use of the returned logits):
    ``dz = beta * G``, or for the normalisation ``dz = (gamma / sigma) * (G - mean(G) - z' * mean(G * z') / gamma^2)``
    (``sigma = sqrt(var(z) + eps)``, means over the row).

    Half-precision logits are computed in float32 and returned in their dtype; the loss is the float32
    cross-entropy of those returned (rounded) logits. Where the half dtype would overflow (``beta * z`` beyond
    65504 in float16), everything is recomputed with float32 logits, which are returned: the loss always sees
    exactly the returned logits, and stays finite wherever stock's float32-upcast loss is.
    """

    @staticmethod
    def forward(ctx, logits, target, factor, normalize, ignore_index, divisor):
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        chunk = max(1, _HEAD_CHUNK_ELEMENTS // max(logits.shape[1], 1))
        settings = (target, factor, normalize, ignore_index, chunk)
        out, lse, sigma, loss, overflow = _HeadSoftmaxCrossEntropy._rows(logits, *settings, logits.dtype)
        if overflow is not None and bool(overflow):
            out, lse, sigma, loss, _ = _HeadSoftmaxCrossEntropy._rows(logits, *settings, compute_dtype)
        ctx.save_for_backward(out, target, lse, sigma, divisor)
        ctx.factor, ctx.normalize, ctx.ignore_index, ctx.chunk = factor, normalize, ignore_index, chunk
        ctx.input_dtype = logits.dtype
        ctx.set_materialize_grads(False)
        return out, loss / divisor.to(compute_dtype)

    @staticmethod
    def _rows(logits, target, factor, normalize, ignore_index, chunk, out_dtype):
        """The forward over chunks of rows, returning logits in ``out_dtype``: (out, lse, sigma, loss sum,
        overflow), ``overflow`` a bool tensor (None for float32 / float64 output) telling whether rounding to
        ``out_dtype`` produced an inf."""
        rows, classes = logits.shape
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        out = torch.empty(rows, classes, dtype=out_dtype, device=logits.device)
        lse = torch.empty(rows, dtype=compute_dtype, device=logits.device)
        sigma = torch.empty(rows, 1, dtype=compute_dtype, device=logits.device) if normalize else None
        loss = torch.zeros((), dtype=compute_dtype, device=logits.device)
        overflow = None
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            z = logits[start:stop].to(compute_dtype)
            # chunk-sized temporaries (they stay in cache), then one copy into the output rows; no `out=` into
            # views of the output, which torch.compile does not propagate to the returned tensor
            if normalize:
                seen = z - z.mean(dim=-1, keepdim=True)
                variance = torch.linalg.vector_norm(seen, dim=-1, keepdim=True).square_().div_(classes)
                spread = variance.add_(HEAD_NORMSOFTMAX_EPS).sqrt_()
                sigma[start:stop] = spread
                seen.mul_(factor / spread)
            else:
                seen = z * factor
            out[start:stop] = seen
            if out.dtype != compute_dtype:
                seen = out[start:stop].to(compute_dtype)  # the loss is the cross-entropy of the logits returned
                # accumulated on the device: one host sync per call, not per chunk
                rounded_to_inf = torch.isinf(seen).any()
                overflow = rounded_to_inf if overflow is None else overflow | rounded_to_inf
            row_lse = torch.logsumexp(seen, dim=-1)
            lse[start:stop] = row_lse
            labels = target[start:stop]
            valid = labels != ignore_index
            # ignored rows gather class 0 (their term is dropped); any other bad label raises, as in F.cross_entropy
            picked = seen.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
            loss = loss + torch.where(valid, row_lse - picked, 0.0).sum()
        return out, lse, sigma, loss, overflow

    @staticmethod
    def backward(ctx, grad_out, grad_loss):
        if grad_out is None and grad_loss is None:
            return None, None, None, None, None, None
        out, target, lse, sigma, divisor = ctx.saved_tensors
        factor, chunk = ctx.factor, ctx.chunk
        rows, classes = out.shape
        compute_dtype = lse.dtype
        grad_logits = torch.empty(rows, classes, dtype=ctx.input_dtype, device=out.device)
        loss_weight = None if grad_loss is None else grad_loss.to(compute_dtype) / divisor.to(compute_dtype)
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            seen = out[start:stop].to(compute_dtype)
            if loss_weight is not None:
                # d loss / d seen = (softmax(seen) - onehot(label)) * weight, zero for ignored rows
                labels = target[start:stop]
                valid = (labels != ctx.ignore_index).unsqueeze(-1)
                grad = (seen - lse[start:stop].unsqueeze(-1)).exp_()
                grad.scatter_add_(-1, torch.where(valid, labels.unsqueeze(-1), 0), -torch.ones_like(grad[:, :1]))
                grad.mul_(torch.where(valid, loss_weight, 0.0))
                if grad_out is not None:
                    grad.add_(grad_out[start:stop].to(compute_dtype))
            else:
                grad = grad_out[start:stop].to(compute_dtype, copy=True)
            if ctx.normalize:
                # dz = (gamma / sigma) * (G - mean(G) - seen * mean(G * seen) / gamma^2)
                mean_grad = grad.mean(dim=-1, keepdim=True)
                mean_grad_seen = torch.linalg.vecdot(grad, seen, dim=-1).unsqueeze(-1).div_(classes * factor**2)
                grad.sub_(mean_grad).addcmul_(seen, mean_grad_seen, value=-1.0).mul_(factor / sigma[start:stop])
            else:
                grad.mul_(factor)
            grad_logits[start:stop] = grad
        return grad_logits, None, None, None, None, None


def _uses_default_head_softmax(config: Any) -> bool:
    beta = getattr(config, "logit_inverse_temperature", 1.0)
    return getattr(config, "loss_softmax", "softmax") == "softmax" and beta == 1.0


def head_logits_and_loss(
    raw_logits: torch.Tensor,
    labels: torch.Tensor | None,
    config: Any,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits a head returns and their cross-entropy against ``labels``.

    ``raw_logits (..., C)`` are the head's outputs ``z``; the returned logits are :func:`training_logits` of them
    (the raw logits themselves with the default flags, so a variant without flags computes the stock loss
    exactly). ``labels (...)`` are class indices, ``ignore_index`` ignored; ``None`` gives no loss. The loss is
    the mean over non-ignored labels, or with ``num_items_in_batch`` their sum divided by it (transformers'
    gradient-accumulation semantics). With a flag on, logits and loss come from one fused op
    (``_HeadSoftmaxCrossEntropy``), several times cheaper than separate ops for a 50k vocabulary. Half-precision
    logits are transformed in float32; the returned logits keep the half dtype unless it would overflow, then they
    are float32 (see :func:`training_logits`): the loss is always the float32 cross-entropy of the returned logits.
    """
    if labels is None:
        return training_logits(raw_logits, config), None
    if _uses_default_head_softmax(config):
        return raw_logits, head_cross_entropy(raw_logits, labels, num_items_in_batch, ignore_index)
    if torch.compiler.is_compiling():
        # Inductor fuses the separate ops itself; and compiling the chunked op lets the backward overwrite the
        # returned logits (their buffer is reused), so it is for eager mode only.
        logits = training_logits(raw_logits, config)
        return logits, head_cross_entropy(logits, labels, num_items_in_batch, ignore_index)
    normalize = getattr(config, "loss_softmax", "softmax") == "normsoftmax"
    factor = float(config.loss_normsoftmax_gamma if normalize else config.logit_inverse_temperature)
    shape = raw_logits.shape
    flat = raw_logits.reshape(-1, shape[-1])
    target = labels.reshape(-1).to(flat.device)
    if num_items_in_batch is None:
        divisor = (target != ignore_index).sum()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=flat.device)
    logits, loss = _HeadSoftmaxCrossEntropy.apply(flat, target, factor, normalize, ignore_index, divisor)
    return logits.view(shape), loss


def head_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy of already-transformed head logits ``(..., C)`` against class labels ``(...)``.

    Half-precision logits are upcast; with ``num_items_in_batch`` the sum over non-ignored items is divided by it
    (transformers' gradient-accumulation semantics).
    """
    num_classes = logits.shape[-1]
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return inverse_temperature_cross_entropy(
        logits.reshape(-1, num_classes),
        labels.reshape(-1).to(logits.device),
        ignore_index=ignore_index,
        beta=1.0,
        num_items_in_batch=num_items_in_batch,
    )


def causal_lm_head(
    raw_logits: torch.Tensor,
    labels: torch.Tensor | None,
    config: Any,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits ``(B, L, V)`` and next-token loss of a causal LM head; labels are shifted inside (as transformers
    does: padded with ``ignore_index`` on the right, so the logits are never sliced or copied), or given already
    shifted as ``shift_labels``."""
    if shift_labels is None and labels is not None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return head_logits_and_loss(raw_logits, shift_labels, config, num_items_in_batch, ignore_index)


def _reduce(loss_sum: torch.Tensor, count: int, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return loss_sum / count
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch


def resolve_problem_type(config: Any, num_labels: int, labels: torch.Tensor | None) -> str:
    """transformers' rule for sequence classification heads (and it records the choice in the config likewise)."""
    if config.problem_type is not None:
        return config.problem_type
    if labels is None:
        return "regression" if num_labels == 1 else "single_label_classification"
    if num_labels == 1:
        config.problem_type = "regression"
    elif labels.dtype in (torch.long, torch.int):
        config.problem_type = "single_label_classification"
    else:
        config.problem_type = "multi_label_classification"
    return config.problem_type


def sequence_classification_head(
    raw_logits: torch.Tensor,
    labels: torch.Tensor | None,
    config: Any,
    num_labels: int,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and loss of a (sequence or image) classification head, per problem type.

    * single-label classification: logits = :func:`training_logits`, loss = their cross-entropy;
    * multi-label classification (sigmoid per label): logits = ``beta * z``, loss = BCE-with-logits of those;
      ``loss_softmax="normsoftmax"`` is refused (there is no softmax over the labels to normalise);
    * regression (``num_labels == 1`` or ``problem_type="regression"``): outputs are values, not logits; they are
      returned unchanged with the stock MSE loss, whatever the flags.
    """
    problem_type = resolve_problem_type(config, num_labels, labels)
    if problem_type == "regression":
        logits = raw_logits
    elif problem_type == "multi_label_classification":
        if getattr(config, "loss_softmax", "softmax") == "normsoftmax":
            raise ValueError(
                "Invalid combination: `loss_softmax`='normsoftmax' with `problem_type`='multi_label_classification'. "
                "Multi-label heads use one sigmoid per label, there is no softmax over the labels to normalise. "
                "Allowed: `loss_softmax`='softmax' (optionally with `logit_inverse_temperature`) for multi-label heads."
            )
        beta = getattr(config, "logit_inverse_temperature", 1.0)
        wide = raw_logits.float() if raw_logits.dtype in _HALF_DTYPES else raw_logits
        logits = raw_logits if beta == 1.0 else _in_dtype_if_finite(wide * beta, raw_logits.dtype)
    elif problem_type == "single_label_classification":
        if labels is None:
            return training_logits(raw_logits, config), None
        return head_logits_and_loss(
            raw_logits.view(-1, num_labels), labels.to(raw_logits.device).view(-1), config, num_items_in_batch
        )
    else:
        raise ValueError(
            f"Invalid value for `problem_type`: {problem_type!r}. Allowed: 'regression', "
            "'single_label_classification' or 'multi_label_classification'."
        )
    if labels is None:
        return logits, None
    labels = labels.to(logits.device)
    float_logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if problem_type == "regression":
        if num_labels == 1:
            squared = F.mse_loss(float_logits.squeeze(), labels.squeeze().to(float_logits.dtype), reduction="sum")
            count = max(labels.squeeze().numel(), 1)
        else:
            squared = F.mse_loss(float_logits, labels.to(float_logits.dtype), reduction="sum")
            count = max(labels.numel(), 1)
        return logits, _reduce(squared, count, num_items_in_batch)
    bce = F.binary_cross_entropy_with_logits(float_logits, labels.to(float_logits.dtype), reduction="sum")
    return logits, _reduce(bce, max(labels.numel(), 1), num_items_in_batch)


def question_answering_head(
    raw_start_logits: torch.Tensor,
    raw_end_logits: torch.Tensor,
    start_positions: torch.Tensor | None,
    end_positions: torch.Tensor | None,
    config: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Start/end logits ``(batch, seq_len)`` as the training softmax over positions sees them, and the loss.

    The loss is the mean of the two cross-entropies; positions outside the sequence are ignored, as in the stock
    question-answering heads.
    """
    if start_positions is None or end_positions is None:
        return training_logits(raw_start_logits, config), training_logits(raw_end_logits, config), None
    if start_positions.dim() > 1:
        start_positions = start_positions.squeeze(-1)
    if end_positions.dim() > 1:
        end_positions = end_positions.squeeze(-1)
    ignored_index = raw_start_logits.size(1)
    start_positions = start_positions.clamp(0, ignored_index)
    end_positions = end_positions.clamp(0, ignored_index)
    start_logits, start_loss = head_logits_and_loss(raw_start_logits, start_positions, config, None, ignored_index)
    end_logits, end_loss = head_logits_and_loss(raw_end_logits, end_positions, config, None, ignored_index)
    return start_logits, end_logits, (start_loss + end_loss) / 2


def pop_loss_kwargs(kwargs: dict) -> dict:
    """Remove the loss-only keyword arguments (Trainer passes ``num_items_in_batch``) before the backbone call."""
    return {name: kwargs.pop(name) for name in ("num_items_in_batch", "ignore_index", "shift_labels") if name in kwargs}


# What a head's training softmax runs over, and its loss (see `head_outputs`).
HEAD_KINDS = ("cross_entropy", "causal_lm", "sequence_classification", "question_answering")
# The target arguments of the stock head forwards; the variant forward takes them out of the stock call.
_HEAD_TARGETS = ("labels", "start_positions", "end_positions")


def head_outputs(model: PreTrainedModel, outputs: Any, head: str, targets: dict, loss_kwargs: dict) -> dict:
    """The output fields a variant head replaces: its logits as the training softmax sees them, and their loss.

    ``outputs`` is the stock head's output (computed without targets), ``targets`` its target arguments by name,
    ``loss_kwargs`` what :func:`pop_loss_kwargs` took out. ``head`` is one of:

    * ``"cross_entropy"``: ``logits (..., C)`` against ``labels (...)`` (masked LM, token classification,
      multiple choice), via :func:`head_logits_and_loss`;
    * ``"causal_lm"``: next-token loss with the labels shifted inside, via :func:`causal_lm_head`;
    * ``"sequence_classification"``: per problem type, via :func:`sequence_classification_head`;
    * ``"question_answering"``: start/end logits over the positions, via :func:`question_answering_head`.
    """
    config = model.config
    num_items_in_batch = loss_kwargs.get("num_items_in_batch")
    ignore_index = loss_kwargs.get("ignore_index", -100)
    if head == "question_answering":
        start_logits, end_logits, loss = question_answering_head(
            outputs.start_logits, outputs.end_logits, targets["start_positions"], targets["end_positions"], config
        )
        return {"loss": loss, "start_logits": start_logits, "end_logits": end_logits}
    labels = targets["labels"]
    if head == "cross_entropy":
        logits, loss = head_logits_and_loss(outputs.logits, labels, config, num_items_in_batch, ignore_index)
    elif head == "causal_lm":
        shift_labels = loss_kwargs.get("shift_labels")
        logits, loss = causal_lm_head(outputs.logits, labels, config, num_items_in_batch, ignore_index, shift_labels)
    elif head == "sequence_classification":
        num_labels = model.num_labels
        logits, loss = sequence_classification_head(outputs.logits, labels, config, num_labels, num_items_in_batch)
    else:
        raise ValueError(f"Invalid value for `head`: {head!r}. Allowed: {', '.join(map(repr, HEAD_KINDS))}.")
    return {"loss": loss, "logits": logits}


def normsoftmax_head_forward(stock_forward, head: str, *, no_cache_with_labels: bool = False):
    """The ``forward`` of a variant head class, built from the ``forward`` of the stock head class.

    It calls the stock forward without the targets (so the stock loss is never computed), then returns the stock
    output with the logits replaced by what the training softmax sees and ``loss`` set to their cross-entropy
    (:func:`head_outputs`); hidden states, attentions and cache are passed through. The signature shown is the stock
    one (Trainer, ``generate`` and pipelines read it to choose their inputs), ``return_dict=False`` gives a tuple.
    ``no_cache_with_labels``: with labels, run the stock forward with ``use_cache=False``, as a stock head that
    drops the cache when it gets labels (``BertLMHeadModel``) would have.

    ```python
    >>> class NormSoftmaxBertForMaskedLM(NormSoftmaxBertPreTrainedMixin, BertForMaskedLM):
    ...     forward = normsoftmax_head_forward(BertForMaskedLM.forward, "cross_entropy")
    ```
    """
    if head not in HEAD_KINDS:
        raise ValueError(f"Invalid value for `head`: {head!r}. Allowed: {', '.join(map(repr, HEAD_KINDS))}.")
    parameters = list(inspect.signature(stock_forward).parameters.values())[1:]  # without `self`
    positional = tuple(p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
    target_names = tuple(name for name in _HEAD_TARGETS if name in positional)

    def forward(self, *args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"forward() takes at most {len(positional)} positional arguments, {len(args)} given")
        for name, value in zip(positional, args, strict=False):  # the arguments given by position
            if name in kwargs:
                raise TypeError(f"forward() got multiple values for argument {name!r}")
            kwargs[name] = value
        targets = {name: kwargs.pop(name, None) for name in target_names}
        loss_kwargs = pop_loss_kwargs(kwargs)
        if no_cache_with_labels and targets["labels"] is not None:
            kwargs["use_cache"] = False
        outputs = stock_forward(self, return_dict=True, **kwargs)
        return type(outputs)(**{**outputs, **head_outputs(self, outputs, head, targets, loss_kwargs)})

    forward.__wrapped__ = stock_forward  # `inspect.signature` follows it: the stock signature is shown
    forward.__doc__ = (
        f"`{stock_forward.__qualname__}` with the NormSoftmax head: the logits returned are what the training "
        f"softmax sees and `loss` is their cross-entropy.\n{stock_forward.__doc__ or ''}"
    )
    return can_return_tuple(forward)


# ---------------------------------------------------------------------------------------------------------------
# sigmaReparam
# ---------------------------------------------------------------------------------------------------------------


class SigmaReparamConv1D(SigmaReparamMixin, Conv1D):
    """GPT-2's ``Conv1D`` (weight stored ``(in, out)``) with sigmaReparam: ``y = x @ (s / sigma(W)) W + b``.

    Keeps the stock parameter names ``weight``/``bias`` and adds ``reparam_scale`` and the power-iteration buffers
    ``reparam_u``/``reparam_v``, so stock GPT-2 checkpoints load 1:1. Same constructor as ``Conv1D``.

    Example:

    ```python
    >>> layer = SigmaReparamConv1D(96, 32)  # 32 -> 96 features, like Conv1D(nf=96, nx=32)
    >>> y = layer(torch.randn(2, 5, 32))
    >>> converted = SigmaReparamConv1D.from_module(Conv1D(96, 32))  # in place, outputs unchanged
    ```
    """

    weight_layout = "in_out"

    def __repr__(self) -> str:
        return f"SigmaReparamConv1D(nf={self.nf}, nx={self.nx})"


# Converted layer classes, one per stock layer class (exact type).
SIGMA_REPARAM_LAYER_TYPES = (SigmaReparamLinear, SigmaReparamConv2d, SigmaReparamConv1D)


def apply_sigma_reparam(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[str]:
    """Convert the selected ``nn.Linear`` / GPT-2 ``Conv1D`` / ``nn.Conv2d`` layers of ``model`` in place.

    ``include``/``exclude``: fnmatch patterns over qualified module names (``None`` includes every layer).
    Modules stay the same objects (tied weights stay tied, state-dict keys stay stock). Returns the converted
    names; warns about include patterns that select nothing.
    """
    names = sigma_reparam_(model, include=include, exclude=exclude, layer_types=SIGMA_REPARAM_LAYER_TYPES)
    if include is not None:
        unused = [p for p in include if not any(fnmatch.fnmatchcase(name, p) for name in names)]
        if unused:
            logger.warning(f"`sigma_reparam_include` patterns {unused} select no layer of {type(model).__name__}.")
    return names


# ---------------------------------------------------------------------------------------------------------------
# model preparation and post-loading initialisation
# ---------------------------------------------------------------------------------------------------------------


def _is_meta(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.device.type == "meta"


def _loaded(tensor: torch.Tensor | None) -> bool:
    # transformers flags every tensor it loads from a checkpoint (and tied ones) with `_is_hf_initialized`
    return tensor is not None and bool(getattr(tensor, "_is_hf_initialized", False))


def add_learnable_gamma(model: nn.Module, attention_classes: tuple[type, ...], config: Any) -> int:
    """Give every attention module a per-head gamma parameter ``normsoftmax_scale`` (heads, 1, 1)."""
    count = 0
    for module in model.modules():
        if isinstance(module, attention_classes) and getattr(module, LEARNABLE_GAMMA_PARAMETER, None) is None:
            num_heads = config.num_attention_heads
            device = next(module.parameters()).device
            value = torch.full((num_heads, 1, 1), float(config.normsoftmax_gamma), device=device)
            module.register_parameter(LEARNABLE_GAMMA_PARAMETER, nn.Parameter(value))
            count += 1
    return count


def _reparam_shape_changed(module: SigmaReparamMixin) -> bool:
    out_features, in_features = _weight_matrix_shape(module)
    return tuple(module.reparam_v.shape) != (out_features,) or tuple(module.reparam_u.shape) != (in_features,)


def _weight_matrix_shape(module: SigmaReparamMixin) -> tuple[int, int]:
    weight = module.weight
    if module.weight_layout == "in_out":
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], weight[0].numel()


@torch.no_grad()
def _refit_resized_reparam(module: SigmaReparamMixin) -> None:
    """The weight of a converted layer was replaced by one of another shape (``resize_token_embeddings`` on a tied
    head): rebuild ``u``, ``v`` for the new weight and keep the layer's function on the old rows.

    The effective weight was ``(s / sigma_old) W_old``; resizing keeps the old rows as a prefix, so the new scale
    is ``(s / sigma_old) * sigma_new`` (same factor on every row). ``sigma_old`` is re-evaluated from the old
    vectors on that prefix; where that is not possible the layer restarts at ``s = sigma`` (factor 1).
    """
    factor = None
    old_u, old_v, old_scale = module.reparam_u, module.reparam_v, module.reparam_scale.detach().clone()
    out_features, in_features = _weight_matrix_shape(module)
    if module.weight_layout == "out_in" and old_u.shape[0] == in_features and old_v.shape[0] <= out_features:
        old_rows = module.weight.detach()[: old_v.shape[0]].to(old_u.dtype)
        old_sigma = torch.dot(old_v, torch.mv(old_rows, old_u))
        if float(old_sigma) > 0:
            factor = old_scale / old_sigma
    else:
        logger.warning(f"{type(module).__name__}: weight reshaped, sigmaReparam state restarted at scale = sigma.")
    requires_grad = module.reparam_scale.requires_grad
    del module.reparam_scale, module.reparam_u, module.reparam_v
    module._setup_reparam()  # new buffers sized for the new weight, reset from it
    module.reparam_scale.requires_grad_(requires_grad)
    if factor is not None:
        module.reparam_scale.mul_(factor.to(module.reparam_scale.dtype))
    module._normsoftmax_init_done = True


def finish_normsoftmax_init(model: nn.Module) -> None:
    """Initialise what loading did not provide, from the final weights (after loading and weight tying).

    * sigmaReparam layers whose ``reparam_scale`` was not loaded: ``reset_reparam()`` from the current weight
      (the loaded one, or the tied embedding for a tied head), so a converted stock checkpoint computes exactly
      the stock function; likewise layers whose weight was not loaded (a head re-initialised by
      ``ignore_mismatched_sizes``): a loaded scale belongs to the checkpoint's weight, not to the new one;
    * learnable gammas that were not loaded: ``normsoftmax_gamma``;
    * sigmaReparam weights and u/v buffers mapped from the checkpoint file off the 64-byte boundary are moved to a
      fresh allocation (the layer would otherwise make an aligned copy in every forward, for bit-exact results).

    Runs once per tensor: later calls (e.g. ``tie_weights()`` after ``resize_token_embeddings``) never reset
    trained values. Layers still on the meta device are left for the call at the end of ``from_pretrained``.
    """
    config = getattr(model, "config", None)
    for module in model.modules():
        if isinstance(module, SigmaReparamMixin) and not _is_meta(module.weight):
            module._align_storage()  # mapped from the checkpoint file: no aligned copy in every forward
        if isinstance(module, SigmaReparamMixin) and not _is_meta(module.weight) and _reparam_shape_changed(module):
            _refit_resized_reparam(module)
        if isinstance(module, SigmaReparamMixin) and not getattr(module, "_normsoftmax_init_done", False):
            if _is_meta(module.weight) or _is_meta(module.reparam_scale):
                continue
            if _loaded(module.reparam_scale) and _loaded(module.weight):
                if not (_loaded(module.reparam_u) and _loaded(module.reparam_v)):
                    # scale from the checkpoint, vectors not: rebuild only the power-iteration state
                    loaded_scale = module.reparam_scale.detach().clone()
                    module.reset_reparam()
                    with torch.no_grad():
                        module.reparam_scale.copy_(loaded_scale)
            else:
                module.reset_reparam()
            module._normsoftmax_init_done = True
        learned_gamma = getattr(module, LEARNABLE_GAMMA_PARAMETER, None)
        if isinstance(learned_gamma, nn.Parameter) and not getattr(module, "_normsoftmax_gamma_init_done", False):
            if _is_meta(learned_gamma):
                continue
            if not _loaded(learned_gamma):
                with torch.no_grad():
                    learned_gamma.fill_(float(getattr(config, "normsoftmax_gamma", DEFAULT_NORMSOFTMAX_GAMMA)))
            module._normsoftmax_gamma_init_done = True


def reset_normsoftmax_state(model: nn.Module) -> None:
    """Re-initialise every sigmaReparam layer from its current weight and every learnable gamma to the config value.

    Unlike :func:`finish_normsoftmax_init` this always resets (it is for weights copied in after construction,
    e.g. by ``load_state_dict`` of a stock state dict). Trained scales and gammas are lost.
    """
    gamma = float(getattr(getattr(model, "config", None), "normsoftmax_gamma", DEFAULT_NORMSOFTMAX_GAMMA))
    for module in model.modules():
        if isinstance(module, SigmaReparamMixin):
            module.reset_reparam()
            module._normsoftmax_init_done = True
        learned_gamma = getattr(module, LEARNABLE_GAMMA_PARAMETER, None)
        if isinstance(learned_gamma, nn.Parameter):
            with torch.no_grad():
                learned_gamma.fill_(gamma)
            module._normsoftmax_gamma_init_done = True


def _checkpoint_config_dict(path, kwargs: dict) -> dict | None:
    """The config.json of the checkpoint ``path`` as a dict (``from_pretrained``'s Hub arguments honoured), or None."""
    hub_kwargs = {
        k: kwargs[k]
        for k in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "gguf_file")
        if k in kwargs
    }
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(path, **hub_kwargs)
    except (OSError, ValueError):
        return None
    return config_dict


def _missing_state(
    model: nn.Module,
    sigma_reparam: bool,
    learnable_gamma: bool,
    converted: Callable[[str], bool],
    loaded: Callable[[str], bool],
    same_class: bool,
) -> list[str]:
    """The new entries of ``model`` a source with these features should have held, but did not.

    ``converted(name)``: whether the source converted the sigmaReparam layer ``name``; ``same_class``: whether the
    source was saved by the class of ``model``. A layer's entries are required when its ``weight`` was loaded; an
    attention module's gamma when any of its weights was. A head tied to an embedding (GPT-2's ``lm_head``) gets
    its weight from the embedding: its entries are required only when the source had the head, that is when it
    comes from the same class or holds another entry of the head (a base model's checkpoint has no head).
    """
    if not (sigma_reparam or learnable_gamma):
        return []
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})

    def weight_loaded(dot_name: str) -> bool:
        key = f"{dot_name}weight"
        source = tied.get(key)
        if source is None:
            return loaded(key)
        if not (loaded(key) or loaded(source)):
            return False
        return same_class or any(loaded(f"{dot_name}{entry}") for entry in ("bias", *REPARAM_STATE_NAMES))

    weight_keys = [key for key in model.state_dict() if not _NEW_KEY.search(key)]
    missing = []
    for name, module in model.named_modules():
        dot_name = f"{name}." if name else ""
        if sigma_reparam and isinstance(module, SigmaReparamMixin) and weight_loaded(dot_name) and converted(name):
            missing += [f"{dot_name}{state}" for state in REPARAM_STATE_NAMES if not loaded(f"{dot_name}{state}")]
        if learnable_gamma and isinstance(getattr(module, LEARNABLE_GAMMA_PARAMETER, None), nn.Parameter):
            key = f"{dot_name}{LEARNABLE_GAMMA_PARAMETER}"
            if not loaded(key) and any(loaded(k) for k in weight_keys if k.startswith(dot_name)):
                missing.append(key)
    return sorted(missing)


def _saved_by_class_of(model: nn.Module, checkpoint_config: dict) -> bool:
    return type(model).__name__ in (checkpoint_config.get("architectures") or ())


def _checkpoint_layer_names(model: nn.Module, name: str, checkpoint_config: dict) -> list[str]:
    """The names the layer ``name`` of ``model`` may have had in the model that saved the checkpoint: the same
    name, or with transformers' base-model prefix taken off or put on (a head loaded from a base model, or the
    reverse), unless the checkpoint's ``architectures`` name the loading class."""
    if _saved_by_class_of(model, checkpoint_config):
        return [name]
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return [name]
    if name.startswith(f"{prefix}."):
        return [name, name[len(prefix) + 1:]]
    if getattr(model, prefix, None) is None:  # a base model: the checkpoint may be a head model's
        return [name, f"{prefix}.{name}"]
    return [name]


def missing_trained_state(model: nn.Module, checkpoint_config: dict | None, loaded: Callable[[str], bool]) -> list[str]:
    """The sigmaReparam / learnable-gamma entries of ``model`` that the checkpoint should have provided, but did not.

    A checkpoint saved by a variant with ``sigma_reparam`` (``normsoftmax_learnable_gamma``) on, as its config.json
    says (a ``normsoftmax_*`` model type and the flag true), holds ``reparam_scale`` / ``reparam_u`` / ``reparam_v``
    for every layer it converted (per its ``sigma_reparam_include`` / ``_exclude``) and ``normsoftmax_scale`` for
    every attention module. Such an entry is missing trained state when the layer's (the attention module's)
    weights came from the checkpoint but the entry did not: initialising it from the loaded weights would compute
    something else than the trained model. Stock checkpoints, and variant checkpoints saved without the flag, have
    no such state: nothing is required, the entries are initialised from the loaded weights (the conversion).

    Args:
        checkpoint_config: the checkpoint's config.json as a dict (None: unknown, nothing is required).
        loaded: whether the model's state-dict entry ``key`` came from the checkpoint.
    """
    if not checkpoint_config or not str(checkpoint_config.get("model_type", "")).startswith("normsoftmax_"):
        return []
    include = checkpoint_config.get("sigma_reparam_include")
    exclude = checkpoint_config.get("sigma_reparam_exclude")

    def matches(patterns, names: Iterable[str]) -> bool:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns)

    def converted(name: str) -> bool:
        # where the name in the saving model is not certain, a layer any of its possible names excludes is not
        # required (a missing report must never be a false alarm)
        names = _checkpoint_layer_names(model, name, checkpoint_config)
        return (include is None or matches(include, names)) and not (exclude is not None and matches(exclude, names))

    return _missing_state(
        model,
        sigma_reparam=bool(checkpoint_config.get("sigma_reparam", False)),
        learnable_gamma=bool(checkpoint_config.get("normsoftmax_learnable_gamma", False)),
        converted=converted,
        loaded=loaded,
        same_class=_saved_by_class_of(model, checkpoint_config),
    )


def check_loaded_weights(model: PreTrainedModel, loading_info: dict, source: Any) -> None:
    """Refuse loads that would silently compute something else than the checkpoint.

    * No weight of the checkpoint matches the model: a checkpoint of another architecture.
    * The checkpoint has sigmaReparam scales / learnable gammas for layers the model loads without them: the model
      would run the raw weights instead of the trained effective ones. Entries of layers the model does not have
      at all (their weights are unexpected too, e.g. the head of a classifier loaded with ``AutoModel``) are
      dropped with those layers, as transformers drops their weights.
    """
    missing = set(loading_info.get("missing_keys", ()))
    unexpected = set(loading_info.get("unexpected_keys", ()))
    model_keys = [k for k in model.state_dict() if not _NEW_KEY.search(k)]
    if model_keys and all(k in missing for k in model_keys):
        raise ValueError(
            f"Checkpoint of another architecture: none of the {len(model_keys)} weights of "
            f"{type(model).__name__} is in the checkpoint {source!r} (it has {len(unexpected)} other weights, e.g. "
            f"{sorted(unexpected)[:3]}). Load it with the model class of its own architecture."
        )
    unexpected_weights = [k for k in unexpected if not _NEW_KEY.search(k)]

    def dropped_with_its_layer(key: str) -> bool:
        layer = key.rpartition(".")[0]
        return bool(layer) and any(k.startswith(f"{layer}.") for k in unexpected_weights)

    dropped = sorted(k for k in unexpected if _NEW_KEY.search(k) and not dropped_with_its_layer(k))
    if dropped:
        config = model.config
        raise ValueError(
            f"The checkpoint {source!r} has sigmaReparam / learnable-gamma weights the model would ignore "
            f"({dropped[:3]}...): with `sigma_reparam`={config.sigma_reparam!r} and `normsoftmax_learnable_gamma`="
            f"{config.normsoftmax_learnable_gamma!r} it would compute with the raw weights, not the trained ones. "
            "Allowed: load it with the flags it was saved with (the defaults of its config.json)."
        )


def _missing_trained_state_error(
    source: Any,
    missing: list[str],
    action: str,
    what: str = "sigmaReparam / learnable-gamma entries of layers whose weights it holds",
    allowed: str = "Allowed: a complete state dict; a stock one (none of these entries) loads with strict=False, "
    "then call hf_normsoftmax.reset_normsoftmax_state(model).",
) -> ValueError:
    """The error of a load that would lose trained state: ``missing`` are the model's entries ``source`` lacks."""
    shown = f"{missing[:8]}{' ...' if len(missing) > 8 else ''}"
    return ValueError(
        f"{action}: {source!r} lacks {len(missing)} {what}: {shown}. The model "
        f"would keep other values for them, not the trained ones (a damaged or incomplete checkpoint). {allowed}"
    )


# The config.json of the checkpoint a variant's from_pretrained is loading, for its loading hook (a context variable:
# loads in several threads, or nested loads, each see their own).
_LOADING_CHECKPOINT_CONFIG: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "normsoftmax_loading_checkpoint_config", default=None
)


_FROM_PRETRAINED_LOCK = threading.RLock()


class NormSoftmaxPreTrainedMixin:
    """Behaviour shared by every NormSoftmax variant model (put it first in the bases).

    * attention always dispatches through ``"normsoftmax"`` (``"eager"`` -> ``"normsoftmax_reference"``), which
      also serves ``attention_softmax="softmax"`` (stock SDPA), so diagnostics see every variant;
    * at construction: flag checks, sigmaReparam conversion of the selected layers, learnable gammas;
    * after loading and tying: :func:`finish_normsoftmax_init`;
    * ``from_pretrained`` refuses checkpoints of another architecture and trained sigmaReparam / gamma entries the
      model would ignore, and reports the ones a variant checkpoint lacks as missing keys;
    * ``load_state_dict(strict=False)`` (Trainer resume) refuses a variant state dict lacking such entries.

    Subclasses set ``_normsoftmax_attention_classes`` (the attention modules that get learnable gammas).
    """

    _normsoftmax_attention_classes: tuple[type, ...] = ()
    _keys_to_ignore_on_load_missing = list(NEW_KEY_PATTERNS)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        return resolve_variant_attn_implementation(requested_attention)

    def post_init(self):
        config = self.config
        # duck-typed: remote-code loading can give the config class and this mixin different module objects
        if any(not hasattr(config, flag) for flag in NORMSOFTMAX_FLAGS):
            raise TypeError(
                f"Invalid value for `config`: {type(config).__name__}. {type(self).__name__} needs a NormSoftmax "
                "variant config (NormSoftmaxViTConfig, NormSoftmaxBertConfig or NormSoftmaxGPT2Config)."
            )
        check_flag_combination(config)
        if config.sigma_reparam:
            apply_sigma_reparam(self, config.sigma_reparam_include, config.sigma_reparam_exclude)
        if config.normsoftmax_learnable_gamma:
            add_learnable_gamma(self, self._normsoftmax_attention_classes, config)
        super().post_init()
        self._keys_to_ignore_on_load_missing = set(self._keys_to_ignore_on_load_missing) | set(NEW_KEY_PATTERNS)
        # from now on the config refuses changes of the flags that decided this structure (sigma_reparam, ...)
        bind_to_model = getattr(config, "bind_to_model", None)
        if bind_to_model is not None:
            bind_to_model(self)

    def tie_weights(self, missing_keys=None, recompute_mapping: bool = True):
        super().tie_weights(missing_keys=missing_keys, recompute_mapping=recompute_mapping)
        finish_normsoftmax_init(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that refuses checkpoints of another architecture and sigmaReparam /
        learnable-gamma weights the model would ignore (:func:`check_loaded_weights`), and reports the ones a
        variant checkpoint should hold but lacks (:func:`missing_trained_state`) like any missing weight: in
        ``loading_info["missing_keys"]`` and transformers' load report. Stock checkpoints (and variant ones saved
        without the flags) are converted silently: the new entries are initialised from the loaded weights."""
        config = kwargs.get("config")
        checkpoint_config = None
        if pretrained_model_name_or_path is not None:
            # what the checkpoint was saved with (an explicit config may say otherwise)
            checkpoint_config = _checkpoint_config_dict(pretrained_model_name_or_path, kwargs)
        if isinstance(config, PreTrainedConfig) and checkpoint_config is not None and "model_type" in checkpoint_config:
            # an explicit config skips the checkpoint's config.json: check its architecture here
            cls.config_class._check_checkpoint_model_type(checkpoint_config["model_type"])
        output_loading_info = kwargs.pop("output_loading_info", False)
        context = _LOADING_CHECKPOINT_CONFIG.set(checkpoint_config)
        try:
            # transformers' from_pretrained swaps class attributes while it loads (no_tie_weights replaces
            # PreTrainedModel.tie_weights and puts back what it found): two loads in threads can leave the
            # replacement in place for the rest of the process, and every later model untied. Loads take turns.
            with _FROM_PRETRAINED_LOCK:
                model, loading_info = super().from_pretrained(
                    pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
                )
        finally:
            _LOADING_CHECKPOINT_CONFIG.reset(context)
        if pretrained_model_name_or_path is not None:
            check_loaded_weights(model, loading_info, pretrained_model_name_or_path)
        return (model, loading_info) if output_loading_info else model

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        # transformers' hook between loading (missing_keys still complete) and its load report: the new entries
        # are silenced by `_keys_to_ignore_on_load_missing` (stock checkpoints lack them); the ones the checkpoint
        # should have held are put back, so they are reported and logged like any missing weight.
        not_loaded = set(loading_info.missing_keys) | {entry[0] for entry in loading_info.mismatched_keys}
        loaded = set(self.state_dict()) - not_loaded
        lacking = missing_trained_state(self, _LOADING_CHECKPOINT_CONFIG.get(), loaded.__contains__)
        super()._adjust_missing_and_unexpected_keys(loading_info)
        loading_info.missing_keys = set(loading_info.missing_keys) | set(lacking)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that, with ``strict=False`` (how ``Trainer`` loads the checkpoint it resumes
        from), refuses a state dict of a sigmaReparam / learnable-gamma variant that holds every weight of the model
        but lacks some of these entries: the model would keep its own values for them, not the trained ones. A state
        dict with none of these entries (a stock model's) loads as before (call :func:`reset_normsoftmax_state`
        after), and so does one that lacks weights too (a shard of a sharded checkpoint, loaded one by one by
        transformers' ``load_sharded_checkpoint``: it cannot be judged alone)."""
        if not strict and self._holds_every_weight(state_dict):
            keys = set(state_dict)
            lacking = _missing_state(
                self,
                sigma_reparam=any(key.rpartition(".")[2] in REPARAM_STATE_NAMES for key in keys),
                learnable_gamma=any(key.rpartition(".")[2] == LEARNABLE_GAMMA_PARAMETER for key in keys),
                converted=lambda name: True,
                loaded=keys.__contains__,
                same_class=True,  # a state dict given to a model is taken for one of its own
            )
            if lacking:
                raise _missing_trained_state_error(
                    "the state dict", lacking, f"Invalid state dict for {type(self).__name__}.load_state_dict()"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _holds_every_weight(self, state_dict) -> bool:
        """Whether ``state_dict`` has every entry of the model's a saved checkpoint has (tied copies and
        ``_keys_to_ignore_on_save`` are not saved), sigmaReparam / gamma entries aside."""
        tied = set(getattr(self, "all_tied_weights_keys", None) or {})
        unsaved = getattr(self, "_keys_to_ignore_on_save", None)
        unsaved = re.compile("|".join(unsaved)) if unsaved else None
        return all(
            key in state_dict
            for key in self.state_dict()
            if not _NEW_KEY.search(key) and key not in tied and not (unsaved and unsaved.search(key))
        )

    # -- saving with the code, pushing to the Hub ----------------------------------------------------------------
    #: Default of ``save_pretrained(save_remote_code=...)``. Set ``model.save_remote_code = False`` to keep the code
    #: out of saves you do not call yourself (``Trainer`` checkpoints, ``trainer.push_to_hub()``).
    save_remote_code: bool = True
    _normsoftmax_auto_class_suffixes = (
        ("ForImageClassification", "AutoModelForImageClassification"),
        ("ForMaskedImageModeling", "AutoModelForMaskedImageModeling"),
        ("ForSequenceClassification", "AutoModelForSequenceClassification"),
        ("ForTokenClassification", "AutoModelForTokenClassification"),
        ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
        ("ForMultipleChoice", "AutoModelForMultipleChoice"),
        ("ForMaskedLM", "AutoModelForMaskedLM"),
        ("LMHeadModel", "AutoModelForCausalLM"),
        ("ForCausalLM", "AutoModelForCausalLM"),
    )

    @classmethod
    def normsoftmax_auto_class(cls) -> str:
        """The Auto class name written to ``auto_map`` (a ``register_for_auto_class`` choice wins)."""
        registered = getattr(cls, "_auto_class", None)
        if registered:
            return registered
        return _auto_class_by_name(cls)

    def save_pretrained(
        self, save_directory, *args, save_remote_code: bool | None = None, auto_class: str | None = None, **kwargs
    ):
        """``PreTrainedModel.save_pretrained`` that, by default, also writes the model's code and ``auto_map``, and
        replaces a checkpoint already in ``save_directory`` all-or-nothing.

        The folder then holds ``configuration_normsoftmax.py``, ``modeling_normsoftmax_*.py`` and the files they
        import, and ``config.json`` maps ``AutoConfig``, the model's Auto class and ``AutoModel`` (the base model
        class of the same file, so a fine-tuned head's encoder loads with ``AutoModel`` too) to them: with the
        package installed it loads with the package's classes (no prompt); without it, ``trust_remote_code=True``
        loads it and leaving it out gives transformers' "contains custom code ... pass trust_remote_code=True" error.

        Args:
            save_remote_code: ``False`` writes a plain folder (no code files, no ``auto_map``; it then loads only
                where hf_normsoftmax is imported). Default: the model's ``save_remote_code`` attribute (``True``).
            auto_class: the Auto class name mapped to this class in ``auto_map`` (default: the class's registered
                Auto class, or the one its name implies, e.g. ``"AutoModelForSequenceClassification"``).
            *args, **kwargs: as for ``PreTrainedModel.save_pretrained``.

        The save reads and changes no class attribute and nothing of the config instance beyond what transformers'
        own save sets (``dtype``, ``architectures``): saves in several threads at once do not affect each other.
        transformers writes into a temporary folder beside ``save_directory``; the files are then renamed into place
        (:func:`_move_into_place`): an error at any point leaves the previous checkpoint as it was, and files of
        the folder that are not part of the checkpoint are never touched.

        ``push_to_hub=True`` saves the folder as above, then uploads the model the way ``model.push_to_hub`` does
        (``hf_normsoftmax.hub.save_and_push``: one commit, the hf_normsoftmax card, code + ``auto_map``): it takes
        transformers' Hub arguments (``repo_id``, ``commit_message``, ``create_pr``, ``private``, ``token``) and
        ``push_to_hub``'s (``processing_class``, ``tags``, ``card_fields``, ...), and refuses others by name.
        Where hf_normsoftmax cannot be imported, the folder is saved, then uploaded in one commit with
        transformers' generic card (:meth:`_push_to_hub_without_package`), with a warning.
        """
        if args:  # by name from here on, so that a positional push_to_hub is seen too
            names = [
                name
                for name, p in inspect.signature(super().save_pretrained).parameters.items()
                if p.kind is p.POSITIONAL_OR_KEYWORD
            ][1:]
            if len(args) > len(names):
                raise TypeError(
                    f"save_pretrained() takes at most {len(names) + 1} positional arguments after self "
                    f"({len(args) + 1} given)"
                )
            for name, value in zip(names, args, strict=False):
                if name in kwargs:
                    raise TypeError(f"save_pretrained() got multiple values for argument {name!r}")
                kwargs[name] = value
        push = None
        if kwargs.pop("push_to_hub", False):
            hub = self._normsoftmax_hub_module("save_pretrained(push_to_hub=True)", "own upload")
            if hub is not None:
                return hub.save_and_push(
                    self, save_directory, save_remote_code=save_remote_code, auto_class=auto_class, **kwargs
                )
            self._drop_hub_only_arguments(kwargs, "save_pretrained(push_to_hub=True)")
            push = self._push_arguments_without_package(kwargs, save_directory)
        if save_remote_code is None:
            save_remote_code = getattr(self, "save_remote_code", True)
        if not isinstance(save_remote_code, bool):
            raise TypeError(f"Invalid value for `save_remote_code`: {save_remote_code!r}. Allowed: True, False, None.")
        model_class = type(self)
        if save_remote_code and model_class.__module__ == "__main__":
            logger.warning(
                f"{model_class.__name__} is defined in __main__: its code cannot be saved with the "
                "checkpoint (save_remote_code ignored)."
            )
            save_remote_code = False
        auto_map = remote_code_auto_map(model_class, type(self.config), auto_class) if save_remote_code else None
        code = remote_code_files(model_class, type(self.config)) if save_remote_code else ()
        result = _save_checkpoint(self, super().save_pretrained, save_directory, kwargs, auto_map, code)
        if push is not None and _saves_on_this_rank(self, kwargs):
            return self._push_to_hub_without_package(processing_class=None, **push)
        return result

    @staticmethod
    def _push_arguments_without_package(kwargs: dict, save_directory) -> dict:
        """``save_pretrained(push_to_hub=True)`` without the package: take transformers' Hub arguments out of
        ``kwargs`` (the save's own stay) as arguments of :meth:`_push_to_hub_without_package`; refuse others."""
        import os

        save_names = set(inspect.signature(PreTrainedModel.save_pretrained).parameters) - {"self", "token"}
        hub = {k: kwargs.pop(k) for k in list(kwargs) if k not in save_names}
        allowed = ("repo_id", "commit_message", "create_pr", "private", "token")
        refused = sorted(set(hub) - set(allowed))
        if refused:
            raise TypeError(
                f"save_pretrained(push_to_hub=True) without hf_normsoftmax does not take {refused}; allowed Hub "
                f"arguments: {list(allowed)}."
            )
        return dict(
            repo_id=hub.get("repo_id") or os.path.basename(os.path.normpath(os.fspath(save_directory))),
            commit_message=hub.get("commit_message"),
            commit_description=None,
            private=hub.get("private"),
            token=hub.get("token"),
            revision=None,
            create_pr=bool(hub.get("create_pr", False)),
            max_shard_size=kwargs.get("max_shard_size", "50GB"),
            tags=None,
        )

    @staticmethod
    def _normsoftmax_hub_module(caller: str, stock: str):
        """``hf_normsoftmax.hub``, or None with a warning where it cannot be imported (remote-code copies of this
        file run without the package: ``caller`` then falls back to transformers' ``stock``)."""
        import importlib
        import warnings

        try:  # lazily, by name: remote-code copies of this file must not depend on the package
            return importlib.import_module("hf_normsoftmax.hub")
        except ImportError as exc:
            warnings.warn(
                f"{caller}: hf_normsoftmax cannot be imported ({exc}), so this falls back to transformers' {stock}: "
                "the repo gets transformers' generic model card instead of the hf_normsoftmax card (the code and "
                "auto_map are still uploaded). Install the hf_normsoftmax package for the full push.",
                UserWarning,
                stacklevel=3,
            )
            return None

    @staticmethod
    def _warn_card_fields_ignored(caller: str, stacklevel: int) -> None:
        """The warning of both fallbacks without the package (``stacklevel`` counted from this function)."""
        import warnings

        message = f"{caller}: `card_fields` are ignored without hf_normsoftmax."
        warnings.warn(message, UserWarning, stacklevel=stacklevel)

    @staticmethod
    def _drop_hub_only_arguments(kwargs: dict, caller: str) -> None:
        """Without the package, ``save_pretrained(push_to_hub=True)`` is transformers': take out the arguments only
        hf_normsoftmax's push understands (transformers would hand them to ``HfApi.create_repo``)."""
        if kwargs.pop("card_fields", None):
            NormSoftmaxPreTrainedMixin._warn_card_fields_ignored(caller, stacklevel=4)
        refused = sorted(
            k for k in ("processing_class", "tokenizer", "tags", "commit_description", "revision") if k in kwargs
        )
        if refused:
            raise TypeError(
                f"{caller} without hf_normsoftmax is transformers' own, which does not take {refused}. "
                "Call model.push_to_hub(repo_id, ...) instead: it takes them without the package too."
            )

    def merge_and_unload(self):
        """The stock transformers model (e.g. ``GPT2LMHeadModel``) with sigmaReparam and beta folded into its
        weights, same eval outputs; refuses NormSoftmax flags, which cannot be folded. See
        ``hf_normsoftmax.export.merge_and_unload``; save it with its own ``save_pretrained``."""
        import importlib

        try:  # by name: remote-code copies of this file run without the package and its export module
            export = importlib.import_module("hf_normsoftmax.export")
        except ImportError as exc:
            raise ImportError(f"merge_and_unload() needs the hf_normsoftmax package: {exc}") from exc
        return export.merge_and_unload(self)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        processing_class=None,
        tokenizer=None,
        card_fields: dict | None = None,
    ):
        """Upload the model with the hf_normsoftmax model card, its code + ``auto_map``, safetensors weights, the
        config and the tokenizer / processor, in ONE commit (``hf_normsoftmax.hub.push_model``).

        Args:
            repo_id, commit_message, commit_description, private, token, revision, create_pr, max_shard_size, tags:
                as for ``PreTrainedModel.push_to_hub`` (``tags`` are added to the card's metadata).
            processing_class: the tokenizer / image processor / processor to upload (``tokenizer=`` is an alias).
                Default: the processor files saved in the local folder the model was loaded from
                (``model.name_or_path``), if any; otherwise a warning says the repo gets none.
            card_fields: extra card fields (``dataset_name``, ``eval_metrics``, ``base_model``, ``license``, ...;
                see ``hf_normsoftmax.hub.card.CardInputs``).

        Returns:
            ``huggingface_hub.CommitInfo`` of the commit.

        Where hf_normsoftmax cannot be imported (a model loaded with ``trust_remote_code=True``), this falls back
        to transformers' upload (generic card; the code and ``auto_map`` are still saved) with a warning, still in
        one commit with ``processing_class`` (:meth:`_push_to_hub_without_package`).
        """
        if processing_class is not None and tokenizer is not None and processing_class is not tokenizer:
            raise ValueError(
                "Invalid arguments: pass the tokenizer / processor once, as `processing_class` "
                "(`tokenizer` is an alias), not two different objects."
            )
        processing_class = processing_class if processing_class is not None else tokenizer
        hub = self._normsoftmax_hub_module("push_to_hub", "push_to_hub (in one commit with the processor)")
        upload = dict(
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            max_shard_size=max_shard_size,
            tags=tags,
        )
        if hub is None:
            if card_fields:
                self._warn_card_fields_ignored("push_to_hub", stacklevel=3)
            return self._push_to_hub_without_package(repo_id, processing_class, **upload)
        return hub.push_model(self, repo_id, processor=processing_class, card_fields=card_fields, **upload)

    def _push_to_hub_without_package(
        self,
        repo_id,
        processing_class,
        *,
        commit_message,
        commit_description,
        private,
        token,
        revision,
        create_pr,
        max_shard_size,
        tags,
    ):
        """transformers' ``push_to_hub`` (repo creation, its generic card tagged with ``tags``, branch creation),
        with the processor saved into the same temporary folder so that model and processor go up in ONE
        ``HfApi.create_commit`` (pushing the processor with its own ``push_to_hub`` would be a second commit)."""
        import os
        import tempfile
        from pathlib import Path

        from huggingface_hub import CommitOperationAdd, HfApi
        from huggingface_hub.errors import HfHubHTTPError
        from transformers.utils.hub import create_and_tag_model_card

        api = HfApi()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        model_card = create_and_tag_model_card(repo_id, tags, token=token)
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
            if processing_class is not None:
                processing_class.save_pretrained(tmp_dir)
            model_card.save(os.path.join(tmp_dir, "README.md"))
            if revision is not None and not revision.startswith("refs/pr"):
                try:
                    api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
                except HfHubHTTPError as exc:  # a PR to a repo we cannot write: its branch must already exist
                    if not (create_pr and exc.response is not None and exc.response.status_code == 403):
                        raise
            operations = [
                CommitOperationAdd(path_in_repo=path.relative_to(tmp_dir).as_posix(), path_or_fileobj=str(path))
                for path in sorted(Path(tmp_dir).rglob("*"))
                if path.is_file()
            ]
            default_message = "Upload model and processor" if processing_class is not None else "Upload model"
            return api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=commit_message or default_message,
                commit_description=commit_description,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )



# ---------------------------------------------------------------------------------------------------------------
# saving with the code, all-or-nothing
# ---------------------------------------------------------------------------------------------------------------
# auto_map entries that name this package's files (also as "repo--module.Class" after a Hub round trip)
_OWN_CODE_MARKERS = ("configuration_normsoftmax.", "modeling_normsoftmax_")


def _names_own_code(ref) -> bool:
    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    return any(isinstance(r, str) and any(marker in r for marker in _OWN_CODE_MARKERS) for r in refs)


def _auto_class_by_name(cls: type) -> str:
    """The Auto class a variant class's name implies (``AutoModel`` for the base models)."""
    suffixes = NormSoftmaxPreTrainedMixin._normsoftmax_auto_class_suffixes
    return next((auto for suffix, auto in suffixes if cls.__name__.endswith(suffix)), "AutoModel")


def _base_model_class(model_class: type) -> type | None:
    """The base model class (``NormSoftmaxBertModel`` for every BERT head) defined in ``model_class``'s file."""
    import sys

    module = sys.modules.get(model_class.__module__)
    candidates = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, PreTrainedModel)
        and hasattr(obj, "normsoftmax_auto_class")
        and obj.__module__ == model_class.__module__
        and getattr(obj, "config_class", None) is getattr(model_class, "config_class", None)
        and _auto_class_by_name(obj) == "AutoModel"
    ] if module is not None else []
    return candidates[0] if len(candidates) == 1 else None


def remote_code_auto_map(model_class: type, config_class: type, auto_class: str | None = None) -> dict:
    """The ``auto_map`` of a folder saved with the code of ``model_class``, computed from the arguments only.

    ``AutoConfig`` -> ``config_class``; ``AutoModel`` -> the base model class of the same modeling file (so that
    ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` loads a fine-tuned head's encoder); ``auto_class``
    (default :meth:`NormSoftmaxPreTrainedMixin.normsoftmax_auto_class`) -> ``model_class``.
    """
    import transformers.models.auto as auto_module

    auto_class = auto_class if auto_class is not None else model_class.normsoftmax_auto_class()
    if not isinstance(auto_class, str) or not auto_class.startswith("Auto") or not hasattr(auto_module, auto_class):
        raise ValueError(
            f"Invalid value for `auto_class`: {auto_class!r}. Allowed: the name of a transformers Auto class, such "
            "as 'AutoModel' or 'AutoModelForSequenceClassification'."
        )

    def ref(cls: type) -> str:
        return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"

    auto_map = {"AutoConfig": ref(config_class)}
    base = _base_model_class(model_class)
    if base is not None:
        auto_map["AutoModel"] = ref(base)
    auto_map[auto_class] = ref(model_class)
    return auto_map


def remote_code_files(*classes: type) -> list:
    """The source files defining ``classes`` and every file they import relatively (what ``auto_map`` needs)."""
    import sys
    from pathlib import Path

    from transformers.dynamic_module_utils import get_relative_import_files

    files = {}
    for cls in classes:
        source = Path(sys.modules[cls.__module__].__file__)
        for path in (source, *map(Path, get_relative_import_files(source))):
            files.setdefault(path.name, path)
    return list(files.values())


def write_remote_code(directory, auto_map: dict | None, code_files=(), drop_code: bool = False) -> None:
    """Give the ``config.json`` in ``directory`` exactly ``auto_map`` for this package's entries (other entries it
    has are kept) and copy ``code_files`` next to it; ``auto_map=None`` removes this package's entries, and with
    ``drop_code`` the ``*.py`` files of ``directory`` (transformers copies code for a class registered with
    ``register_for_auto_class``). Only ``directory`` is read and written: no class or config state."""
    import json
    import shutil
    from pathlib import Path

    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    written = config.get("auto_map")
    merged = {k: v for k, v in written.items() if not _names_own_code(v)} if isinstance(written, dict) else {}
    merged.update(auto_map or {})
    if merged:
        config["auto_map"] = merged
    else:
        config.pop("auto_map", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if auto_map:
        for source in code_files:
            shutil.copyfile(source, directory / Path(source).name)
    elif drop_code:
        for stale in directory.glob("*.py"):
            stale.unlink()


def _is_weight_file(name: str, variant: str | None) -> bool:
    """Whether ``name`` is a safetensors weight file or index transformers loads for ``variant``."""
    stem = f"model.{variant}" if variant else "model"
    index = f"model.safetensors.index.{variant}.json" if variant else "model.safetensors.index.json"
    return name == index or re.fullmatch(re.escape(stem) + r"(-\d{5}-of-\d{5})?\.safetensors", name) is not None


class CheckpointRollbackError(OSError):
    """A failed save could not put every previous file back; the message names the folder that holds them."""


def _move_into_place(new, target, previous, variant: str | None) -> None:
    """Rename the files of ``new`` into ``target``, replacing the checkpoint there all-or-nothing.

    Order: the old ``config.json`` and the old weight files the new save does not replace (another shard set) are
    moved to ``previous`` first, so from here until the new ``config.json`` arrives the folder does not load at
    all (instead of loading old weights with new flags, or the reverse); then every new file, ``config.json``
    last. Files being replaced are hard-linked (else copied) into ``previous`` first. On any error the files
    already moved are put back and the error is raised: the previous checkpoint is as it was. ``target``'s other
    files and folders are never touched. Each rename is atomic (same file system); a crash of the process
    itself between the first and the last rename leaves a folder without ``config.json`` (loading it fails
    loudly) and the previous files in ``previous``.
    """
    import os
    import shutil

    names = sorted(os.listdir(new), key=lambda name: (name == "config.json", name))
    stale = sorted(n for n in os.listdir(target) if _is_weight_file(n, variant) and n not in names)
    os.makedirs(previous)
    taken, backed, placed = [], [], []
    try:
        for name in ("config.json", *stale):
            if os.path.lexists(os.path.join(target, name)):
                os.replace(os.path.join(target, name), os.path.join(previous, name))
                taken.append(name)
        for name in names:
            dest = os.path.join(target, name)
            if name not in taken and os.path.lexists(dest):
                try:
                    os.link(dest, os.path.join(previous, name), follow_symlinks=False)
                except OSError:
                    shutil.copy2(dest, os.path.join(previous, name), follow_symlinks=False)
                backed.append(name)
            os.replace(os.path.join(new, name), dest)
            placed.append(name)
    except BaseException as exc:
        try:
            for name in reversed(placed):
                if name in backed or name in taken:
                    os.replace(os.path.join(previous, name), os.path.join(target, name))
                else:
                    os.unlink(os.path.join(target, name))
            for name in taken:
                if name not in placed:
                    os.replace(os.path.join(previous, name), os.path.join(target, name))
        except BaseException as rollback_exc:
            raise CheckpointRollbackError(
                f"saving into {target} failed ({type(exc).__name__}: {exc}) and putting the previous checkpoint "
                f"back failed too ({type(rollback_exc).__name__}: {rollback_exc}): its files are in {previous}; "
                "move them back into the folder by hand."
            ) from exc
        raise


def _saves_on_this_rank(model, kwargs: dict) -> bool:
    """Whether transformers' save writes files in this process (``should_save_on_this_rank`` where it exists)."""
    is_main_process = kwargs.get("is_main_process", True)
    should_save = getattr(model, "should_save_on_this_rank", None)
    return bool(should_save(is_main_process)) if callable(should_save) else bool(is_main_process)


_FOLDER_LOCKS: dict = {}
_FOLDER_LOCKS_GUARD = threading.Lock()


def _folder_lock(path: str) -> threading.Lock:
    """The lock of one save folder (by real path): moves into the same folder take turns, others run at once."""
    with _FOLDER_LOCKS_GUARD:
        return _FOLDER_LOCKS.setdefault(path, threading.Lock())


def _save_checkpoint(model, stock_save, save_directory, kwargs: dict, auto_map: dict | None, code_files):
    """``stock_save(save_directory, **kwargs)`` (transformers' save) with ``auto_map`` and ``code_files`` written
    (or this package's removed), into a temporary folder beside ``save_directory`` and then moved into place.

    In place instead (transformers' own behaviour) where nothing or only part of a checkpoint is written by this
    process: a non-saving rank, ``distributed_checkpoint=True`` (every rank writes its part), or a
    ``save_directory`` that is a file (transformers logs the error).
    """
    import os
    import shutil
    import tempfile

    if os.path.isfile(save_directory) or not _saves_on_this_rank(model, kwargs):
        return stock_save(save_directory, **kwargs)
    if kwargs.get("distributed_checkpoint"):
        result = stock_save(save_directory, **kwargs)
        write_remote_code(save_directory, auto_map, code_files)
        return result
    os.makedirs(save_directory, exist_ok=True)
    real = os.path.realpath(save_directory)
    try:  # beside the folder, on the same file system (renames are then atomic)
        work = tempfile.mkdtemp(prefix=f".{os.path.basename(real)}.saving-", dir=os.path.dirname(real))
    except OSError:  # a parent we cannot write to: inside the folder
        work = tempfile.mkdtemp(prefix=".hf_normsoftmax-saving-", dir=real)
    keep = False
    try:
        new = os.path.join(work, "new")
        os.makedirs(new)
        result = stock_save(new, **kwargs)
        write_remote_code(new, auto_map, code_files, drop_code=True)
        with _folder_lock(real):  # two saves into one folder in this process: one set of files, then the other
            _move_into_place(new, real, os.path.join(work, "previous"), kwargs.get("variant"))
        return result
    except CheckpointRollbackError:
        keep = True
        raise
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


__all__ = [
    "ATTENTION_IMPLEMENTATION",
    "HEAD_KINDS",
    "LEARNABLE_GAMMA_PARAMETER",
    "NormSoftmaxPreTrainedMixin",
    "REFERENCE_ATTENTION_IMPLEMENTATION",
    "SigmaReparamConv1D",
    "apply_sigma_reparam",
    "attention_gamma",
    "causal_lm_head",
    "finish_normsoftmax_init",
    "head_cross_entropy",
    "head_logits_and_loss",
    "head_outputs",
    "missing_trained_state",
    "normsoftmax_attention_forward",
    "normsoftmax_head_forward",
    "normsoftmax_reference_attention_forward",
    "question_answering_head",
    "register_normsoftmax_attention",
    "reset_normsoftmax_state",
    "resolve_variant_attn_implementation",
    "sequence_classification_head",
    "training_logits",
]
