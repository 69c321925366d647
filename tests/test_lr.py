"""The learning-rate rule for the inverse temperature beta (hf_normsoftmax.training.lr).

Besides the formula, the tests check the property the rule is derived from: for a linear softmax classifier
``y = beta * W x`` started from the same ``y`` (``W`` scaled by ``1 / beta``), training with the rescaled learning
rate gives the same trajectory of ``y`` (exactly, for a linear model) under SGD (``eta * beta**2`` kept) and under
Adam with a negligible ``eps`` (``eta * beta`` kept), and a different trajectory without the rescaling.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_normsoftmax.training.lr import (
    lr_for_inverse_temperature,
    lr_scaling_exponent,
    optimizer_family,
)


def test_rule_values():
    assert lr_for_inverse_temperature(0.1, beta=0.5, optimizer="sgd") == pytest.approx(0.4)
    assert lr_for_inverse_temperature(0.1, beta=2.0, optimizer="sgd") == pytest.approx(0.025)
    assert lr_for_inverse_temperature(1e-3, beta=0.5, optimizer="adamw") == pytest.approx(2e-3)
    assert lr_for_inverse_temperature(1e-3, beta=4.0, optimizer="adam") == pytest.approx(2.5e-4)
    # base_beta: from a run tuned at beta 4 to beta 2
    rescaled = lr_for_inverse_temperature(1e-3, beta=2.0, optimizer="adamw_torch_fused", base_beta=4.0)
    assert rescaled == pytest.approx(2e-3)
    assert lr_for_inverse_temperature(0.3, beta=1.0, optimizer="sgd") == 0.3


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("sgd", "sgd"), ("SGD", "sgd"), ("schedule_free_sgd", "sgd"),
        ("adam", "adaptive"), ("AdamW", "adaptive"), ("adamw_torch", "adaptive"), ("adamw_torch_fused", "adaptive"),
        ("paged_adamw_8bit", "adaptive"), ("adafactor", "adaptive"), ("RMSprop", "adaptive"),
        ("adagrad", "adaptive"), ("lion_32bit", "adaptive"), ("adaptive", "adaptive"),
    ],
)
def test_optimizer_family_names(name, family):
    assert optimizer_family(name) == family


def test_optimizer_family_from_classes_and_instances():
    param = [torch.nn.Parameter(torch.zeros(2))]
    assert optimizer_family(torch.optim.SGD) == "sgd"
    assert optimizer_family(torch.optim.AdamW(param)) == "adaptive"
    assert optimizer_family(torch.optim.SGD(param, lr=0.1, momentum=0.9)) == "sgd"
    assert lr_scaling_exponent(torch.optim.Adam) == 1
    assert lr_scaling_exponent("sgd") == 2


@pytest.mark.parametrize("optimizer", ["lbfgs", "LBFGS", "no_such_optimizer", ""])
def test_unknown_optimizers_are_refused(optimizer):
    with pytest.raises(ValueError, match="no learning-rate rule"):
        lr_for_inverse_temperature(1e-3, beta=2.0, optimizer=optimizer)


def test_bad_optimizer_type():
    with pytest.raises(TypeError, match="optimizer"):
        optimizer_family(3.0)


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True, "1"])
@pytest.mark.parametrize("argument", ["base_lr", "beta", "base_beta"])
def test_bad_numbers_name_the_argument(argument, value):
    kwargs = {"base_lr": 1e-3, "beta": 2.0, "base_beta": 1.0, argument: value}
    with pytest.raises(ValueError, match=f"`{argument}`"):
        lr_for_inverse_temperature(kwargs["base_lr"], kwargs["beta"], optimizer="sgd", base_beta=kwargs["base_beta"])


def _logit_trajectory(beta: float, lr: float, optimizer: str, steps: int = 6) -> torch.Tensor:
    """Train y = beta * W x (W scaled so that y at start is the same for every beta); return y after each step."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (16,), generator=generator)
    start = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    weight = torch.nn.Parameter(start / beta)
    if optimizer == "sgd":
        opt = torch.optim.SGD([weight], lr=lr)
    else:
        opt = torch.optim.Adam([weight], lr=lr, eps=1e-30)
    trajectory = []
    for _ in range(steps):
        logits = beta * inputs @ weight.t()
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        trajectory.append((beta * inputs @ weight.detach().t()).clone())
    return torch.stack(trajectory)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("beta", [0.25, 3.0])
def test_rescaled_learning_rate_gives_the_same_logit_trajectory(optimizer, beta):
    base_lr = 0.05
    reference = _logit_trajectory(1.0, base_lr, optimizer)
    rescaled = _logit_trajectory(beta, lr_for_inverse_temperature(base_lr, beta, optimizer=optimizer), optimizer)
    unchanged = _logit_trajectory(beta, base_lr, optimizer)
    torch.testing.assert_close(rescaled, reference, rtol=1e-9, atol=1e-9)
    # the rule is not vacuous: keeping the learning rate gives a visibly different trajectory
    assert (unchanged - reference).abs().max() > 1e-3
    # and the other family's exponent is wrong for this optimizer
    other = "adam" if optimizer == "sgd" else "sgd"
    wrong = _logit_trajectory(beta, lr_for_inverse_temperature(base_lr, beta, optimizer=other), optimizer)
    assert (wrong - reference).abs().max() > 1e-3
