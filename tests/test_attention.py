"""NormSoftmax attention: fast path and reference against a naive per-row oracle, forward and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from operator_calls import OperatorCalls

from hf_normsoftmax.attention import (
    decompose_mask,
    normsoftmax_attention_reference,
)
from hf_normsoftmax.attention import normsoftmax_attention as _normsoftmax_attention


def normsoftmax_attention(*args, **kwargs):
    """The fast path at every size (test inputs are below the size where ``path="auto"`` materialises)."""
    return _normsoftmax_attention(*args, path="fast", **kwargs)



def naive_attention(q, k, v, valid, scale, gamma=1.0, cap=None, eps=1e-6, statistic="std"):
    """Row by row, in float64, straight from the definition. valid: (B, H, L, S) bool."""
    B, H, L, D = q.shape
    out = torch.zeros(B, H, L, v.shape[-1], dtype=torch.float64)
    weights = torch.zeros(B, H, L, k.shape[-2], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = (
                gamma
                if not isinstance(gamma, torch.Tensor)
                else float(gamma.reshape(-1)[h] if gamma.numel() > 1 else gamma)
            )
            for i in range(L):
                idx = valid[b, h, i].nonzero().flatten()
                if len(idx) == 0:
                    continue
                s = (k[b, h, idx].double() @ q[b, h, i].double()) * scale
                var = s.var(unbiased=False)
                t = (torch.sqrt(var + eps) if statistic == "std" else var + eps) / g
                if cap is not None:
                    t = min(t, torch.tensor(cap, dtype=torch.float64))
                p = torch.softmax((s - s.mean()) / t, dim=0)
                weights[b, h, i, idx] = p
                out[b, h, i] = p @ v[b, h, idx].double()
    return out, weights


def make_qkv(B=2, H=3, L=11, S=11, D=8, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def padding_mask(B, S, lengths, left=False):
    valid = torch.zeros(B, S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if left:
            valid[b, S - n :] = True
        else:
            valid[b, :n] = True
    return valid


def full_valid(key_valid, causal, B, H, L, S):
    valid = torch.ones(B, H, L, S, dtype=torch.bool)
    if key_valid is not None:
        valid &= key_valid[:, None, None, :]
    if causal:
        valid &= torch.ones(L, S, dtype=torch.bool).tril(S - L)
    return valid


CASES = [
    # name, L, S, causal, lengths (None = no padding), left padding
    ("plain", 11, 11, False, None, False),
    ("padded", 11, 11, False, [11, 6], False),
    ("causal", 11, 11, True, None, False),
    ("causal_right_pad", 11, 11, True, [11, 7], False),
    ("causal_left_pad", 11, 11, True, [11, 4], True),
    ("cache_prefill", 9, 14, True, None, False),
    ("cache_prefill_left_pad", 9, 14, True, [14, 10], True),
    ("single_key", 11, 11, False, [11, 1], False),
    ("fully_padded_row", 11, 11, False, [11, 0], False),
]


@pytest.mark.usefixtures("bidirectional_statistics")
@pytest.mark.parametrize("name,L,S,causal,lengths,left", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("gamma", [1.0, 2.5])
def test_fast_and_reference_match_naive(name, L, S, causal, lengths, left, gamma):
    B, H, D = 2, 3, 8
    q, k, v = make_qkv(B, H, L, S, D)
    key_valid = None if lengths is None else padding_mask(B, S, lengths, left)
    valid = full_valid(key_valid, causal, B, H, L, S)
    mask = None if key_valid is None else key_valid[:, None, None, :]
    scale = 1 / math.sqrt(D)
    expected, expected_w = naive_attention(q, k, v, valid, scale, gamma)
    fast, _ = normsoftmax_attention(q, k, v, attn_mask=mask, is_causal=causal, gamma=gamma)
    ref, w = normsoftmax_attention_reference(
        q, k, v, attn_mask=mask, is_causal=causal, gamma=gamma, return_weights=True
    )
    torch.testing.assert_close(ref, expected, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(w, expected_w, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=1e-7)
    assert torch.isfinite(fast).all()


def test_transformers_style_4d_mask_takes_fast_path_and_matches():
    """A (B, 1, L, S) bool mask = causal & padding, as transformers' sdpa_mask builds it."""
    B, H, L, D = 2, 2, 13, 8
    q, k, v = make_qkv(B, H, L, L, D)
    key_valid = padding_mask(B, L, [13, 5], left=True)
    mask4d = key_valid[:, None, None, :] & torch.ones(L, L, dtype=torch.bool).tril()
    structure = decompose_mask(mask4d, False, B, L, L)
    assert structure is not None and structure.is_causal
    assert torch.equal(structure.key_valid, key_valid)
    fast, _ = normsoftmax_attention(q, k, v, attn_mask=mask4d)
    expected, _ = naive_attention(q, k, v, mask4d.expand(B, H, L, L), 1 / math.sqrt(D))
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=1e-7)
    # padded query rows of a left-padded causal mask have no key: exact zeros
    assert torch.equal(fast[1, :, :8], torch.zeros_like(fast[1, :, :8]))


