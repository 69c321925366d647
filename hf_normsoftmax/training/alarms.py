"""Entropy-collapse and loss-spike alarms over a stream of stability measurements.

:class:`CollapseDetector` watches the ``stability/entropy/...`` keys of
:func:`~hf_normsoftmax.training.diagnostics.collect_stability_stats` and the training losses, and returns a
:class:`StabilityEvent` per alarm (a head's entropy below a fraction of its running max, a loss above a multiple of
the running median, any non-finite value). :class:`~hf_normsoftmax.training.callbacks.StabilityCallback` logs them
in Trainer runs; in a custom loop::

    detector = CollapseDetector(entropy_fraction=0.2)
    for event in detector.observe_stats(step, collect_stability_stats(model, probe_batch)):
        print(event.message)
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .checks import check_count, is_count
from .diagnostics import layer_sort_key, parse_stability_key

__all__ = ["CollapseDetector", "StabilityEvent"]


@dataclass(frozen=True)
class StabilityEvent:
    """An alarm: ``kind`` is ``"entropy_collapse"``, ``"non_finite_entropy"``, ``"loss_spike"`` or
    ``"non_finite_loss"``; ``layer``/``head`` name the attention head concerned (for a loss alarm: the head whose
    entropy is lowest relative to its running max at that time, if any entropy was measured)."""

    step: int
    kind: str
    source: str
    value: float
    threshold: float | None
    layer: str | None
    head: int | None
    message: str

    def to_record(self) -> dict[str, Any]:
        """JSON-ready dict (``event`` = kind), as written to ``stability_history.jsonl``."""
        record = asdict(self)
        record["event"] = record.pop("kind")
        return record


class CollapseDetector:
    """Entropy-collapse and loss-spike alarms over a stream of measurements.

    Args:
        entropy_fraction: alarm when a head's entropy drops below this fraction of its running max (the highest
            entropy that head has had so far); None disables. In (0, 1).
        loss_spike_factor: alarm when a loss exceeds this multiple of the running median of the previous
            ``loss_window`` losses of the same source; None disables. > 1.
        loss_window: how many recent losses the median uses (>= 1).
        min_loss_history: losses needed before spikes are judged (1 <= it <= loss_window).

    A head alarms once when it falls below the threshold and again only after recovering above it. Non-finite
    entropies and losses always alarm.

    Example::

        detector = CollapseDetector(entropy_fraction=0.2, loss_spike_factor=3.0)
        events = detector.observe_stats(step, stats) + detector.observe_loss(step, loss)
    """

    def __init__(self, entropy_fraction: float | None = 0.2, loss_spike_factor: float | None = 3.0,
                 loss_window: int = 20, min_loss_history: int = 5):
        if entropy_fraction is not None and (
            isinstance(entropy_fraction, bool) or not isinstance(entropy_fraction, (int, float))
            or not 0 < entropy_fraction < 1
        ):
            raise ValueError(f"Invalid value for `entropy_fraction`: {entropy_fraction!r}. Allowed: None or a "
                             "number in (0, 1).")
        if loss_spike_factor is not None and (
            isinstance(loss_spike_factor, bool) or not isinstance(loss_spike_factor, (int, float))
            or not loss_spike_factor > 1 or not math.isfinite(loss_spike_factor)
        ):
            raise ValueError(f"Invalid value for `loss_spike_factor`: {loss_spike_factor!r}. Allowed: None or a "
                             "finite number > 1.")
        check_count("loss_window", loss_window)
        if not is_count(min_loss_history) or not 1 <= min_loss_history <= loss_window:
            raise ValueError(f"Invalid value for `min_loss_history`: {min_loss_history!r}. Allowed: an int in "
                             f"[1, loss_window={loss_window}].")
        self.entropy_fraction = entropy_fraction
        self.loss_spike_factor = loss_spike_factor
        self.loss_window = loss_window
        self.min_loss_history = min_loss_history
        self.running_max: dict[tuple[str, int], float] = {}
        self.latest_entropy: dict[tuple[str, int], float] = {}
        self._alarmed: set[tuple[str, int]] = set()
        self._losses: dict[str, deque] = {}
        self.events: list[StabilityEvent] = []

    @staticmethod
    def head_entropies(stats: Mapping[str, float]) -> dict[tuple[str, int], float]:
        """``{(layer, head): entropy}`` from the per-head entropy keys of ``stats``."""
        out = {}
        for key, value in stats.items():
            parsed = parse_stability_key(key)
            if parsed and parsed[0] == "entropy" and parsed[1] and parsed[2] and parsed[2].startswith("head_"):
                out[(parsed[1], int(parsed[2][len("head_"):]))] = float(value)
        return out

    def observe_stats(self, step: int, stats: Mapping[str, float], alarms: bool = True) -> list[StabilityEvent]:
        """Feed one measurement (the dict of :func:`collect_stability_stats`); returns the new alarms.

        Looks at the per-head entropies and ``stability/probe_loss``. ``alarms=False`` only updates the running
        state (for replaying a history after a resume).
        """
        events = []
        for (layer, head), value in sorted(self.head_entropies(stats).items(), key=lambda i: (layer_sort_key(i[0][0]),
                                                                                              i[0][1])):
            head_key = (layer, head)
            self.latest_entropy[head_key] = value
            if not math.isfinite(value):
                if head_key not in self._alarmed and alarms:
                    events.append(StabilityEvent(
                        step, "non_finite_entropy", "entropy", value, None, layer, head,
                        f"stability alarm at step {step}: attention entropy of {layer} head {head} is {value} "
                        "(non-finite logits: the run is diverging)."))
                self._alarmed.add(head_key)
                continue
            peak = max(self.running_max.get(head_key, value), value)
            self.running_max[head_key] = peak
            if self.entropy_fraction is None:
                continue
            threshold = self.entropy_fraction * peak
            if value < threshold:
                if head_key not in self._alarmed and alarms:
                    events.append(StabilityEvent(
                        step, "entropy_collapse", "entropy", value, threshold, layer, head,
                        f"stability alarm at step {step}: entropy collapse in {layer} head {head}: attention "
                        f"entropy {value:.4g} nats < {self.entropy_fraction:g} x its running max {peak:.4g}."))
                self._alarmed.add(head_key)
            else:
                self._alarmed.discard(head_key)
        self.events.extend(events)
        probe_loss = stats.get("stability/probe_loss")
        if probe_loss is not None:
            events = events + self.observe_loss(step, probe_loss, source="probe_loss", alarms=alarms)
        return events

    def lowest_relative_entropy_head(self) -> tuple[str, int, float, float] | None:
        """``(layer, head, entropy, entropy / running max)`` of the head closest to collapse, or None."""
        best = None
        for head_key, value in self.latest_entropy.items():
            peak = self.running_max.get(head_key)
            if peak is None or not math.isfinite(value) or peak <= 0:
                continue
            ratio = value / peak
            if best is None or ratio < best[3]:
                best = (head_key[0], head_key[1], value, ratio)
        return best

    def observe_loss(self, step: int, loss: float, source: str = "train_loss",
                     alarms: bool = True) -> list[StabilityEvent]:
        """Feed one loss value (``source`` keeps separate histories, e.g. ``"train_loss"``, ``"probe_loss"``)."""
        loss = float(loss)
        history = self._losses.setdefault(source, deque(maxlen=self.loss_window))
        events = []
        suspect = self.lowest_relative_entropy_head()
        where = (f" Lowest relative attention entropy: {suspect[0]} head {suspect[1]} ({suspect[2]:.4g} nats, "
                 f"{100 * suspect[3]:.0f}% of its running max).") if suspect else ""
        layer, head = (suspect[0], suspect[1]) if suspect else (None, None)
        if not math.isfinite(loss):
            if alarms:
                events.append(StabilityEvent(step, "non_finite_loss", source, loss, None, layer, head,
                                             f"stability alarm at step {step}: {source} is {loss}.{where}"))
        else:
            if self.loss_spike_factor is not None and len(history) >= self.min_loss_history:
                median = statistics.median(history)
                threshold = self.loss_spike_factor * median
                if median > 0 and loss > threshold and alarms:
                    events.append(StabilityEvent(
                        step, "loss_spike", source, loss, threshold, layer, head,
                        f"stability alarm at step {step}: {source} spike {loss:.4g} > {self.loss_spike_factor:g} x "
                        f"running median {median:.4g}.{where}"))
            history.append(loss)
        self.events.extend(events)
        return events
