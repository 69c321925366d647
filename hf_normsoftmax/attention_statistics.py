"""The per-row logit variances of the fast NormSoftmax attention path, from key moments (no L x S tensor).

For query ``i`` over its valid key set ``S_i``, ``var_i = q_i^T Cov_{S_i}(k) q_i``, computed from centred keys:

* bidirectional / key padding: one covariance per head (:func:`covariance_variance`), or for short key sets the
  logits themselves, row slice by row slice (:func:`logit_variance`, where that is no more work);
* causal: per block of query rows, exclusive prefix moments of the earlier blocks plus the block's own ``c x c``
  logits, merged exactly (:func:`causal_variance`, and its closed-form backward);
* one run of keys per row (sliding windows, packed documents): per block of query rows, the moments of the whole
  key blocks all its rows see, summed block by block (no differences of prefix sums, which cancel), plus a few
  ``c x c`` logit tiles (:class:`Intervals`, :func:`interval_variance` and its backward).

Grouped-query heads share their key head's statistics. Used by :mod:`hf_normsoftmax.attention_fast`.
Pure PyTorch; imports nothing from transformers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Causal statistics: query rows per block (a block's own keys enter as a c x c tile of logits, earlier keys through
# exclusive prefix moments, a D x D matrix per block).
_CAUSAL_BLOCK, _CAUSAL_BLOCK_LONG, _CAUSAL_LONG_FROM = 64, 128, 1024

# ----------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------


def _centred_keys(k: torch.Tensor, key_weight: torch.Tensor | None, dtype: torch.dtype):
    """Keys minus the mean of the valid keys, zero at padded keys, contiguous (B, H, S, D) in ``dtype``, and the
    valid-key count (B, 1, 1). ``k`` may be a (B, H, S, D) view of (B, S, H, D) projections: it is read as it lies
    (the subtraction writes the contiguous result; no separate copy)."""
    k, (B, H, S, D) = k.to(dtype), k.shape
    kc = torch.empty(k.shape, dtype=dtype, device=k.device)
    if key_weight is None:
        torch.sub(k, k.mean(dim=-2, keepdim=True), out=kc)
        return kc, torch.full((B, 1, 1), float(S), dtype=dtype, device=k.device)
    count = key_weight.sum(dim=-1)[:, None, None]
    natural = k.transpose(1, 2)
    if natural.stride(2) == D * natural.stride(3):  # the weighted key sum straight from (B, S, H * D) projections
        total = torch.matmul(key_weight[:, None, :], natural.reshape(B, S, H * D)).view(B, H, 1, D)
    else:
        total = torch.matmul(key_weight[:, None, None, :], k)
    torch.sub(k, total.div_(count[..., None].clamp(min=1.0)), out=kc)
    return kc.mul_(key_weight[:, None, :, None]), count


def _abs_bound(q: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """(sum_c |q_c| sqrt(M_cc))^2 per row: bounds |q|^T |M| |q| for a PSD M (|M_ab| <= sqrt(M_aa M_bb)).
    q (..., L, D), diag (..., D)."""
    return torch.matmul(q.abs(), diag.clamp(min=0.0).sqrt().unsqueeze(-1)).squeeze(-1).square()


# Per-row work over (B, H, rows, D) slices of about this many elements: query-sized temporaries would raise the peak
# memory above stock SDPA's for long sequences; calls up to this size run in one slice (one set of ops).
_ROW_SLICE_ELEMENTS = 2**22


def row_slices(x: torch.Tensor, width: int | None = None) -> list[slice]:
    """Slices of the rows (dim -2) of a (B, H, L, D) tensor such that (B, H, rows, width) temporaries (default width
    D) hold about _ROW_SLICE_ELEMENTS elements each."""
    B, H, L, D = x.shape
    rows = max(1, _ROW_SLICE_ELEMENTS // max(1, B * H * (width or D)))
    return [slice(start, start + rows) for start in range(0, L, rows)]


def logits_cheaper(rows: int, S: int, D: int) -> bool:
    """Whether bidirectional rows take their variance from logits rather than from the key covariance: where the
    forward is no more multiply-adds (rows S D vs (rows + S) D^2, e.g. 128 keys at D = 64). Logits are fewer
    operations (forward and backward: what counts on a busy CPU or for kernel launches) and need no rounding bound
    (computed as the reference computes them; moments may cancel); their backward is 3 rows S D multiply-adds
    against the covariance's (2 rows + S) D^2."""
    return rows * S <= (rows + S) * D


