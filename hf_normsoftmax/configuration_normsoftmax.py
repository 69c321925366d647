"""Configurations of the NormSoftmax variants of ViT, BERT and GPT-2.

Each variant config subclasses the stock config (every stock field keeps working, stock ``config.json`` files load
into it) and adds the flags below. With every flag at its default a variant computes exactly what the stock model
computes; each flag switches one method on.

| flag | allowed | default | effect |
|---|---|---|---|
| ``attention_softmax`` | ``"softmax"``, ``"normsoftmax"`` | ``"softmax"`` | softmax used inside dot-product attention |
| ``normsoftmax_gamma`` | [1e-3, 1e2] | ``DEFAULT_NORMSOFTMAX_GAMMA`` | attention logits normalised to std gamma |
| ``normsoftmax_learnable_gamma`` | bool | ``False`` | one learnable gamma per head (parameter ``normsoftmax_scale``) |
| ``normsoftmax_max_temperature`` | ``None`` or [1e-2, 1e6] | ``None`` | cap on the temperature ``T = std / gamma`` |
| ``normsoftmax_statistic`` | ``"std"``, ``"var"`` | ``"std"`` | spread statistic of the logits |
| ``normsoftmax_eps`` | [1e-14, 1] | ``1e-6`` | added to the variance |
| ``loss_softmax`` | ``"softmax"``, ``"normsoftmax"`` | ``"softmax"`` | softmax of the classification / LM heads |
| ``loss_normsoftmax_gamma`` | [1e-3, 1e2] | ``DEFAULT_LOSS_NORMSOFTMAX_GAMMA`` | head logits normalised to std gamma |
| ``logit_inverse_temperature`` | [1e-3, 1e2] | ``1.0`` | beta: head logits are ``beta * z`` |
| ``sigma_reparam`` | bool | ``False`` | sigmaReparam on the selected layers |
| ``sigma_reparam_include`` | ``None`` or list of patterns | ``None`` | layers to convert (``None``: all) |
| ``sigma_reparam_exclude`` | ``None`` or list of patterns | ``None`` | layers never converted |
| ``qk_norm`` | ``None``, ``"rms"``, ``"layer"`` | ``None`` | QK-norm: RMSNorm / LayerNorm of each head's q and k |

The numeric ranges are ``GAMMA_RANGE``, ``INVERSE_TEMPERATURE_RANGE``, ``MAX_TEMPERATURE_RANGE`` and ``EPS_RANGE`` of
``hf_normsoftmax.normsoftmax`` (where the measurements behind them are written down); the math functions refuse
values outside them too. Inside them every output and gradient is finite in float32 and bfloat16, whatever the
logits (constant rows included). Learned per-head gammas (``normsoftmax_learnable_gamma``) may drift out of
[1e-3, 1e2] during training: the attention clamps them into it where it uses them (the parameter keeps its value;
a clamped gamma gets no gradient until the optimiser, e.g. weight decay, brings it back).

sigmaReparam layer selection: the candidates are every ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Conv2d`` (the ViT
patch embedding) of the model, heads included. A candidate is converted when its qualified module name (as in
``model.named_modules()``, for example ``bert.encoder.layer.0.attention.self.query``) matches one of the
``sigma_reparam_include`` patterns (``None`` selects every candidate) and none of the ``sigma_reparam_exclude``
patterns. Patterns are shell-style (``fnmatch``, ``*`` also matches dots), as in ``sigma_reparam_``: for example
``["*.attention.*"]`` or ``exclude=["classifier", "*lm_head"]``.

Combinations that would silently do nothing are refused: ``logit_inverse_temperature != 1`` together with
``loss_softmax="normsoftmax"`` (normalising the logits removes any scale), and ``normsoftmax_learnable_gamma=True``
with ``attention_softmax="softmax"`` (the parameters would never be used). The other ``normsoftmax_*`` values are
kept but unused while ``attention_softmax="softmax"``, so a config can be switched back and forth.

Every check runs at construction and again at every later assignment (``config.flag = value``): an assignment
that would make a refused combination raises and leaves the config as it was. ``config.update({...})`` sets its
keys together and checks the combination once, after all of them (and restores every key if that fails).

QK-norm (``qk_norm``) normalises each head's queries and keys over the head dimension before the logits (the
weight, and the LayerNorm bias, are learned, shared by the heads of a layer, and start at 1 and 0). It combines with
either attention softmax. Unlike ``sigma_reparam`` it changes what a pretrained checkpoint computes: converted
weights need fine-tuning. The decoder variants refuse it: their queries and keys reach the attention after the
rotary embedding, where a norm with a learned per-feature scale is not QK-norm as Qwen3 or Gemma 3 define it.

The structural flags ``sigma_reparam``, ``sigma_reparam_include``, ``sigma_reparam_exclude``, ``qk_norm`` and
``normsoftmax_learnable_gamma`` decide which modules and parameters a model has, when the model is built. On the
config of a built model they can no longer change (the model would not follow, while the saved config and card
would claim the change): such an assignment raises and names the ways to get a model with the new flags
(``hf_normsoftmax.convert_stock_model`` for a stock model, or ``from_pretrained(saved_dir, sigma_reparam=True)``).
The other flags are read at every forward and may change at any time.

A keyword one edit away from a flag name (one letter inserted, deleted, replaced, or two neighbours swapped:
``sigma_reparm``, ``attention_softmx``) is refused with a TypeError naming the flag, wherever it comes from: the
constructor, ``AutoConfig.for_model``, ``from_pretrained(..., **kwargs)``, a ``config.json`` being loaded,
``config.update`` or an assignment. transformers would otherwise store it as an extra attribute and do nothing.

The default gammas (``DEFAULT_NORMSOFTMAX_GAMMA``, ``DEFAULT_LOSS_NORMSOFTMAX_GAMMA``) come from a small measured
sweep (``benchmarks/sweep_gamma.py``); its table and command are in ``docs/results.md``, "Default gammas".

Example:

```python
>>> from hf_normsoftmax import NormSoftmaxBertConfig

>>> config = NormSoftmaxBertConfig(
...     hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
...     attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True, sigma_reparam=True,
... )
>>> config.model_type
'normsoftmax_bert'
>>> NormSoftmaxBertConfig(normsoftmax_gamma=-1.0)
Traceback (most recent call last):
...
ValueError: Invalid value for `normsoftmax_gamma`: -1.0. Allowed: a finite number in [0.001, 100].
```
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import math
import threading
import types
import weakref
from dataclasses import dataclass
from typing import Any

from transformers import BertConfig, GPT2Config, ViTConfig

from .normsoftmax import EPS_RANGE, GAMMA_RANGE, INVERSE_TEMPERATURE_RANGE, MAX_TEMPERATURE_RANGE
from .qk_norm import QK_NORM_KINDS

ATTENTION_SOFTMAX_CHOICES = ("softmax", "normsoftmax")
LOSS_SOFTMAX_CHOICES = ("softmax", "normsoftmax")
NORMSOFTMAX_STATISTIC_CHOICES = ("std", "var")
QK_NORM_CHOICES = (None, *QK_NORM_KINDS)

# Defaults of the two gammas, from the sweep of benchmarks/sweep_gamma.py (see "Default gammas" in
# docs/results.md): 2.0 is the only attention gamma in the top two on both tasks; 2.0 is the best head gamma on both.
DEFAULT_NORMSOFTMAX_GAMMA = 2.0
DEFAULT_LOSS_NORMSOFTMAX_GAMMA = 2.0

# Stock model type that each variant converts on load.
STOCK_MODEL_TYPE = {
    "normsoftmax_vit": "vit",
    "normsoftmax_bert": "bert",
    "normsoftmax_gpt2": "gpt2",
    # decoder families (configuration_normsoftmax_decoders.py)
    "normsoftmax_llama": "llama",
    "normsoftmax_qwen2": "qwen2",
    "normsoftmax_qwen3": "qwen3",
    "normsoftmax_mistral": "mistral",
    "normsoftmax_gemma2": "gemma2",
    "normsoftmax_phi3": "phi3",
}
VARIANT_MODEL_TYPE = {stock: variant for variant, stock in STOCK_MODEL_TYPE.items()}

# Flags that decide the modules / parameters of a model when it is built (see "structural flags" above).
STRUCTURAL_FLAGS = (
    "sigma_reparam", "sigma_reparam_include", "sigma_reparam_exclude", "normsoftmax_learnable_gamma", "qk_norm",
)


# ---------------------------------------------------------------------------------------------------------------
# per-flag checks: each returns the (normalised) value or raises naming the flag, the value and what is allowed
# ---------------------------------------------------------------------------------------------------------------


def _invalid(flag: str, value: Any, allowed: str, error: type[Exception] = ValueError) -> Exception:
    return error(f"Invalid value for `{flag}`: {value!r}. Allowed: {allowed}.")


def _choice(choices: tuple[str | None, ...]):
    allowed = " or ".join(repr(c) for c in choices)

    def check(flag: str, value: Any) -> str | None:
        if not (value is None or isinstance(value, str)) or value not in choices:
            raise _invalid(flag, value, allowed)
        return value

    return check


def _number_in(bounds: tuple[float, float], optional: bool = False):
    low, high = bounds
    allowed = f"{'None or ' if optional else ''}a finite number in [{low:g}, {high:g}]"

    def check(flag: str, value: Any) -> float | int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _invalid(flag, value, allowed)
        if not low <= value <= high:
            raise _invalid(flag, value, allowed)
        return value

    return check


def _boolean(flag: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _invalid(flag, value, "True or False")
    return value


def _pattern_list(flag: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise _invalid(flag, value, "None or a list of fnmatch patterns (wrap a single pattern in a list)")
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(p, str) and p for p in value):
        raise _invalid(flag, value, "None or a non-empty list of non-empty fnmatch patterns (strings)")
    return list(value)


_FLAG_CHECKS = {
    "attention_softmax": _choice(ATTENTION_SOFTMAX_CHOICES),
    "normsoftmax_gamma": _number_in(GAMMA_RANGE),
    "normsoftmax_learnable_gamma": _boolean,
    "normsoftmax_max_temperature": _number_in(MAX_TEMPERATURE_RANGE, optional=True),
    "normsoftmax_statistic": _choice(NORMSOFTMAX_STATISTIC_CHOICES),
    "normsoftmax_eps": _number_in(EPS_RANGE),
    "loss_softmax": _choice(LOSS_SOFTMAX_CHOICES),
    "loss_normsoftmax_gamma": _number_in(GAMMA_RANGE),
    "logit_inverse_temperature": _number_in(INVERSE_TEMPERATURE_RANGE),
    "sigma_reparam": _boolean,
    "sigma_reparam_include": _pattern_list,
    "sigma_reparam_exclude": _pattern_list,
    "qk_norm": _choice(QK_NORM_CHOICES),
}
# The flags, in the order of the docstring's table.
NORMSOFTMAX_FLAGS = tuple(_FLAG_CHECKS)


def check_flag_combination(config: Any) -> None:
    """Raise a ValueError for flag combinations that would silently do nothing."""
    beta = getattr(config, "logit_inverse_temperature", 1.0)
    if getattr(config, "loss_softmax", "softmax") == "normsoftmax" and beta != 1.0:
        raise ValueError(
            f"Invalid combination: `logit_inverse_temperature`={beta!r} with `loss_softmax`='normsoftmax'. "
            "NormSoftmax normalises the head logits, which removes any scale beta, so beta would have no effect. "
            "Allowed: `logit_inverse_temperature`=1.0 with `loss_softmax`='normsoftmax' (tune "
            "`loss_normsoftmax_gamma` instead), or any beta with `loss_softmax`='softmax'."
        )
    attention_softmax = getattr(config, "attention_softmax", None)
    if getattr(config, "normsoftmax_learnable_gamma", False) and attention_softmax != "normsoftmax":
        raise ValueError(
            "Invalid combination: `normsoftmax_learnable_gamma`=True with "
            f"`attention_softmax`={attention_softmax!r}. The per-head gammas only exist for NormSoftmax attention. "
            "Allowed: `normsoftmax_learnable_gamma`=True with `attention_softmax`='normsoftmax', or "
            "`normsoftmax_learnable_gamma`=False."
        )
    qk_norm = getattr(config, "qk_norm", None)
    if qk_norm is not None and not getattr(config, "supports_qk_norm", True):
        raise ValueError(
            f"Invalid value for `qk_norm`: {qk_norm!r} on a decoder variant. In the decoder variants the "
            "queries and keys reach the attention after the rotary embedding, where a norm with a learned per-feature "
            "scale is not the QK-norm of Qwen3 / Gemma 3 (those families apply their own before it). Allowed: None; "
            "`qk_norm` is a flag of the ViT, BERT and GPT-2 variants."
        )


# ---------------------------------------------------------------------------------------------------------------
# misspelled flag names
# ---------------------------------------------------------------------------------------------------------------


def _one_edit_apart(a: str, b: str) -> bool:
    """Whether ``a`` becomes ``b`` by one insertion, deletion, substitution or swap of two neighbours."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        if len(diff) == 1:
            return True
        i, j = diff if len(diff) == 2 else (0, 0)
        return j == i + 1 and a[i] == b[j] and a[j] == b[i]
    short, long = (a, b) if len(a) < len(b) else (b, a)
    i = next((k for k, (x, y) in enumerate(zip(short, long, strict=False)) if x != y), len(short))
    return short[i:] == long[i + 1:]


