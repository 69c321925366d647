"""sigmaReparam layers: function preservation, gradients, power-iteration bookkeeping, caching, conversion."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from source_imports import imported_roots
from torch import nn
from torch.utils.checkpoint import checkpoint

from hf_normsoftmax import sigma_reparam as sigma_reparam_module
from hf_normsoftmax.sigma_reparam import SigmaReparamConv2d, SigmaReparamLinear, SigmaReparamMixin, sigma_reparam_

MODULE_PATH = Path(__file__).resolve().parents[1] / "hf_normsoftmax" / "sigma_reparam.py"


class TinyConv1D(nn.Module):
    """Stand-in with the attributes and forward of transformers' GPT-2 Conv1D: weight stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        flat = x.view(-1, x.size(-1))
        out = torch.addmm(self.bias, flat, self.weight) if self.bias is not None else flat @ self.weight
        return out.view(size_out)


class SigmaReparamTinyConv1D(SigmaReparamMixin, TinyConv1D):
    weight_layout = "in_out"


def matrix_of(layer) -> torch.Tensor:
    w = layer.weight.detach()
    if layer.weight_layout == "in_out":
        return w.t()
    return w.reshape(w.shape[0], -1)


def make_layer(kind: str, dtype=torch.float32, bias=True):
    """(stock layer, input) for a layout; the stock layer is what gets converted."""
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(6, 5, bias=bias).to(dtype), torch.randn(3, 4, 6, dtype=dtype)
    if kind == "conv":
        return nn.Conv2d(3, 4, kernel_size=2, stride=2, bias=bias).to(dtype), torch.randn(2, 3, 6, 6, dtype=dtype)
    layer = TinyConv1D(5, 6).to(dtype)
    if not bias:
        layer.bias = None
    return layer, torch.randn(3, 4, 6, dtype=dtype)


REPARAM_CLASS = {"linear": SigmaReparamLinear, "conv": SigmaReparamConv2d, "conv1d": SigmaReparamTinyConv1D}
KINDS = list(REPARAM_CLASS)


def converted(kind, dtype=torch.float32, bias=True):
    stock, x = make_layer(kind, dtype, bias)
    layer = REPARAM_CLASS[kind].from_module(copy.deepcopy(stock))
    return stock, layer, x


def randomize_vectors(layer, seed=1):
    """Unit but random u, v: every power-iteration step then visibly moves them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.reparam_u.copy_(F.normalize(torch.randn(layer.reparam_u.shape, generator=g), dim=0))
        layer.reparam_v.copy_(F.normalize(torch.randn(layer.reparam_v.shape, generator=g), dim=0))


def one_step(layer, u):
    """One power-iteration step from u, as the reference: (u', v')."""
    w = matrix_of(layer).float()
    v_new = F.normalize(w @ u.float(), dim=0)
    return F.normalize(w.t() @ v_new, dim=0), v_new


def exact_output(layer, x, u, v):
    """The layer's output through the textbook formula with fixed u, v (autograd reaches weight and scale)."""
    w = layer.weight
    sigma = v @ (matrix_of_grad(layer) @ u)
    w_hat = layer.reparam_scale * w / sigma
    if layer.weight_layout == "out_in":
        return F.linear(x, w_hat, layer.bias)
    if layer.weight_layout == "conv":
        return layer._conv_forward(x, w_hat, layer.bias)
    out = x.reshape(-1, x.shape[-1]) @ w_hat
    if layer.bias is not None:
        out = out + layer.bias
    return out.view(*x.shape[:-1], -1)


def matrix_of_grad(layer):
    w = layer.weight
    return w.t() if layer.weight_layout == "in_out" else w.reshape(w.shape[0], -1)


# ---------------------------------------------------------------------------------------------------------------
# conversion preserves the function
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_conversion_leaves_outputs_unchanged(kind, bias):
    stock, layer, x = converted(kind, bias=bias)
    want = stock(x)
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.reparam_scale.detach(), layer.sigma, rtol=0, atol=0)
    sigma_svd = torch.linalg.matrix_norm(matrix_of(layer).double(), 2)
    torch.testing.assert_close(layer.reparam_scale.detach().double(), sigma_svd, rtol=1e-6, atol=0)


