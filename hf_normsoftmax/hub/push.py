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

What is uploaded is first written by :mod:`hf_normsoftmax.hub.staging` (:func:`stage_model`,
:func:`stage_run_dir`); this module checks it for tokens and commits it.

The Hub endpoint is huggingface_hub's (``HF_ENDPOINT`` environment variable, read when huggingface_hub is
first imported).
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .save import saves_on_this_rank
from .secrets import find_secret, known_tokens
from .staging import (
    MODEL_FILES,
    PROCESSOR_FILES,
    PROCESSOR_MARKERS,
    HubPushError,
    has_processor,
    local_processor_dir,
    processor_files,
    save_kwargs_for_one_save,
    stage_model,
    stage_run_dir,
)

__all__ = ["HubPushError", "local_processor_dir", "push_model", "push_run_dir", "save_and_push", "stage_model",
           "stage_run_dir"]

logger = logging.getLogger(__name__)

#: Commits a push tries when other commits land between its plan and its commit (each re-plans from the new head).
PUSH_ATTEMPTS = 5
# What the Hub answers a commit whose parent_commit is no longer the branch head (412), or a conflicting one (409).
_MOVED_HEAD_STATUSES = (409, 412)


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


def _scan_for_token(staging: Path, token: str | None) -> None:
    """Refuse the push if a staged file holds a token in use or a token-shaped string (:mod:`.secrets`)."""
    tokens = known_tokens(token)
    for path in sorted(staging.rglob("*")):
        found = find_secret(path, tokens) if path.is_file() else None
        if found:
            raise HubPushError(f"refusing to push: {found} appears in staged file {path.relative_to(staging)}. "
                               "Nothing was uploaded; remove the token from the file it comes from (a token in use "
                               "is the token argument, HF_TOKEN or the saved login) and push again.")


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


# ------------------------------------------------------------------------------------------------------------
# the processor of a model push
# ------------------------------------------------------------------------------------------------------------
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
        and has_processor(processor_files(Path(processor_dir)))
    ):
        return None, Path(processor_dir)
    directory = local_processor_dir(model)
    if directory is None:
        name = getattr(model, "name_or_path", None) or ""
        where = (
            f"the folder the model was loaded from ({name}) has no {' / '.join(PROCESSOR_MARKERS)}"
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
    saves_here = saves_on_this_rank(model, save_kwargs)
    repo_id = None
    if saves_here:  # the repo id is settled before anything is written
        repo_id = _check_repo_id(_full_repo_id(hub_kwargs.get("repo_id") or Path(save_directory).name, token))
    # the staged save below needs the state_dict's tensors as well
    local_kwargs = save_kwargs_for_one_save(save_kwargs)
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