def test_decompose_mask_recognises_and_rejects():
    B, L = 2, 6
    kv = padding_mask(B, L, [6, 3])
    assert decompose_mask(None, True, B, L, L) == (None, True)
    s = decompose_mask(kv[:, None, None, :], False, B, L, L)
    assert s is not None and not s.is_causal and torch.equal(s.key_valid, kv)
    # additive float mask with 0 / min entries is a padding mask
    float_mask = torch.zeros(B, 1, 1, L).masked_fill(~kv[:, None, None, :], torch.finfo(torch.float32).min)
    s = decompose_mask(float_mask, False, B, L, L)
    assert s is not None and torch.equal(s.key_valid, kv)
    # a sliding window is neither padding nor causal
    window = torch.ones(L, L, dtype=torch.bool).tril() & ~torch.ones(L, L, dtype=torch.bool).tril(-3)
    assert decompose_mask(window[None, None], False, B, L, L) is None
    # an additive bias (ALiBi-like) is not expressible either
    assert decompose_mask(torch.randn(1, 1, L, L), False, B, L, L) is None


def test_arbitrary_mask_falls_back_to_reference():
    B, H, L, D = 2, 2, 12, 8
    q, k, v = make_qkv(B, H, L, L, D)
    window = torch.ones(L, L, dtype=torch.bool).tril() & ~torch.ones(L, L, dtype=torch.bool).tril(-4)
    out, _ = normsoftmax_attention(q, k, v, attn_mask=window)
    expected, _ = naive_attention(q, k, v, window.expand(B, H, L, L), 1 / math.sqrt(D))
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-8)
    # an additive bias is added to the logits before normalisation
    bias = torch.randn(1, 1, L, L, dtype=torch.float64)
    out_b, _ = normsoftmax_attention(q, k, v, attn_mask=bias)
    ref_b, _ = normsoftmax_attention_reference(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out_b, ref_b)


@pytest.mark.parametrize("statistic", ["std", "var"])
@pytest.mark.parametrize("cap", [None, 0.7])
def test_statistic_and_temperature_cap(statistic, cap):
    B, H, L, D = 1, 2, 12, 8
    q, k, v = make_qkv(B, H, L, L, D)
    valid = full_valid(None, True, B, H, L, L)
    expected, _ = naive_attention(q, k, v, valid, 1 / math.sqrt(D), 1.5, cap, statistic=statistic)
    fast, _ = normsoftmax_attention(q, k, v, is_causal=True, gamma=1.5, max_temperature=cap, statistic=statistic)
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("statistic", ["std", "var"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("capped", [False, True])
def test_statistic_and_cap_gradcheck(statistic, causal, capped):
    """Gradients through the row temperature for both statistics, with the cap active on about half of the rows
    (placed between two rows' temperatures, away from the kink) and a per-head gamma that learns."""
    B, H, L, D = 2, 2, 10, 4
    q, k, v = make_qkv(B, H, L, L, D, requires_grad=True, seed=3)
    gamma = torch.tensor([0.8, 1.9], dtype=torch.float64).view(H, 1, 1).requires_grad_()
    mask = padding_mask(B, L, [10, 7])[:, None, None, :]
    cap = None
    if capped:
        valid = full_valid(mask[:, 0, 0], causal, B, H, L, L)
        logits = (q @ k.transpose(-1, -2)).detach() / math.sqrt(D)
        count = valid.sum(-1, keepdim=True)
        mean = torch.where(valid, logits, 0.0).sum(-1, keepdim=True) / count
        var = torch.where(valid, (logits - mean) ** 2, 0.0).sum(-1, keepdim=True) / count
        spread = (var + 1e-6).sqrt() if statistic == "std" else var + 1e-6
        temperatures = (spread / gamma.detach())[count > 1].sort().values
        middle = len(temperatures) // 2
        cap = float(temperatures[middle - 1] + temperatures[middle]) / 2

    def fn(q, k, v, gamma):
        return normsoftmax_attention(
            q, k, v, attn_mask=mask, is_causal=causal, gamma=gamma, max_temperature=cap, statistic=statistic
        )[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, gamma), eps=1e-6, atol=1e-6)


def test_per_head_gamma_tensor():
    B, H, L, D = 2, 3, 12, 8
    q, k, v = make_qkv(B, H, L, L, D)
    gamma = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64).view(H, 1, 1)
    expected, _ = naive_attention(q, k, v, full_valid(None, False, B, H, L, L), 1 / math.sqrt(D), gamma)
    fast, _ = normsoftmax_attention(q, k, v, gamma=gamma)
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=1e-7)


