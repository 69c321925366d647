"""The state a variant adds to a transformers model, and how it is built, initialised and checked at loading.

* sigmaReparam: ``SigmaReparamConv1D`` (GPT-2's transposed ``Conv1D``) next to the ``nn.Linear`` / ``nn.Conv2d``
  versions of :mod:`hf_normsoftmax.sigma_reparam`, and :func:`apply_sigma_reparam`, which converts the layers a
  config selects;
* learnable per-head gammas (:func:`add_learnable_gamma`) and QK-norm modules (:func:`add_qk_norm`);
* initialisation from the weights actually loaded (:func:`finish_normsoftmax_init`: a converted stock checkpoint
  computes exactly the stock function; the unconditional reset for weights copied in later is
  :func:`hf_normsoftmax.state_reset.reset_normsoftmax_state`, package only) and the checks that a variant
  checkpoint holds the trained entries it was saved with (:func:`missing_trained_state`, :func:`check_loaded_weights`).

Copied into remote-code checkpoints: imports only torch, transformers and same-folder modules.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from .configuration_normsoftmax import DEFAULT_NORMSOFTMAX_GAMMA
from .hf_attention import KEY_NORM_MODULE, LEARNABLE_GAMMA_PARAMETER, QUERY_NORM_MODULE
from .qk_norm import HeadNorm
from .sigma_reparam import SigmaReparamConv2d, SigmaReparamLinear, SigmaReparamMixin
from .sigma_reparam_ops import _matrix

logger = logging.get_logger(__name__)

# State-dict entries a stock checkpoint does not have; initialised after loading (see finish_normsoftmax_init).
NEW_KEY_PATTERNS = (
    r"\.reparam_scale$", r"\.reparam_u$", r"\.reparam_v$", rf"\.{LEARNABLE_GAMMA_PARAMETER}$",
    rf"\.(?:{QUERY_NORM_MODULE}|{KEY_NORM_MODULE})\.(?:weight|bias)$",
)
NEW_KEY = re.compile("|".join(NEW_KEY_PATTERNS))
QK_NORM_KEY = re.compile(NEW_KEY_PATTERNS[-1])
REPARAM_STATE_NAMES = ("reparam_scale", "reparam_u", "reparam_v")



class SigmaReparamConv1D(SigmaReparamMixin, Conv1D):
    """GPT-2's ``Conv1D`` (weight stored ``(in, out)``) with sigmaReparam: ``y = x @ (s / sigma(W)) W + b``.

    Keeps the stock parameter names ``weight``/``bias`` and adds ``reparam_scale`` and the power-iteration buffers
    ``reparam_u``/``reparam_v``, so stock GPT-2 checkpoints load 1:1. Same constructor as ``Conv1D``.

    Example:

    ```python
    >>> layer = SigmaReparamConv1D(96, 32)  # 32 -> 96 features, like Conv1D(nf=96, nx=32)
    >>> y = layer(torch.randn(2, 5, 32))
    >>> converted = SigmaReparamConv1D.from_module(Conv1D(96, 32))  # in place, outputs unchanged
    ```
    """

    weight_layout = "in_out"

    def __repr__(self) -> str:
        return f"SigmaReparamConv1D(nf={self.nf}, nx={self.nx})"


# Converted layer classes, one per stock layer class (exact type).
SIGMA_REPARAM_LAYER_TYPES = (SigmaReparamLinear, SigmaReparamConv2d, SigmaReparamConv1D)


def apply_sigma_reparam(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[str]:
    """Convert the selected ``nn.Linear`` / GPT-2 ``Conv1D`` / ``nn.Conv2d`` layers of ``model`` in place.

    ``include``/``exclude``: fnmatch patterns over qualified module names (``None`` includes every layer); a layer
    is converted when its type is exactly one of those stock classes (see ``hf_normsoftmax.sigma_reparam_``, the
    general form). Modules stay the same objects (tied weights stay tied, state-dict keys stay stock). Returns the
    converted names; warns about include patterns that select nothing.
    """
    by_base = {layer_type._reparam_base_class(): layer_type for layer_type in SIGMA_REPARAM_LAYER_TYPES}
    names = []
    for name, module in list(model.named_modules()):  # shared modules are listed (and converted) once
        target = by_base.get(type(module))
        if target is not None and _matches(include, name, True) and not _matches(exclude, name, False):
            target.from_module(module)
            names.append(name)
    if include is not None:
        unused = [p for p in include if not any(fnmatch.fnmatchcase(name, p) for name in names)]
        if unused:
            logger.warning(f"`sigma_reparam_include` patterns {unused} select no layer of {type(model).__name__}.")
    return names


def _matches(patterns: list[str] | None, name: str, if_none: bool) -> bool:
    return if_none if patterns is None else any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _is_meta(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.device.type == "meta"


def _loaded(tensor: torch.Tensor | None) -> bool:
    # transformers flags every tensor it loads from a checkpoint (and tied ones) with `_is_hf_initialized`
    return tensor is not None and bool(getattr(tensor, "_is_hf_initialized", False))


def add_learnable_gamma(model: nn.Module, attention_classes: tuple[type, ...], config: Any) -> int:
    """Give every attention module a per-head gamma parameter ``normsoftmax_scale`` (heads, 1, 1)."""
    count = 0
    for module in model.modules():
        if isinstance(module, attention_classes) and getattr(module, LEARNABLE_GAMMA_PARAMETER, None) is None:
            num_heads = config.num_attention_heads
            device = next(module.parameters()).device
            value = torch.full((num_heads, 1, 1), float(config.normsoftmax_gamma), device=device)
            module.register_parameter(LEARNABLE_GAMMA_PARAMETER, nn.Parameter(value))
            count += 1
    return count


def add_qk_norm(model: nn.Module, attention_classes: tuple[type, ...], config: Any) -> int:
    """Give every attention module the QK-norm modules ``normsoftmax_q_norm`` / ``normsoftmax_k_norm``
    (:class:`~hf_normsoftmax.qk_norm.HeadNorm` of kind ``config.qk_norm`` over the head dimension)."""
    count = 0
    for module in model.modules():
        if isinstance(module, attention_classes) and getattr(module, QUERY_NORM_MODULE, None) is None:
            head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
            head_dim = head_dim or config.hidden_size // config.num_attention_heads
            device = next(module.parameters()).device
            for name in (QUERY_NORM_MODULE, KEY_NORM_MODULE):
                module.add_module(name, HeadNorm(int(head_dim), kind=config.qk_norm, device=device))
            count += 1
    return count


def _qk_norms(module: nn.Module) -> list[HeadNorm]:
    return [norm for norm in (getattr(module, QUERY_NORM_MODULE, None), getattr(module, KEY_NORM_MODULE, None))
            if isinstance(norm, HeadNorm)]


def _reparam_shape_changed(module: SigmaReparamMixin) -> bool:
    out_features, in_features = _matrix(module.weight, module.weight_layout).shape
    return tuple(module.reparam_v.shape) != (out_features,) or tuple(module.reparam_u.shape) != (in_features,)


@torch.no_grad()
def _refit_resized_reparam(module: SigmaReparamMixin) -> None:
    """The weight of a converted layer was replaced by one of another shape (``resize_token_embeddings`` on a tied
    head): rebuild ``u``, ``v`` for the new weight and keep the layer's function on the old rows.

    The effective weight was ``(s / sigma_old) W_old``; resizing keeps the old rows as a prefix, so the new scale
    is ``(s / sigma_old) * sigma_new`` (same factor on every row). ``sigma_old`` is re-evaluated from the old
    vectors on that prefix; where that is not possible the layer restarts at ``s = sigma`` (factor 1).
    """
    factor = None
    old_u, old_v, old_scale = module.reparam_u, module.reparam_v, module.reparam_scale.detach().clone()
    out_features, in_features = _matrix(module.weight, module.weight_layout).shape
    if module.weight_layout == "out_in" and old_u.shape[0] == in_features and old_v.shape[0] <= out_features:
        old_rows = module.weight.detach()[: old_v.shape[0]].to(old_u.dtype)
        old_sigma = torch.dot(old_v, torch.mv(old_rows, old_u))
        if float(old_sigma) > 0:
            factor = old_scale / old_sigma
    else:
        logger.warning(f"{type(module).__name__}: weight reshaped, sigmaReparam state restarted at scale = sigma.")
    requires_grad = module.reparam_scale.requires_grad
    del module.reparam_scale, module.reparam_u, module.reparam_v
    module._setup_reparam()  # new buffers sized for the new weight, reset from it
    module.reparam_scale.requires_grad_(requires_grad)
    if factor is not None:
        module.reparam_scale.mul_(factor.to(module.reparam_scale.dtype))
    module._normsoftmax_init_done = True


def finish_normsoftmax_init(model: nn.Module) -> None:
    """Initialise what loading did not provide, from the final weights (after loading and weight tying).

    * sigmaReparam layers whose ``reparam_scale`` was not loaded: ``reset_reparam()`` from the current weight
      (the loaded one, or the tied embedding for a tied head), so a converted stock checkpoint computes exactly
      the stock function; likewise layers whose weight was not loaded (a head re-initialised by
      ``ignore_mismatched_sizes``): a loaded scale belongs to the checkpoint's weight, not to the new one;
    * learnable gammas that were not loaded: ``normsoftmax_gamma``; QK-norms that were not loaded: weight 1, bias 0
      (a warning says that this changes the function of loaded attention weights);
    * sigmaReparam weights and u/v buffers mapped from the checkpoint file off the 64-byte boundary are moved to a
      fresh allocation (the layer would otherwise make an aligned copy in every forward, for bit-exact results).

    Runs once per tensor: later calls (e.g. ``tie_weights()`` after ``resize_token_embeddings``) never reset
    trained values. Layers still on the meta device are left for the call at the end of ``from_pretrained``.
    """
    config = getattr(model, "config", None)
    new_norms_on_loaded_attention = []
    for module in model.modules():
        if isinstance(module, SigmaReparamMixin) and not _is_meta(module.weight):
            module._align_storage()  # mapped from the checkpoint file: no aligned copy in every forward
            if _reparam_shape_changed(module):
                _refit_resized_reparam(module)
        if isinstance(module, SigmaReparamMixin) and not getattr(module, "_normsoftmax_init_done", False):
            if _is_meta(module.weight) or _is_meta(module.reparam_scale):
                continue
            if _loaded(module.reparam_scale) and _loaded(module.weight):
                if not (_loaded(module.reparam_u) and _loaded(module.reparam_v)):
                    # scale from the checkpoint, vectors not: rebuild only the power-iteration state
                    loaded_scale = module.reparam_scale.detach().clone()
                    module.reset_reparam()
                    with torch.no_grad():
                        module.reparam_scale.copy_(loaded_scale)
            else:
                module.reset_reparam()
            module._normsoftmax_init_done = True
        learned_gamma = getattr(module, LEARNABLE_GAMMA_PARAMETER, None)
        if isinstance(learned_gamma, nn.Parameter) and not getattr(module, "_normsoftmax_gamma_init_done", False):
            if _is_meta(learned_gamma):
                continue
            if not _loaded(learned_gamma):
                with torch.no_grad():
                    learned_gamma.fill_(float(getattr(config, "normsoftmax_gamma", DEFAULT_NORMSOFTMAX_GAMMA)))
            module._normsoftmax_gamma_init_done = True
        for norm in _qk_norms(module):
            if getattr(norm, "_normsoftmax_init_done", False) or _is_meta(norm.weight):
                continue
            if not _loaded(norm.weight):  # a stock checkpoint: the norms start at scale 1 (not function-preserving)
                norm.reset_parameters()
                if any(_loaded(p) for n, p in module.named_parameters() if not n.startswith("normsoftmax_")):
                    new_norms_on_loaded_attention.append(norm.kind)
            norm._normsoftmax_init_done = True
    if new_norms_on_loaded_attention:
        logger.warning(
            f"`qk_norm`={new_norms_on_loaded_attention[0]!r} on attention weights loaded from a checkpoint without "
            f"it ({len(new_norms_on_loaded_attention)} norms): they start at weight 1, so the model computes another "
            "function than the checkpoint (unlike `sigma_reparam`, QK-norm is not function-preserving); fine-tune it."
        )


def checkpoint_config_dict(path, kwargs: dict) -> dict | None:
    """The config.json of the checkpoint ``path`` as a dict (``from_pretrained``'s Hub arguments honoured), or None."""
    hub_kwargs = {
        k: kwargs[k]
        for k in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "gguf_file")
        if k in kwargs
    }
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(path, **hub_kwargs)
    except (OSError, ValueError):
        return None
    return config_dict