def misspelled_flag(name: Any) -> str | None:
    """The flag that ``name`` is one edit away from (probably a misspelling of it), or None."""
    if not isinstance(name, str) or name in _FLAG_CHECKS:
        return None
    return next((flag for flag in NORMSOFTMAX_FLAGS if _one_edit_apart(name, flag)), None)


def _refuse_misspelled_flag(name: Any, value: Any) -> None:
    flag = misspelled_flag(name)
    if flag is not None:
        raise TypeError(
            f"Unknown config key `{name}`={value!r}: one edit away from the flag `{flag}`, so probably a misspelling "
            f"(transformers would store it as an extra attribute that nothing reads). Allowed: `{flag}` spelled "
            f"exactly; the flags are {list(NORMSOFTMAX_FLAGS)}."
        )


_KNOWN_NAMES: dict[type, frozenset[str]] = {}


def _known_names(cls: type) -> frozenset[str]:
    """Fields, aliases and class attributes of a config class (never taken for a misspelled flag)."""
    names = _KNOWN_NAMES.get(cls)
    if names is None:
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        names = frozenset(fields | set(dir(cls)) | set(getattr(cls, "attribute_map", {})))
        _KNOWN_NAMES[cls] = names
    return names


# ---------------------------------------------------------------------------------------------------------------
# configs of built models, and checks deferred to the end of an update
# ---------------------------------------------------------------------------------------------------------------

