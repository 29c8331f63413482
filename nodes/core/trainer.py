"""The trainer skeleton both trainers (and the multi-process workers) run.

validate → prepare (latents cached once) → loop (cancel, step, progress, preview, periodic save)
→ finish. A trainer supplies its step, preview and save; the host (ComfyUI's node, or a headless
worker) supplies cancel and progress. No ComfyUI import.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from .training_images import TrainingImageSet, group_into_buckets
from .training_math import LossTracker, SigmaSampler, parse_learning_rate

ResizeMode = Literal["crop", "resize", "pad"]


@dataclass
class TrainingSettings:
    """What every trainer has; each trainer's settings add their own (and their own defaults)."""

    steps: int = 1000
    learning_rate: str = "auto"
    batch_size: int = 1
    gradient_accumulation: int = 1
    seed: int = 0
    resolution: int = 512
    resize_mode: ResizeMode = "crop"
    bucketing: bool = True
    flip: bool = False
    save_every: int = 0
    file_name: str = ""
    overwrite: bool = False
    save: bool = True
    preview_every: int = 0
    preview_prompt: str = ""
    precision: str = "auto"


def validate_common(settings: TrainingSettings, images: TrainingImageSet | None, what_images: str) -> None:
    """The checks every trainer makes before any work; ``what_images`` says which images are missing."""
    if images is None or len(images) == 0:
        raise ValueError(f"no {what_images}: connect an IMAGE batch or an Image Folder (training) node")
    if settings.steps < 1:
        raise ValueError(f"steps must be at least 1 (got {settings.steps})")
    if settings.batch_size < 1 or settings.gradient_accumulation < 1:
        raise ValueError("batch size and gradient accumulation must be at least 1")
    if settings.resolution < 64 or settings.resolution % 64:
        raise ValueError(f"resolution must be a multiple of 64 (got {settings.resolution})")
    if settings.save_every < 0:
        raise ValueError("save every must be 0 (only at the end) or a number of steps")
    if settings.preview_every < 0:
        raise ValueError(f"preview every must be 0 (off) or a number of steps (got {settings.preview_every})")


def learning_rate(text: str | float, auto: float, what: str = "learning rate"):
    """A schedule from the user's text; ``auto`` (or empty) is the given default."""
    text = str(text).strip()
    if text.lower() in ("", "auto"):
        return parse_learning_rate(auto)
    try:
        return parse_learning_rate(text)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


# --------------------------------------------------------------------------- latents and batches


@dataclass
class LatentSample:
    latent: torch.Tensor  # [C, h, w], the model's training space
    flipped: torch.Tensor | None  # the mirror image's latent, when flipping
    caption: str | None


def encode_buckets(
    images: TrainingImageSet, settings: TrainingSettings, encode: Callable[[torch.Tensor], torch.Tensor], chunk: int = 4
) -> list[list[LatentSample]]:
    """Each image (and its mirror image) encoded once by ``encode`` ([B,H,W,3] pixels -> latents), by aspect bucket."""
    buckets = []
    for _size, pixels, captions in group_into_buckets(images, settings.resolution, settings.resize_mode, settings.bucketing):
        with torch.no_grad():
            latents = torch.cat([encode(pixels[i : i + chunk]) for i in range(0, pixels.shape[0], chunk)])
            flipped = None
            if settings.flip:
                mirrored = pixels.flip(2)
                flipped = torch.cat([encode(mirrored[i : i + chunk]) for i in range(0, mirrored.shape[0], chunk)])
        buckets.append([LatentSample(latents[i], None if flipped is None else flipped[i], captions[i]) for i in range(latents.shape[0])])
    return buckets


@dataclass
class Batch:
    latents: torch.Tensor  # [B, C, h, w] on the training device
    noise: torch.Tensor
    timesteps: torch.Tensor  # [B] noise levels: integer timesteps (discrete-schedule models) or sigmas
    captions: list[str | None]


