"""NormSoftmax dot-product attention: a plain reference and a fast exact path.

NormSoftmax attention replaces ``softmax(scale * q k^T)`` by ``NormSoftmax(scale * q k^T)``: each query row of
the logits is normalised to unit variance over the keys it may attend to (then multiplied by ``gamma``) before
the softmax. Pure PyTorch; imports nothing from transformers.

Two implementations with one signature:

* :func:`normsoftmax_attention_reference` materialises the ``(B, H, L, S)`` logits. Obviously correct, O(L*S)
  memory; also the fallback for masks the fast path cannot express and when attention weights are requested.
* :func:`normsoftmax_attention` never builds an ``L x S`` float tensor. For query ``i`` over its valid key set
  ``S_i`` the logits ``s_ij = q_i . k_j`` have variance ``q_i^T Cov_{S_i}(k) q_i``, so NormSoftmax attention is
  *exactly* ordinary attention on rescaled queries ``q_i * scale / T_i`` with ``T_i = sqrt(var_i + eps) / gamma``
  (softmax is shift invariant, so the mean needs no correction). The rescaled queries go to torch's
  ``scaled_dot_product_attention`` with ``scale=1``. Causal masks make ``S_i`` grow with ``i``: the second moments
  then come from chunk-wise prefix sums (``O(L d^2 + L c d)`` work for chunk size ``c``). Masks under which every
  row sees one contiguous run of keys (sliding windows, packed documents, with padding; see
  :func:`key_intervals`) take per-block moments of the keys all rows of a block see plus a few ``c x c`` logit
  tiles (``O(L d^2 + L c d)`` as well).

Shapes: ``query (B, H, L, D)``, ``key``/``value`` ``(B, Hk, S, D)`` with ``H % Hk == 0`` (grouped-query attention:
the fast path keeps the ``Hk`` key heads, statistics per key head). ``attn_mask`` is bool (True = attend) or
additive float, broadcastable to ``(B, H, L, S)``. A causal mask (``is_causal=True``) is aligned bottom-right when
``L < S``, as in decoding with a KV cache: query ``i`` sees keys ``j <= i + S - L``. Queries with no valid key
return exact zeros (never NaN), so padding never leaks NaN into valid rows through ``p @ V``.

Example::

    >>> q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    >>> out, _ = normsoftmax_attention(q, k, v, is_causal=True, gamma=2.0)
    >>> ref, w = normsoftmax_attention_reference(q, k, v, is_causal=True, gamma=2.0, return_weights=True)
    >>> torch.allclose(out, ref, atol=1e-5)
    True
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .attention_fast import (
    FastAttention,
    FastSettings,
    compute_dtype,
    cpu_flash_available,
    exact_rows,
    fast_no_grad,
    make_plan,
)
from .attention_statistics import _INTERVAL_BLOCK, _INTERVAL_MAX_TILES, Intervals, interval_blocks
from .normsoftmax import _broadcasts_to, _check_gamma, _check_options, _check_positive_finite, _is_number, norm_softmax

__all__ = [
    "MaskStructure",
    "decompose_mask",
    "key_intervals",
    "normsoftmax_attention",
    "normsoftmax_attention_reference",
    "softmax_attention_reference",
    "valid_from_mask",
]

# The reference path is cheaper than the fast path's key statistics for very few query rows (decode steps) and
# for short sequences: up to this many logits per head it materialises them (measured on CPU, fp32, d=64: the
# reference wins up to about 100 tokens, the fast path from about 128; benchmarks/bench_attention.py --length).
_REFERENCE_MAX_QUERY_LEN = 8
_REFERENCE_MAX_LOGITS = 96 * 96
# Query rows per step when checking a mask's structure: bounds the (B, rows, S) temporaries.
_MASK_CHECK_ROWS = 256
# Mask elements per step when finding each row's key interval.
_INTERVAL_CHECK_ELEMENTS = 2**22


class MaskStructure(NamedTuple):
    """A mask the fast path can express: an optional key-padding vector and causality."""

    key_valid: torch.Tensor | None  # (B, S) bool, True = key may be attended; None = every key valid
    is_causal: bool  # bottom-right aligned causal mask on top of the padding


# ----------------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------------


def _check_inputs(query, key, value, scale, max_temperature, eps, statistic, dropout_p):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {t.dtype}"
            )
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, length, head_dim), got shape {tuple(t.shape)}")
    if query.dtype != key.dtype or key.dtype != value.dtype:
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree on (batch, heads, length)")
    if query.shape[0] != key.shape[0] or query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must agree on batch size and head_dim")
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(
            f"the number of query heads ({query.shape[1]}) must be a multiple of the number of key/value heads "
            f"({key.shape[1]})"
        )
    if scale is not None:
        _check_positive_finite("scale (None for 1/sqrt(head_dim))", scale)
    _check_options(max_temperature, eps, statistic)
    if not (_is_number(dropout_p) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")


# ----------------------------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------------------------


def _causal_valid(L: int, S: int, device) -> torch.Tensor:
    """(L, S) bool: query i sees keys j <= i + S - L (bottom-right aligned)."""
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=S - L)


# Additive masks: an entry at or below this value (as represented in the mask's dtype, so bfloat16's -9984 for
# -10000 counts) means "masked"; larger values, negative ones included, are biases added to the logits.
MASKED_AT_OR_BELOW = -1e4


def valid_from_mask(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The bool form (True = attend) of a bool or additive float mask.

    One rule for every path (fast, reference, entropy statistics): an additive entry ``<= -1e4`` (``-inf``,
    ``finfo.min``, ``(1 - mask) * -10000.0``, a ``-1e9`` fill) masks the key out of the softmax *and* of the
    NormSoftmax statistics; any larger value (ALiBi-like biases, small negative penalties) is a bias added to the
    logits before the statistics.
    """
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return attn_mask
    threshold = torch.tensor(MASKED_AT_OR_BELOW, dtype=attn_mask.dtype, device=attn_mask.device)
    return attn_mask > threshold


