"""PNG plots of a run's stability diagnostics (matplotlib, Agg canvas: no display, pyplot state untouched).

Figures written into the run dir:

* ``stability_entropy.png`` (always): one panel per attention layer with the attention entropy averaged over heads
  and its minimum over heads vs step (thin lines: single heads, crosses: entropy-collapse alarms), like the
  sigmaReparam paper's entropy figure, and a last panel with the training loss (and the probe-batch loss);
* ``stability_logits.png``: std of the attention logits per layer (NormSoftmax's quantity), the spectral norm of
  W_Q W_K^T per layer (max over heads; sigmaReparam's bound) and the logit norm ||beta z|| (Temperature check);
* ``stability_sigma_reparam.png`` (models with sigmaReparam): sigma(W) and the learned scalar of every layer, one
  panel per transformer block.

Input: ``stability_history.jsonl`` written by :class:`~hf_normsoftmax.training.callbacks.StabilityCallback`, or,
failing that, the ``stability/...`` entries of the Trainer's ``log_history`` (``trainer_state.json`` in the run dir
or its newest ``checkpoint-*``).

Usage::

    from hf_normsoftmax.training.plots import plot_run_dir
    paths = plot_run_dir("runs/bert-normsoftmax")   # [.../stability_entropy.png, ...]

or from the shell: ``hf-normsoftmax plot runs/bert-normsoftmax``.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..normsoftmax import _is_number
from .diagnostics import STABILITY_PREFIX, parse_stability_key

__all__ = ["ENTROPY_PLOT", "LOGITS_PLOT", "SIGMA_PLOT", "plot_run_dir", "plot_stability_history",
           "read_stability_history"]

HISTORY_FILE = "stability_history.jsonl"  # same name as callbacks.HISTORY_FILE, without importing the Trainer
ENTROPY_PLOT = "stability_entropy.png"
LOGITS_PLOT = "stability_logits.png"
SIGMA_PLOT = "stability_sigma_reparam.png"
_DPI = 110


def _has_stability_keys(record: Mapping) -> bool:
    return any(isinstance(k, str) and k.startswith(STABILITY_PREFIX) for k in record)


def _checkpoint_number(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _log_histories(run_dir: Path) -> Iterator[list[dict[str, Any]]]:
    """The ``log_history`` entries with a numeric step, of each readable ``trainer_state.json``: the run dir's
    first, then the checkpoints', newest first."""
    files = [run_dir / "trainer_state.json"]
    checkpoints = sorted((p for p in run_dir.glob("checkpoint-*") if p.is_dir()), key=_checkpoint_number,
                         reverse=True)
    files.extend(p / "trainer_state.json" for p in checkpoints)
    for state_file in files:
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        history = state.get("log_history") if isinstance(state, dict) else None
        yield [dict(e) for e in history or [] if isinstance(e, dict) and _is_number(e.get("step"))]


