"""NormSoftmax attention against a float64 oracle written from the formula, where users would notice.

The oracle (benchmarks/attention_accuracy.py) computes statistics over the valid keys (population variance),
``T = sqrt(var + eps) / gamma`` and the softmax of ``(s - mean) / T`` in float64; it shares no code with the
package. Half-precision errors are held against what stock SDPA makes in the same dtype on the same inputs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from attention_accuracy import (  # noqa: E402
    full_valid,
    oracle,
    outlier_keys_case,
    random_case,
    relative_errors,
    sdpa_oracle,
)

from hf_normsoftmax.attention import normsoftmax_attention as _normsoftmax_attention  # noqa: E402
from hf_normsoftmax.attention import normsoftmax_attention_reference  # noqa: E402

# every test here runs with each way of taking bidirectional row variances (key covariance, logits)
pytestmark = pytest.mark.usefixtures("bidirectional_statistics")


def normsoftmax_attention(*args, **kwargs):
    """The fast path at every size (test inputs are below the size where ``path="auto"`` materialises)."""
    return _normsoftmax_attention(*args, path="fast", **kwargs)



def _sdpa(valid):
    def run(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid)
        if valid is not None:
            out = torch.where(valid.any(-1, keepdim=True), out, 0.0)
        return out

    return run


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("padded", [False, True], ids=["", "padded"])
def test_half_precision_within_5x_of_stock_sdpa_error(dtype, causal, padded):
    """Output and all three gradients, errors relative to the largest entry, against 5x stock SDPA's own error.
    Padding leaves the second sequence with 2 valid keys in the causal case (rows with 1-3 keys), 30 otherwise."""
    B, H, L, D, gamma = 2, 3, 112, 32, 2.0
    lengths = [L, 2 if causal else 30] if padded else None
    worst = []
    for seed in (0, 1):
        q, k, v, key_valid = random_case(B, H, L, D, lengths, left=True, seed=seed)
        valid = full_valid(key_valid, causal, B, L, L)
        mask = None if key_valid is None else key_valid[:, None, None, :]
        grad_out = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(seed + 100))
        fast = relative_errors(
            lambda q, k, v, mask=mask: normsoftmax_attention(q, k, v, attn_mask=mask, is_causal=causal, gamma=gamma)[0],
            lambda q, k, v, valid=valid: oracle(q, k, v, valid, gamma=gamma),
            (q, k, v),
            grad_out,
            dtype,
        )
        stock = relative_errors(
            _sdpa(valid), lambda q, k, v, valid=valid: sdpa_oracle(q, k, v, valid), (q, k, v), grad_out, dtype
        )
        worst.append([f / s for f, s in zip(fast, stock, strict=True)])
    ratios = [max(r[i] for r in worst) for i in range(4)]
    assert max(ratios) <= 5.0, dict(zip(("out", "dq", "dk", "dv"), ratios, strict=True))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("noise", [1e-2, 3e-3])
def test_outlier_key_direction_does_not_cancel(causal, noise):
    """Keys spread along one direction (x10), queries orthogonal to it: the logit variance (1e-4 .. 1e-5) is tiny
    next to |q|^2 ||Cov(k)||. Fast path within 10x of the materialising path's error and <= 1e-3, gradients too."""
    L, D = 128, 16
    q, k, v = outlier_keys_case(L, D, noise, seed=0)
    valid = full_valid(None, causal, 1, L, L)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))

    def ref64(q, k, v):
        return oracle(q, k, v, valid, gamma=2.0)

    fast = relative_errors(lambda q, k, v: normsoftmax_attention(q, k, v, is_causal=causal, gamma=2.0)[0], ref64,
                           (q, k, v), grad_out, torch.float32)
    materialised = relative_errors(
        lambda q, k, v: normsoftmax_attention_reference(q, k, v, is_causal=causal, gamma=2.0)[0], ref64, (q, k, v),
        grad_out, torch.float32,
    )
    for name, f, m in zip(("out", "dq", "dk", "dv"), fast, materialised, strict=True):
        assert f <= max(10 * m, 1e-6) and f <= 1e-3, (name, f, m)


MASK_FILLS = [-1e4, -1e9, float("-inf"), "finfo_min", "one_minus_mask"]


