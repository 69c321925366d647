"""NormSoftmax: softmax of logits normalised to unit spread over the valid entries.

``NormSoftmax(x) = softmax((x - mean(x)) / T)`` with ``T = stat(x) / gamma`` computed over the valid (unmasked)
entries of each row along ``dim``; ``stat`` is ``sqrt(var + eps)`` ("std", the default) or ``var + eps`` ("var").
An optional cap ``T <= max_temperature`` keeps the softmax from becoming softer than a chosen temperature.
The variance is the population variance (divided by the number of valid entries), as in the attention fast path.

Usage::

    import torch
    from hf_normsoftmax.normsoftmax import norm_softmax, normalize_logits

    logits = torch.randn(4, 10)
    probs = norm_softmax(logits, dim=-1, gamma=2.0)               # rows sum to 1
    z = normalize_logits(logits, dim=-1, gamma=2.0)               # what the softmax sees (mean 0, std ~2)
    keep = torch.rand(4, 10) > 0.3
    probs = norm_softmax(logits, dim=-1, mask=keep)               # masked entries exactly 0

The module form :class:`~hf_normsoftmax.layers.NormSoftmax` (no model uses it) lives in the package-only
``layers.py``; ``hf_normsoftmax.normsoftmax.NormSoftmax`` names the same class once the package is imported.

Degenerate rows are defined by their limits: one valid entry gets probability 1, a constant row is exactly uniform
over its valid entries, and a row with no valid entry gives exact zeros from :func:`norm_softmax` (``-inf`` from
:func:`normalize_logits`), with finite gradients everywhere.

Pure PyTorch (never imports transformers): checkpoints saved with remote code copy this file as is.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "EPS_RANGE",
    "GAMMA_RANGE",
    "INVERSE_TEMPERATURE_RANGE",
    "MAX_TEMPERATURE_RANGE",
    "norm_softmax",
    "normalize_logits",
]

_STATISTICS = ("std", "var")
_HALF_DTYPES = (torch.float16, torch.bfloat16)

# Allowed ranges (inclusive) of the settings, shared by every function here, losses.py, attention.py and the
# config flags. Measured at every corner of the ranges (materialised and fast attention, causal or not, and the
# NormSoftmax loss; rows that are random, scaled x15, constant, of variance 1e-6 of their mean, or one spike):
# every float32 / bfloat16 output and gradient is finite, and so are the float16 attention outputs and losses on
# rows that are not near-constant. Two float16 limits no range removes: the gradient of a near-constant row is
# of order gamma / sqrt(eps) ("std") or gamma / eps ("var"), beyond 65504 for small eps; and normalize_logits
# returns the input dtype, where |z| > 65504 becomes inf ("var" rows, or a small cap on logits of thousands).
# * gamma <= 1e2: a normalised row of n entries reaches gamma * sqrt(n - 1) at most (std statistic), so float16
#   results stay finite up to n = 429,000 entries; at gamma = 1e38 even float32 outputs overflow. gamma >= 1e-3:
#   already a uniform softmax for any realistic logits.
# * eps >= 1e-14: the backward of a (near-)constant row scales as gamma / eps^(3/2) ("std") or gamma / eps^2
#   ("var"), finite in float32 down to about 1e-24; eps = 1e-60 rounds to 0 in float32 (NaN on constant rows).
#   eps <= 1: a larger eps would dominate the variance of ordinary logits (no normalisation left).
# * max_temperature >= 1e-2: the cap multiplies the centred logits by up to 1 / max_temperature; at 1e-4,
#   float16 attention on logits of a few hundred overflows, and 1e-39 cannot even be a float32 (overflow error).
#   max_temperature <= 1e6: such a cap is never active on ordinary logits (None is "no cap").
# * beta (inverse temperature of the loss) shares the gamma range: both scale the logits the softmax sees.
GAMMA_RANGE = (1e-3, 1e2)
INVERSE_TEMPERATURE_RANGE = GAMMA_RANGE
EPS_RANGE = (1e-14, 1.0)
MAX_TEMPERATURE_RANGE = (1e-2, 1e6)


# ----------------------------------------------------------------------------------------------------------------
# argument checks (shared with losses.py)
# ----------------------------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive_finite(name: str, value) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a positive finite number, got {value!r} of type {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_in_range(name: str, value, bounds: tuple[float, float]) -> float:
    """A finite number inside ``bounds`` (inclusive), as a float; TypeError / ValueError naming ``name``."""
    low, high = bounds
    if not _is_number(value):
        raise TypeError(
            f"{name} must be a number in [{low:g}, {high:g}], got {value!r} of type {type(value).__name__}"
        )
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _check_tensor_in_range(name: str, value: torch.Tensor, bounds: tuple[float, float]) -> None:
    """Every entry of ``value`` finite and inside ``bounds``, up to one rounding of the tensor's dtype (a learned
    value clamped to the range in bfloat16 may round just outside it). Skipped under torch.compile (a data-dependent
    check would break the graph); eager calls get it."""
    if torch.compiler.is_compiling() or value.numel() == 0:
        return
    low, high = bounds
    v = value.detach()
    slack = torch.finfo(v.dtype).eps if v.dtype.is_floating_point else 0.0
    lowest, highest = v.min().item(), v.max().item()
    if not (math.isfinite(lowest) and math.isfinite(highest)) or not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} must be finite everywhere, got values in [{lowest:.4g}, {highest:.4g}]")
    if lowest < low * (1 - slack) or highest > high * (1 + slack):
        raise ValueError(
            f"{name} must lie in [{low:g}, {high:g}] everywhere, got values in [{lowest:.4g}, {highest:.4g}]"
        )


def _check_float_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got dtype {value.dtype}"
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half inputs are normalised in float32 (their variance under- or overflows easily); float64 stays exact.
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _check_dim(dim, ndim: int) -> int:
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"dim must be an int, got {dim!r}")
    if ndim == 0:
        raise ValueError("input must have at least one dimension to normalise over, got a 0-dim tensor")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim must be in [{-ndim}, {ndim - 1}] for a {ndim}-dim input, got {dim}")
    return dim % ndim


def _broadcasts_to(tensor: torch.Tensor, shape: torch.Size) -> bool:
    """Whether ``tensor`` broadcasts to exactly ``shape`` (without growing it)."""
    try:
        return torch.broadcast_shapes(tensor.shape, shape) == shape
    except RuntimeError:
        return False


def _check_mask(mask, input: torch.Tensor):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be None or a bool tensor (True = valid), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = valid), got dtype {mask.dtype}")
    if not _broadcasts_to(mask, input.shape):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} must be broadcastable to the input shape {tuple(input.shape)}"
        )
    if mask.device != input.device:
        raise ValueError(f"mask is on {mask.device} but input is on {input.device}; put them on the same device")
    return mask


def _check_gamma(gamma, shape: tuple[int, ...], dim: int):
    """gamma for logits of ``shape`` normalised over ``dim`` (non-negative): a float in ``GAMMA_RANGE``, or a float
    tensor of such values broadcastable to ``shape`` with size 1 (or absent) at ``dim``. Returns (gamma as float or
    None, gamma as tensor or None); shared by normalize_logits and the attention functions."""
    if isinstance(gamma, torch.Tensor):
        _check_float_tensor("gamma", gamma)
        offset = len(shape) - gamma.ndim  # gamma's dims align with the logits' trailing dims
        if not _broadcasts_to(gamma, shape) or (dim >= offset and gamma.shape[dim - offset] != 1):
            raise ValueError(
                f"gamma tensor of shape {tuple(gamma.shape)} must be broadcastable to the logits' shape "
                f"{tuple(shape)} with size 1 (or absent) at the normalised dim {dim} (e.g. shape (heads, 1, 1) for "
                "one value per attention head)"
            )
        _check_tensor_in_range("gamma", gamma, GAMMA_RANGE)
        return None, gamma
    return _check_in_range("gamma", gamma, GAMMA_RANGE), None


def _check_options(max_temperature, eps, statistic) -> tuple[float | None, float, float]:
    """Validates the scalar options; returns (1 / max_temperature or None, eps, exponent of (var + eps))."""
    inv_cap = None
    if max_temperature is not None:
        inv_cap = 1.0 / _check_in_range("max_temperature (None for no cap)", max_temperature, MAX_TEMPERATURE_RANGE)
    eps = _check_in_range("eps", eps, EPS_RANGE)
    if statistic not in _STATISTICS:
        raise ValueError(f"statistic must be one of {_STATISTICS}, got {statistic!r}")
    power = 0.5 if statistic == "std" else 1.0
    return inv_cap, eps, power


# ----------------------------------------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------------------------------------


def _row_terms(x, mask, dim, gamma, inv_cap, eps, power):
    """Centred logits, inverse temperature and their ingredients for rows of ``x`` (already in compute dtype).

    Returns (centred, inv_temperature, var, count, uncapped) with every per-row tensor kept as size 1 at ``dim``.
    ``centred`` is 0 at masked entries; ``uncapped`` is None without a cap, else True where the cap is not active.
    """
    if mask is None:
        count = torch.tensor(float(x.shape[dim]), dtype=x.dtype, device=x.device)
        shifted = x - x.mean(dim, keepdim=True)
        # Second pass: remove the rounding left in the first mean (exact for equal entries, which stay equal).
        centred = shifted - shifted.mean(dim, keepdim=True)
    else:
        full_mask = mask.expand(x.shape)
        count = full_mask.sum(dim, keepdim=True).to(x.dtype).clamp(min=1.0)  # empty rows: avoid 0 / 0
        zeroed = torch.where(mask, x, 0.0)  # also hides -inf / nan sitting in masked slots
        shifted = torch.where(mask, zeroed - zeroed.sum(dim, keepdim=True) / count, 0.0)
        centred = torch.where(mask, shifted - shifted.sum(dim, keepdim=True) / count, 0.0)
    var = centred.square().sum(dim, keepdim=True) / count
    inv_temperature, uncapped = _inverse_temperature(var, gamma, inv_cap, eps, power)
    return centred, inv_temperature, var, count, uncapped


def _inverse_temperature(var, gamma, inv_cap, eps, power):
    """1 / T = gamma / stat (capped: T <= max_temperature <=> 1/T >= 1/max_temperature) and the uncapped mask."""
    spread_inv = torch.rsqrt(var + eps) if power == 0.5 else (var + eps).reciprocal()
    inv_temperature = spread_inv * gamma
    if inv_cap is None:
        return inv_temperature, None
    return inv_temperature.clamp(min=inv_cap), inv_temperature >= inv_cap


def _lean_forward(x, mask, dim, gamma, inv_cap, eps, power, fill_value):
    """Normalised logits in compute dtype, in a few passes and one full-size allocation, plus the row statistics.

    Same math as :func:`_row_terms`: full-size temporaries cost more than the arithmetic on CPU (every large
    allocation is fresh, page-faulted memory), so the work happens in place in the output buffer.
    """
    compute_dtype = _compute_dtype(x.dtype)
    converted = x.to(compute_dtype)
    owns_converted = converted is not x  # a half input was copied: that copy may be reused in place
    if mask is None:
        count = float(x.shape[dim])
        first_mean = converted.mean(dim, keepdim=True)
        buf = converted.sub_(first_mean) if owns_converted else converted - first_mean
    else:
        count = mask.expand(x.shape).sum(dim, keepdim=True).to(compute_dtype).clamp(min=1.0)
        buf = torch.where(mask, converted, 0.0)  # also hides -inf / nan sitting in masked slots
        first_mean = buf.sum(dim, keepdim=True) / count
        buf.sub_(first_mean).masked_fill_(~mask, 0.0)
    # Second pass on the shifted values removes the rounding left in the first mean (equal entries stay equal).
    second_mean = buf.sum(dim, keepdim=True) / count
    sum_squares = torch.linalg.vector_norm(buf, dim=dim, keepdim=True).square()
    var = (sum_squares / count - second_mean.square()).clamp(min=0.0)
    inv_temperature, uncapped = _inverse_temperature(var, gamma, inv_cap, eps, power)
    buf.sub_(second_mean).mul_(inv_temperature)
    if mask is not None:
        buf.masked_fill_(~mask, fill_value)
    return buf, (first_mean + second_mean, var, inv_temperature, count, uncapped)


class _NormalizeLogits(torch.autograd.Function):
    """Fused normalisation with a hand-written backward.

    Saves the input (plus mask, gamma and per-row statistics) instead of the ~5 full-size intermediates of the
    autograd composition, and works in place: forward and backward each allocate one full-size tensor. This
    matters for language-model losses with tens of thousands of classes. Under create_graph the backward is
    recomputed with differentiable ops from the saved input, so double backward is exact too.
    """

    @staticmethod
    def forward(ctx, x, mask, gamma_tensor, gamma_float, dim, inv_cap, eps, power, out_dtype, fill_value):
        compute_dtype = _compute_dtype(x.dtype)
        gamma = gamma_float if gamma_tensor is None else gamma_tensor.to(compute_dtype)
        z, (mean, var, inv_temperature, count, uncapped) = _lean_forward(
            x, mask, dim, gamma, inv_cap, eps, power, fill_value
        )
        count_tensor = count if isinstance(count, torch.Tensor) else None
        ctx.save_for_backward(x, mask, gamma_tensor, mean, var, inv_temperature, count_tensor, uncapped)
        ctx.options = (gamma_float, dim, inv_cap, eps, power, count)
        return z.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_z):
        x, mask, gamma_tensor, mean, var, inv_temperature, count_tensor, uncapped = ctx.saved_tensors
        gamma_float, dim, inv_cap, eps, power, count = ctx.options
        count = count_tensor if count_tensor is not None else count
        compute_dtype = _compute_dtype(x.dtype)
        gamma = gamma_float if gamma_tensor is None else gamma_tensor.to(compute_dtype)
        if torch.is_grad_enabled():
            return _NormalizeLogits._differentiable_backward(ctx, x, mask, gamma_tensor, gamma, grad_z)
        g = grad_z.to(compute_dtype)
        converted = x.to(compute_dtype)
        # buf = c = x - mean (0 at masked entries); first used to get dL/ds = sum_j g_j c_j for z = c * s.
        buf = converted.sub_(mean) if converted is not x else converted - mean
        if mask is not None:
            buf.masked_fill_(~mask, 0.0)
        buf.mul_(g)
        if mask is not None:
            buf.masked_fill_(~mask, 0.0)  # upstream grads of the constant masked outputs are ignored
        grad_inv_temperature = buf.sum(dim, keepdim=True)
        if uncapped is not None:
            grad_inv_temperature = torch.where(uncapped, grad_inv_temperature, 0.0)
        # s = gamma * (var + eps)^(-power): ds/dvar = -power * s / (var + eps); dvar/dc_j = 2 c_j / n.
        centred_coef = grad_inv_temperature * inv_temperature * (-2.0 * power) / ((var + eps) * count)
        # dL/dc_j = g_j * s + c_j * centred_coef, rebuilt in the same buffer
        torch.sub(converted if converted is x else x.to(compute_dtype), mean, out=buf)
        buf.mul_(centred_coef).addcmul_(g, inv_temperature)
        if mask is not None:
            buf.masked_fill_(~mask, 0.0)
        # c_j = x_j - mean_valid(x): project out the row mean over the valid entries.
        buf.sub_(buf.sum(dim, keepdim=True) / count)
        if mask is not None:
            buf.masked_fill_(~mask, 0.0)
        grad_x = buf.to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_gamma = None
        if gamma_tensor is not None and ctx.needs_input_grad[2]:
            # s = gamma * spread_inv, so ds/dgamma = s / gamma (0 where capped).
            grad_gamma = (grad_inv_temperature * inv_temperature / gamma).sum_to_size(gamma_tensor.shape)
            grad_gamma = grad_gamma.to(gamma_tensor.dtype)
        return grad_x, None, grad_gamma, None, None, None, None, None, None, None

    @staticmethod
    def _differentiable_backward(ctx, x, mask, gamma_tensor, gamma, grad_z):
        """The same gradients by autograd through the forward's formula (:func:`_row_terms`) recomputed from the
        saved input (used under create_graph). Masked outputs are constants: their ``centred`` is 0."""
        _, dim, inv_cap, eps, power, _ = ctx.options
        centred, inv_temperature, *_ = _row_terms(x.to(_compute_dtype(x.dtype)), mask, dim, gamma, inv_cap, eps, power)
        z = centred * inv_temperature
        needs = (ctx.needs_input_grad[0], gamma_tensor is not None and ctx.needs_input_grad[2])
        wanted = [tensor for tensor, need in zip((x, gamma_tensor), needs, strict=True) if need]
        grads = iter(torch.autograd.grad(z, wanted, grad_z.to(z.dtype), create_graph=True))
        grad_x, grad_gamma = (next(grads) if need else None for need in needs)
        return grad_x, None, grad_gamma, None, None, None, None, None, None, None


def _normalize(input, dim, mask, gamma=1.0, max_temperature=None, eps=1e-6, statistic="std", *, out_dtype=None,
               fill_value=float("-inf")):
    """normalize_logits (the defaults of both public functions), returned in ``out_dtype`` (default: the input's)
    with ``fill_value`` at masked entries."""
    _check_float_tensor("input", input)
    dim = _check_dim(dim, input.ndim)
    mask = _check_mask(mask, input)
    gamma_float, gamma_tensor = _check_gamma(gamma, input.shape, dim)
    inv_cap, eps, power = _check_options(max_temperature, eps, statistic)
    if out_dtype is None:
        out_dtype = input.dtype
    return _NormalizeLogits.apply(
        input, mask, gamma_tensor, gamma_float, dim, inv_cap, eps, power, out_dtype, fill_value
    )


def normalize_logits(
    input: torch.Tensor,
    dim: int = -1,
    mask: torch.Tensor | None = None,
    gamma: float | torch.Tensor = 1.0,
    max_temperature: float | None = None,
    eps: float = 1e-6,
    statistic: str = "std",
) -> torch.Tensor:
    """The logits NormSoftmax feeds to the softmax: ``(x - mean_valid(x)) / T`` with ``T = stat_valid(x) / gamma``.

    Args:
        input: floating tensor of logits (float16/bfloat16 are normalised in float32, float64 stays float64);
            the result has the input's dtype.
        dim: dimension to normalise over.
        mask: optional bool tensor broadcastable to ``input``; True marks valid entries. Masked entries are
            excluded from the statistics and returned as ``-inf``.
        gamma: target spread: a float in ``GAMMA_RANGE`` ([1e-3, 1e2]), or a tensor of such values broadcastable
            to ``input`` with size 1 at ``dim`` (for example one value per attention head, shape ``(H, 1, 1)`` for
            ``(B, H, L, S)`` logits).
        max_temperature: optional cap ``T <= max_temperature``, in ``MAX_TEMPERATURE_RANGE`` ([1e-2, 1e6]; None:
            no cap).
        eps: added to the variance before the square root (or, for "var", before dividing); in ``EPS_RANGE``
            ([1e-14, 1]).
        statistic: "std" (``T = sqrt(var + eps) / gamma``) or "var" (``T = (var + eps) / gamma``).

    Example::

        z = normalize_logits(torch.randn(2, 5), gamma=3.0)
        z.std(-1, unbiased=False)  # ~3
    """
    return _normalize(input, dim, mask, gamma, max_temperature, eps, statistic)


def norm_softmax(input: torch.Tensor, dim: int = -1, mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
    """``softmax(normalize_logits(input, ...))`` over ``dim``, in the input dtype (computed in float32 for halves).

    Masked entries get probability exactly 0; rows with no valid entry are all zeros (never NaN) and pass zero
    gradient; a constant row is exactly uniform over its valid entries. Arguments as in :func:`normalize_logits`
    (``gamma``, ``max_temperature``, ``eps``, ``statistic`` after ``mask``, by position or by name).

    Example::

        p = norm_softmax(torch.randn(3, 7), mask=torch.tensor([True] * 5 + [False] * 2))
        p.sum(-1)  # tensor([1., 1., 1.])
    """
    compute_dtype = _compute_dtype(input.dtype) if isinstance(input, torch.Tensor) else None
    # Masked slots get the most negative finite value, not -inf: an all-masked row then has a finite
    # softmax (uniform) that the final fill turns into zeros, and its backward stays NaN-free.
    fill = torch.finfo(compute_dtype).min if compute_dtype is not None and compute_dtype.is_floating_point else 0.0
    z = _normalize(input, dim, mask, *args, out_dtype=compute_dtype, fill_value=fill, **kwargs)
    probs = torch.softmax(z, dim=dim)
    if mask is not None:
        probs = probs.masked_fill(~mask, 0.0)
    return probs.to(input.dtype)
