"""Smoke tests of the text experiments in benchmarks/experiments/ (exp5: fine-tuning all-MiniLM-L6-v2 on Rotten
Tomatoes; exp6: a character-level GPT-2 on Shakespeare) and of their runner, text_runner.py.

Each script's ``--quick`` mode runs in-process on the real offline data and must leave one JSON per run,
``summary.json``, ``summary.md`` (a table and the total CPU time) and the PNG figures; a second invocation trains
nothing, a damaged result file is retrained; a run is reproducible; sigmaReparam's conversion of the real
checkpoint is exact while NormSoftmax's is not; bad arguments are refused by name.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
from script_exits import help_text, usage_error

EXPERIMENTS = Path(__file__).resolve().parents[1] / "benchmarks" / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

pytestmark = pytest.mark.xdist_group("experiments")  # one worker: they share the in-process data caches

QUICK = ["--quick", "--jobs", "1", "--no-progress"]

CASES = {
    # module: (runs in --quick, figures, summary keys)
    "exp5_pretrained_finetune": (3, ["exp5_lr_sweep.png", "exp5_curves.png"], ["conversion", "rows", "per_run"]),
    "exp6_causal_lm": (4, ["exp6_val_loss_vs_lr.png", "exp6_entropy_per_layer.png", "exp6_loss_curves.png"],
                       ["rows", "per_run", "figure_lr"]),
}


def _load(name):
    return importlib.import_module(name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_quick_mode_outputs_and_resume(name, tmp_path, capsys):
    module = _load(name)
    expected_runs, figures, keys = CASES[name]
    out, figures_dir = tmp_path / "out", tmp_path / "figures"
    assert module.main([*QUICK, "--output-dir", str(out), "--figures-dir", str(figures_dir)]) == 0

    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == expected_runs
    variants = set()
    for path in runs:
        result = json.loads(path.read_text())  # strict JSON (no NaN)
        spec = result["spec"]
        assert spec["name"] == path.stem
        variants.add(spec["variant"])
        # the model ran with the variant's flags
        for flag, value in module.VARIANTS[spec["variant"]].items():
            assert result["flags"][flag] == value
        assert len(result["train_loss"]) == spec["steps"] or result["diverged_at"] is not None
        assert len(result["step_process_seconds"]) == len(result["train_loss"])
        assert result["process_seconds"] > 0
        # attention entropy of every layer at step 0 and every stability_every steps
        measured = [m["step"] for m in result["stability"]]
        assert measured == list(range(0, spec["steps"] + 1, spec["stability_every"]))
        layers = 6 if name.startswith("exp5") else spec["n_layer"]
        for record in result["stability"]:
            assert len(record["entropy_min"]) == layers
            for low, mean in zip(record["entropy_min"], record["entropy_mean"], strict=True):
                assert 0.0 <= low <= mean + 1e-9
        if name.startswith("exp5"):
            assert 0.0 <= result["final"]["accuracy"] <= 1.0
            assert set(result["conversion"]) == {"hidden_states", "cls", "mean_pooled"}
            if spec["variant"] == "stock":
                assert result["conversion"]["hidden_states"] < 1e-6
            else:  # NormSoftmax attention and QK-norm change the function
                assert result["conversion"]["hidden_states"] > 1e-2
        else:
            assert math.isfinite(result["final"]["loss"])
    assert variants == set(module.QUICK_VARIANTS if hasattr(module, "QUICK_VARIANTS") else module.VARIANTS)
    summary = json.loads((out / "summary.json").read_text())
    for key in keys:
        assert key in summary
    assert summary["total_process_seconds"] > 0
    assert summary["command"].startswith(f"python benchmarks/experiments/{name}.py")
    markdown = (out / "summary.md").read_text()
    assert "|---|" in markdown and "CPU-seconds" in markdown
    for figure in figures:
        for directory in (out, figures_dir):
            assert (directory / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resume: nothing is retrained, results are left as they were
    mtimes = {path: path.stat().st_mtime_ns for path in runs}
    capsys.readouterr()
    assert module.main([*QUICK, "--output-dir", str(out)]) == 0
    assert f"{expected_runs} runs: {expected_runs} already done (skipped), 0 to train" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in runs} == mtimes


def test_damaged_or_foreign_results_are_retrained(tmp_path, capsys):
    """A truncated result file and one saved for another spec are trained again; the others are kept."""
    module = _load("exp6_causal_lm")
    out = tmp_path / "out"
    argv = [*QUICK, "--variants", "stock,sigmareparam", "--output-dir", str(out)]
    assert module.main(argv) == 0
    truncated, foreign = sorted((out / "runs").glob("*.json"))
    truncated.write_text(truncated.read_text()[:100])
    saved = json.loads(foreign.read_text())
    saved["spec"]["lr"] = 123.0
    foreign.write_text(json.dumps(saved))
    capsys.readouterr()
    with pytest.warns(UserWarning):
        assert module.main(argv) == 0
    assert "2 runs: 0 already done (skipped), 2 to train" in capsys.readouterr().out
    assert json.loads(foreign.read_text())["spec"]["lr"] != 123.0
    json.loads(truncated.read_text())


def test_a_run_is_reproducible():
    """The same spec trains to the same losses and validation loss (seeded weights and batch order)."""
    import text_runner

    spec = {"name": "repro", "task": "char_lm", "variant": "normsoftmax", "attention_softmax": "normsoftmax",
            "lr": 3e-3, "steps": 3, "batch_size": 2, "stability_every": 3, "n_val_windows": 4, "seed": 1}
    first, second = text_runner.train_text_run(spec), text_runner.train_text_run(spec)
    assert first["train_loss"] == second["train_loss"] and first["final"] == second["final"]
    other = text_runner.train_text_run({**spec, "seed": 2})
    assert other["train_loss"] != first["train_loss"]


def test_sigma_reparam_conversion_of_the_real_checkpoint_is_exact():
    import text_runner

    import hf_normsoftmax
    from hf_normsoftmax.training.builtin_data import minilm_path

    batch = text_runner.pad_batch(text_runner.sentiment_data(32)["test_ids"][:8], 0)
    exact = text_runner.conversion_cost(
        hf_normsoftmax.from_stock(minilm_path(), task="text-classification", num_labels=2, sigma_reparam=True),
        batch)
    changed = text_runner.conversion_cost(
        hf_normsoftmax.from_stock(minilm_path(), task="text-classification", num_labels=2,
                                  attention_softmax="normsoftmax"), batch)
    assert max(exact.values()) < 1e-5
    assert min(changed.values()) > 1e-2


def test_loss_spikes_and_divergence():
    import text_runner

    calm = [1.0] * 12
    assert text_runner.loss_spikes(calm) == []
    # step 12 is 3x the median of the 10 steps before it; None (non-finite) steps are skipped, not counted
    assert text_runner.loss_spikes([1.0] * 11 + [3.0, None, 1.0]) == [12]
    assert text_runner.loss_spikes([1.0] * 5 + [9.0]) == []  # fewer than 10 previous steps: no verdict
    run = {"diverged_at": None, "train_loss": [2.0] + [1.0] * 19}
    assert not text_runner.diverged(run)
    assert text_runner.diverged({**run, "train_loss": [2.0] + [1.0] * 14 + [3.0] * 5})
    assert text_runner.diverged({**run, "diverged_at": 7})


@pytest.mark.parametrize("name", sorted(CASES))
def test_help(name, capsys):
    text = help_text(_load(name).main, capsys)
    for option in ("--quick", "--seeds", "--output-dir", "--jobs", "--threads", "--variants", "--lrs", "--steps"):
        assert option in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--variants", "stock,softmax2"], "unknown ['softmax2']"),
    (["--lrs", "1e-3,-1"], "expected positive numbers"),
    (["--seeds", "0,0"], "distinct non-negative integers"),
    (["--steps", "0"], "--steps"),
    (["--lrs", "1e-3,0.001"], "expected distinct learning rates"),
])
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_arguments_are_refused(name, argv, message, capsys):
    assert message in usage_error(_load(name).main, argv, capsys)


def test_bad_specs_are_refused():
    import text_runner

    with pytest.raises(ValueError, match="unknown task 'vision'"):
        text_runner.full_spec({"task": "vision"})
    with pytest.raises(ValueError, match=r"unknown spec keys \['patch_size'\]"):
        text_runner.full_spec({"task": "char_lm", "patch_size": 7})
    with pytest.raises(ValueError, match="unknown qk_norm 'l2'"):
        text_runner.full_spec({"task": "sentiment", "qk_norm": "l2"})
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        text_runner.full_spec({"task": "sentiment", "schedule": "cosine"})


def test_mean_pooler_averages_the_valid_tokens_only():
    """exp5's classifier reads the checkpoint's sentence embedding: padding positions must not move it."""
    import text_runner
    import torch

    import hf_normsoftmax
    from hf_normsoftmax.training.builtin_data import minilm_path

    model = hf_normsoftmax.from_stock(minilm_path(), task="text-classification", num_labels=2).eval()
    pooler = text_runner.MeanPooler.install(model.bert)
    short = text_runner.pad_batch([[101, 2307, 3185, 102]], 0)
    padded = text_runner.pad_batch([[101, 2307, 3185, 102], [101] + [2307] * 10 + [102]], 0)
    with torch.no_grad():
        alone, hidden = model(**short).logits[0], model.bert(**short).last_hidden_state
        together = model(**padded).logits[0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooler(hidden), hidden.mean(dim=1))
    assert model.bert.pooler is pooler