def test_real_transformers_conv1d_mixin():
    transformers_pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

    class SigmaReparamConv1D(SigmaReparamMixin, transformers_pytorch_utils.Conv1D):
        weight_layout = "in_out"

    torch.manual_seed(0)
    stock = transformers_pytorch_utils.Conv1D(nf=10, nx=6)
    x = torch.randn(2, 5, 6)
    want = stock(x)
    layer = SigmaReparamConv1D.from_module(stock)
    assert layer is stock and layer.reparam_u.shape == (6,) and layer.reparam_v.shape == (10,)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)
    layer.eval()
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)
    plain = layer.to_plain()
    assert type(plain) is transformers_pytorch_utils.Conv1D
    torch.testing.assert_close(plain(x), layer(x))
    built = SigmaReparamConv1D(10, 6)  # the mixin passes constructor arguments through
    assert built.weight.shape == (6, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_keys_parameters_and_identity(kind):
    stock, _, _ = converted(kind)
    stock_keys = list(stock.state_dict())
    weight, bias = stock.weight, stock.bias
    layer = REPARAM_CLASS[kind].from_module(stock)
    assert layer is stock and layer.weight is weight and layer.bias is bias
    assert list(layer.state_dict()) == stock_keys + ["reparam_scale", "reparam_u", "reparam_v"]
    assert not any("gamma" in k or "beta" in k for k in layer.state_dict())
    assert layer.reparam_scale.dim() == 0 and layer.reparam_scale.requires_grad
    assert REPARAM_CLASS[kind].from_module(layer) is layer  # already converted: unchanged


# ---------------------------------------------------------------------------------------------------------------
# sigma and the power iteration
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_sigma_converges_from_random_vectors(kind):
    _, layer, _ = converted(kind)
    randomize_vectors(layer)
    exact = torch.linalg.matrix_norm(matrix_of(layer), 2)
    assert abs(float(layer.sigma) / float(exact) - 1) > 0.01  # random vectors: visibly off
    layer.power_iteration_(30)
    assert abs(float(layer.sigma) / float(exact) - 1) < 0.01


def test_sigma_converges_during_training():
    torch.manual_seed(3)
    layer = SigmaReparamLinear(32, 48)
    randomize_vectors(layer)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(16, 32)
    for _ in range(40):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
    exact = torch.linalg.matrix_norm(layer.weight.detach(), 2)
    assert abs(float(layer.sigma) / float(exact) - 1) < 0.01


@pytest.fixture(params=["host", "branch-free"])
def decision(request, monkeypatch):
    """Runs a test with the CPU shortcut (flag read on the host) and with the accelerator / compile path."""
    if request.param == "branch-free":
        monkeypatch.setattr(sigma_reparam_module, "_HOST_DECIDED_DEVICES", ())
    return request.param


@pytest.mark.parametrize("optimizer_kwargs", [dict(fused=True), dict(foreach=True), dict(foreach=False)])
def test_exactly_one_step_per_weight_change(optimizer_kwargs, decision):
    """Fused AdamW bumps no version counter: the change must still be seen, and seen once."""
    _, layer, x = converted("linear")
    randomize_vectors(layer)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, **optimizer_kwargs)
    layer.train()
    for _ in range(3):
        u_before = layer.reparam_u.clone()
        expected_u, expected_v = one_step(layer, u_before)
        for _ in range(3):  # k forwards per optimizer step: one power-iteration step in total
            layer(x).sum().backward()
            torch.testing.assert_close(layer.reparam_u, expected_u, rtol=0, atol=1e-6)
            torch.testing.assert_close(layer.reparam_v, expected_v, rtol=0, atol=1e-6)
        optimizer.step()
        optimizer.zero_grad()
    # eval forwards never step
    layer.eval()
    u_before = layer.reparam_u.clone()
    layer(x)
    assert torch.equal(layer.reparam_u, u_before)


def test_no_step_when_weights_do_not_change(decision):
    _, layer, x = converted("conv1d")
    u, v = layer.reparam_u.clone(), layer.reparam_v.clone()
    for _ in range(4):
        layer(x)
    assert torch.equal(layer.reparam_u, u) and torch.equal(layer.reparam_v, v)


