"""sigmaReparam internals: the power-iteration step, the autograd functions of the reparametrised weight and
matmul and the helpers they share (layouts, aligned copies, dtype rules).

Used by :mod:`hf_normsoftmax.sigma_reparam` (the layers); see its docstring for the rules these implement.

Divergence: the per-step scalars ``s / sigma`` stay Python numbers on the CPU fused path; one beyond the weight
dtype's range (a diverged layer) sends the forward through tensor arithmetic, so a diverged layer gives inf / nan
outputs and loss as its stock twin does, never an error.

Cost on CPU: a forward reads the weight once for the check ``W^T v``; a training forward that steps reads it
three times (the check ``W^T v``,
then ``W u`` and ``W^T v'`` when it steps); the first read is the one that counts (right after an optimizer
step the weight is no longer in cache; the other two reads and the layer's own matmul find it there). Linear /
Conv1D layers fold ``s / sigma`` into the matmul and keep the per-step scalars as Python numbers; the weight
gradient gets the rank-one term of ``d sigma / dW`` in place (:class:`_ReparamMatmul`), one inner product and
one rank-one update over the weight. Everything else is per-layer Python, kept to a few tensor ops.

Pure PyTorch (never imports transformers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LAYOUTS = ("out_in", "in_out", "conv")
_HALF_DTYPES = (torch.float16, torch.bfloat16)

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Power iteration and sigma in float32 for half weights; float64 weights stay exact.
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _read(buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh compute-dtype copy of a u/v buffer (fresh: autograd may save it while the buffer is updated)."""
    if buffer.dtype in _HALF_DTYPES:
        # Rounding to half breaks the unit norm by ~1e-3, which would bias sigma by as much: renormalise.
        return F.normalize(buffer.to(dtype), dim=0)
    return buffer.to(dtype, copy=True)


_ALIGNMENT = 64  # bytes: where PyTorch's CPU allocator starts every tensor it allocates


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy of it in a fresh allocation if its CPU data does not start on a 64-byte boundary.

    CPU matrix-vector and dot products (and single-row matmuls) take a different vectorised route, which rounds
    differently, for data off such a boundary, as tensors mapped from a safetensors file usually are. Feeding
    them aligned data gives a loaded layer the bits of the layer the saving process allocated itself.
    """
    if (
        not torch.compiler.is_compiling()  # (compiled graphs have no data pointers; they place their own data)
        and type(tensor) in (torch.Tensor, nn.Parameter)  # not subclasses (DTensor, fake / functional tensors)
        and tensor.device.type == "cpu"
        and tensor.data_ptr() % _ALIGNMENT != 0
    ):
        return tensor.clone()  # preserve_format: a dense tensor keeps its strides
    return tensor


def _normalize(vector: torch.Tensor) -> torch.Tensor:
    """``F.normalize(vector, dim=0)`` for a 1-D CPU vector: the same bits (same norm, floor and division).

    The floor is applied only when needed, decided on the host (free on CPU): one tensor op fewer per call.
    A nan norm compares False and propagates exactly as through ``clamp_min``.
    """
    norm = torch.linalg.vector_norm(vector)
    if norm.item() < 1e-12:
        norm = norm.clamp_min(1e-12)
    return vector / norm


_ZEROS: dict[torch.dtype, torch.Tensor] = {}


def _cpu_zero(dtype: torch.dtype) -> torch.Tensor:
    """A shared 0-dim CPU zero: the ignored ``input`` of ``addmm(..., beta=0)`` (never written)."""
    zero = _ZEROS.get(dtype)
    if zero is None:
        with torch.inference_mode(False):  # a normal tensor even if first needed under inference_mode
            zero = _ZEROS[dtype] = torch.zeros((), dtype=dtype, device="cpu")
    return zero


def _full_precision(method):
    """Runs ``method`` with autocast off on the weight's device: the power iteration must not drop to half."""

    def wrapper(self, *args, **kwargs):
        device_type = self.weight.device.type
        if device_type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return method(self, *args, **kwargs)
        return method(self, *args, **kwargs)

    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = method.__name__, method.__qualname__, method.__doc__
    return wrapper


