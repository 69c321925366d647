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

from .normsoftmax import _check_options, _check_positive_finite, _inverse_temperature, _is_number, norm_softmax

__all__ = [
    "MaskStructure",
    "decompose_mask",
    "normsoftmax_attention",
    "normsoftmax_attention_reference",
    "valid_from_mask",
]

# The reference path is cheaper than the fast path's key statistics for very few query rows (decode steps) and
# for short sequences: up to this many logits per head it materialises them (measured on CPU, fp32, d=64: the
# reference wins up to about 100 tokens, the fast path from about 128; benchmarks/bench_attention.py --length).
_REFERENCE_MAX_QUERY_LEN = 8
_REFERENCE_MAX_LOGITS = 96 * 96
# Query rows per step when checking a mask's structure: bounds the (B, rows, S) temporaries.
_MASK_CHECK_ROWS = 256


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

# Causal rows go in blocks of query rows: a block's own keys give a small c x c tile of logits, every key before
# the block enters through its running moments (a D vector and a D x D matrix per block). Blocks are processed
# together, vectorised, in groups whose D x D moments stay below _GROUP_MOMENT_FLOATS floats (bounds memory).
_CAUSAL_BLOCK, _CAUSAL_BLOCK_LONG, _CAUSAL_LONG_FROM = 64, 128, 1024
_GROUP_MOMENT_FLOATS = 2**18
# Up to this many bytes (per call), the forward keeps for the backward what it would otherwise recompute there: the
# rescaled queries (CPU kernel) and, causal, the in-block logits, query-moment products and centred keys (two of
# the nine block matmuls and several passes); the backward then also writes its final gradients in the inputs'
# layout (see _FastAttention._gradient_buffers). Above it everything is recomputed or done in place, so long
# sequences keep stock SDPA's memory.
_KEEP_FOR_BACKWARD_BYTES = 2**25
# The non-causal statistics take query rows and keys in chunks through small reused (B, H, rows, D) buffers of
# about _CHUNK_BYTES, which stay in cache: a fresh q-sized temporary costs more (page faults, memory traffic) than
# the arithmetic done in it. At least _MIN_CHUNK_ROWS rows per chunk (bounds the number of steps), at most
# _ROW_BLOCK.
_CHUNK_BYTES = 2**20
_MIN_CHUNK_ROWS = 32
_ROW_BLOCK = 1024


def _rows_per_chunk(x: torch.Tensor) -> int:
    """Rows of a (B, H, L, D) tensor per chunk of the non-causal statistics (see _CHUNK_BYTES)."""
    B, H, L, D = x.shape
    rows = _CHUNK_BYTES // max(1, B * H * D * x.element_size())
    return max(1, min(L, _ROW_BLOCK, max(_MIN_CHUNK_ROWS, rows)))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product over the last dim, keeping it: (B, H, L, D), (B, H, L, D) -> (B, H, L, 1). Contiguous
    inputs go through a batched (1 x D) @ (D x 1) product (no product temporary); others (a kernel's strided
    gradient) in row chunks through one small product buffer."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1))[..., 0]
    out = a.new_empty(*a.shape[:-1], 1)
    n = _rows_per_chunk(a)
    buffer = _scratch(a, n)
    for start in range(0, a.shape[-2], n):
        rows = slice(start, start + n)
        product = torch.mul(a[:, :, rows], b[:, :, rows], out=_rows_of(buffer, out[:, :, rows].shape[-2]))
        torch.sum(product, dim=-1, keepdim=True, out=out[:, :, rows])
    return out


def _key_mean(k, key_weight):
    """Mean of the valid keys (B, H, 1, D), key weights w (B, 1, S) (ones without padding), their number
    (B, 1, 1, 1). The variance of q . k_j does not depend on a shift of the keys; centring them on their mean keeps
    the moment formulas from cancelling. Keys are centred slice by slice (:func:`_centred`), never all at once."""
    B, S = k.shape[0], k.shape[-2]
    if key_weight is None:
        w = torch.ones(B, 1, S, dtype=k.dtype, device=k.device)
        return k.mean(dim=-2, keepdim=True), w, torch.full((B, 1, 1, 1), float(S), dtype=k.dtype, device=k.device)
    w = key_weight[:, None, :]
    count = w.sum(dim=-1)[..., None, None]
    return torch.matmul(w[..., None, :], k) / count.clamp(min=1.0), w, count  # no weighted copy of k


def _centred(k_rows, mean, w_rows, out=None):
    """Keys of a slice minus the mean, zeroed at invalid keys (w_rows None: no padding), written into ``out`` if
    given. k_rows (B, H, ..., D), w_rows (B, 1, ...)."""
    centred = torch.sub(k_rows, mean.view(*mean.shape[:2], *[1] * (k_rows.dim() - 3), -1), out=out)
    return centred if w_rows is None else centred.mul_(w_rows[..., None])