def test_constant_logits_give_uniform_attention():
    """std = 0 rows: keys all equal -> every logit of a row equal -> uniform over the valid keys."""
    B, H, L, D = 1, 2, 10, 4
    q = torch.randn(B, H, L, D, dtype=torch.float64)
    k = torch.ones(B, H, L, D, dtype=torch.float64) * 0.3
    v = torch.randn(B, H, L, D, dtype=torch.float64)
    kv = padding_mask(B, L, [7])
    for fn in (normsoftmax_attention, normsoftmax_attention_reference):
        out, _ = fn(q, k, v, attn_mask=kv[:, None, None, :])
        torch.testing.assert_close(out, v[:, :, :7].mean(dim=2, keepdim=True).expand_as(out), atol=1e-7, rtol=0)
        out_c, _ = fn(q, k, v, is_causal=True)
        expected = v.cumsum(dim=2) / torch.arange(1, L + 1, dtype=torch.float64).view(1, 1, L, 1)
        torch.testing.assert_close(out_c, expected, atol=1e-7, rtol=0)


GRAD_CASES = [c for c in CASES if c[0] in ("padded", "causal_left_pad", "cache_prefill", "fully_padded_row")]


@pytest.mark.usefixtures("bidirectional_statistics")
@pytest.mark.parametrize("name,L,S,causal,lengths,left", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_fast_path_gradcheck(name, L, S, causal, lengths, left):
    B, H, D = 2, 1, 4
    L, S = min(L, 9), min(S, 12) if S != L else min(L, 9)
    q, k, v = make_qkv(B, H, L, S, D, requires_grad=True)
    key_valid = None if lengths is None else padding_mask(B, S, [min(n, S) for n in lengths], left)
    mask = None if key_valid is None else key_valid[:, None, None, :]
    gamma = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, gamma):
        return normsoftmax_attention(q, k, v, attn_mask=mask, is_causal=causal, gamma=gamma)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, gamma), eps=1e-6, atol=1e-6)


@pytest.mark.usefixtures("bidirectional_statistics")
@pytest.mark.parametrize("causal", [False, True])
def test_float32_gradients_close_to_float64_truth(causal):
    """Both paths in float32 against float64 gradients. The fast path is allowed a little more: in rows with very
    few keys (the first rows of a causal sequence) the logit std is small and SDPA's rounding on the rescaled
    queries is amplified by 1/std."""
    B, H, L, D = 2, 4, 40, 16
    q, k, v = make_qkv(B, H, L, L, D, requires_grad=True)
    key_valid = padding_mask(B, L, [40, 23], left=causal)
    mask = key_valid[:, None, None, :]
    grad_out = torch.randn(B, H, L, D, dtype=torch.float64)
    out, _ = normsoftmax_attention_reference(q, k, v, attn_mask=mask, is_causal=causal, gamma=2.0)
    truth = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    for fn, atol in ((normsoftmax_attention, 5e-5), (normsoftmax_attention_reference, 1e-5)):
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        out, _ = fn(q32, k32, v32, attn_mask=mask, is_causal=causal, gamma=2.0)
        got = (out, *torch.autograd.grad(out, (q32, k32, v32), grad_out.float()))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, truth, strict=True):
            assert (a.double() - b).abs().max().item() < (2e-6 if name == "out" else atol), (fn.__name__, name)


