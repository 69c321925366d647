"""Push hf_normsoftmax checkpoints to the Hugging Face Hub: weights, config, remote code, processor, card, plots.

Everything to upload is first written into a temporary staging directory, checked, and uploaded in ONE commit
(``HfApi.create_repo(..., private=..., exist_ok=True)`` then ``HfApi.create_commit``; not ``upload_folder``,
which in huggingface_hub 2.x with hf_xet may split a folder into several commits). Weights, code, config and
processor files already in the repo that the new upload does not replace are deleted in the same commit.
The run dir is only read, never written, and the staging directory is removed whatever happens, so a failed
push leaves no local state behind; a Hub commit is all-or-nothing, so the remote repo keeps its previous content
(a repo created by the failed call stays, empty).

A push is atomic against a racing one: which remote files to delete is planned from the branch head, and the
commit names that head as its ``parent_commit``. If another commit lands in between, the Hub refuses the commit
(HTTP 412) and the push plans again from the new head (at most :data:`PUSH_ATTEMPTS` times, then
:class:`HubPushError`); the repo therefore always holds one push's complete file set, never one push's
``model.safetensors`` next to the other's shards and index.

What a push uploads:

* weights as ``*.safetensors`` only (a model dir holding only pickle weights such as ``pytorch_model.bin`` is
  refused; ``training_args.bin``, optimizer / scheduler / RNG states are never uploaded);
* ``config.json`` with the variant flags and, for ``normsoftmax_*`` models, an ``auto_map`` plus the Python
  files it names (``modeling_normsoftmax_*.py``, ``configuration_normsoftmax.py`` and what they import) so that
  ``from_pretrained(repo_id, trust_remote_code=True)`` works without the package;
* the tokenizer or image processor files, ``generation_config.json`` if any;
* ``README.md``: the model card (:mod:`hf_normsoftmax.hub.card`), and the ``stability*.png`` plots it shows;
* from a run dir also ``trainer_state.json`` and the ``*_results.json`` metric files.

From a run dir only regular files inside it are read: a symbolic link (``stability_extra.png -> elsewhere``) or
a file resolving outside the run dir is refused with an error naming it, before anything is uploaded.

The token is passed to huggingface_hub only: it is never printed, logged or written, and a push is refused if
any staged file holds a token in use (argument, ``HF_TOKEN``, saved login) or a token-shaped string
(:mod:`hf_normsoftmax.hub.secrets`).

``model.push_to_hub(repo_id, processing_class=...)`` of a variant runs :func:`push_model` (the override lives in
``NormSoftmaxPreTrainedMixin``); with no processor given it uploads the tokenizer / processor files saved in the
local folder the model was loaded from, and warns when there are none. ``model.save_pretrained(save_directory,
push_to_hub=True, repo_id=...)`` of a variant runs :func:`save_and_push`: the usual local save, then
:func:`push_model` (transformers' own would upload its generic card).

Usage::

    from hf_normsoftmax.hub.push import push_model, push_run_dir

    push_run_dir("runs/vit-mnist", "alice/vit-mnist-normsoftmax", private=True, token=os.environ["HF_TOKEN"])
    push_model(model, "alice/tiny-gpt2", processor=tokenizer, card_fields={"dataset_name": "shakespeare"})
    model.push_to_hub("alice/tiny-gpt2", processing_class=tokenizer, private=True)   # the same, for a variant

The Hub endpoint is huggingface_hub's (``HF_ENDPOINT`` environment variable, read when huggingface_hub is
first imported).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .card import (
    card_inputs_from_config,
    collect_run_dir,
    find_model_dir,
    model_family,
    render_card,
)
from .secrets import find_secret, known_tokens

__all__ = ["HubPushError", "push_model", "push_run_dir", "save_and_push", "stage_model", "stage_run_dir"]

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack")
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
    "video_preprocessor_config.json",
)
_PROCESSOR_MARKERS = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                      "processor_config.json", "image_processor_config.json")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
RUN_FILES = ("trainer_state.json", "all_results.json", "eval_results.json", "train_results.json",
             "test_results.json")
_AUTO_CLASS_BY_SUFFIX = (
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


#: Commits a push tries when other commits land between its plan and its commit (each re-plans from the new head).
PUSH_ATTEMPTS = 5
# What the Hub answers a commit whose parent_commit is no longer the branch head (412), or a conflicting one (409).
_MOVED_HEAD_STATUSES = (409, 412)


class HubPushError(RuntimeError):
    """A push could not be completed. The message says what failed and what state was left."""


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------
def _check_repo_id(repo_id) -> str:
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id {repo_id!r} must look like 'namespace/name' (a user or organisation, a slash, "
                         "and the repo name)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repo id: {exc}") from None
    return repo_id


def _check_token(token):
    if token is None or token is True:  # True: transformers' spelling of "the saved login"
        return None
    if not isinstance(token, str) or not token.strip():
        raise ValueError("token must be a non-empty string or None (None: huggingface_hub's HF_TOKEN / login)")
    return token.strip()


def auto_class_for(model_class_name: str) -> str:
    """The transformers Auto class a model class registers under (``AutoModel`` for bare encoders)."""
    for suffix, auto in _AUTO_CLASS_BY_SUFFIX:
        if model_class_name.endswith(suffix):
            return auto
    return "AutoModel"


def auto_class_of(model) -> str:
    """The Auto class a model instance is saved under: the variant's own choice when it has one."""
    own = getattr(type(model), "normsoftmax_auto_class", None)
    return own() if callable(own) else auto_class_for(type(model).__name__)


