"""Cross-entropy losses for NormSoftmax and for an inverse temperature beta on the logits.

Both functions take ``F.cross_entropy``'s arguments (input ``(N, C)``, ``(N, C, d1, ...)`` or ``(C,)``; targets as
class indices or probabilities; weight, ignore_index, reduction, label_smoothing) plus keyword-only method
parameters and ``num_items_in_batch`` with transformers' meaning: when given, the loss is the *sum* over the
non-ignored items divided by ``num_items_in_batch`` (an int or a tensor), so the losses of k accumulated
micro-batches add up to the loss of the full batch and gradient accumulation is exact.

Half-precision logits are upcast to float32 first (as transformers' loss functions do), so the loss is float32.

Usage::

    import torch
    from hf_normsoftmax.losses import inverse_temperature_cross_entropy, normsoftmax_cross_entropy

    logits, labels = torch.randn(8, 10, requires_grad=True), torch.randint(0, 10, (8,))
    loss = normsoftmax_cross_entropy(logits, labels, gamma=3.0)             # softmax of normalised logits
    loss = inverse_temperature_cross_entropy(logits, labels, beta=0.5)      # softmax(beta * logits)
    # gradient accumulation: each micro-batch divides by the item count of the whole batch
    loss = normsoftmax_cross_entropy(logits, labels, gamma=3.0, num_items_in_batch=32)

Pure PyTorch (never imports transformers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .normsoftmax import (
    GAMMA_RANGE,
    INVERSE_TEMPERATURE_RANGE,
    _broadcasts_to,
    _check_float_tensor,
    _check_in_range,
    _check_options,
    _check_tensor_in_range,
    _is_number,
    normalize_logits,
)

__all__ = [
    "InverseTemperatureCrossEntropyLoss",
    "NormSoftmaxCrossEntropyLoss",
    "inverse_temperature_cross_entropy",
    "logits_and_cross_entropy",
    "normsoftmax_cross_entropy",
]

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_loss_options(ignore_index, reduction, label_smoothing) -> None:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    _check_reduction(reduction)
    if not _is_number(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")


def _check_common(input, ignore_index, reduction, label_smoothing, num_items_in_batch) -> None:
    _check_float_tensor("input", input)
    if input.ndim == 0:
        raise ValueError("input must have shape (C,), (N, C) or (N, C, d1, ...), got a 0-dim tensor")
    _check_loss_options(ignore_index, reduction, label_smoothing)
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1 or num_items_in_batch.dtype == torch.bool:
            raise ValueError(
                "num_items_in_batch must be a positive int or a one-element numeric tensor, got a tensor of "
                f"shape {tuple(num_items_in_batch.shape)} and dtype {num_items_in_batch.dtype}"
            )
        # No value check for tensors: it would force a device sync on every step.
        return
    if not isinstance(num_items_in_batch, int) or isinstance(num_items_in_batch, bool):
        raise TypeError(f"num_items_in_batch must be None, a positive int or a tensor, got {num_items_in_batch!r}")
    if num_items_in_batch <= 0:
        raise ValueError(f"num_items_in_batch must be positive, got {num_items_in_batch}")


def _loss_logits(input: torch.Tensor) -> torch.Tensor:
    return input.float() if input.dtype in (torch.float16, torch.bfloat16) else input


# Logits per chunk of the fused op (1 MB in float32): a chunk's intermediate passes stay in cache. Measured on a
# 1024 x 50257 LM head (CPU, 1 thread): normalise + cross-entropy 2.1 s fused vs 6.2 s as separate ops (plain
# cross-entropy: 1.5 s).
_CHUNK_ELEMENTS = 1 << 18


class _TransformedLogitsCrossEntropy(torch.autograd.Function):
    """Fused ``z -> (z', CE(z', target))`` over rows ``(N, C)``, with ``z' = beta * z`` or the NormSoftmax logits
    ``z' = gamma * (z - mean) / (var + eps)^p`` (``p = 1/2`` for ``statistic="std"``, 1 for ``"var"``).

    Computed over chunks of rows: per chunk every pass over the logits stays in cache, so the op reads and writes the
    logits about as often as the plain cross-entropy does (language-model heads: several times cheaper than separate
    ops for a 50k vocabulary). Backward, with ``G`` the gradient reaching ``z'`` (from the loss and from any use of
    the returned logits): ``dz = beta * G``, or ``dz = gamma s^-p (G - mean(G) - 2p s^(2p-1) z' mean(G z') / gamma^2)``
    with ``s = var(z) + eps`` (means over the row).

    Half-precision logits are computed in float32 and returned in their dtype; the loss is the float32
    cross-entropy of those returned (rounded) logits. Where the half dtype would overflow (``beta * z`` beyond
    65504 in float16) everything is recomputed with float32 logits, which are returned: the loss always sees
    exactly the returned logits.
    """

    @staticmethod
    def forward(ctx, logits, target, factor, normalize, eps, power, ignore_index, divisor):
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        chunk = max(1, _CHUNK_ELEMENTS // max(logits.shape[1], 1))
        settings = (target, factor, normalize, eps, power, ignore_index, chunk)
        rows = _TransformedLogitsCrossEntropy._rows
        out, lse, spread, loss, overflow = rows(logits, *settings, logits.dtype)
        if overflow is not None and bool(overflow):
            out, lse, spread, loss, _ = rows(logits, *settings, compute_dtype)
        ctx.save_for_backward(out, target, lse, spread, divisor)
        ctx.factor, ctx.normalize, ctx.power = factor, normalize, power
        ctx.ignore_index, ctx.chunk = ignore_index, chunk
        ctx.input_dtype = logits.dtype
        ctx.set_materialize_grads(False)
        return out, loss / divisor.to(compute_dtype)

    @staticmethod
    def _rows(logits, target, factor, normalize, eps, power, ignore_index, chunk, out_dtype):
        """The forward over chunks of rows, logits returned in ``out_dtype``: (out, lse, s = var + eps per row,
        loss sum, overflow), ``overflow`` a bool tensor (None for float32 / float64 output) telling whether
        rounding to ``out_dtype`` produced an inf."""
        rows, classes = logits.shape
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        out = torch.empty(rows, classes, dtype=out_dtype, device=logits.device)
        lse = torch.empty(rows, dtype=compute_dtype, device=logits.device)
        spread = torch.empty(rows, 1, dtype=compute_dtype, device=logits.device) if normalize else None
        loss = torch.zeros((), dtype=compute_dtype, device=logits.device)
        overflow = None
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            z = logits[start:stop].to(compute_dtype)
            # chunk-sized temporaries (they stay in cache), then one copy into the output rows; no `out=` into
            # views of the output, which torch.compile does not propagate to the returned tensor
            if normalize:
                seen = z - z.mean(dim=-1, keepdim=True)
                s = torch.linalg.vector_norm(seen, dim=-1, keepdim=True).square_().div_(classes).add_(eps)
                spread[start:stop] = s
                seen.mul_(s.rsqrt() if power == 0.5 else s.reciprocal()).mul_(factor)
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
        return out, lse, spread, loss, overflow

    @staticmethod
    def backward(ctx, grad_out, grad_loss):
        if grad_out is None and grad_loss is None:
            return (None,) * 8
        out, target, lse, spread, divisor = ctx.saved_tensors
        factor, power, chunk = ctx.factor, ctx.power, ctx.chunk
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
                s = spread[start:stop]
                mean_grad = grad.mean(dim=-1, keepdim=True)
                mean_grad_seen = torch.linalg.vecdot(grad, seen, dim=-1).unsqueeze(-1).div_(classes * factor**2)
                if power != 0.5:  # 2p s^(2p-1), which is 1 for the standard deviation
                    mean_grad_seen.mul_(s.pow(2 * power - 1) * (2 * power))
                grad.sub_(mean_grad).addcmul_(seen, mean_grad_seen, value=-1.0)
                grad.mul_(s.rsqrt() if power == 0.5 else s.reciprocal()).mul_(factor)
            else:
                grad.mul_(factor)
            grad_logits[start:stop] = grad
        return grad_logits, None, None, None, None, None, None, None


def logits_and_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    normsoftmax: bool,
    factor: float,
    eps: float = 1e-6,
    statistic: str = "std",
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits a softmax-cross-entropy head trains through, and their cross-entropy, in one fused op.

    ``input (N, C)`` are raw logits ``z``, ``target (N,)`` class indices (``ignore_index`` ignored). The returned
    logits are ``normalize_logits(z, gamma=factor, eps=eps, statistic=statistic)`` for ``normsoftmax=True``, else
    ``factor * z`` (``factor`` = beta); the loss is the mean cross-entropy of exactly those logits over the
    non-ignored rows, or with ``num_items_in_batch`` their sum divided by it. Half-precision logits are computed in
    float32 and returned in their dtype unless that overflows (then in float32); the loss is float32.
    :func:`normsoftmax_cross_entropy` and :func:`inverse_temperature_cross_entropy` run this op whenever their
    arguments allow it; the model heads call it directly for the logits.
    """
    _check_float_tensor("input", input)
    if input.ndim != 2 or target.ndim != 1 or target.shape[0] != input.shape[0] or target.is_floating_point():
        raise ValueError(
            f"logits_and_cross_entropy takes input (N, C) and integer class indices (N,), got input of shape "
            f"{tuple(input.shape)} and target of shape {tuple(target.shape)}, dtype {target.dtype}"
        )
    if normsoftmax:
        factor = _check_in_range("gamma", factor, GAMMA_RANGE)
        _, eps, power = _check_options(None, eps, statistic)
    else:
        factor, power = _check_in_range("beta", factor, INVERSE_TEMPERATURE_RANGE), 1.0
    target = target.to(input.device)
    if num_items_in_batch is None:
        divisor = (target != ignore_index).sum()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=input.device)
    return _TransformedLogitsCrossEntropy.apply(input, target, factor, normsoftmax, eps, power, ignore_index, divisor)


