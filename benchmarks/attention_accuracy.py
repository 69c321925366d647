"""Accuracy of NormSoftmax attention in the dtypes people train in, against a float64 oracle of the formula.

For each case the fast path (``normsoftmax_attention``) runs in the given dtype and is compared with a float64
implementation written directly from the definition (statistics over the valid keys, population variance,
``T = sqrt(var + eps) / gamma``, softmax of ``(s - mean) / T``, rows without keys = 0). The error budget is what
stock SDPA makes in the same dtype against stock SDPA in float64 on the same inputs. Errors are relative to the
largest entry: ``max |a - b| / max |b|``, for the output and the three input gradients.

    python benchmarks/attention_accuracy.py            # the table of docs/benchmarks.md

Also imported by tests/test_attention_exactness.py (the oracle and the input constructions).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F


def oracle(q, k, v, valid=None, bias=None, scale=None, gamma=1.0, eps=1e-6, statistic="std", max_temperature=None):
    """Float64 NormSoftmax attention from the formula. valid: bool (B, H, L, S) or None; bias: additive, or None."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    if valid is None:
        valid = torch.ones_like(s, dtype=torch.bool)
    valid = valid.expand(s.shape)
    n = valid.sum(-1, keepdim=True).double()
    mean = torch.where(valid, s, 0.0).sum(-1, keepdim=True) / n.clamp(min=1)
    dev = torch.where(valid, s - mean, 0.0)
    var = dev.square().sum(-1, keepdim=True) / n.clamp(min=1)
    spread = (var + eps).sqrt() if statistic == "std" else var + eps
    temperature = spread / gamma
    if max_temperature is not None:
        temperature = temperature.clamp(max=max_temperature)
    z = torch.where(valid, dev / temperature, float("-inf"))
    p = torch.where(n > 0, torch.softmax(torch.where(n > 0, z, 0.0), dim=-1), 0.0)
    return p @ v


def sdpa_oracle(q, k, v, valid=None):
    """Stock attention in float64, rows without keys = 0."""
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=valid)
    if valid is not None:
        out = torch.where(valid.expand(*out.shape[:-1], valid.shape[-1]).any(-1, keepdim=True), out, 0.0)
    return out


def relative_errors(fn, ref_fn, inputs, grad_out, dtype):
    """max |a - b| / max |b| for the output and the gradients of q, k, v: fn in ``dtype`` against ref_fn in float64."""
    low = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*low)
    low_results = (out, *torch.autograd.grad(out, low, grad_out.to(dtype)))
    high = [t.detach().to(dtype).double().requires_grad_() for t in inputs]  # the same rounded inputs
    ref = ref_fn(*high)
    high_results = (ref, *torch.autograd.grad(ref, high, grad_out.to(dtype).double()))
    return [float((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-300)) for a, b in
            zip(low_results, high_results, strict=True)]