@pytest.mark.usefixtures("bidirectional_statistics")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_close_to_float64(dtype):
    B, H, L, D = 2, 2, 24, 16
    q, k, v = make_qkv(B, H, L, L, D)
    key_valid = padding_mask(B, L, [24, 15], left=True)
    valid = full_valid(key_valid, True, B, H, L, L)
    expected, _ = naive_attention(q, k, v, valid, 1 / math.sqrt(D))
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    for fn in (normsoftmax_attention, normsoftmax_attention_reference):
        out, _ = fn(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=key_valid[:, None, None, :], is_causal=True)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.usefixtures("bidirectional_statistics")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_with_rows_without_keys(dtype):
    """Causal + left padding on the CPU kernel path (its causal flag plus a key-padding mask whose padded keys get
    the dtype's most negative finite value): rows with no valid key stay zero, every gradient is finite, and (fp16)
    close to the float32 gradients. bf16 gradients are only checked for finiteness: its 8-bit mantissa on the
    rescaled queries makes a row whose two keys give nearly equal logits (here row 10 of sequence 1) ill-conditioned
    (error ~0.15, the same before this kernel path existed)."""
    B, H, L, D = 2, 2, 24, 16
    q, k, v = make_qkv(B, H, L, L, D, dtype=torch.float32)
    mask = padding_mask(B, L, [24, 15], left=True)[:, None, None, :]  # 9 rows of sequence 1 see no valid key
    grad_out = torch.randn(B, H, L, D)
    results = []
    for t in (torch.float32, dtype):
        inputs = [x.to(t).requires_grad_() for x in (q, k, v)]
        out, _ = normsoftmax_attention(*inputs, attn_mask=mask, is_causal=True)
        results.append((out, *torch.autograd.grad(out, inputs, grad_out.to(t))))
    assert torch.equal(results[1][0][1, :, :9], torch.zeros_like(results[1][0][1, :, :9]))
    for name, full, half in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        assert torch.isfinite(half).all(), name
        if dtype == torch.float16 or name == "out":
            torch.testing.assert_close(half.float(), full, atol=2e-2, rtol=2e-2, msg=name)


def test_decode_steps_match_full_forward():
    """Incremental decoding against a growing KV cache equals the full causal forward."""
    B, H, L, D = 2, 2, 20, 8
    q, k, v = make_qkv(B, H, L, L, D, dtype=torch.float32)
    key_valid = padding_mask(B, L, [20, 14], left=True)
    full, _ = normsoftmax_attention(q, k, v, attn_mask=key_valid[:, None, None, :], is_causal=True)
    prompt = 12
    prefill, _ = normsoftmax_attention(
        q[:, :, :prompt],
        k[:, :, :prompt],
        v[:, :, :prompt],
        attn_mask=key_valid[:, None, None, :prompt],
        is_causal=True,
    )
    steps = [prefill]
    for t in range(prompt, L):
        out, _ = normsoftmax_attention(
            q[:, :, t : t + 1],
            k[:, :, : t + 1],
            v[:, :, : t + 1],
            attn_mask=key_valid[:, None, None, : t + 1],
            is_causal=True,
        )
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("bidirectional_statistics")
def test_grouped_query_attention_expands_kv():
    B, H, Hk, L, D = 1, 4, 2, 10, 8
    q, _, _ = make_qkv(B, H, L, L, D)
    _, k, v = make_qkv(B, Hk, L, L, D, seed=1)
    out, _ = normsoftmax_attention(q, k, v, is_causal=True)
    expected, _ = normsoftmax_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, expected)


