"""Learning rate for a changed inverse temperature ``beta`` of the cross-entropy softmax.

With ``logit_inverse_temperature=beta`` the head returns ``beta * z`` and the loss is computed on it. Changing beta
changes how fast those logits move under a given learning rate, so a learning rate tuned at one beta is wrong at
another. :func:`lr_for_inverse_temperature` rescales it so that the logits the loss sees move at the same speed.

Derivation (first order in the step, our own; the method is Agarwala et al., "Temperature check", TMLR 2023)
---------------------------------------------------------------------------------------------------------------
Let ``z = f(x; theta)`` be the raw logits, ``J = dz/dtheta`` and ``l(beta z)`` the cross-entropy. The gradient is
``dL/dtheta = beta * J^T grad_l``, where ``grad_l = softmax(beta z) - onehot`` only depends on the quantity the loss
sees, ``y = beta z``. One step changes ``y`` by ``delta_y = beta * J * delta_theta``.

* **SGD** (with or without momentum): ``delta_theta = -eta * beta * J^T grad_l``, so
  ``delta_y = -(eta * beta**2) * J J^T grad_l``. Two runs that start from the same ``y`` follow the same early
  trajectory when ``eta * beta**2`` is the same: ``eta(beta) = eta_0 * (beta_0 / beta)**2``.
* **Adam-type** (Adam, AdamW, Adafactor, RMSprop, Adagrad, Lion, ...): the update divides the gradient by a running
  estimate of its own scale (or takes its sign), so the factor ``beta`` in the gradient cancels and
  ``delta_theta`` does not depend on beta (as long as the gradient is well above the optimizer's ``eps``). Then
  ``delta_y = beta * J * delta_theta`` scales with ``eta * beta``: ``eta(beta) = eta_0 * beta_0 / beta``
  ("roughly": the cancellation is exact only for the normalised part of the update).

Limits of the rule (read before relying on it):

* It matches the *speed* of the logits, not their starting point: the initial logit norm ``||beta z_0||`` still
  changes with beta, and the paper finds that both matter for early learning.
* It is first order (small steps) and only covers the parameters that feed the head through ``J``; for deep
  networks it is a starting point for tuning, not an equivalence.
* Adam-type: when beta is so small that gradients approach ``eps`` (default 1e-8), Adam behaves more and more like
  SGD with learning rate ``eta / eps`` and the exponent drifts from 1 towards 2. Decoupled weight decay (AdamW)
  acts on ``theta`` at rate ``eta * weight_decay`` and is rescaled along with eta.
* UNVERIFIED: the paper's own learning-rate rule could not be read from the paper body; the rule here is derived
  from the gradient as above, not copied from the paper.

Usage::

    from hf_normsoftmax.training.lr import lr_for_inverse_temperature

    lr_for_inverse_temperature(0.1, beta=0.5, optimizer="sgd")          # 0.4   (eta * beta**2 kept)
    lr_for_inverse_temperature(1e-3, beta=0.5, optimizer="adamw")       # 0.002 (eta * beta kept)
    lr_for_inverse_temperature(1e-3, beta=2.0, optimizer="adamw_torch_fused", base_beta=4.0)  # 0.002
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..normsoftmax import _is_number

__all__ = ["OPTIMIZER_FAMILIES", "lr_for_inverse_temperature", "lr_scaling_exponent", "optimizer_family"]

# family -> exponent p of the rule eta(beta) = eta_0 * (beta_0 / beta) ** p
OPTIMIZER_FAMILIES = {"sgd": 2, "adaptive": 1}

# Optimizer names, lower-cased, by family. Matched against the whole name, torch class names (``SGD``, ``AdamW``),
# and transformers' ``TrainingArguments.optim`` values (``adamw_torch_fused``, ``paged_adamw_8bit``, ``lion_32bit``,
# ``schedule_free_sgd``...).
_SGD_NAMES = re.compile(r"^(?:schedule_free_)?(?:sgd|momentum|nesterov|heavy_ball)(?:_.*)?$")
_ADAPTIVE_NAMES = re.compile(
    r"^(?:paged_|schedule_free_|torch_)?"
    r"(?:adam|adamw|adamax|nadam|radam|adafactor|adagrad|adadelta|rmsprop|rprop|lion|sparseadam|lamb|lars|"
    r"ademamix|apollo|galore|grokadamw|stable_adamw|adalomo|muon|sparse_adam|adam8bit|adamw8bit)(?:_.*|\d.*)?$"
)
# The family names themselves are accepted too.
_FAMILY_ALIASES = {"sgd": "sgd", "adaptive": "adaptive", "adam": "adaptive"}


def optimizer_family(optimizer: Any) -> str:
    """``"sgd"`` or ``"adaptive"`` for an optimizer name, a torch optimizer class, or an optimizer instance.

    Names are case-insensitive: torch class names (``"SGD"``, ``"AdamW"``, ``"RMSprop"``), transformers' ``optim``
    values (``"adamw_torch"``, ``"adafactor"``, ``"lion_32bit"``, ``"sgd"``) or a family name (``"sgd"``,
    ``"adam"``, ``"adaptive"``). Raises ValueError for optimizers the rule does not cover (for example L-BFGS, a
    second-order method, or an unknown name).
    """
    if isinstance(optimizer, type):
        name = optimizer.__name__
    elif isinstance(optimizer, str):
        name = optimizer
    elif hasattr(optimizer, "param_groups"):  # an optimizer instance (torch or accelerate-wrapped)
        inner = getattr(optimizer, "optimizer", optimizer)
        name = type(inner).__name__
    else:
        raise TypeError(
            f"Invalid value for `optimizer`: {optimizer!r} ({type(optimizer).__name__}). Allowed: an optimizer name "
            "(e.g. 'sgd', 'adamw', 'adamw_torch_fused'), a torch.optim class or an optimizer instance."
        )
    key = name.strip().lower()
    if key in _FAMILY_ALIASES:
        return _FAMILY_ALIASES[key]
    if _SGD_NAMES.match(key):
        return "sgd"
    if _ADAPTIVE_NAMES.match(key):
        return "adaptive"
    raise ValueError(
        f"Invalid value for `optimizer`: {name!r}: no learning-rate rule for it. Allowed: SGD-type names ('sgd', "
        "'SGD', 'schedule_free_sgd') -> eta * beta**2 kept; Adam-type names ('adam', 'adamw', 'adamw_torch', "
        "'adafactor', 'rmsprop', 'adagrad', 'lion_32bit', ...) -> eta * beta kept; or a family name 'sgd' / "
        "'adaptive'. Second-order methods such as L-BFGS are not covered."
    )


def lr_scaling_exponent(optimizer: Any) -> int:
    """The exponent ``p`` of ``eta(beta) = eta_0 * (beta_0 / beta) ** p``: 2 for SGD-type, 1 for Adam-type."""
    return OPTIMIZER_FAMILIES[optimizer_family(optimizer)]


def _positive_finite(name: str, value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid value for `{name}`: {value!r}. Allowed: a finite number > 0.")
    return float(value)


def lr_for_inverse_temperature(base_lr: float, beta: float, optimizer: Any = "sgd", base_beta: float = 1.0) -> float:
    """The learning rate at inverse temperature ``beta`` equivalent to ``base_lr`` at ``base_beta``.

    Args:
        base_lr: learning rate tuned (or chosen) for ``base_beta``.
        beta: the new ``logit_inverse_temperature``.
        optimizer: optimizer name / class / instance (see :func:`optimizer_family`). Default ``"sgd"``.
        base_beta: the inverse temperature ``base_lr`` belongs to (default 1: the stock softmax).

    Returns:
        ``base_lr * (base_beta / beta) ** 2`` for SGD-type optimizers (``eta * beta**2`` invariant),
        ``base_lr * base_beta / beta`` for Adam-type optimizers (``eta * beta`` invariant, approximately).
        See the module docstring for the derivation and its limits; the paper's exact rule is UNVERIFIED.

    Example::

        >>> lr_for_inverse_temperature(0.1, beta=0.5, optimizer="sgd")
        0.4
        >>> lr_for_inverse_temperature(1e-3, beta=0.5, optimizer="adamw")
        0.002
    """
    base_lr = _positive_finite("base_lr", base_lr)
    beta = _positive_finite("beta", beta)
    base_beta = _positive_finite("base_beta", base_beta)
    exponent = lr_scaling_exponent(optimizer)
    result = base_lr * (base_beta / beta) ** exponent
    if not math.isfinite(result) or result <= 0:
        raise ValueError(
            f"lr_for_inverse_temperature: base_lr={base_lr!r} rescaled from beta={base_beta!r} to beta={beta!r} "
            f"gives {result!r}, which is not a usable learning rate (overflow or underflow)."
        )
    return result