def _fused_op_applies(input, target, weight, size_average, reduce, reduction, label_smoothing, scale) -> bool:
    """Whether :func:`logits_and_cross_entropy` computes what the F.cross_entropy-style call asks for."""
    return (
        input.ndim == 2
        and target.ndim == 1
        and not target.is_floating_point()
        and weight is None
        and size_average is None
        and reduce is None
        and reduction in ("mean", "sum")
        and label_smoothing == 0.0
        and not isinstance(scale, torch.Tensor)
        and not torch.compiler.is_compiling()  # Inductor fuses the separate ops itself
    )


def _fused_loss(input, target, reduction, ignore_index, num_items_in_batch, **transform) -> torch.Tensor:
    if reduction == "sum" and num_items_in_batch is None:
        num_items_in_batch = 1
    _, loss = logits_and_cross_entropy(
        _loss_logits(input), target, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch, **transform
    )
    return loss


def _cross_entropy(
    logits, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing, num_items_in_batch
):
    if num_items_in_batch is None:
        return F.cross_entropy(
            logits,
            target,
            weight=weight,
            size_average=size_average,
            ignore_index=ignore_index,
            reduce=reduce,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    if reduction == "none":
        raise ValueError(
            "num_items_in_batch divides the summed loss, so it needs reduction='mean' or 'sum', got reduction='none'"
        )
    # transformers' semantics: sum over the non-ignored items, divided by the item count of the whole
    # (accumulated) batch, so the micro-batch losses add up to the full-batch mean.
    loss = F.cross_entropy(
        logits, target, weight=weight, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing
    )
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def normsoftmax_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    gamma: float | torch.Tensor = 1.0,
    max_temperature: float | None = None,
    eps: float = 1e-6,
    statistic: str = "std",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(normalize_logits(input, dim=class_dim, ...), target, ...)``.

    Each sample's logit vector (the class dim: 1, or 0 for an unbatched ``(C,)`` input) is normalised to
    mean 0 and spread ``gamma`` before the softmax. ``gamma`` may be a tensor broadcastable to ``input`` with size
    1 at the class dim. See :func:`hf_normsoftmax.normsoftmax.normalize_logits` for ``gamma``,
    ``max_temperature``, ``eps`` and ``statistic``; the remaining arguments are ``F.cross_entropy``'s, plus
    ``num_items_in_batch`` (see the module docstring).

    Example::

        loss = normsoftmax_cross_entropy(torch.randn(4, 10), torch.tensor([1, 2, -100, 3]), gamma=2.0)
    """
    _check_common(input, ignore_index, reduction, label_smoothing, num_items_in_batch)
    if max_temperature is None and _fused_op_applies(
        input, target, weight, size_average, reduce, reduction, label_smoothing, gamma
    ):
        return _fused_loss(
            input, target, reduction, ignore_index, num_items_in_batch,
            normsoftmax=True, factor=gamma, eps=eps, statistic=statistic,
        )
    class_dim = 0 if input.ndim == 1 else 1
    logits = normalize_logits(
        _loss_logits(input),
        dim=class_dim,
        gamma=gamma,
        max_temperature=max_temperature,
        eps=eps,
        statistic=statistic,
    )
    return _cross_entropy(
        logits, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing, num_items_in_batch
    )


def _check_beta(beta, input: torch.Tensor):
    if isinstance(beta, torch.Tensor):
        _check_float_tensor("beta", beta)
        if not _broadcasts_to(beta, input.shape):
            raise ValueError(
                f"beta tensor of shape {tuple(beta.shape)} must be broadcastable to the input shape "
                f"{tuple(input.shape)}"
            )
        _check_tensor_in_range("beta", beta, INVERSE_TEMPERATURE_RANGE)
        return beta
    return _check_in_range("beta", beta, INVERSE_TEMPERATURE_RANGE)


def inverse_temperature_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    beta: float | torch.Tensor = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(beta * input, target, ...)``: softmax at inverse temperature ``beta``.

    ``beta`` is a float in ``INVERSE_TEMPERATURE_RANGE`` ([1e-3, 1e2]) or a tensor of such values broadcastable to
    ``input``. Other arguments as in
    ``F.cross_entropy``, plus ``num_items_in_batch`` (see the module docstring).

    Example::

        loss = inverse_temperature_cross_entropy(torch.randn(4, 10), torch.tensor([1, 2, 3, 4]), beta=0.1)
    """
    _check_common(input, ignore_index, reduction, label_smoothing, num_items_in_batch)
    beta = _check_beta(beta, input)
    fused = _fused_op_applies(input, target, weight, size_average, reduce, reduction, label_smoothing, beta)
    if fused and beta != 1.0:  # (a tensor beta is never fused)
        return _fused_loss(input, target, reduction, ignore_index, num_items_in_batch, normsoftmax=False, factor=beta)
    logits = _loss_logits(input)
    if not (isinstance(beta, float) and beta == 1.0):
        logits = logits * beta
    return _cross_entropy(
        logits, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing, num_items_in_batch
    )


class _CrossEntropyBase(nn.Module):
    def __init__(self, weight, ignore_index, reduction, label_smoothing) -> None:
        super().__init__()
        if weight is not None:
            _check_float_tensor("weight", weight)
        _check_loss_options(ignore_index, reduction, label_smoothing)
        # A buffer, as in nn.CrossEntropyLoss, so it follows .to(device).
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)

    def _method_options(self) -> dict:
        """The method's keyword arguments of the loss function (gamma, ... / beta)."""
        raise NotImplementedError

    def forward(self, input, target, num_items_in_batch=None):
        return type(self)._loss_function(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            num_items_in_batch=num_items_in_batch,
            **self._method_options(),
        )

    def extra_repr(self) -> str:
        options = {**self._method_options(), "ignore_index": self.ignore_index, "reduction": self.reduction,
                   "label_smoothing": self.label_smoothing}
        return ", ".join(f"{name}={value!r}" for name, value in options.items())


