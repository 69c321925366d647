"""sigmaReparam (Zhai et al., ICML 2023): ``W_hat = (s / sigma(W)) * W`` with a learned scalar ``s``.

``sigma(W)`` is the spectral norm of the weight, viewed as an (out, in) matrix (a conv kernel is flattened to
(out, in * kh * kw)). It is estimated by power iteration: vectors ``u`` (in) and ``v`` (out) are kept as buffers,
and ``sigma = v^T W u`` with ``u``, ``v`` held constant, so the gradient flows through ``W`` (``d sigma / dW = v u^T``).
``s`` is initialised to ``sigma(W0)`` and ``u``, ``v`` to the top singular pair (float64, sign fixed: a
deterministic function of the weight), so converting a layer leaves its outputs unchanged.

Plain layers: a weight whose spectral norm is 0 (zero-initialised output projections are common) has no
direction to normalise, and ``s / sigma(W) * W`` would have zero gradient forever. Such a layer is *plain*:
``u = v = 0``, ``s = 0``, and it computes ``W_hat = W`` with the gradient of its stock twin. The first training
forward that sees a nonzero weight resets it from that weight (``s = sigma(W)``, so ``W_hat = W`` again at that
moment: the function is continuous) and it is a sigmaReparam layer from then on.

Layers keep their ``weight`` / ``bias`` parameters (names, values and the Parameter objects themselves, so tied
weights stay tied) and gain the parameter ``reparam_scale`` (0-dim) and the persistent buffers ``reparam_u`` /
``reparam_v``: a stock checkpoint maps onto a converted model 1:1 plus those three keys. No name contains
"gamma" or "beta" (transformers renames such keys when loading).

Power iteration: exactly one step per *change of the raw weight*. Rather than trusting version counters (fused
optimizers such as ``AdamW(fused=True)``, transformers' default, and writes through ``.data`` update weights
without bumping them), each forward checks, without leaving the device, whether the stored ``u`` is still the
power-iteration image ``normalize(W^T v)`` of the current weight, and steps only if it is not. So k forwards
per optimizer step (gradient accumulation), a recomputed forward (gradient checkpointing) or a layer called twice
all see the same ``u``, ``v``; and a module restored from a state dict continues exactly like the original.
Training forwards store the step; eval forwards compute the same step and do not store it (the buffers change
in training only), so an eval forward never uses a sigma from an older weight. Forwards never use a cached
``W_hat``: on CPU, Linear / Conv1D eval forwards fold ``s / sigma`` into the matmul like training ones.

Usage::

    import torch
    from torch import nn
    from hf_normsoftmax import SigmaReparamLinear, sigma_reparam_

    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    names = sigma_reparam_(model)                 # ['0', '2']: converted in place, outputs unchanged
    layer = model[0]
    layer.sigma, layer.reparam_scale              # spectral-norm estimate and learned scalar, for logging
    exported = layer.to_plain()                   # nn.Linear holding W_hat, same outputs (package feature)
    fresh = SigmaReparamLinear(16, 32)            # or build converted layers directly

What no model runs lives in :mod:`hf_normsoftmax.sigma_reparam_tools` (package only, not carried by checkpoints):
the conversion of any model's layers ``sigma_reparam_`` (``hf_normsoftmax.sigma_reparam_``, and an attribute of this
module too once ``hf_normsoftmax`` is imported), and the cached ``effective_weight()``, ``to_plain()`` and
``power_iteration_()``, methods of these layers once ``hf_normsoftmax`` is imported.

Pure PyTorch (never imports transformers). transformers' GPT-2 ``Conv1D`` (weight stored (in, out)) is supported
by mixing in: ``class SigmaReparamConv1D(SigmaReparamMixin, Conv1D): weight_layout = "in_out"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .sigma_reparam_ops import (  # the numerics of this module's layers
    _LAYOUTS,
    _WAKE_ABOVE,
    _aligned,
    _compute_dtype,
    _full_precision,
    _in_range,
    _matrix,
    _normalize,
    _power_step,
    _read,
    _ReparamMatmul,
    _scaled_addmm,
    _ScaledWeight,
    _sigma_floor,
    _wakes,
)

__all__ = ["SigmaReparamConv2d", "SigmaReparamLinear", "SigmaReparamMixin"]

# Devices where "did the weight change?" is read on the host to skip work (free on CPU). Elsewhere, and under
# torch.compile, the step is computed and selected with torch.where: no device sync, no graph break.
_HOST_DECIDED_DEVICES = ("cpu",)


def _registered(module: nn.Module, registry: dict, name: str) -> torch.Tensor:
    value = registry.get(name)
    return value if value is not None else getattr(module, name)


def _decided_on_host(weight: torch.Tensor) -> bool:
    return weight.device.type in _HOST_DECIDED_DEVICES and not torch.compiler.is_compiling()


class _PowerIterationState:
    """The sigmaReparam state of a layer (scale, power-iteration vectors) and its updates: construction and
    conversion, the power-iteration step, resets and the plain-layer rule. :class:`SigmaReparamMixin` adds the
    forwards."""

    # -- construction / conversion ------------------------------------------------------------------------------

    @classmethod
    def _reparam_base_class(cls) -> type:
        """The layer class this one extends (first class after the mixins in the MRO)."""
        for klass in cls.__mro__[1:]:
            if issubclass(klass, SigmaReparamMixin):
                continue
            if issubclass(klass, nn.Module):
                return klass
        raise TypeError(f"{cls.__name__} must also inherit from an nn.Module layer class, e.g. nn.Linear")

    def _setup_reparam(self) -> None:
        layout = type(self).weight_layout
        if layout not in _LAYOUTS:
            raise ValueError(f"{type(self).__name__}.weight_layout must be one of {_LAYOUTS}, got {layout!r}")
        weight = getattr(self, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__} needs a floating-point tensor attribute 'weight', got {weight!r}")
        if layout in ("out_in", "in_out") and weight.ndim != 2:
            raise ValueError(f"weight_layout {layout!r} needs a 2-D weight, got shape {tuple(weight.shape)}")
        if layout == "conv" and weight.ndim < 3:
            raise ValueError(f"weight_layout 'conv' needs a kernel of 3 or more dims, got shape {tuple(weight.shape)}")
        out_features, in_features = _matrix(weight.detach(), layout).shape
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.reparam_scale = nn.Parameter(torch.ones((), **factory), requires_grad=weight.requires_grad)
        self.register_buffer("reparam_u", torch.zeros(in_features, **factory))
        self.register_buffer("reparam_v", torch.zeros(out_features, **factory))
        self._reparam_cache = None
        # Meta or not-yet-initialised (non-finite) weights: leave the reparam state for reset_reparam() after
        # the real weights arrive (the usual case when a model is built before its checkpoint is loaded).
        if not weight.is_meta and bool(torch.isfinite(weight.detach()).all()):
            self.reset_reparam()

    @classmethod
    def from_module(cls, module: nn.Module):
        """Converts ``module`` (an instance of exactly the base layer class) in place and returns it.

        The module keeps its Parameter objects, device and dtype; ``reparam_*`` entries are added, initialised
        from the current weight (on the meta device, or with non-finite placeholder values, they stay
        uninitialised: call :meth:`reset_reparam` once the weights are real). A module that already is a ``cls``
        is returned unchanged.
        """
        if isinstance(module, cls):
            return module
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        base = cls._reparam_base_class()
        if type(module) is not base:
            raise TypeError(
                f"{cls.__name__}.from_module converts {base.__module__}.{base.__qualname__} modules (exact type), "
                f"got {type(module).__module__}.{type(module).__qualname__}"
            )
        module.__class__ = cls  # same object: parameters, hooks and every reference to the module stay valid
        module._setup_reparam()
        return module

    # -- power iteration -----------------------------------------------------------------------------------------

    @_full_precision
    @torch.no_grad()
    def _reparam_vectors(self, store: bool, _woken: bool = False):
        """``(u, v, sigma, plain)`` in compute dtype for this forward, with one power-iteration step if needed.

        The step is taken only if the stored u is no longer ``normalize(W^T v)`` for the current weight, i.e. if
        the weight changed; ``store`` writes it to the buffers (training), otherwise the buffers stay as they
        are (eval, ``sigma``, ``effective_weight``: the same vectors, not kept). ``sigma`` is unclamped.
        ``plain`` (a bool, or a 0-dim bool tensor off the host) says the layer computes ``W_hat = W``: its
        estimate is 0 (a zero weight). With ``store``, a plain layer whose weight has become nonzero wakes:
        through :meth:`reset_reparam` (exact, ``scale = sigma``, so ``W_hat = W`` still). On CPU the decisions
        are read directly (:meth:`_host_vectors`); on accelerators and under torch.compile they are computed and
        selected branch-free (no host sync, one graph), except the plain check, read on the host only while the
        layer may be plain (``_maybe_plain``: after a plain reset or a state-dict load, until a training forward
        sees it is not).
        """
        if _decided_on_host(self.weight):
            u_now, v_now, sigma_now, _ = self._host_vectors(self.weight, self.reparam_u, self.reparam_v, store)
            return u_now, v_now, sigma_now, sigma_now.item() == 0.0
        weight = _aligned(self.weight.detach())
        compute_dtype = _compute_dtype(weight.dtype)
        matrix = _matrix(weight, self.weight_layout).to(compute_dtype)
        u_stored, v_stored = self.reparam_u, self.reparam_v
        u_now, v_now = _read(u_stored, compute_dtype), _read(v_stored, compute_dtype)
        wt_v = torch.mv(matrix.t(), v_now)
        # sigma = v^T W u, evaluated as (W^T v) . u: then a forward right after a step and any later forward
        # without one compute it with the very same operations (bitwise equal under checkpoint recomputation).
        sigma_now = torch.dot(wt_v, u_now)
        changed = (F.normalize(wt_v, dim=0).to(u_stored.dtype) != u_stored).any()
        if store and not _woken and getattr(self, "_maybe_plain", True) and not torch.compiler.is_compiling():
            # One host read while the layer may be plain (after a plain reset or a load): wake it exactly.
            # (Compiled graphs cannot branch on data: there a plain layer stays plain, W_hat = W.)
            if not bool((u_stored != 0).any()):
                if _wakes(weight):
                    self.reset_reparam()
                    return self._reparam_vectors(store, _woken=True)
            else:
                self._maybe_plain = False
        u_new_stored, v_new_stored, u_new, v_new, sigma_new = _power_step(
            matrix, u_now, u_stored.dtype, v_stored.dtype, compute_dtype
        )
        if store:
            u_stored.copy_(torch.where(changed, u_new_stored, u_stored))
            v_stored.copy_(torch.where(changed, v_new_stored, v_stored))
        u_now = torch.where(changed, u_new, u_now)
        v_now = torch.where(changed, v_new, v_now)
        sigma_now = torch.where(changed, sigma_new, sigma_now)
        return u_now, v_now, sigma_now, sigma_now == 0

    @_full_precision
    def _host_vectors(
        self, weight: torch.Tensor, u_stored: torch.Tensor, v_stored: torch.Tensor, store: bool, _woken: bool = False
    ):
        """:meth:`_reparam_vectors` with its decisions read on the host (CPU): ``(u, v, sigma, W_mm)``.

        The same operations in the same order as the branch-free path (the same bits: a run may switch between
        the two), the step skipped when the weight did not change. ``W_mm`` is the (in, out) view of the detached
        weight, the fused matmul's operand for Linear and Conv1D layouts, when the power iteration runs in the
        weight's dtype (else None). With ``store`` a plain layer whose weight became nonzero wakes. No no-grad
        context: no graph is recorded (the weight is detached, the buffers need no grad). The returned u, v are
        fresh tensors (autograd keeps them while later forwards may overwrite the buffers).
        """
        compute_dtype = _compute_dtype(weight.dtype)
        # Aligned operands: the same bits whether the weight was allocated here or mapped from a checkpoint.
        matrix = _matrix(_aligned(weight.detach()), self.weight_layout).to(compute_dtype)
        v_now = _read(v_stored, compute_dtype)
        matrix_t = matrix.t()
        wt_v = torch.mv(matrix_t, v_now)
        u_now = _normalize(wt_v)
        if torch.equal(u_now.to(u_stored.dtype), u_stored):  # u is still the image of v: the weight did not change
            if u_stored.dtype is not compute_dtype:  # sigma from the stored (rounded) u, as the branch-free path
                u_now = _read(u_stored, compute_dtype)
            sigma = torch.dot(wt_v, u_now)
        else:
            u_new, v_new, u_now, v_now, sigma = _power_step(
                matrix, _read(u_stored, compute_dtype), u_stored.dtype, v_stored.dtype, compute_dtype
            )
            if store:
                u_stored.copy_(u_new)
                v_stored.copy_(v_new)
        if store and not _woken and sigma.item() == 0.0 and _wakes(weight):
            self.reset_reparam()  # wake: the weight of a plain layer became nonzero
            return self._host_vectors(weight, u_stored, v_stored, store, _woken=True)
        return u_now, v_now, sigma, matrix_t if compute_dtype is weight.dtype else None

    def _check_materialised(self, what: str) -> None:
        if self.weight.is_meta:
            raise RuntimeError(
                f"{type(self).__name__}.{what}() needs real weights, but the weight is on the meta device; "
                "materialise the model first (e.g. after from_pretrained or to_empty) and call it then"
            )

    @_full_precision
    @torch.no_grad()
    def reset_reparam(self) -> None:
        """Sets u, v to the top singular vectors of the current weight (float64) and ``reparam_scale`` to sigma.

        So ``W_hat = W`` (bitwise in float32) right after: use it after converting or after loading raw weights.
        The top singular pair comes from a float64 eigendecomposition of the smaller Gram matrix (``W^T W`` or
        ``W W^T``; the same pair a float64 SVD gives, several times faster for tall matrices such as tied LM
        heads), with its sign fixed (the largest-magnitude entry of v positive, the first such entry on ties), so
        the buffers are a deterministic function of the weight. ``reparam_scale`` is then set to the layer's own
        estimate ``v^T W u`` from those vectors, equal to the largest singular value up to rounding.

        An all-zero weight (common for zero-initialised output projections), or one with no entry of magnitude
        1e-12 or more (the power iteration's normalisation floor), gets ``u = v = 0`` and ``reparam_scale = 0``:
        the layer is *plain* (``W_hat = W``, the gradient of a stock layer) until a training forward sees a
        weight above that floor, which resets it from that weight (``W_hat = W`` again at that moment).
        Raises RuntimeError for weights on the meta device and ValueError for non-finite weights.
        """
        self._check_materialised("reset_reparam")
        weight = self.weight.detach()
        compute_dtype = _compute_dtype(weight.dtype)
        self._reparam_cache = None
        matrix64 = _matrix(weight, self.weight_layout).to(torch.float64)
        if not bool(torch.isfinite(matrix64).all()):
            raise ValueError(f"{type(self).__name__}.reset_reparam(): the weight contains inf or nan")
        out_features, in_features = matrix64.shape
        if matrix64.numel() == 0 or not bool(matrix64.any()):
            self._make_plain()
            return
        if in_features <= out_features:
            right = torch.linalg.eigh(matrix64.t() @ matrix64).eigenvectors[:, -1]
            left = matrix64 @ right
        else:
            left = torch.linalg.eigh(matrix64 @ matrix64.t()).eigenvectors[:, -1]
        left = F.normalize(left, dim=0)
        # eigh's sign is arbitrary (it may differ between LAPACK builds or thread counts): fix it
        if float(left[int(torch.argmax(left.abs()))]) < 0:
            left = -left
        self.reparam_v.copy_(left)
        # u = normalize(W^T v) exactly as a training forward computes it, so the first forward sees an up-to-date
        # estimate (no step) and sigma equals reparam_scale bitwise.
        matrix = _matrix(_aligned(weight), self.weight_layout).to(compute_dtype)
        wt_v = torch.mv(matrix.t(), _read(self.reparam_v, compute_dtype))
        estimate = torch.dot(wt_v, F.normalize(wt_v, dim=0))
        # a weight below the normalisation floor (its estimate would be wrong or underflow): plain as well
        if not bool((matrix.abs() >= _WAKE_ABOVE).any()) or float(estimate) == 0.0:
            self._make_plain()
            return
        self.reparam_u.copy_(F.normalize(wt_v, dim=0))
        self.reparam_scale.copy_(torch.dot(wt_v, _read(self.reparam_u, compute_dtype)))

    @torch.no_grad()
    def _align_storage(self) -> None:
        """Moves a weight or u/v buffer whose CPU data is off the 64-byte boundary (mapped from a checkpoint file)
        into a fresh allocation, once: forwards then need no aligned copy per call (see ``_aligned``).
        The same tensor objects (``.data`` replaced), so tied weights, hooks and references stay valid."""
        for tensor in (self.weight, self.reparam_u, self.reparam_v):
            aligned = _aligned(tensor.data)
            if aligned is not tensor.data:
                tensor.data = aligned

    def _make_plain(self) -> None:
        self._maybe_plain = True
        self.reparam_u.zero_()
        self.reparam_v.zero_()
        self.reparam_scale.zero_()


class SigmaReparamMixin(_PowerIterationState):
    """sigmaReparam for any layer class whose weight has a known layout; put it first in the bases.

    The class attribute ``weight_layout`` says how the weight is stored: ``"out_in"`` (``nn.Linear``),
    ``"in_out"`` (transformers' GPT-2 ``Conv1D``: forward is ``addmm(bias, x.view(-1, in), W)``) or ``"conv"``
    (torch ConvNd; kernel flattened to (out, in * prod(kernel))).

    Adds parameter ``reparam_scale`` and buffers ``reparam_u`` / ``reparam_v``; see the module docstring for the
    power-iteration and plain-layer rules. ``cache_effective_weight`` (default True) lets ``effective_weight()``
    (:mod:`hf_normsoftmax.sigma_reparam_tools`) keep its result (one weight copy) in ``_reparam_cache`` for repeated
    calls; forwards never use it.
    ``fused_cpu_matmul`` (default True) lets Linear / Conv1D forwards on CPU fold ``scale / sigma`` into the
    matmul instead of materialising ``W_hat`` (same math).

    Example (transformers' GPT-2 Conv1D)::

        from transformers.pytorch_utils import Conv1D

        class SigmaReparamConv1D(SigmaReparamMixin, Conv1D):
            weight_layout = "in_out"

        layer = SigmaReparamConv1D.from_module(Conv1D(nf=8, nx=4))  # converted in place
    """

    weight_layout: str | None = None
    cache_effective_weight: bool = True
    fused_cpu_matmul: bool = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup_reparam()

    # -- effective weight ----------------------------------------------------------------------------------------

    @property
    def sigma(self) -> torch.Tensor:
        """The spectral-norm estimate ``v^T W u`` the next forward uses (no grad; float32 for half weights).

        Computed from the current weight, with the pending power-iteration step if the weight changed since the
        buffers were last updated (not stored); 0 for a plain layer.
        """
        return self._reparam_vectors(store=False)[2]

    def _tensors(self) -> tuple:
        """``(weight, bias, reparam_scale, reparam_u, reparam_v)``, read from the module's own dicts.

        ``self.weight`` goes through ``Module.__getattr__`` (a failed attribute lookup first): five of those
        cost as much as the rest of a cached eval forward. Falls back to attribute access for anything not
        registered under its usual name (e.g. a weight turned into a plain attribute by a hook).
        """
        params, buffers = self._parameters, self._buffers
        bias = params["bias"] if "bias" in params else getattr(self, "bias", None)
        return (_registered(self, params, "weight"), bias, _registered(self, params, "reparam_scale"),
                _registered(self, buffers, "reparam_u"), _registered(self, buffers, "reparam_v"))

    def _can_fuse(self, input: torch.Tensor, weight: torch.Tensor, bias) -> bool:
        return (
            self.fused_cpu_matmul
            and self.weight_layout != "conv"
            and input.is_cpu
            and weight.is_cpu
            and input.dtype is weight.dtype
            and (bias is None or bias.dtype is weight.dtype)
            and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu")
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``W_hat`` applied to ``input``, with the vectors of the current weight (never a cached ``W_hat``).

        Training forwards store their power-iteration step and wake a plain layer whose weight became nonzero;
        eval forwards compute the same vectors without storing them. A plain layer is its base layer.
        """
        layout = self.weight_layout
        weight, bias, scale, u, v = self._tensors()
        store = self.training
        if _decided_on_host(weight):
            u, v, sigma, w_mm = self._host_vectors(weight, u, v, store)
            sigma_value = sigma.item()
            plain = sigma_value == 0.0
        else:
            u, v, sigma, plain = self._reparam_vectors(store)  # plain: a tensor, decided on the device
        if plain is True:
            return self._forward_with(input, weight, bias)
        if plain is False and self._can_fuse(input, weight, bias):
            floor = _sigma_floor(sigma.dtype)
            if sigma_value < floor:
                sigma_value = floor
            alpha = scale.item() / sigma_value
            # Out of the dtype's range (a diverged layer): the tensor path below, which gives inf / nan as a stock
            # layer would (a Python scalar out of range makes torch raise instead).
            if _in_range(alpha, weight.dtype) == alpha:
                flat = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
                if not torch.is_grad_enabled():  # inference: the same addmm without the autograd Function
                    out = _scaled_addmm(flat, weight, bias, alpha, layout, w_mm)
                else:
                    out = _ReparamMatmul.apply(flat, weight, bias, scale, (u, v, alpha, sigma_value, layout, w_mm))
                return out if input.dim() == 2 else out.view(input.shape[:-1] + (out.shape[1],))
        weight_hat = _ScaledWeight.apply(weight, scale, u, v, sigma, layout)
        return self._forward_with(input, weight_hat, bias)

    def _forward_with(self, input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        """The base layer's computation with ``weight`` in place of its own."""
        layout = self.weight_layout
        if layout == "out_in":
            return F.linear(input, weight, bias)
        if layout == "conv":
            return self._conv_forward(input, weight, bias)
        # "in_out" (transformers' Conv1D): weight (in, out)
        size_out = input.shape[:-1] + (weight.shape[1],)
        flat = input.reshape(-1, input.shape[-1])
        out = torch.addmm(bias, flat, weight) if bias is not None else torch.mm(flat, weight)
        return out.view(size_out)

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    def train(self, mode: bool = True):
        self._reparam_cache = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._reparam_cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._reparam_cache = None
        self._maybe_plain = True
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        base = super().extra_repr() if hasattr(super(), "extra_repr") else ""
        return f"{base}, sigma_reparam" if base else "sigma_reparam"


class _ResetsWithBaseLayer:
    """For base layers with a ``reset_parameters()`` (torch's Linear and ConvNd; GPT-2's ``Conv1D`` has none): the
    base layer's reset, then :meth:`~SigmaReparamMixin.reset_reparam` from the new weight (once the buffers exist)."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "reparam_u" in self._buffers and not self.weight.is_meta:
            self.reset_reparam()


class SigmaReparamLinear(SigmaReparamMixin, _ResetsWithBaseLayer, nn.Linear):
    """``nn.Linear`` with sigmaReparam. Same constructor as ``nn.Linear``.

    Example::

        layer = SigmaReparamLinear(64, 128)
        y = layer(torch.randn(2, 64))
        layer.sigma, layer.reparam_scale  # both equal sigma(W) right after construction
    """

    weight_layout = "out_in"


class SigmaReparamConv2d(SigmaReparamMixin, _ResetsWithBaseLayer, nn.Conv2d):
    """``nn.Conv2d`` with sigmaReparam, the kernel flattened to (out, in / groups * kh * kw) for sigma.

    Example::

        patch_embed = SigmaReparamConv2d(3, 192, kernel_size=16, stride=16)
        tokens = patch_embed(torch.randn(1, 3, 224, 224))
    """

    weight_layout = "conv"