def test_weight_replaced_by_new_parameter_triggers_a_step():
    _, layer, x = converted("linear")
    layer(x)
    u = layer.reparam_u.clone()
    layer.weight = nn.Parameter(layer.weight.detach() * 1.5 + 0.01)
    layer(x)
    assert not torch.equal(layer.reparam_u, u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_helper_is_bitwise_f_normalize(dtype):
    """The CPU fast path's normalisation must give F.normalize's bits (checks compare vectors exactly)."""
    from hf_normsoftmax.sigma_reparam_ops import _normalize

    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(n, generator=g, dtype=dtype) * 10.0**e for n in (1, 3, 8, 17, 384, 1536) for e in (-6, 0, 6)]
    vectors += [torch.zeros(5, dtype=dtype), torch.full((4,), 1e-14, dtype=dtype)]
    for vector in vectors:
        assert torch.equal(_normalize(vector), F.normalize(vector, dim=0))
    for bad in (torch.tensor([1.0, float("nan")], dtype=dtype), torch.tensor([float("inf"), 1.0], dtype=dtype)):
        torch.testing.assert_close(_normalize(bad), F.normalize(bad, dim=0), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_host_decided_and_branch_free_steps_are_bitwise_equal(kind, dtype, monkeypatch):
    """The CPU path (decisions read on the host, no work when the weight did not change) and the branch-free path
    of accelerators and torch.compile must store the same bits and use the same sigma: a run may switch between
    them."""
    _, host, x = converted(kind, dtype=dtype)
    randomize_vectors(host)
    branch_free = copy.deepcopy(host)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        used = []
        for layer, devices in ((host, ("cpu",)), (branch_free, ())):
            monkeypatch.setattr(sigma_reparam_module, "_HOST_DECIDED_DEVICES", devices)
            # a training forward's vectors: with a step, then with nothing to do
            used.append([layer._reparam_vectors(store=True)[:3] for _ in range(2)])
            layer(x)
        for a, b in zip(*used, strict=True):
            assert all(torch.equal(t, u) for t, u in zip(a, b, strict=True)), step
        for (name, a), b in zip(host.state_dict().items(), branch_free.state_dict().values(), strict=True):
            assert torch.equal(a, b), (step, name)
        with torch.no_grad():
            noise = (torch.randn(host.weight.shape, generator=g) * 0.05).to(dtype)
            host.weight.add_(noise)
            branch_free.weight.add_(noise)


@pytest.mark.parametrize("training", [True, False])
def test_weight_held_as_plain_attribute(training):
    """Parameters are read from _parameters for speed; a weight kept elsewhere (as hooks do) still works."""
    _, layer, x = converted("linear")
    randomize_vectors(layer)
    weight = layer.weight.detach().clone() * 1.1
    del layer._parameters["weight"]
    layer.weight = weight  # a plain tensor attribute now
    layer.train(training)
    u, v = layer.reparam_u.clone(), layer.reparam_v.clone()
    y = layer(x)
    if training:
        u, v = layer.reparam_u.clone(), layer.reparam_v.clone()
    else:  # eval uses the step a training forward would take, without storing it
        assert torch.equal(layer.reparam_u, u)
        u, v = one_step(layer, u)
    torch.testing.assert_close(y, exact_output(layer, x, u, v), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_gradients_match_exact_formula_with_fixed_vectors(kind, training, fused):
    _, layer, x = converted(kind)
    layer.fused_cpu_matmul = fused
    randomize_vectors(layer)
    with torch.no_grad():
        layer.reparam_scale.mul_(1.3)  # W_hat != W, so both gradient terms matter
    x = x.requires_grad_(True)
    layer.train(training)
    u_before = layer.reparam_u.clone()
    y = layer(x)
    u, v = layer.reparam_u.clone(), layer.reparam_v.clone()  # after this forward's step, if any
    if not training:  # eval: the same step, not stored
        assert torch.equal(u, u_before)
        u, v = one_step(layer, u)
    upstream = torch.randn_like(y)
    params = [x, layer.weight, layer.reparam_scale, layer.bias]
    got = torch.autograd.grad(y, params, upstream)
    want_y = exact_output(layer, x, u, v)
    want = torch.autograd.grad(want_y, params, upstream)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_gradcheck_module(kind):
    """gradcheck / gradgradcheck of the layer's unfused math as a function of x, W, s and bias (u, v fixed; a
    forward would re-derive them from a perturbed weight, so the layer's own _ScaledWeight + computation)."""
    from hf_normsoftmax.sigma_reparam_ops import _ScaledWeight

    _, layer, x = converted(kind, dtype=torch.float64)
    randomize_vectors(layer)
    u, v = layer.reparam_u.clone(), layer.reparam_v.clone()
    args = (
        x[:1].clone().requires_grad_(True),
        layer.weight.detach().clone().requires_grad_(True),
        (layer.reparam_scale.detach() * 1.2).requires_grad_(True),
        layer.bias.detach().clone().requires_grad_(True),
    )

    def fn(x, weight, scale, bias):
        matrix = weight.t() if layer.weight_layout == "in_out" else weight.reshape(weight.shape[0], -1)
        sigma = torch.dot(torch.mv(matrix.detach().t(), v), u)  # precomputed, as the power iteration does
        weight_hat = _ScaledWeight.apply(weight, scale, u, v, sigma, layer.weight_layout)
        return layer._forward_with(x, weight_hat, bias)

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("given_w_mm", [False, True])
def test_float64_gradcheck_fused_training_op(layout, bias, given_w_mm):
    """The CPU training op (scale / sigma folded into the matmul), with sigma = v^T W u evaluated at each W."""
    from hf_normsoftmax.sigma_reparam_ops import _ReparamMatmul

    torch.manual_seed(4)
    out_features, in_features = 5, 4
    shape = (out_features, in_features) if layout == "out_in" else (in_features, out_features)
    weight = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    u = F.normalize(torch.randn(in_features, dtype=torch.float64), dim=0)
    v = F.normalize(torch.randn(out_features, dtype=torch.float64), dim=0)
    x = torch.randn(3, in_features, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_features, dtype=torch.float64, requires_grad=True) if bias else None

    def fn(x, weight, scale, *maybe_bias):
        matrix = weight.detach() if layout == "out_in" else weight.detach().t()
        sigma = float(v @ (matrix @ u))
        w_mm = (weight.detach().t() if layout == "out_in" else weight.detach()) if given_w_mm else None
        state = (u, v, scale.item() / sigma, sigma, layout, w_mm)
        return _ReparamMatmul.apply(x, weight, maybe_bias[0] if maybe_bias else None, scale, state)

    args = (x, weight, scale) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize(
    "kind, input_dims", [(kind, dims) for kind in ("linear", "conv1d") for dims in (2, 3, 4)] + [("conv", 4)]
)
def test_float64_training_forward_and_gradients_match_plain_formula(kind, input_dims):
    """The CPU training path (fast power iteration, then the fused matmul or the scaled weight) in float64, against
    the textbook formula with the u, v that forward used: outputs and every gradient, to float64 rounding."""
    _, layer, x = converted(kind, dtype=torch.float64)
    randomize_vectors(layer)
    with torch.no_grad():
        layer.reparam_scale.mul_(0.8)
    if kind != "conv":
        x = x.reshape(-1, x.shape[-1]) if input_dims == 2 else x.reshape(2, 3, 2, -1) if input_dims == 4 else x
    x = x.clone().requires_grad_(True)
    y = layer(x)  # takes one power-iteration step (random u, v)
    u, v = layer.reparam_u.clone(), layer.reparam_v.clone()
    upstream = torch.randn_like(y)
    params = [x, layer.weight, layer.reparam_scale, layer.bias]
    got = torch.autograd.grad(y, params, upstream)
    want_y = exact_output(layer, x, u, v)
    want = torch.autograd.grad(want_y, params, upstream)
    assert y.shape == want_y.shape
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_and_unfused_training_paths_agree(kind):
    _, fused, x = converted(kind)
    randomize_vectors(fused)
    unfused = copy.deepcopy(fused)
    unfused.fused_cpu_matmul = False
    x = x.requires_grad_(True)
    outputs, grads = [], []
    for layer in (fused, unfused):
        y = layer(x)
        outputs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), [x, layer.weight, layer.reparam_scale, layer.bias]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.reparam_u, unfused.reparam_u)


