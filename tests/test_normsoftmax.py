"""NormSoftmax op: forward against a plain reference, gradients, degenerate rows, dtypes, bad input, properties."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from source_imports import imported_roots

from hf_normsoftmax.normsoftmax import NormSoftmax, norm_softmax, normalize_logits

MODULE_PATH = Path(__file__).resolve().parents[1] / "hf_normsoftmax" / "normsoftmax.py"


def reference_normalize(x, dim=-1, mask=None, gamma=1.0, max_temperature=None, eps=1e-6, statistic="std"):
    """Plain autograd composition of the definition (population variance over valid entries), in float64."""
    x = x.double()
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.expand(x.shape)
    count = valid.sum(dim, keepdim=True).clamp(min=1).double()
    zeroed = torch.where(valid, x, 0.0)
    mean = zeroed.sum(dim, keepdim=True) / count
    centred = torch.where(valid, zeroed - mean, 0.0)
    var = centred.square().sum(dim, keepdim=True) / count
    spread = torch.sqrt(var + eps) if statistic == "std" else var + eps
    gamma = gamma.double() if isinstance(gamma, torch.Tensor) else gamma
    temperature = spread / gamma
    if max_temperature is not None:
        temperature = temperature.clamp(max=max_temperature)
    return torch.where(valid, centred / temperature, float("-inf"))


def reference_softmax(x, dim=-1, mask=None, **kwargs):
    z = reference_normalize(x, dim, mask, **kwargs)
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.expand(x.shape)
    probs = torch.softmax(torch.where(valid, z, -1e300), dim=dim)
    return torch.where(valid, probs, 0.0)


def finite(t):
    """-inf (masked entries) -> 0, so gradcheck's finite differences stay defined."""
    return torch.where(torch.isinf(t), torch.zeros_like(t), t)


def degenerate_batch(dtype=torch.float64):
    """Rows: generic, generic masked, one valid entry, constant valid entries, fully masked, constant + offset."""
    torch.manual_seed(0)
    x = torch.randn(6, 7, dtype=dtype)
    mask = torch.ones(6, 7, dtype=torch.bool)
    mask[1, [0, 3, 5]] = False
    mask[2] = False
    mask[2, 4] = True
    x[3] = 2.5
    mask[3, 6] = False
    mask[4] = False
    x[5] = 1e4
    return x, mask


CASES = [
    dict(),
    dict(gamma=2.5),
    dict(statistic="var"),
    dict(max_temperature=0.3),
    dict(gamma=3.0, max_temperature=0.5, statistic="var"),
    dict(eps=1e-2),
]