def save_with_code(model, directory, **kwargs) -> None:
    """Save a ``normsoftmax_*`` model with ``auto_map`` and its code, whatever its ``save_remote_code`` default.

    Variant classes take ``save_remote_code=True``. Older remote-code copies of the classes do not: they are saved
    as they save, then ``config.json`` gets the ``auto_map`` and the folder the code files of the model's own
    classes (computed from the model's classes; no class or config state is set, so saves in other threads are
    not affected).
    """
    try:
        takes_flag = "save_remote_code" in inspect.signature(model.save_pretrained).parameters
    except (TypeError, ValueError):
        takes_flag = False
    if takes_flag:
        model.save_pretrained(directory, **kwargs, save_remote_code=True)
        return
    from ..integration import remote_code_auto_map, remote_code_files, write_remote_code

    auto_class = kwargs.pop("auto_class", None) or auto_class_of(model)
    model.save_pretrained(directory, **kwargs)
    write_remote_code(
        directory,
        remote_code_auto_map(type(model), type(model.config), auto_class),
        remote_code_files(type(model), type(model.config)),
    )


def _is_variant_config(config) -> bool:
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    return isinstance(model_type, str) and model_type.startswith("normsoftmax_")


def _prepare_staging(staging_dir) -> Path:
    staging = Path(staging_dir)
    if staging.exists() and (not staging.is_dir() or any(staging.iterdir())):
        raise ValueError(f"staging dir {str(staging)!r} must be empty or not exist yet")
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def _copy_plots(plots: Iterable, staging: Path, base: Path | None = None) -> list:
    """Copy plot files into the staging dir; returns their repo paths (file names)."""
    out = []
    for plot in plots or ():
        src = Path(plot) if base is None or Path(plot).is_absolute() else base / plot
        if not src.is_file():
            raise FileNotFoundError(f"plot {str(src)!r} does not exist")
        if src.suffix.lower() not in (".png", ".jpg", ".jpeg", ".svg", ".webp"):
            raise ValueError(f"plot {str(src)!r}: expected an image file (.png, .jpg, .jpeg, .svg, .webp)")
        shutil.copyfile(src, staging / src.name)
        out.append(src.name)
    return out


def _processor_files(directory: Path) -> list:
    return [name for name in PROCESSOR_FILES if (directory / name).is_file()]


def _has_processor(names: Iterable[str]) -> bool:
    return any(name in _PROCESSOR_MARKERS for name in names)


def _weight_files(directory: Path) -> list:
    return sorted(p.name for p in directory.glob("*.safetensors"))


