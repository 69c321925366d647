"""Saving a variant with its code: the folder loads with the package, and with ``trust_remote_code=True`` without it.

:func:`save_pretrained` is what a variant's ``model.save_pretrained`` runs where the hf_normsoftmax package is
installed (``import hf_normsoftmax`` installs it, with :func:`push_to_hub` and :func:`merge_and_unload`, as the
model classes' package features). The files a checkpoint carries (the modeling and configuration files and what they
import) never contain this module: a remote-code copy of the classes runs transformers' own ``save_pretrained`` and
``push_to_hub``, which copy the code again for classes loaded with ``trust_remote_code=True``.

A save writes transformers' files into a temporary folder beside the target, adds the code and ``auto_map``, then
renames the files into place with ``config.json`` last (:func:`_move_into_place`): an error at any point leaves the
previous checkpoint as it was.
"""

from __future__ import annotations

import inspect
import re
import threading

from transformers import PreTrainedModel
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The Auto class a model class's name implies (the first suffix that matches; ``AutoModel`` for base models).
AUTO_CLASS_BY_SUFFIX = (
    ("ForImageClassification", "AutoModelForImageClassification"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForMaskedImageModeling", "AutoModelForMaskedImageModeling"),
    ("ForMultipleChoice", "AutoModelForMultipleChoice"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForPreTraining", "AutoModelForPreTraining"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForCausalLM", "AutoModelForCausalLM"),
)


def _auto_class_by_name(class_name: str) -> str:
    return next((auto for suffix, auto in AUTO_CLASS_BY_SUFFIX if class_name.endswith(suffix)), "AutoModel")


def auto_class_of(model_or_class) -> str:
    """The Auto class name a model (class) is saved under in ``auto_map``: the one given to
    ``register_for_auto_class``, else the one its name implies (``"AutoModelForSequenceClassification"``, ...)."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    registered = getattr(cls, "_auto_class", None)
    return registered if registered else _auto_class_by_name(cls.__name__)


_OWN_CODE_MARKERS = ("configuration_normsoftmax.", "configuration_normsoftmax_", "modeling_normsoftmax_")


def _names_own_code(ref) -> bool:
    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    return any(isinstance(r, str) and any(marker in r for marker in _OWN_CODE_MARKERS) for r in refs)


def _base_model_class(model_class: type) -> type | None:
    """The base model class (``NormSoftmaxBertModel`` for every BERT head) defined in ``model_class``'s file."""
    import sys

    module = sys.modules.get(model_class.__module__)
    candidates = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, PreTrainedModel)
        and hasattr(obj, "_normsoftmax_attention_classes")
        and obj.__module__ == model_class.__module__
        and getattr(obj, "config_class", None) is getattr(model_class, "config_class", None)
        and _auto_class_by_name(obj.__name__) == "AutoModel"
    ] if module is not None else []
    return candidates[0] if len(candidates) == 1 else None


def remote_code_auto_map(model_class: type, config_class: type, auto_class: str | None = None) -> dict:
    """The ``auto_map`` of a folder saved with the code of ``model_class``, computed from the arguments only.

    ``AutoConfig`` -> ``config_class``; ``AutoModel`` -> the base model class of the same modeling file (so that
    ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` loads a fine-tuned head's encoder); ``auto_class``
    (default :func:`auto_class_of`) -> ``model_class``.
    """
    import transformers.models.auto as auto_module

    auto_class = auto_class if auto_class is not None else auto_class_of(model_class)
    if not isinstance(auto_class, str) or not auto_class.startswith("Auto") or not hasattr(auto_module, auto_class):
        raise ValueError(
            f"Invalid value for `auto_class`: {auto_class!r}. Allowed: the name of a transformers Auto class, such "
            "as 'AutoModel' or 'AutoModelForSequenceClassification'."
        )

    def ref(cls: type) -> str:
        return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"

    auto_map = {"AutoConfig": ref(config_class)}
    base = _base_model_class(model_class)
    if base is not None:
        auto_map["AutoModel"] = ref(base)
    auto_map[auto_class] = ref(model_class)
    return auto_map