def test_weights_requested_come_from_reference_and_sum_to_one():
    B, H, L, D = 2, 2, 12, 8
    q, k, v = make_qkv(B, H, L, L, D)
    key_valid = padding_mask(B, L, [12, 0])
    out, w = normsoftmax_attention(q, k, v, attn_mask=key_valid[:, None, None, :], return_weights=True)
    assert w.shape == (B, H, L, L)
    torch.testing.assert_close(w[0].sum(-1), torch.ones(H, L, dtype=torch.float64))
    assert torch.equal(w[1], torch.zeros_like(w[1]))  # no valid key at all: zeros, not NaN
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_dropout_is_applied_in_both_paths():
    q, k, v = make_qkv(1, 2, 16, 16, 8, dtype=torch.float32)
    for fn in (normsoftmax_attention, normsoftmax_attention_reference):
        torch.manual_seed(0)
        a, _ = fn(q, k, v, dropout_p=0.5)
        b, _ = fn(q, k, v, dropout_p=0.0)
        assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -1.0}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"gamma": torch.ones(5, 1, 1)}, "gamma"),
        ({"eps": 0.0}, "eps"),
        ({"max_temperature": -2.0}, "max_temperature"),
        ({"statistic": "mad"}, "statistic"),
        ({"dropout_p": 1.5}, "dropout_p"),
        ({"attn_mask": torch.ones(3, 1, 1, 7, dtype=torch.bool)}, "attn_mask"),
        ({"scale": 0}, "scale"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    q, k, v = make_qkv(2, 3, 7, 7, 4)
    for fn in (normsoftmax_attention, normsoftmax_attention_reference):
        with pytest.raises((ValueError, TypeError), match=match):
            fn(q, k, v, **kwargs)


def test_bad_tensors_are_rejected():
    q, k, v = make_qkv(2, 3, 7, 7, 4)
    with pytest.raises(TypeError, match="floating-point"):
        normsoftmax_attention(q.long(), k, v)
    with pytest.raises(ValueError, match="shape"):
        normsoftmax_attention(q[0], k, v)
    with pytest.raises(TypeError, match="attn_mask"):
        normsoftmax_attention(q, k, v, attn_mask=torch.ones(1, 1, 7, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple"):
        normsoftmax_attention(q, k[:, :2], v[:, :2])


def test_softmax_attention_limit_of_sdpa_is_not_normsoftmax():
    """Sanity: the method changes the result (guards against a silent fallback to plain softmax)."""
    q, k, v = make_qkv(1, 2, 16, 16, 8, dtype=torch.float32)
    out, _ = normsoftmax_attention(q, k, v, gamma=3.0)
    plain = F.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(out, plain, atol=1e-3)


@pytest.fixture
def small_causal_blocks(monkeypatch):
    """Blocks of 4 query rows: several blocks plus a partial last block at test sizes."""
    import hf_normsoftmax.attention_statistics as attention_statistics

    monkeypatch.setattr(attention_statistics, "_CAUSAL_BLOCK", 4)


BLOCK_CASES = [c for c in CASES if c[0] in ("plain", "padded", "causal", "causal_left_pad", "cache_prefill_left_pad")]


@pytest.mark.parametrize("name,L,S,causal,lengths,left", BLOCK_CASES, ids=[c[0] for c in BLOCK_CASES])
def test_blocked_statistics_match_naive_and_gradcheck(
    small_causal_blocks, name, L, S, causal, lengths, left
):
    """The fast path's grouped causal blocks, partial last block and row blocks: forward against the naive
    oracle, gradients by float64 gradcheck (per-head gamma tensor included)."""
    B, H, D = 2, 1, 4
    q, k, v = make_qkv(B, H, L, S, D, requires_grad=True)
    key_valid = None if lengths is None else padding_mask(B, S, lengths, left)
    mask = None if key_valid is None else key_valid[:, None, None, :]
    expected, _ = naive_attention(q, k, v, full_valid(key_valid, causal, B, H, L, S), 1 / math.sqrt(D), 1.3)
    fast, _ = normsoftmax_attention(q, k, v, attn_mask=mask, is_causal=causal, gamma=1.3)
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=1e-7)
    gamma = torch.tensor([1.3], dtype=torch.float64, requires_grad=True).view(1, 1, 1)

    def fn(q, k, v, gamma):
        return normsoftmax_attention(q, k, v, attn_mask=mask, is_causal=causal, gamma=gamma)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, gamma), eps=1e-6, atol=1e-6)


@pytest.mark.usefixtures("bidirectional_statistics")
@pytest.mark.parametrize("causal", [False, True])
def test_fast_path_gradients_equal_reference_in_float64(causal):
    """Sizes where the default blocks matter (several causal blocks of 64 rows and a partial one)."""
    B, H, L, D = 1, 2, 150, 8
    q, k, v = make_qkv(B, H, L, L, D, requires_grad=True)
    key_valid = padding_mask(B, L, [131], left=True)
    mask = key_valid[:, None, None, :]
    grad_out = torch.randn(B, H, L, D, dtype=torch.float64)
    results = []
    for fn in (normsoftmax_attention, normsoftmax_attention_reference):
        out, _ = fn(q, k, v, attn_mask=mask, is_causal=causal, gamma=2.0)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=name)