def _baddbmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """out += alpha * a @ b in place, for a contiguous ``out`` (..., m, n) and a, b of the same batch shape: one
    batched GEMM that accumulates into ``out`` (no product temporary, no separate add pass)."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), alpha=alpha)
    return out


def _moments_before_blocks(block_moment: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """Per block b (dim 2): ``run`` + the sum of the blocks before b. (A loop of adds over the few blocks of a
    group: cumsum along a middle dim is a slow strided loop on CPU.)"""
    before = torch.empty_like(block_moment)
    before[:, :, 0] = run
    for b in range(1, block_moment.shape[2]):
        torch.add(before[:, :, b - 1], block_moment[:, :, b - 1], out=before[:, :, b])
    return before


def _moments_after_blocks(block_grad: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """Per block b (dim 2): ``carry`` + the sum of the blocks after b."""
    if block_grad.shape[2] == 1:
        return carry[:, :, None]
    after = torch.empty_like(block_grad)
    after[:, :, -1] = carry
    for b in range(block_grad.shape[2] - 2, -1, -1):
        torch.add(after[:, :, b + 1], block_grad[:, :, b + 1], out=after[:, :, b])
    return after


class _CausalGroup(NamedTuple):
    """Query rows [start, start + n * c) as n blocks of c rows, with the key moments of everything before them."""

    start: int
    n: int
    c: int
    run_sum: torch.Tensor  # (B, H, D): sum of the centred keys before the group
    run_outer: torch.Tensor  # (B, H, D, D): sum of their outer products
    kept: tuple | None = None  # block products of the forward, for the backward (see _KEEP_FOR_BACKWARD_BYTES)

    def rows(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(B, H, L, D) -> this group's rows as (B, H, n, c, D); ``offset`` skips a KV-cache prefix."""
        return x[..., offset + self.start : offset + self.start + self.n * self.c, :].unflatten(-2, (self.n, self.c))

    def values(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(..., L) per-row values (or (..., S) per-key weights with ``offset``) -> (..., n, c)."""
        return x[..., offset + self.start : offset + self.start + self.n * self.c].unflatten(-1, (self.n, self.c))

    def moments_before(self, kc_rows, with_after: bool = True):
        """Key moments (sum, outer-product sum) before each block: the running moments plus the earlier blocks of
        the group; and (if ``with_after``) the moments after the whole group. A one-block group's moments before
        are its running moments: nothing is computed for them (the backward asks for nothing else)."""
        if self.n == 1 and not with_after:
            return (self.run_sum[:, :, None], self.run_outer[:, :, None]), None
        block_sum = kc_rows.sum(dim=-2)  # (B, H, n, D)
        block_outer = torch.matmul(kc_rows.transpose(-1, -2), kc_rows)  # (B, H, n, D, D)
        if self.n == 1:
            before = (self.run_sum[:, :, None], self.run_outer[:, :, None])
            return before, (self.run_sum + block_sum[:, :, 0], block_outer[:, :, 0].add_(self.run_outer))
        sum_before = _moments_before_blocks(block_sum, self.run_sum)
        outer_before = _moments_before_blocks(block_outer, self.run_outer)
        after = (sum_before[:, :, -1] + block_sum[:, :, -1], outer_before[:, :, -1] + block_outer[:, :, -1])
        return (sum_before, outer_before), after


def _causal_spans(L: int, block: int, moment_floats: int) -> list[tuple[int, int, int]]:
    """(start, n, c) per group: n blocks of c query rows; groups hold at most _GROUP_MOMENT_FLOATS of moments."""
    per_group = max(1, _GROUP_MOMENT_FLOATS // moment_floats)
    full = L // block
    spans = [(b * block, min(per_group, full - b), block) for b in range(0, full, per_group)]
    if L % block:
        spans.append((full * block, 1, L % block))
    return spans


class _CausalRows(NamedTuple):
    """Per-row terms of the causal variance, (B, H, L) or counts (B, 1, L); kept for the backward.

    Row i's keys are split in two groups: every valid key before its block ("before": count, mean logit, sum of
    squared deviations m2) and the valid keys of its own block up to i ("inner"). Chan et al.'s pairwise merge:
    m2 = m2_before + m2_inner + delta^2 * count_before * count_inner / count, delta = mean_inner - mean_before.
    The inner group uses two passes (exact for the first rows of a sequence, where few keys make the variance
    small next to the squared mean); the before group comes from the key moments, m2 = q^T O q - n mean^2.
    """

    count: torch.Tensor
    count_before: torch.Tensor
    count_inner: torch.Tensor
    mean_inner: torch.Tensor
    mean_before: torch.Tensor
    m2_before_raw: torch.Tensor  # before clamping at 0 (rounding): the clamp passes no gradient where it clipped
    delta: torch.Tensor


def _causal_counts(w, L: int, offset: int, block: int):
    """Valid keys per row (B, 1, L): in all, before the row's block, and in the block up to the row."""
    seen = w.cumsum(dim=-1)  # (B, 1, S): valid keys up to each key
    count = seen[..., offset : offset + L]
    block_start = torch.arange(L, device=w.device) // block * block + offset  # key index where the row's block starts
    before = seen.index_select(-1, (block_start - 1).clamp(min=0)) * (block_start > 0)
    return count, before, count - before


def _block_weight(lower, w_rows, padded: bool):
    """(B, 1, n, c, c) 0/1 weights of a block's own keys for its rows (key b valid and b <= a), or the shared
    lower triangle (c, c) without padding."""
    c = w_rows.shape[-1]
    return w_rows[..., None, :] * lower[:c, :c] if padded else lower[:c, :c]


