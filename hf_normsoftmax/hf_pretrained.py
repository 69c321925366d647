"""``NormSoftmaxPreTrainedMixin``: the behaviour every NormSoftmax variant model class shares.

The variant classes of the ``modeling_normsoftmax_*`` files put it first in their bases. It decides the attention
implementation, converts the layers the flags select when the model is built, initialises the new state from the
weights actually loaded, and refuses or reports checkpoints that would silently compute something else.

Copied into remote-code checkpoints: imports only torch, transformers and same-folder modules.
"""

from __future__ import annotations

import contextvars
import re
import threading

from transformers import PreTrainedConfig

from .configuration_normsoftmax import NORMSOFTMAX_FLAGS, check_flag_combination
from .hf_attention import (
    LEARNABLE_GAMMA_PARAMETER,
    resolve_variant_attn_implementation,
    use_variant_attention_config,
)
from .hf_state import (
    NEW_KEY,
    NEW_KEY_PATTERNS,
    QK_NORM_KEY,
    REPARAM_STATE_NAMES,
    add_learnable_gamma,
    add_qk_norm,
    apply_sigma_reparam,
    check_loaded_weights,
    checkpoint_config_dict,
    finish_normsoftmax_init,
    missing_state,
    missing_trained_state,
    missing_trained_state_error,
)

# The config.json of the checkpoint a variant's from_pretrained is loading, for its loading hook (a context variable:
# loads in several threads, or nested loads, each see their own).
_LOADING_CHECKPOINT_CONFIG: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "normsoftmax_loading_checkpoint_config", default=None
)

# transformers' from_pretrained swaps class attributes while it loads: variant loads take turns (see from_pretrained)
_FROM_PRETRAINED_LOCK = threading.RLock()


