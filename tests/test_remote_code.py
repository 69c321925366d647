"""Checkpoints that carry their code: saved after ``register_for_auto_class``, they load with
``trust_remote_code=True`` in a process where hf_normsoftmax cannot be imported, and compute the same outputs.

The loading side runs in a subprocess: clean working directory, no PYTHONPATH, a meta-path hook that refuses any
``hf_normsoftmax`` import (the package may be installed), stdin from /dev/null (transformers prompts on stdin
when ``trust_remote_code`` is not given), its own HF_MODULES_CACHE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_models_common import TINY_BERT, TINY_GPT2, TINY_VIT

import hf_normsoftmax as H

ALL_ON = dict(attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True, normsoftmax_max_temperature=2.0,
              loss_softmax="normsoftmax", sigma_reparam=True)

LOADER = textwrap.dedent(
    """
    import json, sys
    import importlib.abc

    class RefuseHfNormsoftmax(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_normsoftmax" or name.startswith("hf_normsoftmax."):
                raise ImportError("hf_normsoftmax is hidden in this process")

    sys.meta_path.insert(0, RefuseHfNormsoftmax())
    import torch
    import transformers

    reports = {}
    for job in json.loads(sys.argv[1]):
        report = reports[job["name"]] = {}
        try:
            import hf_normsoftmax  # noqa: F401
            report["package_importable"] = True
        except ImportError:
            report["package_importable"] = False
        auto_class = getattr(transformers, job["auto_class"])
        try:
            auto_class.from_pretrained(job["path"])
            report["without_trust"] = "loaded"
        except Exception as err:  # what a user sees without the package and without trust_remote_code
            report["without_trust"] = f"{type(err).__name__}: {err}"
        model = auto_class.from_pretrained(job["path"], trust_remote_code=True).eval()
        report["class"] = f"{type(model).__module__}.{type(model).__name__}"
        report["attn_implementation"] = model.config._attn_implementation
        with torch.no_grad():
            out = model(**torch.load(job["inputs"]))
        torch.save({k: v for k, v in out.items() if isinstance(v, torch.Tensor)}, job["inputs"] + ".out")
    print()  # the trust prompt leaves the line open
    print("REPORT:" + json.dumps(reports))
    """
)


def run_hidden(jobs: list[dict], tmp_path) -> dict:
    """Load every job's checkpoint in one subprocess without hf_normsoftmax; returns reports, writes outputs."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(jobs)],
        cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report_line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT:"))
    return json.loads(report_line[len("REPORT:"):])


def save_with_code_by_registration(model, auto_name, path):
    """The documented transformers route: register_for_auto_class + save_pretrained. The registration is
    class-wide and sticks to the config instance (``auto_map``): undo both so later saves in this process are
    clean."""
    config_class, model_class = type(model.config), type(model)
    try:
        model.config.register_for_auto_class()
        model.register_for_auto_class(auto_name)
        model.save_pretrained(path)
    finally:
        config_class._auto_class = None
        model_class._auto_class = None
        model.config.__dict__.pop("auto_map", None)


CASES = {
    "bert": (H.NormSoftmaxBertForSequenceClassification, H.NormSoftmaxBertConfig,
             dict(TINY_BERT, num_labels=3), "AutoModelForSequenceClassification"),
    "gpt2": (H.NormSoftmaxGPT2LMHeadModel, H.NormSoftmaxGPT2Config, TINY_GPT2, "AutoModelForCausalLM"),
    "vit": (H.NormSoftmaxViTForImageClassification, H.NormSoftmaxViTConfig, dict(TINY_VIT, num_labels=3),
            "AutoModelForImageClassification"),
}


def _inputs(name):
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16)}
    ids = torch.randint(3, 97, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.slow
@pytest.mark.parametrize("route", ["register_for_auto_class", "save_pretrained_with_code"])
def test_remote_code_checkpoints_load_without_the_package(route, tmp_path):
    jobs, references = [], {}
    for name, (model_class, config_class, tiny, auto_name) in sorted(CASES.items()):
        torch.manual_seed(0)
        model = model_class(config_class(**tiny, **ALL_ON)).eval()
        path = tmp_path / name
        if route == "register_for_auto_class":
            save_with_code_by_registration(model, auto_name, path)
        else:
            H.save_pretrained_with_code(model, path)
        saved = json.loads((path / "config.json").read_text())
        assert saved["auto_map"]["AutoConfig"] == f"configuration_normsoftmax.{config_class.__name__}"
        assert saved["auto_map"][auto_name].endswith(f".{model_class.__name__}")
        for needed in ("integration.py", "configuration_normsoftmax.py", "attention.py", "normsoftmax.py",
                       "losses.py", "sigma_reparam.py", f"modeling_normsoftmax_{name}.py"):
            assert (path / needed).is_file(), needed
        inputs = _inputs(name)
        torch.save(inputs, tmp_path / f"{name}.pt")
        with torch.no_grad():
            references[name] = model(**inputs).logits
        jobs.append({"name": name, "path": str(path), "auto_class": auto_name, "inputs": str(tmp_path / f"{name}.pt")})
        # nothing leaks into later saves of the same classes / config
        plain = tmp_path / f"{name}-plain"
        model.save_pretrained(plain)
        assert "auto_map" not in json.loads((plain / "config.json").read_text())
        assert not (plain / "integration.py").exists()

    reports = run_hidden(jobs, tmp_path)
    for name, (model_class, _, _, _) in CASES.items():
        report = reports[name]
        assert report["package_importable"] is False
        assert report["class"].startswith("transformers_modules.") and report["class"].endswith(model_class.__name__)
        assert report["attn_implementation"] == "normsoftmax"
        assert "trust_remote_code=True" in report["without_trust"], report["without_trust"]
        outputs = torch.load(tmp_path / f"{name}.pt.out")
        assert torch.allclose(outputs["logits"], references[name], atol=1e-6), name


@pytest.mark.slow
def test_checkpoint_without_code_and_without_package_fails_clearly(tmp_path):
    """Without code in the checkpoint transformers cannot know the model type; its error names it."""
    model = H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(**TINY_BERT, num_labels=2))
    path = tmp_path / "checkpoint"
    model.save_pretrained(path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = LOADER.split("reports = {}")[0] + textwrap.dedent(
        f"""
        try:
            transformers.AutoModelForSequenceClassification.from_pretrained({str(path)!r})
        except Exception as err:
            print(type(err).__name__, err)
        """
    )
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ValueError" in result.stdout and "normsoftmax_bert" in result.stdout