def test_two_forwards_then_one_backward():
    _, layer, x = converted("linear")
    randomize_vectors(layer)
    loss = layer(x).sum() + layer(x * 2).sum()
    loss.backward()  # the buffers were written in between: autograd must hold copies
    assert layer.weight.grad is not None


# ---------------------------------------------------------------------------------------------------------------
# gradient accumulation, checkpointing, compile
# ---------------------------------------------------------------------------------------------------------------


def small_model(dtype=torch.float64):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    sigma_reparam_(model)
    for i, layer in enumerate(m for m in model if isinstance(m, SigmaReparamMixin)):
        randomize_vectors(layer, seed=10 + i)  # far from converged: an extra step would change sigma visibly
    return model


def grads_of(model):
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_accumulation_equals_big_batch(decision):
    big, accumulated = small_model(), small_model()
    x = torch.randn(12, 6, dtype=torch.float64)
    target = torch.randn(12, 3, dtype=torch.float64)
    F.mse_loss(big(x), target, reduction="sum").backward()
    for chunk in torch.arange(12).split([5, 3, 4]):
        F.mse_loss(accumulated(x[chunk]), target[chunk], reduction="sum").backward()
    for a, b in zip(grads_of(big), grads_of(accumulated), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(big.buffers(), accumulated.buffers(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_with_same_vectors(use_reentrant, decision):
    plain, checkpointed = small_model(), small_model()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    plain(x).square().sum().backward()
    checkpoint(checkpointed, x, use_reentrant=use_reentrant).square().sum().backward()
    for a, b in zip(grads_of(plain), grads_of(checkpointed), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(plain.buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(a, b)


def test_torch_compile_matches_eager():
    eager = small_model(torch.float32)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)  # fullgraph: no graph breaks
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, compiled_model)]
    x = torch.randn(5, 6)
    for _ in range(3):
        for model, optimizer in zip((eager, compiled), optimizers, strict=True):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
    for a, b in zip(eager.state_dict().values(), compiled_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    compiled(x).sum().backward()  # the last optimizer step is taken into account here ...
    buffers = [b.clone() for b in compiled_model.buffers()]
    compiled(x).sum().backward()  # ... and not a second time
    assert all(torch.equal(a, b) for a, b in zip(buffers, compiled_model.buffers(), strict=True))
    eager(x)  # same catch-up step in the eager model
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# eval cache
# ---------------------------------------------------------------------------------------------------------------


def test_eval_cache_hits_and_invalidation():
    _, layer, x = converted("linear")
    layer.eval()
    with torch.no_grad():
        first = layer.effective_weight()
        assert layer.effective_weight() is first  # cached
        layer.weight.add_(0.1)  # in-place change: version counter
        second = layer.effective_weight()
        assert second is not first
        torch.testing.assert_close(second, layer.reparam_scale / layer.sigma * layer.weight)
        layer.reparam_scale.mul_(2)
        third = layer.effective_weight()
        torch.testing.assert_close(third, 2 * second)
        layer.reparam_u.mul_(-1)  # buffers are part of the key
        assert layer.effective_weight() is not third
        cached = layer.effective_weight()
    layer.eval()  # a mode switch clears it
    with torch.no_grad():
        assert layer.effective_weight() is not cached
    # with grad needed, nothing is cached and the result is differentiable
    assert layer.effective_weight().requires_grad
    layer.weight.requires_grad_(False)
    layer.reparam_scale.requires_grad_(False)
    assert layer.effective_weight() is layer.effective_weight()  # frozen weights: cacheable with grad mode on


def test_eval_cache_sees_fused_optimizer_steps_and_reloads():
    _, layer, x = converted("linear")
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    layer.eval()
    with torch.no_grad():
        before = layer(x)
    layer(x).square().sum().backward()  # eval mode with grad: fine-tuning without dropout
    optimizer.step()  # fused: no version counter moves
    with torch.no_grad():
        after = layer(x)
    assert not torch.allclose(before, after)
    # eval takes the pending power-iteration step (without storing it): the vectors of the current weight
    torch.testing.assert_close(after, exact_output(layer, x, *one_step(layer, layer.reparam_u)).detach())
    # load_state_dict and replacing the weight object also invalidate
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.weight.mul_(0.5)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other(x))
        layer.weight = nn.Parameter(layer.weight * 3)
        torch.testing.assert_close(layer(x), exact_output(layer, x, *one_step(layer, layer.reparam_u)))


def test_inference_mode_cache_is_not_reused_for_autograd():
    _, layer, x = converted("linear")
    layer.eval()
    layer.weight.requires_grad_(False)
    layer.reparam_scale.requires_grad_(False)
    with torch.inference_mode():
        layer(x)
    x = x.requires_grad_(True)
    layer(x).sum().backward()  # would fail if the inference-mode tensor were saved for backward
    assert x.grad is not None


# ---------------------------------------------------------------------------------------------------------------
# state dict, export, dtypes, meta
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pending_step", [True, False])
def test_state_dict_round_trip_continues_training_identically(pending_step):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6), TinyConv1D(4, 6))
    sigma_reparam_(model, layer_types=(SigmaReparamLinear, SigmaReparamTinyConv1D))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    x = torch.randn(8, 6)

    def train_step(m, opt):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()

    for _ in range(3):
        train_step(model, optimizer)
    if not pending_step:
        model(x)  # the power iteration has caught up with the last optimizer step
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    torch.manual_seed(99)  # a differently initialised fresh model
    fresh = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6), TinyConv1D(4, 6))
    sigma_reparam_(fresh, layer_types=(SigmaReparamLinear, SigmaReparamTinyConv1D))
    fresh.load_state_dict(saved["model"])
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2, fused=True)
    fresh_optimizer.load_state_dict(saved["optimizer"])
    for m in (model, fresh):
        m.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    for m in (model, fresh):
        m.train()
    for _ in range(3):
        train_step(model, optimizer)
        train_step(fresh, fresh_optimizer)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", KINDS)