class _ConfigState:
    """What is known about one config object: it finished construction, and the models built from it."""

    __slots__ = ("models", "reference")

    def __init__(self, reference: weakref.ref) -> None:
        self.reference = reference
        self.models: weakref.WeakSet = weakref.WeakSet()


# id(config) -> its state, for every config whose construction finished. Kept outside the config: its __dict__ is
# what transformers serialises and compares. Reentrant: a config freed while the lock is held removes its entry.
_CONFIG_STATES: dict[int, _ConfigState] = {}
_CONFIG_LOCK = threading.RLock()


def _forget_config(config_id: int, reference: weakref.ref) -> None:
    with _CONFIG_LOCK:
        state = _CONFIG_STATES.get(config_id)
        if state is not None and state.reference is reference:
            del _CONFIG_STATES[config_id]


def _config_state(config: Any, create: bool = False) -> _ConfigState | None:
    key = id(config)
    with _CONFIG_LOCK:
        state = _CONFIG_STATES.get(key)
        if state is not None and state.reference() is not config:
            state = None
        if state is None and create:
            state = _CONFIG_STATES[key] = _ConfigState(weakref.ref(config, lambda ref: _forget_config(key, ref)))
        return state


def bind_config_to_model(config: Any, model: Any) -> None:
    """Record that ``model`` was built from ``config`` (a variant model's ``post_init`` calls this): from then on
    the structural flags of ``config`` refuse to change while ``model`` lives and uses it."""
    with _CONFIG_LOCK:
        _config_state(config, create=True).models.add(model)


