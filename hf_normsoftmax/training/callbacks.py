"""``StabilityCallback``: stability diagnostics every N steps of a ``transformers.Trainer`` run.

Every ``every_n_steps`` optimizer steps (and before the first update, and at the last step) the callback measures
the model on a fixed probe batch with :class:`~hf_normsoftmax.training.diagnostics.StabilityMonitor` (eval mode,
no grad, RNG state forked: training results are bit-identical with and without the callback), then

* logs the ``stability/...`` keys through ``trainer.log``, so they reach ``trainer.state.log_history`` and every
  reporting integration (TensorBoard shows them under ``train/stability/...``). Editing ``logs`` in ``on_log``
  would reach neither: ``Trainer.log`` stores the history before callbacks run. The console (the Trainer's
  progress bar or printer) gets a one-line summary instead of the hundreds of keys (:func:`console_summary`:
  step, probe loss, lowest head entropy and where, highest attention-logit std and where, sigma range, logit
  norm, alarms so far);
* checks the entropy-collapse / loss-spike alarms (:class:`~hf_normsoftmax.training.alarms.CollapseDetector`)
  and logs a warning naming the layer and head;
* appends the measurement to ``<output_dir>/stability_history.jsonl`` (also the training losses and the alarms),
  flushed as it goes, so a run that dies still leaves its history;

and at the end of training draws the plots (:func:`hf_normsoftmax.training.plots.plot_run_dir`) into the output
dir. ``hf-normsoftmax plot RUN_DIR`` draws them again on demand.

The probe batch is the first training batch exactly as the model received it (collated, on device), captured by a
forward pre-hook: no extra dataloader iteration, so the data order and the RNG are untouched. The step-0
measurement is taken just before the first optimizer step, when the weights are still the initial ones. Pass
``probe_batch=`` to use your own. After a resume from a checkpoint, it is the first batch after the resume.

The callback needs the Trainer itself to log through it. With ``Trainer(..., callbacks=[StabilityCallback()])``
it finds it (it is the Trainer calling the callback); otherwise bind it explicitly::

    from hf_normsoftmax import StabilityCallback

    trainer = Trainer(model=model, args=args, train_dataset=train_ds, callbacks=[StabilityCallback(every_n_steps=50)])
    trainer.train()   # -> output_dir/stability_history.jsonl, stability_entropy.png, ...

    # or, for a trainer built elsewhere:
    trainer.add_callback(StabilityCallback(every_n_steps=50).bind(trainer))

Distributed runs: every process measures its own probe batch (the forward must run on every rank under FSDP);
only the main process writes files; ``Trainer.log`` sends the main process's values to the integrations.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .alarms import CollapseDetector, StabilityEvent
from .checks import check_bools, check_count
from .diagnostics import STABILITY_PREFIX, StabilityMonitor

__all__ = ["HISTORY_FILE", "StabilityCallback", "console_summary"]

logger = logging.getLogger(__name__)

HISTORY_FILE = "stability_history.jsonl"
# How far up the call stack the Trainer is looked for (callback <- CallbackHandler.call_event <- on_* <- Trainer).
_STACK_SEARCH_DEPTH = 8


def _clone_detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _clone_detached(v) for k, v in value.items()}
    return value


def _batch_size(kwargs: Mapping[str, Any]) -> int | None:
    for value in kwargs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


# Callbacks that print ``logs`` to the console: they get the summary of a measurement, not the measurement.
_CONSOLE_CALLBACKS = (ProgressCallback, PrinterCallback)


def _extreme(stats: Mapping[str, Any], quantity: str, pick) -> tuple[str, float] | None:
    """(where, value) of the min/max (``pick``) of the per-head values of ``stability/<quantity>/...``."""
    found = []
    for key, value in stats.items():
        parts = key.split("/")
        if (len(parts) == 4 and parts[1] == quantity and parts[3].startswith("head_")
                and isinstance(value, float) and value == value):
            found.append((value, f"{parts[2]}/{parts[3]}"))
    if not found:
        return None
    value, where = pick(found)
    return where, value


def console_summary(stats: Mapping[str, Any], step: int) -> dict[str, Any]:
    """One console line for a stability measurement (the full ``stats`` go to the log history and the integrations).

    Keys: ``stability_step``; when measured: ``probe_loss``, ``min_entropy`` and ``min_entropy_at``
    (``layer_i/head_h``), ``max_logit_std`` and ``max_logit_std_at``, ``sigma_range`` (smallest and largest sigma(W)
    of the sigmaReparam layers), ``logit_norm``; and ``alarms`` (alarms raised so far in the run).
    """
    summary: dict[str, Any] = {"stability_step": step}
    if "stability/probe_loss" in stats:
        summary["probe_loss"] = stats["stability/probe_loss"]
    lowest = _extreme(stats, "entropy", min)
    if lowest is not None:
        summary["min_entropy_at"], summary["min_entropy"] = lowest
    highest = _extreme(stats, "logit_std", max)
    if highest is not None:
        summary["max_logit_std_at"], summary["max_logit_std"] = highest
    sigmas = [v for k, v in stats.items() if k.startswith("stability/sigma/") and isinstance(v, float)]
    if sigmas:
        summary["sigma_range"] = f"{min(sigmas):.4g}..{max(sigmas):.4g}"
    if "stability/logit_norm" in stats:
        summary["logit_norm"] = stats["stability/logit_norm"]
    if "stability/alarms" in stats:
        summary["alarms"] = int(stats["stability/alarms"])
    return summary


def _first_examples(kwargs: dict, count: int | None) -> dict:
    size = _batch_size(kwargs)
    if count is None or size is None or size <= count:
        return kwargs
    return {k: v[:count] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v
            for k, v in kwargs.items()}


class StabilityCallback(TrainerCallback):
    """Stability diagnostics, alarms, history file and plots for a ``Trainer`` run (see the module docstring).

    Args:
        every_n_steps: measure every this many optimizer steps (and at step 0 and the last step).
        probe_batch: model inputs to measure on (a dict of tensors as a collator returns); default: the first
            training batch.
        max_probe_examples: keep only the first this many examples of the probe batch (None: all).
        log_per_head: also send the per-head keys to ``Trainer.log`` (the history file always has them);
            with False only per-layer aggregates, sigmaReparam values and the logit norm are logged.
        entropy_collapse_fraction: alarm when a head's entropy falls below this fraction of its running max
            (None disables).
        loss_spike_factor: alarm when the training loss (as logged) or the probe loss exceeds this multiple of
            the running median of its last ``loss_window`` values (None disables).
        loss_window, min_loss_history: see :class:`~hf_normsoftmax.training.alarms.CollapseDetector`.
        history_file: file name in ``args.output_dir`` for the history (None: write nothing, no plots).
        plot_at_end: draw the PNG plots into ``args.output_dir`` at the end of training.
        chunk_size: query rows per block when recomputing attention statistics.
        attention: measure attention entropy and logit std (needs the ``"normsoftmax"`` attention dispatch, which
            every variant has); False keeps the weight and logit statistics only (e.g. for a stock model).
        trainer: the Trainer to log through (else found automatically, or set with :meth:`bind`).

    Attributes after training: ``history`` (list of measurement dicts, each with ``step``), ``events`` (the
    :class:`~hf_normsoftmax.training.alarms.StabilityEvent` alarms).
    """

    def __init__(self, every_n_steps: int = 50, probe_batch: Mapping[str, Any] | None = None,
                 max_probe_examples: int | None = None, log_per_head: bool = True,
                 entropy_collapse_fraction: float | None = 0.2, loss_spike_factor: float | None = 3.0,
                 loss_window: int = 20, min_loss_history: int = 5, history_file: str | None = HISTORY_FILE,
                 plot_at_end: bool = True, chunk_size: int = 256, attention: bool = True,
                 trainer: Trainer | None = None):
        check_count("every_n_steps", every_n_steps)
        if probe_batch is not None and not isinstance(probe_batch, Mapping):
            raise TypeError(f"Invalid value for `probe_batch`: {type(probe_batch).__name__}. Allowed: None or a "
                            "mapping of model inputs (e.g. {'input_ids': tensor, 'attention_mask': tensor}).")
        check_count("max_probe_examples", max_probe_examples, optional=True)
        check_bools(log_per_head=log_per_head, plot_at_end=plot_at_end, attention=attention)
        if history_file is not None and (not isinstance(history_file, str) or not history_file
                                         or os.path.basename(history_file) != history_file):
            raise ValueError(f"Invalid value for `history_file`: {history_file!r}. Allowed: None or a plain file "
                             "name (written into args.output_dir).")
        check_count("chunk_size", chunk_size)
        self.every_n_steps = every_n_steps
        self.max_probe_examples = max_probe_examples
        self.log_per_head = log_per_head
        self.history_file = history_file
        self.plot_at_end = plot_at_end
        self.chunk_size = chunk_size
        self.attention = attention
        self.detector = CollapseDetector(entropy_collapse_fraction, loss_spike_factor, loss_window, min_loss_history)
        self._given_probe = None if probe_batch is None else _first_examples(
            _clone_detached(dict(probe_batch)), max_probe_examples)
        self._probe: tuple[tuple, dict] | None = None
        self._trainer: Trainer | None = None
        self._monitor: StabilityMonitor | None = None
        self._capture_handle = None
        self._last_measured_step: int | None = None
        self._history_path: Path | None = None
        self._alarm_count = 0
        self.history: list[dict[str, Any]] = []
        self.events: list[StabilityEvent] = []
        if trainer is not None:
            self.bind(trainer)

    # -- wiring -------------------------------------------------------------------------------------------------

    def bind(self, trainer: Trainer) -> StabilityCallback:
        """Log through ``trainer`` (returns self, so ``trainer.add_callback(StabilityCallback().bind(trainer))``)."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"Invalid value for `trainer`: {type(trainer).__name__}. Allowed: a transformers.Trainer.")
        self._trainer = trainer
        return self

    def _find_trainer(self) -> Trainer | None:
        # The Trainer calls its callbacks through CallbackHandler; the frame a few levels up is a Trainer method
        # whose `self` holds this very callback. Identity is checked, so another Trainer is never picked up.
        frame = inspect.currentframe()
        try:
            for _ in range(_STACK_SEARCH_DEPTH):
                frame = frame.f_back if frame is not None else None
                if frame is None:
                    return None
                candidate = frame.f_locals.get("self")
                if isinstance(candidate, Trainer) and any(
                    cb is self for cb in candidate.callback_handler.callbacks
                ):
                    return candidate
            return None
        finally:
            del frame

    def on_init_end(self, args, state, control, **kwargs):
        if self._trainer is None:
            self._trainer = self._find_trainer()

    # -- training events ----------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._trainer is None:
            self._trainer = self._find_trainer()
        if self._trainer is None:
            raise RuntimeError(
                "StabilityCallback is not bound to a Trainer and could not find the one calling it. Bind it "
                "explicitly: trainer.add_callback(StabilityCallback(...).bind(trainer)), or pass trainer=."
            )
        model = self._trainer.model
        self._monitor = StabilityMonitor(model, attention=self.attention, chunk_size=self.chunk_size)
        self._last_measured_step = None
        self._alarm_count = 0
        self.history, self.events = [], []
        self.detector = CollapseDetector(self.detector.entropy_fraction, self.detector.loss_spike_factor,
                                         self.detector.loss_window, self.detector.min_loss_history)
        self._history_path = None
        if self.history_file is not None and state.is_world_process_zero:
            self._history_path = Path(args.output_dir) / self.history_file
            self._start_history_file(state.global_step)
        self._probe = None if self._given_probe is None else ((), self._given_probe)
        # Capture (and, at step 0, measure) on the first training forward: the batch is only known there.
        self._capture_handle = model.register_forward_pre_hook(self._on_first_forward, with_kwargs=True)

    def _on_first_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        if not module.training:  # e.g. an evaluation before training (eval_on_start)
            return None
        self._remove_capture_hook()
        if self._probe is None:
            probe_kwargs = {k: _clone_detached(v) for k, v in kwargs.items() if k != "num_items_in_batch"}
            self._probe = (tuple(_clone_detached(a) for a in args), _first_examples(probe_kwargs,
                                                                                     self.max_probe_examples))
        return None

    def _remove_capture_hook(self) -> None:
        if self._capture_handle is not None:
            self._capture_handle.remove()
            self._capture_handle = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # The state before the first update: the weights are still the initial ones here, and the probe batch is
        # known (captured by the first forward). Measuring here rather than inside that forward keeps the probe
        # forward out of the training forward (no nested forward under DDP/FSDP hooks).
        if state.global_step == 0 and self._last_measured_step is None:
            self._measure(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        if self._probe is None:
            return
        step = state.global_step
        if step % self.every_n_steps == 0 or step == state.max_steps:
            self._measure(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or any(key.startswith(STABILITY_PREFIX) for key in logs):
            return  # our own logging coming back
        loss = logs.get("loss")
        if not isinstance(loss, (int, float)) or isinstance(loss, bool):
            return
        record = {"step": state.global_step, "loss": float(loss)}
        for key in ("grad_norm", "learning_rate"):
            if isinstance(logs.get(key), (int, float)):
                record[key] = float(logs[key])
        self._write_record(record)
        for event in self.detector.observe_loss(state.global_step, loss, source="train_loss"):
            self._raise_alarm(event)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_capture_hook()
        self._monitor = None
        if self._history_path is None or not self.plot_at_end or not self._history_path.is_file():
            return
        from .plots import plot_run_dir

        try:
            paths = plot_run_dir(args.output_dir, history_file=self.history_file)
        except Exception as exc:  # a plotting problem must not lose a finished training run
            logger.warning(f"StabilityCallback: could not draw the stability plots into {args.output_dir}: "
                           f"{type(exc).__name__}: {exc}")
            return
        logger.info("StabilityCallback: wrote " + ", ".join(str(p) for p in paths))

    # -- measuring ----------------------------------------------------------------------------------------------

    def _measure(self, args, state) -> None:
        step = state.global_step
        if self._last_measured_step == step or self._monitor is None or self._probe is None:
            return
        self._last_measured_step = step
        probe_args, probe_kwargs = self._probe
        stats = self._monitor._measure(probe_args, probe_kwargs)
        events = self.detector.observe_stats(step, stats)
        for event in events:
            self._raise_alarm(event)
        stats["stability/alarms"] = float(self._alarm_count)
        record = {"step": step, "epoch": state.epoch, **stats}
        self.history.append(record)
        self._write_record(record)
        to_log = stats if self.log_per_head else {k: v for k, v in stats.items() if "/head_" not in k}
        # CallbackHandler.on_log clears control.should_log: without restoring it, the Trainer would skip its own
        # loss logging of this step (the loss would be folded into the next logged average).
        pending_log = self._trainer.control.should_log
        handler = self._trainer.callback_handler
        everyone = handler.callbacks
        console = [callback for callback in everyone if isinstance(callback, _CONSOLE_CALLBACKS)]
        # The full measurement (hundreds of keys, several thousand characters) goes to the log history and the
        # integrations; the console printers are left out of that call and get the one-line summary.
        handler.callbacks = [callback for callback in everyone if not isinstance(callback, _CONSOLE_CALLBACKS)]
        try:
            self._trainer.log(dict(to_log))
        finally:
            handler.callbacks = everyone
        summary = console_summary(stats, step)
        for callback in console:
            callback.on_log(args, state, self._trainer.control, logs=dict(summary))
        self._trainer.control.should_log = self._trainer.control.should_log or pending_log

    def _raise_alarm(self, event: StabilityEvent) -> None:
        self._alarm_count += 1
        self.events.append(event)
        logger.warning(event.message)
        self._write_record(event.to_record())

    # -- history file -------------------------------------------------------------------------------------------

    def _start_history_file(self, global_step: int) -> None:
        """New run: start an empty file. Resumed run: keep the records up to the resumed step and replay them."""
        path = self._history_path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if global_step > 0 and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short when the interrupted run died
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= global_step:
                    kept.append(record)
        for record in kept:  # restore running maxima / loss medians, without re-raising old alarms
            if "event" in record:
                self._alarm_count += 1
            elif "loss" in record:
                self.detector.observe_loss(record["step"], record["loss"], "train_loss", alarms=False)
            else:
                self.detector.observe_stats(record["step"], record, alarms=False)
                self.history.append(record)
        with open(path, "w", encoding="utf-8") as handle:
            for record in kept:
                handle.write(json.dumps(record) + "\n")

    def _write_record(self, record: dict[str, Any]) -> None:
        if self._history_path is None:
            return
        # NaN/inf are written as the NaN/Infinity literals Python's json (and trainer_state.json) use
        with open(self._history_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
