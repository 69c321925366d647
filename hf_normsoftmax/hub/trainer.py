"""``trainer.push_to_hub()`` with the hf_normsoftmax model card, ``auto_map`` and remote code.

A stock ``transformers.Trainer`` holding a ``normsoftmax_*`` variant already uploads the code and ``auto_map``:
the variant's ``save_pretrained`` (called by ``Trainer.save_model``) writes them by default, so the pushed repo
loads with ``trust_remote_code=True``. Its card, though, is transformers' generic one, and that cannot be changed
from the model: ``Trainer.push_to_hub`` runs ``save_model`` (the only place model code runs), THEN
``Trainer.create_model_card``, which overwrites ``args.output_dir/README.md`` with ``TrainingSummary``'s card, then
``upload_folder`` of the output dir; nothing of the model is called after the card is written. (The one callback
into the model there, ``create_or_update_model_card``, only runs when the README.md present before had
``library_name: peft``: using it would mean writing false metadata into every saved folder. Not done.)
:class:`NormSoftmaxCardMixin` is the clean way, for variants:

* every save of a variant (``Trainer.save_model``, checkpoints, the save inside ``push_to_hub``) writes
  ``auto_map`` and the modeling / configuration files next to the weights (unless ``model.save_remote_code`` was
  set to False): the variant's own ``save_pretrained`` does it, without any class registration;
* ``training_args.bin`` (written by every Trainer save and checkpoint push) holds no token: the trainer's
  ``args`` pickle with ``hub_token`` (and other credential-named fields) set to None and token-shaped text
  replaced; the trainer itself keeps using ``args.hub_token``;
* ``create_model_card`` (called by ``push_to_hub``) renders the card of :mod:`hf_normsoftmax.hub.card` into
  ``args.output_dir/README.md``, from what the output dir holds plus the in-memory training log. Stock models
  keep transformers' own card.

Usage::

    from transformers import Trainer
    from hf_normsoftmax.hub import NormSoftmaxCardMixin, normsoftmax_trainer_class

    class MyTrainer(NormSoftmaxCardMixin, Trainer):      # the mixin goes first
        ...

    TrainerCls = normsoftmax_trainer_class()            # Trainer + mixin
    TrainerCls = normsoftmax_trainer_class(resumable_trainer_class())   # on top of another Trainer subclass
    trainer = TrainerCls(model=model, args=TrainingArguments(..., hub_model_id="alice/run"), ...)
    trainer.train()
    trainer.push_to_hub()

The push itself is transformers' (``upload_folder`` of the output dir), after a check: a file it would upload
that holds an access token refuses the push (:class:`~hf_normsoftmax.hub.push.HubPushError`). It also uploads
the token-free ``training_args.bin``, which ``hf-normsoftmax push`` never does.
``model.push_to_hub(...)`` of a variant (no Trainer) always publishes the hf_normsoftmax card: see
:func:`hf_normsoftmax.hub.push.push_model`.
"""

from __future__ import annotations

from pathlib import Path

from ..training.run_files import write_text_atomically
from .card import render_card
from .card_inputs import (
    collect_run_dir,
    is_variant_config,
    last_eval_from_history,
    split_metrics,
    summarise_log_history,
)
from .push import HubPushError
from .secrets import find_secret, is_secret_key, known_tokens, looks_secret, redact

__all__ = ["NormSoftmaxCardMixin", "normsoftmax_trainer_class"]

_NO_STATE_NOTE = "No `trainer_state.json` was found: the training log is not summarised."