@pytest.mark.parametrize("fill", MASK_FILLS, ids=["-1e4", "-1e9", "-inf", "finfo.min", "(1-m)*-10000"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_additive_masks_mean_masked_keys(fill, dtype, path):
    """Every common additive encoding of 'masked' gives exactly the bool-mask result, in the statistics too."""
    B, H, L, D = 2, 2, 40, 8
    q, k, v, key_valid = random_case(B, H, L, D, [40, 25], left=True, seed=3)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    bool_mask = key_valid[:, None, None, :]
    if fill == "one_minus_mask":
        additive = (1.0 - bool_mask.to(dtype)) * -10000.0
    else:
        # a -1e9 fill is not representable in float16: users get finfo.min there (also covered)
        value = torch.finfo(dtype).min if fill == "finfo_min" else max(fill, torch.finfo(dtype).min)
        additive = torch.zeros(bool_mask.shape, dtype=dtype).masked_fill(~bool_mask, value)
    fn = normsoftmax_attention if path == "fast" else normsoftmax_attention_reference
    with_bool, _ = fn(q, k, v, attn_mask=bool_mask, gamma=2.0)
    with_additive, _ = fn(q, k, v, attn_mask=additive, gamma=2.0)
    torch.testing.assert_close(with_additive, with_bool, atol=0, rtol=0)
    expected = oracle(q, k, v, bool_mask.expand(B, 1, L, L), gamma=2.0)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(with_bool.double(), expected, atol=tolerance, rtol=tolerance)


def test_small_negative_values_are_biases_not_masks():
    """Values above -1e4 (an ALiBi-like slope) are added to the logits before the statistics."""
    B, H, L, D = 1, 2, 24, 8
    q, k, v, _ = random_case(B, H, L, D, seed=4)
    positions = torch.arange(L)
    bias = -0.5 * (positions[:, None] - positions[None, :]).abs().double()
    bias[:, 0] = -9000.0  # large but above the masking threshold: still a bias
    out, _ = normsoftmax_attention(q.double(), k.double(), v.double(), attn_mask=bias, gamma=2.0)
    expected = oracle(q, k, v, None, bias=bias, gamma=2.0)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-7)


def test_float16_identical_keys_and_large_queries_stay_finite():
    """|q| >= 100 and identical keys (variance 0: T = sqrt(eps) / gamma) in float16: the float32 computation is
    finite, so the fast path's output must be too (uniform attention, as the oracle); its gradients are the float32
    ones rounded to float16 (inf only where the float32 gradient itself is beyond float16's range)."""
    B, H, L, D = 1, 2, 64, 16
    q = torch.full((B, H, L, D), 100.0)
    k = torch.ones(B, H, L, D).mul_(0.5)
    v = torch.randn(B, H, L, D)
    for causal in (False, True):
        inputs = [t.half().requires_grad_() for t in (q, k, v)]
        out, _ = normsoftmax_attention(*inputs, is_causal=causal)
        out.float().square().sum().backward()
        assert torch.isfinite(out).all()
        expected = oracle(q.half(), k.half(), v.half(), full_valid(None, causal, B, L, L))
        torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)
        _assert_gradients_are_the_float32_ones_rounded(inputs, None, causal, {}, loss="square")


def _assert_gradients_are_the_float32_ones_rounded(inputs, mask, causal, options, loss="sum", close=True):
    """Gradients in a half dtype = the float32 reference's rounded to that dtype: finite wherever those are (inf only
    where the float32 gradient itself exceeds the dtype's range)."""
    wide = [t.detach().float().requires_grad_() for t in inputs]
    ref, _ = normsoftmax_attention_reference(*wide, attn_mask=mask, is_causal=causal, **options)
    (ref.square() if loss == "square" else ref).sum().backward()
    for got, want in zip(inputs, wide, strict=True):
        rounded = want.grad.to(got.dtype)
        assert torch.equal(torch.isfinite(got.grad), torch.isfinite(rounded)), options
        if not close:
            continue
        finite = torch.isfinite(rounded)
        # relative to the largest entry, with an absolute floor: a gradient that is 0 in exact arithmetic (constant
        # rows make dq vanish) is rounding noise in both
        scale = rounded[finite].float().abs().max()
        error = (got.grad[finite].float() - rounded[finite].float()).abs().max()
        assert error <= 5e-2 * scale + 1e-3, (options, float(error), float(scale))


