"""sigmaReparam features that no model runs: the conversion of any model's layers (:func:`sigma_reparam_`), the
cached effective weight, the export of a layer to its plain twin and extra power-iteration steps (logging, export
and analysis use them).

Package only: checkpoints carry the layers' runtime (:mod:`hf_normsoftmax.sigma_reparam`,
:mod:`hf_normsoftmax.sigma_reparam_ops`), not this file. ``import hf_normsoftmax`` makes the three functions the
methods ``effective_weight()``, ``to_plain()`` and ``power_iteration_()`` of
:class:`~hf_normsoftmax.sigma_reparam.SigmaReparamMixin` (:func:`install`), so ``layer.effective_weight()`` works on
every layer of the package, and puts :func:`sigma_reparam_` on :mod:`hf_normsoftmax.sigma_reparam` too (where it
was defined before); a layer of a model loaded with ``trust_remote_code=True`` where the package is not
installed has ``sigma`` and the forward, not these.

Pure PyTorch (never imports transformers).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import sigma_reparam as _sigma_reparam_module
from .sigma_reparam import SigmaReparamConv2d, SigmaReparamLinear, SigmaReparamMixin
from .sigma_reparam_ops import _LAYOUTS, _aligned, _compute_dtype, _full_precision, _matrix, _read, _ScaledWeight

__all__ = ["effective_weight", "install", "power_iteration_", "sigma_reparam_", "to_plain"]

# Counts optimizer steps process-wide (a global torch.optim hook, registered on first use). Part of the cache key:
# fused optimizers change weights without bumping their version counters.
_optimizer_steps = 0
_optimizer_hook_handle = None


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _ensure_optimizer_step_hook() -> None:
    global _optimizer_hook_handle
    if _optimizer_hook_handle is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _optimizer_hook_handle = register_optimizer_step_post_hook(_count_optimizer_step)


def _cache_key(weight: torch.Tensor, scale: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple:
    # _version counts in-place writes (optimizer steps, load_state_dict, copy_); the ids and data pointers
    # catch replaced tensors; the optimizer step count catches fused optimizers, which bump no versions.
    # Written out flat: it is evaluated on every cached call.
    return (
        _optimizer_steps,
        id(weight),
        weight.data_ptr(),
        weight._version,
        id(scale),
        scale.data_ptr(),
        scale._version,
        id(u),
        u.data_ptr(),
        u._version,
        id(v),
        v.data_ptr(),
        v._version,
        weight.dtype,
        weight.device,
    )


def effective_weight(layer: SigmaReparamMixin) -> torch.Tensor:
    """``W_hat = reparam_scale / sigma * weight`` in the weight's layout, as the next forward computes it.

    Uses the power-iteration vectors of the current weight (the pending step if the weight changed, not
    stored: this never changes the buffers); ``W`` itself for a plain layer. Differentiable w.r.t.
    ``weight`` and ``reparam_scale`` when grad mode is on. When no gradient is needed (grad mode off, or
    neither tensor requires grad) the result is cached; the cache is used only while the weight, scale and
    buffers are the same tensors at the same versions, no torch optimizer has stepped (fused ones included)
    and the weight's image ``normalize(W^T v)`` and estimate are bitwise the ones it was made with (that
    catches writes through ``.data``, which bypass the version counter). Forwards never use this cache.
    """
    weight, _, scale, u, v = layer._tensors()
    needs_grad = torch.is_grad_enabled() and (weight.requires_grad or scale.requires_grad)
    use_cache = (
        layer.cache_effective_weight and not needs_grad and not weight.is_meta and not torch.compiler.is_compiling()
    )
    u_now, v_now, sigma, plain = layer._reparam_vectors(store=False)
    key = None
    if use_cache:
        _ensure_optimizer_step_hook()
        try:
            key = _cache_key(weight, scale, u, v)
        except RuntimeError:  # inference tensors have no version counter: just don't cache
            key = None
        cached = layer._reparam_cache
        if (
            key is not None
            and cached is not None
            and cached[0] == key
            and torch.equal(cached[1], u_now)
            and torch.equal(cached[2], sigma)
        ):
            hit = cached[3]
            # A tensor made under inference_mode cannot be saved for backward outside it.
            if not hit.is_inference() or torch.is_inference_mode_enabled():
                return hit
    if plain is True:
        weight_hat = weight if key is None else weight.detach().clone()
    else:
        weight_hat = _ScaledWeight.apply(weight, scale, u_now, v_now, sigma, layer.weight_layout)
    if key is not None:
        weight_hat = weight_hat.detach()
        layer._reparam_cache = (key, u_now, sigma, weight_hat)
    return weight_hat


def to_plain(layer: SigmaReparamMixin) -> nn.Module:
    """A new instance of the base layer class whose ``weight`` is ``W_hat`` (bias copied): same outputs.

    Uses the current u, v (no power-iteration step), like an eval forward. The result shares nothing with
    the layer.
    """
    layer._check_materialised("to_plain")
    with torch.no_grad():
        weight_hat = effective_weight(layer).detach().clone()
    new_weight = nn.Parameter(weight_hat, requires_grad=layer.weight.requires_grad)
    # deepcopy keeps every other attribute and hook of the layer; the memo swaps in W_hat and skips the cache.
    memo = {id(layer.weight): new_weight, id(layer._reparam_cache): None}
    plain = copy.deepcopy(layer, memo)
    del plain._parameters["reparam_scale"]
    del plain._buffers["reparam_u"]
    del plain._buffers["reparam_v"]
    del plain.__dict__["_reparam_cache"]
    plain.__dict__.pop("_maybe_plain", None)
    plain.__class__ = type(layer)._reparam_base_class()
    return plain


@_full_precision
@torch.no_grad()
def power_iteration_(layer: SigmaReparamMixin, steps: int = 1) -> torch.Tensor:
    """Runs ``steps`` unconditional power-iteration steps on the buffers; returns the new sigma estimate.

    Training forwards already take one step per weight change; this is for refining a poor ``u``/``v``
    (for instance random buffers) without touching ``reparam_scale``.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    layer._check_materialised("power_iteration_")
    weight = _aligned(layer.weight.detach())
    compute_dtype = _compute_dtype(weight.dtype)
    matrix = _matrix(weight, layer.weight_layout).to(compute_dtype)
    for _ in range(steps):
        u_now = _read(layer.reparam_u, compute_dtype)
        layer.reparam_v.copy_(F.normalize(torch.mv(matrix, u_now), dim=0))
        v_now = _read(layer.reparam_v, compute_dtype)
        layer.reparam_u.copy_(F.normalize(torch.mv(matrix.t(), v_now), dim=0))
    layer._reparam_cache = None
    return layer.sigma


