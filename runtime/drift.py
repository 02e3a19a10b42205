"""Drift: the line changes (new material, a cleaned lens, ageing lamps) and healthy scores creep up.

``DriftMonitor`` keeps a rolling window of the latest verdicts and warns when the median score of
the photos that passed rises above the calibration's healthy range (its ``drift_percentile``), or
when the share flagged runs ``drift_flag_factor`` times above the false alarms the threshold
expects. Each warning is raised once when the window enters that state, as an event record (the
watcher appends it to its JSON lines, the service logs it), and stays in ``status()`` while it lasts.
The window holds only verdicts scored by one model: it starts again when the model changes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import numpy as np

from models.patchcore import PatchCore


def expected_false_alarm_rate(model: PatchCore) -> float:
    """The share of healthy photos the calibrated threshold flags by design: the rate its promise states, which
    is more than the one asked for when the calibration set is too small to hold that (models.calibration)."""
    stated = model.calibration.get("false_alarms_per_1000")
    return model.config.false_alarm_rate if stated is None else stated / 1000


class DriftMonitor:
    """Rolling window of one model's verdicts; thread-safe (the scorer observes, a web request reads)."""

    def __init__(self, model: PatchCore) -> None:
        self._lock = threading.Lock()
        self.reset(model)

    def reset(self, model: PatchCore) -> None:
        """Start a new window for ``model`` (a new model scores on another scale)."""
        window = model.config.drift_window
        with self._lock:
            self.window = window
            self.healthy_limit = float(np.percentile(model.calibration_scores, model.config.drift_percentile))
            self.percentile = model.config.drift_percentile
            self.expected_rate = expected_false_alarm_rate(model)
            self.flag_limit = model.config.drift_flag_factor * self.expected_rate
            self._flags: deque[bool] = deque(maxlen=window)
            self._passed: deque[float] = deque(maxlen=window)
            self._active: dict[str, str] = {}  # kind -> warning, while it lasts

    def observe(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """Take one scoring record; the drift events it raises (none for an error record)."""
        if "error" in record:
            return []
        with self._lock:
            self._flags.append(bool(record["is_anomalous"]))
            if not record["is_anomalous"]:
                self._passed.append(float(record["score"]))
            found = self._warnings()
            events = [self._event(kind, warning) for kind, warning in found.items() if kind not in self._active]
            self._active = found
        return events

    def status(self) -> dict[str, Any]:
        """What /health shows: the window's figures, the healthy range and any warning in force."""
        with self._lock:
            return {
                "drift": bool(self._active),
                "warnings": list(self._active.values()),
                "photos": len(self._flags),
                "window": self.window,
                "median_passed_score": float(np.median(self._passed)) if self._passed else None,
                "healthy_limit": self.healthy_limit,
                "flagged_share": float(np.mean(self._flags)) if self._flags else None,
                "expected_false_alarm_rate": self.expected_rate,
            }

    def _warnings(self) -> dict[str, str]:
        """The warnings the window gives now: judged only on a full window, so a few photos never raise one."""
        found = {}
        if len(self._passed) == self.window and (median := float(np.median(self._passed))) > self.healthy_limit:
            found["scores"] = (
                f"drift: the median score of the last {self.window} passed photos, {median:.3f}, is above "
                f"the {self.percentile:g}th percentile of the healthy calibration scores ({self.healthy_limit:.3f}); "
                "the line may have changed (material, lens, light): confirm good parts so the model learns "
                "them (train.py --add-good, POST /feedback) or refit"
            )
        if len(self._flags) == self.window and (share := float(np.mean(self._flags))) > self.flag_limit:
            found["flagged"] = (
                f"drift: {sum(self._flags)} of the last {self.window} photos flagged ({share:.1%}), over "
                f"{self.flag_limit:.1%}, {self.flag_limit / self.expected_rate:g} x the {self.expected_rate:.1%} "
                "false alarms the threshold expects"
            )
        return found

    def _event(self, kind: str, warning: str) -> dict[str, Any]:
        return {
            "event": "drift",
            "kind": kind,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "warning": warning,
            "window": self.window,
            "median_passed_score": float(np.median(self._passed)) if self._passed else None,
            "healthy_limit": self.healthy_limit,
            "flagged_share": float(np.mean(self._flags)),
        }
