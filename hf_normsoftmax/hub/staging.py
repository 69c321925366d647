"""What a Hub push uploads, written into a staging directory and checked (:mod:`hf_normsoftmax.hub.push` commits it).

:func:`stage_model` saves an in-memory model there, :func:`stage_run_dir` copies (or, for variants, re-saves with
``auto_map`` and code) the model of a run dir. Both add the tokenizer / processor, the model card and its plots,
and refuse what must not be published: pickle weights, a staged set without ``config.json`` or safetensors, a
variant config whose ``auto_map`` names code that is not staged, and, from a run dir, any symbolic link or file
outside the run dir.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .card import render_card
from .card_inputs import (
    card_inputs_from_config,
    collect_run_dir,
    find_model_dir,
    is_variant_config,
    model_family,
    modeling_module,
)
from .save import save_with_code

__all__ = [
    "MODEL_FILES",
    "PICKLE_SUFFIXES",
    "PROCESSOR_FILES",
    "PROCESSOR_MARKERS",
    "RUN_FILES",
    "HubPushError",
    "has_processor",
    "local_processor_dir",
    "processor_files",
    "save_kwargs_for_one_save",
    "stage_model",
    "stage_run_dir",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack")
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
    "video_preprocessor_config.json",
)
PROCESSOR_MARKERS = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                      "processor_config.json", "image_processor_config.json")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
RUN_FILES = ("trainer_state.json", "all_results.json", "eval_results.json", "train_results.json",
             "test_results.json")



class HubPushError(RuntimeError):
    """A push could not be completed. The message says what failed and what state was left."""



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


def processor_files(directory: Path) -> list:
    return [name for name in PROCESSOR_FILES if (directory / name).is_file()]


def has_processor(names: Iterable[str]) -> bool:
    return any(name in PROCESSOR_MARKERS for name in names)


def _weight_files(directory: Path) -> list:
    return sorted(p.name for p in directory.glob("*.safetensors"))


def _pickle_weight_files(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def _load_variant(model_dir: Path):
    """Load a ``normsoftmax_*`` model with the package's classes (needed to re-save it with remote code)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    if not archs:
        raise HubPushError(f"{model_dir / 'config.json'} names no architecture ('architectures' is empty): cannot "
                           "tell which class to load")
    arch = archs[0]
    # the modeling file of the family defines every variant class of it (one file for the decoder families)
    modeling = importlib.import_module(f"..{modeling_module(model_family(config['model_type']))}", __package__)
    cls = getattr(modeling, arch, None)
    # the module also imports stock classes and other families' variants: only a class of this model type loads
    if getattr(getattr(cls, "config_class", None), "model_type", None) != config["model_type"]:
        raise HubPushError(f"architecture {arch!r} from {model_dir / 'config.json'} is not a class of hf_normsoftmax "
                           f"for model type {config['model_type']!r}")
    return cls.from_pretrained(model_dir)


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
    if is_variant_config(config):
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



def local_processor_dir(model) -> Path | None:
    """The local folder the model was loaded from (``model.name_or_path``) if it holds tokenizer / processor files."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    try:
        directory = Path(name)
        found = directory.is_dir() and has_processor(processor_files(directory))
    except (OSError, TypeError, ValueError):
        return None
    return directory if found else None



def save_kwargs_for_one_save(save_kwargs: Mapping[str, Any]) -> dict:
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
    save_kwargs = save_kwargs_for_one_save(save_kwargs or {})
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    if is_variant_config(model.config):
        save_with_code(model, staging, **save_kwargs)
    else:
        model.save_pretrained(staging, **save_kwargs)
    if processor is not None:
        processor.save_pretrained(staging)
    elif processor_dir is not None:
        for name in processor_files(Path(processor_dir)):
            shutil.copyfile(Path(processor_dir) / name, staging / name)
    plot_names = _copy_plots(plots, staging)
    if card is None:
        name = model_name or (repo_id.split("/")[-1] if repo_id else None) or type(model).__name__
        fields = dict(card_fields or {})
        fields.setdefault("plots", plot_names)
        fields.setdefault("sources", ["the in-memory model config"])
        fields.setdefault("code_in_repo", is_variant_config(model.config))  # staged with auto_map + code
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
    if is_variant_config(config):
        model = _load_variant(model_dir)
        save_with_code(model, staging)
        _assert_same_weights(model_dir, staging)
        if os.path.lexists(model_dir / "generation_config.json") and not (staging / "generation_config.json").exists():
            _copy_run_file(run_dir, model_dir / "generation_config.json", staging / "generation_config.json")
    else:
        for name in MODEL_FILES + tuple(_weight_files(model_dir)):
            if os.path.lexists(model_dir / name):
                _copy_run_file(run_dir, model_dir / name, staging / name)

    processor_dir = model_dir if has_processor(processor_files(model_dir)) else run_dir
    processor_names = processor_files(processor_dir)
    if not has_processor(processor_names) and require_processor:
        raise HubPushError(f"no tokenizer or processor files in {model_dir} or {run_dir} (looked for "
                           f"{', '.join(PROCESSOR_MARKERS)}); save the processing class with the model, or "
                           "pass require_processor=False / --no-processor to push without one")
    for name in processor_names:
        _copy_run_file(run_dir, processor_dir / name, staging / name)
    for name in RUN_FILES:
        if os.path.lexists(run_dir / name):
            _copy_run_file(run_dir, run_dir / name, staging / name)

    inputs = collect_run_dir(run_dir, repo_id=repo_id, model_name=model_name)
    inputs.code_in_repo = is_variant_config(config)  # variants are re-saved above with auto_map + code
    for plot in sorted(p.name for p in run_dir.glob("stability*.png") if p.is_symlink()):
        _run_file(run_dir, run_dir / plot)  # refused: the card lists linked plots too, the push uploads none
    card = render_card(inputs, refuse_secrets=False)  # a token in it is refused by the scan before the upload
    for plot in inputs.plots:  # the card embeds them with their path relative to the run dir = repo root
        target = staging / plot
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_run_file(run_dir, run_dir / plot, target)
    (staging / "README.md").write_text(str(card), encoding="utf-8")
    return _validate_staging(staging)