@pytest.mark.usefixtures("bidirectional_statistics")
def test_second_backward_through_retained_graph_and_no_grad_path():
    """retain_graph=True: a second backward rebuilds SDPA's graph and gives the same gradients; without
    gradients the fast path gives the same output; non-contiguous (transposed) inputs as in transformers."""
    B, H, L, D = 2, 3, 20, 8
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make_qkv(B, H, L, L, D, dtype=torch.float32))
    q = q.transpose(1, 2).contiguous().view(B, L, H, D).transpose(1, 2).requires_grad_()  # (B, H, L, D) view
    k, v = k.requires_grad_(), v.requires_grad_()
    mask = padding_mask(B, L, [20, 13], left=True)[:, None, None, :]
    out, _ = normsoftmax_attention(q, k, v, attn_mask=mask, is_causal=True)
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), grad_out)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with torch.no_grad():
        inference, _ = normsoftmax_attention(q, k, v, attn_mask=mask, is_causal=True)
    torch.testing.assert_close(inference, out.detach(), atol=1e-6, rtol=1e-6)
    ref, _ = normsoftmax_attention_reference(q, k, v, attn_mask=mask, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("bidirectional_statistics")
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("causal", [False, True])
def test_second_backward_after_gradients_overwrote_kept_buffers(causal, layout):
    """Float32 on CPU, within the keep budget, the final gradients reuse buffers: contiguous queries get theirs
    over the rescaled queries the forward kept (a second backward through the retained graph must rebuild them,
    not read the gradient); (B, L, H, D) inputs seen as (B, H, L, D), as transformers passes them, get theirs over
    the kernel's own gradients (same layout). Both against the reference."""
    B, H, L, D = 2, 3, 24, 8
    q, k, v = make_qkv(B, H, L, L, D, dtype=torch.float32)
    if layout == "transposed":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = padding_mask(B, L, [24, 17])[:, None, None, :]
    out, _ = normsoftmax_attention(q, k, v, attn_mask=mask, is_causal=causal, gamma=1.5)
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), grad_out)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    ref, _ = normsoftmax_attention_reference(q, k, v, attn_mask=mask, is_causal=causal, gamma=1.5)
    expected = torch.autograd.grad(ref, (q, k, v), grad_out)
    for a, b in zip(second, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_second_backward_with_dropout_is_refused_clearly():
    q, k, v = make_qkv(1, 2, 16, 16, 8, dtype=torch.float32, requires_grad=True)
    out, _ = normsoftmax_attention(q, k, v, dropout_p=0.3)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="dropout_p"):
        out.sum().backward()


def test_long_mask_check_is_blockwise_and_exact():
    """decompose_mask checks long masks block by block; a single wrong entry deep in the mask is still found."""
    B, L = 2, 700
    key_valid = padding_mask(B, L, [700, 650], left=True)
    mask = key_valid[:, None, None, :] & torch.ones(L, L, dtype=torch.bool).tril()
    assert decompose_mask(mask, False, B, L, L).is_causal
    broken = mask.clone()
    broken[1, 0, 600, 300] = False
    assert decompose_mask(broken, False, B, L, L) is None


@pytest.fixture
def generic_sdpa_backend(monkeypatch):
    """Force the device-generic backend (SDPA in its own graph), which CPU calls use only with dropout."""
    import hf_normsoftmax.attention_fast as attention_fast

    monkeypatch.setattr(attention_fast, "_CPU_FLASH", None)