def missing_state(
    model: nn.Module,
    sigma_reparam: bool,
    learnable_gamma: bool,
    converted: Callable[[str], bool],
    loaded: Callable[[str], bool],
    same_class: bool,
    qk_norm: bool = False,
) -> list[str]:
    """The new entries of ``model`` a source with these features should have held, but did not.

    ``converted(name)``: whether the source converted the sigmaReparam layer ``name``; ``same_class``: whether the
    source was saved by the class of ``model``. A layer's entries are required when its ``weight`` was loaded; an
    attention module's gamma when any of its weights was. A head tied to an embedding (GPT-2's ``lm_head``) gets
    its weight from the embedding: its entries are required only when the source had the head, that is when it
    comes from the same class or holds another entry of the head (a base model's checkpoint has no head).
    """
    if not (sigma_reparam or learnable_gamma or qk_norm):
        return []
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})

    def weight_loaded(dot_name: str) -> bool:
        key = f"{dot_name}weight"
        source = tied.get(key)
        if source is None:
            return loaded(key)
        if not (loaded(key) or loaded(source)):
            return False
        return same_class or any(loaded(f"{dot_name}{entry}") for entry in ("bias", *REPARAM_STATE_NAMES))

    weight_keys = [key for key in model.state_dict() if not NEW_KEY.search(key)]
    missing = []
    for name, module in model.named_modules():
        dot_name = f"{name}." if name else ""
        if sigma_reparam and isinstance(module, SigmaReparamMixin) and weight_loaded(dot_name) and converted(name):
            missing += [f"{dot_name}{state}" for state in REPARAM_STATE_NAMES if not loaded(f"{dot_name}{state}")]
        if learnable_gamma and isinstance(getattr(module, LEARNABLE_GAMMA_PARAMETER, None), nn.Parameter):
            key = f"{dot_name}{LEARNABLE_GAMMA_PARAMETER}"
            if not loaded(key) and any(loaded(k) for k in weight_keys if k.startswith(dot_name)):
                missing.append(key)
        for norm_name in (QUERY_NORM_MODULE, KEY_NORM_MODULE) if qk_norm else ():
            norm = getattr(module, norm_name, None)
            if not isinstance(norm, HeadNorm) or not any(loaded(k) for k in weight_keys if k.startswith(dot_name)):
                continue
            missing += [key for key in (f"{dot_name}{norm_name}.{n}" for n, _ in norm.named_parameters())
                        if not loaded(key)]
    return sorted(missing)


