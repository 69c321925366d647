"""Sliding-window, packed-document and grouped-query attention on the fast path, against a float64 oracle.

Masks are built by transformers' own mask builders (``transformers.masking_utils.sdpa_mask`` / ``eager_mask`` with
the sliding-window, packed-sequence and padding mask functions), as models pass them. The oracle
(benchmarks/attention_accuracy.py) computes the statistics over each row's valid keys in float64 and shares no code
with the package; grouped-query keys/values are expanded for it only.
"""

from __future__ import annotations

import gc
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import masking_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from attention_accuracy import oracle, relative_errors, sdpa_oracle  # noqa: E402
from operator_calls import OperatorCalls  # noqa: E402

import hf_normsoftmax.attention as attention  # noqa: E402


def fast(*args, **kwargs):
    return attention.normsoftmax_attention(*args, path="fast", **kwargs)[0]


def qkv(B, H, L, D, kv_heads=None, S=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = S or L
    kv_heads = kv_heads or H
    return (torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype),
            *(torch.randn(B, kv_heads, S, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)))


def padding(B, S, left_pads):
    valid = torch.ones(B, S, dtype=torch.bool)
    for b, p in enumerate(left_pads):
        valid[b, :p] = False
    return valid


def window_mask(B, L, window, left_pads=(), S=None, builder=masking_utils.sdpa_mask, **kwargs):
    """transformers' causal sliding-window mask (+ left padding), KV-cache offset S - L."""
    S = S or L
    fn = masking_utils.sliding_window_causal_mask_function(window)
    if left_pads:
        fn = masking_utils.and_masks(fn, masking_utils.padding_mask_function(padding(B, S, left_pads)))
    return builder(B, L, S, q_offset=S - L, mask_function=fn, allow_is_causal_skip=False, **kwargs)


def packed_mask(lengths_per_sequence, causal=True, builder=masking_utils.sdpa_mask, **kwargs):
    """transformers' block-diagonal mask of packed documents, found from position_ids as models do."""
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in lengths_per_sequence])
    B, L = position_ids.shape
    documents = masking_utils.find_packed_sequence_indices(position_ids)
    base = masking_utils.causal_mask_function if causal else masking_utils.bidirectional_mask_function
    fn = masking_utils.and_masks(base, masking_utils.packed_sequence_mask_function(documents))
    return builder(B, L, L, mask_function=fn, allow_is_causal_skip=False, **kwargs)


def expanded(q, k, v):
    groups = q.shape[1] // k.shape[1]
    return q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)


def assert_matches_oracle(q, k, v, mask, valid, is_causal=False, atol=1e-9, **options):
    """Output and the gradients of q, k, v (float64) against the oracle over ``valid`` (B, 1, L, S) bool."""
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fast(*inputs, attn_mask=mask, is_causal=is_causal, **options)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    wide = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = oracle(*expanded(*wide), valid, **options)
    ref_grads = torch.autograd.grad(ref, wide, grad_out)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def causal_valid(B, L, S, key_valid=None):
    valid = torch.ones(L, S, dtype=torch.bool).tril(S - L).expand(B, 1, L, S)
    return valid if key_valid is None else valid & key_valid[:, None, None, :]