def logit_variance(q: torch.Tensor, kc: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Bidirectional rows from their logits, row slice by row slice: var_i = |kc q_i|^2 / n (B, H, L) (kc centred,
    zero at padding, so this is the variance over the valid keys)."""
    var = q.new_empty(q.shape[:-1])
    for rows in row_slices(q, kc.shape[-2]):
        logits = torch.matmul(q[..., rows, :], kc.transpose(-1, -2))
        torch.linalg.vector_norm(logits, dim=-1, out=var[..., rows])
    return var.square_().div_(count.clamp(min=1.0))


def logit_variance_backward(q, kc, count, grad_var, grad_q, grad_kc) -> None:
    """Adds the gradients of :func:`logit_variance` for dL/dvar (B, H, L, 1) to ``grad_q`` and ``grad_kc``."""
    coef = grad_var * (2.0 / count[..., None].clamp(min=1.0))
    for rows in row_slices(q, kc.shape[-2]):
        logits = torch.matmul(q[..., rows, :], kc.transpose(-1, -2)).mul_(coef[..., rows, :])
        grad_q[..., rows, :].add_(torch.matmul(logits, kc))
        grad_kc.add_(torch.matmul(logits.transpose(-1, -2), q[..., rows, :]))


def covariance_variance(q: torch.Tensor, kc: torch.Tensor, count: torch.Tensor):
    """Bidirectional rows: var_i = q_i^T C q_i, C = kc^T kc / n. Returns (var (B, H, L), bound (B, H, L), C)."""
    cov = torch.matmul(kc.transpose(-1, -2), kc).div_(count[..., None].clamp(min=1.0))
    diag = cov.diagonal(dim1=-2, dim2=-1)
    var, bound = q.new_empty(q.shape[:-1]), q.new_empty(q.shape[:-1])
    for rows in row_slices(q):
        torch.linalg.vecdot(torch.matmul(q[..., rows, :], cov), q[..., rows, :], out=var[..., rows])
        bound[..., rows] = _abs_bound(q[..., rows, :], diag)
    return var.clamp_(min=0.0), bound, cov


class _Blocks(NamedTuple):
    """Causal rows as nb blocks of c query rows (zero-padded to nb * c), the keys of a KV-cache prefix apart."""

    c: int
    nb: int
    L: int
    offset: int

    def rows(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(B, H, offset + L, D) -> (B, H, nb, c, D), rows from ``offset`` on, zero-padded."""
        x = x[..., offset:, :]
        return F.pad(x, (0, 0, 0, self.nb * self.c - self.L)).unflatten(-2, (self.nb, self.c))

    def values(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(..., offset + L) -> (..., nb, c), zero-padded."""
        return F.pad(x[..., offset:], (0, self.nb * self.c - self.L)).unflatten(-1, (self.nb, self.c))


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of the entries before each index along ``dim`` (exact zero for the first: no cumsum - x)."""
    before = x.narrow(dim, 0, x.shape[dim] - 1).cumsum(dim)
    return torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), before], dim=dim)


class _CausalTerms(NamedTuple):
    """The per-block quantities of :func:`causal_variance` that its backward needs."""

    blocks: _Blocks
    qb: torch.Tensor  # (B, H, nb, c, D) query rows
    kb: torch.Tensor  # (B, H, nb, c, D) the block's own centred keys
    prefix: torch.Tensor  # (B, H, offset, D) centred keys of a KV-cache prefix
    sum_before: torch.Tensor  # (B, H, nb, D)
    outer_before: torch.Tensor | None  # (B, H, nb, D, D); None when `projected` came from the forward
    projected: torch.Tensor  # (B, H, nb, c, D) the query rows times outer_before
    n_before: torch.Tensor  # (B, 1, nb, 1)
    weight: torch.Tensor  # (B, 1, nb, c, c) the block's causal (and padding) weights
    n_inner: torch.Tensor  # (B, 1, nb, c)
    deviation: torch.Tensor  # (B, H, nb, c, c) in-block logit minus its mean, 0 where not attended
    mean_before: torch.Tensor  # (B, H, nb, c)
    m2_before_raw: torch.Tensor  # before clamping at 0 (rounding): the clamp passes no gradient where it clipped
    delta: torch.Tensor  # mean_inner - mean_before
    n: torch.Tensor  # (B, 1, nb, c) valid keys per row


