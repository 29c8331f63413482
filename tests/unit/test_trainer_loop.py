"""The trainer skeleton (nodes/core/trainer.py): cancel before every step, progress after it,
previews and periodic saves when due, the last save kept on cancel, error and divergence."""

from __future__ import annotations

import math

import pytest
import torch
from core_package import core

trainer = core("trainer")
training_math = core("training_math")
images = core("training_images")


class Cancelled(BaseException):  # ComfyUI's interrupt is a BaseException since v0.2x
    pass


class Host:
    def __init__(self, cancel_at: int | None = None):
        self.cancel_at = cancel_at
        self.checked = 0
        self.reports: list[tuple] = []
        self.finished: list[tuple] = []

    def check_cancelled(self):
        self.checked += 1
        if self.cancel_at is not None and self.checked == self.cancel_at:
            raise Cancelled()

    def is_cancel(self, error):
        return isinstance(error, Cancelled)

    def report(self, step, losses, smoothed, preview=None):
        self.reports.append((step, dict(losses), preview))

    def finish(self, step, status, losses=None, smoothed=None):
        self.finished.append((step, status))


class Steps:
    def __init__(self, losses=None):
        self.losses = losses or {}
        self.steps, self.saves, self.previews = [], [], 0

    def step(self, step):
        self.steps.append(step)
        return {"loss": self.losses.get(step, 1.0 / step)}

    def preview(self):
        self.previews += 1
        return f"preview {self.previews}"

    def save(self, step):
        self.saves.append(step)


def test_steps_previews_and_periodic_saves():
    steps, host, tracker = Steps(), Host(), training_math.LossTracker()
    trainer.run_training(steps, trainer.LoopPlan(steps=5, start_step=10, save_every=2, preview_every=2), host, tracker)
    assert steps.steps == [11, 12, 13, 14, 15], "steps count on from a resumed run"
    assert steps.saves == [12, 14], "periodic saves, none at the end (the trainer saves its final result)"
    assert [r[2] for r in host.reports] == [None, "preview 1", None, "preview 2", "preview 3"], "every 2 steps and at the end"
    assert [r[0] for r in host.reports] == [1, 2, 3, 4, 5] and host.checked == 5 and host.finished == []
    trainer.report_done(host, tracker, 5)
    assert host.finished == [(5, "done")]


def test_cancel_stops_before_the_next_step_and_keeps_the_last_save():
    steps, host = Steps(), Host(cancel_at=4)
    with pytest.raises(Cancelled):
        trainer.run_training(steps, trainer.LoopPlan(steps=6, save_every=2), host, training_math.LossTracker())
    assert steps.steps == [1, 2, 3] and steps.saves == [2] and host.finished == [(3, "cancelled")]


def test_an_error_is_reported_as_such():
    class Failing(Steps):
        def step(self, step):
            raise RuntimeError("out of memory")

    host = Host()
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.run_training(Failing(), trainer.LoopPlan(steps=3), host, training_math.LossTracker())
    assert host.finished == [(0, "error")]


def test_a_loss_that_is_no_longer_finite_stops_the_run_and_saves_nothing_more():
    steps, host = Steps({3: math.nan}), Host()
    with pytest.raises(trainer.TrainingDiverged, match=r"diverged at step 3.*Lower the learning rate; the last periodic save is kept"):
        trainer.run_training(steps, trainer.LoopPlan(steps=6, save_every=2), host, training_math.LossTracker())
    assert steps.saves == [2] and host.finished == [(2, "error")]


def test_common_settings_are_checked_before_any_work():
    good = images.TrainingImageSet.from_image_batch(torch.rand(2, 8, 8, 3))
    for changes, message in [
        ({"steps": 0}, "steps must be at least 1"),
        ({"batch_size": 0}, "at least 1"),
        ({"resolution": 100}, "multiple of 64"),
        ({"save_every": -1}, "save every"),
        ({"preview_every": -2}, "preview every"),
    ]:
        with pytest.raises(ValueError, match=message):
            trainer.validate_common(trainer.TrainingSettings(**changes), good, "training images")
    with pytest.raises(ValueError, match="no instance images"):
        trainer.validate_common(trainer.TrainingSettings(), None, "instance images")


def test_batches_draw_from_their_own_streams():
    buckets = [[trainer.LatentSample(torch.full((4, 2, 2), float(i)), None, f"c{i}") for i in range(3)]]
    a, b = trainer.BatchSampler(buckets, 5, 2, "cpu"), trainer.BatchSampler(buckets, 5, 2, "cpu")
    other = trainer.BatchSampler(buckets, 6, 2, "cpu")
    first = a.draw()
    other.draw()  # another sampler drawing in between changes nothing
    second = b.draw()
    assert torch.equal(first.latents, second.latents) and torch.equal(first.noise, second.noise)
    assert first.latents.shape == (2, 4, 2, 2) and first.timesteps.shape == (2,) and len(first.captions) == 2
