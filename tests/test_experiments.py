"""Smoke tests of the experiment scripts in benchmarks/experiments/.

Each script's ``--quick`` mode (a few steps on a reduced grid, MNIST-5k so no Debian data package is needed) runs
in-process and must leave the documented outputs: one JSON per run, ``summary.json``, ``summary.md`` with a table,
and the PNG figures. A second invocation must train nothing (resume), one training run must be reproducible, and
experiment 2 must record the attention entropy of every layer.
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

    if name == "exp1_heads":
        _check_reproducible(runs[0])
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


def test_bad_arguments_are_refused(capsys):
    message = usage_error(_load("exp1_heads").main, ["--heads", "3", "--dataset", "mnist5k"], capsys)
    assert "do not divide the width" in message
