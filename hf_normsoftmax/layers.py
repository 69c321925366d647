"""The module form of :func:`~hf_normsoftmax.normsoftmax.norm_softmax`.

Package only: no model class uses it, so checkpoints saved with remote code do not carry this file.
``import hf_normsoftmax`` also makes it reachable as ``hf_normsoftmax.normsoftmax.NormSoftmax``, its earlier path.

Usage::

    from hf_normsoftmax.layers import NormSoftmax

    layer = NormSoftmax(dim=-1, gamma=1.0, learnable_gamma=True)  # gamma stored as the parameter ``scale``
    probs = layer(torch.randn(4, 10))

Pure PyTorch (never imports transformers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .normsoftmax import GAMMA_RANGE, _check_in_range, _check_options, norm_softmax

__all__ = ["NormSoftmax"]


class NormSoftmax(nn.Module):
    """Module form of :func:`norm_softmax`.

    Args:
        dim: dimension to normalise over.
        gamma: initial / fixed gamma (a float in ``GAMMA_RANGE``).
        learnable_gamma: learn gamma; it is stored as the parameter ``scale`` (never a name containing
            "gamma": transformers renames such state-dict keys), of shape ``gamma_shape``. A learned value that
            drifts outside ``GAMMA_RANGE`` is clamped into it where it is used (the stored parameter keeps its
            value; clamped entries get no gradient); a non-finite value makes the forward raise ValueError.
        gamma_shape: shape of the learnable gamma, broadcastable to the input with size 1 at ``dim``
            (``()`` for one shared value, ``(num_heads, 1, 1)`` per head for ``(B, H, L, S)`` logits).
        max_temperature, eps, statistic: as in :func:`normalize_logits`.

    Example::

        layer = NormSoftmax(dim=-1, gamma=2.0, learnable_gamma=True, gamma_shape=(12, 1, 1))
        probs = layer(torch.randn(2, 12, 16, 16), mask=torch.ones(16, 16, dtype=torch.bool).tril())
    """

    def __init__(
        self,
        dim: int = -1,
        gamma: float = 1.0,
        learnable_gamma: bool = False,
        gamma_shape: Sequence[int] = (),
        max_temperature: float | None = None,
        eps: float = 1e-6,
        statistic: str = "std",
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"dim must be an int, got {dim!r}")
        if not isinstance(learnable_gamma, bool):
            raise TypeError(f"learnable_gamma must be a bool, got {learnable_gamma!r}")
        gamma = _check_in_range("gamma", gamma, GAMMA_RANGE)
        _check_options(max_temperature, eps, statistic)
        try:
            gamma_shape = tuple(int(s) for s in gamma_shape)
        except TypeError:
            raise TypeError(f"gamma_shape must be a sequence of ints, got {gamma_shape!r}") from None
        if any(s < 1 for s in gamma_shape):
            raise ValueError(f"gamma_shape must contain positive sizes, got {gamma_shape}")
        if gamma_shape and not learnable_gamma:
            raise ValueError(f"gamma_shape={gamma_shape} only applies with learnable_gamma=True")
        self.dim = dim
        self.max_temperature = max_temperature
        self.eps = eps
        self.statistic = statistic
        self.gamma_value = gamma
        if learnable_gamma:
            self.scale = nn.Parameter(torch.full(gamma_shape, gamma))
        else:
            self.register_parameter("scale", None)

    @property
    def gamma(self) -> float | torch.Tensor:
        """The gamma in use: the learnable ``scale`` parameter clamped to ``GAMMA_RANGE``, or the fixed float."""
        return self.scale.clamp(*GAMMA_RANGE) if self.scale is not None else self.gamma_value

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return norm_softmax(
            input,
            dim=self.dim,
            mask=mask,
            gamma=self.gamma,
            max_temperature=self.max_temperature,
            eps=self.eps,
            statistic=self.statistic,
        )

    def extra_repr(self) -> str:
        learn = f", learnable_gamma=True, gamma_shape={tuple(self.scale.shape)}" if self.scale is not None else ""
        return (
            f"dim={self.dim}, gamma={self.gamma_value}{learn}, max_temperature={self.max_temperature}, "
            f"eps={self.eps}, statistic={self.statistic!r}"
        )
