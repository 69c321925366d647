"""Checkpoints saved by an earlier version of the package (``tests/fixtures/checkpoints_v0_1``, see its README)
load with the current one: the Auto classes pick the variant classes, every trained value (weights, sigmaReparam
scales and power-iteration vectors, learned gammas) is restored as saved, and the model computes what the
saving code computed. The folder saved with its code also loads, with that code, where hf_normsoftmax cannot be
imported.

Two reference logits are stored per model. ``logits`` is the saving code's eval output of the saved state.
``logits_pending_step`` is the same state after the pending power-iteration step (the saving code's training
forward takes it): the fixtures are saved right after an optimizer step, as a Trainer saves, and the current
package's eval forward takes that step for the current weights without storing it, while the saving code's eval
forward used the stored vectors. The current package therefore gives ``logits_pending_step``; the saving code,
run from the folder as remote code, gives ``logits``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_remote_code import LOADER
from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

import hf_normsoftmax as H

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_v0_1"

CASES = {
    "bert_seq_cls": (AutoModelForSequenceClassification, H.NormSoftmaxBertForSequenceClassification),
    "gpt2_lm": (AutoModelForCausalLM, H.NormSoftmaxGPT2LMHeadModel),
    "vit_img_cls": (AutoModelForImageClassification, H.NormSoftmaxViTForImageClassification),
}
TRAINED_STATE_SUFFIXES = ("reparam_scale", "reparam_u", "reparam_v", "normsoftmax_scale")


def checkpoint_folder(name: str, tmp_path: Path) -> Path:
    """The fixture folder ``name`` as it was saved, in ``tmp_path``: a folder saved with its code keeps the code
    in ``NAME.code.zip`` (the old code is data here, never read as part of the project's source)."""
    folder = tmp_path / "fixture" / name
    shutil.copytree(FIXTURES / name, folder)
    code = FIXTURES / f"{name}.code.zip"
    if code.is_file():
        with zipfile.ZipFile(code) as archive:
            archive.extractall(folder)
    return folder


def _stored(name):
    """(model inputs, the saving code's eval logits, its logits after the pending power-iteration step)."""
    tensors = load_file(FIXTURES / f"{name}.io.safetensors")
    return tensors, tensors.pop("logits"), tensors.pop("logits_pending_step")


@pytest.mark.parametrize("name", sorted(CASES))
def test_old_checkpoint_loads_with_every_trained_value_and_its_outputs(name, tmp_path):
    auto_class, variant_class = CASES[name]
    folder = checkpoint_folder(name, tmp_path)
    model, info = auto_class.from_pretrained(folder, output_loading_info=True)
    assert type(model) is variant_class
    assert {key: value for key, value in info.items() if value} == {}, info
    model.eval()

    # saved again by the current package: the same entries with the same values (ViT's in-memory names differ
    # from its checkpoint names, so the comparison is between the two files)
    saved = load_file(folder / "model.safetensors")
    assert [key for key in saved if key.endswith(TRAINED_STATE_SUFFIXES)]  # sigmaReparam and gamma state
    model.save_pretrained(tmp_path / "resaved", save_remote_code=False)
    resaved = load_file(tmp_path / "resaved" / "model.safetensors")
    assert sorted(resaved) == sorted(saved)
    for key, value in saved.items():
        assert torch.equal(resaved[key], value), key

    inputs, _, logits_pending_step = _stored(name)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, logits_pending_step, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_old_checkpoint_loads_with_its_own_code_without_the_package(tmp_path):
    """The folder saved with its code (the default then) loads with ``trust_remote_code=True`` in a process where
    hf_normsoftmax cannot be imported, runs that code, and gives the saving code's eval logits."""
    name = "bert_seq_cls"
    inputs, logits, _ = _stored(name)
    torch.save(inputs, tmp_path / "inputs.pt")
    load = LOADER.split("reports = {}")[0] + (
        "path, inputs = sys.argv[1:3]\n"
        "try:\n"
        "    import hf_normsoftmax  # noqa: F401\n"
        "    raise SystemExit('hf_normsoftmax is importable')\n"
        "except ImportError:\n"
        "    pass\n"
        "model = transformers.AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)\n"
        "model.eval()\n"
        "with torch.no_grad():\n"
        "    out = model(**torch.load(inputs)).logits\n"
        "torch.save(out, inputs + '.out')\n"
        "print()  # the trust prompt leaves the line open\n"
        "print('CLASS ' + json.dumps(f'{type(model).__module__}.{type(model).__name__}'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", load, str(checkpoint_folder(name, tmp_path)), str(tmp_path / "inputs.pt")],
        cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    loaded_class = next(json.loads(line[len("CLASS "):]) for line in result.stdout.splitlines()
                        if line.startswith("CLASS "))
    assert loaded_class.startswith("transformers_modules.")
    assert loaded_class.endswith(".NormSoftmaxBertForSequenceClassification"), loaded_class
    torch.testing.assert_close(torch.load(tmp_path / "inputs.pt.out"), logits, atol=1e-5, rtol=0)