@pytest.mark.parametrize("magnitude", [1e-4, 1e3])
def test_tiny_and_huge_inputs_match_the_oracle(magnitude):
    """Scaling q and k by 1e-4 or 1e3 (logit scale 1e-8 .. 1e6): float32 fast path stays close to float64."""
    B, H, L, D = 1, 2, 48, 8
    q, k, v, _ = random_case(B, H, L, D, seed=5)
    q, k = q * magnitude, k * magnitude
    for causal in (False, True):
        valid = full_valid(None, causal, B, L, L)
        grad_out = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(9))
        errors = relative_errors(
            lambda q, k, v, causal=causal: normsoftmax_attention(q, k, v, is_causal=causal, gamma=2.0)[0],
            lambda q, k, v, valid=valid: oracle(q, k, v, valid, gamma=2.0),
            (q, k, v),
            grad_out,
            torch.float32,
        )
        assert max(errors) < 1e-3, errors


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    L=st.integers(9, 40),
    extra=st.integers(0, 6),
    D=st.integers(1, 9),
    causal=st.booleans(),
    pad=st.integers(0, 12),
    gamma=st.floats(0.25, 8.0),
    statistic=st.sampled_from(["std", "var"]),
    cap=st.sampled_from([None, 0.05, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_fast_path_equals_float64_oracle_property(B, H, L, extra, D, causal, pad, gamma, statistic, cap, seed):
    """Random shapes, KV-cache offsets, left padding, statistics and caps: float64 fast path == oracle."""
    S = L + extra
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (L, S, S))
    key_valid = torch.ones(B, S, dtype=torch.bool)
    key_valid[-1, : min(pad, S)] = False
    valid = full_valid(key_valid, causal, B, L, S)
    out, _ = normsoftmax_attention(q, k, v, attn_mask=key_valid[:, None, None, :], is_causal=causal, gamma=gamma,
                                   statistic=statistic, max_temperature=cap)
    expected = oracle(q, k, v, valid, gamma=gamma, statistic=statistic, max_temperature=cap)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-7)
    assert math.isfinite(float(out.sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "options",
    [dict(gamma=1e2), dict(gamma=1e-3), dict(eps=1e-14), dict(eps=1.0), dict(max_temperature=1e-2),
     dict(max_temperature=1e6, gamma=1e2, eps=1e-14)],
    ids=["gamma_max", "gamma_min", "eps_min", "eps_max", "cap_min", "mixed"],
)
def test_edges_of_the_allowed_ranges_stay_finite(dtype, options):
    """Every value the config accepts (normsoftmax.GAMMA_RANGE, EPS_RANGE, MAX_TEMPERATURE_RANGE edges) gives finite
    outputs and gradients, constant rows included, and float32 agrees with the oracle."""
    from hf_normsoftmax.normsoftmax import EPS_RANGE, GAMMA_RANGE, MAX_TEMPERATURE_RANGE

    assert GAMMA_RANGE == (1e-3, 1e2) and EPS_RANGE == (1e-14, 1.0) and MAX_TEMPERATURE_RANGE == (1e-2, 1e6)
    B, H, L, D = 2, 2, 40, 8
    q, k, v, key_valid = random_case(B, H, L, D, [40, 30], left=True, seed=11)
    k[0, 0] = k[0, 0, :1]  # a head with identical keys: constant rows
    mask = key_valid[:, None, None, :]
    for causal in (False, True):
        inputs = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out, _ = normsoftmax_attention(*inputs, attn_mask=mask, is_causal=causal, **options)
        out.float().sum().backward()
        assert torch.isfinite(out).all(), options
        # at these edges gradients are ill-conditioned (T down to sqrt(1e-14) / gamma): any float32 computation of
        # them carries large rounding, so only finiteness is held here; well-conditioned gradients are tested above
        _assert_gradients_are_the_float32_ones_rounded(inputs, mask, causal, options, close=False)
        if dtype == torch.float32:
            expected = oracle(q, k, v, full_valid(key_valid, causal, B, L, L), **options)
            torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