MASKS = {
    # name: (mask builder, B, L, S)
    "window": (lambda: window_mask(2, 200, 70), 2, 200, 200),
    "window_multiple_of_block": (lambda: window_mask(1, 300, 128), 1, 300, 300),
    "window_shorter_than_block": (lambda: window_mask(2, 150, 5), 2, 150, 150),
    "window_left_padding": (lambda: window_mask(2, 230, 90, left_pads=(0, 77)), 2, 230, 230),
    "window_kv_offset": (lambda: window_mask(2, 100, 70, left_pads=(0, 30), S=190), 2, 100, 190),
    "window_additive": (lambda: window_mask(2, 200, 70, left_pads=(0, 20), builder=masking_utils.eager_mask), 2,
                        200, 200),
    "packed_causal": (lambda: packed_mask([[50, 1, 120, 129], [300]]), 2, 300, 300),
    "packed_causal_short_documents": (lambda: packed_mask([[3, 1, 1, 2, 90, 63, 40]]), 1, 200, 200),
    "packed_bidirectional": (lambda: packed_mask([[130, 70], [1, 199]], causal=False), 2, 200, 200),
    "packed_additive": (lambda: packed_mask([[70, 60, 70]], builder=masking_utils.eager_mask), 1, 200, 200),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_interval_masks_match_the_float64_oracle(name):
    """Forward and all input gradients, float64: windows (block-aligned or not, shorter than a block), left padding
    (padded query rows see no key), KV-cache offsets, packed documents with single-key rows, bool and additive."""
    build, B, L, S = MASKS[name]
    mask = build()
    valid = attention.valid_from_mask(mask).expand(B, 1, L, S)
    q, k, v = qkv(B, 3, L, 8, S=S)
    assert_matches_oracle(q, k, v, mask, valid, gamma=2.0)


@pytest.mark.parametrize("statistic,cap", [("var", None), ("std", 0.3)])
def test_interval_masks_with_statistic_and_cap(statistic, cap):
    mask = packed_mask([[90, 1, 109]])
    q, k, v = qkv(1, 2, 200, 8)
    assert_matches_oracle(q, k, v, mask, mask, gamma=1.5, statistic=statistic, max_temperature=cap)


GQA_CASES = {
    # name: (mask builder or None, is_causal, B, L, S)
    "causal": (None, True, 2, 150, 150),
    "causal_kv_offset": (None, True, 2, 100, 170),
    "bidirectional": (None, False, 2, 150, 150),
    "padding": (lambda: padding(2, 150, (0, 41))[:, None, None, :], False, 2, 150, 150),
    "causal_left_padding": (lambda: padding(2, 150, (0, 41))[:, None, None, :], True, 2, 150, 150),
    "window_left_padding": (lambda: window_mask(2, 230, 90, left_pads=(0, 77)), False, 2, 230, 230),
    "packed": (lambda: packed_mask([[50, 1, 149], [200]]), False, 2, 200, 200),
}


@pytest.mark.usefixtures("bidirectional_statistics")
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("name", list(GQA_CASES))
def test_grouped_query_attention_matches_the_oracle_with_expanded_keys(name, kv_heads):
    build, is_causal, B, L, S = GQA_CASES[name]
    mask = None if build is None else build()
    valid = None if mask is None else attention.valid_from_mask(mask).expand(B, 1, L, S)
    if is_causal:
        valid = causal_valid(B, L, S) if valid is None else valid & causal_valid(B, L, S)
    q, k, v = qkv(B, 4, L, 8, kv_heads=kv_heads, S=S)
    assert_matches_oracle(q, k, v, mask, valid, is_causal=is_causal, gamma=2.0)


@pytest.mark.parametrize("name", ["causal", "window_left_padding"])
def test_generic_kernel_backend_with_grouped_heads(monkeypatch, name):
    """The device-generic kernel call (SDPA in its own small graph, ``enable_gqa``), which CPU calls use only with
    dropout and GPUs always: same results."""
    import hf_normsoftmax.attention_fast as attention_fast

    monkeypatch.setattr(attention_fast, "_CPU_FLASH", None)
    test_grouped_query_attention_matches_the_oracle_with_expanded_keys(name, kv_heads=2)


def _record(q, k, v, mask, is_causal=False):
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    with OperatorCalls() as recorder:
        out = fast(*inputs, attn_mask=mask, is_causal=is_causal, gamma=2.0)
        out.sum().backward()
    return recorder.calls


STRUCTURE_MASKS = {
    "window_left_padding": lambda: window_mask(2, 512, 90, left_pads=(0, 77)),
    "packed_causal": lambda: packed_mask([[100, 1, 200, 211], [512]]),
    # bidirectional documents on the fast path: boundaries on the 64-row blocks, or short documents (a boundary
    # inside a block between two long documents falls back: test_masks_it_cannot_express_warn_once_and_stay_exact)
    "packed_bidirectional": lambda: packed_mask([[256, 256], [1, 63, 448]], causal=False),
}


@pytest.mark.parametrize("name", list(STRUCTURE_MASKS))
def test_interval_masks_take_the_fast_path(name):
    """No float tensor of half the (batch, heads, query_len, key_len) logits or more in forward or backward: the
    statistics come from moments and logit tiles (about 3 x 64 keys per row), the kernel gets the (B, 1, L, S) mask
    as stock SDPA does."""
    B, H, L = 2, 4, 512
    calls = _record(*qkv(B, H, L, 8), STRUCTURE_MASKS[name]())
    logits_sized = [(op, shape) for op, outs, _ in calls for shape, dtype in outs
                    if dtype.is_floating_point and torch.Size(shape).numel() >= B * H * L * L // 2]
    assert not logits_sized, logits_sized[:5]


def test_grouped_query_keys_are_never_expanded():
    """Keys and values keep their key heads through forward and backward: no repeat_interleave, no float tensor of
    (B, H, S, d) (queries are (B, H, L, d) with L != S here: a prefill continuing a KV cache)."""
    B, H, kv_heads, L, S, D = 2, 4, 1, 100, 170, 8
    for mask, is_causal in ((None, True), (padding(B, S, (0, 41))[:, None, None, :], True), (None, False),
                            (window_mask(B, L, 70, S=S), False)):
        calls = _record(*qkv(B, H, L, D, kv_heads=kv_heads, S=S), mask, is_causal)
        assert not [call.name for call in calls if "repeat_interleave" in call.name]
        expanded_keys = [(op, shape) for op, outs, _ in calls for shape, dtype in outs
                         if dtype.is_floating_point and shape[:2] == (B, H) and shape[-2:] == (S, D)]
        assert not expanded_keys, expanded_keys[:5]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["window_left_padding", "packed_causal", "gqa_window"])
def test_half_precision_within_5x_of_stock_sdpa_error(dtype, name):
    """Output and all three gradients in bf16/fp16, errors relative to the largest entry (float64 oracle), within
    5x of the error stock SDPA makes in the same dtype with the same mask (rows with 1-3 keys included)."""
    if name == "gqa_window":
        mask, kv_heads, (B, L) = window_mask(2, 230, 90, left_pads=(0, 77)), 1, (2, 230)
    else:
        build, B, L, _ = MASKS[name]
        mask, kv_heads = build(), None
    H, D, gamma = 4, 32, 2.0
    valid = mask.expand(B, 1, L, L)
    worst = []
    for seed in (0, 1):
        q, k, v = qkv(B, H, L, D, kv_heads=kv_heads, dtype=torch.float32, seed=seed)
        grad_out = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(seed + 100))
        errors = relative_errors(lambda q, k, v: fast(q, k, v, attn_mask=mask, gamma=gamma),
                                 lambda q, k, v: oracle(*expanded(q, k, v), valid, gamma=gamma), (q, k, v),
                                 grad_out, dtype)

        def stock(q, k, v):
            out = F.scaled_dot_product_attention(*expanded(q, k, v), attn_mask=valid)
            return torch.where(valid.any(-1, keepdim=True), out, 0.0)

        stock_errors = relative_errors(stock, lambda q, k, v: sdpa_oracle(*expanded(q, k, v), valid), (q, k, v),
                                       grad_out, dtype)
        worst.append([e / s for e, s in zip(errors, stock_errors, strict=True)])
    ratios = [max(r[i] for r in worst) for i in range(4)]
    assert max(ratios) <= 5.0, dict(zip(("out", "dq", "dk", "dv"), ratios, strict=True))