@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize("dim", [-1, 1, 0])
def test_forward_matches_reference(kwargs, dim):
    torch.manual_seed(1)
    x = torch.randn(4, 6, 5, dtype=torch.float64) * 3 + 1
    mask = torch.rand(4, 6, 5) > 0.3
    for m in (None, mask):
        got = normalize_logits(x, dim=dim, mask=m, **kwargs)
        want = reference_normalize(x, dim, m, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        p = norm_softmax(x, dim=dim, mask=m, **kwargs)
        torch.testing.assert_close(p, reference_softmax(x, dim, m, **kwargs), rtol=1e-12, atol=1e-14)


def test_unit_spread_and_gamma():
    x = torch.randn(3, 50, dtype=torch.float64) * 7 + 4
    z = normalize_logits(x, gamma=2.0, eps=1e-12)
    torch.testing.assert_close(z.mean(-1), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(z.std(-1, unbiased=False), torch.full((3,), 2.0, dtype=torch.float64))
    zv = normalize_logits(x, statistic="var", eps=1e-12)
    torch.testing.assert_close(zv, (x - x.mean(-1, keepdim=True)) / x.var(-1, unbiased=False, keepdim=True))


def test_temperature_cap():
    x = torch.tensor([[0.0, 10.0, 20.0], [0.0, 0.1, 0.2]], dtype=torch.float64)
    z = normalize_logits(x, max_temperature=1.0, eps=1e-12)
    # row 0: std 8.16 > cap -> divided by the cap; row 1: std 0.08 < cap -> normalised as usual
    torch.testing.assert_close(z[0], x[0] - 10.0)
    torch.testing.assert_close(z[1], (x[1] - 0.1) / x[1].std(unbiased=False))


def test_gamma_tensor_per_head():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    gamma = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).view(3, 1, 1)
    z = normalize_logits(x, gamma=gamma, eps=1e-12)
    for h in range(3):
        torch.testing.assert_close(z[:, h], normalize_logits(x[:, h], gamma=float(gamma[h]), eps=1e-12))


@pytest.mark.parametrize("kwargs", CASES[:5])
def test_gradcheck_generic_masked_and_degenerate_rows(kwargs):
    x, mask = degenerate_batch()
    x.requires_grad_(True)
    gamma = torch.rand(6, 1, dtype=torch.float64).add(0.5).requires_grad_(True)
    kwargs = {k: v for k, v in kwargs.items() if k != "gamma"}
    if kwargs.get("statistic") == "var":
        # d z / d x ~ gamma / eps on constant rows: with eps = 1e-6 the function bends on a 1e-3 scale, too
        # sharp for finite differences; the analytic gradient itself is compared at eps=1e-6 further down.
        kwargs["eps"] = 1e-2

    def normalize(x, gamma):
        return finite(normalize_logits(x, mask=mask, gamma=gamma, **kwargs))

    def softmax(x, gamma):
        return norm_softmax(x, mask=mask, gamma=gamma, **kwargs)

    for fn in (normalize, softmax):
        assert torch.autograd.gradcheck(fn, (x, gamma))
        assert torch.autograd.gradgradcheck(fn, (x, gamma), fast_mode=True)


def test_gradients_match_reference_composition():
    x, mask = degenerate_batch()
    x.requires_grad_(True)
    upstream = torch.randn(6, 7, dtype=torch.float64)
    for kwargs in CASES:
        got = torch.autograd.grad((norm_softmax(x, mask=mask, **kwargs) * upstream).sum(), x)[0]
        want = torch.autograd.grad((reference_softmax(x, mask=mask, **kwargs) * upstream).sum(), x)[0]
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_degenerate_rows_exact():
    x, mask = degenerate_batch(torch.float32)
    x.requires_grad_(True)
    p = norm_softmax(x, mask=mask)
    # one valid entry: probability 1 there, 0 elsewhere
    assert torch.equal(p[2], torch.eye(7)[4])
    # constant valid entries: exactly equal probabilities over the valid entries (also with a large offset)
    for row in (3, 5):
        valid = p[row][mask[row]]
        assert torch.all(valid == valid[0]) and torch.all(p[row][~mask[row]] == 0)
        assert abs(float(valid.detach().sum()) - 1) < 1e-6
    # fully masked row: exact zeros; -inf from normalize_logits
    assert torch.equal(p[4], torch.zeros(7))
    assert torch.all(normalize_logits(x, mask=mask)[4] == float("-inf"))
    (p * torch.randn(6, 7)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[4], torch.zeros(7))
    assert torch.all(x.grad[~mask] == 0)


def test_masked_slots_may_hold_inf_or_nan():
    x = torch.tensor([[1.0, float("-inf"), 3.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[True, False, True, False]])
    p = norm_softmax(x, mask=mask)
    assert torch.isfinite(p).all() and p[0, 1] == 0 and p[0, 3] == 0
    p[0, 0].backward()
    assert torch.isfinite(x.grad).all()


def test_mask_broadcasting():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 4, 4)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    p = norm_softmax(x, mask=causal)
    torch.testing.assert_close(p, norm_softmax(x, mask=causal.expand(2, 3, 4, 4)))
    assert torch.all(p[..., ~causal] == 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_use_float32_statistics(dtype):
    torch.manual_seed(4)
    # values ~300: their variance (~9e4) overflows float16, so half-precision statistics would give inf / nan
    x = (torch.randn(4, 64) * 300).to(dtype)
    mask = torch.rand(4, 64) > 0.2
    z = normalize_logits(x, mask=mask, gamma=2.0)
    p = norm_softmax(x, mask=mask, gamma=2.0)
    assert z.dtype == dtype and p.dtype == dtype
    torch.testing.assert_close(z.float(), normalize_logits(x.float(), mask=mask, gamma=2.0), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(p.float(), norm_softmax(x.float(), mask=mask, gamma=2.0), rtol=1e-2, atol=1e-3)
    upstream = torch.randn(4, 64)
    for fn in (normalize_logits, norm_softmax):
        x32 = x.float().requires_grad_(True)
        x16 = x.clone().requires_grad_(True)
        (fn(x16, mask=mask).float().nan_to_num(neginf=0.0) * upstream).sum().backward()
        (fn(x32, mask=mask).nan_to_num(neginf=0.0) * upstream).sum().backward()
        assert x16.grad.dtype == dtype and torch.isfinite(x16.grad).all()
        scale = x32.grad.abs().max()
        torch.testing.assert_close(x16.grad.float() / scale, x32.grad / scale, rtol=0, atol=2e-2)


def test_float64_stays_float64():
    x = torch.randn(3, 9, dtype=torch.float64) + 1e6  # offset: float32 would lose the spread's digits
    z = normalize_logits(x)
    assert z.dtype == torch.float64
    torch.testing.assert_close(z, reference_normalize(x), rtol=1e-9, atol=1e-9)


def test_fused_op_saves_only_its_input_and_row_statistics():
    # The composition keeps ~5 full-size intermediates alive for backward; the fused op keeps the input and
    # three numbers per row (mean, variance, inverse temperature).
    x = torch.randn(16, 1000, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        normalize_logits(x)
    assert sum(saved) == x.numel() + 3 * 16


def test_learnable_gamma_module():
    layer = NormSoftmax(dim=-1, gamma=2.0, learnable_gamma=True, gamma_shape=(3, 1, 1))
    assert list(dict(layer.named_parameters())) == ["scale"]
    assert not any("gamma" in k or "beta" in k for k in layer.state_dict())
    x = torch.randn(2, 3, 4, 5)
    mask = torch.rand(4, 5) > 0.3
    torch.testing.assert_close(layer(x, mask), norm_softmax(x, mask=mask, gamma=torch.full((3, 1, 1), 2.0)))
    (layer(x, mask) * torch.randn(2, 3, 4, 5)).sum().backward()
    assert layer.scale.grad is not None and layer.scale.grad.abs().sum() > 0
    fixed = NormSoftmax(gamma=1.5, statistic="var")
    assert list(fixed.parameters()) == [] and fixed.gamma == 1.5
    torch.testing.assert_close(fixed(x), norm_softmax(x, gamma=1.5, statistic="var"))


def test_compiles():
    x = torch.randn(4, 10, requires_grad=True)
    mask = torch.rand(4, 10) > 0.3
    compiled = torch.compile(norm_softmax, backend="aot_eager", fullgraph=True)
    got = compiled(x, -1, mask, 2.0)
    torch.testing.assert_close(got, norm_softmax(x, -1, mask, 2.0))
    g1 = torch.autograd.grad(got[:, 0].sum(), x)[0]
    g2 = torch.autograd.grad(norm_softmax(x, -1, mask, 2.0)[:, 0].sum(), x)[0]
    torch.testing.assert_close(g1, g2)


BAD_INPUTS = [
    (dict(input=torch.arange(6).view(2, 3)), TypeError, "input"),
    (dict(input=[1.0, 2.0]), TypeError, "input"),
    (dict(mask=torch.ones(2, 3)), TypeError, "mask"),
    (dict(mask=torch.ones(4, 3, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.ones(1, 2, 3, dtype=torch.bool)), ValueError, "mask"),
    (dict(gamma=0.0), ValueError, "gamma"),
    (dict(gamma=-1.0), ValueError, "gamma"),
    (dict(gamma=float("nan")), ValueError, "gamma"),
    (dict(gamma=float("inf")), ValueError, "gamma"),
    (dict(gamma="1"), TypeError, "gamma"),
    (dict(gamma=True), TypeError, "gamma"),
    (dict(gamma=torch.ones(2, 3)), ValueError, "gamma"),
    (dict(gamma=torch.tensor([[1.0], [-1.0]])), ValueError, "gamma"),
    (dict(gamma=torch.ones(2, 1, dtype=torch.int64)), TypeError, "gamma"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=-1e-6), ValueError, "eps"),
    (dict(max_temperature=0.0), ValueError, "max_temperature"),
    (dict(max_temperature=float("inf")), ValueError, "max_temperature"),
    (dict(statistic="mad"), ValueError, "statistic"),
    (dict(dim=2), ValueError, "dim"),
    (dict(dim=1.0), TypeError, "dim"),
]


@pytest.mark.parametrize("fn", [normalize_logits, norm_softmax])
@pytest.mark.parametrize("bad, error, name", BAD_INPUTS)
def test_bad_input_names_argument(fn, bad, error, name):
    kwargs = dict(input=torch.randn(2, 3), dim=-1)
    kwargs.update(bad)
    with pytest.raises(error, match=name):
        fn(**kwargs)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="gamma"):
        NormSoftmax(gamma=-2.0)
    with pytest.raises(ValueError, match="gamma_shape"):
        NormSoftmax(gamma_shape=(3, 1, 1))
    with pytest.raises(ValueError, match="statistic"):
        NormSoftmax(statistic="max")
    with pytest.raises(TypeError, match="learnable_gamma"):
        NormSoftmax(learnable_gamma="yes")


def test_module_imports_only_torch_and_stdlib():
    assert imported_roots(MODULE_PATH) - {"torch", "math", "collections", "typing", "__future__", "."} == set()


# ---------------------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------------------

PROPERTY_SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
rows = st.lists(st.floats(-50, 50, allow_nan=False, allow_infinity=False), min_size=2, max_size=12)


def spread_ok(values, mask=None):
    t = torch.tensor(values, dtype=torch.float64)
    if mask is not None:
        t = t[torch.tensor(mask)]
    return t.numel() >= 2 and float(t.var(unbiased=False)) > 1e-2


@PROPERTY_SETTINGS
@given(values=rows, shift=st.floats(-1e3, 1e3), gamma=st.floats(0.1, 10), statistic=st.sampled_from(["std", "var"]))
def test_property_shift_invariance(values, shift, gamma, statistic):
    x = torch.tensor(values, dtype=torch.float64)
    got = normalize_logits(x + shift, gamma=gamma, statistic=statistic)
    want = normalize_logits(x, gamma=gamma, statistic=statistic)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7 * (1 + abs(shift)))


@PROPERTY_SETTINGS
@given(values=rows, factor=st.floats(1e-2, 1e2), gamma=st.floats(0.1, 10))
def test_property_positive_scale_invariance(values, factor, gamma):
    assume(spread_ok(values))
    x = torch.tensor(values, dtype=torch.float64)
    eps = 1e-14  # tiny next to the smallest variance here (1e-2 * factor^2 >= 1e-6): invariance up to eps effects
    got = normalize_logits(factor * x, gamma=gamma, eps=eps)
    want = normalize_logits(x, gamma=gamma, eps=eps)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@PROPERTY_SETTINGS
@given(data=st.data(), gamma=st.floats(0.1, 20), cap=st.one_of(st.none(), st.floats(0.05, 5)))
def test_property_rows_sum_to_one_and_masked_zero(data, gamma, cap):
    values = data.draw(rows)
    mask = data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))
    x = torch.tensor(values, dtype=torch.float32)
    m = torch.tensor(mask)
    p = norm_softmax(x, mask=m, gamma=gamma, max_temperature=cap)
    assert torch.isfinite(p).all()
    assert torch.all(p[~m] == 0)
    assert torch.all(p >= 0)
    expected = 1.0 if any(mask) else 0.0
    assert math.isclose(float(p.sum()), expected, abs_tol=1e-5)