def remote_code_files(*classes: type) -> list:
    """The source files defining ``classes`` and every file they import relatively (what ``auto_map`` needs)."""
    import sys
    from pathlib import Path

    from transformers.dynamic_module_utils import get_relative_import_files

    files = {}
    for cls in classes:
        source = Path(sys.modules[cls.__module__].__file__)
        for path in (source, *map(Path, get_relative_import_files(source))):
            files.setdefault(path.name, path)
    return list(files.values())


def write_remote_code(directory, auto_map: dict | None, code_files=(), drop_code: bool = False) -> None:
    """Give the ``config.json`` in ``directory`` exactly ``auto_map`` for this package's entries (other entries it
    has are kept) and copy ``code_files`` next to it; ``auto_map=None`` removes this package's entries, and with
    ``drop_code`` the ``*.py`` files of ``directory`` (transformers copies code for a class registered with
    ``register_for_auto_class``). Only ``directory`` is read and written: no class or config state."""
    import json
    import shutil
    from pathlib import Path

    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    written = config.get("auto_map")
    merged = {k: v for k, v in written.items() if not _names_own_code(v)} if isinstance(written, dict) else {}
    merged.update(auto_map or {})
    if merged:
        config["auto_map"] = merged
    else:
        config.pop("auto_map", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if auto_map:
        for source in code_files:
            shutil.copyfile(source, directory / Path(source).name)
    elif drop_code:
        for stale in directory.glob("*.py"):
            stale.unlink()


def _is_weight_file(name: str, variant: str | None) -> bool:
    """Whether ``name`` is a safetensors weight file or index transformers loads for ``variant``."""
    stem = f"model.{variant}" if variant else "model"
    index = f"model.safetensors.index.{variant}.json" if variant else "model.safetensors.index.json"
    return name == index or re.fullmatch(re.escape(stem) + r"(-\d{5}-of-\d{5})?\.safetensors", name) is not None


class CheckpointRollbackError(OSError):
    """A failed save could not put every previous file back; the message names the folder that holds them."""


def _move_into_place(new, target, previous, variant: str | None) -> None:
    """Rename the files of ``new`` into ``target``, replacing the checkpoint there all-or-nothing.

    Order: the old ``config.json`` and the old weight files the new save does not replace (another shard set) are
    moved to ``previous`` first, so from here until the new ``config.json`` arrives the folder does not load at
    all (instead of loading old weights with new flags, or the reverse); then every new file, ``config.json``
    last. Files being replaced are hard-linked (else copied) into ``previous`` first. On any error the files
    already moved are put back and the error is raised: the previous checkpoint is as it was. ``target``'s other
    files and folders are never touched. Each rename is atomic (same file system); a crash of the process
    itself between the first and the last rename leaves a folder without ``config.json`` (loading it fails
    loudly) and the previous files in ``previous``.
    """
    import os
    import shutil

    names = sorted(os.listdir(new), key=lambda name: (name == "config.json", name))
    stale = sorted(n for n in os.listdir(target) if _is_weight_file(n, variant) and n not in names)
    os.makedirs(previous)
    taken, backed, placed = [], [], []
    try:
        for name in ("config.json", *stale):
            if os.path.lexists(os.path.join(target, name)):
                os.replace(os.path.join(target, name), os.path.join(previous, name))
                taken.append(name)
        for name in names:
            dest = os.path.join(target, name)
            if name not in taken and os.path.lexists(dest):
                try:
                    os.link(dest, os.path.join(previous, name), follow_symlinks=False)
                except OSError:
                    shutil.copy2(dest, os.path.join(previous, name), follow_symlinks=False)
                backed.append(name)
            os.replace(os.path.join(new, name), dest)
            placed.append(name)
    except BaseException as exc:
        try:
            for name in reversed(placed):
                if name in backed or name in taken:
                    os.replace(os.path.join(previous, name), os.path.join(target, name))
                else:
                    os.unlink(os.path.join(target, name))
            for name in taken:
                if name not in placed:
                    os.replace(os.path.join(previous, name), os.path.join(target, name))
        except BaseException as rollback_exc:
            raise CheckpointRollbackError(
                f"saving into {target} failed ({type(exc).__name__}: {exc}) and putting the previous checkpoint "
                f"back failed too ({type(rollback_exc).__name__}: {rollback_exc}): its files are in {previous}; "
                "move them back into the folder by hand."
            ) from exc
        raise


def saves_on_this_rank(model, kwargs: dict) -> bool:
    """Whether transformers' save writes files in this process (``should_save_on_this_rank`` where it exists)."""
    is_main_process = kwargs.get("is_main_process", True)
    should_save = getattr(model, "should_save_on_this_rank", None)
    return bool(should_save(is_main_process)) if callable(should_save) else bool(is_main_process)


_FOLDER_LOCKS: dict = {}
_FOLDER_LOCKS_GUARD = threading.Lock()


def _folder_lock(path: str) -> threading.Lock:
    """The lock of one save folder (by real path): moves into the same folder take turns, others run at once."""
    with _FOLDER_LOCKS_GUARD:
        return _FOLDER_LOCKS.setdefault(path, threading.Lock())


def _save_checkpoint(model, stock_save, save_directory, kwargs: dict, auto_map: dict | None, code_files):
    """``stock_save(save_directory, **kwargs)`` (transformers' save) with ``auto_map`` and ``code_files`` written
    (or this package's removed), into a temporary folder beside ``save_directory`` and then moved into place.

    In place instead (transformers' own behaviour) where nothing or only part of a checkpoint is written by this
    process: a non-saving rank, ``distributed_checkpoint=True`` (every rank writes its part), or a
    ``save_directory`` that is a file (transformers logs the error).
    """
    import os
    import shutil
    import tempfile

    if os.path.isfile(save_directory) or not saves_on_this_rank(model, kwargs):
        return stock_save(save_directory, **kwargs)
    if kwargs.get("distributed_checkpoint"):
        result = stock_save(save_directory, **kwargs)
        write_remote_code(save_directory, auto_map, code_files)
        return result
    os.makedirs(save_directory, exist_ok=True)
    real = os.path.realpath(save_directory)
    try:  # beside the folder, on the same file system (renames are then atomic)
        work = tempfile.mkdtemp(prefix=f".{os.path.basename(real)}.saving-", dir=os.path.dirname(real))
    except OSError:  # a parent we cannot write to: inside the folder
        work = tempfile.mkdtemp(prefix=".hf_normsoftmax-saving-", dir=real)
    keep = False
    try:
        new = os.path.join(work, "new")
        os.makedirs(new)
        result = stock_save(new, **kwargs)
        write_remote_code(new, auto_map, code_files, drop_code=True)
        with _folder_lock(real):  # two saves into one folder in this process: one set of files, then the other
            _move_into_place(new, real, os.path.join(work, "previous"), kwargs.get("variant"))
        return result
    except CheckpointRollbackError:
        keep = True
        raise
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def save_pretrained(
    model, stock_save, save_directory, *args, save_remote_code: bool | None = None, auto_class: str | None = None,
    **kwargs,
):
    """A variant's ``save_pretrained``: ``stock_save`` (transformers' ``PreTrainedModel.save_pretrained`` bound to
    ``model``) that, by default, also writes the model's code and ``auto_map``, and replaces a checkpoint already in
    ``save_directory`` all-or-nothing.

    The folder then holds ``configuration_normsoftmax.py``, ``modeling_normsoftmax_*.py`` and the files they
    import, and ``config.json`` maps ``AutoConfig``, the model's Auto class and ``AutoModel`` (the base model class
    of the same file, so a fine-tuned head's encoder loads with ``AutoModel`` too) to them: with the package
    installed it loads with the package's classes (no prompt); without it, ``trust_remote_code=True`` loads it.

    Args:
        save_remote_code: ``False`` writes a plain folder (no code files, no ``auto_map``; it then loads only where
            hf_normsoftmax is imported). Default: the model's ``save_remote_code`` attribute (``True``).
        auto_class: the Auto class name mapped to the model's class in ``auto_map`` (default :func:`auto_class_of`).
        *args, **kwargs: as for ``PreTrainedModel.save_pretrained``; ``push_to_hub=True`` saves, then uploads as
            :func:`hf_normsoftmax.hub.push.save_and_push` (transformers' and ``push_to_hub``'s Hub arguments).

    The save reads and changes no class attribute and nothing of the config instance beyond what transformers' own
    save sets (``dtype``, ``architectures``): saves in several threads at once do not affect each other.
    """
    if args:  # by name from here on, so that a positional push_to_hub is seen too
        names = [
            name
            for name, p in inspect.signature(PreTrainedModel.save_pretrained).parameters.items()
            if p.kind is p.POSITIONAL_OR_KEYWORD
        ][2:]  # without self and save_directory
        if len(args) > len(names):
            raise TypeError(
                f"save_pretrained() takes at most {len(names) + 2} positional arguments ({len(args) + 2} given)"
            )
        for name, value in zip(names, args, strict=False):
            if name in kwargs:
                raise TypeError(f"save_pretrained() got multiple values for argument {name!r}")
            kwargs[name] = value
    if kwargs.pop("push_to_hub", False):
        from .push import save_and_push

        return save_and_push(model, save_directory, save_remote_code=save_remote_code, auto_class=auto_class, **kwargs)
    if save_remote_code is None:
        save_remote_code = getattr(model, "save_remote_code", True)
    if not isinstance(save_remote_code, bool):
        raise TypeError(f"Invalid value for `save_remote_code`: {save_remote_code!r}. Allowed: True, False, None.")
    model_class = type(model)
    if save_remote_code and model_class.__module__ == "__main__":
        logger.warning(
            f"{model_class.__name__} is defined in __main__: its code cannot be saved with the "
            "checkpoint (save_remote_code ignored)."
        )
        save_remote_code = False
    auto_map = remote_code_auto_map(model_class, type(model.config), auto_class) if save_remote_code else None
    code = remote_code_files(model_class, type(model.config)) if save_remote_code else ()
    return _save_checkpoint(model, stock_save, save_directory, kwargs, auto_map, code)


def save_with_code(model, save_directory, auto_class: str | None = None, **kwargs):
    """Save ``model`` (a variant, or a remote-code copy of a variant class) with its code and ``auto_map``,
    whatever its ``save_remote_code`` default, all-or-nothing like :func:`save_pretrained`."""
    stock_save = PreTrainedModel.save_pretrained.__get__(model)
    return save_pretrained(model, stock_save, save_directory, save_remote_code=True, auto_class=auto_class, **kwargs)


def push_to_hub(
    model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    processing_class=None,
    tokenizer=None,
    card_fields: dict | None = None,
):
    """A variant's ``push_to_hub``: the model with the hf_normsoftmax model card, its code + ``auto_map``,
    safetensors weights, the config and the tokenizer / processor, in ONE commit
    (:func:`hf_normsoftmax.hub.push.push_model`).

    Args:
        repo_id, commit_message, commit_description, private, token, revision, create_pr, max_shard_size, tags:
            as for ``PreTrainedModel.push_to_hub`` (``tags`` are added to the card's metadata).
        processing_class: the tokenizer / image processor / processor to upload (``tokenizer=`` is an alias).
            Default: the processor files saved in the local folder the model was loaded from
            (``model.name_or_path``), if any; otherwise a warning says the repo gets none.
        card_fields: extra card fields (``dataset_name``, ``eval_metrics``, ``base_model``, ``license``, ...;
            see ``hf_normsoftmax.hub.card.CardInputs``).

    Returns:
        ``huggingface_hub.CommitInfo`` of the commit.
    """
    if processing_class is not None and tokenizer is not None and processing_class is not tokenizer:
        raise ValueError(
            "Invalid arguments: pass the tokenizer / processor once, as `processing_class` "
            "(`tokenizer` is an alias), not two different objects."
        )
    from .push import push_model

    return push_model(
        model,
        repo_id,
        processor=processing_class if processing_class is not None else tokenizer,
        card_fields=card_fields,
        commit_message=commit_message,
        commit_description=commit_description,
        private=private,
        token=token,
        revision=revision,
        create_pr=create_pr,
        max_shard_size=max_shard_size,
        tags=tags,
    )


def merge_and_unload(model):
    """A variant's ``merge_and_unload``: see :func:`hf_normsoftmax.export.merge_and_unload`."""
    from ..export import merge_and_unload as merge

    return merge(model)
