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
  then come from chunk-wise prefix sums (``O(L d^2 + L c d)`` work for chunk size ``c``).

Shapes: ``query (B, H, L, D)``, ``key``/``value`` ``(B, Hk, S, D)`` with ``H % Hk == 0`` (grouped-query attention
is expanded). ``attn_mask`` is bool (True = attend) or additive float, broadcastable to ``(B, H, L, S)``. A causal
mask (``is_causal=True``) is aligned bottom-right when ``L < S``, as in decoding with a KV cache: query ``i`` sees
keys ``j <= i + S - L``. Queries with no valid key return exact zeros (never NaN), so padding never leaks NaN into
valid rows through ``p @ V``.

Example::

    >>> q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    >>> out, _ = normsoftmax_attention(q, k, v, is_causal=True, gamma=2.0)
    >>> ref, w = normsoftmax_attention_reference(q, k, v, is_causal=True, gamma=2.0, return_weights=True)
    >>> torch.allclose(out, ref, atol=1e-5)
    True
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .normsoftmax import norm_softmax

__all__ = [
    "MaskStructure",
    "decompose_mask",
    "normsoftmax_attention",
    "normsoftmax_attention_reference",
    "rescaled_queries",
]

# Below this many query rows the reference path is cheaper than computing key covariances (decode steps).
_REFERENCE_MAX_QUERY_LEN = 8


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
            raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, length, head_dim), got shape {tuple(t.shape)}")
    if query.dtype != key.dtype or key.dtype != value.dtype:
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree on (batch, heads, length)")
    if query.shape[0] != key.shape[0] or query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} must agree on batch size and head_dim"
        )
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(
            f"the number of query heads ({query.shape[1]}) must be a multiple of the number of key/value heads "
            f"({key.shape[1]})"
        )
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be None or a positive finite number, got {scale!r}")
    if max_temperature is not None and not (
        isinstance(max_temperature, (int, float)) and math.isfinite(max_temperature) and max_temperature > 0
    ):
        raise ValueError(f"max_temperature must be None or a positive finite number, got {max_temperature!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if statistic not in ("std", "var"):
        raise ValueError(f"statistic must be 'std' or 'var', got {statistic!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")


def _check_gamma(gamma, query):
    """gamma: positive float, or a positive tensor broadcastable to the row statistics (B, H, L, 1)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float, torch.Tensor)):
        raise TypeError(f"gamma must be a positive float or a tensor, got {type(gamma).__name__}")
    if isinstance(gamma, torch.Tensor):
        row_shape = (*query.shape[:-1], 1)
        try:
            torch.broadcast_shapes(gamma.shape, row_shape)
        except RuntimeError:
            raise ValueError(
                f"gamma of shape {tuple(gamma.shape)} does not broadcast to the attention rows {row_shape}; "
                "use a float, shape (heads, 1, 1) for one value per head, or a shape broadcastable to "
                "(batch, heads, query_len, 1)"
            ) from None
        if torch.broadcast_shapes(gamma.shape, row_shape) != row_shape:
            raise ValueError(f"gamma of shape {tuple(gamma.shape)} would enlarge the attention rows {row_shape}")
        if not torch.is_grad_enabled() or not gamma.requires_grad:
            if bool((gamma <= 0).any()) or not bool(torch.isfinite(gamma).all()):
                raise ValueError("gamma must be positive and finite everywhere")
    elif not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")


# ----------------------------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------------------------


def _causal_valid(L: int, S: int, device) -> torch.Tensor:
    """(L, S) bool: query i sees keys j <= i + S - L (bottom-right aligned)."""
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=S - L)


def _split_float_mask(attn_mask: torch.Tensor):
    """An additive mask -> (bool valid mask, additive bias or None). Very negative entries mean 'masked'."""
    valid = attn_mask > torch.finfo(attn_mask.dtype).min / 2
    bias = torch.where(valid, attn_mask, torch.zeros((), dtype=attn_mask.dtype, device=attn_mask.device))
    if not bool(bias.any()):
        bias = None
    return valid, bias


def _check_mask_shape(attn_mask: torch.Tensor, B: int, H: int, L: int, S: int):
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be None or a tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = attend) or an additive float mask, got {attn_mask.dtype}")
    try:
        ok = torch.broadcast_shapes(attn_mask.shape, (B, H, L, S)) == (B, H, L, S)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch, heads, query_len, key_len) "
            f"= {(B, H, L, S)}"
        )


def decompose_mask(attn_mask: torch.Tensor | None, is_causal: bool, batch_size: int, L: int, S: int):
    """Express ``attn_mask`` (combined with ``is_causal``) as key padding + causality, if it is of that form.

    Returns a :class:`MaskStructure`, or ``None`` for masks that are not "padding (and causal)", such as
    sliding windows, block masks or additive biases; those take the reference path. The check is exact: the
    candidate structure is rebuilt and compared with the given mask.
    """
    if attn_mask is None:
        return MaskStructure(None, bool(is_causal))
    if attn_mask.dtype != torch.bool:
        valid, bias = _split_float_mask(attn_mask)
        if bias is not None:
            return None
        attn_mask = valid
    mask = attn_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] != 1:  # per-head masks: fine if every head has the same one
        if not bool((mask == mask[:, :1]).all()):
            return None
        mask = mask[:, :1]
    mask = mask[:, 0].expand(mask.shape[0], L, S)  # (B', L, S)
    causal = _causal_valid(L, S, mask.device)
    if is_causal:
        mask = mask & causal
    # The last query row sees every key that is not padding (for causal masks as well: bottom-right alignment).
    key_valid = mask[:, -1, :]
    if bool((mask == key_valid[:, None, :]).all()):
        found_causal = False
    elif bool((mask == (key_valid[:, None, :] & causal)).all()):
        found_causal = True
    else:
        return None
    key_valid = key_valid.expand(batch_size, S)
    if bool(key_valid.all()):
        key_valid = None
    return MaskStructure(key_valid, found_causal)


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain NormSoftmax attention: materialise ``scale * q k^T`` (+ additive mask) and apply NormSoftmax per row.

    Returns ``(out, weights)`` with ``out`` of shape ``(B, H, L, D)`` and ``weights`` ``(B, H, L, S)`` (the
    probabilities before dropout) when ``return_weights`` else ``None``. Logits and statistics are computed in
    float32 for half-precision inputs.
    """
    _check_inputs(query, key, value, scale, max_temperature, eps, statistic, dropout_p)
    _check_gamma(gamma, query)
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
    weights = norm_softmax(
        logits, dim=-1, mask=valid, gamma=gamma, max_temperature=max_temperature, eps=eps, statistic=statistic
    )
    probs = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = torch.matmul(probs, value.to(compute_dtype)).to(query.dtype)
    return out, (weights.to(query.dtype) if return_weights else None)


# ----------------------------------------------------------------------------------------------------------------
# fast path
# ----------------------------------------------------------------------------------------------------------------


def _temperature(var: torch.Tensor, gamma, max_temperature, eps: float, statistic: str) -> torch.Tensor:
    """Per-row divisor T of the logits, from the per-row variance of the (scaled) logits."""
    spread = torch.sqrt(var + eps) if statistic == "std" else var + eps
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(spread.dtype)
    temperature = spread / gamma
    if max_temperature is not None:
        temperature = temperature.clamp(max=max_temperature)
    return temperature


def _row_variance_padding(q: torch.Tensor, k: torch.Tensor, key_weight: torch.Tensor | None):
    """Variance of q_i . k_j over the valid keys j, and the number of those keys: (B, H, L, 1), (B, 1, 1, 1)."""
    if key_weight is None:
        count = torch.tensor(float(k.shape[-2]), dtype=k.dtype, device=k.device)
        mean = k.mean(dim=-2, keepdim=True)
        centred = k - mean
    else:
        w = key_weight[:, None, :, None]  # (B, 1, S, 1)
        count = w.sum(dim=-2, keepdim=True).clamp(min=1.0)
        mean = (k * w).sum(dim=-2, keepdim=True) / count
        centred = (k - mean) * w
    cov = torch.matmul(centred.transpose(-1, -2), centred) / count  # (B, H, D, D)
    return (torch.matmul(q, cov) * q).sum(dim=-1, keepdim=True).clamp(min=0.0), count


def _row_variance_causal(
    q: torch.Tensor, k: torch.Tensor, key_weight: torch.Tensor | None, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance of q_i . k_j over valid keys j <= i + S - L, and their count: (B, H, L, 1), (B, 1, L, 1).

    No L x S tensor is built.

    Keys are centred by their (detached) overall mean first: the variance does not depend on that shift, and it
    keeps sum-of-squares minus squared-sum from cancelling catastrophically.
    """
    B, H, L, D = q.shape
    S = k.shape[-2]
    offset = S - L
    if key_weight is None:
        key_weight = torch.ones(B, S, dtype=k.dtype, device=k.device)
    w = key_weight[:, None, :, None]  # (B, 1, S, 1)
    total = w.sum(dim=-2, keepdim=True).clamp(min=1.0)
    shift = ((k * w).sum(dim=-2, keepdim=True) / total).detach()
    kc = (k - shift) * w

    # keys before the first query (KV cache) are seen by every query
    prefix_kc, kc = kc[:, :, :offset], kc[:, :, offset:]
    prefix_w, w = w[:, :, :offset], w[:, :, offset:]

    c = min(chunk_size, L)
    n_chunks = -(-L // c)
    pad = n_chunks * c - L
    if pad:
        q = F.pad(q, (0, 0, 0, pad))
        kc = F.pad(kc, (0, 0, 0, pad))
        w = F.pad(w, (0, 0, 0, pad))
    qc = q.view(B, H, n_chunks, c, D)
    kc = kc.reshape(B, H, n_chunks, c, D)
    wc = w.reshape(B, 1, n_chunks, c)

    # moments of all keys before each chunk (exclusive prefix sums over chunks)
    chunk_sum = kc.sum(dim=-2)  # (B, H, n, D)
    chunk_outer = torch.matmul(kc.transpose(-1, -2), kc)  # (B, H, n, D, D)
    chunk_count = wc.sum(dim=-1)  # (B, 1, n)
    before_sum = chunk_sum.cumsum(dim=2) - chunk_sum
    before_outer = chunk_outer.cumsum(dim=2) - chunk_outer
    before_count = chunk_count.cumsum(dim=2) - chunk_count
    if offset:
        before_sum = before_sum + prefix_kc.sum(dim=-2)[:, :, None]
        before_outer = before_outer + torch.matmul(prefix_kc.transpose(-1, -2), prefix_kc)[:, :, None]
        before_count = before_count + prefix_w.sum(dim=(-2, -1))[:, :, None]

    # within a chunk: query a sees keys b <= a (keys are aligned with queries after the offset)
    lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    inner_weight = wc[:, :, :, None, :] * lower  # (B, 1, n, c, c): 1 where key b is valid and b <= a
    inner = torch.matmul(qc, kc.transpose(-1, -2)) * inner_weight  # (B, H, n, c, c); padded keys are zero rows
    inner_count = inner_weight.sum(dim=-1)  # (B, 1, n, c)
    inner_mean = inner.sum(dim=-1) / inner_count.clamp(min=1.0)
    # two passes inside the chunk: exact for the first rows of a sequence, where few keys make the variance
    # small next to the squared mean and sum-of-squares minus squared-sum would cancel
    inner_m2 = ((inner - inner_mean[..., None]) * inner_weight).square().sum(dim=-1)

    # keys before the chunk: moments from the prefix sums
    count_before = before_count[..., None]  # (B, 1, n, 1)
    mean_before = (qc * before_sum[:, :, :, None, :]).sum(dim=-1) / count_before.clamp(min=1.0)
    m2_before = ((torch.matmul(qc, before_outer) * qc).sum(dim=-1) - count_before * mean_before.square()).clamp(
        min=0.0
    )

    # merge the two groups (Chan et al.'s pairwise update)
    count = count_before + inner_count
    delta = inner_mean - mean_before
    m2 = m2_before + inner_m2 + delta.square() * count_before * inner_count / count.clamp(min=1.0)
    var = m2 / count.clamp(min=1.0)
    count = count.clamp(min=1.0)
    return var.reshape(B, H, n_chunks * c)[:, :, :L, None], count.reshape(B, 1, n_chunks * c)[:, :, :L, None]


def rescaled_queries(
    query: torch.Tensor,
    key: torch.Tensor,
    structure: MaskStructure,
    scale: float,
    gamma: float | torch.Tensor = 1.0,
    max_temperature: float | None = None,
    eps: float = 1e-6,
    statistic: str = "std",
    chunk_size: int = 64,
) -> torch.Tensor:
    """Queries ``q_i * scale / T_i`` such that plain softmax attention on them (scale 1) is NormSoftmax attention.

    ``key`` must already have as many heads as ``query``. Computed in float32 (float64 stays float64) and
    returned in the query dtype.
    """
    compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query.to(compute_dtype)
    k = key.to(compute_dtype)
    key_weight = None if structure.key_valid is None else structure.key_valid.to(compute_dtype)
    if structure.is_causal and query.shape[-2] > 1:
        var, count = _row_variance_causal(q, k, key_weight, chunk_size)
    else:
        var, count = _row_variance_padding(q, k, key_weight)
    temperature = _temperature(var * scale**2, gamma, max_temperature, eps, statistic)
    # A row with a single valid key attends to it with probability 1 whatever q is, so its gradient is exactly
    # zero; dividing by T = sqrt(eps) / gamma would instead amplify SDPA's rounding into a spurious gradient.
    # The factor is formed on the small (B, H, L, 1) tensor so the query tensor is touched once.
    factor = torch.where(count > 1, scale / temperature, 0.0)
    return (q * factor).to(query.dtype)


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NormSoftmax attention, fast and exact: rescaled queries + ``F.scaled_dot_product_attention``.

    Same arguments and result as :func:`normsoftmax_attention_reference`. Takes the reference path (and says so
    in nothing but cost) when weights are requested, for masks that are not key padding and/or causal (see
    :func:`decompose_mask`), and for very short query blocks (decode steps), where it is cheaper.
    """
    _check_inputs(query, key, value, scale, max_temperature, eps, statistic, dropout_p)
    _check_gamma(gamma, query)
    B, H, L, D = query.shape
    S = key.shape[-2]
    if attn_mask is not None:
        _check_mask_shape(attn_mask, B, H, L, S)
    if L > S and is_causal:
        raise ValueError(f"a causal mask needs query_len <= key_len, got query_len={L}, key_len={S}")
    structure = None if return_weights or L <= _REFERENCE_MAX_QUERY_LEN else decompose_mask(
        attn_mask, is_causal, B, L, S
    )
    if structure is None:
        return normsoftmax_attention_reference(
            query, key, value, attn_mask, is_causal, scale, gamma, max_temperature, eps, statistic, dropout_p,
            return_weights,
        )
    key, value = _expand_kv(query, key, value)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q = rescaled_queries(query, key, structure, scale, gamma, max_temperature, eps, statistic)

    key_valid, causal = structure
    sdpa_mask = None
    rows_without_keys = None  # (B, 1, L, 1) bool, or None when every query row has a valid key
    if key_valid is not None:
        if causal:
            mask = key_valid[:, None, None, :] & _causal_valid(L, S, query.device)  # (B, 1, L, S)
            has_key = mask.any(dim=-1, keepdim=True)
        else:
            mask = key_valid[:, None, None, :]  # (B, 1, 1, S): broadcast, no L x S tensor
            has_key = mask.any(dim=-1, keepdim=True)
        if not bool(has_key.all()):
            # fully masked rows would give NaN inside SDPA (and NaN gradients): let them attend everywhere,
            # then zero their output below
            rows_without_keys = ~has_key
            mask = mask | rows_without_keys
        sdpa_mask = mask
    elif causal and L != S:
        sdpa_mask = _causal_valid(L, S, query.device)

    out = F.scaled_dot_product_attention(
        q, key, value, attn_mask=sdpa_mask, dropout_p=dropout_p,
        is_causal=causal and sdpa_mask is None, scale=1.0,
    )
    if rows_without_keys is not None:
        out = out.masked_fill(rows_without_keys.expand(B, 1, L, 1), 0.0)
    return out, None
