"""Stability plots (hf_normsoftmax.training.plots) and ``hf-normsoftmax plot``.

Histories are written here the way StabilityCallback writes them (test_callbacks.py checks the callback's own
files end to end); images are read back and checked for the line colours they must contain.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from hf_normsoftmax.cli import main as cli_main
from hf_normsoftmax.training.plots import (
    ENTROPY_PLOT,
    LOGITS_PLOT,
    SIGMA_PLOT,
    plot_run_dir,
    plot_stability_history,
    read_stability_history,
)

MEAN_BLUE = (0x1F, 0x77, 0xB4)  # matplotlib C0: mean entropy
MIN_RED = (0xD6, 0x27, 0x28)  # C3: min over heads
LOSS_GREEN = (0x2C, 0xA0, 0x2C)  # C2: training loss


def _measurement(step: int, layers=3, heads=2, sigma=True, collapse_at=None) -> dict:
    record = {"step": step, "epoch": step / 100}
    for layer in range(layers):
        values = []
        for head in range(heads):
            value = 2.0 - 0.005 * step * (head + 1) / (layer + 1)
            if collapse_at is not None and step >= collapse_at and layer == 1 and head == 0:
                value = 0.05
            values.append(value)
            record[f"stability/entropy/layer_{layer}/head_{head}"] = value
            record[f"stability/logit_std/layer_{layer}/head_{head}"] = 0.1 + 0.01 * step
            record[f"stability/qk_spectral_norm/layer_{layer}/head_{head}"] = 1.0 + 0.1 * step * (head + 1)
        record[f"stability/entropy/layer_{layer}/mean"] = sum(values) / heads
        record[f"stability/entropy/layer_{layer}/min"] = min(values)
        record[f"stability/logit_std/layer_{layer}/mean"] = 0.1 + 0.01 * step
        record[f"stability/logit_std/layer_{layer}/max"] = 0.12 + 0.01 * step
        record[f"stability/qk_spectral_norm/layer_{layer}/max"] = 1.0 + 0.1 * step * heads
        if sigma:
            for name in ("attention.self.query", "attention.self.key", "output.dense"):
                module = f"bert.encoder.layer.{layer}.{name}"
                record[f"stability/sigma/{module}"] = 1.0 + 0.002 * step
                record[f"stability/reparam_scale/{module}"] = 1.0 - 0.001 * step
    if sigma:
        record["stability/sigma/classifier"] = 0.5
        record["stability/reparam_scale/classifier"] = 0.5 + 0.001 * step
    record["stability/logit_norm"] = 1.0 + 0.05 * step
    record["stability/probe_loss"] = 2.0 * math.exp(-step / 50)
    record["stability/alarms"] = 0.0
    return record


def _write_history(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "stability_history.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _color_fraction(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12) -> float:
    pixels = (image[..., :3] * 255).astype(int) if image.dtype != np.uint8 else image[..., :3].astype(int)
    close = (np.abs(pixels - np.array(rgb)) <= tolerance).all(axis=-1)
    return float(close.mean())


def _full_history(collapse_at=None, sigma=True) -> list[dict]:
    records = []
    for step in range(0, 101, 10):
        records.append(_measurement(step, sigma=sigma, collapse_at=collapse_at))
        if step:
            records.append({"step": step, "loss": 2.2 * math.exp(-step / 40), "grad_norm": 1.0})
    if collapse_at is not None:
        records.append({"step": collapse_at, "event": "entropy_collapse", "source": "entropy", "value": 0.05,
                        "threshold": 0.4, "layer": "layer_1", "head": 0, "message": "collapse"})
        records.append({"step": collapse_at + 10, "event": "loss_spike", "source": "train_loss", "value": 9.0,
                        "threshold": 3.0, "layer": "layer_1", "head": 0, "message": "spike"})
    return records


def test_plot_run_dir_writes_readable_figures_from_the_history_file(tmp_path):
    _write_history(tmp_path, _full_history(collapse_at=60))
    paths = plot_run_dir(tmp_path)
    assert [p.name for p in paths] == [ENTROPY_PLOT, LOGITS_PLOT, SIGMA_PLOT]
    for path in paths:
        assert path.parent == tmp_path and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    entropy = imread(paths[0])
    height, width = entropy.shape[:2]
    assert width > 800 and height > 250  # 3 layer panels + the loss panel
    for colour in (MEAN_BLUE, MIN_RED, LOSS_GREEN):
        assert _color_fraction(entropy, colour) > 1e-4, colour
    logits = imread(paths[1])
    assert _color_fraction(logits, MEAN_BLUE) > 1e-4


def test_entropy_figure_without_loss_or_sigma_data(tmp_path):
    records = [_measurement(step, sigma=False) for step in (0, 5, 10)]
    for record in records:
        del record["stability/probe_loss"]
    paths = plot_stability_history(records, tmp_path / "out")
    assert [p.name for p in paths] == [ENTROPY_PLOT, LOGITS_PLOT]  # no sigmaReparam layers: no sigma figure
    assert _color_fraction(imread(paths[0]), LOSS_GREEN) == 0.0


def test_falls_back_to_trainer_state_log_history(tmp_path):
    checkpoint = tmp_path / "checkpoint-100"
    checkpoint.mkdir(parents=True)
    older = tmp_path / "checkpoint-20"
    older.mkdir()
    (older / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "loss": 1.0}]}))
    history = []
    for step in range(0, 101, 20):
        # the Trainer's log history holds only what was logged (log_per_head=False: no per-head keys)
        history.append({k: v for k, v in _measurement(step).items() if "/head_" not in k})
        history.append({"step": step + 1, "loss": 3.0 - 0.01 * step, "epoch": 0.1})
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 100, "log_history": history}))
    _write_history(tmp_path, [{"step": 3, "loss": 1.0}])  # a history file with no measurement in it
    records = read_stability_history(tmp_path)
    assert len(records) == len(history)
    paths = plot_run_dir(tmp_path)
    assert paths[0].name == ENTROPY_PLOT
    assert _color_fraction(imread(paths[0]), LOSS_GREEN) > 1e-4


def test_diverged_run_with_nan_and_a_truncated_line_still_plots(tmp_path):
    records = _full_history()
    records[-2]["stability/entropy/layer_0/mean"] = float("nan")
    records[-1]["loss"] = float("inf")
    path = _write_history(tmp_path, records)
    with open(path, "a") as handle:
        handle.write('{"step": 110, "stability/entro')  # the process died mid-write
    assert len(read_stability_history(tmp_path)) == len(records)
    assert [p.name for p in plot_run_dir(tmp_path)][0] == ENTROPY_PLOT


def test_clear_errors_for_missing_or_empty_run_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_run_dir(tmp_path / "nope")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 5, "loss": 1.0}]}))
    with pytest.raises(ValueError, match="no stability data.*StabilityCallback"):
        plot_run_dir(tmp_path)
    with pytest.raises(ValueError, match="no attention-entropy"):
        plot_stability_history([{"step": 1, "stability/logit_norm": 2.0}], tmp_path)


def test_cli_plot_command(tmp_path, capsys):
    _write_history(tmp_path / "run", _full_history())
    assert cli_main(["plot", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'run' / ENTROPY_PLOT}" in out and SIGMA_PLOT in out
    (tmp_path / "empty").mkdir()
    assert cli_main(["plot", str(tmp_path / "empty")]) == 2
    assert "no stability data" in capsys.readouterr().err