class NormSoftmaxCrossEntropyLoss(_CrossEntropyBase):
    """Module form of :func:`normsoftmax_cross_entropy` (gamma is a fixed setting here, not a parameter).

    Example::

        criterion = NormSoftmaxCrossEntropyLoss(gamma=3.0, label_smoothing=0.1)
        loss = criterion(torch.randn(8, 10), torch.randint(0, 10, (8,)), num_items_in_batch=32)
    """

    _loss_function = staticmethod(normsoftmax_cross_entropy)

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        gamma: float = 1.0,
        max_temperature: float | None = None,
        eps: float = 1e-6,
        statistic: str = "std",
    ) -> None:
        super().__init__(weight, ignore_index, reduction, label_smoothing)
        self.gamma = _check_in_range("gamma", gamma, GAMMA_RANGE)
        _check_options(max_temperature, eps, statistic)
        self.max_temperature = max_temperature
        self.eps = float(eps)
        self.statistic = statistic

    def _method_options(self) -> dict:
        return {"gamma": self.gamma, "max_temperature": self.max_temperature, "eps": self.eps,
                "statistic": self.statistic}


class InverseTemperatureCrossEntropyLoss(_CrossEntropyBase):
    """Module form of :func:`inverse_temperature_cross_entropy` (beta is a fixed setting here).

    Example::

        criterion = InverseTemperatureCrossEntropyLoss(beta=0.3)
        loss = criterion(torch.randn(8, 10), torch.randint(0, 10, (8,)))
    """

    _loss_function = staticmethod(inverse_temperature_cross_entropy)

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        beta: float = 1.0,
    ) -> None:
        super().__init__(weight, ignore_index, reduction, label_smoothing)
        self.beta = _check_in_range("beta", beta, INVERSE_TEMPERATURE_RANGE)

    def _method_options(self) -> dict:
        return {"beta": self.beta}
