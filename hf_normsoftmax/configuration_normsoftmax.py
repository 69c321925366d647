"""Configurations of the NormSoftmax variants of ViT, BERT and GPT-2.

Each variant config subclasses the stock config (every stock field keeps working, stock ``config.json`` files load
into it) and adds the flags below. With every flag at its default a variant computes exactly what the stock model
computes; each flag switches one method on.

| flag | allowed | default | effect |
|---|---|---|---|
| ``attention_softmax`` | ``"softmax"``, ``"normsoftmax"`` | ``"softmax"`` | softmax used inside dot-product attention |
| ``normsoftmax_gamma`` | number > 0 | ``DEFAULT_NORMSOFTMAX_GAMMA`` | attention logits normalised to std gamma |
| ``normsoftmax_learnable_gamma`` | bool | ``False`` | one learnable gamma per head (parameter ``normsoftmax_scale``) |
| ``normsoftmax_max_temperature`` | ``None`` or number > 0 | ``None`` | cap on the temperature ``T = std / gamma`` |
| ``normsoftmax_statistic`` | ``"std"``, ``"var"`` | ``"std"`` | spread statistic of the logits |
| ``normsoftmax_eps`` | number > 0 | ``1e-6`` | added to the variance |
| ``loss_softmax`` | ``"softmax"``, ``"normsoftmax"`` | ``"softmax"`` | softmax of the classification / LM heads |
| ``loss_normsoftmax_gamma`` | number > 0 | ``DEFAULT_LOSS_NORMSOFTMAX_GAMMA`` | head logits normalised to std gamma |
| ``logit_inverse_temperature`` | number > 0 | ``1.0`` | beta: head logits are ``beta * z`` |
| ``sigma_reparam`` | bool | ``False`` | sigmaReparam on the selected layers |
| ``sigma_reparam_include`` | ``None`` or list of patterns | ``None`` | layers to convert (``None``: all) |
| ``sigma_reparam_exclude`` | ``None`` or list of patterns | ``None`` | layers never converted |

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

Default gammas (measured, ``python benchmarks/sweep_gamma.py --seeds 2 --steps 300``, CPU, medians over 2 seeds;
300 AdamW steps, no warmup). ViT: 2 layers x 64 wide, MNIST-5k (4,000 train / 1,000 validation images).
LM: character-level GPT-2, 2 layers x 128 wide, Shakespeare (90/10 split). "val" = validation cross-entropy of
the returned logits, "early" = mean training loss of the first 50 steps.

| setting | ViT val / acc | ViT early | LM val | LM early |
|---|---|---|---|---|
| stock softmax | 0.777 / 0.724 | 1.928 | 2.548 | 3.287 |
| ``normsoftmax_gamma`` 0.5 | 0.638 / 0.786 | 1.861 | 2.521 | 3.297 |
| ``normsoftmax_gamma`` 1 | **0.376 / 0.885** | 1.801 | 2.535 | 3.286 |
| ``normsoftmax_gamma`` 2 (default) | 0.424 / 0.879 | **1.795** | 2.517 | 3.026 |
| ``normsoftmax_gamma`` 4 | 0.507 / 0.859 | 1.833 | **2.510** | **3.007** |
| ``normsoftmax_gamma`` 8 | 0.555 / 0.834 | 1.865 | 2.526 | 3.048 |
| ``loss_normsoftmax_gamma`` 1 | 0.920 / 0.748 | 1.995 | 2.702 | 3.422 |
| ``loss_normsoftmax_gamma`` 2 (default) | **0.651 / 0.796** | 2.289 | **2.625** | 3.580 |
| ``loss_normsoftmax_gamma`` 4 | 0.763 / 0.759 | 3.645 | 2.707 | 4.183 |
| ``loss_normsoftmax_gamma`` 8 | 1.002 / 0.729 | 5.764 | 2.887 | 5.596 |
| ``loss_normsoftmax_gamma`` 16 | 7.413 / 0.654 | 10.234 | 3.028 | 8.788 |

NormSoftmax attention helped the ViT a lot at every gamma (best at 1-2) and the LM slightly (best at 2-4). The
NormSoftmax head beat stock softmax on the 10-class ViT (at gamma 2) but not on the ~70-symbol character LM. Small
models and short runs: treat the defaults as starting points, not as tuned values.

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
ValueError: Invalid value for `normsoftmax_gamma`: -1.0. Allowed: a finite number > 0.
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from transformers import BertConfig, GPT2Config, ViTConfig

ATTENTION_SOFTMAX_CHOICES = ("softmax", "normsoftmax")
LOSS_SOFTMAX_CHOICES = ("softmax", "normsoftmax")
NORMSOFTMAX_STATISTIC_CHOICES = ("std", "var")

# Defaults of the two gammas, from the sweep of benchmarks/sweep_gamma.py (see "Default gammas" in the module
# docstring): 2.0 is the only attention gamma in the top two on both tasks; 2.0 is the best head gamma on both.
DEFAULT_NORMSOFTMAX_GAMMA = 2.0
DEFAULT_LOSS_NORMSOFTMAX_GAMMA = 2.0

# Stock model type that each variant converts on load.
STOCK_MODEL_TYPE = {"normsoftmax_vit": "vit", "normsoftmax_bert": "bert", "normsoftmax_gpt2": "gpt2"}
VARIANT_MODEL_TYPE = {stock: variant for variant, stock in STOCK_MODEL_TYPE.items()}

NORMSOFTMAX_FLAGS = (
    "attention_softmax",
    "normsoftmax_gamma",
    "normsoftmax_learnable_gamma",
    "normsoftmax_max_temperature",
    "normsoftmax_statistic",
    "normsoftmax_eps",
    "loss_softmax",
    "loss_normsoftmax_gamma",
    "logit_inverse_temperature",
    "sigma_reparam",
    "sigma_reparam_include",
    "sigma_reparam_exclude",
)


# ---------------------------------------------------------------------------------------------------------------
# per-flag checks: each returns the (normalised) value or raises naming the flag, the value and what is allowed
# ---------------------------------------------------------------------------------------------------------------


def _invalid(flag: str, value: Any, allowed: str, error: type[Exception] = ValueError) -> Exception:
    return error(f"Invalid value for `{flag}`: {value!r}. Allowed: {allowed}.")


def _choice(choices: tuple[str, ...]):
    allowed = " or ".join(repr(c) for c in choices)

    def check(flag: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _invalid(flag, value, allowed)
        return value

    return check


def _positive_number(flag: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _invalid(flag, value, "a finite number > 0")
    return value


def _optional_positive_number(flag: str, value: Any) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _invalid(flag, value, "None or a finite number > 0")
    return value


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
    "normsoftmax_gamma": _positive_number,
    "normsoftmax_learnable_gamma": _boolean,
    "normsoftmax_max_temperature": _optional_positive_number,
    "normsoftmax_statistic": _choice(NORMSOFTMAX_STATISTIC_CHOICES),
    "normsoftmax_eps": _positive_number,
    "loss_softmax": _choice(LOSS_SOFTMAX_CHOICES),
    "loss_normsoftmax_gamma": _positive_number,
    "logit_inverse_temperature": _positive_number,
    "sigma_reparam": _boolean,
    "sigma_reparam_include": _pattern_list,
    "sigma_reparam_exclude": _pattern_list,
}


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

    def __setattr__(self, name: str, value: Any) -> None:
        # Validate our flags on every assignment (construction, from_pretrained kwargs, later edits) with a plain
        # ValueError; the stock fields keep the stock (strict) validation further up the MRO.
        check = _FLAG_CHECKS.get(name)
        if check is not None:
            value = check(name, value)
        super().__setattr__(name, value)

    def __post_init__(self, **kwargs):
        model_type = kwargs.pop("model_type", None)
        if model_type is not None:
            self._check_checkpoint_model_type(model_type)
        super().__post_init__(**kwargs)
        check_flag_combination(self)
        # Subclasses of strict stock configs do not inherit the validation-on-construction: run it here.
        self.validate()

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
    "NormSoftmaxBertConfig",
    "NormSoftmaxConfigMixin",
    "NormSoftmaxGPT2Config",
    "NormSoftmaxViTConfig",
    "check_flag_combination",
]
