"""Checkpoints that carry their code: a variant's ``save_pretrained`` writes the code files and ``auto_map`` by
default (``save_remote_code=False`` opts out), as do ``save_pretrained_with_code`` and the documented
``register_for_auto_class`` route. Such a folder loads with the package's own classes where hf_normsoftmax is
imported, and with ``trust_remote_code=True`` in a process where it cannot be imported, with the same outputs.

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
from hf_normsoftmax.hub.save import auto_class_of

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
        report["attention_runs"] = sorted({  # what the attention modules run, seen through their config view
            m.config._attn_implementation for m in model.modules()
            if type(getattr(m, "config", None)).__name__ == "VariantAttentionConfig"
        })
        with torch.no_grad():
            out = model(**torch.load(job["inputs"]))
        torch.save({k: v for k, v in out.items() if isinstance(v, torch.Tensor)}, job["inputs"] + ".out")
        # re-saving the remote-code model (its own save_pretrained, without the package) keeps the code
        resaved = job["path"] + "-resaved"
        model.save_pretrained(resaved)
        report["resaved_auto_map"] = json.load(open(resaved + "/config.json")).get("auto_map")
        report["resaved_files"] = sorted(__import__("os").listdir(resaved))
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
@pytest.mark.parametrize("route", ["save_pretrained", "register_for_auto_class", "save_pretrained_with_code"])
def test_remote_code_checkpoints_load_without_the_package(route, tmp_path):
    jobs, references = [], {}
    for name, (model_class, config_class, tiny, auto_name) in sorted(CASES.items()):
        torch.manual_seed(0)
        model = model_class(config_class(**tiny, **ALL_ON)).eval()
        path = tmp_path / name
        if route == "save_pretrained":  # the default
            model.save_pretrained(path)
        elif route == "register_for_auto_class":
            save_with_code_by_registration(model, auto_name, path)
        else:
            H.save_pretrained_with_code(model, path)
        saved = json.loads((path / "config.json").read_text())
        assert set(saved["auto_map"]) == {"AutoConfig", "AutoModel", auto_name}, saved["auto_map"]
        assert saved["auto_map"]["AutoConfig"] == f"configuration_normsoftmax.{config_class.__name__}"
        assert saved["auto_map"][auto_name].endswith(f".{model_class.__name__}")
        for needed in ("hf_pretrained.py", "hf_attention.py", "hf_heads.py", "hf_state.py",
                       "configuration_normsoftmax.py", "attention.py", "normsoftmax.py", "fused_cross_entropy.py",
                       "sigma_reparam.py", f"modeling_normsoftmax_{name}.py"):
            assert (path / needed).is_file(), needed
        inputs = _inputs(name)
        torch.save(inputs, tmp_path / f"{name}.pt")
        with torch.no_grad():
            references[name] = model(**inputs).logits
        jobs.append({"name": name, "path": str(path), "auto_class": auto_name, "inputs": str(tmp_path / f"{name}.pt")})
        # nothing leaks into later saves of the same classes / config: the opt-out gives a plain folder
        plain = tmp_path / f"{name}-plain"
        model.save_pretrained(plain, save_remote_code=False)
        assert "auto_map" not in json.loads((plain / "config.json").read_text())
        assert not list(plain.glob("*.py"))
        assert "_auto_class" not in type(model).__dict__ or type(model)._auto_class is None
        assert getattr(model.config, "auto_map", None) is None

    reports = run_hidden(jobs, tmp_path)
    for name, (model_class, _, _, _) in CASES.items():
        report = reports[name]
        assert report["package_importable"] is False
        assert report["class"].startswith("transformers_modules.") and report["class"].endswith(model_class.__name__)
        assert report["attn_implementation"] == "sdpa"  # the user's name, as on a stock model
        assert report["attention_runs"] == ["normsoftmax"]
        assert "trust_remote_code=True" in report["without_trust"], report["without_trust"]
        resaved_map = report["resaved_auto_map"]
        assert set(resaved_map) == {"AutoConfig", "AutoModel", CASES[name][3]}, resaved_map
        assert f"modeling_normsoftmax_{name}.py" in report["resaved_files"], report["resaved_files"]
        outputs = torch.load(tmp_path / f"{name}.pt.out")
        assert torch.allclose(outputs["logits"], references[name], atol=1e-6), name


NO_TRUST = textwrap.dedent(
    """
    for path in json.loads(sys.argv[1]):
        try:
            transformers.AutoModelForSequenceClassification.from_pretrained(path)
        except Exception as err:
            print()  # the trust prompt leaves the line open
            print("ERROR " + json.dumps(f"{type(err).__name__}: {err}"))
        else:
            print()
            print("ERROR " + json.dumps("loaded"))
    """
)


@pytest.mark.slow
def test_without_package_and_without_trust_the_error_names_the_fix(tmp_path):
    """What a user without the package sees when loading a variant folder without trust_remote_code.

    Default save (code + auto_map): transformers' own custom-code error, naming ``trust_remote_code=True`` (in a
    terminal transformers first asks "Do you wish to run the custom code? [y/N]" for 15 s; with stdin closed, as
    here, the answer is the same error). Its text is fixed and no code of ours runs before it, so it cannot name
    ``pip install hf-normsoftmax``; the model card does. With ``save_remote_code=False`` transformers cannot know
    the model type and says so, naming it.
    """
    model = H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(**TINY_BERT, num_labels=2))
    with_code, without_code = tmp_path / "with-code", tmp_path / "without-code"
    model.save_pretrained(with_code)
    model.save_pretrained(without_code, save_remote_code=False)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = LOADER.split("reports = {}")[0] + NO_TRUST
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run([sys.executable, "-c", code, json.dumps([str(with_code), str(without_code)])], cwd=work,
                            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    errors = [json.loads(line[len("ERROR "):]) for line in result.stdout.splitlines() if line.startswith("ERROR ")]
    assert len(errors) == 2, result.stdout
    default, opted_out = errors
    assert default.startswith("ValueError: "), default
    assert f"The repository {with_code} contains custom code which must be executed" in default, default
    assert "Please pass the argument `trust_remote_code=True`" in default, default
    assert "does not recognize this architecture" not in default and "upgrade" not in default, default
    assert opted_out.startswith("ValueError: "), opted_out
    assert "`normsoftmax_bert`" in opted_out and "does not recognize this architecture" in opted_out, opted_out


# ------------------------------------------------------------------------------------------------------------
# the default save (in process)
# ------------------------------------------------------------------------------------------------------------
def test_auto_class_of_every_variant_class_matches_its_registration():
    """The Auto class a save writes into auto_map is the one the package registers the class with."""
    for auto_classes in H._AUTO_REGISTRY.values():
        for auto_class, model_class in auto_classes.items():
            assert auto_class_of(model_class) == auto_class.__name__, model_class.__name__


def _saved(path):
    return json.loads((path / "config.json").read_text()).get("auto_map"), sorted(p.name for p in path.glob("*.py"))


def test_default_save_writes_code_and_loads_with_the_package_classes(tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(**TINY_BERT, num_labels=3)).eval()
    model.save_pretrained(tmp_path / "a")
    auto_map, py = _saved(tmp_path / "a")
    assert auto_map == {
        "AutoConfig": "configuration_normsoftmax.NormSoftmaxBertConfig",
        "AutoModelForSequenceClassification": "modeling_normsoftmax_bert.NormSoftmaxBertForSequenceClassification",
        "AutoModel": "modeling_normsoftmax_bert.NormSoftmaxBertModel",  # the encoder of the same file
    }
    assert {"configuration_normsoftmax.py", "modeling_normsoftmax_bert.py", "hf_pretrained.py"} <= set(py)
    # nothing sticks to the classes or the config instance
    for cls in (type(model), type(model.config)):
        assert cls.__dict__.get("_auto_class") is None, cls
    assert getattr(model.config, "auto_map", None) is None

    # the package is imported here: its own classes load the folder, without any trust prompt (pytest's captured
    # stdin would turn a prompt into an error) and also when trust_remote_code=True is passed
    inputs = _inputs("bert")
    with torch.no_grad():
        reference = model(**inputs).logits
    for kwargs in ({}, {"trust_remote_code": True}):
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a", **kwargs).eval()
        assert type(loaded) is H.NormSoftmaxBertForSequenceClassification
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).logits, reference)

    # a loaded config carries auto_map; re-saving under another head replaces our entries, adds no stale ones
    base = AutoModel.from_pretrained(tmp_path / "a")
    assert type(base) is H.NormSoftmaxBertModel and base.config.auto_map  # read from config.json
    base.save_pretrained(tmp_path / "b")
    assert _saved(tmp_path / "b")[0] == {"AutoConfig": "configuration_normsoftmax.NormSoftmaxBertConfig",
                                         "AutoModel": "modeling_normsoftmax_bert.NormSoftmaxBertModel"}
    # opting out drops the loaded auto_map too (it would name code files the folder does not have)
    base.save_pretrained(tmp_path / "c", save_remote_code=False)
    assert _saved(tmp_path / "c") == (None, [])
    assert "AutoModelForSequenceClassification" in base.config.auto_map  # the instance keeps what it loaded


def test_save_remote_code_opt_outs(tmp_path):
    model = H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**TINY_GPT2))
    model.save_pretrained(tmp_path / "kwarg", save_remote_code=False)
    assert _saved(tmp_path / "kwarg") == (None, [])
    model.save_remote_code = False  # for saves you do not call yourself (Trainer checkpoints)
    model.save_pretrained(tmp_path / "attribute")
    assert _saved(tmp_path / "attribute") == (None, [])
    model.save_pretrained(tmp_path / "forced", save_remote_code=True)  # the keyword wins
    assert set(_saved(tmp_path / "forced")[0]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    H.save_pretrained_with_code(model, tmp_path / "with_code")  # always saves the code
    assert set(_saved(tmp_path / "with_code")[0]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    with pytest.raises(TypeError, match="save_remote_code"):
        model.save_pretrained(tmp_path / "bad", save_remote_code="yes")
    # a class registered by the user keeps its Auto class
    try:
        type(model).register_for_auto_class("AutoModel")
        model.save_pretrained(tmp_path / "registered", save_remote_code=True)
        assert set(_saved(tmp_path / "registered")[0]) == {"AutoConfig", "AutoModel"}
        assert type(model)._auto_class == "AutoModel"  # and stays registered
    finally:
        del type(model)._auto_class


def test_saves_in_two_threads_do_not_see_each_others_class_settings(tmp_path, monkeypatch):
    """Thread A's save (with code) is held inside transformers' save while thread B saves the same model without
    code: both folders come out right, and A's save never sees an Auto registration on the class (a save sets no
    class state that another thread could see or change: auto_map and the code files are written from the
    call's own arguments)."""
    import threading

    from transformers import PreTrainedModel

    model = H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**TINY_GPT2))
    stock_save = PreTrainedModel.save_pretrained
    b_started, a_looked = threading.Event(), threading.Event()
    seen_by_a = []

    def held_save(self, save_directory, **kwargs):
        if threading.current_thread().name == "A":
            b_thread.start()
            assert b_started.wait(5)
            b_thread.join(0.5)  # B's save gets time to run as far as it can
            seen_by_a.append(type(self)._auto_class)
            a_looked.set()
        else:
            a_looked.wait(5)
        return stock_save(self, save_directory, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", held_save)

    def save_b():
        b_started.set()
        model.save_pretrained(tmp_path / "b", save_remote_code=False)

    b_thread = threading.Thread(target=save_b, name="B")
    a_thread = threading.Thread(target=lambda: model.save_pretrained(tmp_path / "a", save_remote_code=True), name="A")
    a_thread.start()
    a_thread.join(30)
    b_thread.join(30)
    assert seen_by_a == [None]
    assert set(_saved(tmp_path / "a")[0]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert _saved(tmp_path / "b") == (None, [])
    assert type(model).__dict__.get("_auto_class") is None


def test_remote_code_files_import_nothing_transformers_would_refuse():
    """The files a save copies import only same-folder modules and installed libraries: transformers'
    check_imports (run before executing remote code) must find nothing missing, and in particular not the package
    (the lazy import of hf_normsoftmax.hub in push_to_hub goes through importlib with a string)."""
    import ast
    from pathlib import Path

    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    root = Path(H.__file__).parent
    for name in ("vit", "bert", "gpt2"):
        modeling = root / f"modeling_normsoftmax_{name}.py"
        for path in [modeling, *map(Path, get_relative_import_files(modeling))]:
            assert path.parent == root, path
            assert "hf_normsoftmax" not in get_imports(path), path
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0:
                    assert not (node.module or "").startswith("hf_normsoftmax"), (path, node.module)
                if isinstance(node, ast.Import):
                    assert not any(a.name.startswith("hf_normsoftmax") for a in node.names), path


def code_lines(source: str) -> int:
    """The lines of ``source`` that hold code: blank lines, comment-only lines and docstring lines (string
    expression statements) do not count."""
    import ast
    import io
    import tokenize

    layout = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in layout:
            lines.update(range(token.start[0], token.end[0] + 1))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            lines.difference_update(range(node.lineno, node.end_lineno + 1))
    return len(lines)


def test_code_lines_counts_only_code():
    source = textwrap.dedent('''\
    """Module docstring,
    two lines."""

    # a comment
    import os  # a trailing comment


    def f(x):
        """Docstring."""
        text = """a string
    that is code"""
        return x, text
    ''')
    assert code_lines(source) == 5  # import, def, the two lines of the assigned string, return


CHECKPOINT_CODE_LINES = 3_000
# Names of the Hub client's upload API: a checkpoint's code must not reach them (pushing is a package feature).
UPLOAD_NAMES = {"HfApi", "create_commit", "create_repo", "upload_file", "upload_folder", "CommitOperationAdd"}


def _saved_code(name, tmp_path) -> dict[str, str]:
    model_class, config_class, tiny, _ = CASES[name]
    model_class(config_class(**tiny)).save_pretrained(tmp_path / name)
    return {path.name: path.read_text() for path in sorted((tmp_path / name).glob("*.py"))}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_checkpoint_carries_no_upload_code(name, tmp_path):
    import ast

    for file_name, source in _saved_code(name, tmp_path).items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(m.split(".")[0] == "huggingface_hub" for m in modules), (file_name, modules)
            if isinstance(node, ast.Name | ast.Attribute | ast.alias):
                assert (getattr(node, "id", None) or getattr(node, "attr", None) or node.name) not in UPLOAD_NAMES
            if isinstance(node, ast.Call):  # no import by a string, which transformers' import check cannot see
                called = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                assert called not in ("import_module", "__import__"), file_name


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_checkpoint_carries_at_most_3000_lines_of_code(name, tmp_path):
    """The code a saved variant carries (its modeling and configuration files and every same-folder module they
    import): at most 3,000 lines of code, blank, comment and docstring lines not counted. What only the package
    uses (conversion of any model, cards, export, saving with the code, state resets) lives in modules the
    checkpoint does not import (``*_tools.py``, ``state_reset.py``, ``pretrained_features.py``, ``hub/``)."""
    saved = _saved_code(name, tmp_path)
    per_file = {file_name: code_lines(source) for file_name, source in saved.items()}
    raw = sum(len(source.splitlines()) for source in saved.values())
    assert sum(per_file.values()) <= CHECKPOINT_CODE_LINES, (
        f"a saved {name} checkpoint carries {sum(per_file.values())} lines of code ({raw} raw lines) in "
        f"{len(saved)} files, over {CHECKPOINT_CODE_LINES}: {per_file}"
    )


AUTO_MODEL_LOADER = textwrap.dedent(
    """
    import transformers
    path, inputs = json.loads(sys.argv[1])
    model = transformers.AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        hidden = model(**torch.load(inputs)).last_hidden_state
    torch.save(hidden, inputs + ".hidden")
    print()  # the trust prompt leaves the line open
    print("CLASS " + type(model).__module__ + "." + type(model).__name__)
    """
)


@pytest.mark.slow
def test_a_saved_head_loads_its_encoder_with_auto_model_without_the_package(tmp_path):
    """auto_map also maps AutoModel (to the base model class of the same modeling file): the encoder of a saved
    classifier loads with AutoModel.from_pretrained(path, trust_remote_code=True) where hf_normsoftmax is not
    importable, and computes what the classifier's own encoder computes."""
    torch.manual_seed(0)
    flags = dict(attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True)
    model = H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(**TINY_BERT, num_labels=3, **flags))
    model.eval().save_pretrained(tmp_path / "classifier")
    inputs = _inputs("bert")
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        reference = model.bert(**inputs).last_hidden_state
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    work = tmp_path / "cwd"
    work.mkdir()
    code = LOADER.split("reports = {}")[0] + AUTO_MODEL_LOADER
    args = json.dumps([str(tmp_path / "classifier"), str(tmp_path / "inputs.pt")])
    result = subprocess.run([sys.executable, "-c", code, args], cwd=work, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    loaded_class = next(line for line in result.stdout.splitlines() if line.startswith("CLASS "))
    assert loaded_class.startswith("CLASS transformers_modules.") and loaded_class.endswith(".NormSoftmaxBertModel")
    assert torch.allclose(torch.load(tmp_path / "inputs.pt.hidden"), reference, atol=1e-6)