def _split_float_mask(attn_mask: torch.Tensor):
    """An additive mask -> (bool valid mask, additive bias or None)."""
    valid = valid_from_mask(attn_mask)
    bias = torch.where(valid, attn_mask, torch.zeros((), dtype=attn_mask.dtype, device=attn_mask.device))
    if not bool(bias.any()):
        bias = None
    return valid, bias


def _check_mask_shape(attn_mask: torch.Tensor, B: int, H: int, L: int, S: int):
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be None or a tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = attend) or an additive float mask, got {attn_mask.dtype}")
    if not _broadcasts_to(attn_mask, (B, H, L, S)):
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch, heads, query_len, key_len) "
            f"= {(B, H, L, S)}"
        )


def _one_head_mask(attn_mask: torch.Tensor) -> torch.Tensor | str:
    """A bool or additive mask as a 4-dim bool mask with one head, (B', 1, L', S'), or a string naming why the
    fast path cannot take it: additive biases, or per-head masks that differ (the same mask on every head is fine)."""
    if attn_mask.dtype != torch.bool:
        attn_mask, bias = _split_float_mask(attn_mask)
        if bias is not None:
            return "an additive mask with biases (entries between -1e4 and 0, such as ALiBi slopes)"
    mask = attn_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] != 1:
        if not bool((mask == mask[:, :1]).all()):
            return "a per-head mask that differs between heads"
        mask = mask[:, :1]
    return mask


def decompose_mask(attn_mask: torch.Tensor | None, is_causal: bool, batch_size: int, L: int, S: int):
    """Express ``attn_mask`` (combined with ``is_causal``) as key padding + causality, if it is of that form.

    Returns a :class:`MaskStructure`, or ``None`` for masks that are not "padding (and causal)", such as
    sliding windows, block masks or additive biases; those take the reference path. The check is exact: the
    candidate structure is rebuilt and compared with the given mask.
    """
    if attn_mask is None:
        return MaskStructure(None, bool(is_causal))
    mask = _one_head_mask(attn_mask)
    if isinstance(mask, str):
        return None
    if mask.shape[-2] == 1 and not is_causal:  # one row for every query: a key-padding mask as it stands
        return _padding_structure(mask[:, 0, 0, :].expand(mask.shape[0], S), False, batch_size)
    mask = mask[:, 0].expand(mask.shape[0], L, S)  # (B', L, S), a view
    # The last query row sees every key that is not padding (for causal masks as well: bottom-right alignment).
    key_valid = mask[:, -1, :]
    padding_only = causal_form = True
    for start in range(0, L, _MASK_CHECK_ROWS):  # row blocks: no (B, L, S) temporaries for long sequences
        rows = mask[:, start : start + _MASK_CHECK_ROWS]
        causal_rows = torch.ones(rows.shape[1], S, dtype=torch.bool, device=mask.device).tril(S - L + start)
        if is_causal:
            rows = rows & causal_rows
        expected = key_valid[:, None, :].expand_as(rows)
        padding_only = padding_only and bool((rows == expected).all())
        causal_form = causal_form and bool((rows == (expected & causal_rows)).all())
        if not (padding_only or causal_form):
            return None
    return _padding_structure(key_valid, not padding_only, batch_size)