def _saved_by_class_of(model: nn.Module, checkpoint_config: dict) -> bool:
    return type(model).__name__ in (checkpoint_config.get("architectures") or ())


def _checkpoint_layer_names(model: nn.Module, name: str, checkpoint_config: dict) -> list[str]:
    """The names the layer ``name`` of ``model`` may have had in the model that saved the checkpoint: the same
    name, or with transformers' base-model prefix taken off or put on (a head loaded from a base model, or the
    reverse), unless the checkpoint's ``architectures`` name the loading class."""
    if _saved_by_class_of(model, checkpoint_config):
        return [name]
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return [name]
    if name.startswith(f"{prefix}."):
        return [name, name[len(prefix) + 1:]]
    if getattr(model, prefix, None) is None:  # a base model: the checkpoint may be a head model's
        return [name, f"{prefix}.{name}"]
    return [name]


def missing_trained_state(model: nn.Module, checkpoint_config: dict | None, loaded: Callable[[str], bool]) -> list[str]:
    """The sigmaReparam / learnable-gamma entries of ``model`` that the checkpoint should have provided, but did not.

    A checkpoint saved by a variant with ``sigma_reparam`` (``normsoftmax_learnable_gamma``) on, as its config.json
    says (a ``normsoftmax_*`` model type and the flag true), holds ``reparam_scale`` / ``reparam_u`` / ``reparam_v``
    for every layer it converted (per its ``sigma_reparam_include`` / ``_exclude``) and ``normsoftmax_scale`` for
    every attention module. Such an entry is missing trained state when the layer's (the attention module's)
    weights came from the checkpoint but the entry did not: initialising it from the loaded weights would compute
    something else than the trained model. Stock checkpoints, and variant checkpoints saved without the flag, have
    no such state: nothing is required, the entries are initialised from the loaded weights (the conversion).

    Args:
        checkpoint_config: the checkpoint's config.json as a dict (None: unknown, nothing is required).
        loaded: whether the model's state-dict entry ``key`` came from the checkpoint.
    """
    if not checkpoint_config or not str(checkpoint_config.get("model_type", "")).startswith("normsoftmax_"):
        return []
    include = checkpoint_config.get("sigma_reparam_include")
    exclude = checkpoint_config.get("sigma_reparam_exclude")

    def matches(patterns, names: Iterable[str]) -> bool:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns)

    def converted(name: str) -> bool:
        # where the name in the saving model is not certain, a layer any of its possible names excludes is not
        # required (a missing report must never be a false alarm)
        names = _checkpoint_layer_names(model, name, checkpoint_config)
        return (include is None or matches(include, names)) and not (exclude is not None and matches(exclude, names))

    return missing_state(
        model,
        sigma_reparam=bool(checkpoint_config.get("sigma_reparam", False)),
        learnable_gamma=bool(checkpoint_config.get("normsoftmax_learnable_gamma", False)),
        converted=converted,
        loaded=loaded,
        same_class=_saved_by_class_of(model, checkpoint_config),
        qk_norm=checkpoint_config.get("qk_norm") is not None,
    )