def test_to_plain_exports_effective_weight(kind):
    stock, layer, x = converted(kind)
    randomize_vectors(layer)
    with torch.no_grad():
        layer.reparam_scale.mul_(0.7)
    layer.eval()
    plain = layer.to_plain()
    assert type(plain) is type(stock)
    assert set(plain.state_dict()) == set(stock.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x), rtol=1e-6, atol=1e-6)
        plain.weight.zero_()
    assert layer.weight.abs().sum() > 0  # nothing shared


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(dtype):
    stock, layer, x = converted("linear", dtype=dtype)
    assert layer.reparam_u.dtype == dtype and layer.reparam_scale.dtype == dtype
    assert layer.sigma.dtype == torch.float32
    exact = torch.linalg.matrix_norm(layer.weight.float(), 2)
    torch.testing.assert_close(layer.sigma, exact, rtol=5e-3, atol=0)
    torch.testing.assert_close(layer(x).float(), stock(x).float(), rtol=2e-2, atol=2e-2)
    layer(x).float().square().sum().backward()
    assert layer.weight.grad.dtype == dtype and torch.isfinite(layer.weight.grad).all()
    layer.power_iteration_(3)
    torch.testing.assert_close(layer.sigma, exact, rtol=5e-3, atol=0)


def test_bf16_autocast_training_keeps_power_iteration_in_float32():
    _, layer, x = converted("linear")
    randomize_vectors(layer)
    reference = copy.deepcopy(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    reference(x)
    torch.testing.assert_close(layer.reparam_u, reference.reparam_u, rtol=0, atol=1e-6)


def test_meta_device_construction_and_materialisation():
    with torch.device("meta"):
        layer = SigmaReparamLinear(6, 4)
    assert layer.reparam_u.is_meta
    with pytest.raises(RuntimeError, match="meta"):
        layer.reset_reparam()
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 6))
        layer.bias.zero_()
    layer.reset_reparam()
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=0, atol=1e-6)
    stock = nn.Linear(6, 4, device="meta")
    assert SigmaReparamLinear.from_module(stock).reparam_scale.is_meta