def random_case(B, H, L, D, lengths=None, left=False, causal=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    key_valid = None
    if lengths is not None:
        pos = torch.arange(L)
        key_valid = torch.stack([(pos >= L - n) if left else (pos < n) for n in lengths])
    return q, k, v, key_valid


def outlier_keys_case(L, D, noise, seed=0, B=1, H=2):
    """Keys spread along one direction w (x10) plus small isotropic noise; queries orthogonal to w: the logit
    variance is tiny next to |q|^2 ||Cov(k)||."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=g)
    w = w / w.norm()
    k = 10.0 * torch.randn(B, H, L, 1, generator=g) * w + noise * torch.randn(B, H, L, D, generator=g)
    q = torch.randn(B, H, L, D, generator=g)
    q = q - (q @ w)[..., None] * w
    v = torch.randn(B, H, L, D, generator=g)
    return q, k, v


def full_valid(key_valid, causal, B, L, S):
    valid = None if key_valid is None else key_valid[:, None, None, :]
    if causal:
        tri = torch.ones(L, S, dtype=torch.bool).tril(S - L)
        valid = tri if valid is None else valid & tri
    return None if valid is None else valid.expand(B, 1, L, S)


def half_precision_table(gamma=2.0, B=2, H=4, L=160, D=32, seeds=(0, 1, 2), masks=(False, True)):
    """Rows per dtype, mask (``masks``: the is_causal values) and padding."""
    from hf_normsoftmax.attention import normsoftmax_attention

    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for causal in masks:
            for padded in (False, True):
                worst_fast, worst_sdpa = [0.0] * 4, [0.0] * 4
                for seed in seeds:
                    lengths = [L, L - 37] if padded else None
                    q, k, v, key_valid = random_case(B, H, L, D, lengths, left=causal, seed=seed)
                    valid = full_valid(key_valid, causal, B, L, L)
                    mask = None if key_valid is None else key_valid[:, None, None, :]
                    grad_out = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(seed + 100))

                    def fast(q, k, v, mask=mask, causal=causal):
                        return normsoftmax_attention(q, k, v, attn_mask=mask, is_causal=causal, gamma=gamma,
                                                     path="fast")[0]

                    def sdpa(q, k, v, valid=valid):
                        bool_mask = None if valid is None else valid.to(q.device)
                        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)
                        if bool_mask is not None:  # rows without keys: 0, as in the oracle
                            out = torch.where(bool_mask.any(-1, keepdim=True), out, 0.0)
                        return out

                    e_fast = relative_errors(fast, lambda q, k, v, valid=valid: oracle(q, k, v, valid, gamma=gamma),
                                             (q, k, v), grad_out, dtype)
                    e_sdpa = relative_errors(sdpa, lambda q, k, v, valid=valid: sdpa_oracle(q, k, v, valid), (q, k, v),
                                             grad_out, dtype)
                    worst_fast = [max(a, b) for a, b in zip(worst_fast, e_fast, strict=True)]
                    worst_sdpa = [max(a, b) for a, b in zip(worst_sdpa, e_sdpa, strict=True)]
                rows.append((str(dtype).replace("torch.", ""), causal, padded, worst_fast, worst_sdpa))
    return rows


def cancellation_table(L=128, D=16, noises=(1e-1, 3e-2, 1e-2, 3e-3), seeds=(0, 1)):
    from hf_normsoftmax.attention import normsoftmax_attention, normsoftmax_attention_reference

    rows = []
    for causal in (False, True):
        for noise in noises:
            worst_fast, worst_ref, variances = [0.0] * 4, [0.0] * 4, []
            for seed in seeds:
                q, k, v = outlier_keys_case(L, D, noise, seed)
                valid = full_valid(None, causal, 1, L, L)
                s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)
                if causal:
                    s = s.masked_fill(~valid, float("nan"))
                variances.append(float(torch.nanmedian(s.var(-1, unbiased=False) if not causal else
                                                       torch.nanmean((s - torch.nanmean(s, -1, keepdim=True)) ** 2,
                                                                     -1))))
                grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 7))

                def ref64(q, k, v, valid=valid):
                    return oracle(q, k, v, valid, gamma=2.0)

                e_fast = relative_errors(lambda q, k, v, causal=causal: normsoftmax_attention(q, k, v, is_causal=causal,
                                                                                             gamma=2.0, path="fast")[0],
                                         ref64, (q, k, v), grad_out, torch.float32)
                e_ref = relative_errors(lambda q, k, v, causal=causal: normsoftmax_attention_reference(
                    q, k, v, is_causal=causal, gamma=2.0)[0],
                                        ref64, (q, k, v), grad_out, torch.float32)
                worst_fast = [max(a, b) for a, b in zip(worst_fast, e_fast, strict=True)]
                worst_ref = [max(a, b) for a, b in zip(worst_ref, e_ref, strict=True)]
            rows.append((causal, noise, sorted(variances)[len(variances) // 2], worst_fast, worst_ref))
    return rows


def window_band(L, window, left_pad=0, B=2):
    """(B, 1, L, L) bool causal sliding window of ``window`` keys; the last sequence left-padded by ``left_pad``."""
    i = torch.arange(L)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    mask = band.expand(B, 1, L, L).clone()
    mask[-1, ..., :left_pad] = False
    return mask


def packed_documents(lengths):
    """(1, 1, L, L) bool block-diagonal causal mask of documents of the given lengths."""
    ids = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])
    L = len(ids)
    return ((ids[:, None] == ids[None, :]) & torch.ones(L, L, dtype=torch.bool).tril())[None, None]


def interval_mask_table(gamma=2.0, H=4, D=32, seeds=(0, 1, 2)):
    """Half precision with sliding-window / packed-document masks and grouped-query heads (fast path vs SDPA)."""
    from hf_normsoftmax.attention import normsoftmax_attention

    cases = [
        ("window 90 + left padding 77", window_band(230, 90, 77), None),
        ("packed documents 50/1/120/129", packed_documents([50, 1, 120, 129]), None),
        ("window 90 + left padding 77, GQA 4/1", window_band(230, 90, 77), 1),
    ]
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for name, mask, kv_heads in cases:
            B, _, L, _ = mask.shape
            worst_fast, worst_sdpa = [0.0] * 4, [0.0] * 4
            for seed in seeds:
                g = torch.Generator().manual_seed(seed)
                q = torch.randn(B, H, L, D, generator=g)
                k, v = (torch.randn(B, kv_heads or H, L, D, generator=g) for _ in range(2))
                grad_out = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(seed + 100))

                def expand(k, v):
                    groups = H // k.shape[1]
                    return k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)

                def fast(q, k, v, mask=mask):
                    return normsoftmax_attention(q, k, v, attn_mask=mask, gamma=gamma, path="fast")[0]

                def sdpa(q, k, v, mask=mask):
                    out = F.scaled_dot_product_attention(q, *expand(k, v), attn_mask=mask)
                    return torch.where(mask.any(-1, keepdim=True), out, 0.0)

                e_fast = relative_errors(fast, lambda q, k, v, mask=mask: oracle(q, *expand(k, v), mask, gamma=gamma),
                                         (q, k, v), grad_out, dtype)
                e_sdpa = relative_errors(sdpa, lambda q, k, v, mask=mask: sdpa_oracle(q, *expand(k, v), mask),
                                         (q, k, v), grad_out, dtype)
                worst_fast = [max(a, b) for a, b in zip(worst_fast, e_fast, strict=True)]
                worst_sdpa = [max(a, b) for a, b in zip(worst_sdpa, e_sdpa, strict=True)]
            rows.append((str(dtype).replace("torch.", ""), name, worst_fast, worst_sdpa))
    return rows


def print_budget_table(title, rows):
    """``rows`` of ``(dtype, mask, fast errors, SDPA errors)`` as a markdown table, with the worst ratio of a fast
    error to its SDPA budget."""
    print(title)
    print("| dtype | mask | out | dq | dk | dv | SDPA out | SDPA dq | SDPA dk | SDPA dv | worst ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype, mask, fast, sdpa in rows:
        ratio = max(a / b for a, b in zip(fast, sdpa, strict=True))
        print(f"| {dtype} | {mask} | " + " | ".join(f"{e:.1e}" for e in fast + sdpa) + f" | {ratio:.2f}x |")
    print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    print_budget_table(
        "Half precision, random inputs (B=2 H=4 L=S=160 d=32 gamma=2; padded: second sequence 37 keys shorter; "
        "worst of 3 seeds). Errors relative to the largest entry; budget: 5x stock SDPA's error.",
        ((dtype, ("causal" if causal else "bidirectional") + (" + padding" if padded else ""), fast, sdpa)
         for dtype, causal, padded, fast, sdpa in half_precision_table()),
    )
    print_budget_table(
        "Half precision, short key sets where bidirectional variances come from logits (B=2 H=4 L=S=128 d=64 "
        "gamma=2, as BERT's; padded: second sequence 37 keys shorter; worst of 3 seeds).",
        ((dtype, "bidirectional" + (" + padding" if padded else ""), fast, sdpa)
         for dtype, _, padded, fast, sdpa in half_precision_table(L=128, D=64, masks=(False,))),
    )
    print_budget_table(
        "Half precision, sliding-window and packed-document masks, grouped-query heads (H=4 d=32 gamma=2, "
        "worst of 3 seeds; the SDPA budget with the same mask and expanded keys).",
        interval_mask_table(),
    )
    print("Cancellation, float32: keys along one direction (x10) + isotropic noise, queries orthogonal to it "
          "(L=S=128, d=16, gamma=2, worst of 2 seeds); 'reference' = the materialising path.")
    print("| mask | noise | median logit var | out | dq | dk | dv | reference out | ref dq | ref dk | ref dv |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for causal, noise, var, fast, ref in cancellation_table():
        print(f"| {'causal' if causal else 'bidirectional'} | {noise:g} | {var:.1e} | "
              + " | ".join(f"{e:.1e}" for e in fast + ref) + " |")


if __name__ == "__main__":
    main()