@pytest.mark.usefixtures("bidirectional_statistics")
@pytest.mark.parametrize("name,L,S,causal,lengths,left", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_generic_backend_gradcheck_and_retained_graph(
    generic_sdpa_backend, name, L, S, causal, lengths, left
):
    test_fast_path_gradcheck(name, L, S, causal, lengths, left)
    test_second_backward_through_retained_graph_and_no_grad_path()


@pytest.mark.usefixtures("bidirectional_statistics")
@pytest.mark.parametrize("causal", [False, True])
def test_fully_padded_sequence_gets_zero_output_and_gradient(causal):
    """A sequence whose keys are all padding: exact zeros out, zero gradients, and no NaN reaching the others."""
    B, H, L, D = 3, 4, 24, 8
    q, k, v = make_qkv(B, H, L, L, D, dtype=torch.float32, requires_grad=True)
    mask = padding_mask(B, L, [24, 10, 0], left=True)[:, None, None, :]  # one sequence fully padded
    grad_out = torch.randn(B, H, L, D)
    out, _ = normsoftmax_attention(q, k, v, attn_mask=mask, is_causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref, _ = normsoftmax_attention_reference(q, k, v, attn_mask=mask, is_causal=causal)
    expected = torch.autograd.grad(ref, (q, k, v), grad_out)
    for a, b in zip((out, *grads), (ref, *expected), strict=True):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.equal(grads[0][2], torch.zeros_like(grads[0][2]))


def test_short_sequences_take_the_reference_path(monkeypatch):
    """path="auto" materialises up to 96 x 96 logits per head (cheaper there) and takes the fast path above;
    path="fast" never hands over by size; path="reference" always materialises. Checked by which implementation
    runs (the materialising implementation is wrapped to record its calls)."""
    import hf_normsoftmax.attention as attention

    calls = []
    reference = attention._materialised_normsoftmax
    monkeypatch.setattr(
        attention, "_materialised_normsoftmax", lambda *a, **k: calls.append(a[0].shape[-2]) or reference(*a, **k)
    )
    for L, path in ((96, "auto"), (97, "auto"), (20, "fast"), (97, "reference")):
        q, k, v = make_qkv(1, 2, L, L, 8)
        out, _ = attention.normsoftmax_attention(q, k, v, is_causal=True, path=path)
        expected, _ = naive_attention(q, k, v, full_valid(None, True, 1, 2, L, L), 1 / math.sqrt(8))
        torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-7)
    assert calls == [96, 97]
    with pytest.raises(ValueError, match="path must be"):
        attention.normsoftmax_attention(q, k, v, path="flash")


@pytest.mark.parametrize("S,gradients,moments", [(128, False, False), (128, True, False), (512, False, True)])
def test_bidirectional_calls_are_a_few_large_operations(S, gradients, moments):
    """A padded BERT-sized call (keys and queries as transformers hands them over: (B, H, S, D) views of
    (B, S, H, D) projections, here one fused qkv) makes 8 query-sized operator calls in its forward at 128 keys (a
    copy of q; key mean, centring, masking; the logits and their norms; the rescaled queries; the kernel; stock
    SDPA makes 1). At 512 keys the key covariance gives the variances (the logits would be 4x the multiply-adds)."""
    B, H, D = 2, 6, 64
    projections = torch.randn(B, S, 3, H, D, requires_grad=gradients)
    q, k, v = (projections[:, :, i].transpose(1, 2) for i in range(3))
    valid = torch.rand(B, S) > 0.3
    valid[:, 0] = True
    with torch.set_grad_enabled(gradients), OperatorCalls() as recorder:
        normsoftmax_attention(q, k, v, attn_mask=valid[:, None, None, :], gamma=2.0)
    large = recorder.large(B * H * S * D // 2)
    assert ("aten.linalg_vector_norm.out" in large) != moments, large
    if not moments:
        assert len(large) <= 8, large


def test_math_modules_import_only_torch_and_each_other():
    """The math layer (pure torch) never imports transformers or huggingface_hub, and reaches other package files
    only by same-folder relative imports (what a checkpoint's remote code carries)."""
    import ast
    from pathlib import Path

    math_modules = {"normsoftmax", "losses", "fused_cross_entropy", "attention", "attention_fast",
                    "attention_statistics", "sigma_reparam", "sigma_reparam_ops", "entropy", "layers",
                    "sigma_reparam_tools"}
    package = Path(__file__).resolve().parents[1] / "hf_normsoftmax"
    for name in sorted(math_modules):
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
                assert not roots & {"transformers", "huggingface_hub", "hf_normsoftmax"}, (name, roots)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert node.module.split(".")[0] not in {"transformers", "huggingface_hub", "hf_normsoftmax"}, (
                        name, node.module)
                else:  # from .module import x, or from . import module
                    imported = [node.module] if node.module else [alias.name for alias in node.names]
                    assert node.level == 1 and set(imported) <= math_modules, (name, node.level, imported)