def models_built_with(config: Any) -> list:
    """The live models built from ``config`` that still use it as their ``config``."""
    with _CONFIG_LOCK:
        state = _config_state(config)
        models = [] if state is None else list(state.models)
    return [model for model in models if getattr(model, "config", None) is config]


# ids of the configs whose combination check waits for the end of an update (per thread / context)
_COMBINATION_DEFERRED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "normsoftmax_combination_deferred", default=frozenset()
)


@contextlib.contextmanager
def _all_or_nothing(config: Any):
    """Assignments inside are checked as a whole at the end; on any error the config gets its previous state."""
    snapshot = dict(config.__dict__)
    token = _COMBINATION_DEFERRED.set(_COMBINATION_DEFERRED.get() | {id(config)})
    try:
        try:
            yield
        finally:
            _COMBINATION_DEFERRED.reset(token)
        check_flag_combination(config)
    except BaseException:
        config.__dict__.clear()
        config.__dict__.update(snapshot)
        raise


@dataclass(kw_only=True, repr=False, eq=False)
class NormSoftmaxConfigMixin:
    r"""
    Flags shared by the three variant configs (see the module docstring for the table).

    attention_softmax (`str`, *optional*, defaults to `"softmax"`):
        `"normsoftmax"` normalises every attention row (per head) to unit spread over its valid keys, times gamma,
        before the softmax; `"softmax"` is the stock attention.
    normsoftmax_gamma (`float`, *optional*, defaults to `DEFAULT_NORMSOFTMAX_GAMMA`):
        Spread of the normalised attention logits. Also the initial value of the learnable per-head gammas.
    normsoftmax_learnable_gamma (`bool`, *optional*, defaults to `False`):
        Learn one gamma per head and layer, stored as parameter `normsoftmax_scale` of shape `(num_heads, 1, 1)` on
        every attention module.
    normsoftmax_max_temperature (`float`, *optional*):
        Upper bound of the temperature `T = spread / gamma` applied to the (already `1/sqrt(d)`-scaled) logits;
        `1.0` means "never softer than stock attention".
    normsoftmax_statistic (`str`, *optional*, defaults to `"std"`):
        `"std"`: spread = sqrt(var + eps); `"var"`: spread = var + eps.
    normsoftmax_eps (`float`, *optional*, defaults to 1e-6):
        Added to the variance of the logits.
    loss_softmax (`str`, *optional*, defaults to `"softmax"`):
        `"normsoftmax"` normalises the head logits (per sample / token, over the classes) before the
        cross-entropy. The returned logits are the normalised ones.
    loss_normsoftmax_gamma (`float`, *optional*, defaults to `DEFAULT_LOSS_NORMSOFTMAX_GAMMA`):
        Spread of the normalised head logits; bounds the confidence the model can reach.
    logit_inverse_temperature (`float`, *optional*, defaults to 1.0):
        Inverse temperature beta of the head softmax: the returned logits are `beta * z`.
    sigma_reparam (`bool`, *optional*, defaults to `False`):
        Reparametrise the selected layers as `W_hat = (s / sigma(W)) W` with a learned scalar `s` initialised to
        `sigma(W)` (outputs unchanged at conversion).
    sigma_reparam_include (`list[str]`, *optional*):
        fnmatch patterns over qualified module names; `None` selects every linear / Conv1D / Conv2d layer.
    sigma_reparam_exclude (`list[str]`, *optional*):
        fnmatch patterns of layers never converted.
    qk_norm (`str`, *optional*):
        `"rms"` (RMSNorm) or `"layer"` (LayerNorm) of every head's queries and keys over the head dimension before
        the attention logits, with a learned weight (and bias) shared by the heads of a layer, stored as modules
        `normsoftmax_q_norm` / `normsoftmax_k_norm` on every attention module; `None`: off.
    """

    attention_softmax: str = "softmax"
    normsoftmax_gamma: float | int = DEFAULT_NORMSOFTMAX_GAMMA
    normsoftmax_learnable_gamma: bool = False
    normsoftmax_max_temperature: float | int | None = None
    normsoftmax_statistic: str = "std"
    normsoftmax_eps: float | int = 1e-6
    loss_softmax: str = "softmax"
    loss_normsoftmax_gamma: float | int = DEFAULT_LOSS_NORMSOFTMAX_GAMMA
    logit_inverse_temperature: float | int = 1.0
    sigma_reparam: bool = False
    sigma_reparam_include: list[str] | None = None
    sigma_reparam_exclude: list[str] | None = None
    qk_norm: str | None = None

    #: Whether the architecture takes `qk_norm` (the decoder variants do not: see the module docstring).
    supports_qk_norm = True

    def __setattr__(self, name: str, value: Any) -> None:
        # Validate our flags on every assignment (construction, from_pretrained kwargs, later edits) with a plain
        # ValueError; the stock fields keep the stock (strict) validation further up the MRO.
        check = _FLAG_CHECKS.get(name)
        if check is None:
            if not name.startswith("_") and name not in _known_names(type(self)):
                _refuse_misspelled_flag(name, value)
            super().__setattr__(name, value)
            return
        value = check(name, value)
        if _config_state(self) is not None:  # construction is over: the config may be in use
            if name in STRUCTURAL_FLAGS:
                self._check_structural_change(name, value)
            if id(self) not in _COMBINATION_DEFERRED.get():
                self._check_combination_with(name, value)
        super().__setattr__(name, value)

    def _check_combination_with(self, name: str, value: Any) -> None:
        flags = {flag: getattr(self, flag, None) for flag in NORMSOFTMAX_FLAGS}
        try:
            check_flag_combination(
                types.SimpleNamespace(**{**flags, name: value}, supports_qk_norm=self.supports_qk_norm)
            )
        except ValueError as err:
            raise ValueError(
                f"{err} (Refused at the assignment `{name}`={value!r}; the config is unchanged. To change several "
                "flags, assign them in an order that keeps a valid combination, or at once with "
                "`config.update({...})`.)"
            ) from None

    def _check_structural_change(self, name: str, value: Any) -> None:
        current = getattr(self, name, None)
        if value == current:
            return
        models = models_built_with(self)
        if not models:
            return
        model_class = type(models[0]).__name__
        del models  # the traceback must not keep the models alive
        raise ValueError(
            f"Invalid assignment: `{name}`={value!r} on the config of a built {model_class} (built with "
            f"`{name}`={current!r}). `{name}` decides which modules and parameters the model has when it is built: the "
            "model would not follow, while its saved config and model card would claim the change. Allowed: build a "
            f"model with the new value: hf_normsoftmax.convert_stock_model(stock_model, {name}={value!r}) for a "
            f"stock model; {model_class}.from_pretrained(saved_dir, {name}={value!r}) for a saved variant (switching "
            "a flag on starts the new entries from the loaded weights); or set it on a copy "
            "(copy.deepcopy(model.config)) to build a new model from."
        )

    def bind_to_model(self, model: Any) -> None:
        """Mark this config as the one ``model`` was built from (see :func:`bind_config_to_model`)."""
        bind_config_to_model(self, model)

    def __deepcopy__(self, memo: dict) -> NormSoftmaxConfigMixin:
        # the default deep copy (state copied as is, no re-validation of a valid state), plus: when a model built
        # from this config is copied along (copy.deepcopy(model)), the copy of the config is bound to its copy
        cls = type(self)
        copied = cls.__new__(cls)
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            copied.__dict__[key] = copy.deepcopy(value, memo)
        if _config_state(self) is not None:
            _config_state(copied, create=True)
        for model in models_built_with(self):
            model_copy = memo.get(id(model))
            if model_copy is not None:
                bind_config_to_model(copied, model_copy)
        return copied

    def __setstate__(self, state: dict[str, Any]) -> None:
        # unpickled (or copy.copy'd) configs are constructed ones: later assignments are checked
        self.__dict__.update(state)
        _config_state(self, create=True)

    def update(self, config_dict: dict[str, Any]) -> None:
        """Set the keys of ``config_dict`` together: each is checked as it is set, their combination once at the
        end; if anything is refused, every key keeps its previous value."""
        with _all_or_nothing(self):
            super().update(config_dict)

    def update_from_string(self, update_str: str) -> None:
        """transformers' ``"key=value,key=value"`` update, all or nothing as :meth:`update`."""
        with _all_or_nothing(self):
            super().update_from_string(update_str)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """``PreTrainedConfig.from_dict`` (the end of ``from_pretrained``) with the flags among ``kwargs`` set at
        construction, together with the dict's (so that their combination is checked once), and keyword arguments
        one edit away from a flag refused (transformers would drop them silently)."""
        for name, value in kwargs.items():
            _refuse_misspelled_flag(name, value)
        flags = {name: kwargs.pop(name) for name in list(kwargs) if name in _FLAG_CHECKS}
        if flags:
            config_dict = {**config_dict, **flags}
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        model_type = kwargs.pop("model_type", None)
        if model_type is not None:
            self._check_checkpoint_model_type(model_type)
        super().__post_init__(**kwargs)
        check_flag_combination(self)
        # Subclasses of strict stock configs do not inherit the validation-on-construction: run it here.
        self.validate()
        _config_state(self, create=True)  # constructed: from now on assignments check combinations

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == STOCK_MODEL_TYPE.get(cls.model_type):
            # a stock checkpoint is a supported source of a variant: load it without the "other model type" warning
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    @classmethod
    def _check_checkpoint_model_type(cls, model_type: str) -> None:
        stock = STOCK_MODEL_TYPE[cls.model_type]
        if model_type in (cls.model_type, stock):
            return
        hint = ""
        if model_type in VARIANT_MODEL_TYPE:
            hint = f" For a {model_type!r} checkpoint use the {VARIANT_MODEL_TYPE[model_type]!r} variant."
        elif model_type in STOCK_MODEL_TYPE:
            hint = f" That checkpoint belongs to the {model_type!r} variant."
        raise ValueError(
            f"Checkpoint of another architecture: {cls.__name__} (model type {cls.model_type!r}) cannot load a "
            f"config of model type {model_type!r}. Allowed: {stock!r} checkpoints (converted on load) or "
            f"{cls.model_type!r} checkpoints.{hint}"
        )

    def validate(self) -> None:
        super().validate()
        for name in NORMSOFTMAX_FLAGS:
            _FLAG_CHECKS[name](name, getattr(self, name))
        check_flag_combination(self)

    @property
    def uses_normsoftmax_attention(self) -> bool:
        """Whether attention runs NormSoftmax."""
        return self.attention_softmax == "normsoftmax"

    def normsoftmax_flags(self) -> dict[str, Any]:
        """The NormSoftmax/beta/sigmaReparam flags of this config as a dict (e.g. for logging)."""
        return {name: getattr(self, name) for name in NORMSOFTMAX_FLAGS}