class BatchSampler:
    """Random batches from latent buckets, with random streams of their own.

    A bucket is picked in proportion to its size, then ``batch_size`` samples from it (the
    mirror image half the time when there is one), then noise and noise levels (``noise_levels``;
    uniform integer timesteps by default). Two samplers with their own seeds never disturb each
    other's streams (DreamBooth's instance and class sets).
    """

    def __init__(
        self,
        buckets: Sequence[Sequence[LatentSample]],
        seed: int,
        batch_size: int,
        device: torch.device | str,
        noise_levels: SigmaSampler | None = None,
    ):
        if not buckets or not all(buckets):
            raise ValueError("no latents to draw batches from")
        self.buckets = buckets
        self.weights = [len(b) for b in buckets]
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size
        self.device = device
        self.noise_levels = noise_levels or SigmaSampler("timesteps")

    def draw(self) -> Batch:
        bucket = self.buckets[self.rng.choices(range(len(self.buckets)), weights=self.weights)[0]]
        picks = [bucket[self.rng.randrange(len(bucket))] for _ in range(self.batch_size)]
        latents = torch.stack([p.flipped if p.flipped is not None and self.rng.random() < 0.5 else p.latent for p in picks]).to(self.device)
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        return Batch(latents, noise, self.noise_levels.draw(latents.shape[0], self.generator), [p.caption for p in picks])


# --------------------------------------------------------------------------- the loop


class TrainingHost(Protocol):
    """Where the loop runs: ComfyUI's node, or a headless worker."""

    def check_cancelled(self) -> None:
        """Raise the host's cancel exception if the user asked to stop."""

    def is_cancel(self, error: BaseException) -> bool: ...

    def report(self, step: int, losses: dict[str, float], smoothed: dict[str, float], preview: Any = None) -> None: ...

    def finish(self, step: int, status: str, losses: dict[str, float] | None = None, smoothed: dict[str, float] | None = None) -> None: ...


class StepTrainer(Protocol):
    """What a trainer supplies to the loop."""

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step (``step`` counts from 1 across resumed runs); the losses by name, 'loss' the total."""

    def preview(self) -> Any:
        """A preview of what has been learnt so far (the host's preview payload)."""

    def save(self, step: int) -> None:
        """A complete save of the training so far, as at ``step``."""


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class LoopPlan:
    steps: int  # steps this run
    start_step: int = 0  # steps trained before (a resumed run)
    save_every: int = 0
    preview_every: int = 0


def run_training(trainer: StepTrainer, plan: LoopPlan, host: TrainingHost, tracker: LossTracker) -> None:
    """Train ``plan.steps`` steps: cancel checked before every step, progress after it, previews
    and periodic saves when due. Cancel and errors end with the host told and the last save kept;
    a loss that stops being finite stops the run with a clear error (and writes nothing)."""
    done = 0
    try:
        for done in range(1, plan.steps + 1):
            host.check_cancelled()
            step = plan.start_step + done
            losses = trainer.step(step)
            if not all(math.isfinite(v) for v in losses.values()):
                kept = "; the last periodic save is kept" if plan.save_every and done > plan.save_every else ""
                raise TrainingDiverged(
                    f"training diverged at step {step}: the loss became {losses.get('loss')}. Lower the learning rate{kept}"
                )
            tracker.add(step, losses)
            smoothed = {k: tracker.smoothed[k][-1] for k in losses}
            preview = None
            if plan.preview_every and (done % plan.preview_every == 0 or done == plan.steps):
                preview = trainer.preview()
            host.report(done, losses, smoothed, preview)
            if plan.save_every and done % plan.save_every == 0 and done < plan.steps:
                trainer.save(step)
    except BaseException as error:
        host.finish(done - 1, "cancelled" if host.is_cancel(error) else "error")
        raise


def report_done(host: TrainingHost, tracker: LossTracker, steps: int) -> None:
    """Tell the host the run finished (after the final save), with the last losses."""
    last = {k: v[-1] for k, v in tracker.raw.items()}
    host.finish(steps, "done", last or None, {k: v[-1] for k, v in tracker.smoothed.items()} or None)