def _pickle_weight_files(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def _load_variant(model_dir: Path):
    """Load a ``normsoftmax_*`` model with the package's classes (needed to re-save it with remote code)."""
    try:
        import hf_normsoftmax
    except ImportError as exc:
        raise HubPushError(f"the model in {model_dir} is an hf_normsoftmax variant but the package cannot be "
                           f"imported: {exc}") from exc
    import importlib

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    if not archs:
        raise HubPushError(f"{model_dir / 'config.json'} names no architecture ('architectures' is empty): cannot "
                           "tell which class to load")
    arch = archs[0]
    family = model_family(config["model_type"])
    candidates = [hf_normsoftmax]
    try:
        candidates.append(importlib.import_module(f"hf_normsoftmax.modeling_normsoftmax_{family}"))
    except ImportError:
        pass
    for module in candidates:
        cls = getattr(module, arch, None)
        if cls is not None:
            return cls.from_pretrained(model_dir)
    raise HubPushError(f"architecture {arch!r} from {model_dir / 'config.json'} is not a class of hf_normsoftmax")


def _read_safetensors_dir(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for name in _weight_files(directory):
        tensors.update(load_file(directory / name))
    return tensors


def _assert_same_weights(src: Path, staged: Path) -> None:
    """A re-saved variant must carry exactly the tensors of the run's checkpoint."""
    import torch

    a, b = _read_safetensors_dir(src), _read_safetensors_dir(staged)
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5]
        raise HubPushError(f"re-saving the model of {src} changed its tensor names (only in the checkpoint: "
                           f"{only_a}, only in the re-saved copy: {only_b}); refusing to push a different model")
    for key in a:
        if a[key].dtype != b[key].dtype or a[key].shape != b[key].shape or not torch.equal(a[key], b[key]):
            raise HubPushError(f"re-saving the model of {src} changed tensor {key!r}; refusing to push a "
                               "different model")


def _validate_staging(staging: Path) -> list:
    names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    if "config.json" not in names:
        raise HubPushError(f"staged upload has no config.json (files: {names})")
    if not any(n.endswith(".safetensors") for n in names):
        raise HubPushError(f"staged upload has no safetensors weights (files: {names})")
    pickles = [n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise HubPushError(f"refusing to upload pickle files {pickles}: weights are published as safetensors only")
    config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
    if _is_variant_config(config):
        auto_map = config.get("auto_map") or {}
        if "AutoConfig" not in auto_map or len(auto_map) < 2:
            raise HubPushError(f"staged config.json of a {config['model_type']} model lacks an auto_map for the "
                               f"config and the model (got {auto_map}); trust_remote_code could not load it")
        for ref in auto_map.values():
            refs = ref if isinstance(ref, (list, tuple)) else [ref]
            for item in refs:
                if item and f"{item.split('.')[0]}.py" not in names:
                    raise HubPushError(f"auto_map names {item!r} but {item.split('.')[0]}.py is not staged")
    return names


def _scan_for_token(staging: Path, token: str | None) -> None:
    """Refuse the push if a staged file holds a token in use or a token-shaped string (:mod:`.secrets`)."""
    tokens = known_tokens(token)
    for path in sorted(staging.rglob("*")):
        found = find_secret(path, tokens) if path.is_file() else None
        if found:
            raise HubPushError(f"refusing to push: {found} appears in staged file {path.relative_to(staging)}. "
                               "Nothing was uploaded; remove the token from the file it comes from (a token in use "
                               "is the token argument, HF_TOKEN or the saved login) and push again.")


def _run_file(run_dir: Path, path: Path) -> Path:
    """``path`` if it is a regular file inside ``run_dir``, reached without a symbolic link; otherwise a
    :class:`HubPushError` naming it. A push reads only such files from a run dir, so a link such as
    ``stability_extra.png -> ~/.ssh/id_rsa`` is never uploaded."""
    relative = path.relative_to(run_dir)
    current = run_dir
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise HubPushError(
                f"refusing to push {run_dir}: {relative} is a symbolic link or inside one ({current.name} -> "
                f"{os.readlink(current)}); a push uploads regular files of the run dir only. Nothing was uploaded. "
                "Replace the link by a copy of the file, or remove it.")
    if not path.is_file() or not path.resolve().is_relative_to(run_dir.resolve()):
        raise HubPushError(f"refusing to push {run_dir}: {relative} is not a regular file inside the run dir; a "
                           "push uploads regular files of the run dir only. Nothing was uploaded.")
    return path


def _copy_run_file(run_dir: Path, source: Path, target: Path) -> None:
    shutil.copyfile(_run_file(run_dir, source), target, follow_symlinks=False)


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


# ------------------------------------------------------------------------------------------------------------
# staging
# ------------------------------------------------------------------------------------------------------------
def local_processor_dir(model) -> Path | None:
    """The local folder the model was loaded from (``model.name_or_path``) if it holds tokenizer / processor files."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    try:
        directory = Path(name)
        found = directory.is_dir() and _has_processor(_processor_files(directory))
    except (OSError, TypeError, ValueError):
        return None
    return directory if found else None


def _resolve_processor(model, processor, repo_id, processor_dir=None):
    """``(processor_object, processor_dir)`` for a push: the given object, else the files next to the model.

    ``processor=False`` pushes without one on purpose; ``None`` takes the tokenizer / processor files of
    ``processor_dir`` if it has any (``save_pretrained(push_to_hub=True)`` passes its ``save_directory``), else
    those of the folder the model was loaded from, and warns when neither has any (a repo without its
    tokenizer / processor cannot be used with ``AutoTokenizer`` / ``AutoImageProcessor`` / ``pipeline``).
    """
    if processor is False:
        return None, None
    if processor is not None:
        if not hasattr(processor, "save_pretrained"):
            raise TypeError(
                f"processor must have save_pretrained (a tokenizer or processor), got {type(processor).__name__}"
            )
        return processor, None
    if (
        processor_dir is not None
        and Path(processor_dir).is_dir()
        and _has_processor(_processor_files(Path(processor_dir)))
    ):
        return None, Path(processor_dir)
    directory = local_processor_dir(model)
    if directory is None:
        name = getattr(model, "name_or_path", None) or ""
        where = (
            f"the folder the model was loaded from ({name}) has no {' / '.join(_PROCESSOR_MARKERS)}"
            if name and Path(name).is_dir()
            else "the model was not loaded from a local folder" + (f" (name_or_path {name!r})" if name else "")
        )
        if processor_dir is not None:
            where = f"{processor_dir} has no tokenizer / processor files, and {where}"
        warnings.warn(
            f"Pushing to {repo_id!r} WITHOUT a tokenizer or processor: none was given and {where}. "
            "AutoTokenizer / AutoImageProcessor / pipeline() will not work from that repo. Pass "
            "`processing_class=` to model.push_to_hub (`processor=` to push_model), or `processor=False` to push "
            "without one on purpose.",
            UserWarning,
            stacklevel=3,
        )
    return None, directory


def _for_one_save(save_kwargs: Mapping[str, Any]) -> dict:
    """A copy of ``save_pretrained`` keyword arguments for one save: transformers' save empties the ``state_dict``
    dict it is given, so that dict is copied too (the caller's, or a later save's, keeps its tensors)."""
    kwargs = dict(save_kwargs)
    if isinstance(kwargs.get("state_dict"), Mapping):
        kwargs["state_dict"] = dict(kwargs["state_dict"])
    return kwargs


def stage_model(
    model,
    staging_dir,
    *,
    processor=None,
    repo_id: str | None = None,
    model_name: str | None = None,
    card=None,
    card_fields: Mapping[str, Any] | None = None,
    plots: Iterable = (),
    processor_dir=None,
    max_shard_size=None,
    tags: Iterable[str] | None = None,
    save_kwargs: Mapping[str, Any] | None = None,
) -> list:
    """Write what :func:`push_model` uploads into ``staging_dir`` (empty or new); returns the staged paths.

    Args:
        model: a ``PreTrainedModel``. ``normsoftmax_*`` variants are saved with ``auto_map`` and their code.
        processor: tokenizer / image processor / processor saved next to the weights (optional).
        repo_id, model_name: used by the card (model name defaults to the repo name).
        card: a ready ``ModelCard`` or README text; default: rendered from the model config and ``card_fields``.
        card_fields: extra :class:`~hf_normsoftmax.hub.card.CardInputs` fields (``dataset_name``,
            ``eval_metrics``, ``hyperparameters``, ``base_model``, ``license``, ...).
        plots: image files to include in the repo (shown in the card when it is rendered here).
        processor_dir: a folder whose tokenizer / processor files are copied (when ``processor`` is None).
        max_shard_size: passed to ``save_pretrained`` (default: transformers').
        tags: extra tags for the rendered card's metadata (with the model's ``model_tags``).
        save_kwargs: further ``save_pretrained`` keyword arguments (``state_dict``, ``variant``, ``auto_class``
            of a variant, ...), so that the staged copy is saved like a local ``save_pretrained`` call.
    """
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if processor is not None and not hasattr(processor, "save_pretrained"):
        raise TypeError(
            f"processor must have save_pretrained (a tokenizer or processor), got {type(processor).__name__}"
        )
    staging = _prepare_staging(staging_dir)
    save_kwargs = _for_one_save(save_kwargs or {})
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    if _is_variant_config(model.config):
        save_with_code(model, staging, **save_kwargs)
    else:
        model.save_pretrained(staging, **save_kwargs)
    if processor is not None:
        processor.save_pretrained(staging)
    elif processor_dir is not None:
        for name in _processor_files(Path(processor_dir)):
            shutil.copyfile(Path(processor_dir) / name, staging / name)
    plot_names = _copy_plots(plots, staging)
    if card is None:
        name = model_name or (repo_id.split("/")[-1] if repo_id else None) or type(model).__name__
        fields = dict(card_fields or {})
        fields.setdefault("plots", plot_names)
        fields.setdefault("sources", ["the in-memory model config"])
        fields.setdefault("code_in_repo", _is_variant_config(model.config))  # staged with auto_map + code
        card = render_card(card_inputs_from_config(model.config, model_name=name, repo_id=repo_id, **fields),
                           refuse_secrets=False)  # a token in it is refused by the scan before the upload
        extra = [t for t in [*(tags or ()), *(getattr(model, "model_tags", None) or ())] if isinstance(t, str)]
        if extra:
            card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *extra]))
    (staging / "README.md").write_text(str(card), encoding="utf-8")
    return _validate_staging(staging)


def stage_run_dir(run_dir, staging_dir, *, repo_id: str | None = None, model_name: str | None = None,
                  require_processor: bool = True) -> list:
    """Write what :func:`push_run_dir` uploads into ``staging_dir`` (empty or new); returns the staged paths.

    The model is taken from :func:`~hf_normsoftmax.hub.card.find_model_dir`. Stock models are copied file by
    file (an allowlist); ``normsoftmax_*`` variants are loaded with the package and re-saved with
    ``auto_map`` and the current remote code, and the re-saved tensors are checked to equal the run's.
    Processor / tokenizer files come from the model dir, else from the run dir; with ``require_processor``
    (default) their absence is an error.
    """
    run_dir = Path(run_dir)
    model_dir = find_model_dir(run_dir)
    _run_file(run_dir, model_dir / "config.json")
    staging = _prepare_staging(staging_dir)
    if not _weight_files(model_dir):
        pickles = _pickle_weight_files(model_dir)
        hint = f" (found only {pickles}; re-save with save_pretrained, which writes safetensors)" if pickles else ""
        raise HubPushError(f"no *.safetensors weights in {model_dir}{hint}: weights are published as "
                           "safetensors only")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    model_family(config.get("model_type", ""))
    index = model_dir / "model.safetensors.index.json"
    for path in (model_dir / "config.json", *(model_dir / n for n in _weight_files(model_dir)), index):
        if os.path.lexists(path):
            _run_file(run_dir, path)  # before anything is loaded from it
    if _is_variant_config(config):
        model = _load_variant(model_dir)
        save_with_code(model, staging)
        _assert_same_weights(model_dir, staging)
        if os.path.lexists(model_dir / "generation_config.json") and not (staging / "generation_config.json").exists():
            _copy_run_file(run_dir, model_dir / "generation_config.json", staging / "generation_config.json")
    else:
        for name in MODEL_FILES + tuple(_weight_files(model_dir)):
            if os.path.lexists(model_dir / name):
                _copy_run_file(run_dir, model_dir / name, staging / name)

    processor_dir = model_dir if _has_processor(_processor_files(model_dir)) else run_dir
    processor_names = _processor_files(processor_dir)
    if not _has_processor(processor_names) and require_processor:
        raise HubPushError(f"no tokenizer or processor files in {model_dir} or {run_dir} (looked for "
                           f"{', '.join(_PROCESSOR_MARKERS)}); save the processing class with the model, or "
                           "pass require_processor=False / --no-processor to push without one")
    for name in processor_names:
        _copy_run_file(run_dir, processor_dir / name, staging / name)
    for name in RUN_FILES:
        if os.path.lexists(run_dir / name):
            _copy_run_file(run_dir, run_dir / name, staging / name)

    inputs = collect_run_dir(run_dir, repo_id=repo_id, model_name=model_name)
    inputs.code_in_repo = _is_variant_config(config)  # variants are re-saved above with auto_map + code
    for plot in sorted(p.name for p in run_dir.glob("stability*.png") if p.is_symlink()):
        _run_file(run_dir, run_dir / plot)  # refused: the card lists linked plots too, the push uploads none
    card = render_card(inputs, refuse_secrets=False)  # a token in it is refused by the scan before the upload
    for plot in inputs.plots:  # the card embeds them with their path relative to the run dir = repo root
        target = staging / plot
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_run_file(run_dir, run_dir / plot, target)
    (staging / "README.md").write_text(str(card), encoding="utf-8")
    return _validate_staging(staging)


# ------------------------------------------------------------------------------------------------------------
# pushing
# ------------------------------------------------------------------------------------------------------------
def _stale_remote_files(api, repo_id: str, staged: set, revision: str | None = None) -> list:
    """Remote weights / code / processor files that the new upload does not replace (they would mix in)."""
    remote = api.list_repo_files(repo_id, revision=revision)
    stale = []
    for path in remote:
        if path in staged or "/" in path:
            continue
        if path.endswith((".safetensors", ".py")) or path in MODEL_FILES or path in PROCESSOR_FILES:
            stale.append(path)
    return stale


def _upload(staging: Path, repo_id: str, *, private: bool | None, token: str | None, commit_message: str,
            source: str, commit_description: str | None = None, revision: str | None = None,
            create_pr: bool = False):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    scan_token = token or get_token()
    _scan_for_token(staging, scan_token)
    api = HfApi(token=token)
    staged = sorted(str(p.relative_to(staging).as_posix()) for p in staging.rglob("*") if p.is_file())
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.model_info(repo_id)
        if private and not info.private:
            raise HubPushError(f"{repo_id!r} already exists and is PUBLIC, but a private push was requested; "
                               "nothing was uploaded. Make the repo private first, or push without --private.")
        if revision not in (None, "main") and not str(revision).startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)  # as transformers' push_to_hub does
    except HfHubHTTPError as exc:
        raise HubPushError(f"could not create or access Hub repo {repo_id!r} at {api.endpoint}: "
                           f"{_scrub(str(exc), scan_token)}. Nothing was uploaded; {source} was not "
                           "modified.") from exc
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        # Plan from the branch head (which remote files the upload replaces or deletes), then commit against
        # exactly that head: a push that lands in between makes the Hub refuse the commit (HTTP 412) instead of
        # applying a stale plan (e.g. one push's model.safetensors left next to the other's shards + index).
        try:
            head = api.model_info(repo_id, revision=revision).sha
            stale = _stale_remote_files(api, repo_id, set(staged), revision=head)
        except HfHubHTTPError as exc:
            raise HubPushError(f"could not read Hub repo {repo_id!r} at {api.endpoint}: "
                               f"{_scrub(str(exc), scan_token)}. Nothing was uploaded; {source} was not "
                               "modified.") from exc
        operations = [CommitOperationDelete(path_in_repo=path) for path in stale]
        operations += [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(staging / path)) for path in staged]
        try:
            # One create_commit, not upload_folder: with hf_xet installed, huggingface_hub 2.x's upload_folder
            # streams a folder in several commits (and retries them), so a failure could publish part of a
            # checkpoint. A single commit is all-or-nothing.
            return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message,
                                     commit_description=commit_description, repo_type="model", revision=revision,
                                     create_pr=create_pr, parent_commit=head)
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status not in _MOVED_HEAD_STATUSES:
                raise _commit_failed(exc, repo_id, api, scan_token, source) from exc
            logger.info("push to %s: the repo changed since the upload was planned (attempt %d of %d); re-planning",
                        repo_id, attempt, PUSH_ATTEMPTS)
            last = exc
        except Exception as exc:  # noqa: BLE001 - dropped connections, timeouts: all end the push
            raise _commit_failed(exc, repo_id, api, scan_token, source) from exc
    raise HubPushError(
        f"upload to {repo_id!r} at {api.endpoint} was refused {PUSH_ATTEMPTS} times because other commits landed "
        f"on the branch between planning the upload and committing it (HTTP {last.response.status_code}: "
        f"another push to the same repo is running). Nothing of this push was committed and {source} was only "
        "read; push again once the other push has finished.") from last


def _commit_failed(exc, repo_id, api, scan_token, source) -> HubPushError:
    return HubPushError(
        f"upload to {repo_id!r} at {api.endpoint} failed during the commit: {type(exc).__name__}: "
        f"{_scrub(str(exc), scan_token).rstrip('.')}. Nothing was written locally ({source} was only read; "
        "the staged files were in a temporary directory, now removed). A Hub commit is all-or-nothing, so the "
        "repo keeps its previous content; run the same push again to retry.")


def push_run_dir(run_dir, repo_id: str, *, private: bool = False, token: str | None = None,
                 commit_message: str | None = None, model_name: str | None = None,
                 require_processor: bool = True):
    """Push the model of a Trainer output dir with its card, plots, metrics and processor (one commit).

    Args:
        run_dir: the run directory (see :mod:`hf_normsoftmax.hub.card` for what is read).
        repo_id: ``namespace/name`` on the Hub; created if missing.
        private: create the repo private; refuses to push into an existing PUBLIC repo when True.
        token: access token (default: huggingface_hub's, e.g. ``HF_TOKEN``). Never printed nor written.
        commit_message: default ``"Upload <model type> from hf_normsoftmax"``.
        model_name: name in the card (default from run_config.json, the repo name, or the dir name).
        require_processor: fail when no tokenizer / processor files are found (default True).

    Returns:
        huggingface_hub.CommitInfo of the commit. Raises :class:`HubPushError` on failure.
    """
    _check_repo_id(repo_id)
    token = _check_token(token)
    run_dir = Path(run_dir)
    with tempfile.TemporaryDirectory(prefix="hf_normsoftmax_push_") as tmp:
        staging = Path(tmp) / "repo"
        files = stage_run_dir(run_dir, staging, repo_id=repo_id, model_name=model_name,
                              require_processor=require_processor)
        config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
        message = commit_message or f"Upload {config.get('model_type')} from hf_normsoftmax"
        logger.info("pushing %d files from %s to %s", len(files), run_dir, repo_id)
        return _upload(staging, repo_id, private=private, token=token, commit_message=message,
                       source=f"run dir {run_dir}")


def push_model(
    model,
    repo_id: str,
    *,
    processor=None,
    private: bool | None = False,
    token: str | None = None,
    commit_message: str | None = None,
    model_name: str | None = None,
    card=None,
    card_fields: Mapping[str, Any] | None = None,
    plots: Iterable = (),
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size=None,
    tags: Iterable[str] | None = None,
    processor_dir=None,
    save_kwargs: Mapping[str, Any] | None = None,
    card_dir=None,
):
    """Push an in-memory model (and its tokenizer / processor) with a generated card, in one commit.

    ``normsoftmax_*`` variants are saved with ``auto_map`` and their code for ``trust_remote_code`` loading. This
    is what ``model.push_to_hub(...)`` and ``model.save_pretrained(..., push_to_hub=True)`` of a variant run.

    Args:
        processor: the tokenizer / image processor / processor to upload. ``None`` (default): the processor files
            in ``processor_dir``, else those saved in the local folder the model was loaded from
            (``model.name_or_path``), if any, else a ``UserWarning`` says the repo gets none. ``False``: push
            without one, silently.
        private: ``None`` leaves the choice to the Hub (public unless the namespace defaults to private).
        revision, create_pr, commit_description: as in ``HfApi.create_commit`` (a missing branch is created).
        max_shard_size: passed to ``save_pretrained``.
        tags: extra card metadata tags (the model's ``model_tags`` are added too).
        processor_dir: a folder searched first for tokenizer / processor files when ``processor`` is None.
        save_kwargs: further ``save_pretrained`` keyword arguments for the staged copy (see :func:`stage_model`).
        card_dir: a folder that also gets the uploaded ``README.md``, once the commit succeeded (where
            ``save_pretrained(push_to_hub=True)`` keeps the card, as transformers does with its own).

    See :func:`stage_model` for ``card``, ``card_fields`` and ``plots``, and :func:`push_run_dir` for ``token``.
    Returns the ``CommitInfo``.
    """
    _check_repo_id(repo_id)
    token = _check_token(token)
    processor, processor_dir = _resolve_processor(model, processor, repo_id, processor_dir)
    with tempfile.TemporaryDirectory(prefix="hf_normsoftmax_push_") as tmp:
        staging = Path(tmp) / "repo"
        files = stage_model(
            model,
            staging,
            processor=processor,
            repo_id=repo_id,
            model_name=model_name,
            card=card,
            card_fields=card_fields,
            plots=plots,
            processor_dir=processor_dir,
            max_shard_size=max_shard_size,
            tags=tags,
            save_kwargs=save_kwargs,
        )
        message = commit_message or f"Upload {model.config.model_type} from hf_normsoftmax"
        logger.info("pushing %d files of %s to %s", len(files), type(model).__name__, repo_id)
        info = _upload(
            staging,
            repo_id,
            private=private,
            token=token,
            commit_message=message,
            source="the in-memory model",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
        if card_dir is not None:
            shutil.copyfile(staging / "README.md", Path(card_dir) / "README.md")
        return info


# ------------------------------------------------------------------------------------------------------------
# save_pretrained(push_to_hub=True)
# ------------------------------------------------------------------------------------------------------------
#: Hub arguments of ``PreTrainedModel.save_pretrained(push_to_hub=True, **kwargs)`` in transformers 5.23 that the
#: push honours (the other ``HfApi.create_repo`` options transformers forwards are refused by name), followed by
#: the further keyword arguments of a variant's ``model.push_to_hub``.
SAVE_PUSH_ARGUMENTS = (
    "repo_id",
    "commit_message",
    "create_pr",
    "private",
    "token",
    "repo_type",
    "commit_description",
    "revision",
    "tags",
    "processing_class",
    "tokenizer",
    "card_fields",
)
#: ``save_pretrained`` arguments that only matter locally (not passed on to the staged copy).
_LOCAL_ONLY_SAVE_ARGUMENTS = ("is_main_process", "distributed_checkpoint")


def _save_pretrained_arguments() -> tuple:
    """The keyword arguments of transformers' ``PreTrainedModel.save_pretrained`` that describe the local save."""
    from transformers import PreTrainedModel

    params = inspect.signature(PreTrainedModel.save_pretrained).parameters
    return tuple(
        name
        for name, p in params.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and name not in ("self", "save_directory", "push_to_hub", "token")
    )


def _split_save_push_kwargs(kwargs: Mapping[str, Any]) -> tuple:
    """``(save_kwargs, hub_kwargs)`` of a ``save_pretrained(push_to_hub=True, **kwargs)`` call; refuses the rest.

    transformers hands every unknown keyword to ``HfApi.create_repo``: the ``create_repo`` options the one-commit
    push has no use for (Space settings, ``visibility``, ``resource_group_id``, ...) raise a ``ValueError`` naming
    them, anything else a ``TypeError``, before anything is saved or uploaded.
    """
    from huggingface_hub import HfApi

    save_names = _save_pretrained_arguments()
    save_kwargs = {k: v for k, v in kwargs.items() if k in save_names}
    hub_kwargs = {k: v for k, v in kwargs.items() if k in SAVE_PUSH_ARGUMENTS}
    rest = sorted(set(kwargs) - set(save_kwargs) - set(hub_kwargs))
    create_repo_options = set(inspect.signature(HfApi.create_repo).parameters) - {"self", "repo_id"}
    unsupported = [k for k in rest if k in create_repo_options]
    unknown = [k for k in rest if k not in create_repo_options]
    if unknown:
        raise TypeError(
            f"save_pretrained(push_to_hub=True) got unexpected keyword argument(s) {unknown}. Accepted: "
            f"the save arguments {list(save_names)}, and for the push {list(SAVE_PUSH_ARGUMENTS)}."
        )
    if unsupported:
        raise ValueError(
            f"save_pretrained(push_to_hub=True) of an hf_normsoftmax variant does not support the "
            f"HfApi.create_repo option(s) {unsupported}: it pushes to a model repo, created with "
            "`private=` only. Create the repo with HfApi.create_repo first if you need them."
        )
    if hub_kwargs.get("repo_type") not in (None, "model"):
        raise ValueError(
            f"Invalid value for `repo_type`: {hub_kwargs['repo_type']!r}. A model is pushed to a "
            "model repo: allowed values are 'model' and None."
        )
    if save_kwargs.get("distributed_checkpoint"):
        raise ValueError(
            "save_pretrained(push_to_hub=True, distributed_checkpoint=True) is not supported for "
            "hf_normsoftmax variants: the push saves the gathered model. Save the distributed "
            "checkpoint without push_to_hub, and push a gathered copy with model.push_to_hub."
        )
    processor, tokenizer = hub_kwargs.get("processing_class"), hub_kwargs.get("tokenizer")
    if processor is not None and tokenizer is not None and processor is not tokenizer:
        raise ValueError(
            "Invalid arguments: pass the tokenizer / processor once, as `processing_class` "
            "(`tokenizer` is an alias), not two different objects."
        )
    return save_kwargs, hub_kwargs


def _full_repo_id(repo_id: str, token) -> str:
    """``namespace/name``: a bare name goes to the token's user, as ``HfApi.create_repo`` does with it."""
    if "/" in repo_id:
        return repo_id
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        user = HfApi().whoami(token=token if isinstance(token, str) else None)["name"]
    except (HfHubHTTPError, OSError) as exc:
        raise HubPushError(
            f"repo_id {repo_id!r} has no namespace and the token's user could not be looked up "
            f"({type(exc).__name__}); pass repo_id='namespace/name'. Nothing was saved or "
            "uploaded."
        ) from exc
    return f"{user}/{repo_id}"


def save_and_push(
    model, save_directory, *, save_remote_code: bool | None = None, auto_class: str | None = None, **kwargs
):
    """``model.save_pretrained(save_directory, push_to_hub=True, **kwargs)`` of a variant: save, then push_model.

    ``save_directory`` is written as by ``save_pretrained`` without ``push_to_hub`` (plus the uploaded
    ``README.md``, where transformers would write its generic card); the Hub repo gets, in ONE commit, what
    :func:`push_model` uploads: the hf_normsoftmax card, the code + ``auto_map``, safetensors, the config and the
    tokenizer / processor (``processing_class=``, else the processor files already in ``save_directory``, else
    those of the folder the model was loaded from).

    Args:
        save_remote_code, auto_class: as for the variant's ``save_pretrained``. The upload always carries the code
            and ``auto_map`` (as ``model.push_to_hub`` does): ``save_remote_code=False`` only keeps them out of
            ``save_directory``, with a warning.
        **kwargs: transformers' ``save_pretrained`` arguments (``max_shard_size``, ``state_dict``, ``variant``,
            ``is_main_process``, ...), its Hub arguments (``repo_id``, default the folder's name in the token
            user's namespace; ``commit_message``, ``create_pr``, ``private``, ``token``, ``repo_type="model"``)
            and those of a variant's ``model.push_to_hub`` (``commit_description``, ``revision``, ``tags``,
            ``processing_class`` / ``tokenizer``, ``card_fields``). Anything else raises before anything is saved.

    Returns:
        ``huggingface_hub.CommitInfo`` of the commit, or None on a process that does not save
        (``is_main_process=False`` or a non-zero distributed rank: transformers does not push from those either).
    """
    save_kwargs, hub_kwargs = _split_save_push_kwargs(kwargs)
    if save_remote_code is False:
        warnings.warn(
            "save_pretrained(push_to_hub=True, save_remote_code=False): the Hub upload includes the code "
            "and auto_map all the same (as model.push_to_hub does); only the local folder is saved "
            "without them.",
            UserWarning,
            stacklevel=3,
        )
    token = _check_token(hub_kwargs.get("token"))
    from ..integration import _saves_on_this_rank

    saves_here = _saves_on_this_rank(model, save_kwargs)
    repo_id = None
    if saves_here:  # the repo id is settled before anything is written
        repo_id = _check_repo_id(_full_repo_id(hub_kwargs.get("repo_id") or Path(save_directory).name, token))
    # the staged save below needs the state_dict's tensors as well
    local_kwargs = _for_one_save(save_kwargs)
    model.save_pretrained(save_directory, save_remote_code=save_remote_code, auto_class=auto_class, **local_kwargs)
    if not saves_here:
        return None
    staged_kwargs = {
        k: v for k, v in save_kwargs.items() if k not in _LOCAL_ONLY_SAVE_ARGUMENTS and k != "max_shard_size"
    }
    if auto_class is not None:
        staged_kwargs["auto_class"] = auto_class
    processor = hub_kwargs.get("processing_class")
    processor = processor if processor is not None else hub_kwargs.get("tokenizer")
    return push_model(
        model,
        repo_id,
        processor=processor,
        private=hub_kwargs.get("private"),
        token=token,
        commit_message=hub_kwargs.get("commit_message"),
        commit_description=hub_kwargs.get("commit_description"),
        revision=hub_kwargs.get("revision"),
        create_pr=hub_kwargs.get("create_pr", False),
        max_shard_size=save_kwargs.get("max_shard_size"),
        tags=hub_kwargs.get("tags"),
        card_fields=hub_kwargs.get("card_fields"),
        processor_dir=save_directory,
        save_kwargs=staged_kwargs,
        card_dir=save_directory,
    )