_SIGMA_FLOORS: dict[torch.dtype, float] = {}


def _sigma_floor(dtype: torch.dtype) -> float:
    # Keeps s / sigma finite for a weight whose estimate is tiny but not zero (zero means plain, see below).
    floor = _SIGMA_FLOORS.get(dtype)
    if floor is None:
        floor = _SIGMA_FLOORS[dtype] = torch.finfo(dtype).tiny ** 0.5
    return floor


# A plain layer wakes once an entry of its weight reaches the power iteration's normalisation floor (F.normalize's
# eps): below it the vectors could not be unit, and the layer stays plain (W_hat = W, exactly its stock twin).
_WAKE_ABOVE = 1e-12


def _wakes(weight: torch.Tensor) -> bool:
    return bool((weight.detach().abs() >= _WAKE_ABOVE).any())


_DTYPE_MAX: dict[torch.dtype, float] = {}


def _in_range(value: float, dtype: torch.dtype) -> float:
    """``value`` if ``dtype`` can hold it, else +-inf (nan stays nan).

    torch refuses a finite Python float beyond the dtype's range as an op's scalar argument ("value cannot be
    converted to type float without overflow"): a diverging layer must give inf / nan, as a stock layer does.
    """
    limit = _DTYPE_MAX.get(dtype)
    if limit is None:
        limit = _DTYPE_MAX[dtype] = float(torch.finfo(dtype).max)
    if -limit <= value <= limit or value != value:
        return value
    return float("inf") if value > 0 else float("-inf")


class _ScaledWeight(torch.autograd.Function):
    """``W_hat = W * scale / sigma`` with ``sigma = v^T M u`` (M the (out, in) view of W; u, v constants).

    Gradients (G = dL/dW_hat, <.,.> the elementwise inner product):
    ``dL/dW = (scale / sigma) * G - (scale / sigma^2) * <G, W> * v u^T`` and ``dL/dscale = <G, W> / sigma``.
    Written out so the backward makes two passes over the weight instead of the composition's four or five.
    ``sigma`` comes in precomputed and unclamped (the power iteration already has it); ``sigma == 0`` means the
    layer is plain (``W_hat = W``, ``dL/dW = G``, no gradient for ``scale``), decided per element with
    ``torch.where`` (no host sync). Under create_graph the backward recomputes sigma from W with
    differentiable ops, so double backward is exact as well.
    """

    @staticmethod
    def forward(ctx, weight, scale, u, v, sigma, layout):
        compute_dtype = _compute_dtype(weight.dtype)
        plain = sigma == 0
        clamped = sigma.clamp(min=_sigma_floor(compute_dtype))
        alpha = torch.where(plain, torch.ones_like(clamped), scale.to(compute_dtype) / clamped)
        ctx.save_for_backward(weight, scale, u, v, clamped, plain)
        ctx.layout = layout
        # bf16/fp16 * float32 0-dim tensor is evaluated in float32 and rounded once.
        return weight * alpha

    @staticmethod
    def backward(ctx, grad_output):
        weight, scale, u, v, sigma, plain = ctx.saved_tensors
        layout = ctx.layout
        if torch.is_grad_enabled():  # create_graph
            grads = _recomputed_grads(lambda w_hat: w_hat, grad_output, (weight, scale), ctx.needs_input_grad[:2],
                                      weight, scale, u, v, layout, plain)
            return (*grads, None, None, None, None)
        compute_dtype = _compute_dtype(weight.dtype)
        w = _aligned(weight).to(compute_dtype)
        g = grad_output.to(compute_dtype)
        s = torch.where(plain, torch.zeros_like(sigma), scale.to(compute_dtype))
        inner = torch.dot(g.reshape(-1), w.reshape(-1))
        grad_weight = grad_scale = None
        if ctx.needs_input_grad[0]:
            alpha = torch.where(plain, torch.ones_like(sigma), s / sigma)
            coef_v = v * (-(s / sigma.square()) * inner)
            grad_weight = _scaled_plus_outer(g, alpha, coef_v, u, layout).to(weight.dtype)
        if ctx.needs_input_grad[1]:
            grad_scale = torch.where(plain, torch.zeros_like(sigma), inner / sigma).to(scale.dtype)
        return grad_weight, grad_scale, None, None, None, None