def read_stability_history(run_dir: str | Path, history_file: str = HISTORY_FILE) -> list[dict[str, Any]]:
    """The records of a run: measurement dicts (``stability/...`` keys), loss entries and alarm events.

    Reads ``run_dir/history_file``; if it is missing or holds no measurement, the ``log_history`` of
    ``trainer_state.json`` (run dir first, then the newest checkpoint). Raises FileNotFoundError for a missing
    run dir and ValueError when no stability data is found.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir {str(run_dir)!r} does not exist or is not a directory")
    history_path = run_dir / history_file
    if history_path.is_file():
        records = []
        for line in history_path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when the run died mid-write
            if isinstance(record, dict) and _is_number(record.get("step")):
                records.append(record)
        if any(_has_stability_keys(r) for r in records):
            return records
    for records in _log_histories(run_dir):
        if any(_has_stability_keys(r) for r in records):
            return records
    raise ValueError(
        f"run dir {str(run_dir)!r} has no stability data: neither {history_file} nor a trainer_state.json "
        "log_history with 'stability/...' entries. Train with hf_normsoftmax.StabilityCallback (it writes "
        f"{history_file}), or log collect_stability_stats(...) results through trainer.log."
    )


class _Series:
    """``key -> (steps, values)`` of the numeric fields of the records, plus the loss and the alarm events."""

    def __init__(self, records: Iterable[Mapping[str, Any]]):
        self.by_key: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
        self.events: list[Mapping[str, Any]] = []
        for record in records:
            step = record.get("step")
            if not _is_number(step):
                continue
            if "event" in record:
                self.events.append(record)
                continue
            for key, value in record.items():
                if key == "loss" or (isinstance(key, str) and key.startswith(STABILITY_PREFIX)):
                    if _is_number(value):
                        steps, values = self.by_key[key]
                        steps.append(float(step))
                        values.append(float(value))

    def get(self, key: str) -> tuple[list[float], list[float]] | None:
        series = self.by_key.get(key)
        return series if series and series[0] else None

    def groups(self, quantity: str) -> dict[str, dict[str, str]]:
        """``{group: {item: key}}`` for one quantity (e.g. entropy -> {layer_0: {mean: ..., head_0: ...}})."""
        out: dict[str, dict[str, str]] = defaultdict(dict)
        for key in self.by_key:
            parsed = parse_stability_key(key)
            if parsed and parsed[0] == quantity and parsed[1]:
                out[parsed[1]][parsed[2] or ""] = key
        return out


def _natural_key(text: str) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part)


def _grid(count: int, max_columns: int = 4) -> tuple[int, int]:
    columns = min(max_columns, count)
    return math.ceil(count / columns), columns


def _new_figure(rows: int, columns: int, panel_size=(3.6, 2.7)) -> tuple[Figure, list]:
    figure = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows + 0.6), dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, [ax for row in axes for ax in row]


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    figure.savefig(path, dpi=_DPI)
    return path


def _positive_log_scale(ax, values: Iterable[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 30:
        ax.set_yscale("log")


def _plot_entropy(series: _Series, path: Path) -> Path:
    layers = sorted(series.groups("entropy").items(), key=lambda item: _natural_key(item[0]))
    rows, columns = _grid(len(layers) + 1)
    figure, axes = _new_figure(rows, columns)
    collapse_events = defaultdict(list)
    for event in series.events:
        if event.get("event") in ("entropy_collapse", "non_finite_entropy") and event.get("layer"):
            collapse_events[event["layer"]].append(event)
    for ax, (layer, items) in zip(axes, layers, strict=False):
        heads = sorted((item for item in items if item.startswith("head_")), key=_natural_key)
        for index, item in enumerate(heads):
            steps, values = series.get(items[item])
            ax.plot(steps, values, color="0.6", linewidth=0.6, alpha=0.6,
                    label="single heads" if index == 0 else None)
        if "mean" in items:
            ax.plot(*series.get(items["mean"]), color="C0", linewidth=1.8, label="mean over heads")
        if "min" in items:
            ax.plot(*series.get(items["min"]), color="C3", linewidth=1.4, linestyle="--", label="min over heads")
        marks = [(e["step"], e["value"]) for e in collapse_events.get(layer, []) if _is_number(e.get("value"))
                 and math.isfinite(e["value"])]
        if marks:
            ax.plot([m[0] for m in marks], [m[1] for m in marks], "x", color="k", markersize=7,
                    label="collapse alarm")
            ax.legend(fontsize=7, loc="best")
        ax.set_title(layer.replace("_", " "), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("attention entropy (nats)")
        ax.grid(alpha=0.3)
    if layers:
        axes[0].legend(fontsize=7, loc="best")
    loss_ax = axes[len(layers)]
    plotted = False
    if series.get("loss"):
        loss_ax.plot(*series.get("loss"), color="C2", linewidth=1.4, label="training loss")
        plotted = True
    if series.get("stability/probe_loss"):
        loss_ax.plot(*series.get("stability/probe_loss"), color="C1", linewidth=1.2, marker=".",
                     label="probe-batch loss")
        plotted = True
    for event in series.events:
        if event.get("event") in ("loss_spike", "non_finite_loss"):
            loss_ax.axvline(event["step"], color="k", linestyle=":", linewidth=1)
    loss_ax.set_title("loss", fontsize=10)
    loss_ax.set_xlabel("step")
    loss_ax.grid(alpha=0.3)
    if plotted:
        _positive_log_scale(loss_ax, [v for key in ("loss", "stability/probe_loss") if series.get(key)
                                      for v in series.get(key)[1]])
        loss_ax.legend(fontsize=7, loc="best")
    else:
        loss_ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=loss_ax.transAxes)
    for ax in axes[len(layers) + 1:]:
        ax.set_visible(False)
    figure.suptitle("Attention entropy per layer (mean and min over heads) and loss")
    return _save(figure, path)


def _plot_logits(series: _Series, path: Path) -> Path | None:
    logit_std = sorted(series.groups("logit_std").items(), key=lambda item: _natural_key(item[0]))
    qk_norm = sorted(series.groups("qk_spectral_norm").items(), key=lambda item: _natural_key(item[0]))
    norm = series.get("stability/logit_norm")
    panels = [p for p in (("logit_std", logit_std), ("qk", qk_norm), ("norm", norm)) if p[1]]
    if not panels:
        return None
    figure, axes = _new_figure(1, len(panels), panel_size=(4.6, 3.4))
    for ax, (kind, data) in zip(axes, panels, strict=True):
        if kind == "norm":
            ax.plot(*data, color="C4", linewidth=1.6, marker=".")
            ax.set_title("logit norm ||beta z|| (mean per example)", fontsize=10)
            ax.set_ylabel("L2 norm")
            _positive_log_scale(ax, data[1])
        else:
            item = "mean" if kind == "logit_std" else "max"
            all_values = []
            for index, (layer, items) in enumerate(data):
                if item not in items:
                    continue
                steps, values = series.get(items[item])
                all_values.extend(values)
                ax.plot(steps, values, color=f"C{index % 10}", linewidth=1.4, label=layer.replace("_", " "))
                if kind == "logit_std" and "max" in items:
                    ax.plot(*series.get(items["max"]), color=f"C{index % 10}", linewidth=0.8, linestyle="--")
            if kind == "logit_std":
                ax.set_title("attention logit std (solid: mean, dashed: max over heads)", fontsize=9)
                ax.set_ylabel("std of scale * q.k")
            else:
                ax.set_title("spectral norm of W_Q W_K^T (max over heads)", fontsize=10)
                ax.set_ylabel("||W_Q W_K^T||_2")
            _positive_log_scale(ax, all_values)
            ax.legend(fontsize=7, loc="best", ncol=2 if len(data) > 6 else 1)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    figure.suptitle("Softmax inputs: attention logits, W_Q W_K^T and output logits")
    return _save(figure, path)


def _block_of(module_name: str) -> str:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module_name)
    return f"block {match.group(1)}" if match else "outside the blocks"


def _short_name(module_name: str) -> str:
    match = re.search(r"(?:^|\.)\d+\.(.+)$", module_name)
    return match.group(1) if match else module_name


def _plot_sigma(series: _Series, path: Path) -> Path | None:
    sigma = series.groups("sigma")
    if not sigma:
        return None
    scale = series.groups("reparam_scale")
    blocks: dict[str, list[str]] = defaultdict(list)
    for module_name in sigma:
        blocks[_block_of(module_name)].append(module_name)
    ordered = sorted(blocks.items(), key=lambda item: (item[0] == "outside the blocks", _natural_key(item[0])))
    rows, columns = _grid(len(ordered))
    figure, axes = _new_figure(rows, columns, panel_size=(4.0, 2.9))
    for ax, (block, names) in zip(axes, ordered, strict=False):
        for index, module_name in enumerate(sorted(names, key=_natural_key)):
            color = f"C{index % 10}"
            ax.plot(*series.get(sigma[module_name][""]), color=color, linewidth=1.4, label=_short_name(module_name))
            if module_name in scale:
                ax.plot(*series.get(scale[module_name][""]), color=color, linewidth=1.0, linestyle="--")
        ax.set_title(f"{block} (solid: sigma(W), dashed: learned scalar)", fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    for ax in axes[len(ordered):]:
        ax.set_visible(False)
    figure.suptitle("sigmaReparam: spectral norm estimate sigma(W) and learned scalar per layer")
    return _save(figure, path)


def plot_stability_history(records: Iterable[Mapping[str, Any]], output_dir: str | Path) -> list[Path]:
    """Draw the stability figures of ``records`` (see :func:`read_stability_history`) into ``output_dir``.

    Returns the written PNG paths, ``stability_entropy.png`` first. Raises ValueError when the records hold no
    attention-entropy measurement.
    """
    output_dir = Path(output_dir)
    series = _Series(records)
    if not series.groups("entropy"):
        raise ValueError(
            "no attention-entropy measurements ('stability/entropy/...' keys) in the stability records: nothing "
            "to plot"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [_plot_entropy(series, output_dir / ENTROPY_PLOT)]
    for draw, name in ((_plot_logits, LOGITS_PLOT), (_plot_sigma, SIGMA_PLOT)):
        written = draw(series, output_dir / name)
        if written is not None:
            paths.append(written)
    return paths


def plot_run_dir(run_dir: str | Path, history_file: str = HISTORY_FILE) -> list[Path]:
    """Draw the stability plots of a run dir into it; returns the PNG paths (``stability_entropy.png`` first).

    Reads ``run_dir/stability_history.jsonl``, else the Trainer's ``trainer_state.json`` log history. The loss
    panel uses the history's loss entries, else the losses of ``trainer_state.json``. Raises FileNotFoundError
    for a missing dir and ValueError when it holds no stability data.

    Example::

        >>> plot_run_dir("out/vit-sigma")
        [PosixPath('out/vit-sigma/stability_entropy.png'), PosixPath('out/vit-sigma/stability_logits.png'), ...]
    """
    run_dir = Path(run_dir)
    records = read_stability_history(run_dir, history_file)
    if not any("loss" in r for r in records):
        records = records + _losses_from_trainer_state(run_dir)
    return plot_stability_history(records, run_dir)


def _losses_from_trainer_state(run_dir: Path) -> list[dict[str, Any]]:
    for history in _log_histories(run_dir):
        losses = [{"step": e["step"], "loss": e["loss"]} for e in history if _is_number(e.get("loss"))]
        if losses:
            return losses
    return []