def test_non_finite_weights():
    stock = nn.Linear(4, 3)
    with torch.no_grad():
        stock.weight[0, 0] = float("nan")  # e.g. uninitialised memory before a checkpoint is loaded
    layer = SigmaReparamLinear.from_module(stock)  # conversion defers initialisation ...
    with pytest.raises(ValueError, match="inf or nan"):
        layer.reset_reparam()  # ... and an explicit reset refuses
    with torch.no_grad():
        layer.weight.normal_()
    layer.reset_reparam()
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-6)


def test_zero_weight_stays_finite():
    layer = SigmaReparamLinear(4, 3)
    with torch.no_grad():
        layer.weight.zero_()
    layer.reset_reparam()
    x = torch.randn(2, 4)
    y = layer(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# sigma_reparam_
# ---------------------------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, 2)
        self.query = nn.Linear(8, 8)
        self.key = nn.Linear(8, 8)
        self.attention = nn.MultiheadAttention(8, 2)  # out_proj is a Linear subclass it calls directly: skipped
        self.custom = type("MyLinear", (nn.Linear,), {})(8, 8)
        self.head = nn.Linear(8, 2)
        self.tied = nn.Linear(8, 2)
        self.tied.weight = self.head.weight
        self.shared = self.query


def test_sigma_reparam_selection_and_tying():
    model = Block()
    names = sigma_reparam_(model)
    assert names == ["patch", "query", "key", "head", "tied"]
    assert isinstance(model.patch, SigmaReparamConv2d) and type(model.custom).__name__ == "MyLinear"
    assert type(model.attention.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert model.tied.weight is model.head.weight and model.shared is model.query
    assert sigma_reparam_(model) == []  # already converted


def test_sigma_reparam_include_exclude():
    model = Block()
    assert sigma_reparam_(model, include=["q*", "k*", "patch"], exclude="key") == ["patch", "query"]
    model = Block()
    assert sigma_reparam_(
        model,
        include=lambda name, m: m.out_features == 2 if isinstance(m, nn.Linear) else False,
        layer_types=SigmaReparamLinear,
    ) == ["head", "tied"]
    model = Block()
    assert sigma_reparam_(model, exclude=lambda name, m: isinstance(m, nn.Conv2d)) == ["query", "key", "head", "tied"]


def test_whole_model_conversion_preserves_outputs():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 4, 2, 2), nn.Flatten(), nn.Linear(36, 10), nn.ReLU(), nn.Linear(10, 3))
    x = torch.randn(2, 3, 6, 6)
    want = model(x)
    assert len(sigma_reparam_(model)) == 3
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(TypeError, match="Linear"):
        SigmaReparamLinear.from_module(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="include"):
        sigma_reparam_(Block(), include=3)
    with pytest.raises(TypeError, match="layer_types"):
        sigma_reparam_(Block(), layer_types=(nn.Linear,))
    with pytest.raises(TypeError, match="model"):
        sigma_reparam_("model")
    with pytest.raises(ValueError, match="steps"):
        SigmaReparamLinear(2, 2).power_iteration_(-1)

    class NoLayout(SigmaReparamMixin, nn.Linear):
        pass

    with pytest.raises(ValueError, match="weight_layout"):
        NoLayout(2, 2)

    class WrongLayout(SigmaReparamMixin, nn.Linear):
        weight_layout = "conv"

    with pytest.raises(ValueError, match="weight_layout"):
        WrongLayout(2, 2)


def test_module_imports_only_torch_and_stdlib():
    allowed = {"torch", "copy", "fnmatch", "collections", "typing", "__future__", "."}
    for path in (MODULE_PATH, MODULE_PATH.with_name("sigma_reparam_ops.py")):  # the layers and their numerics
        assert imported_roots(path) - allowed == set(), path.name


# ---------------------------------------------------------------------------------------------------------------
# zero (plain) layers, divergence, stale eval, deterministic buffers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_zero_initialised_layer_learns_like_its_stock_twin(kind, decision):
    stock, _ = make_layer(kind)
    with torch.no_grad():
        stock.weight.zero_()  # zero-initialised output projection
    layer = REPARAM_CLASS[kind].from_module(copy.deepcopy(stock))
    assert float(layer.sigma) == 0.0 and float(layer.reparam_scale) == 0.0
    _, x = make_layer(kind)
    target = torch.randn_like(stock(x))
    for model in (stock, layer):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(20):
            optimizer.zero_grad()
            (model(x) - target).square().mean().backward()
            optimizer.step()
    with torch.no_grad():
        grown = layer.effective_weight().abs().max()
        assert grown > 0.3 * stock.weight.abs().max() > 0.05  # same order (the scale grows by ~lr per step)
        assert float(layer.reparam_scale) > 0  # woken: a sigmaReparam layer from then on
        assert abs(float(layer.sigma) / float(torch.linalg.matrix_norm(matrix_of(layer), 2)) - 1) < 0.05