def test_masks_it_cannot_express_warn_once_and_stay_exact(monkeypatch):
    """A mask whose rows see keys in two runs (a window plus an attention sink), and bidirectional documents meeting
    inside a block of 64 rows with more than 4 key blocks on one side, take the reference path with one warning per
    kind naming the mask and the cost; the results are still exact."""
    monkeypatch.setattr(attention, "_WARNED_FALLBACKS", set())
    B, L = 1, 150
    mask = window_mask(B, L, 40).clone()
    mask[..., 0] = True  # every row also sees the first key
    q, k, v = qkv(B, 2, L, 8)
    with pytest.warns(UserWarning, match=r"not one contiguous run.*\(1, 2, 150, 150\) logits.*MB"):
        out = fast(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, oracle(q, k, v, mask), atol=1e-9, rtol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast(q, k, v, attn_mask=mask)  # once per kind of mask
    documents = packed_mask([[300, 212]], causal=False)
    q, k, v = qkv(1, 2, 512, 8)
    with pytest.warns(UserWarning, match=r"blocks of 64.*\(1, 2, 512, 512\) logits"):
        out = fast(q, k, v, attn_mask=documents)
    torch.testing.assert_close(out, oracle(q, k, v, documents), atol=1e-9, rtol=1e-7)


def test_mask_analysis_is_reused_for_the_same_unchanged_mask(monkeypatch):
    """Every layer gets the same mask tensor: it is analysed once. Changed in place (also under no_grad), or a new
    tensor at the same address, it is analysed again and the results stay exact."""
    analysed = []
    plan = attention._mask_plan
    monkeypatch.setattr(attention, "_mask_plan", lambda *a: analysed.append(1) or plan(*a))
    B, L = 2, 200
    mask = window_mask(B, L, 70, left_pads=(0, 30))
    q, k, v = qkv(B, 2, L, 8)
    first = fast(q, k, v, attn_mask=mask)
    for _ in range(3):
        assert torch.equal(fast(q, k, v, attn_mask=mask), first)
    assert len(analysed) == 1
    with torch.no_grad():
        mask[..., 100:, :] = False  # in place: later rows lose every key
    changed = fast(q, k, v, attn_mask=mask)
    assert len(analysed) == 2
    torch.testing.assert_close(changed, oracle(q, k, v, mask), atol=1e-9, rtol=1e-7)
    assert torch.equal(changed[:, :, 100:], torch.zeros_like(changed[:, :, 100:]))
    # a mask freed (nothing kept alive by the analysis) and another built in its place (same id / data_ptr
    # possible): never the old analysis
    freed = weakref.ref(mask)
    del mask
    gc.collect()
    assert freed() is None
    other = window_mask(B, L, 20)
    torch.testing.assert_close(fast(q, k, v, attn_mask=other), oracle(q, k, v, other), atol=1e-9, rtol=1e-7)
    with torch.inference_mode():  # no version counter: analysed on every call
        frozen = window_mask(B, L, 70)
        before = len(analysed)
        fast(q, k, v, attn_mask=frozen)
        fast(q, k, v, attn_mask=frozen)
        assert len(analysed) == before + 2