class NormSoftmaxViTConfig(NormSoftmaxConfigMixin, ViTConfig):
    r"""
    Configuration of the NormSoftmax ViT variant (`model_type="normsoftmax_vit"`): every [`ViTConfig`] field plus
    the flags of [`NormSoftmaxConfigMixin`].

    Example:

    ```python
    >>> from hf_normsoftmax import NormSoftmaxViTConfig, NormSoftmaxViTForImageClassification

    >>> config = NormSoftmaxViTConfig(
    ...     image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...     intermediate_size=128, num_labels=10, attention_softmax="normsoftmax", loss_softmax="normsoftmax",
    ... )
    >>> model = NormSoftmaxViTForImageClassification(config)
    ```"""

    model_type = "normsoftmax_vit"


class NormSoftmaxBertConfig(NormSoftmaxConfigMixin, BertConfig):
    r"""
    Configuration of the NormSoftmax BERT variant (`model_type="normsoftmax_bert"`): every [`BertConfig`] field
    plus the flags of [`NormSoftmaxConfigMixin`].

    Example:

    ```python
    >>> from transformers import AutoConfig, AutoModelForSequenceClassification
    >>> import hf_normsoftmax  # registers the variants

    >>> stock = AutoConfig.from_pretrained("path/to/bert")
    >>> config = AutoConfig.for_model(
    ...     "normsoftmax_bert",
    ...     **{k: v for k, v in stock.to_dict().items() if k != "model_type"},
    ...     attention_softmax="normsoftmax", sigma_reparam=True,
    ... )
    >>> model = AutoModelForSequenceClassification.from_pretrained("path/to/bert", config=config)
    ```"""

    model_type = "normsoftmax_bert"