def _recomputed_grads(function, grad_output, inputs, needs, weight, scale, u, v, layout, plain=None) -> tuple:
    """The gradients of ``function(W_hat)`` for the ``inputs`` that ``needs`` says, by autograd through a
    differentiable recomputation of ``W_hat`` (u, v held constant): the backward under create_graph, so double
    backward is exact."""
    compute_dtype = _compute_dtype(weight.dtype)
    matrix_t = _matrix(weight, layout).t().to(compute_dtype)
    sigma = torch.dot(torch.mv(matrix_t, v.to(compute_dtype)), u.to(compute_dtype))
    alpha = scale.to(compute_dtype) / sigma.clamp(min=_sigma_floor(compute_dtype))
    if plain is not None:
        alpha = torch.where(plain, torch.ones_like(alpha), alpha)
    wanted = [tensor for tensor, need in zip(inputs, needs, strict=True) if need]
    grads = iter(torch.autograd.grad(function(weight * alpha), wanted, grad_output, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def _scaled_addmm(x, weight, bias, alpha: float, layout: str, w_mm=None) -> torch.Tensor:
    """``alpha * x @ W^T + bias`` for a (rows, in) input; ``w_mm`` is the weight as the matmul takes it, if already
    at hand (aligned, transposed for the out_in layout)."""
    if w_mm is None:
        aligned = _aligned(weight.detach())
        w_mm = aligned.t() if layout == "out_in" else aligned
    if bias is not None:
        return torch.addmm(bias, x, w_mm, alpha=alpha)
    return torch.addmm(_cpu_zero(x.dtype), x, w_mm, beta=0, alpha=alpha)


class _ReparamMatmul(torch.autograd.Function):
    """``y = bias + alpha * x @ W_mm`` for 2-D ``x``, ``alpha = scale / sigma`` (``W_mm = W^T`` for "out_in", ``W``
    for "in_out").

    The training path of Linear / Conv1D layers on CPU: the factor goes into the BLAS call's alpha, so no
    W_hat is materialised forward and the weight gradient gets its rank-one correction in place. Same
    gradients as :class:`_ScaledWeight` followed by the matmul (see there); double backward goes through a
    differentiable recomputation. Not used under autocast or torch.compile, nor off the CPU (the per-step
    scalars are Python numbers, which would sync an accelerator).

    ``state = (u, v, alpha, sigma, layout, w_mm)``: the power-iteration vectors of this forward (fresh tensors,
    never the buffers, which a later forward may overwrite before this backward), ``alpha = scale.item() / sigma``
    and ``sigma = v^T W u`` (clamped to the floor) as Python floats, and ``W_mm`` when the caller already holds
    that view of the weight (else None). Only ``x``, ``weight``, ``bias`` and ``scale`` are autograd inputs:
    fewer inputs, less per-call bookkeeping.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, state):
        out = _scaled_addmm(x, weight, bias, alpha=state[2], layout=state[4], w_mm=state[5])
        ctx.save_for_backward(x, weight, scale)
        ctx.state = state
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scale = ctx.saved_tensors
        u, v, alpha, sigma, layout, _ = ctx.state
        need_x, need_w, need_b, need_s, _ = ctx.needs_input_grad
        grad_x = grad_w = grad_b = grad_s = None
        if need_b:
            grad_b = grad_out.sum(0)
        if torch.is_grad_enabled():  # create_graph
            grads = _recomputed_grads(lambda w_hat: x.mm(w_hat.t() if layout == "out_in" else w_hat), grad_out,
                                      (x, weight, scale), (need_x, need_w, need_s), weight, scale, u, v, layout)
            return grads[0], grads[1], grad_b, grads[2], None
        # First-order backward on CPU: the scalars are Python numbers, which saves a dozen tiny tensor ops.
        zero = _cpu_zero(grad_out.dtype)
        weight = _aligned(weight.detach())
        if need_x:
            grad_x = torch.addmm(zero, grad_out, weight if layout == "out_in" else weight.t(), beta=0, alpha=alpha)
        if need_w or need_s:
            # alpha * dL/dW_hat straight from BLAS; <dL/dW_hat, W> recovered by dividing alpha back out.
            scale_by = alpha if alpha != 0.0 else 1.0
            if layout == "out_in":
                grad_w = torch.addmm(zero, grad_out.t(), x, beta=0, alpha=scale_by)
            else:
                grad_w = torch.addmm(zero, x.t(), grad_out, beta=0, alpha=scale_by)
            flat_w = weight.view(-1) if weight.is_contiguous() else weight.reshape(-1)
            wide = torch.float32 if grad_w.dtype in _HALF_DTYPES else grad_w.dtype
            inner = torch.dot(grad_w.view(-1).to(wide), flat_w.to(wide)).item() / scale_by
            if need_s:
                grad_s = torch.full_like(scale, _in_range(inner / sigma, scale.dtype))
            if need_w:
                if alpha == 0.0:
                    grad_w.zero_()
                # dL/dW = alpha * G - (alpha / sigma) <G, W> v u^T, the rank-one term added in place.
                coef = _in_range(-(alpha / sigma) * inner, grad_w.dtype)
                if grad_w.dtype != u.dtype:
                    u, v = u.to(grad_w.dtype), v.to(grad_w.dtype)
                if layout == "in_out":
                    grad_w.addr_(u, v, alpha=coef)
                else:
                    grad_w.addr_(v, u, alpha=coef)
            else:
                grad_w = None
        return grad_x, grad_w, grad_b, grad_s, None


def _matrix(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The (out, in) matrix view of a weight stored in ``layout``."""
    if layout == "out_in":
        return weight
    if layout == "in_out":
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


def _scaled_plus_outer(
    g: torch.Tensor, alpha: torch.Tensor, v_part: torch.Tensor, u: torch.Tensor, layout: str
) -> torch.Tensor:
    """``alpha * g + v_part u^T`` in the weight's storage layout, in one pass over g where possible."""
    first, second = (u, v_part) if layout == "in_out" else (v_part, u)
    if g.device.type == "cpu" and not torch.compiler.is_compiling():
        # addr's beta must be a Python number: free to read on CPU (elsewhere it would sync the device).
        matrix = g if layout != "conv" else g.reshape(g.shape[0], -1)
        return torch.addr(matrix, first, second, beta=_in_range(alpha.item(), g.dtype)).reshape(g.shape)
    out = g * alpha
    (out if layout != "conv" else out.view(out.shape[0], -1)).addr_(first, second)
    return out


def _power_step(matrix, u_now, u_dtype, v_dtype, compute_dtype):
    """One power-iteration step from ``u_now``: (u, v as stored, u, v in the compute dtype, sigma = (W^T v) . u)."""
    v_new_stored = F.normalize(torch.mv(matrix, u_now), dim=0).to(v_dtype)
    v_new = _read(v_new_stored, compute_dtype)
    wt_v = torch.mv(matrix.t(), v_new)
    u_new_stored = F.normalize(wt_v, dim=0).to(u_dtype)
    u_new = _read(u_new_stored, compute_dtype)
    return u_new_stored, v_new_stored, u_new, v_new, torch.dot(wt_v, u_new)