Selector = Sequence[str] | str | Callable[[str, nn.Module], bool] | None


def _matches(selector: Selector, name: str, module: nn.Module, argument: str) -> bool:
    if callable(selector):
        return bool(selector(name, module))
    patterns = [selector] if isinstance(selector, str) else selector
    try:
        patterns = list(patterns)
    except TypeError:
        raise TypeError(
            f"{argument} must be None, an fnmatch pattern, a sequence of patterns or a callable(name, module), "
            f"got {selector!r}"
        ) from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{argument} patterns must be strings, got {pattern!r}")
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def sigma_reparam_(
    model: nn.Module,
    include: Selector = None,
    exclude: Selector = None,
    layer_types: Sequence[type] = (SigmaReparamLinear, SigmaReparamConv2d),
) -> list[str]:
    """Converts matching layers of ``model`` in place; returns the qualified names converted (``""`` = model).

    A layer is converted when its type is exactly the base class of one of ``layer_types`` (subclasses, whose
    forward may differ or bypass the weight, are left alone), it is not converted already, its name matches
    ``include`` (default: all) and does not match ``exclude``. ``include`` / ``exclude``: an fnmatch pattern,
    a sequence of them (matched against the qualified name, e.g. ``"encoder.*.query"``), or a callable
    ``(name, module) -> bool``. Shared modules are converted once. Create the optimizer afterwards: each
    converted layer gains the parameter ``reparam_scale``.

    Example::

        names = sigma_reparam_(model, exclude=["classifier"])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(layer_types, type):
        layer_types = (layer_types,)
    by_base: dict[type, type] = {}
    for layer_type in layer_types:
        if not (
            isinstance(layer_type, type)
            and issubclass(layer_type, SigmaReparamMixin)
            and layer_type.weight_layout in _LAYOUTS
        ):
            raise TypeError(
                f"layer_types must hold SigmaReparamMixin subclasses with a weight_layout in {_LAYOUTS}, "
                f"got {layer_type!r}"
            )
        base = layer_type._reparam_base_class()
        if base in by_base and by_base[base] is not layer_type:
            raise ValueError(f"layer_types has two classes for {base.__qualname__}: {by_base[base]} and {layer_type}")
        by_base[base] = layer_type
    converted = []
    for name, module in list(model.named_modules()):
        target = by_base.get(type(module))
        if target is None:
            continue
        if include is not None and not _matches(include, name, module, "include"):
            continue
        if exclude is not None and _matches(exclude, name, module, "exclude"):
            continue
        target.from_module(module)
        converted.append(name)
    return converted


def install() -> None:
    """Makes the functions above methods of :class:`SigmaReparamMixin` (``import hf_normsoftmax`` calls this)."""
    SigmaReparamMixin.effective_weight = effective_weight
    SigmaReparamMixin.to_plain = to_plain
    SigmaReparamMixin.power_iteration_ = power_iteration_
    _sigma_reparam_module.sigma_reparam_ = sigma_reparam_  # where the layers are, as before it moved here