def check_loaded_weights(model: PreTrainedModel, loading_info: dict, source: Any) -> None:
    """Refuse loads that would silently compute something else than the checkpoint, as far as transformers does not
    report them itself.

    * The checkpoint has sigmaReparam scales / learnable gammas for layers the model loads without them: the model
      would run the raw weights instead of the trained effective ones, and transformers' report would list them
      as unexpected keys of a checkpoint that otherwise loaded. Refused. Entries of layers the model does not have
      at all (their weights are unexpected too, e.g. the head of a classifier loaded with ``AutoModel``) are
      dropped with those layers, as transformers drops their weights.
    * None of the model's weights is in the checkpoint (another architecture's weights, a base model saved under
      other names): as transformers does, the model is initialised and the load reported (its missing keys in
      transformers' load report and ``loading_info``), with a warning naming the checkpoint.
    """
    missing = set(loading_info.get("missing_keys", ()))
    unexpected = set(loading_info.get("unexpected_keys", ()))
    model_keys = [k for k in model.state_dict() if not NEW_KEY.search(k)]
    if model_keys and all(k in missing for k in model_keys):
        logger.warning(
            f"None of the {len(model_keys)} weights of {type(model).__name__} is in the checkpoint {source!r} (it "
            f"has {len(unexpected)} other weights, e.g. {sorted(unexpected)[:3]}): every weight is newly "
            "initialised. A checkpoint of another architecture loads with the model class of its own architecture."
        )
    unexpected_weights = [k for k in unexpected if not NEW_KEY.search(k)]

    def dropped_with_its_layer(key: str) -> bool:
        layer = key.rpartition(".")[0]
        return bool(layer) and any(k.startswith(f"{layer}.") for k in unexpected_weights)

    dropped = sorted(k for k in unexpected if NEW_KEY.search(k) and not dropped_with_its_layer(k))
    if dropped:
        config = model.config
        raise ValueError(
            f"The checkpoint {source!r} has sigmaReparam / learnable-gamma / QK-norm weights the model would ignore "
            f"({dropped[:3]}...): with `sigma_reparam`={config.sigma_reparam!r}, `normsoftmax_learnable_gamma`="
            f"{config.normsoftmax_learnable_gamma!r} and `qk_norm`={getattr(config, 'qk_norm', None)!r} it would "
            "compute with the raw weights, not the trained ones. "
            "Allowed: load it with the flags it was saved with (the defaults of its config.json)."
        )


def missing_trained_state_error(
    source: Any,
    missing: list[str],
    action: str,
    what: str = "sigmaReparam / learnable-gamma / QK-norm entries of layers whose weights it holds",
    allowed: str = "Allowed: a complete state dict; a stock one (none of these entries) loads with strict=False, "
    "then call hf_normsoftmax.reset_normsoftmax_state(model).",
) -> ValueError:
    """The error of a load that would lose trained state: ``missing`` are the model's entries ``source`` lacks."""
    shown = f"{missing[:8]}{' ...' if len(missing) > 8 else ''}"
    return ValueError(
        f"{action}: {source!r} lacks {len(missing)} {what}: {shown}. The model "
        f"would keep other values for them, not the trained ones (a damaged or incomplete checkpoint). {allowed}"
    )
