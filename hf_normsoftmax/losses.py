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

from typing import NamedTuple

import torch
from torch import nn

from .fused_cross_entropy import cross_entropy, logits_and_cross_entropy
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


class _CrossEntropyOptions(NamedTuple):
    """F.cross_entropy's arguments after ``input`` and ``target``, with its defaults: both loss functions take them
    by position or by name."""

    weight: torch.Tensor | None = None
    size_average: bool | None = None
    ignore_index: int = -100
    reduce: bool | None = None
    reduction: str = "mean"
    label_smoothing: float = 0.0


def _cross_entropy_options(function: str, args: tuple, kwargs: dict) -> _CrossEntropyOptions:
    try:
        return _CrossEntropyOptions(*args, **kwargs)
    except TypeError:
        raise TypeError(
            f"{function}() takes input, target, then F.cross_entropy's {list(_CrossEntropyOptions._fields)} by "
            f"position or by name, and its own keyword-only arguments; got {len(args)} more positional arguments "
            f"and the keywords {sorted(kwargs)}"
        ) from None


def _loss_logits(input: torch.Tensor) -> torch.Tensor:
    return input.float() if input.dtype in (torch.float16, torch.bfloat16) else input


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


def _check_common(input, options: _CrossEntropyOptions, num_items_in_batch) -> None:
    _check_float_tensor("input", input)
    if input.ndim == 0:
        raise ValueError("input must have shape (C,), (N, C) or (N, C, d1, ...), got a 0-dim tensor")
    _check_loss_options(options.ignore_index, options.reduction, options.label_smoothing)
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


def _fused_op_applies(input, target, options: _CrossEntropyOptions, scale) -> bool:
    """Whether :func:`logits_and_cross_entropy` computes what the F.cross_entropy-style call asks for."""
    return (
        input.ndim == 2
        and target.ndim == 1
        and not target.is_floating_point()
        and options.weight is None
        and options.size_average is None
        and options.reduce is None
        and options.reduction in ("mean", "sum")
        and options.label_smoothing == 0.0
        and not isinstance(scale, torch.Tensor)
        and not torch.compiler.is_compiling()  # Inductor fuses the separate ops itself
    )


def _fused_loss(input, target, options: _CrossEntropyOptions, num_items_in_batch, **transform) -> torch.Tensor:
    if options.reduction == "sum" and num_items_in_batch is None:
        num_items_in_batch = 1
    _, loss = logits_and_cross_entropy(
        _loss_logits(input), target, ignore_index=options.ignore_index, num_items_in_batch=num_items_in_batch,
        **transform,
    )
    return loss


def normsoftmax_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *args,
    gamma: float | torch.Tensor = 1.0,
    max_temperature: float | None = None,
    eps: float = 1e-6,
    statistic: str = "std",
    num_items_in_batch: int | torch.Tensor | None = None,
    **kwargs,
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
    options = _cross_entropy_options("normsoftmax_cross_entropy", args, kwargs)
    _check_common(input, options, num_items_in_batch)
    if max_temperature is None and _fused_op_applies(input, target, options, gamma):
        return _fused_loss(
            input, target, options, num_items_in_batch, normsoftmax=True, factor=gamma, eps=eps, statistic=statistic
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
    return cross_entropy(logits, target, **options._asdict(), num_items_in_batch=num_items_in_batch)


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
    *args,
    beta: float | torch.Tensor = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """``F.cross_entropy(beta * input, target, ...)``: softmax at inverse temperature ``beta``.

    ``beta`` is a float in ``INVERSE_TEMPERATURE_RANGE`` ([1e-3, 1e2]) or a tensor of such values broadcastable to
    ``input``. Other arguments as in
    ``F.cross_entropy``, plus ``num_items_in_batch`` (see the module docstring).

    Example::

        loss = inverse_temperature_cross_entropy(torch.randn(4, 10), torch.tensor([1, 2, 3, 4]), beta=0.1)
    """
    options = _cross_entropy_options("inverse_temperature_cross_entropy", args, kwargs)
    _check_common(input, options, num_items_in_batch)
    beta = _check_beta(beta, input)
    if _fused_op_applies(input, target, options, beta) and beta != 1.0:  # (a tensor beta is never fused)
        return _fused_loss(input, target, options, num_items_in_batch, normsoftmax=False, factor=beta)
    logits = _loss_logits(input)
    if not (isinstance(beta, float) and beta == 1.0):
        logits = logits * beta
    return cross_entropy(logits, target, **options._asdict(), num_items_in_batch=num_items_in_batch)


class _CrossEntropyBase(nn.Module):
    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        """nn.CrossEntropyLoss's settings (without the deprecated size_average / reduce), shared by the subclasses,
        which add their method's keyword-only settings."""
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
        self, *args, gamma: float = 1.0, max_temperature: float | None = None, eps: float = 1e-6,
        statistic: str = "std", **kwargs,
    ) -> None:
        """``weight``, ``ignore_index``, ``reduction``, ``label_smoothing`` (by position or by name) as in
        nn.CrossEntropyLoss; ``gamma``, ``max_temperature``, ``eps``, ``statistic`` as in the function."""
        super().__init__(*args, **kwargs)
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

    def __init__(self, *args, beta: float = 1.0, **kwargs) -> None:
        """``weight``, ``ignore_index``, ``reduction``, ``label_smoothing`` (by position or by name) as in
        nn.CrossEntropyLoss; ``beta`` as in the function."""
        super().__init__(*args, **kwargs)
        self.beta = _check_in_range("beta", beta, INVERSE_TEMPERATURE_RANGE)

    def _method_options(self) -> dict:
        return {"beta": self.beta}