class NormSoftmaxCardMixin:
    """Mixin for ``transformers.Trainer`` subclasses (put it first in the bases): variant saves carry
    ``auto_map`` + code, and ``push_to_hub`` publishes the hf_normsoftmax model card. See the module docstring."""

    def _normsoftmax_unwrapped_model(self):
        model = self.model
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            model = accelerator.unwrap_model(model, keep_torch_compile=False)
        return model

    def _normsoftmax_is_variant(self) -> bool:
        model = self._normsoftmax_unwrapped_model()
        return hasattr(model, "config") and hasattr(model, "save_pretrained") and is_variant_config(model.config)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _pickle_without_secrets(self.args)

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None,
                    private=None, **kwargs):
        """``Trainer.push_to_hub``, refused (:class:`~hf_normsoftmax.hub.push.HubPushError`, before anything is
        uploaded) when a file of the output dir it uploads holds an access token (see
        :mod:`hf_normsoftmax.hub.secrets`); the check runs after the save and the card, right before the upload."""
        self._normsoftmax_push_tokens = known_tokens(token, self.args.hub_token)
        try:
            return super().push_to_hub(commit_message=commit_message, blocking=blocking, token=token,
                                       revision=revision, private=private, **kwargs)
        finally:
            self._normsoftmax_push_tokens = None

    def _normsoftmax_check_upload(self) -> None:
        """Refuse the upload of ``args.output_dir`` (what ``Trainer.push_to_hub`` sends) if a file holds a token."""
        output_dir = Path(self.args.output_dir)
        tokens = self._normsoftmax_push_tokens
        for path in sorted(output_dir.rglob("*")):
            relative = path.relative_to(output_dir)
            if relative.parts[0].startswith(("_", "checkpoint-")) or not path.is_file():
                continue  # transformers' ignore_patterns: "_*" and "checkpoint-*"
            found = find_secret(path, tokens)
            if found:
                raise HubPushError(
                    f"refusing to push {output_dir}: {found} appears in {relative}. Nothing was uploaded. Remove "
                    "the token from that file (or the file from the output dir) and push again."
                )

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs):
        """Write the hf_normsoftmax card of a variant to ``args.output_dir/README.md`` (stock models: transformers'
        card). The arguments are those of ``Trainer.create_model_card``; ``tags`` and ``dataset_args`` are not
        shown in the hf_normsoftmax card."""
        card = self._normsoftmax_model_card(language=language, license=license, tags=tags, model_name=model_name,
                                            finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags,
                                            dataset=dataset, dataset_args=dataset_args, **kwargs)
        if getattr(self, "_normsoftmax_push_tokens", None) is not None and self.is_world_process_zero():
            self._normsoftmax_check_upload()  # Trainer.push_to_hub uploads the output dir right after the card
        return card

    def _normsoftmax_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                                tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs):
        if not self._normsoftmax_is_variant():
            return super().create_model_card(language=language, license=license, tags=tags, model_name=model_name,
                                             finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags,
                                             dataset=dataset, dataset_args=dataset_args, **kwargs)
        if not self.is_world_process_zero():
            return None
        output_dir = Path(self.args.output_dir)
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
        inputs = collect_run_dir(output_dir, repo_id=repo_id, model_name=model_name)
        if _NO_STATE_NOTE in inputs.notes and self.state.log_history:
            # push_to_hub saves the model but not the state: summarise the in-memory training log instead
            inputs.notes.remove(_NO_STATE_NOTE)
            history = self.state.log_history
            summary = {"global_step": self.state.global_step, "epoch": self.state.epoch}
            summary.update(summarise_log_history(history))
            summary.update(inputs.training_summary)
            inputs.training_summary = {k: v for k, v in summary.items() if v is not None}
            inputs.sources.append("the Trainer's in-memory log history")
            if not inputs.eval_metrics:
                inputs.eval_metrics = split_metrics(last_eval_from_history(history), "validation")
        if language is not None:
            inputs.language = language
        if license is not None:
            inputs.license = license
        if finetuned_from is not None:
            inputs.base_model = finetuned_from
        if isinstance(tasks, str):
            inputs.task = tasks
        if dataset is not None and not inputs.dataset_name:
            inputs.dataset_name = _first(dataset)
        if dataset_tags is not None and not inputs.dataset_hub_id:
            inputs.dataset_hub_id = _first(dataset_tags)
        return write_text_atomically(output_dir / "README.md", str(render_card(inputs)))


class _PickledWithoutSecrets:
    """Mixed into the class of a Trainer's ``args``: pickling them (``training_args.bin``, written by
    ``Trainer._save`` and by the checkpoint pushes) stores the original class with the token fields (``hub_token``
    and every other field named like a credential) set to None and token-shaped text in other string values
    replaced, so no token reaches a file. Loading the file needs neither this class nor hf_normsoftmax. Copies
    (``copy.copy`` / ``deepcopy``) keep everything."""

    def __reduce_ex__(self, protocol):
        import copyreg

        original = type(self)._normsoftmax_original_class
        tokens = known_tokens(getattr(self, "hub_token", None))
        state = {}
        for key, value in self.__dict__.items():
            if isinstance(value, str) and is_secret_key(key):
                value = None
            state[key] = _without_secrets(value, tokens)
        return copyreg._reconstructor, (original, object, None), state

    def __copy__(self):
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo):
        import copy

        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


_PICKLED_WITHOUT_SECRETS = {}


def _without_secrets(value, tokens):
    if isinstance(value, str):
        return redact(value, tokens) if looks_secret(value, tokens) else value
    if isinstance(value, dict):
        return {k: _without_secrets(v, tokens) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_without_secrets(v, tokens) for v in value)
    return value


def _pickle_without_secrets(args) -> None:
    """Make ``args`` pickle without secrets (:class:`_PickledWithoutSecrets`); its fields are not changed."""
    cls = type(args)
    if isinstance(args, _PickledWithoutSecrets) or not hasattr(args, "__dict__"):
        return
    mixed = _PICKLED_WITHOUT_SECRETS.get(cls)
    if mixed is None:
        mixed = _PICKLED_WITHOUT_SECRETS.setdefault(
            cls,
            type(cls.__name__, (_PickledWithoutSecrets, cls), {
                "__module__": cls.__module__, "__qualname__": cls.__qualname__, "_normsoftmax_original_class": cls,
            }),
        )
    args.__class__ = mixed


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


def normsoftmax_trainer_class(base=None):
    """``base`` (default ``transformers.Trainer``) with :class:`NormSoftmaxCardMixin` mixed in."""
    if base is None:
        from transformers import Trainer as base
    if issubclass(base, NormSoftmaxCardMixin):
        return base
    name = f"NormSoftmaxCard{base.__name__}"
    return type(name, (NormSoftmaxCardMixin, base), {"__module__": __name__, "__qualname__": name})
