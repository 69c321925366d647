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

from .normsoftmax import _check_options, _check_positive_finite, _is_number, norm_softmax

__all__ = [
    "MaskStructure",
    "decompose_mask",
    "normsoftmax_attention",
    "normsoftmax_attention_reference",
    "rescaled_queries",
    "valid_from_mask",
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


def _check_gamma(gamma, query):
    """gamma: positive float, or a positive tensor broadcastable to the row statistics (B, H, L, 1)."""
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
        # a data-dependent check would break torch.compile graphs; eager calls get it
        if not torch.compiler.is_compiling() and gamma.numel() > 0:
            g = gamma.detach()
            if not bool(torch.isfinite(g).all()) or not bool((g > 0).all()):
                raise ValueError(
                    f"gamma must be positive and finite everywhere, got values in [{g.min().item():.4g}, "
                    f"{g.max().item():.4g}]"
                )
    else:
        _check_positive_finite("gamma", gamma)


# ----------------------------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------------------------


def _causal_valid(L: int, S: int, device) -> torch.Tensor:
    """(L, S) bool: query i sees keys j <= i + S - L (bottom-right aligned)."""
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=S - L)


def valid_from_mask(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The bool form (True = attend) of a bool or additive float mask: very negative entries mean 'masked'."""
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return attn_mask
    return attn_mask > torch.finfo(attn_mask.dtype).min / 2


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


def _inner_weight(w, c: int):
    """(B, 1, c, c) weights of a block's own keys: key b is valid and b <= a."""
    lower = torch.ones(c, c, dtype=torch.bool, device=w.device).tril()
    return w[:, :, None, :] * lower


def _chunk_variance(q, kc, w, sum_before, outer_before, count_before):
    """Variance of the logits of a block of c query rows whose keys are: every key before the block (given by
    its moments) plus the keys of the block itself up to the row (causal). Chan et al.'s pairwise merge of the
    two groups; the in-block group uses two passes, exact for the first rows of a sequence where few keys make
    the variance small next to the squared mean.

    q, kc: (B, H, c, D) (kc centred and zeroed at invalid keys); w: (B, 1, c) key weights; sum_before (B, H, D),
    outer_before (B, H, D, D), count_before (B, 1, 1). Returns var (B, H, c), count (B, 1, c).
    """
    inner_weight = _inner_weight(w, q.shape[-2])
    inner = torch.matmul(q, kc.transpose(-1, -2)).mul_(inner_weight)  # (in-place: runs without autograd)
    inner_count = inner_weight.sum(dim=-1)
    inner_mean = inner.sum(dim=-1) / inner_count.clamp(min=1.0)
    inner_m2 = inner.sub_(inner_mean[..., None]).mul_(inner_weight).square_().sum(dim=-1)
    mean_before = torch.matmul(q, sum_before[..., None])[..., 0] / count_before.clamp(min=1.0)
    m2_before = ((torch.matmul(q, outer_before) * q).sum(dim=-1) - count_before * mean_before.square()).clamp(min=0.0)
    count = count_before + inner_count
    delta = inner_mean - mean_before
    m2 = m2_before + inner_m2 + delta.square() * count_before * inner_count / count.clamp(min=1.0)
    return m2 / count.clamp(min=1.0), count


def _chunk_variance_backward(grad_var, q, kc, w, sum_before, outer_before, count_before):
    """Hand-written backward of :func:`_chunk_variance` (recomputes its forward quantities).

    Returns the gradients w.r.t. q, kc (through the in-block logits only), sum_before and outer_before.
    """
    inner_weight = _inner_weight(w, q.shape[-2])
    inner = torch.matmul(q, kc.transpose(-1, -2)).mul_(inner_weight)
    inner_count = inner_weight.sum(dim=-1)
    inner_count_c = inner_count.clamp(min=1.0)
    inner_mean = inner.sum(dim=-1) / inner_count_c
    count_before_c = count_before.clamp(min=1.0)
    q_outer = torch.matmul(q, outer_before)
    mean_before = torch.matmul(q, sum_before[..., None])[..., 0] / count_before_c
    m2_before_raw = (q_outer * q).sum(dim=-1) - count_before * mean_before.square()
    count_c = (count_before + inner_count).clamp(min=1.0)
    delta = inner_mean - mean_before

    grad_m2 = grad_var / count_c
    grad_m2_before = grad_m2 * (m2_before_raw > 0)  # clamp(min=0) passes no gradient where it clipped
    grad_delta = grad_m2 * 2.0 * delta * count_before * inner_count / count_c
    grad_mean_before = -grad_delta - grad_m2_before * 2.0 * count_before * mean_before
    # d m2_inner / d mean_inner = -2 sum_b W (I - mean) = 0, so the in-block mean only carries delta's gradient
    grad_inner = (
        inner.sub_(inner_mean[..., None]).mul_(2.0 * grad_m2[..., None]).add_((grad_delta / inner_count_c)[..., None])
    ).mul_(inner_weight)
    grad_mean_before = grad_mean_before / count_before_c
    grad_q = torch.matmul(grad_inner, kc)
    grad_q.addcmul_(q_outer, (2.0 * grad_m2_before)[..., None])
    grad_q.addcmul_(grad_mean_before[..., None], sum_before[:, :, None, :])
    grad_kc = torch.matmul(grad_inner.transpose(-1, -2), q)
    grad_outer = torch.matmul((q * grad_m2_before[..., None]).transpose(-1, -2), q)
    grad_sum = (q * grad_mean_before[..., None]).sum(dim=-2)
    return grad_q, grad_kc, grad_sum, grad_outer


def _centred_keys(k, key_weight):
    """Keys minus the mean of the valid keys, zeroed at invalid keys; (B, 1, S, 1) weights; (B, 1, 1, 1) count.

    The variance of q . k_j does not depend on the shift; centring keeps the moment formulas from cancelling.
    """
    if key_weight is None:
        w = torch.ones(k.shape[0], 1, k.shape[-2], 1, dtype=k.dtype, device=k.device)
    else:
        w = key_weight[:, None, :, None]
    count = w.sum(dim=-2, keepdim=True)
    mean = torch.matmul(w.transpose(-1, -2), k) / count.clamp(min=1.0)  # no weighted copy of k
    kc = k - mean
    return kc.mul_(w), w, count


# Row block for the non-causal backward: bounds its temporaries to a few (B, H, block, D) tensors.
_BACKWARD_BLOCK = 512


def _key_blocks(kc, w, L: int, chunk_size: int):
    """Walk the query blocks of a causal pass: yield (start, stop, kc_block, w_block, moments before the block).

    Keys before the first query (a KV cache of S - L entries) are seen by every query and start the moments.
    """
    offset = kc.shape[-2] - L
    run_sum = kc[:, :, :offset].sum(dim=-2)
    run_outer = torch.matmul(kc[:, :, :offset].transpose(-1, -2), kc[:, :, :offset])
    run_count = w[:, :, :offset].sum(dim=-1, keepdim=True)
    for start in range(0, L, chunk_size):
        stop = min(start + chunk_size, L)
        kc_block, w_block = kc[:, :, offset + start : offset + stop], w[:, :, offset + start : offset + stop]
        yield start, stop, kc_block, w_block, (run_sum, run_outer, run_count)
        run_sum = run_sum + kc_block.sum(dim=-2)
        run_outer = run_outer + torch.matmul(kc_block.transpose(-1, -2), kc_block)
        run_count = run_count + w_block.sum(dim=-1, keepdim=True)


class _RowVariance(torch.autograd.Function):
    """Per query row, the variance of ``q_i . k_j`` over the row's valid keys, and their number.

    A custom autograd function so that nothing of size L x D beyond q and k themselves is kept for backward
    (the price of NormSoftmax attention over SDPA is then one rescaled copy of the queries). Non-causal rows
    share the key covariance C: var_i = q_i^T C q_i, with a closed-form backward. Causal rows go block by block
    over the queries with running key moments; the backward walks the blocks in reverse with a hand-written
    block backward, carrying the gradient of the running moments.
    """

    @staticmethod
    def forward(ctx, q, k, key_weight, causal: bool, chunk_size: int):
        B, H, L, D = q.shape
        kc, w, total = _centred_keys(k, key_weight)
        ctx.causal, ctx.chunk_size = causal, chunk_size
        ctx.save_for_backward(q, k, key_weight)
        if not causal:
            cov = torch.matmul(kc.transpose(-1, -2), kc) / total.clamp(min=1.0)
            var = (torch.matmul(q, cov) * q).sum(dim=-1, keepdim=True).clamp(min=0.0)
            return var, total.expand(B, 1, L, 1)
        var = q.new_empty(B, H, L)
        count = q.new_empty(B, 1, L)
        for start, stop, kc_block, w_block, before in _key_blocks(kc, w[..., 0], L, chunk_size):
            var[:, :, start:stop], count[:, :, start:stop] = _chunk_variance(
                q[:, :, start:stop], kc_block, w_block, *before
            )
        return var[..., None], count[..., None]

    @staticmethod
    def backward(ctx, grad_var, grad_count):
        q, k, key_weight = ctx.saved_tensors
        kc, w, total = _centred_keys(k, key_weight)
        grad_var = grad_var[..., 0]  # (B, H, L)
        if not ctx.causal:
            cov = torch.matmul(kc.transpose(-1, -2), kc) / total.clamp(min=1.0)
            grad_q = torch.empty_like(q)
            grad_cov = torch.zeros_like(cov)
            for start in range(0, q.shape[-2], _BACKWARD_BLOCK):
                q_block = q[:, :, start : start + _BACKWARD_BLOCK]
                g_block = grad_var[:, :, start : start + _BACKWARD_BLOCK, None]
                torch.mul(torch.matmul(q_block, cov), g_block * 2.0, out=grad_q[:, :, start : start + _BACKWARD_BLOCK])
                grad_cov += torch.matmul((q_block * g_block).transpose(-1, -2), q_block)  # symmetric
            # kc = (k - mean) * w and sum_j w_j (k_j - mean) = 0, so the mean's own gradient term vanishes
            grad_cov *= 2.0 / total.clamp(min=1.0)
            for start in range(0, kc.shape[-2], _BACKWARD_BLOCK):  # in place, block by block: kc becomes grad_k
                block = kc[:, :, start : start + _BACKWARD_BLOCK]
                block.copy_(torch.matmul(block, grad_cov))
            return grad_q, kc, None, None, None

        L = q.shape[-2]
        offset = k.shape[-2] - L
        w = w[..., 0]
        blocks = list(_key_blocks(kc, w, L, ctx.chunk_size))  # keeps only the small per-block moments
        grad_q = torch.empty_like(q)
        grad_kc = torch.empty_like(kc)
        # gradient w.r.t. the running moments, summed over all blocks after the current one (the outer-product
        # gradient is symmetric, so d(sum_j kc_j kc_j^T)/d kc_j contributes 2 * carry_outer @ kc_j)
        carry_sum = torch.zeros_like(blocks[0][4][0])
        carry_outer = torch.zeros_like(blocks[0][4][1])
        for start, stop, kc_block, w_block, before in reversed(blocks):
            g_q, g_kc, g_sum, g_outer = _chunk_variance_backward(
                grad_var[:, :, start:stop], q[:, :, start:stop], kc_block, w_block, *before
            )
            grad_q[:, :, start:stop] = g_q
            # this block's keys enter the running moments of every later block
            grad_kc[:, :, offset + start : offset + stop] = (
                g_kc + carry_sum[:, :, None, :] + 2.0 * torch.matmul(kc_block, carry_outer)
            )
            carry_sum = carry_sum + g_sum
            carry_outer = carry_outer + g_outer
        if offset:
            prefix = kc[:, :, :offset]
            grad_kc[:, :, :offset] = carry_sum[:, :, None, :] + 2.0 * torch.matmul(prefix, carry_outer)
        # kc = (k - mean) * w: the variance ignores the shift, so the mean's gradient is zero analytically and
        # the mean is treated as a constant
        return grad_q, grad_kc.mul_(w[..., None]), None, None, None


def rescaled_queries(
    query: torch.Tensor,
    key: torch.Tensor,
    structure: MaskStructure,
    scale: float,
    gamma: float | torch.Tensor = 1.0,
    max_temperature: float | None = None,
    eps: float = 1e-6,
    statistic: str = "std",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Queries ``q_i * scale / T_i`` such that plain softmax attention on them (scale 1) is NormSoftmax attention.

    ``key`` must already have as many heads as ``query``. Computed in float32 (float64 stays float64) and
    returned in the query dtype.
    """
    compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query.to(compute_dtype)
    k = key.to(compute_dtype)
    key_weight = None if structure.key_valid is None else structure.key_valid.to(compute_dtype)
    causal = structure.is_causal and query.shape[-2] > 1
    if chunk_size is None:
        # block size trades the in-block c x c logits against per-block D x D key moments
        chunk_size = 64 if query.shape[-2] <= 1024 else 128
    var, count = _RowVariance.apply(q, k, key_weight, causal, chunk_size)
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
    structure = (
        None if return_weights or L <= _REFERENCE_MAX_QUERY_LEN else decompose_mask(attn_mask, is_causal, B, L, S)
    )
    if structure is None:
        return normsoftmax_attention_reference(
            query,
            key,
            value,
            attn_mask,
            is_causal,
            scale,
            gamma,
            max_temperature,
            eps,
            statistic,
            dropout_p,
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
        q,
        key,
        value,
        attn_mask=sdpa_mask,
        dropout_p=dropout_p,
        is_causal=causal and sdpa_mask is None,
        scale=1.0,
    )
    if rows_without_keys is not None:
        out = out.masked_fill(rows_without_keys.expand(B, 1, L, 1), 0.0)
    return out, None