def key_intervals(attn_mask: torch.Tensor | None, is_causal: bool, batch_size: int, L: int, S: int, device=None):
    """Each query row's valid keys as one interval: ``(lo, hi)``, two (batch_size, L) int64 tensors, row ``i`` seeing
    keys ``lo_i <= j < hi_i`` (``hi_i <= lo_i``: no key), for ``attn_mask`` combined with ``is_causal``.

    Sliding windows, packed documents (block-diagonal, causal or not), their left padding and KV-cache offsets are
    of this form. For any other mask, a string naming what it is (the fast path's fallback warning quotes it).
    The check is exact: every row's count of valid keys equals the length of its interval."""
    if attn_mask is None:
        positions = torch.arange(L, dtype=torch.long, device=device)
        hi = positions + (S - L + 1) if is_causal else torch.full((L,), S, dtype=torch.long, device=device)
        lo = torch.zeros(L, dtype=torch.long, device=device)
        return lo.expand(batch_size, L), hi.expand(batch_size, L)
    mask = _one_head_mask(attn_mask)
    if isinstance(mask, str):
        return mask
    mask = mask[:, 0].expand(mask.shape[0], L, S)
    rows = max(1, _INTERVAL_CHECK_ELEMENTS // (mask.shape[0] * S))
    los, his, oks = [], [], []
    for start in range(0, L, rows):
        block = mask[:, start : start + rows]
        if is_causal:
            block = block & torch.ones(block.shape[1], S, dtype=torch.bool, device=mask.device).tril(S - L + start)
        as_bytes = block.to(torch.uint8)
        count = as_bytes.sum(dim=-1)
        lo = as_bytes.argmax(dim=-1)  # the first valid key (0 for a row without any)
        hi = S - as_bytes.flip(-1).argmax(dim=-1)
        oks.append(((hi - lo == count) | (count == 0)).all())
        los.append(torch.where(count > 0, lo, 0))
        his.append(torch.where(count > 0, hi, 0))
    if not bool(torch.stack(oks).all()):
        return "a mask whose query rows see keys that are not one contiguous run"
    lo, hi = torch.cat(los, dim=-1), torch.cat(his, dim=-1)
    return lo.expand(batch_size, L), hi.expand(batch_size, L)


def _padding_structure(key_valid: torch.Tensor, causal: bool, batch_size: int) -> MaskStructure:
    """(B', S) valid keys -> MaskStructure with (batch_size, S) valid keys, or None when every key is valid."""
    key_valid = key_valid.expand(batch_size, key_valid.shape[-1])
    return MaskStructure(None if bool(key_valid.all()) else key_valid, causal)


# ----------------------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------------------


def _expand_kv(query, key, value):
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return key, value


def normsoftmax_attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain NormSoftmax attention: materialise ``scale * q k^T`` (+ additive mask) and apply NormSoftmax per row.

    :func:`normsoftmax_attention` with ``path="reference"``: the same arguments (``attn_mask``, ``is_causal``,
    ``scale``, ``gamma``, ``max_temperature``, ``eps``, ``statistic``, ``dropout_p``, ``return_weights``, by position
    or by name). Returns ``(out, weights)`` with ``out`` of shape ``(B, H, L, D)`` and ``weights`` ``(B, H, L, S)``
    (the probabilities before dropout) when ``return_weights`` else ``None``. Logits and statistics are computed in
    float32 for half-precision inputs.
    """
    return normsoftmax_attention(query, key, value, *args, path="reference", **kwargs)


def _materialised_normsoftmax(query, key, value, attn_mask, is_causal, scale, gamma, max_temperature, eps, statistic,
                              dropout_p, return_weights):
    logits, valid, value = _materialised_logits(query, key, value, attn_mask, is_causal, scale)
    weights = norm_softmax(
        logits, dim=-1, mask=valid, gamma=gamma, max_temperature=max_temperature, eps=eps, statistic=statistic
    )
    return _attend(weights, value, query.dtype, dropout_p, return_weights)


def softmax_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stock softmax attention with materialised weights, masks read as :func:`normsoftmax_attention_reference`
    reads them (what a variant with ``attention_softmax="softmax"`` runs when attention weights are asked for).
    Rows without any valid key give zeros, as NormSoftmax attention does."""
    _check_inputs(query, key, value, scale, None, 1e-6, "std", dropout_p)
    logits, valid, value = _materialised_logits(query, key, value, attn_mask, is_causal, scale)
    if valid is not None:
        logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits, dim=-1)
    if valid is not None:
        weights = weights.masked_fill(~valid.any(dim=-1, keepdim=True), 0.0)
    return _attend(weights, value, query.dtype, dropout_p, return_weights)