class NormSoftmaxPreTrainedMixin:
    """Behaviour shared by every NormSoftmax variant model (put it first in the bases).

    * the config keeps the attention implementation the user asked for (``"sdpa"`` by default, ``"eager"``), as a
      stock model's does; the attention modules see it through a :class:`VariantAttentionConfig` and run
      ``"normsoftmax"`` for ``"sdpa"`` and ``"normsoftmax_reference"`` (materialised weights, so
      ``output_attentions`` works) for ``"eager"``. Both also serve ``attention_softmax="softmax"`` (the stock
      computation), so diagnostics see every variant. Flash, flex and kernel requests are refused by name: they
      would run plain softmax attention;
    * at construction: flag checks, sigmaReparam conversion of the selected layers, learnable gammas;
    * after loading and tying: :func:`finish_normsoftmax_init`;
    * ``from_pretrained`` follows transformers' loading: weights the checkpoint lacks are initialised and reported
      (``missing_keys``, transformers' load report), also when it holds none of the model's weights. Where it
      differs, it is because the difference would otherwise go unseen: a checkpoint whose config.json names another
      model type is refused (as the variant configs refuse it: its flags and sizes are not this model's); trained
      sigmaReparam / gamma entries the model would ignore are refused (it would run the raw weights, not the
      trained ones); the ones a variant checkpoint lacks are reported as missing keys (transformers would
      initialise them silently, as new entries of a stock checkpoint);
    * ``load_state_dict(strict=False)`` (Trainer resume) refuses a variant state dict lacking such entries;
    * initialisation (construction, ``init_weights()``, loading) sets the sigmaReparam buffers ``reparam_u`` /
      ``reparam_v`` deterministically: the top singular pair of the layer's weight, so that sigma is exact and
      ``W_hat = W`` at init. They follow the weights, where transformers expects buffers that do not depend on
      them (its ``test_init_weights_can_init_buffers`` compares two models with different random weights): a
      fixed vector would make the initial sigma an estimate and change the function of a converted checkpoint.

    Subclasses set ``_normsoftmax_attention_classes`` (the attention modules: they get learnable gammas and the
    attention config view).
    """

    _normsoftmax_attention_classes: tuple[type, ...] = ()
    _keys_to_ignore_on_load_missing = list(NEW_KEY_PATTERNS)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        return resolve_variant_attn_implementation(requested_attention)

    def _check_and_adjust_attn_implementation(self, attn_implementation: str | None, is_init_check: bool = False,
                                              **kwargs) -> str:
        # before transformers' flash / kernel handling, which would load a kernel (plain softmax) from the Hub
        return resolve_variant_attn_implementation(attn_implementation)

    def post_init(self):
        config = self.config
        # duck-typed: remote-code loading can give the config class and this mixin different module objects
        if any(not hasattr(config, flag) for flag in NORMSOFTMAX_FLAGS):
            raise TypeError(
                f"Invalid value for `config`: {type(config).__name__}. {type(self).__name__} needs a NormSoftmax "
                "variant config (NormSoftmaxViTConfig, NormSoftmaxBertConfig or NormSoftmaxGPT2Config)."
            )
        check_flag_combination(config)
        if not self._normsoftmax_attention_classes:  # its attention would run what the config names: stock SDPA
            raise TypeError(
                f"{type(self).__name__} sets no `_normsoftmax_attention_classes`: a NormSoftmax variant names the "
                "attention modules of its architecture there (e.g. (BertSelfAttention, BertCrossAttention))."
            )
        if config.sigma_reparam:
            apply_sigma_reparam(self, config.sigma_reparam_include, config.sigma_reparam_exclude)
        if config.normsoftmax_learnable_gamma:
            add_learnable_gamma(self, self._normsoftmax_attention_classes, config)
        if config.qk_norm is not None:
            add_qk_norm(self, self._normsoftmax_attention_classes, config)
        use_variant_attention_config(self, self._normsoftmax_attention_classes)
        super().post_init()
        self._keys_to_ignore_on_load_missing = set(self._keys_to_ignore_on_load_missing) | set(NEW_KEY_PATTERNS)
        # from now on the config refuses changes of the flags that decided this structure (sigma_reparam, ...)
        bind_to_model = getattr(config, "bind_to_model", None)
        if bind_to_model is not None:
            bind_to_model(self)

    def tie_weights(self, missing_keys=None, recompute_mapping: bool = True):
        super().tie_weights(missing_keys=missing_keys, recompute_mapping=recompute_mapping)
        finish_normsoftmax_init(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that refuses a checkpoint whose config.json names another model type
        and sigmaReparam / learnable-gamma weights the model would ignore (:func:`check_loaded_weights`; weights
        it lacks, even all of them, are initialised and reported as transformers does), and reports the ones a
        variant checkpoint should hold but lacks (:func:`missing_trained_state`) like any missing weight: in
        ``loading_info["missing_keys"]`` and transformers' load report. Stock checkpoints (and variant ones saved
        without the flags) are converted silently: the new entries are initialised from the loaded weights."""
        config = kwargs.get("config")
        checkpoint_config = None
        if pretrained_model_name_or_path is not None:
            # what the checkpoint was saved with (an explicit config may say otherwise)
            checkpoint_config = checkpoint_config_dict(pretrained_model_name_or_path, kwargs)
        if isinstance(config, PreTrainedConfig) and checkpoint_config is not None and "model_type" in checkpoint_config:
            # an explicit config skips the checkpoint's config.json: check its architecture here
            cls.config_class._check_checkpoint_model_type(checkpoint_config["model_type"])
        output_loading_info = kwargs.pop("output_loading_info", False)
        context = _LOADING_CHECKPOINT_CONFIG.set(checkpoint_config)
        try:
            # transformers' from_pretrained swaps class attributes while it loads (no_tie_weights replaces
            # PreTrainedModel.tie_weights and puts back what it found): two loads in threads can leave the
            # replacement in place for the rest of the process, and every later model untied. Loads take turns.
            with _FROM_PRETRAINED_LOCK:
                model, loading_info = super().from_pretrained(
                    pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
                )
        finally:
            _LOADING_CHECKPOINT_CONFIG.reset(context)
        if pretrained_model_name_or_path is not None:
            check_loaded_weights(model, loading_info, pretrained_model_name_or_path)
        return (model, loading_info) if output_loading_info else model

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        # transformers' hook between loading (missing_keys still complete) and its load report: the new entries
        # are silenced by `_keys_to_ignore_on_load_missing` (stock checkpoints lack them); the ones the checkpoint
        # should have held are put back, so they are reported and logged like any missing weight.
        not_loaded = set(loading_info.missing_keys) | {entry[0] for entry in loading_info.mismatched_keys}
        loaded = set(self.state_dict()) - not_loaded
        lacking = missing_trained_state(self, _LOADING_CHECKPOINT_CONFIG.get(), loaded.__contains__)
        super()._adjust_missing_and_unexpected_keys(loading_info)
        loading_info.missing_keys = set(loading_info.missing_keys) | set(lacking)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that, with ``strict=False`` (how ``Trainer`` loads the checkpoint it resumes
        from), refuses a state dict of a sigmaReparam / learnable-gamma variant that holds every weight of the model
        but lacks some of these entries: the model would keep its own values for them, not the trained ones. A state
        dict with none of these entries (a stock model's) loads as before (call
        :func:`hf_normsoftmax.reset_normsoftmax_state` after), and so does one that lacks weights too (a shard of a
        sharded checkpoint, loaded one by one by transformers' ``load_sharded_checkpoint``: it cannot be judged
        alone)."""
        if not strict and self._holds_every_weight(state_dict):
            keys = set(state_dict)
            lacking = missing_state(
                self,
                sigma_reparam=any(key.rpartition(".")[2] in REPARAM_STATE_NAMES for key in keys),
                learnable_gamma=any(key.rpartition(".")[2] == LEARNABLE_GAMMA_PARAMETER for key in keys),
                qk_norm=any(QK_NORM_KEY.search(key) for key in keys),
                converted=lambda name: True,
                loaded=keys.__contains__,
                same_class=True,  # a state dict given to a model is taken for one of its own
            )
            if lacking:
                raise missing_trained_state_error(
                    "the state dict", lacking, f"Invalid state dict for {type(self).__name__}.load_state_dict()"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _holds_every_weight(self, state_dict) -> bool:
        """Whether ``state_dict`` has every entry of the model's a saved checkpoint has (tied copies and
        ``_keys_to_ignore_on_save`` are not saved), sigmaReparam / gamma entries aside."""
        tied = set(getattr(self, "all_tied_weights_keys", None) or {})
        unsaved = getattr(self, "_keys_to_ignore_on_save", None)
        unsaved = re.compile("|".join(unsaved)) if unsaved else None
        return all(
            key in state_dict
            for key in self.state_dict()
            if not NEW_KEY.search(key) and key not in tied and not (unsaved and unsaved.search(key))
        )

    # -- what the installed package adds: saving with the code and the Hub push (installed on this class by
    # hf_normsoftmax.pretrained_features: a remote-code copy of this file saves and pushes with transformers' own
    # methods, which copy the code of classes loaded with trust_remote_code), and export.
    #: The package's implementations (the module :mod:`hf_normsoftmax.hub.save`), set by ``import hf_normsoftmax``.
    #: Remote-code copies of this file run without the package: None there.
    _package_features = None

    def merge_and_unload(self):
        """The stock transformers model (e.g. ``GPT2LMHeadModel``) with sigmaReparam and beta folded into its
        weights, same eval outputs; refuses NormSoftmax flags, which cannot be folded. See
        :func:`hf_normsoftmax.export.merge_and_unload`; save it with its own ``save_pretrained``."""
        features = NormSoftmaxPreTrainedMixin._package_features
        if features is None:
            raise ImportError("merge_and_unload() needs the hf_normsoftmax package (pip install hf-normsoftmax).")
        return features.merge_and_unload(self)
