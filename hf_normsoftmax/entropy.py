"""Attention entropy, the sigmaReparam paper's diagnostic, and the softmax-input statistics NormSoftmax acts on.

``Ent(A_i) = -sum_j A_ij log A_ij`` (natural log) for each query row ``i``; per head it is averaged over the valid
query rows of every example. Rows with no valid key (fully masked) and query positions that are padding are
excluded, never counted as zero. Pure PyTorch; imports nothing from transformers.

Two entry points:

* :func:`attention_entropy` from materialised attention weights (e.g. ``output_attentions=True``);
* :func:`attention_statistics` from queries and keys, for the fast attention path that never builds the
  ``L x S`` weights: it walks over blocks of query rows, so memory is ``O(chunk_size * S)`` per head.

Example::

    >>> q, k = torch.randn(2, 4, 32, 16), torch.randn(2, 4, 32, 16)
    >>> stats = attention_statistics(q, k, is_causal=True, softmax="normsoftmax", gamma=2.0)
    >>> per_head = masked_row_mean(stats["entropy"], stats["valid_rows"])  # (4,)
"""

from __future__ import annotations

import math

import torch

from .attention import valid_from_mask
from .normsoftmax import normalize_logits

__all__ = ["attention_entropy", "attention_statistics", "masked_row_mean", "row_entropy"]


def row_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy of every row of ``weights`` (probabilities over the last dim): shape ``weights.shape[:-1]``.

    ``0 log 0`` counts as 0, so masked entries (probability 0) contribute nothing.
    """
    w = weights.double() if weights.dtype == torch.float64 else weights.float()
    return -torch.special.xlogy(w, w).sum(dim=-1)


def masked_row_mean(values: torch.Tensor, valid_rows: torch.Tensor, query_mask: torch.Tensor | None = None):
    """Mean of per-row values ``(B, H, L)`` over batch and valid rows, per head: ``(H,)``.

    ``valid_rows`` (broadcastable to ``(B, H, L)``) marks rows that have at least one valid key; ``query_mask``
    ``(B, L)`` (True = real token) excludes padding query positions as well. A head with no valid row gives NaN.
    """
    valid = valid_rows.expand_as(values)
    if query_mask is not None:
        if query_mask.shape != (values.shape[0], values.shape[-1]):
            raise ValueError(
                f"query_mask must have shape (batch, query_len) = {(values.shape[0], values.shape[-1])}, "
                f"got {tuple(query_mask.shape)}"
            )
        valid = valid & query_mask.bool()[:, None, :]
    weight = valid.to(values.dtype)
    total = (values.nan_to_num() * weight).sum(dim=(0, 2))
    count = weight.sum(dim=(0, 2))
    return total / count  # NaN where count == 0, on purpose: "no data" is not "zero entropy"


def attention_entropy(weights: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head mean attention entropy from weights ``(B, H, L, S)``: shape ``(H,)``.

    Rows whose weights sum to zero (no valid key) are excluded, and so are padding queries when ``query_mask``
    ``(B, L)`` is given.
    """
    if weights.dim() != 4:
        raise ValueError(f"weights must have shape (batch, heads, query_len, key_len), got {tuple(weights.shape)}")
    valid_rows = weights.sum(dim=-1) > 0
    return masked_row_mean(row_entropy(weights), valid_rows, query_mask)


def _chunk_valid(attn_mask, is_causal, start, stop, L, S, device):
    valid = None
    if attn_mask is not None:
        m = valid_from_mask(attn_mask)
        while m.dim() < 4:
            m = m.unsqueeze(0)
        valid = m[:, :, start:stop, :] if m.shape[2] != 1 else m
    if is_causal:
        rows = torch.arange(start, stop, device=device)[:, None]
        causal = torch.arange(S, device=device)[None, :] <= rows + (S - L)
        valid = causal if valid is None else valid & causal
    return valid


@torch.no_grad()
def attention_statistics(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    softmax: str = "normsoftmax",
    gamma: float | torch.Tensor = 1.0,
    max_temperature: float | None = None,
    eps: float = 1e-6,
    statistic: str = "std",
    chunk_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Per query row: attention entropy and the std of the softmax input, without the full ``L x S`` weights.

    Args mirror :func:`~hf_normsoftmax.attention.normsoftmax_attention`; ``softmax`` is ``"normsoftmax"`` or
    ``"softmax"`` (plain attention with the same logits). Returns float32 (float64 for float64 input) tensors of
    shape ``(B, H, L)``:

    * ``entropy``: entropy of the attention distribution of each row (natural log);
    * ``logit_std``: std of the *raw* scaled logits ``scale * q.k`` over the row's valid keys (what NormSoftmax
      divides by; for plain softmax, how peaked the row can get);
    * ``valid_rows``: bool, the row has at least one valid key (other rows hold 0 and must be ignored).
    """
    if softmax not in ("normsoftmax", "softmax"):
        raise ValueError(f"softmax must be 'normsoftmax' or 'softmax', got {softmax!r}")
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(
            f"query and key must have shape (batch, heads, length, head_dim), got {tuple(query.shape)} and "
            f"{tuple(key.shape)}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    B, H, L, D = query.shape
    S = key.shape[-2]
    if query.shape[1] != key.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    k = key.to(dtype)
    entropy = torch.zeros(B, H, L, dtype=dtype, device=query.device)
    logit_std = torch.zeros_like(entropy)
    valid_rows = torch.zeros(B, H, L, dtype=torch.bool, device=query.device)
    for start in range(0, L, chunk_size):
        stop = min(start + chunk_size, L)
        logits = torch.matmul(query[:, :, start:stop].to(dtype), k.transpose(-1, -2)) * scale  # (B, H, c, S)
        valid = _chunk_valid(attn_mask, is_causal, start, stop, L, S, query.device)
        valid = torch.ones_like(logits, dtype=torch.bool) if valid is None else valid.expand_as(logits)
        count = valid.sum(dim=-1)
        has_key = count > 0
        n = count.clamp(min=1).to(dtype)
        mean = torch.where(valid, logits, 0).sum(dim=-1, keepdim=True) / n[..., None]
        var = torch.where(valid, (logits - mean).square(), 0).sum(dim=-1) / n
        if softmax == "normsoftmax":
            z = normalize_logits(
                logits,
                dim=-1,
                mask=valid,
                gamma=gamma,
                max_temperature=max_temperature,
                eps=eps,
                statistic=statistic,
            )
        else:
            z = logits.masked_fill(~valid, float("-inf"))
        log_p = torch.log_softmax(z, dim=-1)
        plogp = torch.where(valid, log_p.exp() * log_p, 0)
        entropy[:, :, start:stop] = torch.where(has_key, -plogp.sum(dim=-1), 0)
        logit_std[:, :, start:stop] = var.sqrt()
        valid_rows[:, :, start:stop] = has_key
    return {"entropy": entropy, "logit_std": logit_std, "valid_rows": valid_rows}