def _causal_statistics(q, k, mean, w, padded: bool, block: int, keep: bool):
    """Causal rows: per-row logit variance (B, H, L, 1), valid-key count (B, 1, L, 1), and for the backward the
    groups (running key moments and, when small enough, their block products) with the per-row terms.
    mean: of the valid keys; w: (B, 1, S) key weights.

    The loop over blocks computes only what needs the keys (block matmuls and their row reductions); the merge of
    the two key groups of every row runs once, vectorised over all rows (see :class:`_CausalRows`)."""
    B, H, L, D = q.shape
    offset = k.shape[-2] - L
    prefix = _centred(k[:, :, :offset], mean, w[:, :, :offset] if padded else None)  # a KV cache: seen by all
    run_sum, run_outer = prefix.sum(dim=-2), torch.matmul(prefix.transpose(-1, -2), prefix)
    count, count_before, count_inner = _causal_counts(w, L, offset, block)
    inv_inner = 1.0 / count_inner.clamp(min=1.0)
    lower = torch.ones(block, block, dtype=q.dtype, device=q.device).tril_()
    mean_inner, m2_inner, dot_sum, dot_outer = (q.new_empty(B, H, L) for _ in range(4))
    groups = []
    for start, n, c in _causal_spans(L, block, B * H * D * D):
        group = _CausalGroup(start, n, c, run_sum, run_outer)
        kc_rows = _centred(group.rows(k, offset), mean, group.values(w, offset) if padded else None)
        (sum_before, outer_before), (run_sum, run_outer) = group.moments_before(kc_rows)
        weight = _block_weight(lower, group.values(w, offset), padded)
        q_rows = group.rows(q)
        inner = torch.matmul(q_rows, kc_rows.transpose(-1, -2)).mul_(weight)  # (in-place: runs without autograd)
        block_mean = group.values(mean_inner)
        torch.mul(inner.sum(dim=-1), group.values(inv_inner), out=block_mean)
        centred = inner.addcmul_(weight, block_mean[..., None], value=-1.0)  # (logit - mean) * weight, one pass
        group.values(m2_inner).copy_(torch.linalg.vector_norm(centred, dim=-1).square_())
        q_outer = torch.matmul(q_rows, outer_before)
        group.values(dot_outer).copy_(torch.linalg.vecdot(q_outer, q_rows))
        group.values(dot_sum).copy_(torch.matmul(q_rows, sum_before[..., None])[..., 0])
        groups.append(group._replace(kept=(centred, q_outer, kc_rows) if keep else None))
    mean_before = dot_sum / count_before.clamp(min=1.0)
    m2_before_raw = dot_outer - count_before * mean_before.square()
    delta = mean_inner - mean_before
    total = count.clamp(min=1.0)
    m2 = m2_before_raw.clamp(min=0.0) + m2_inner + delta.square() * count_before * count_inner / total
    terms = _CausalRows(count, count_before, count_inner, mean_inner, mean_before, m2_before_raw, delta)
    return (m2 / total)[..., None], count[..., None], (groups, terms)


def _causal_backward(grad_q, grad_k, out_q, out_k, factor, q_base, inv_scale, grad_var, k, key_weight, stats, block):
    """Causal rows: the per-row gradient coefficients first (vectorised), then the groups in reverse, carrying the
    gradient of the running key moments to the keys of earlier blocks. Writes factor * grad_q + (variance term)
    into out_q and grad_k + (the keys' variance term) into out_k, every row once (out_* may be grad_* itself)."""
    groups, terms = stats
    padded = key_weight is not None
    mean, w, _ = _key_mean(k, key_weight)
    L = q_base.shape[-2]
    offset = k.shape[-2] - L
    total = terms.count.clamp(min=1.0)
    grad_m2 = grad_var[..., 0] / total
    grad_m2_before = torch.where(terms.m2_before_raw > 0, grad_m2, 0.0)
    grad_delta = 2.0 * grad_m2 * terms.delta * terms.count_before * terms.count_inner / total
    # gradient w.r.t. q . sum_before (through mean_before); the inner mean only carries delta's gradient, since
    # d m2_inner / d mean_inner = -2 sum_b W (logit - mean) = 0
    coef_sum = (-grad_delta - 2.0 * grad_m2_before * terms.count_before * terms.mean_before) / terms.count_before.clamp(
        min=1.0
    )
    coef_centred, coef_weight = 2.0 * grad_m2, grad_delta / terms.count_inner.clamp(min=1.0)
    coef_outer = 2.0 * grad_m2_before
    lower = torch.ones(block, block, dtype=q_base.dtype, device=q_base.device).tril_()
    carry_sum = torch.zeros_like(groups[0].run_sum)
    carry_outer = torch.zeros_like(groups[0].run_outer)
    for group in reversed(groups):
        w_rows = group.values(w, offset)
        weight = _block_weight(lower, w_rows, padded)
        q_rows = group.rows(q_base)
        if inv_scale is not None:
            q_rows = q_rows * group.rows(inv_scale)
        if group.kept is None:
            kc_rows = _centred(group.rows(k, offset), mean, w_rows if padded else None)
            (sum_before, outer_before), _ = group.moments_before(kc_rows, with_after=False)
            inner = torch.matmul(q_rows, kc_rows.transpose(-1, -2)).mul_(weight)
            centred = inner.addcmul_(weight, group.values(terms.mean_inner)[..., None], value=-1.0)
            q_outer = torch.matmul(q_rows, outer_before)
        else:
            centred, q_outer, kc_rows = group.kept  # read only: a second backward (retain_graph) reads them again
            (sum_before, outer_before), _ = group.moments_before(kc_rows, with_after=False)
        # gradient w.r.t. the in-block logits, zero outside the causal block (so g_inner^T q is kc's gradient)
        g_inner = torch.mul(weight, group.values(coef_weight)[..., None])
        g_inner.addcmul_(centred, group.values(coef_centred)[..., None])
        g_q = torch.mul(q_outer, group.values(coef_outer)[..., None])
        block_coef_sum = group.values(coef_sum)
        g_q.addcmul_(block_coef_sum[..., None], sum_before[..., None, :])
        _baddbmm_(g_q, g_inner, kc_rows)
        torch.addcmul(g_q, group.rows(grad_q), group.rows(factor), out=group.rows(out_q))
        g_outer = torch.matmul((q_rows * group.values(grad_m2_before)[..., None]).transpose(-1, -2), q_rows)
        g_sum = torch.matmul(block_coef_sum[..., None, :], q_rows)[..., 0, :]
        # a block's keys enter the moments of the later blocks of its group and of every later group; the
        # outer-product gradient is symmetric, so d(kc kc^T)/d kc contributes 2 kc G. kc and g_inner are zero
        # at padded keys; the sum term is masked explicitly (padded keys get no gradient)
        sum_grad = _moments_after_blocks(g_sum, carry_sum)
        outer_grad = _moments_after_blocks(g_outer, carry_outer)
        g_kc = torch.matmul(g_inner.transpose(-1, -2), q_rows)
        _baddbmm_(g_kc, kc_rows, outer_grad, alpha=2.0)
        if padded:
            g_kc.addcmul_(w_rows[..., None], sum_grad[..., None, :])
        else:
            g_kc.add_(sum_grad[..., None, :])
        torch.add(group.rows(grad_k, offset), g_kc, out=group.rows(out_k, offset))
        carry_sum = sum_grad[:, :, 0] + g_sum[:, :, 0]
        carry_outer = outer_grad[:, :, 0].add_(g_outer[:, :, 0])  # in place: outer_grad is ours and used above
    if offset:
        prefix = _centred(k[:, :, :offset], mean, w[:, :, :offset] if padded else None)
        prefix_grad = torch.matmul(prefix, carry_outer).mul_(2.0).add_(carry_sum[:, :, None])
        torch.add(grad_k[:, :, :offset], prefix_grad.mul_(w[..., :offset, None]), out=out_k[:, :, :offset])
    # kc = (k - mean) * w: the variance ignores the shift, so the mean's gradient is zero analytically


