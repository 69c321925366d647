"""The fast exact path of NormSoftmax attention: rescaled queries + one attention kernel call, no full L x S tensor.

For query ``i`` over its valid key set ``S_i`` the logits ``s_ij = q_i . k_j`` have variance
``var_i = q_i^T Cov_{S_i}(k) q_i``, so NormSoftmax attention is ordinary attention on the rescaled queries
``q_i * scale / T_i`` (``T_i = sqrt(scale^2 var_i + eps) / gamma``; softmax is shift invariant, so the mean needs
no correction). This module computes ``var_i`` from key moments in ``O(L d^2)`` (causal masks: per block of query
rows, exclusive prefix moments of the earlier blocks plus the block's own ``c x c`` logits, merged exactly; masks
where each row sees one run of keys (windows, packed documents): per block of query rows, the moments of the whole
key blocks all its rows see, summed block by block (no differences of prefix sums, which cancel), plus a few
``c x c`` logit tiles, see :class:`Intervals`; bidirectional rows over short key sets, ``L S <= (L + S) d``, from
their logits, a bounded row slice at a time: no more work, fewer operations), and hands the rescaled queries to
torch's attention kernel.
Grouped-query heads share their key head's statistics; keys and values are never expanded.

What makes it exact, not just fast:

* **Centred keys.** Moments and the kernel both use ``k - mean(k)`` (a shift every row's softmax ignores): key
  sets with a large common component (massive activations) keep their precision.
* **Exact rows.** Moment formulas lose the variance when it is small next to ``|q|^2 |Cov(k)|`` (keys spread along a
  direction the query is orthogonal to; variances from logits cannot). Every moment row gets a rounding bound
  (``u * kappa * (sum_c |q_c| sqrt(C_cc))^2``, ``C`` the second moment the formula used); rows whose variance is
  not at least ``1 / _EXACT_ROW_TOLERANCE`` times that bound, rows whose rescaled query would overflow the kernel's
  dtype, and in half precision rows with at most ``_HALF_FEW_KEYS`` valid keys (their gradient is a difference of
  two nearly equal terms that half-precision kernel gradients cannot resolve) are computed by materialising their
  logits in float32/float64 (:func:`_exact_rows`). Random and trained inputs have few or none of them; the
  adversarial ones are all of them, at the cost of the reference path.
* **Statistics in float32** for half-precision inputs; the kernel runs in the input dtype.

The backward folds the factor and variance gradients into the kernel's gradients (bidirectional in closed form,
causal by differentiating the same block formulas), so one autograd node covers statistics and kernel.
Pure PyTorch; imports nothing from transformers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .attention_statistics import (
    Intervals,
    _causal_block,
    _centred_keys,
    _grouped,
    causal_variance_backward,
    interval_variance_backward,
    logit_variance_backward,
    row_slices,
    row_variance,
)
from .normsoftmax import _inverse_temperature, norm_softmax

# A row's moment variance is trusted when it is at least this many times its rounding bound; below, the row is
# computed exactly (the bound is pessimistic by one to two orders of magnitude, so trusted rows are within about
# 1e-5 relative).
_EXACT_ROW_TOLERANCE = 1e3
# Half precision: rows with at most this many valid keys are computed exactly (see the module docstring).
_HALF_FEW_KEYS = 3
# Half precision: rows whose factor scale / T_i exceeds this many times the median of their head are computed exactly.
_HALF_AMPLIFICATION = 2.0
# Rescaled queries above this fraction of the dtype's largest value go to the exact rows (the kernel would overflow).
_OVERFLOW_FRACTION = 2.0**-8
_HALF_DTYPES = (torch.float16, torch.bfloat16)

# torch's CPU flash-attention kernel, called directly so that the fast path keeps the centred keys and the input
# queries (stock SDPA keeps q and k) and rescales the queries again in the backward: the memory of stock SDPA.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, without an operator call when it already is (every call is a dispatch: on CPU a parallel
    region, on a GPU a launch)."""
    return x if x.dtype == dtype else x.to(dtype)


