"""Smoke tests of the experiment scripts in benchmarks/experiments/ (issue 6).

Each script's ``--quick`` mode (a few steps on a reduced grid, MNIST-5k so no Debian data package is needed) runs
in-process and must leave the documented outputs: one JSON per run, ``summary.json``, ``summary.md`` with a table,
and the PNG figures. A second invocation must train nothing (resume), and one training run must be reproducible.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "benchmarks" / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

pytestmark = pytest.mark.xdist_group("experiments")  # one worker: they share the in-process data cache

QUICK = ["--quick", "--dataset", "mnist5k", "--jobs", "1", "--no-progress"]

CASES = {
    # module: (expected runs in --quick, figures, summary keys)
    "exp1_heads": (4, ["exp1_heads.png"], ["rows", "average_gap", "accuracy_range_across_heads"]),
    "exp2_entropy_collapse": (4, ["exp2_entropy_adamw.png", "exp2_entropy_noln_sgd.png", "exp2_lr_sweep.png"],
                              ["rows", "figure_lr"]),
    "exp3_temperature": (2, ["exp3_temperature.png"], ["rows", "best", "lr_rule"]),
    "exp4_convergence": (4, ["exp4_convergence.png"], ["rows"]),
}


def _load(name):
    return importlib.import_module(name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_quick_mode_outputs_and_resume(name, tmp_path, capsys):
    module = _load(name)
    expected_runs, figures, keys = CASES[name]
    out = tmp_path / "out"
    figures_dir = tmp_path / "figures"
    assert module.main([*QUICK, "--output-dir", str(out), "--figures-dir", str(figures_dir)]) == 0

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
    assert summary["command"].startswith(f"python benchmarks/experiments/{name}.py")
    markdown = (out / "summary.md").read_text()
    assert "|---|" in markdown
    for figure in figures:
        for directory in (out, figures_dir):
            png = directory / figure
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resume: nothing is retrained, results are left as they were
    mtimes = {path: path.stat().st_mtime_ns for path in runs}
    capsys.readouterr()
    assert module.main([*QUICK, "--output-dir", str(out)]) == 0
    assert f"{expected_runs} already done (skipped), 0 to train" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in runs} == mtimes


def test_exp2_records_entropy_per_layer():
    import exp_runner

    module = _load("exp2_entropy_collapse")
    spec = {"name": "entropy", "dataset": "mnist5k", "steps": 4, "stability_every": 2, "layernorm": False,
            "optimizer": "sgd", "lr": 0.05, "sigma_reparam": True, "seed": 0}
    result = exp_runner.train_run(spec)
    layers = result["spec"]["num_layers"]
    assert [m["step"] for m in result["stability"]] == [0, 2, 4]
    first = result["stability"][0]
    assert len(first["entropy_mean"]) == layers and len(first["entropy_min"]) == layers
    # 17 tokens: entropy between 0 and ln 17; the min over heads is at most the mean
    assert all(0.0 <= low <= mean <= 2.84 for low, mean in zip(first["entropy_min"], first["entropy_mean"]))
    metrics = module.run_metrics(result)
    assert isinstance(metrics["collapsed"], bool) and len(metrics["final_entropy"]) == layers


def test_exp3_uses_the_package_lr_rule():
    module = _load("exp3_temperature")
    args = module.build_parser().parse_args(["--betas", "0.1,1,10", "--seeds", "0", "--optimizers", "sgd,adamw"])
    lrs = {(s["optimizer"], s["logit_inverse_temperature"]): s["lr"] for s in module.make_specs(args)}
    assert lrs[("sgd", 1.0)] == pytest.approx(0.1) and lrs[("sgd", 0.1)] == pytest.approx(10.0)
    assert lrs[("adamw", 10.0)] == pytest.approx(1e-4) and lrs[("adamw", 0.1)] == pytest.approx(1e-2)


def test_training_run_is_reproducible():
    import exp_runner

    spec = {"name": "repro", "dataset": "mnist5k", "steps": 3, "num_heads": 2, "attention_softmax": "normsoftmax",
            "sigma_reparam": True, "seed": 7}
    first, second = exp_runner.train_run(spec), exp_runner.train_run(spec)
    assert first["train_loss"] == second["train_loss"]
    assert first["final"] == second["final"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_help(name, capsys):
    module = _load(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--seeds", "--output-dir"):
        assert option in text


def test_bad_arguments_are_refused(capsys):
    module = _load("exp1_heads")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--heads", "3", "--dataset", "mnist5k"])
    assert exit_info.value.code == 2
    assert "do not divide the width" in capsys.readouterr().err