class _FastSettings(NamedTuple):
    """Everything about one fast-path call that is not a tensor the gradients flow to."""

    scale: float
    max_temperature: float | None
    eps: float
    statistic: str
    dropout_p: float
    causal: bool  # rows see growing key sets (causal statistics)
    block: int  # query rows per causal block
    # the kernel: torch's CPU flash kernel called directly (CPU, no dropout, not compiling), else SDPA
    cpu_flash: bool
    sdpa_mask: torch.Tensor | None  # bool mask for the kernel (key padding only when sdpa_is_causal), or None
    sdpa_is_causal: bool
    # (B, 1, L, 1) query rows without any valid key, or None: they would give NaN inside SDPA (and NaN gradients),
    # so they attend everywhere and their output is zeroed afterwards
    rows_without_keys: torch.Tensor | None


def _scratch(like: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialised contiguous (B, H, rows, D) buffer; ``_rows_of(buffer, n)`` views its first n rows."""
    return like.new_empty(*like.shape[:2], rows, like.shape[-1])


def _rows_of(buffer: torch.Tensor, n: int) -> torch.Tensor:
    """The contiguous (B, H, n, D) view at the start of a scratch buffer's storage."""
    return buffer.view(-1)[: buffer.shape[0] * buffer.shape[1] * n * buffer.shape[-1]].view(*buffer.shape[:2], n, -1)


def _covariance_statistics(q, k, mean, w, total):
    """Non-causal rows: every row sees the same keys, var_i = q_i^T C q_i with C their covariance. Keys and rows
    go in chunks through one small buffer (centred keys, then C q). w: (B, 1, S) key weights or None (no
    padding)."""
    L, S = q.shape[-2], k.shape[-2]
    n = _rows_per_chunk(q)
    buffer = _scratch(q, min(max(L, S), n))
    cov = torch.zeros(*k.shape[:2], k.shape[-1], k.shape[-1], dtype=k.dtype, device=k.device)
    for start in range(0, S, n):
        keys = k[:, :, start : start + n]
        w_rows = None if w is None else w[:, :, start : start + n]
        kc = _centred(keys, mean, w_rows, out=_rows_of(buffer, keys.shape[-2]))
        _baddbmm_(cov, kc.transpose(-1, -2), kc)
    cov.div_(total.clamp(min=1.0))
    var = q.new_empty(*q.shape[:-1], 1)
    for start in range(0, L, n):
        rows = q[:, :, start : start + n]
        q_cov = torch.matmul(rows, cov, out=_rows_of(buffer, rows.shape[-2]))
        torch.sum(q_cov.mul_(rows), dim=-1, keepdim=True, out=var[:, :, start : start + n])
    return var.clamp_(min=0.0), total, (cov, mean)


def _row_statistics(q, k, key_weight, settings: _FastSettings, keep: bool = False):
    """Per query row: variance of q_i . k_j over its valid keys (B, H, L, 1), their number (broadcastable to
    (B, 1, L, 1)) and the key statistics the backward reuses (the covariance and mean, or the causal groups)."""
    mean, w, total = _key_mean(k, key_weight)
    if not settings.causal:
        return _covariance_statistics(q, k, mean, w if key_weight is not None else None, total)
    return _causal_statistics(q, k, mean, w, key_weight is not None, settings.block, keep)


def _keeps_for_backward(query: torch.Tensor, settings: _FastSettings) -> bool:
    """Whether this call's backward gets what it would recompute (see _KEEP_FOR_BACKWARD_BYTES)."""
    B, H, L, D = query.shape
    compute_bytes = torch.finfo(_compute_dtype(query.dtype)).bits // 8
    # causal: block logits, query-moment products, centred keys; CPU kernel: the rescaled queries
    kept = B * H * L * (settings.block + 2 * D) * compute_bytes if settings.causal else 0
    kept += query.numel() * query.element_size() if settings.cpu_flash else 0
    return kept <= _KEEP_FOR_BACKWARD_BYTES


class _RowFactor(NamedTuple):
    """The per-row query factor ``scale / T_i`` (B, H, L, 1) and what its gradients need."""

    factor: torch.Tensor
    inv_temperature: torch.Tensor  # 1 / T_i = gamma / spread_i (capped)
    spread_base: torch.Tensor  # var_i * scale^2 + eps: spread_i is its square root ("std") or itself ("var")
    # where the factor varies with var and gamma: rows with at least two valid keys whose cap is not active
    live: torch.Tensor
    power: float  # 1/T = gamma * spread_base^(-power): 0.5 for "std", 1 for "var"


def _row_factor(var, count, gamma, settings: _FastSettings) -> _RowFactor:
    """scale / T per row, T from the variance of the scaled logits exactly as in :func:`norm_softmax`. A row with
    a single valid key attends to it with probability 1 whatever q is, so its gradient is exactly zero; dividing by
    T = sqrt(eps) / gamma would instead amplify SDPA's rounding into a spurious gradient: such rows (and rows
    without keys) get factor 0."""
    inv_cap, eps, power = _check_options(settings.max_temperature, settings.eps, settings.statistic)
    var = var * settings.scale**2
    inv_temperature, uncapped = _inverse_temperature(var, gamma, inv_cap, eps, power)
    live = count > 1 if uncapped is None else (count > 1) & uncapped
    factor = torch.where(count > 1, inv_temperature * settings.scale, 0.0)
    return _RowFactor(factor, inv_temperature, var.add_(eps), live, power)


def _row_factor_gradients(row: _RowFactor, grad_factor, gamma_spec, settings: _FastSettings):
    """dL/dvar_i and dL/dgamma from dL/dfactor_i. gamma_spec: (shape, dtype) of a gamma tensor that requires
    grad, else None (no gamma gradient). With 1/T = gamma * spread_base^(-power): d(1/T)/dvar =
    -power * scale^2 * (1/T) / spread_base and d(1/T)/dgamma = spread_base^(-power), both 0 where the factor is
    constant."""
    grad_inv = torch.where(row.live, grad_factor * settings.scale, 0.0)  # dL/d(1/T)
    grad_var = grad_inv * row.inv_temperature * (-row.power * settings.scale**2) / row.spread_base
    if gamma_spec is None:
        return grad_var, None
    spread_inv = row.spread_base.rsqrt() if row.power == 0.5 else row.spread_base.reciprocal()
    shape, dtype = gamma_spec
    return grad_var, (grad_inv * spread_inv).sum_to_size(shape).to(dtype)


def _sdpa(q_scaled, key, value, settings: _FastSettings):
    mask = settings.sdpa_mask
    if settings.rows_without_keys is not None:
        mask = mask | settings.rows_without_keys
    return F.scaled_dot_product_attention(
        q_scaled,
        key,
        value,
        attn_mask=mask,
        dropout_p=settings.dropout_p,
        is_causal=settings.sdpa_is_causal,
        scale=1.0,
    )


def _rescaled(q, factor, dtype):
    """q * factor, written in the query dtype (no compute-dtype temporary)."""
    return torch.mul(q, factor, out=torch.empty(q.shape, dtype=dtype, device=q.device))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _covariance_backward(
    grad_q, grad_k, out_q, out_k, factor, q_base, inv_scale, grad_var, k, key_weight, stats, total
):
    """Non-causal rows, var_i = q_i^T C q_i with C the covariance of the valid keys. Writes factor_i * grad_q_i +
    2 grad_var_i C q_i into out_q and grad_k + (the gradient through C) into out_k (out_* may be grad_* itself).
    q_i = q_base_i * inv_scale_i (inv_scale None: 1). Rows and keys go in chunks through two small buffers."""
    cov, mean = stats
    L, S = q_base.shape[-2], k.shape[-2]
    n = _rows_per_chunk(q_base)
    weighted_buffer, product_buffer = (_scratch(q_base, min(max(L, S), n)) for _ in range(2))
    # C q = inv_scale * C q_base; sum_i 2 grad_var_i q_i q_i^T = sum_i (coef_q_i inv_scale_i) q_base_i q_base_i^T
    coef_q = 2.0 * grad_var if inv_scale is None else 2.0 * grad_var * inv_scale
    grad_cov = torch.zeros_like(cov)
    for start in range(0, L, n):
        rows, grad_rows = q_base[:, :, start : start + n], grad_q[:, :, start : start + n]
        weighted = torch.mul(rows, coef_q[:, :, start : start + n], out=_rows_of(weighted_buffer, rows.shape[-2]))
        # one pass over SDPA's (strided) gradient: grad_rows = factor * grad_rows + (coef_q q_base) C
        q_cov = torch.matmul(weighted, cov, out=_rows_of(product_buffer, rows.shape[-2]))
        torch.addcmul(q_cov, grad_rows, factor[:, :, start : start + n], out=out_q[:, :, start : start + n])
        if inv_scale is not None:
            weighted.mul_(inv_scale[:, :, start : start + n])
        _baddbmm_(grad_cov, weighted.transpose(-1, -2), rows)
    # C = (k - mean)^T W (k - mean) / n and sum_j w_j (k_j - mean) = 0: the mean's own gradient term vanishes
    grad_cov.div_(total.clamp(min=1.0))
    mean_term = torch.matmul(mean, grad_cov)
    for start in range(0, S, n):
        keys = k[:, :, start : start + n]
        term = torch.matmul(keys, grad_cov, out=_rows_of(product_buffer, keys.shape[-2])).sub_(mean_term)
        keys_out = out_k[:, :, start : start + n]
        if key_weight is None:
            torch.add(grad_k[:, :, start : start + n], term, out=keys_out)
        else:  # padded keys get no gradient (they affect no output)
            torch.addcmul(
                grad_k[:, :, start : start + n], term, key_weight[:, None, start : start + n, None], out=keys_out
            )


# torch's CPU flash-attention kernel, called directly so that the fast path keeps the input queries (which stock SDPA
# keeps too) instead of their rescaled copy, and rescales them again in the backward: same memory as stock SDPA.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _cpu_flash_available(device: torch.device, dropout_p: float) -> bool:
    return (
        _CPU_FLASH is not None
        and _CPU_FLASH_BACKWARD is not None
        and device.type == "cpu"
        and dropout_p == 0.0  # the CPU kernel has no dropout
        and not torch.compiler.is_compiling()
    )


def _additive_mask(settings: _FastSettings, dtype: torch.dtype) -> torch.Tensor | None:
    """The CPU kernel takes an additive mask in the query dtype (SDPA converts bool masks the same way)."""
    if settings.sdpa_mask is None:
        return None
    if settings.sdpa_is_causal:
        # a (B, 1, 1, S) key-padding mask beside the kernel's own causal mask: rows without keys cannot be given a
        # row of their own, so padded keys get the most negative finite value instead of -inf; such a row then
        # attends to its (padded) keys with finite weights (its output and gradient are zeroed), while any row with
        # a valid key gives exactly zero weight to padded ones
        padded = ~settings.sdpa_mask
        return torch.zeros(padded.shape, dtype=dtype, device=padded.device).masked_fill_(padded, torch.finfo(dtype).min)
    mask = torch.where(settings.sdpa_mask, 0.0, float("-inf")).to(dtype)
    if settings.rows_without_keys is not None:
        mask.masked_fill_(settings.rows_without_keys, 0.0)
    return mask


# Above this many bytes of queries, the CPU backward goes in slices of (batch, heads): the rescaled queries and the
# kernel's own buffers then exist one slice at a time (peak memory), for one extra copy of the gradients.
_BACKWARD_SLICE_BYTES = 2**24


def _head_slices(B: int, H: int, n: int):
    """About n (batch, heads) index slices covering (B, H): whole batch rows when they divide evenly, else heads."""
    per = -(-B * H // n)
    if per >= H:
        step = per // H
        return [(slice(b, min(b + step, B)), slice(None)) for b in range(0, B, step)]
    return [(slice(b, b + 1), slice(h, min(h + per, H))) for b in range(B) for h in range(0, H, per)]


def _cpu_flash_backward(
    grad_out, q, factor, q_scaled, dtype, key, value, out, logsumexp, mask, settings: _FastSettings
):
    """The CPU kernel's gradients w.r.t. (q * factor, key, value); the rescaled queries are ``q_scaled`` when the
    forward kept them, else rebuilt on the fly."""

    def kernel(index):
        mask_slice = None if mask is None else mask[index[0]]  # (B, 1, ., S): heads broadcast
        grad_slice = grad_out[index]
        if settings.rows_without_keys is not None:  # those rows' output is the constant 0
            grad_slice = grad_slice.masked_fill(settings.rows_without_keys[index[0]], 0.0)
        return _CPU_FLASH_BACKWARD(
            grad_slice,
            q[index].mul(factor[index]).to(dtype) if q_scaled is None else q_scaled[index],
            key[index],
            value[index],
            out[index],
            logsumexp[index],
            0.0,
            settings.sdpa_is_causal,
            attn_mask=mask_slice,
            scale=1.0,
        )

    B, H = q.shape[:2]
    n = -(-q.numel() * torch.finfo(dtype).bits // 8 // _BACKWARD_SLICE_BYTES)
    if n <= 1:
        return kernel((slice(None), slice(None)))
    grads = (torch.empty(q.shape, dtype=dtype), torch.empty_like(key), torch.empty_like(value))
    for index in _head_slices(B, H, n):
        for full, part in zip(grads, kernel(index), strict=True):
            full[index] = part
    return grads


def _fast_attention_no_grad(query, key, value, gamma, key_weight, settings: _FastSettings):
    """The fast path when no gradient is needed (inference): the same computation without keeping anything."""
    with torch.autocast(query.device.type, enabled=False):
        return _fast_attention_no_grad_impl(query, key, value, gamma, key_weight, settings)


def _fast_attention_no_grad_impl(query, key, value, gamma, key_weight, settings: _FastSettings):
    compute_dtype = _compute_dtype(query.dtype)
    q = query.to(compute_dtype)
    var, count, _ = _row_statistics(q, key.to(compute_dtype), key_weight, settings)
    factor = _row_factor(var, count, gamma, settings).factor
    q_scaled = _rescaled(q, factor, query.dtype)
    if settings.cpu_flash:  # the kernel the training path calls: bit-identical outputs
        mask = _additive_mask(settings, query.dtype)
        out = _CPU_FLASH(q_scaled, key, value, 0.0, settings.sdpa_is_causal, attn_mask=mask, scale=1.0)[0]
    else:
        out = _sdpa(q_scaled, key, value, settings)
    if settings.rows_without_keys is not None:
        out.masked_fill_(settings.rows_without_keys, 0.0)
    return out


class _FastAttention(torch.autograd.Function):
    """NormSoftmax attention as SDPA on rescaled queries, with one backward for the whole computation.

    Forward: per-row logit variance from key moments, the row factor ``scale / T_i``, then SDPA on
    ``q_i * scale / T_i``. The backward takes SDPA's gradients and folds the factor and variance terms into them
    in place (no second query-sized gradient). On CPU (no dropout) torch's flash kernel is called directly and the
    input queries are kept, as stock SDPA keeps them; elsewhere SDPA runs on detached inputs inside its own small
    graph, and the queries are recovered as ``q_scaled / factor`` (half precision keeps the input instead).
    """

    @staticmethod
    def forward(ctx, query, key, value, gamma, key_weight, settings: _FastSettings):
        with torch.autocast(query.device.type, enabled=False):  # statistics in float32 by design
            return _FastAttention._forward(ctx, query, key, value, gamma, key_weight, settings)

    @staticmethod
    def _forward(ctx, query, key, value, gamma, key_weight, settings: _FastSettings):
        compute_dtype = _compute_dtype(query.dtype)
        q = query.detach().to(compute_dtype)
        keep = _keeps_for_backward(query, settings)
        var, count, stats = _row_statistics(q, key.detach().to(compute_dtype), key_weight, settings, keep)
        row = _row_factor(var, count, gamma.detach() if isinstance(gamma, torch.Tensor) else gamma, settings)
        wants_gamma = isinstance(gamma, torch.Tensor) and gamma.requires_grad
        ctx.row, ctx.gamma_spec = row, ((gamma.shape, gamma.dtype) if wants_gamma else None)
        ctx.stats, ctx.count, ctx.settings = stats, count, settings
        q_scaled = _rescaled(q, row.factor, query.dtype)
        if settings.cpu_flash:
            ctx.q_scaled = q_scaled if keep else None  # else rebuilt in the backward
            mask = _additive_mask(settings, query.dtype)
            out, logsumexp = _CPU_FLASH(q_scaled, key, value, 0.0, settings.sdpa_is_causal, attn_mask=mask, scale=1.0)
            if settings.rows_without_keys is not None:  # in place: their gradient is zeroed in the backward
                out.masked_fill_(settings.rows_without_keys, 0.0)
            ctx.save_for_backward(query, key, value, key_weight, out, logsumexp, mask)
            return out
        with torch.enable_grad():
            q_scaled.requires_grad_()
            key_leaf = key.detach().requires_grad_()
            value_leaf = value.detach().requires_grad_()
            out = _sdpa(q_scaled, key_leaf, value_leaf, settings)
        # the SDPA graph is held here (not saved) so that the first backward can free it as it goes; a second
        # backward through a retained graph (retain_graph=True, gradcheck) rebuilds it from the saved tensors
        ctx.sdpa_graph = (out, q_scaled, key_leaf, value_leaf)
        ctx.save_for_backward(q_scaled, key, value, key_weight, None if query.dtype == compute_dtype else query)
        if settings.rows_without_keys is not None:
            return out.detach().masked_fill(settings.rows_without_keys, 0.0)
        return out.detach()

    @staticmethod
    def _sdpa_gradients(ctx, grad_out):
        """SDPA's gradients w.r.t. (q_scaled, key, value), and the queries as ``q_base * inv_scale`` per row
        (``inv_scale`` None: ``q_base`` are the queries)."""
        settings = ctx.settings
        factor = ctx.row.factor
        if settings.cpu_flash:
            query, key, value, key_weight, out, logsumexp, mask = ctx.saved_tensors
            q = query.to(factor.dtype)
            grads = _cpu_flash_backward(
                grad_out, q, factor, ctx.q_scaled, query.dtype, key, value, out, logsumexp, mask, settings
            )
            return grads, key, key_weight, q, None
        q_scaled, key, value, key_weight, query_half = ctx.saved_tensors
        if ctx.sdpa_graph is not None:
            out, q_leaf, key_leaf, value_leaf = ctx.sdpa_graph
            ctx.sdpa_graph = None
        elif settings.dropout_p > 0:
            raise RuntimeError(
                "NormSoftmax attention with dropout_p > 0 cannot be backpropagated a second time "
                "(retain_graph=True): its dropout mask is not kept. Use dropout_p=0 or normsoftmax_attention_reference."
            )
        else:
            q_leaf, key_leaf, value_leaf = (t.detach().requires_grad_() for t in (q_scaled, key, value))
            with torch.enable_grad():
                out = _sdpa(q_leaf, key_leaf, value_leaf, settings)
        if settings.rows_without_keys is not None:  # those rows' output is the constant 0
            grad_out = grad_out.masked_fill(settings.rows_without_keys, 0.0)
        grads = torch.autograd.grad(out, (q_leaf, key_leaf, value_leaf), grad_out)
        if query_half is not None:
            return grads, key, key_weight, query_half.to(factor.dtype), None
        # q_i = q_scaled_i / factor_i (rows with factor 0 get no variance gradient)
        return grads, key, key_weight, q_scaled.detach(), torch.where(factor > 0, 1.0 / factor, 0.0)

    @staticmethod
    def _gradient_buffers(ctx, grad_q, grad_k, q_base, k):
        """Where the final query and key gradients are written. Small calls (within the keep budget) write them in
        the inputs' memory layout, so that a leaf query/key takes them without a layout copy: over the kernel's own
        gradient when it already has that layout (transformers' transposed projections do), else over the rescaled
        queries the CPU forward kept (the kernel was their last reader; a second backward rebuilds them), else into
        a new tensor. Each reused buffer is one q-sized allocation fewer, which would often be fresh pages. Large
        calls overwrite the kernel's gradients in place (two fewer q-sized tensors at the peak)."""
        if (q_base.numel() + k.numel()) * k.element_size() > _KEEP_FOR_BACKWARD_BYTES:
            return grad_q, grad_k
        out_k = grad_k if grad_k.stride() == k.stride() else torch.empty_like(k)
        if grad_q.stride() == q_base.stride():
            return grad_q, out_k
        spare = getattr(ctx, "q_scaled", None)
        if spare is None or spare.dtype != q_base.dtype or spare.stride() != q_base.stride():
            return torch.empty_like(q_base), out_k
        ctx.q_scaled = None
        return spare, out_k

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _FastAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        (grad_q, grad_k, grad_v), key, key_weight, q_base, inv_scale = _FastAttention._sdpa_gradients(ctx, grad_out)
        factor = ctx.row.factor
        compute_dtype = factor.dtype
        query_dtype = grad_q.dtype
        grad_q = grad_q.to(compute_dtype)
        grad_factor = _rowdot(grad_q, q_base)
        if inv_scale is not None:
            grad_factor.mul_(inv_scale)
        grad_var, grad_gamma = _row_factor_gradients(ctx.row, grad_factor, ctx.gamma_spec, ctx.settings)
        grad_k = grad_k.to(compute_dtype)
        k = key.to(compute_dtype)
        out_q, out_k = _FastAttention._gradient_buffers(ctx, grad_q, grad_k, q_base, k)
        args = (grad_q, grad_k, out_q, out_k, factor, q_base, inv_scale, grad_var, k, key_weight, ctx.stats)
        if ctx.settings.causal:
            _causal_backward(*args, ctx.settings.block)
        else:
            _covariance_backward(*args, ctx.count)
        return out_q.to(query_dtype), out_k.to(key.dtype), grad_v, grad_gamma, None, None


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
    :func:`decompose_mask`), and where it is cheaper: very short query blocks (decode steps) and short sequences
    (at most ``_REFERENCE_MAX_LOGITS`` logits per head, a ``96 x 96`` tile).
    """
    _check_inputs(query, key, value, scale, max_temperature, eps, statistic, dropout_p)
    _check_gamma(gamma, query)
    B, H, L, D = query.shape
    S = key.shape[-2]
    if attn_mask is not None:
        _check_mask_shape(attn_mask, B, H, L, S)
    if L > S and is_causal:
        raise ValueError(f"a causal mask needs query_len <= key_len, got query_len={L}, key_len={S}")
    use_reference = return_weights or L <= _REFERENCE_MAX_QUERY_LEN or L * S <= _REFERENCE_MAX_LOGITS
    structure = None if use_reference else decompose_mask(attn_mask, is_causal, B, L, S)
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
    key_valid, causal = structure
    cpu_flash = _cpu_flash_available(query.device, dropout_p)
    sdpa_mask, rows_without_keys, sdpa_is_causal = _sdpa_mask(
        attn_mask, is_causal, key_valid, causal, B, L, S, query.device, cpu_flash
    )
    settings = _FastSettings(
        scale=scale,
        max_temperature=max_temperature,
        eps=eps,
        statistic=statistic,
        dropout_p=dropout_p,
        causal=causal,
        block=_CAUSAL_BLOCK if L <= _CAUSAL_LONG_FROM else _CAUSAL_BLOCK_LONG,
        cpu_flash=cpu_flash,
        sdpa_mask=sdpa_mask,
        sdpa_is_causal=sdpa_is_causal,
        rows_without_keys=rows_without_keys,
    )
    compute_dtype = _compute_dtype(query.dtype)
    key_weight = None if key_valid is None else key_valid.to(compute_dtype)
    inputs = (query, key, value) + ((gamma,) if isinstance(gamma, torch.Tensor) else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        out = _FastAttention.apply(query, key, value, gamma, key_weight, settings)
    else:
        out = _fast_attention_no_grad(query, key, value, gamma, key_weight, settings)
    return out, None


def _sdpa_mask(attn_mask, is_causal, key_valid, causal, B, L, S, device, cpu_flash: bool):
    """The mask the attention kernel needs for a decomposed mask: (bool mask or None, query rows without any valid
    key (B, 1, L, 1) or None (see :class:`_FastSettings`), whether the kernel applies the causal mask itself).
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