def _dense(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, contiguous: models hand over (B, H, L, D) views of (B, L, H, D) projections, and every
    statistics matmul on such a view would copy it again."""
    return x.contiguous() if x.dtype == dtype else x.to(dtype, memory_format=torch.contiguous_format)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype: float64 stays float64, everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class FastSettings(NamedTuple):
    """Everything about one fast-path call that is not a tensor the gradients flow to."""

    scale: float
    inv_cap: float | None  # 1 / max_temperature, or None
    eps: float
    power: float  # 0.5 for "std", 1.0 for "var"
    dropout_p: float
    causal: bool  # rows see growing key sets (bottom-right aligned)
    cpu_flash: bool  # torch's CPU flash kernel called directly (CPU, no dropout, not compiling)
    sdpa_mask: torch.Tensor | None  # bool mask for the kernel (key padding only when sdpa_is_causal), or None
    sdpa_is_causal: bool
    # (B, 1, L, 1) query rows without any valid key, or None: they would give NaN inside the kernel, so they attend
    # everywhere there (their output is replaced by the exact rows' zeros)
    rows_without_keys: torch.Tensor | None
    # per-row key intervals (sliding windows, packed documents, grouped-query causal), or None: see Intervals
    intervals: Intervals | None = None


def cpu_flash_available(device: torch.device, dropout_p: float) -> bool:
    return (
        _CPU_FLASH is not None
        and _CPU_FLASH_BACKWARD is not None
        and device.type == "cpu"
        and dropout_p == 0.0  # the CPU kernel has no dropout
        and not torch.compiler.is_compiling()
    )


# ----------------------------------------------------------------------------------------------------------------
# the plan of a call: statistics, row factors, exact rows
# ----------------------------------------------------------------------------------------------------------------


class Plan(NamedTuple):
    """What the statistics decided for one call (computed without autograd)."""

    kc: torch.Tensor  # centred keys, zero at padding, in the statistics dtype
    kernel_key: torch.Tensor  # the same in the input dtype (the kernel's keys)
    count: torch.Tensor  # (B, 1, 1) valid keys (bidirectional statistics)
    cov: torch.Tensor | None  # bidirectional key covariance (B, H, D, D); None: variances from logits, or causal
    causal_projected: torch.Tensor | None  # causal rows: q @ (second moment before the block), for the backward
    factor: torch.Tensor  # (B, H, L, 1) scale / T_i, 0 on exact rows and rows with at most one key
    inv_temperature: torch.Tensor  # (B, H, L, 1) gamma / spread (capped)
    spread_base: torch.Tensor  # (B, H, L, 1) scale^2 var + eps
    live: torch.Tensor  # (B, H, L, 1) where the factor varies with var and gamma
    exact_index: torch.Tensor | None  # (B, H, X) rows computed exactly (a superset of the rows that need it)


def _moment_error_unit(dtype: torch.dtype, D: int, S: int) -> float:
    """Unit roundoff times the (statistical) growth of rounding in sums over S keys and over D^2 terms."""
    return torch.finfo(dtype).eps / 2 * (math.sqrt(S) + math.sqrt(D))


def make_plan(query, key, key_weight, gamma, settings: FastSettings) -> Plan:
    """Statistics, row factors and the exact rows of one call (no autograd)."""
    cd = compute_dtype(query.dtype)
    with torch.no_grad():
        q = _dense(query.detach(), cd)
        kc, count = _centred_keys(key.detach(), key_weight, cd)
        kernel_key = kc if key.dtype == cd else kc.to(key.dtype)
        if kernel_key is not kc:  # statistics of the keys the kernel sees (the rounded centred keys)
            kc = _as(kernel_key, cd)
        var, bound, n, reused = row_variance(q, kc, count, key_weight, settings.causal, settings.intervals)
        cov, causal_projected = (None, reused) if settings.causal else (reused, None)
        if not (query.requires_grad or key.requires_grad):
            causal_projected = None  # only the backward reads it
        var = var[..., None]
        n = n[..., None]  # (B, 1, L, 1)
        gamma = gamma.detach() if isinstance(gamma, torch.Tensor) else gamma
        var_scaled = var * settings.scale**2
        inv_temperature, uncapped = _inverse_temperature(var_scaled, gamma, settings.inv_cap, settings.eps,
                                                         settings.power)
        factor = inv_temperature * settings.scale
        exact = ~torch.isfinite(factor)
        if bound is not None:  # variances from moments: rows they may have lost to cancellation
            exact |= var < bound[..., None] * (_moment_error_unit(cd, q.shape[-1], kc.shape[-2]) * _EXACT_ROW_TOLERANCE)
        if query.dtype in _HALF_DTYPES:
            exact |= n <= _HALF_FEW_KEYS
            # the kernel's half-precision query gradient is rounded at |factor_i * g_i|: rows amplified far beyond
            # their head's typical row would carry that rounding into dq at a scale the other rows do not have
            typical = factor.nan_to_num(posinf=0.0).median(dim=-2, keepdim=True).values
            exact |= factor > typical * _HALF_AMPLIFICATION
            biggest = torch.finfo(query.dtype).max * _OVERFLOW_FRACTION
            exact |= q.abs().amax(dim=-1, keepdim=True) * factor > biggest
        exact &= n > 0  # rows without keys: zero output, set by the kernel call
        exact_index = None
        fast = n > 1  # rows whose factor varies: at least two keys, and not computed exactly
        if bool(exact.any()):
            exact_rows = exact.expand(*q.shape[:-1], 1)[..., 0]
            width = int(exact_rows.sum(dim=-1).amax())
            exact_index = torch.argsort(exact_rows.to(torch.int8), dim=-1, descending=True, stable=True)[..., :width]
            taken = torch.zeros_like(exact_rows).scatter_(-1, exact_index, True)[..., None]
            fast = fast & ~taken
        live = fast if uncapped is None else fast & uncapped
        factor = torch.where(fast, factor, 0.0)
        return Plan(kc, kernel_key, count, cov, causal_projected, factor, inv_temperature,
                    var_scaled.add_(settings.eps), live, exact_index)


# ----------------------------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------------------------


def _sdpa(q_scaled, key, value, settings: FastSettings):
    mask = settings.sdpa_mask
    if settings.rows_without_keys is not None:
        mask = mask | settings.rows_without_keys
    return F.scaled_dot_product_attention(
        q_scaled, key, value, attn_mask=mask, dropout_p=settings.dropout_p, is_causal=settings.sdpa_is_causal,
        scale=1.0, enable_gqa=key.shape[1] != q_scaled.shape[1],
    )


def _additive_mask(settings: FastSettings, dtype: torch.dtype) -> torch.Tensor | None:
    """The CPU kernel takes an additive mask in the query dtype (SDPA converts bool masks the same way)."""
    if settings.sdpa_mask is None:
        return None
    if settings.sdpa_is_causal:
        # a (B, 1, 1, S) key-padding mask beside the kernel's own causal mask: a row without keys cannot get a row of
        # its own, so padded keys get the most negative finite value instead of -inf (no NaN in such rows, which are
        # exact rows anyway); any row with a valid key gives exactly zero weight to padded ones
        padded = ~settings.sdpa_mask
        return torch.zeros(padded.shape, dtype=dtype, device=padded.device).masked_fill_(padded, torch.finfo(dtype).min)
    mask = torch.where(settings.sdpa_mask, 0.0, float("-inf")).to(dtype)
    if settings.rows_without_keys is not None:
        mask.masked_fill_(settings.rows_without_keys, 0.0)
    return mask


def _cpu_flash(q_scaled, key, value, settings: FastSettings, mask):
    """torch's CPU flash kernel: (out, logsumexp). Grouped query heads go in one call per member of the group (each
    with every key head): the kernel takes grouped shapes, but its backward on them is several times slower than on
    expanded keys, and a call per member needs no expanded keys."""
    groups = q_scaled.shape[1] // key.shape[1]
    if groups == 1:
        return _CPU_FLASH(q_scaled, key, value, 0.0, settings.sdpa_is_causal, attn_mask=mask, scale=1.0)[:2]
    parts = [_CPU_FLASH(q_scaled[:, member::groups], key, value, 0.0, settings.sdpa_is_causal, attn_mask=mask,
                        scale=1.0)[:2] for member in range(groups)]
    return (torch.stack([p[0] for p in parts], dim=2).flatten(1, 2),
            torch.stack([p[1] for p in parts], dim=2).flatten(1, 2))


def _cpu_flash_backward(grad_out, q_scaled, key, value, out, lse, settings: FastSettings, mask):
    """(grad of the rescaled queries, keys, values) of :func:`_cpu_flash`."""
    groups = q_scaled.shape[1] // key.shape[1]
    if groups == 1:
        return _CPU_FLASH_BACKWARD(grad_out.contiguous(), q_scaled, key, value, out, lse, 0.0, settings.sdpa_is_causal,
                                   attn_mask=mask, scale=1.0)
    grad_q, grad_k, grad_v = [], None, None
    for member in range(groups):
        heads = slice(member, None, groups)
        gq, gk, gv = _CPU_FLASH_BACKWARD(
            grad_out[:, heads].contiguous(), q_scaled[:, heads].contiguous(), key, value, out[:, heads].contiguous(),
            lse[:, heads].contiguous(), 0.0, settings.sdpa_is_causal, attn_mask=mask, scale=1.0,
        )
        grad_q.append(gq)
        grad_k = gk if grad_k is None else grad_k.add_(gk)
        grad_v = gv if grad_v is None else grad_v.add_(gv)
    return torch.stack(grad_q, dim=2).flatten(1, 2), grad_k, grad_v


def _rescaled(q, factor, dtype):
    return _as(torch.mul(q, factor), dtype)


# ----------------------------------------------------------------------------------------------------------------
# the autograd function
# ----------------------------------------------------------------------------------------------------------------


def _bidirectional_backward(plan: Plan, q, grad_qs, grad_var, grad_kc, factor):
    """Bidirectional rows: writes factor_i g_i + dL/dvar_i dvar_i/dq_i over the kernel's query gradient ``grad_qs``
    and adds the keys' term to ``grad_kc``; from logits (:func:`logit_variance_backward`) or, for var_i = q_i^T C
    q_i with C = kc^T kc / n, row slice by row slice. Grouped query heads come as (B, Hk, g L, ...) rows (see
    :func:`_grouped`)."""
    if plan.cov is None:
        logit_variance_backward(q, plan.kc, plan.count, grad_var, grad_qs.mul_(factor), grad_kc)
        return grad_qs, grad_kc
    grad_cov = torch.zeros_like(plan.cov)
    for rows in row_slices(q):
        weighted = q[..., rows, :] * grad_var[..., rows, :]
        grad_qs[..., rows, :].mul_(factor[..., rows, :]).add_(torch.matmul(weighted, plan.cov), alpha=2.0)
        grad_cov.add_(torch.matmul(weighted.transpose(-1, -2), q[..., rows, :]))
    grad_cov.mul_(2.0 / plan.count[..., None].clamp(min=1.0))
    for keys in row_slices(plan.kc):
        grad_kc[..., keys, :].add_(torch.matmul(plan.kc[..., keys, :], grad_cov))
    return grad_qs, grad_kc


class FastAttention(torch.autograd.Function):
    """The kernel on rescaled queries and centred keys, with one backward for the statistics and the kernel.

    Backward: the kernel's gradient ``g`` w.r.t. the rescaled queries gives ``dL/dq_i = factor_i g_i + dL/dvar_i *
    dvar_i/dq_i`` with ``dL/dvar_i`` from ``dL/dfactor_i = g_i . q_i``; keys get the kernel's gradient plus the
    variance term (the mean's gradient is zero: every row's softmax and variance ignore a common shift of its keys).
    """

    @staticmethod
    def forward(ctx, query, key, value, gamma, key_weight, plan: Plan, settings: FastSettings):
        with torch.autocast(query.device.type, enabled=False):
            q_scaled = _rescaled(_as(query.detach(), plan.factor.dtype), plan.factor, query.dtype)
            ctx.plan, ctx.settings = plan, settings
            ctx.gamma_spec = (gamma.shape, gamma.dtype) if isinstance(gamma, torch.Tensor) and gamma.requires_grad \
                else None
            ctx.key_dtype = key.dtype
            if settings.cpu_flash:
                mask = _additive_mask(settings, query.dtype)
                out, lse = _cpu_flash(q_scaled, plan.kernel_key, value, settings, mask)
                if settings.rows_without_keys is not None:  # in place: their gradient is zeroed in the backward
                    out.masked_fill_(settings.rows_without_keys, 0.0)
                ctx.save_for_backward(query, value, key_weight, out, lse, mask)
                return out
            with torch.enable_grad():
                q_leaf = q_scaled.requires_grad_()
                k_leaf = plan.kernel_key.detach().requires_grad_()
                v_leaf = value.detach().requires_grad_()
                out = _sdpa(q_leaf, k_leaf, v_leaf, settings)
            ctx.graph = (out, q_leaf, k_leaf, v_leaf)
            ctx.save_for_backward(query, value, key_weight)
            if settings.rows_without_keys is not None:
                return out.detach().masked_fill(settings.rows_without_keys, 0.0)
            return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return FastAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        plan, settings = ctx.plan, ctx.settings
        if settings.rows_without_keys is not None:  # those rows' output is the constant 0
            grad_out = grad_out.masked_fill(settings.rows_without_keys, 0.0)
        if settings.cpu_flash:
            query, value, key_weight, out, lse, mask = ctx.saved_tensors
            grad_qs, grad_kc, grad_v = _cpu_flash_backward(
                grad_out, _rescaled(_as(query, plan.factor.dtype), plan.factor, query.dtype), plan.kernel_key, value,
                out, lse, settings, mask,
            )
        else:
            query, value, key_weight = ctx.saved_tensors
            if ctx.graph is not None:  # the first backward frees the kernel's graph as it goes
                out, q_leaf, k_leaf, v_leaf = ctx.graph
                ctx.graph = None
            elif settings.dropout_p > 0:
                raise RuntimeError(
                    "NormSoftmax attention with dropout_p > 0 cannot be backpropagated a second time "
                    "(retain_graph=True): its dropout mask is not kept. Use dropout_p=0 or "
                    "normsoftmax_attention_reference."
                )
            else:  # a second backward through a retained graph: rebuild the kernel's graph
                q_leaf = _rescaled(_as(query, plan.factor.dtype), plan.factor, query.dtype).requires_grad_()
                k_leaf = plan.kernel_key.detach().requires_grad_()
                v_leaf = value.detach().requires_grad_()
                with torch.enable_grad():
                    out = _sdpa(q_leaf, k_leaf, v_leaf, settings)
            grad_qs, grad_kc, grad_v = torch.autograd.grad(out, (q_leaf, k_leaf, v_leaf), grad_out)
        cd = plan.factor.dtype
        q = _dense(query, cd)
        grad_qs, grad_kc = _as(grad_qs, cd), _as(grad_kc, cd)
        # dL/dfactor_i = g_i . q_i -> dL/d(1/T_i) -> dL/dvar_i (and dL/dgamma)
        grad_inv = q.new_empty(*q.shape[:-1], 1)
        for rows in row_slices(q):
            torch.linalg.vecdot(grad_qs[..., rows, :], q[..., rows, :], out=grad_inv[..., rows, 0])
        grad_inv = torch.where(plan.live, grad_inv * settings.scale, 0.0)
        grad_var = grad_inv * plan.inv_temperature * (-settings.power * settings.scale**2) / plan.spread_base
        grad_gamma = None
        if ctx.gamma_spec is not None:
            spread_inv = plan.spread_base.rsqrt() if settings.power == 0.5 else plan.spread_base.reciprocal()
            shape, dtype = ctx.gamma_spec
            grad_gamma = (grad_inv * spread_inv).sum_to_size(shape).to(dtype)
        if settings.intervals is not None:
            grad_q, grad_k = interval_variance_backward(q, plan.kc, settings.intervals, grad_var[..., 0])
            grad_q.addcmul_(grad_qs, plan.factor)
            grad_k.add_(grad_kc)
        elif not settings.causal:
            Hk = plan.kc.shape[1]
            grad_q, grad_k = _bidirectional_backward(plan, _grouped(q, Hk), _grouped(grad_qs, Hk),
                                                     _grouped(grad_var, Hk), grad_kc, _grouped(plan.factor, Hk))
            if Hk != q.shape[1]:
                grad_q = grad_q.view(q.shape)
        else:
            grad_q, grad_k = causal_variance_backward(q, plan.kc, key_weight, _causal_block(q.shape[-2]),
                                                      grad_var[..., 0], plan.causal_projected)
            grad_q.addcmul_(grad_qs, plan.factor)
            grad_k.add_(grad_kc)
        if key_weight is not None:  # padded keys get no gradient (kc is zero there)
            grad_k.mul_(key_weight[:, None, :, None])
        return _as(grad_q, query.dtype), _as(grad_k, ctx.key_dtype), grad_v, grad_gamma, None, None, None


def fast_no_grad(query, key, value, plan: Plan, settings: FastSettings):
    """The kernel call of the fast path when no gradient is needed (inference)."""
    with torch.autocast(query.device.type, enabled=False):
        q_scaled = _rescaled(_as(query, plan.factor.dtype), plan.factor, query.dtype)
        if settings.cpu_flash:  # the kernel the training path calls: bit-identical outputs
            mask = _additive_mask(settings, query.dtype)
            out = _cpu_flash(q_scaled, plan.kernel_key, value, settings, mask)[0]
        else:
            out = _sdpa(q_scaled, plan.kernel_key, value, settings)
        if settings.rows_without_keys is not None:
            out.masked_fill_(settings.rows_without_keys, 0.0)
        return out


# ----------------------------------------------------------------------------------------------------------------
# exact rows
# ----------------------------------------------------------------------------------------------------------------


def exact_rows(query, key, value, index, key_valid, gamma, settings: FastSettings, max_temperature, eps, statistic):
    """NormSoftmax attention of the query rows ``index`` (B, H, X), with their logits materialised in the
    statistics dtype: (B, H, X, D) in the query dtype. Differentiable (ordinary autograd)."""
    B, H, L, D = query.shape
    Hk, S = key.shape[1], key.shape[-2]
    cd = compute_dtype(query.dtype)
    rows = index[..., None]
    q = query.gather(2, rows.expand(*index.shape, D)).to(cd)
    # grouped query heads: (B, Hk, g, X, D) against their key head, no expanded keys
    logits = torch.matmul(q.unflatten(1, (Hk, H // Hk)), key.to(cd).transpose(-1, -2)[:, :, None]).flatten(1, 2)
    logits = logits * settings.scale
    valid = None if key_valid is None else key_valid[:, None, None, :]
    positions = torch.arange(S, device=query.device)
    if settings.intervals is not None:
        lo, hi = (x[:, None, :].expand(B, H, L).gather(2, index)[..., None] for x in (settings.intervals.lo,
                                                                                     settings.intervals.hi))
        valid = (positions >= lo) & (positions < hi)  # (B, H, X, S)
    elif settings.causal:
        causal = positions <= (rows + (S - L))  # (B, H, X, S)
        valid = causal if valid is None else valid & causal
    if valid is not None:
        valid = valid.expand(logits.shape)
    if isinstance(gamma, torch.Tensor) and gamma.dim() >= 2 and gamma.shape[-2] != 1:
        gamma = gamma.expand(B, H, L, 1).gather(2, rows)  # one gamma per row: take the exact rows' values
    weights = norm_softmax(logits, dim=-1, mask=valid, gamma=gamma, max_temperature=max_temperature, eps=eps,
                           statistic=statistic)
    if settings.dropout_p > 0:
        weights = F.dropout(weights, p=settings.dropout_p)
    out = torch.matmul(weights.unflatten(1, (Hk, H // Hk)), value.to(cd)[:, :, None]).flatten(1, 2)
    return out.to(query.dtype)
