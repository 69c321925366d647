"""Variant saves that other threads cannot disturb, and that an interrupted save cannot leave half-written.

* Saves of one class in several threads at once (plain, another Auto class, without code, and the Hub staging of
  ``hf_normsoftmax.hub.stage_model``) each write exactly their own ``auto_map`` and code files, and leave the
  classes and the config instance as they were: a save reads and changes no state another thread sees.
* A save that fails half-way (the disk fills while a weight file is written, a rename fails) leaves the previous
  checkpoint in the folder, loadable with its own flags and weights, next to the folder's other files.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from test_models_common import TINY_BERT

import hf_normsoftmax as H

CONFIG_REF = "configuration_normsoftmax.NormSoftmaxBertConfig"
HEAD_REF = "modeling_normsoftmax_bert.NormSoftmaxBertForSequenceClassification"
BASE_REF = "modeling_normsoftmax_bert.NormSoftmaxBertModel"
EXPECTED_AUTO_MAP = {
    "plain": {"AutoConfig": CONFIG_REF, "AutoModelForSequenceClassification": HEAD_REF, "AutoModel": BASE_REF},
    "auto_model": {"AutoConfig": CONFIG_REF, "AutoModel": HEAD_REF},
    "no_code": None,
    "stage": {"AutoConfig": CONFIG_REF, "AutoModelForSequenceClassification": HEAD_REF, "AutoModel": BASE_REF},
}


def _classifier(**flags):
    return H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(**TINY_BERT, num_labels=2, **flags))


def _save(kind: str, model, path: Path) -> None:
    if kind == "plain":
        model.save_pretrained(path)
    elif kind == "auto_model":
        model.save_pretrained(path, auto_class="AutoModel")
    elif kind == "no_code":
        model.save_pretrained(path, save_remote_code=False)
    else:
        from hf_normsoftmax.hub.push import stage_model

        stage_model(model, path, processor=None, repo_id="alice/x", card="---\nlibrary_name: transformers\n---\n")


def _auto_map_and_code(path: Path):
    return json.loads((path / "config.json").read_text()).get("auto_map"), sorted(p.name for p in path.glob("*.py"))


def test_concurrent_saves_of_mixed_kinds_write_their_own_auto_map(tmp_path):
    """6 threads x 12 saves of two models of one class, the four kinds interleaved: every folder has exactly the
    auto_map and code files of its own kind, and the classes / config instances carry no Auto state afterwards."""
    models = [_classifier(), _classifier(attention_softmax="normsoftmax")]
    kinds = sorted(EXPECTED_AUTO_MAP)
    start = threading.Barrier(6)
    done, errors = [], []

    def worker(index: int):
        start.wait()
        try:
            for step in range(12):
                kind = kinds[(index + step) % len(kinds)]
                path = tmp_path / f"t{index}-s{step}-{kind}"
                _save(kind, models[(index + step) % 2], path)
                done.append((kind, path))
        except Exception as exc:  # noqa: BLE001 - reported below with the thread that raised it
            errors.append((index, repr(exc)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(done) == 72
    wrong = []
    for kind, path in done:
        auto_map, code = _auto_map_and_code(path)
        has_code = "modeling_normsoftmax_bert.py" in code and "configuration_normsoftmax.py" in code
        if auto_map != EXPECTED_AUTO_MAP[kind] or has_code != (kind != "no_code") or (kind == "no_code" and code):
            wrong.append((path.name, auto_map, code))
    assert not wrong, f"{len(wrong)} of {len(done)} folders are wrong: {wrong[:3]}"
    for cls in (H.NormSoftmaxBertForSequenceClassification, H.NormSoftmaxBertConfig, H.NormSoftmaxBertModel):
        assert cls.__dict__.get("_auto_class") is None, cls
    for model in models:
        assert getattr(model.config, "auto_map", None) is None
    # and a later save in the process is right again
    models[0].save_pretrained(tmp_path / "after")
    assert _auto_map_and_code(tmp_path / "after")[0] == EXPECTED_AUTO_MAP["plain"]


# ------------------------------------------------------------------------------------------------------------
# all-or-nothing saves
# ------------------------------------------------------------------------------------------------------------
class _Injected(OSError):
    pass


def _fail_on_call(monkeypatch, owner, name: str, call: int) -> list:
    """Make ``owner.name`` raise on its ``call``-th call (counting from 1); returns the list of calls seen."""
    original = getattr(owner, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise _Injected(28, f"No space left on device (injected on call {call} of {name})")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def _logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.mark.parametrize("old_shards, new_shards", [(False, True), (True, False)])
def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, old_shards, new_shards):
    """Old checkpoint (softmax, one weight file or shards) and a new model with other flags and weights (shards or
    one file): a failure at each step of the new save (the weight write, or any rename) leaves the old checkpoint,
    loadable with its own flags and outputs, and the folder's other files; the save that then succeeds gives the
    new model, without the old weight files."""
    from transformers import AutoModelForSequenceClassification, modeling_utils

    inputs = {"input_ids": torch.randint(3, 97, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    torch.manual_seed(1)
    old = _classifier()
    torch.manual_seed(2)
    new = _classifier(attention_softmax="normsoftmax", logit_inverse_temperature=2.0)
    shard = {"max_shard_size": "20KB"}
    target = tmp_path / "out"
    old.save_pretrained(target, **(shard if old_shards else {}))
    (target / "notes.txt").write_text("mine")
    (target / "checkpoint-5").mkdir()
    (target / "checkpoint-5" / "optimizer.pt").write_bytes(b"x")
    old_files = sorted(p.name for p in target.iterdir())
    reference_old, reference_new = _logits(old, inputs), _logits(new, inputs)
    assert not torch.equal(reference_old, reference_new)

    def check_old_intact():
        assert sorted(p.name for p in target.iterdir()) == old_files
        loaded = AutoModelForSequenceClassification.from_pretrained(target)
        assert loaded.config.attention_softmax == "softmax" and loaded.config.logit_inverse_temperature == 1.0
        assert torch.equal(_logits(loaded, inputs), reference_old)
        assert (target / "notes.txt").read_text() == "mine"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind

    # the disk fills while the second weight file (or the only one) is written
    with monkeypatch.context() as patch:
        _fail_on_call(patch, modeling_utils, "safe_save_file", 2 if new_shards else 1)
        with pytest.raises(_Injected):
            new.save_pretrained(target, **(shard if new_shards else {}))
    check_old_intact()

    # any rename of the move into place fails: count them on a successful save elsewhere first
    with monkeypatch.context() as patch:
        renames = _fail_on_call(patch, os, "replace", 0)
        new.save_pretrained(tmp_path / "count", **(shard if new_shards else {}))
    number = len(renames)
    import shutil

    shutil.rmtree(tmp_path / "count")
    assert number >= 3
    for call in range(1, number + 1):
        with monkeypatch.context() as patch:
            _fail_on_call(patch, os, "replace", call)
            with pytest.raises(_Injected):
                new.save_pretrained(target, **(shard if new_shards else {}))
        check_old_intact()

    new.save_pretrained(target, **(shard if new_shards else {}))
    loaded = AutoModelForSequenceClassification.from_pretrained(target)
    assert loaded.config.attention_softmax == "normsoftmax" and loaded.config.logit_inverse_temperature == 2.0
    assert torch.equal(_logits(loaded, inputs), reference_new)
    names = {p.name for p in target.iterdir()}
    assert {"notes.txt", "checkpoint-5"} <= names
    if new_shards:
        assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    else:
        assert "model.safetensors" in names and not any("-of-" in n or n.endswith("index.json") for n in names)


def test_run_dir_writers_are_all_or_nothing(tmp_path, monkeypatch):
    """The run-dir writers (rank dumps, JSON files, the model card) write beside the file and rename: a write
    that fails half-way leaves the previous file, and no temporary file; new files get the usual permissions."""
    import safetensors.torch
    from safetensors.torch import load_file

    import hf_normsoftmax.training.run_files as run_files
    from hf_normsoftmax.training.run_files import write_text_atomically

    run_files.dump_rank_state(tmp_path, {"w": torch.ones(3)}, 0, {"step": 1})
    run_files.write_json(tmp_path / "all_results.json", {"eval_loss": 1.0})
    write_text_atomically(tmp_path / "README.md", "old card")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full_after_a_part(what):
        def write(*args, **kwargs):
            handle_or_name = args[1]
            if isinstance(handle_or_name, str):
                with open(handle_or_name, "wb") as handle:
                    handle.write(b"part")
            else:
                handle_or_name.write("{part")
            raise _Injected(28, f"No space left on device ({what})")

        return write

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", disk_full_after_a_part("weights"))
        with pytest.raises(_Injected):
            run_files.dump_rank_state(tmp_path, {"w": torch.zeros(3)}, 0, {"step": 2})
        patch.setattr(run_files.json, "dump", disk_full_after_a_part("json"))
        with pytest.raises(_Injected):
            run_files.write_json(tmp_path / "all_results.json", {"eval_loss": 0.5})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert torch.equal(load_file(tmp_path / "rank0.safetensors")["w"], torch.ones(3))
    umask = os.umask(0o022)
    os.umask(umask)
    for path in tmp_path.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_saves_into_one_folder_in_threads_leave_one_whole_checkpoint(tmp_path, monkeypatch):
    """Threads saving different models (other flags, sharded or not) into the same folder at once: the folder
    ends with one whole checkpoint, its config with its own weights (renames slowed down so that the moves of
    the saves would interleave if they were not taken in turns)."""
    import time

    from transformers import AutoModelForSequenceClassification

    inputs = {"input_ids": torch.randint(3, 97, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    models = []
    for beta in (1.0, 2.0, 3.0, 4.0):
        torch.manual_seed(int(beta))
        models.append(_classifier(logit_inverse_temperature=beta))
    references = {m.config.logit_inverse_temperature: _logits(m, inputs) for m in models}
    target = tmp_path / "out"
    replace = os.replace

    def slow_replace(*args, **kwargs):
        time.sleep(0.002)
        return replace(*args, **kwargs)

    monkeypatch.setattr(os, "replace", slow_replace)
    start = threading.Barrier(len(models))
    errors = []

    def worker(index: int):
        start.wait()
        try:
            for _ in range(3):
                models[index].save_pretrained(target, **({"max_shard_size": "20KB"} if index % 2 else {}))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    monkeypatch.setattr(os, "replace", replace)
    assert not errors, errors
    loaded = AutoModelForSequenceClassification.from_pretrained(target)
    beta = loaded.config.logit_inverse_temperature
    assert torch.equal(_logits(loaded, inputs), references[beta]), beta
    names = {p.name for p in target.iterdir()}
    sharded = int(beta) % 2 == 0  # models[1] and models[3] were saved sharded
    assert ("model.safetensors.index.json" in names) == sharded and ("model.safetensors" in names) != sharded