class NormSoftmaxGPT2Config(NormSoftmaxConfigMixin, GPT2Config):
    r"""
    Configuration of the NormSoftmax GPT-2 variant (`model_type="normsoftmax_gpt2"`): every [`GPT2Config`] field
    plus the flags of [`NormSoftmaxConfigMixin`].

    Example:

    ```python
    >>> from hf_normsoftmax import NormSoftmaxGPT2Config, NormSoftmaxGPT2LMHeadModel

    >>> config = NormSoftmaxGPT2Config(
    ...     n_embd=64, n_layer=2, n_head=4, attention_softmax="normsoftmax", logit_inverse_temperature=0.5,
    ... )
    >>> model = NormSoftmaxGPT2LMHeadModel(config)
    ```"""

    model_type = "normsoftmax_gpt2"


__all__ = [
    "ATTENTION_SOFTMAX_CHOICES",
    "DEFAULT_LOSS_NORMSOFTMAX_GAMMA",
    "DEFAULT_NORMSOFTMAX_GAMMA",
    "LOSS_SOFTMAX_CHOICES",
    "NORMSOFTMAX_FLAGS",
    "NORMSOFTMAX_STATISTIC_CHOICES",
    "QK_NORM_CHOICES",
    "STRUCTURAL_FLAGS",
    "NormSoftmaxBertConfig",
    "NormSoftmaxConfigMixin",
    "NormSoftmaxGPT2Config",
    "NormSoftmaxViTConfig",
    "bind_config_to_model",
    "check_flag_combination",
    "misspelled_flag",
    "models_built_with",
]
