"""QK-norm: a normalisation of each attention head's queries and keys over the head dimension, with learned scale.

``HeadNorm(head_dim, kind="rms")`` is ``x / sqrt(mean(x^2) + eps) * weight`` (RMSNorm, as Qwen3 and Gemma 3 apply
to q and k per head); ``kind="layer"`` is LayerNorm (``(x - mean) / sqrt(var + eps) * weight + bias``). The weight
(and bias) are shared by the heads of a layer and start at 1 (0). The statistics are computed in float32 whatever
the input dtype, so bf16/fp16 queries and keys are normalised as accurately as fp32 ones.

Pure torch (no transformers import).

Example:

```python
>>> norm = HeadNorm(64, kind="rms")
>>> q = torch.randn(2, 12, 10, 64)  # (batch, heads, tokens, head_dim)
>>> norm(q).pow(2).mean(-1)  # ~1 everywhere at init
```
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QK_NORM_KINDS = ("rms", "layer")
QK_NORM_EPS = 1e-6


class HeadNorm(nn.Module):
    """RMSNorm (``kind="rms"``) or LayerNorm (``kind="layer"``) over the last dimension (a head's features)."""

    def __init__(self, head_dim: int, kind: str = "rms", eps: float = QK_NORM_EPS, device=None, dtype=None):
        super().__init__()
        if kind not in QK_NORM_KINDS:
            raise ValueError(f"Invalid value for `kind`: {kind!r}. Allowed: {' or '.join(map(repr, QK_NORM_KINDS))}.")
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"Invalid value for `head_dim`: {head_dim!r}. Allowed: a positive int.")
        self.kind, self.head_dim, self.eps = kind, head_dim, float(eps)
        self.weight = nn.Parameter(torch.ones(head_dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(head_dim, device=device, dtype=dtype)) if kind == "layer" else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(1.0)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"HeadNorm over {self.head_dim} features got an input of shape {tuple(x.shape)}.")
        shape, weight = (self.head_dim,), self.weight.float()
        if self.kind == "rms":
            out = F.rms_norm(x.float(), shape, weight, self.eps)
        else:
            out = F.layer_norm(x.float(), shape, weight, self.bias.float(), self.eps)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.head_dim}, kind={self.kind!r}, eps={self.eps:g}"


__all__ = ["QK_NORM_EPS", "QK_NORM_KINDS", "HeadNorm"]