def _causal_terms(q: torch.Tensor, kc: torch.Tensor, w: torch.Tensor | None, block: int,
                  projected: torch.Tensor | None = None) -> _CausalTerms:
    """The block quantities; ``projected`` (the forward's ``qb @ outer_before``) spares the backward the moments."""
    B, H, L, D = q.shape
    S = kc.shape[-2]
    offset = S - L
    blocks = _Blocks(block, -(-L // block), L, offset)
    ones = torch.ones(B, 1, S, dtype=q.dtype, device=q.device) if w is None else w[:, None, :]
    qb, kb = blocks.rows(q), blocks.rows(kc, offset)
    wb = blocks.values(ones, offset)  # (B, 1, nb, c)
    prefix = kc[:, :, :offset]
    # exclusive prefix moments per block (+ the KV-cache prefix, seen by every row)
    sum_before = _exclusive_cumsum(kb.sum(dim=-2), 2)
    n_before = _exclusive_cumsum(wb.sum(dim=-1), 2)[..., None]
    outer_before = None
    if projected is None:
        outer_before = _exclusive_cumsum(torch.matmul(kb.transpose(-1, -2), kb), 2)
        if offset:
            outer_before = outer_before + torch.matmul(prefix.transpose(-1, -2), prefix)[:, :, None]
        projected = torch.matmul(qb, outer_before)
    if offset:
        sum_before = sum_before + prefix.sum(dim=-2)[:, :, None]
        n_before = n_before + ones[..., :offset].sum(dim=-1)[..., None, None]
    # the block's own keys, causal within the block
    weight = wb[..., None, :] * torch.ones(block, block, dtype=q.dtype, device=q.device).tril_()
    n_inner = weight.sum(dim=-1)
    inner = torch.matmul(qb, kb.transpose(-1, -2)).mul_(weight)
    mean_inner = inner.sum(dim=-1) / n_inner.clamp(min=1.0)
    deviation = inner.sub_(mean_inner[..., None]).mul_(weight)
    # before the block, from moments
    mean_before = torch.matmul(qb, sum_before[..., None]).squeeze(-1) / n_before.clamp(min=1.0)
    m2_before_raw = torch.linalg.vecdot(projected, qb) - n_before * mean_before.square()
    return _CausalTerms(blocks, qb, kb, prefix, sum_before, outer_before, projected, n_before, weight, n_inner,
                        deviation, mean_before, m2_before_raw, mean_inner - mean_before, n_before + n_inner)


def causal_variance(q: torch.Tensor, kc: torch.Tensor, w: torch.Tensor | None, block: int):
    """Causal rows (bottom-right aligned): per-row logit variance over keys j <= i + offset (B, H, L), its rounding
    bound (B, H, L) and the valid-key count (B, 1, L). kc: centred keys, zero at padding; w: (B, S) key weights or
    None.

    Row i's keys split into those before its block ("before": count n_b, mean logit, sum of squared deviations
    from prefix moments) and those of its block up to i ("inner": two passes over the c x c tile); Chan's merge
    m2 = m2_b + m2_in + delta^2 n_b n_in / n joins them. Only m2_b comes from moments (m2_b = q^T O q - n_b mean^2,
    O the second moment of the centred keys before the block): its rounding bound is u |q|^T |O| |q|.

    Also returns ``q @ O`` per block (B, H, nb, c, D), which :func:`causal_variance_backward` takes instead of
    recomputing the moments (one query-sized tensor kept for a third less work in the statistics' backward)."""
    t = _causal_terms(q, kc, w, block)
    L = q.shape[-2]
    m2_inner = torch.linalg.vector_norm(t.deviation, dim=-1).square()
    n_inner, n_before = t.n_inner, t.n_before
    m2 = t.m2_before_raw.clamp(min=0.0) + m2_inner + t.delta.square() * n_before * n_inner / t.n.clamp(min=1.0)
    var = (m2 / t.n.clamp(min=1.0)).flatten(-2)[..., :L]
    bound = _abs_bound(t.qb, t.outer_before.diagonal(dim1=-2, dim2=-1)) / t.n.clamp(min=1.0)
    return var, bound.flatten(-2)[..., :L], t.n.flatten(-2)[..., :L], t.projected


def _reverse_exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of the entries after each index along ``dim`` (the adjoint of :func:`_exclusive_cumsum`)."""
    return _exclusive_cumsum(x.flip(dim), dim).flip(dim)


def causal_variance_backward(q, kc, w, block: int, grad_var: torch.Tensor, projected: torch.Tensor | None = None):
    """(dL/dq, dL/dkc) of :func:`causal_variance`'s variance for dL/dvar (B, H, L), in closed form; ``projected``:
    the ``q @ O`` that :func:`causal_variance` returned for the same inputs (None: recomputed)."""
    t = _causal_terms(q, kc, w, block, projected)
    L = q.shape[-2]
    n = t.n.clamp(min=1.0)
    grad_m2 = t.blocks.values(grad_var) / n  # (B, H, nb, c)
    grad_m2_before = torch.where(t.m2_before_raw > 0, grad_m2, 0.0)
    grad_delta = 2.0 * grad_m2 * t.delta * t.n_before * t.n_inner / n
    # mean_inner's only gradient is through delta (d m2_inner / d mean_inner = -2 sum deviation = 0)
    grad_mean_before = -2.0 * grad_m2_before * t.n_before * t.mean_before - grad_delta
    grad_sum_coef = grad_mean_before / t.n_before.clamp(min=1.0)  # d/d(q . sum_before)
    grad_inner = t.deviation.mul_(2.0 * grad_m2[..., None]).addcmul_(
        t.weight, (grad_delta / t.n_inner.clamp(min=1.0))[..., None]
    )
    # queries: in-block logits, q . sum_before, q^T O q
    grad_qb = torch.matmul(grad_inner, t.kb)
    grad_qb.addcmul_(grad_sum_coef[..., None], t.sum_before[:, :, :, None, :])
    grad_qb.addcmul_(t.projected, (2.0 * grad_m2_before)[..., None])  # (q * g) @ O = g * (q @ O), g per row
    # block moments: d sum_before_b, d outer_before_b reach every earlier block's keys and the prefix
    grad_sum_before = torch.matmul(grad_sum_coef[..., None, :], t.qb).squeeze(-2)  # (B, H, nb, D)
    grad_outer_before = torch.matmul((t.qb * grad_m2_before[..., None]).transpose(-1, -2), t.qb)  # (B, H, nb, D, D)
    grad_kb = torch.matmul(grad_inner.transpose(-1, -2), t.qb)
    grad_kb.add_(_reverse_exclusive_cumsum(grad_sum_before, 2)[:, :, :, None, :])
    grad_kb.add_(torch.matmul(t.kb, _reverse_exclusive_cumsum(grad_outer_before, 2)).mul_(2.0))
    grad_q = grad_qb.flatten(2, 3)[:, :, :L]
    grad_block_keys = grad_kb.flatten(2, 3)[:, :, :L]
    if not t.prefix.shape[-2]:
        return grad_q, grad_block_keys
    grad_prefix = torch.matmul(t.prefix, grad_outer_before.sum(dim=2)).mul_(2.0)
    grad_prefix.add_(grad_sum_before.sum(dim=2)[:, :, None])
    return grad_q, torch.cat([grad_prefix, grad_block_keys], dim=-2)


# ----------------------------------------------------------------------------------------------------------------
# interval masks: every query row sees one contiguous run of keys (sliding windows, packed documents)
# ----------------------------------------------------------------------------------------------------------------

# Query rows (and keys) per block of the interval statistics.
_INTERVAL_BLOCK = 64
# Key blocks a query block may see outside its shared core (as logit tiles): a window's left edge (up to two blocks)
# and the diagonal block; masks needing more fall back.
_INTERVAL_MAX_TILES = 4


class Intervals(NamedTuple):
    """Per-row key intervals ``[lo_i, hi_i)`` as blocks of ``c`` query rows and ``c`` keys (keys shifted right by
    ``pad`` so that query block ``b`` and key block ``b + (S + pad - L) / c`` hold the diagonal).

    Each query block has a *core*: a run of whole key blocks that each of its rows sees entirely or not at all
    (moments: a 0/1 ``cover`` matrix times the key blocks' moments, a sum without cancellation), and up to
    ``_INTERVAL_MAX_TILES`` *tile* blocks: every other key block one of its rows touches, entered as logits."""

    c: int
    nb: int  # query blocks
    nbk: int  # key blocks (block nbk is an all-zero block that unused tile slots point at)
    pad: int
    lo: torch.Tensor  # (B, L) int64 first key of each row (unshifted)
    hi: torch.Tensor  # (B, L) int64 one past the last key (hi <= lo: the row sees no key)
    count: torch.Tensor  # (B, 1, L) keys per row, statistics dtype
    cover: torch.Tensor  # (B, 1, nb, nbk) 1 where the key block is in the query block's core
    row_core: torch.Tensor  # (B, 1, 1, nb, c) 1 where the row sees its block's core
    n_core: torch.Tensor  # (B, 1, 1, nb, c) keys in the core per row (0 where the row does not see it)
    tile_index: torch.Tensor  # (B, nb, K) key blocks entered as tiles
    tile_weight: torch.Tensor  # (B, 1, 1, nb, c, K * c) 1 where the row sees the tile's key
    seen: torch.Tensor | None  # (B, S) keys some row sees, None when every key is seen


def interval_blocks(lo: torch.Tensor, hi: torch.Tensor, S: int, dtype: torch.dtype) -> Intervals | None:
    """The block plan of per-row key intervals (see :class:`Intervals`), or None when some query block needs more
    than ``_INTERVAL_MAX_TILES`` tile blocks (one host sync)."""
    B, L = lo.shape
    c = _INTERVAL_BLOCK
    nb = -(-L // c)
    pad = (L - S) % c
    nbk = -(-(S + pad) // c)
    device = lo.device
    empty_rows = hi <= lo
    lo_s = torch.where(empty_rows, 0, lo + pad)
    hi_s = torch.where(empty_rows, 0, hi + pad)
    lo_b = F.pad(lo_s, (0, nb * c - L)).view(B, nb, c)
    hi_b = F.pad(hi_s, (0, nb * c - L)).view(B, nb, c)
    empty = hi_b <= lo_b
    first_full, end_full = (lo_b + (c - 1)) // c, hi_b // c
    has_full = (first_full < end_full) & ~empty
    # the core of a query block: a run of whole key blocks every row sees entirely or not at all. First choice: the
    # whole blocks all its rows share (windows); else the whole blocks of the rows that have some, ending where the
    # first of the rows reaching past its start ends (a document going on beside documents starting in the block);
    # else none (all touched key blocks become tiles).
    shared_start = torch.where(empty, -1, first_full).amax(-1)  # (B, nb)
    shared_end = torch.where(empty, nbk + 1, end_full).amin(-1)
    some_start = torch.where(has_full, first_full, -1).amax(-1)
    reaching = ~empty & (hi_b > (some_start * c)[..., None])
    some_end = torch.where(reaching, end_full, nbk + 1).amin(-1)

    def rows_seeing(start, end):
        start, end = (start * c)[..., None], (end * c)[..., None]
        sees = ~empty & (lo_b <= start) & (hi_b >= end)
        return sees, (sees | empty | (hi_b <= start) | (lo_b >= end)).all(-1)

    some_ok = rows_seeing(some_start, some_end)[1]
    use_shared = shared_start < shared_end
    use_some = ~use_shared & (some_start < some_end) & some_ok
    has_core = use_shared | use_some
    core_start = torch.where(use_shared, shared_start, torch.where(use_some, some_start, 0))
    core_end = torch.where(use_shared, shared_end, torch.where(use_some, some_end, 0))
    sees = rows_seeing(core_start, core_end)[0] & has_core[..., None]
    first = torch.where(empty, nbk, lo_b // c).amin(-1)  # touched key blocks [first, last)
    last = torch.where(empty, 0, (hi_b + (c - 1)) // c).amax(-1)
    left = torch.where(has_core, core_start - first, last - first).clamp(min=0)
    right = torch.where(has_core, last - core_end, 0).clamp(min=0)
    tiles = left + right
    # keys some row sees: +1 at each row's start, -1 at its end, running sum
    edges = torch.zeros(B, S + 1, dtype=torch.int32, device=device)
    edges.scatter_add_(1, lo.clamp(0, S).where(~empty_rows, 0), (~empty_rows).to(torch.int32))
    edges.scatter_add_(1, hi.clamp(0, S).where(~empty_rows, 0), -(~empty_rows).to(torch.int32))
    seen = edges[:, :S].cumsum(-1) > 0
    width, unseen = torch.stack([tiles.amax(), (~seen).sum()]).tolist()
    if width > _INTERVAL_MAX_TILES:
        return None
    width = max(width, 1)
    slot = torch.arange(width, device=device)
    tile_index = torch.where(
        slot < left[..., None], first[..., None] + slot,
        torch.where(slot < tiles[..., None], core_end[..., None] + slot - left[..., None], nbk),
    )  # (B, nb, K)
    positions = (tile_index[..., None] * c + torch.arange(c, device=device)).flatten(-2)  # (B, nb, K c)
    tile_weight = (positions[:, :, None, :] >= lo_b[..., None]) & (positions[:, :, None, :] < hi_b[..., None])
    blocks = torch.arange(nbk, device=device)
    cover = (blocks >= core_start[..., None]) & (blocks < core_end[..., None])  # (B, nb, nbk)
    n_core = torch.where(sees, ((core_end - core_start) * c)[..., None], 0)
    count = (hi - lo).clamp(min=0).to(dtype)[:, None, :]
    return Intervals(
        c, nb, nbk, pad, lo, hi, count, cover[:, None].to(dtype), sees[:, None, None].to(dtype),
        n_core[:, None, None].to(dtype), tile_index, tile_weight[:, None, None].to(dtype), seen if unseen else None,
    )


class _IntervalTerms(NamedTuple):
    """The per-block quantities of :func:`interval_variance` that its backward needs (g = query heads per key head)."""

    qb: torch.Tensor  # (B, Hk, g, nb, c, D) query rows
    key_blocks: torch.Tensor  # (B, Hk, nbk, c, D) centred keys, shifted and zero-padded
    tile_keys: torch.Tensor  # (B, Hk, 1, nb, K c, D)
    core_sum: torch.Tensor  # (B, Hk, 1, nb, D)
    core_outer: torch.Tensor  # (B, Hk, 1, nb, D, D)
    deviation: torch.Tensor  # (B, Hk, g, nb, c, K c) tile logit minus its row mean, 0 where not seen
    n_tile: torch.Tensor  # (B, 1, 1, nb, c)
    mean_core: torch.Tensor  # (B, Hk, g, nb, c)
    m2_core_raw: torch.Tensor  # before clamping at 0
    delta: torch.Tensor  # mean_tile - mean_core
    n: torch.Tensor  # (B, 1, 1, nb, c) keys per row


def _interval_terms(q: torch.Tensor, kc: torch.Tensor, iv: Intervals) -> _IntervalTerms:
    B, H, L, D = q.shape
    Hk, S = kc.shape[1], kc.shape[-2]
    c, nb, nbk = iv.c, iv.nb, iv.nbk
    qb = F.pad(q, (0, 0, 0, nb * c - L)).unflatten(-2, (nb, c)).unflatten(1, (Hk, H // Hk))
    padded = F.pad(kc, (0, 0, iv.pad, (nbk + 1) * c - S - iv.pad)).unflatten(-2, (nbk + 1, c))
    key_blocks = padded[:, :, :nbk]
    cover = iv.cover  # (B, 1, nb, nbk)
    core_sum = torch.matmul(cover, key_blocks.sum(dim=-2))[:, :, None]
    outer = torch.matmul(key_blocks.transpose(-1, -2), key_blocks)  # (B, Hk, nbk, D, D)
    core_outer = torch.matmul(cover, outer.flatten(-2)).unflatten(-1, (D, D))[:, :, None]
    batch = torch.arange(B, device=q.device)[:, None, None]
    tile_keys = padded[batch, :, iv.tile_index]  # (B, nb, K, Hk, c, D)
    tile_keys = tile_keys.permute(0, 3, 1, 2, 4, 5).flatten(3, 4)[:, :, None]
    weight = iv.tile_weight
    n_tile = weight.sum(dim=-1)
    tile = torch.matmul(qb, tile_keys.transpose(-1, -2)).mul_(weight)
    mean_tile = tile.sum(dim=-1) / n_tile.clamp(min=1.0)
    deviation = tile.sub_(mean_tile[..., None]).mul_(weight)
    n_core = iv.n_core
    mean_core = torch.matmul(qb, core_sum[..., None]).squeeze(-1) / n_core.clamp(min=1.0)
    dot_outer = torch.linalg.vecdot(torch.matmul(qb, core_outer), qb)
    m2_core_raw = (dot_outer - n_core * mean_core.square()).mul_(iv.row_core)
    return _IntervalTerms(qb, key_blocks, tile_keys, core_sum, core_outer, deviation, n_tile, mean_core, m2_core_raw,
                          mean_tile - mean_core, n_core + n_tile)


def interval_variance(q: torch.Tensor, kc: torch.Tensor, iv: Intervals):
    """Rows over their key intervals: variance (B, H, L), rounding bound (B, H, L), keys per row (B, 1, L).

    Row i's keys are its block's core (if it sees it) and its tile keys: the core's mean and sum of squared
    deviations come from moments (``m2 = q^T O q - n mean^2``, ``O`` the second moment of the centred core keys,
    rounding bound ``u |q|^T |O| |q|``), the tile's from its logits (two passes), joined by Chan's merge as in
    :func:`causal_variance`."""
    B, H, L, _ = q.shape
    t = _interval_terms(q, kc, iv)
    m2_tile = torch.linalg.vector_norm(t.deviation, dim=-1).square()
    n_core, n_tile = iv.n_core, t.n_tile
    m2 = t.m2_core_raw.clamp(min=0.0) + m2_tile + t.delta.square() * n_core * n_tile / t.n.clamp(min=1.0)
    var = (m2 / t.n.clamp(min=1.0)).reshape(B, H, -1)[..., :L]
    bound = (_abs_bound(t.qb, t.core_outer.diagonal(dim1=-2, dim2=-1)) * iv.row_core / t.n.clamp(min=1.0))
    return var, bound.reshape(B, H, -1)[..., :L], iv.count


def interval_variance_backward(q: torch.Tensor, kc: torch.Tensor, iv: Intervals, grad_var: torch.Tensor):
    """(dL/dq (B, H, L, D), dL/dkc (B, Hk, S, D)) of :func:`interval_variance`'s variance for dL/dvar (B, H, L)."""
    B, H, L, D = q.shape
    Hk, S = kc.shape[1], kc.shape[-2]
    c, nb, nbk = iv.c, iv.nb, iv.nbk
    t = _interval_terms(q, kc, iv)
    n = t.n.clamp(min=1.0)
    n_core, n_tile = iv.n_core, t.n_tile
    grad_m2 = F.pad(grad_var, (0, nb * c - L)).view(t.qb.shape[:-1]) / n
    grad_m2_core = torch.where(t.m2_core_raw > 0, grad_m2, 0.0)
    grad_delta = 2.0 * grad_m2 * t.delta * n_core * n_tile / n
    grad_sum_coef = (-2.0 * grad_m2_core * n_core * t.mean_core - grad_delta) / n_core.clamp(min=1.0)
    grad_tile = t.deviation.mul_(2.0 * grad_m2[..., None]).addcmul_(
        iv.tile_weight, (grad_delta / n_tile.clamp(min=1.0))[..., None]
    )
    grad_qb = torch.matmul(grad_tile, t.tile_keys)
    grad_qb.addcmul_(grad_sum_coef[..., None], t.core_sum[..., None, :])
    weighted = t.qb * grad_m2_core[..., None]
    grad_qb.add_(torch.matmul(weighted, t.core_outer).mul_(2.0))
    # core moments -> key blocks (the transpose of the cover sum), per key head
    grad_core_sum = torch.matmul(grad_sum_coef[..., None, :], t.qb).squeeze(-2).sum(dim=2)  # (B, Hk, nb, D)
    grad_core_outer = torch.matmul(weighted.transpose(-1, -2), t.qb).sum(dim=2)  # (B, Hk, nb, D, D)
    cover_t = iv.cover.transpose(-1, -2)
    grad_block_sum = torch.matmul(cover_t, grad_core_sum)  # (B, Hk, nbk, D)
    grad_block_outer = torch.matmul(cover_t, grad_core_outer.flatten(-2)).unflatten(-1, (D, D))
    grad_blocks = torch.matmul(t.key_blocks, grad_block_outer).mul_(2.0).add_(grad_block_sum[..., None, :])
    # tile logits -> their keys, added back to the blocks they were gathered from
    grad_tile_keys = torch.matmul(grad_tile.transpose(-1, -2), t.qb).sum(dim=2)  # (B, Hk, nb, K c, D)
    K = iv.tile_index.shape[-1]
    grad_padded = grad_blocks.new_zeros(B, nbk + 1, Hk, c, D)
    grad_padded[:, :nbk] = grad_blocks.transpose(1, 2)
    batch = torch.arange(B, device=q.device)[:, None, None].expand(iv.tile_index.shape)
    grad_padded.index_put_((batch, iv.tile_index), grad_tile_keys.unflatten(3, (K, c)).permute(0, 2, 3, 1, 4, 5),
                           accumulate=True)
    grad_kc = grad_padded.transpose(1, 2).flatten(2, 3)[:, :, iv.pad : iv.pad + S]
    return grad_qb.flatten(1, 2).flatten(2, 3)[:, :, :L], grad_kc


def _causal_block(L: int) -> int:
    return _CAUSAL_BLOCK if L <= _CAUSAL_LONG_FROM else _CAUSAL_BLOCK_LONG


def _grouped(x: torch.Tensor, key_heads: int) -> torch.Tensor:
    """(B, H, L, ...) -> (B, Hk, g L, ...): the rows of the g query heads that share a key head, one after another
    (rows are independent where every row sees the same keys)."""
    return x if x.shape[1] == key_heads else x.reshape(x.shape[0], key_heads, -1, *x.shape[3:])


def row_variance(q, kc, count, key_weight, causal: bool, intervals: Intervals | None = None):
    """(var (B, H, L), rounding bound (B, H, L) or None (variances from logits), valid keys per row (B, 1, L), what
    the backward reuses: the bidirectional covariance (B, H, D, D), the causal ``q @ O`` per block (see
    :func:`causal_variance`), or None)."""
    if intervals is not None:
        var, bound, n = interval_variance(q, kc, intervals)
        return var, bound, n, None
    if not causal:
        grouped = _grouped(q, kc.shape[1])
        if logits_cheaper(grouped.shape[-2], kc.shape[-2], q.shape[-1]):
            var, bound, cov = logit_variance(grouped, kc, count), None, None
        else:
            var, bound, cov = covariance_variance(grouped, kc, count)
        if kc.shape[1] != q.shape[1]:
            var, bound = var.view(q.shape[:-1]), None if bound is None else bound.view(q.shape[:-1])
        return var, bound, count.expand(q.shape[0], 1, q.shape[-2]), cov
    return causal_variance(q, kc, key_weight, _causal_block(q.shape[-2]))
