"""NormSoftmax and inverse-temperature cross-entropy: F.cross_entropy semantics, num_items_in_batch, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from source_imports import imported_roots

from hf_normsoftmax.losses import (
    InverseTemperatureCrossEntropyLoss,
    NormSoftmaxCrossEntropyLoss,
    inverse_temperature_cross_entropy,
    normsoftmax_cross_entropy,
)
from hf_normsoftmax.normsoftmax import normalize_logits

MODULE_PATH = Path(__file__).resolve().parents[1] / "hf_normsoftmax" / "losses.py"


def reference_normalized(x, dim, gamma=1.0, eps=1e-6):
    centred = x - x.mean(dim, keepdim=True)
    return centred * gamma / torch.sqrt(centred.square().mean(dim, keepdim=True) + eps)


CE_OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(weight=torch.rand(5, dtype=torch.float64) + 0.5),
    dict(ignore_index=2, label_smoothing=0.2, reduction="sum"),
]


@pytest.mark.parametrize("options", CE_OPTIONS)
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4), (2, 5, 3, 2)])
def test_normsoftmax_ce_matches_cross_entropy_of_normalized_logits(options, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64) * 4
    target = torch.randint(0, 5, (shape[0],) + shape[2:])
    target.view(-1)[::3] = options.get("ignore_index", -100)
    got = normsoftmax_cross_entropy(x, target, gamma=2.0, **options)
    want = F.cross_entropy(reference_normalized(x, 1, gamma=2.0), target, **options)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", CE_OPTIONS)
def test_beta_ce_matches_cross_entropy_of_scaled_logits(options):
    torch.manual_seed(1)
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    target = torch.randint(0, 5, (6, 3))
    got = inverse_temperature_cross_entropy(x, target, beta=0.3, **options)
    torch.testing.assert_close(got, F.cross_entropy(0.3 * x, target, **options), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        inverse_temperature_cross_entropy(x, target, **options), F.cross_entropy(x, target, **options)
    )


def test_probability_targets_and_unbatched_input():
    torch.manual_seed(2)
    x = torch.randn(4, 6, dtype=torch.float64)
    probs = torch.softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    torch.testing.assert_close(
        normsoftmax_cross_entropy(x, probs, gamma=3.0), F.cross_entropy(reference_normalized(x, 1, 3.0), probs)
    )
    torch.testing.assert_close(inverse_temperature_cross_entropy(x, probs, beta=2.0), F.cross_entropy(2 * x, probs))
    single = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(
        normsoftmax_cross_entropy(single, torch.tensor(2)),
        F.cross_entropy(reference_normalized(single, 0), torch.tensor(2)),
    )


def test_options_reach_normalization():
    x = torch.randn(5, 7, dtype=torch.float64) * 3
    target = torch.randint(0, 7, (5,))
    options = dict(gamma=torch.rand(5, 1, dtype=torch.float64) + 1, max_temperature=0.5, eps=1e-3, statistic="var")
    torch.testing.assert_close(
        normsoftmax_cross_entropy(x, target, **options), F.cross_entropy(normalize_logits(x, dim=1, **options), target)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_give_float32_loss(dtype):
    torch.manual_seed(3)
    x = (torch.randn(8, 50) * 20).to(dtype)
    target = torch.randint(0, 50, (8,))
    for loss_fn, kwargs in (
        (normsoftmax_cross_entropy, dict(gamma=3.0)),
        (inverse_temperature_cross_entropy, dict(beta=0.5)),
    ):
        loss = loss_fn(x, target, **kwargs)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, loss_fn(x.float(), target, **kwargs))


@pytest.mark.parametrize(
    "loss_fn, kwargs",
    [
        (normsoftmax_cross_entropy, dict(gamma=2.0, label_smoothing=0.1)),
        (inverse_temperature_cross_entropy, dict(beta=0.7)),
    ],
)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_gradient_accumulation_is_exact(loss_fn, kwargs, as_tensor):
    """k micro-batches with num_items_in_batch = all non-ignored tokens add up to the full-batch mean loss."""
    torch.manual_seed(4)
    tokens, classes = 24, 9
    logits = torch.randn(tokens, classes, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, classes, (tokens,))
    # ignored tokens spread unevenly: micro-batch means weight the micro-batches wrongly
    target[[0, 1, 2, 3, 4, 5, 6, 9, 17]] = -100
    full = loss_fn(logits, target, **kwargs)
    full_grad = torch.autograd.grad(full, logits)[0]

    num_items = int((target != -100).sum())
    num_items_in_batch = torch.tensor(num_items) if as_tensor else num_items
    accumulated, grad = 0.0, torch.zeros_like(logits)
    naive = 0.0
    for chunk in torch.arange(tokens).split([8, 4, 12]):
        micro = loss_fn(logits[chunk], target[chunk], num_items_in_batch=num_items_in_batch, **kwargs)
        grad += torch.autograd.grad(micro, logits)[0]
        accumulated = accumulated + micro.detach()
        naive = naive + loss_fn(logits[chunk], target[chunk], **kwargs).detach() / 3
    torch.testing.assert_close(accumulated, full.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, full_grad, rtol=1e-12, atol=1e-12)
    assert abs(float(naive - full.detach())) > 1e-3  # the test distinguishes the exact rule from averaging means


def test_num_items_in_batch_with_reduction_sum_and_legacy_arguments():
    x = torch.randn(6, 4)
    target = torch.randint(0, 4, (6,))
    want = F.cross_entropy(x, target, reduction="sum") / 10
    torch.testing.assert_close(
        inverse_temperature_cross_entropy(x, target, reduction="sum", num_items_in_batch=10), want
    )
    with pytest.raises(ValueError, match="reduction"):
        inverse_temperature_cross_entropy(x, target, reduction="none", num_items_in_batch=10)
    with pytest.raises(ValueError, match="reduction"):
        normsoftmax_cross_entropy(x, target, reduce=False, num_items_in_batch=10)


def test_modules_match_functions_and_keep_state_dict_clean():
    torch.manual_seed(5)
    x = torch.randn(7, 5, requires_grad=True)
    target = torch.randint(0, 5, (7,))
    weight = torch.rand(5) + 0.5
    ns = NormSoftmaxCrossEntropyLoss(weight=weight, label_smoothing=0.05, gamma=2.5, max_temperature=4.0)
    torch.testing.assert_close(
        ns(x, target),
        normsoftmax_cross_entropy(x, target, weight=weight, label_smoothing=0.05, gamma=2.5, max_temperature=4.0),
    )
    torch.testing.assert_close(
        ns(x, target, num_items_in_batch=3),
        normsoftmax_cross_entropy(
            x, target, weight=weight, label_smoothing=0.05, gamma=2.5, max_temperature=4.0, num_items_in_batch=3
        ),
    )
    it = InverseTemperatureCrossEntropyLoss(ignore_index=1, reduction="sum", beta=0.2)
    torch.testing.assert_close(it(x, target), F.cross_entropy(0.2 * x, target, ignore_index=1, reduction="sum"))
    assert list(ns.state_dict()) == ["weight"] and list(it.state_dict()) == []


BAD = [
    (normsoftmax_cross_entropy, dict(gamma=0.0), ValueError, "gamma"),
    (normsoftmax_cross_entropy, dict(gamma=float("nan")), ValueError, "gamma"),
    (normsoftmax_cross_entropy, dict(eps=0.0), ValueError, "eps"),
    (normsoftmax_cross_entropy, dict(statistic="mean"), ValueError, "statistic"),
    (normsoftmax_cross_entropy, dict(max_temperature=-1.0), ValueError, "max_temperature"),
    (inverse_temperature_cross_entropy, dict(beta=0.0), ValueError, "beta"),
    (inverse_temperature_cross_entropy, dict(beta=-2.0), ValueError, "beta"),
    (inverse_temperature_cross_entropy, dict(beta=float("inf")), ValueError, "beta"),
    (inverse_temperature_cross_entropy, dict(beta="1"), TypeError, "beta"),
    (inverse_temperature_cross_entropy, dict(beta=torch.tensor([-1.0])), ValueError, "beta"),
    (inverse_temperature_cross_entropy, dict(reduction="avg"), ValueError, "reduction"),
    (normsoftmax_cross_entropy, dict(reduction=None), ValueError, "reduction"),
    (normsoftmax_cross_entropy, dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (normsoftmax_cross_entropy, dict(ignore_index=1.0), TypeError, "ignore_index"),
    (normsoftmax_cross_entropy, dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    (normsoftmax_cross_entropy, dict(num_items_in_batch=2.5), TypeError, "num_items_in_batch"),
    (inverse_temperature_cross_entropy, dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch"),
]


@pytest.mark.parametrize("loss_fn, bad, error, name", BAD)
def test_bad_arguments_are_named(loss_fn, bad, error, name):
    with pytest.raises(error, match=name):
        loss_fn(torch.randn(3, 4), torch.tensor([0, 1, 2]), **bad)


@pytest.mark.parametrize("loss_fn", [normsoftmax_cross_entropy, inverse_temperature_cross_entropy])
def test_integer_logits_rejected(loss_fn):
    with pytest.raises(TypeError, match="input"):
        loss_fn(torch.ones(3, 4, dtype=torch.int64), torch.tensor([0, 1, 2]))


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="gamma"):
        NormSoftmaxCrossEntropyLoss(gamma=-1.0)
    with pytest.raises(ValueError, match="beta"):
        InverseTemperatureCrossEntropyLoss(beta=0)
    with pytest.raises(ValueError, match="reduction"):
        InverseTemperatureCrossEntropyLoss(reduction="mean_all")


def test_module_imports_only_torch_and_stdlib():
    assert imported_roots(MODULE_PATH) - {"torch", "math", "collections", "typing", "__future__", "."} == set()


# ---------------------------------------------------------------------------------------------------------------
# allowed ranges of gamma, beta, eps, max_temperature
# ---------------------------------------------------------------------------------------------------------------

OUT_OF_RANGE = [
    (normsoftmax_cross_entropy, dict(gamma=1e38), "gamma", "[0.001, 100]"),
    (normsoftmax_cross_entropy, dict(gamma=1e-4), "gamma", "[0.001, 100]"),
    (normsoftmax_cross_entropy, dict(gamma=torch.tensor([[2.0], [1e3], [2.0], [2.0]])), "gamma", "[0.001, 100]"),
    (normsoftmax_cross_entropy, dict(eps=1e-60), "eps", "[1e-14, 1]"),
    (normsoftmax_cross_entropy, dict(eps=2.0), "eps", "[1e-14, 1]"),
    (normsoftmax_cross_entropy, dict(max_temperature=1e-39), "max_temperature", "[0.01, 1e+06]"),
    (inverse_temperature_cross_entropy, dict(beta=1e3), "beta", "[0.001, 100]"),
    (inverse_temperature_cross_entropy, dict(beta=torch.full((4, 1), 1e-5)), "beta", "[0.001, 100]"),
]


@pytest.mark.parametrize("loss_fn, bad, name, allowed", OUT_OF_RANGE)
def test_values_outside_the_ranges_are_refused_with_the_range(loss_fn, bad, name, allowed):
    """gamma=1e38 gave non-finite outputs, max_temperature=1e-39 a torch overflow error, eps=1e-60 NaN on constant
    rows: the functions refuse such values and name the allowed range (the constants in normsoftmax.py)."""
    with pytest.raises(ValueError, match=name) as err:
        loss_fn(torch.randn(4, 6), torch.tensor([0, 1, 2, 3]), **bad)
    assert allowed in str(err.value)
    settings = {key: value for key, value in bad.items() if not isinstance(value, torch.Tensor)}
    if loss_fn is normsoftmax_cross_entropy and settings:
        with pytest.raises(ValueError, match=name):
            normalize_logits(torch.randn(4, 6), **settings)
        with pytest.raises(ValueError, match=name):
            NormSoftmaxCrossEntropyLoss(**settings)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("statistic", ["std", "var"])
def test_every_corner_of_the_ranges_gives_finite_losses_and_gradients(dtype, statistic):
    """Constant rows, one-spike rows, rows of tiny variance and large logits, at every corner of the ranges."""
    from hf_normsoftmax.normsoftmax import EPS_RANGE, GAMMA_RANGE, INVERSE_TEMPERATURE_RANGE, MAX_TEMPERATURE_RANGE

    classes = 1000
    spike = torch.zeros(classes)
    spike[3] = 1.0
    rows = torch.stack([
        torch.full((classes,), 3.0),  # constant
        spike,
        3.0 + 1e-3 * torch.randn(classes),  # variance 1e-6, next to a mean of 3
        1e3 * torch.randn(classes),
        torch.randn(classes),
    ])
    labels = torch.tensor([0, 3, 7, 11, 999])
    corners = [
        dict(gamma=gamma, eps=eps, max_temperature=cap)
        for gamma in GAMMA_RANGE for eps in EPS_RANGE for cap in (None, *MAX_TEMPERATURE_RANGE)
    ]
    for options in corners:
        x = rows.to(dtype).requires_grad_()
        loss = normsoftmax_cross_entropy(x, labels, statistic=statistic, **options)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), options
    for beta in INVERSE_TEMPERATURE_RANGE:
        x = rows.to(dtype).requires_grad_()
        loss = inverse_temperature_cross_entropy(x, labels, beta=beta)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), beta