def _materialised_logits(query, key, value, attn_mask, is_causal, scale):
    """``scale * q k^T`` plus the mask's biases, in float32 (float64 for float64 inputs), the (B, H, L, S) valid
    mask or None, and the values (grouped-query keys/values expanded)."""
    B, H, L, D = query.shape
    S = key.shape[-2]
    if attn_mask is not None:
        _check_mask_shape(attn_mask, B, H, L, S)
    key, value = _expand_kv(query, key, value)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    logits = torch.matmul(query.to(compute_dtype), key.to(compute_dtype).transpose(-1, -2)) * scale
    valid = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            valid = attn_mask
        else:
            valid, bias = _split_float_mask(attn_mask)
            if bias is not None:
                logits = logits + bias.to(compute_dtype)
    if is_causal:
        causal = _causal_valid(L, S, query.device)
        valid = causal if valid is None else valid & causal
    if valid is not None:
        valid = valid.expand(B, H, L, S)
    return logits, valid, value


def _attend(weights, value, dtype, dropout_p, return_weights):
    probs = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = torch.matmul(probs, value.to(weights.dtype)).to(dtype)
    return out, (weights.to(dtype) if return_weights else None)




def normsoftmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    gamma: float | torch.Tensor = 1.0,
    max_temperature: float | None = None,
    eps: float = 1e-6,
    statistic: str = "std",
    dropout_p: float = 0.0,
    return_weights: bool = False,
    *,
    path: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NormSoftmax attention, fast and exact: rescaled queries + one attention kernel call, no ``L x S`` tensor.

    Shapes and masks as in the module docstring; ``scale`` defaults to ``1/sqrt(head_dim)``; ``gamma``,
    ``max_temperature``, ``eps`` and ``statistic`` as in :func:`~hf_normsoftmax.normsoftmax.normalize_logits`
    (``gamma`` a float or a tensor broadcastable to ``(B, H, L, 1)``, e.g. ``(H, 1, 1)`` per head). Returns
    ``(out (B, H, L, D), weights (B, H, L, S) or None)``, the weights (probabilities before dropout) only with
    ``return_weights``, which the reference path computes. ``attn_mask``: bool (True = attend) or additive; an
    additive entry ``<= -1e4`` (``-inf``, ``finfo.min``, ``(1 - mask) * -10000.0``) masks the key out of the softmax
    and of the statistics, larger values are biases (see :data:`MASKED_AT_OR_BELOW`).

    Guarantees (measured by ``benchmarks/attention_accuracy.py``, tested in ``tests/test_attention_exactness.py``):

    * float32 / float64: every row's variance is computed from its logits (bidirectional rows over short key
      sets, as the reference does), or from key moments with a rounding bound at most ``1e-3`` of the variance
      (the bound is pessimistic: observed errors are 1e-5 relative and below), or the row is computed by
      materialising its logits: the error stays within a small factor of the materialising path's, also for keys
      with outlier directions.
    * float16 / bfloat16: statistics in float32; rows the half-precision kernel cannot resolve (at most 3 valid
      keys, a factor ``scale / T`` above 2x the median of the head, a rescaled query near the dtype's range) are
      computed in float32. Output and gradients stay within 5x of the error stock SDPA makes in the same dtype.
    * rows without any valid key give exact zeros and zero gradients; masked keys get zero gradients.

    Masks on the fast path: none, key padding, causal (``is_causal`` or a causal 4D mask) with padding, and every
    mask under which each query row sees one contiguous run of keys, as transformers builds them for sliding
    windows (Mistral, Gemma 2, Qwen2), packed documents (block-diagonal, from ``position_ids``), with left padding
    and KV-cache offsets, bool or additive (:func:`key_intervals`; the run's statistics come from moments of whole
    64-key blocks shared by a block of 64 rows plus at most 4 other key blocks as logit tiles). Other masks
    (additive biases, per-head masks that differ, rows seeing several runs, runs too ragged for the blocks) take
    the reference path, with a warning naming the mask and the cost once per kind. A mask's analysis is reused
    while the same tensor is passed again unchanged (its version counter decides; see ``_MASK_PLANS``).

    Grouped-query keys/values (``Hk < H``) are never expanded: statistics per key head, the kernel takes the
    grouped shapes (SDPA's ``enable_gqa``; on CPU one flash-kernel call per member of the group). Causal grouped
    rows whose key padding is not one contiguous run are the exception: their keys are expanded.

    Takes the reference path when weights are requested and where it is cheaper: very short query blocks (decode
    steps) and short sequences (at most ``_REFERENCE_MAX_LOGITS`` logits per head, a ``96 x 96`` tile).
    ``path="fast"`` skips the size hand-over (masks and weights still decide as above); ``path="reference"``
    always materialises; ``"auto"`` (default) chooses as described.
    """
    if path not in ("auto", "fast", "reference"):
        raise ValueError(f"path must be 'auto', 'fast' or 'reference', got {path!r}")
    _check_inputs(query, key, value, scale, max_temperature, eps, statistic, dropout_p)
    B, H, L, D = query.shape
    S = key.shape[-2]
    _check_gamma(gamma, (B, H, L, S), 3)
    if attn_mask is not None:
        _check_mask_shape(attn_mask, B, H, L, S)
    if L > S and is_causal:
        raise ValueError(f"a causal mask needs query_len <= key_len, got query_len={L}, key_len={S}")
    cheaper_materialised = L <= _REFERENCE_MAX_QUERY_LEN or L * S <= _REFERENCE_MAX_LOGITS
    use_reference = path == "reference" or return_weights or (path == "auto" and cheaper_materialised)
    cpu_flash = cpu_flash_available(query.device, dropout_p)
    masks = None
    if not use_reference:
        masks = _cached_mask_plan(attn_mask, is_causal, B, H, key.shape[1], L, S, query.device, cpu_flash,
                                  compute_dtype(query.dtype))
        if isinstance(masks, str):
            _warn_fallback(masks, B, H, L, S)
            masks = None
    if masks is None:
        return _materialised_normsoftmax(query, key, value, attn_mask, is_causal, scale, gamma, max_temperature, eps,
                                         statistic, dropout_p, return_weights)
    if masks.expand_kv:
        key, value = _expand_kv(query, key, value)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    inv_cap, eps_value, power = _check_options(max_temperature, eps, statistic)
    settings = FastSettings(
        scale=scale, inv_cap=inv_cap, eps=eps_value, power=power, dropout_p=dropout_p, cpu_flash=cpu_flash,
        **{field: getattr(masks, field) for field in _KERNEL_FIELDS},
    )
    key_valid, key_weight = masks.key_valid, masks.key_weight
    plan = make_plan(query, key, key_weight, gamma, settings)
    inputs = (query, key, value) + ((gamma,) if isinstance(gamma, torch.Tensor) else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        out = FastAttention.apply(query, key, value, gamma, key_weight, plan, settings)
    else:
        out = fast_no_grad(query, key, value, plan, settings)
    if plan.exact_index is not None:
        rows = exact_rows(query, key, value, plan.exact_index, key_valid, gamma, settings, max_temperature, eps,
                          statistic)
        out = out.scatter(2, plan.exact_index[..., None].expand(*plan.exact_index.shape, D), rows)
    return out, None


# The fields of a MaskPlan that FastSettings takes over as they are (same names).
_KERNEL_FIELDS = ("causal", "intervals", "sdpa_mask", "rows_without_keys", "sdpa_is_causal")


class MaskPlan(NamedTuple):
    """How the fast path handles one mask: statistics (key padding + causality, or per-row key intervals) and the
    mask the attention kernel gets (see :func:`_sdpa_mask`)."""

    key_valid: torch.Tensor | None  # (B, S) keys that enter the statistics (centring, gradients), None = all
    key_weight: torch.Tensor | None  # key_valid in the statistics dtype
    causal: bool
    intervals: Intervals | None
    sdpa_mask: torch.Tensor | None
    rows_without_keys: torch.Tensor | None
    sdpa_is_causal: bool
    expand_kv: bool  # grouped-query keys/values expanded to one per query head (causal + non-contiguous padding)


def _mask_plan(attn_mask, is_causal, B, H, key_heads, L, S, device, cpu_flash, dtype) -> MaskPlan | str:
    """The fast path's plan for a mask, or a string naming the mask it cannot express."""
    plan = _mask_plan_parts(attn_mask, is_causal, B, H, key_heads, L, S, device, cpu_flash, dtype)
    if isinstance(plan, str):
        return plan
    key_valid, *rest = plan
    return MaskPlan(key_valid, None if key_valid is None else key_valid.to(dtype), *rest)


def _mask_plan_parts(attn_mask, is_causal, B, H, key_heads, L, S, device, cpu_flash, dtype):
    structure = decompose_mask(attn_mask, is_causal, B, L, S)
    grouped = key_heads != H
    if structure is not None:
        key_valid, causal = structure
        sdpa = _sdpa_mask(attn_mask, is_causal, key_valid, causal, B, L, S, device, cpu_flash)
        if not (grouped and causal):
            return (key_valid, causal, None, *sdpa, False)
        # grouped-query causal rows: statistics per key head from intervals (padding must be one run of keys)
        lo, hi = _causal_intervals(key_valid, B, L, S, device)
        intervals = None if lo is None else interval_blocks(lo, hi, S, dtype)
        if intervals is None:
            return (key_valid, causal, None, *sdpa, True)
        return (key_valid, False, intervals, *sdpa, False)
    found = key_intervals(attn_mask, is_causal, B, L, S, device)
    if isinstance(found, str):
        return found
    lo, hi = found
    intervals = interval_blocks(lo, hi, S, dtype)
    if intervals is None:
        return (
            f"a mask whose query rows, in blocks of {_INTERVAL_BLOCK}, do not share one run of whole key blocks "
            f"beside at most {_INTERVAL_MAX_TILES} other key blocks"
        )
    if attn_mask is not None and attn_mask.dtype == torch.bool and attn_mask.shape == (B, 1, L, S) and not is_causal:
        sdpa_mask = attn_mask  # the caller's mask, verified by key_intervals
    else:
        positions = torch.arange(S, device=device)
        sdpa_mask = ((positions >= lo[..., None]) & (positions < hi[..., None]))[:, None]
    has_key = (hi > lo)[:, None, :, None]
    rows_without_keys = None if bool(has_key.all()) else ~has_key
    return (intervals.seen, False, intervals, sdpa_mask, rows_without_keys, False, False)


def _causal_intervals(key_valid, B, L, S, device):
    """Causal rows over a key-padding vector as intervals (lo, hi), or (None, None) if the valid keys of some sequence
    are not one contiguous run."""
    positions = torch.arange(S, device=device)
    if key_valid is None:
        lo = torch.zeros(B, 1, dtype=torch.long, device=device)
        end = torch.full((B, 1), S, dtype=torch.long, device=device)
    else:
        as_bytes = key_valid.to(torch.uint8)
        count = as_bytes.sum(dim=-1, keepdim=True)
        lo = as_bytes.argmax(dim=-1, keepdim=True)
        end = S - as_bytes.flip(-1).argmax(dim=-1, keepdim=True)
        if not bool(((end - lo == count) | (count == 0)).all()):
            return None, None
        end = torch.where(count > 0, end, lo)
    hi = torch.minimum(positions[:L] + (S - L + 1), end)
    return lo.expand(B, L), hi


# Mask analyses, reused while the same mask tensor is passed again unchanged (every layer of a model gets the same
# mask object): id(mask) -> (weak reference, fingerprint, plan, whether the kernel takes the mask itself). The
# fingerprint holds the tensor's version counter, which every in-place change through torch bumps (also under
# no_grad). Writes that bypass it (through ``.data`` or a
# numpy view) are not seen; nothing is cached in inference mode or for inference tensors (no version counter).
# No lock: each dict operation is atomic, a lookup checks the weak reference and the fingerprint, and a race costs at
# most a repeated analysis (a lock here could deadlock: the weak-reference callback runs inside garbage collection,
# which may start while the same thread holds it).
_MASK_PLANS: dict[int, tuple] = {}
_SHAPE_PLANS: dict[tuple, MaskPlan] = {}  # plans without a mask tensor, by shapes
_MASK_PLANS_MAX = 16


def _remember(cache: dict, key, value) -> None:
    while len(cache) >= _MASK_PLANS_MAX:
        try:
            cache.pop(next(iter(cache)), None)
        except (StopIteration, RuntimeError):  # emptied or changed by another thread meanwhile
            break
    cache[key] = value


def _cached_mask_plan(attn_mask, is_causal, B, H, key_heads, L, S, device, cpu_flash, dtype):
    args = (is_causal, B, H, key_heads, L, S, device, cpu_flash, dtype)
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        # inference tensors have no version counter, and a plan made of them could not serve a training call
        return _mask_plan(attn_mask, *args)
    if attn_mask is None:  # the plan depends on the shapes alone
        plan = _SHAPE_PLANS.get(args)
        if plan is None:
            plan = _mask_plan(None, *args)
            _remember(_SHAPE_PLANS, args, plan)
        return plan
    if attn_mask.is_inference():
        return _mask_plan(attn_mask, *args)
    fingerprint = (attn_mask.data_ptr(), attn_mask.shape, attn_mask.stride(), attn_mask.dtype, attn_mask.device,
                   attn_mask._version, args)
    key = id(attn_mask)
    entry = _MASK_PLANS.get(key)
    if entry is not None and entry[0]() is attn_mask and entry[1] == fingerprint:
        plan = entry[2]
        return plan._replace(sdpa_mask=attn_mask) if entry[3] else plan
    plan = _mask_plan(attn_mask, *args)
    if attn_mask._version != fingerprint[5]:  # changed while being analysed (another thread): do not keep
        return plan
    # the kept plan must not hold the mask itself (the weak reference could then never clear): the kernel's mask,
    # when it is the caller's tensor, is put back on each hit
    callers_mask = isinstance(plan, MaskPlan) and plan.sdpa_mask is attn_mask
    kept = plan._replace(sdpa_mask=None) if callers_mask else plan

    def forget(ref, key=key, plans=_MASK_PLANS):  # bound here: module globals are gone at interpreter exit
        entry = plans.get(key)
        if entry is not None and entry[0] is ref:
            plans.pop(key, None)

    _remember(_MASK_PLANS, key, (weakref.ref(attn_mask, forget), fingerprint, kept, callers_mask))
    return plan


_WARNED_FALLBACKS: set[str] = set()


def _warn_fallback(kind: str, B: int, H: int, L: int, S: int) -> None:
    if kind in _WARNED_FALLBACKS:
        return
    _WARNED_FALLBACKS.add(kind)
    megabytes = B * H * L * S * 4 / 2**20
    warnings.warn(
        f"normsoftmax_attention: {kind} is not expressible on the fast path; calls with such a mask materialise "
        f"the (batch, heads, query_len, key_len) = {(B, H, L, S)} logits on the reference path ({megabytes:.0f} MB "
        "per float32 copy, several copies with gradients). Warned once per kind of mask.",
        stacklevel=3,
    )


def _sdpa_mask(attn_mask, is_causal, key_valid, causal, B, L, S, device, cpu_flash: bool):
    """The mask the attention kernel needs for a decomposed mask: (bool mask or None, query rows without any valid
    key (B, 1, L, 1) or None (see :class:`FastSettings`), whether the kernel applies the causal mask itself).
    torch's CPU kernel takes its causal flag together with a key-padding mask, so causal + padding on a square
    block needs no L x S mask there; SDPA refuses that pair, so elsewhere it gets the full mask."""
    if key_valid is None:
        mask = _causal_valid(L, S, device) if causal and L != S else None
        return mask, None, causal and mask is None
    if causal and L == S and cpu_flash:
        has_key = key_valid.cumsum(dim=-1) > 0  # row i has a key iff some key j <= i is valid
        return key_valid[:, None, None, :], (None if bool(has_key.all()) else ~has_key[:, None, :, None]), True
    if not causal:
        mask = key_valid[:, None, None, :]  # (B, 1, 1, S): broadcast, no L x S tensor
    elif not is_causal and attn_mask.dtype == torch.bool and attn_mask.shape == (B, 1, L, S):
        mask = attn_mask  # the caller's causal + padding mask, already verified by decompose_mask
    else:
        mask = key_valid[:, None, None, :] & _causal_valid(L, S, device)
    has_key = mask.any(dim=-1, keepdim=True)
    return mask, (None if bool(has_key.all()) else ~has_key), False
