"""Progress and Cancel: ComfyUI's progress bar, the live ``personalize.training`` messages for web/,
and ComfyUI's interrupt flag, as the training loop's host (``core.trainer.TrainingHost``)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import comfy.model_management
import comfy.utils

PROGRESS_EVENT = "personalize.training"
Cancelled = comfy.model_management.InterruptProcessingException


def raise_if_cancelled() -> None:
    """Honour ComfyUI's Cancel button; raises its InterruptProcessingException."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def _json_number(value: Any) -> float | None:
    # json.dumps writes NaN/Infinity as bare words, which browsers refuse as JSON.
    return float(value) if value is not None and math.isfinite(float(value)) else None


class ComfyProgress:
    """The training loop's host inside ComfyUI: the node's progress bar (with previews), live loss
    messages to the front end (``web/personalize_progress.js``), and ComfyUI's Cancel."""

    def __init__(self, total: int, node_id: str | None, kind: str, min_interval_s: float = 0.25):
        self.total = total
        self.node_id = node_id
        self.kind = kind
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.min_interval_s = min_interval_s
        self._started = time.monotonic()
        self._last_sent = -1e9
        self._pending_points: list[list[float | None]] = []

    def check_cancelled(self) -> None:
        raise_if_cancelled()

    def is_cancel(self, error: BaseException) -> bool:
        return isinstance(error, Cancelled)

    def _send(self, payload: dict[str, Any]) -> None:
        if self.node_id is None:
            return
        try:
            from server import PromptServer
        except ImportError:  # headless: no server to tell
            return
        instance = getattr(PromptServer, "instance", None)
        if instance is None:
            return
        instance.send_sync(PROGRESS_EVENT, payload, instance.client_id)

    def report(
        self, step: int, losses: Mapping[str, float], smoothed: Mapping[str, float], preview: Any = None, status: str = "running"
    ) -> None:
        self.bar.update_absolute(step, self.total, preview)
        main = "loss" if "loss" in smoothed else next(iter(smoothed), None)
        if main is not None and status == "running":
            self._pending_points.append([step, _json_number(smoothed[main])])
        now = time.monotonic()
        if status == "running" and now - self._last_sent < self.min_interval_s and step < self.total:
            return
        elapsed = now - self._started
        self._last_sent = now
        self._send(
            {
                "node": str(self.node_id),
                "kind": self.kind,
                "status": status,
                "step": step,
                "total": self.total,
                "loss": _json_number(losses.get(main)) if main is not None else None,
                "loss_smoothed": _json_number(smoothed.get(main)) if main is not None else None,
                "losses": {k: _json_number(v) for k, v in smoothed.items()},
                "elapsed_s": elapsed,
                "eta_s": elapsed / step * (self.total - step) if step > 0 else None,
                "points": self._pending_points,
            }
        )
        self._pending_points = []

    def finish(
        self, step: int, status: str, losses: Mapping[str, float] | None = None, smoothed: Mapping[str, float] | None = None
    ) -> None:
        self._last_sent = -1e9
        self.report(step, losses or {}, smoothed or {}, status=status)