def test_plain_layer_is_its_stock_layer_and_wakes_with_the_same_function():
    stock = nn.Linear(6, 4)
    with torch.no_grad():
        stock.weight.zero_()
    layer = SigmaReparamLinear.from_module(copy.deepcopy(stock))
    x = torch.randn(5, 6)
    layer(x).square().sum().backward()
    stock(x).square().sum().backward()
    assert torch.equal(layer.weight.grad, stock.weight.grad)  # the gradient of the stock layer
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 6))
    layer.eval()
    with torch.no_grad():
        before = layer(x)  # eval: W_hat = W, nothing stored
    assert float(layer.reparam_scale) == 0.0
    torch.testing.assert_close(before, F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    layer.train()
    with torch.no_grad():
        woken = layer(x)  # the first training forward wakes it: scale = sigma, same function
    torch.testing.assert_close(woken, before, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.reparam_scale, torch.linalg.matrix_norm(layer.weight, 2), rtol=1e-6, atol=0)


def test_diverging_training_gives_non_finite_loss_not_an_error():
    torch.manual_seed(0)
    x, target = torch.randn(64, 8), torch.randn(64, 4)
    layer = SigmaReparamLinear(8, 4)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e4)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert not all(torch.isfinite(torch.tensor(losses)))  # divergence shows as inf / nan, like a stock layer


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [True, False])
def test_out_of_range_scale_and_non_finite_weights_give_non_finite_outputs(kind, training):
    _, layer, x = converted(kind)
    layer.train(training)
    with torch.no_grad():
        layer.reparam_scale.fill_(3e38)
        layer.weight.mul_(1e-4)  # s / sigma beyond float32
    y = layer(x)
    assert not torch.isfinite(y).all()
    y.sum().backward()
    _, layer, x = converted(kind)
    layer.train(training)
    with torch.no_grad():
        layer.weight[0].fill_(float("inf"))
    assert not torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_eval_never_uses_a_stale_sigma(kind):
    stock, layer, x = converted(kind)
    layer.eval()
    with torch.no_grad():
        layer(x)
        layer.effective_weight()
        layer.weight.data.copy_(torch.randn_like(layer.weight))  # .data: no version bump, no optimizer step
        edited = REPARAM_CLASS[kind].from_module(copy.deepcopy(stock))
        edited.weight.copy_(layer.weight)
        edited.reset_reparam()
        u, v = layer.reparam_u.clone(), layer.reparam_v.clone()
        y = layer(x)
        assert torch.equal(layer.reparam_u, u) and torch.equal(layer.reparam_v, v)  # eval stores nothing
        # the vectors of one power-iteration step for the new weight, as the next training forward uses
        torch.testing.assert_close(y, exact_output(layer, x, *one_step(layer, u)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.effective_weight(), exact_weight_hat(layer, *one_step(layer, u)))
        # bounded like the edited layer: W_hat's spectral norm is the scale
        assert y.abs().max() < 10 * edited(x).abs().max() + 10


def exact_weight_hat(layer, u, v):
    return layer.reparam_scale * layer.weight / (v @ (matrix_of(layer) @ u))


@pytest.mark.parametrize("kind", KINDS)
def test_buffers_are_sign_fixed_top_singular_vectors(kind):
    _, layer, x = converted(kind)
    matrix = matrix_of(layer).double()
    left, singular, right = torch.linalg.svd(matrix)
    v, u = layer.reparam_v.double(), layer.reparam_u.double()
    assert v.abs().argmax() == v.argmax()  # the largest-magnitude entry is positive: a deterministic sign
    torch.testing.assert_close(v, left[:, 0] * torch.sign(left[:, 0][v.abs().argmax()]), rtol=0, atol=1e-6)
    torch.testing.assert_close(u, right[0] * torch.sign(left[:, 0][v.abs().argmax()]), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.sigma.double(), singular[0], rtol=1e-6, atol=0)  # exact at init
    # a second init from the same weights (another object, a negated copy) gives the same / mirrored buffers
    again = type(layer).from_module(copy.deepcopy(make_layer(kind)[0]))
    assert torch.equal(again.reparam_u, layer.reparam_u) and torch.equal(again.reparam_v, layer.reparam_v)
    negated = copy.deepcopy(again)
    with torch.no_grad():
        negated.weight.neg_()
    negated.reset_reparam()
    assert torch.equal(negated.reparam_v, layer.reparam_v)  # v keeps its sign convention, u flips
    torch.testing.assert_close(negated.reparam_u, -layer.reparam_u, rtol=0, atol=1e-7)


def test_variant_init_from_the_same_weights_gives_identical_exact_buffers(tmp_path):
    """Buffers are a function of the weights: two loads of one stock checkpoint (different seeds and thread
    counts) give the same u, v, sign-fixed, and sigma is the exact spectral norm at init."""
    from test_models_common import TINY_GPT2
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_normsoftmax as H

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**TINY_GPT2)).save_pretrained(tmp_path)
    threads = torch.get_num_threads()
    loaded = []
    for seed, n_threads in ((1, 1), (2, 2)):
        torch.manual_seed(seed)
        torch.set_num_threads(n_threads)
        try:
            loaded.append(H.NormSoftmaxGPT2LMHeadModel.from_pretrained(tmp_path, sigma_reparam=True))
        finally:
            torch.set_num_threads(threads)
    first, second = (dict(m.named_buffers()) for m in loaded)
    reparam = [name for name in first if name.endswith(("reparam_u", "reparam_v"))]
    assert len(reparam) >= 10
    for name in reparam:
        assert torch.equal(first[name], second[name]), name
    for name, layer in loaded[0].named_modules():
        if isinstance(layer, SigmaReparamMixin):
            v = layer.reparam_v
            assert v[v.abs().argmax()] > 0, name
            exact = torch.linalg.matrix_norm(matrix_of(layer).double(), 2)
            torch.testing.assert_close(layer.sigma.double(), exact, rtol=1e-6, atol=0)
            torch.testing.assert_close(layer.reparam_scale.detach().double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_inference_forward_is_the_fused_forward_bitwise(kind):
    """Without grad mode the fused CPU forward calls addmm directly: the same bits as through autograd."""
    _, layer, x = converted(kind)
    randomize_vectors(layer)
    with torch.no_grad():
        layer.reparam_scale.mul_(1.3)
    for training in (True, False):
        layer.train(training)
        with_grad = layer(x)
        with torch.no_grad():
            assert torch.equal(layer(x), with_grad.detach())


def test_weight_below_the_normalisation_floor_stays_plain_without_resetting_each_forward(monkeypatch):
    layer = SigmaReparamLinear(6, 4)
    with torch.no_grad():
        layer.weight.fill_(1e-20)  # nonzero, but too small for unit power-iteration vectors
    layer.reset_reparam()
    assert float(layer.reparam_scale) == 0.0 and not layer.reparam_u.any()
    resets = []
    monkeypatch.setattr(SigmaReparamLinear, "reset_reparam", lambda self: resets.append(1))
    x = torch.randn(3, 6)
    for _ in range(3):
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    assert not resets  # plain: W_hat = W, and no eigendecomposition per forward


def _off_the_allocators_alignment(tensor: torch.Tensor, offset: int = 3) -> torch.Tensor:
    """A copy of ``tensor`` starting ``offset`` elements into a fresh allocation: not on a 16-byte boundary, as
    tensors mapped from a safetensors file often are."""
    moved = torch.empty(tensor.numel() + offset, dtype=tensor.dtype)[offset:].view(tensor.shape)
    moved.copy_(tensor)
    assert moved.data_ptr() % 16 != 0
    return moved


@pytest.mark.parametrize("pending_step", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_weight_and_buffers_off_the_allocators_alignment_give_the_same_bits(kind, pending_step):
    """A checkpoint loaded by mapping the file gives the layer a weight (and buffers) at an arbitrary offset, where
    CPU matrix-vector, dot and single-row products round differently: the loaded layer must still compute the
    bits of the layer that was saved (eval after training in one process == eval after loading in another)."""
    torch.manual_seed(0)
    stock = {"linear": lambda: nn.Linear(48, 40), "conv": lambda: nn.Conv2d(3, 8, kernel_size=4, stride=4),
             "conv1d": lambda: TinyConv1D(40, 48)}[kind]()
    layer = REPARAM_CLASS[kind].from_module(stock)
    inputs = [torch.randn(2, 3, 8, 8), torch.randn(1, 3, 4, 4)] if kind == "conv" else [torch.randn(5, 48),
                                                                                         torch.randn(1, 48)]
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(2):
        layer(inputs[0]).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    if not pending_step:
        layer(inputs[0])  # the power iteration catches up with the last optimizer step
    layer.eval()
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.data = _off_the_allocators_alignment(twin.weight.data)
        twin.reparam_u = _off_the_allocators_alignment(twin.reparam_u)
        twin.reparam_v = _off_the_allocators_alignment(twin.reparam_v)
    with torch.no_grad():
        for x in inputs:
            assert torch.equal(twin(x), layer(x))
        assert torch.equal(twin.sigma, layer.sigma)
        assert torch.equal(twin.effective_weight(), layer.effective_weight())
    for x in inputs:
        assert torch.equal(twin(x), layer(x))  # grad mode: the autograd route
    for module in (layer, twin):  # training goes on with the same steps and gradients
        module.train()
        module(inputs[0]).square().mean().backward()
    for (name, a), b in zip(layer.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for (name, a), b in zip(layer.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name
