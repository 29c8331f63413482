"""Training math in plain torch: schedules, timesteps, the diffusion loss, loss tracking.

No ComfyUI import: these are unit-tested on their own and shared by both trainers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

Prediction = Literal["eps", "v", "flow", "x0"]
SigmaScheme = Literal["timesteps", "schedule", "uniform", "logit-normal", "flux-shift"]


# --------------------------------------------------------------------------- learning rate


@dataclass(frozen=True)
class LearningRateSchedule:
    """A piecewise-constant schedule in AUTOMATIC1111's syntax.

    ``"0.005:100, 1e-3:1000, 1e-5"``: 0.005 for steps 1-100, 1e-3 up to step 1000, then 1e-5.
    A plain number is a constant rate.
    """

    pieces: tuple[tuple[float, int | None], ...]

    def rate(self, step: int) -> float:
        """The rate for 1-based ``step``."""
        for value, until in self.pieces:
            if until is None or step <= until:
                return value
        return self.pieces[-1][0]


def parse_learning_rate(text: str | float) -> LearningRateSchedule:
    if isinstance(text, (int, float)):
        text = repr(float(text))
    pieces: list[tuple[float, int | None]] = []
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ValueError("the learning rate is empty: give a number such as 0.005, or a schedule such as '0.005:100, 1e-3'")
    last_until = 0
    for index, part in enumerate(parts):
        value_text, _, until_text = part.partition(":")
        try:
            value = float(value_text)
        except ValueError:
            raise ValueError(f"learning rate '{part}': '{value_text.strip()}' is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"learning rate '{part}': the rate must be a positive number, got {value_text.strip()}")
        until: int | None = None
        if until_text.strip():
            if not re.fullmatch(r"\s*\d+\s*", until_text):
                raise ValueError(f"learning rate '{part}': the step after ':' must be a whole number")
            until = int(until_text)
            if until <= last_until:
                raise ValueError(f"learning rate schedule: steps must increase ('{part}' comes after step {last_until})")
            last_until = until
        elif index != len(parts) - 1:
            raise ValueError(f"learning rate schedule: only the last rate may omit ':step' ('{part}')")
        pieces.append((value, until))
    return LearningRateSchedule(tuple(pieces))


# --------------------------------------------------------------------------- diffusion loss


def sample_timesteps(batch_size: int, generator: torch.Generator, num_timesteps: int = 1000) -> torch.Tensor:
    """Uniform discrete timesteps, as the papers train."""
    return torch.randint(0, num_timesteps, (batch_size,), generator=generator)


def loss_weight(sigma: torch.Tensor, prediction: Prediction, sigma_data: float = 1.0) -> torch.Tensor:
    """w(σ) such that the model's own target error is (latent − denoised)·w(σ).

    ComfyUI returns the denoised estimate D. For an eps model (x = latent + σ·noise) the noise
    error is (latent − D)/σ; for a v model it is (latent − D)·√(σ² + σd²)/(σ·σd) (EDM's λ(σ) is
    its square); for a flow model (x = σ·noise + (1 − σ)·latent, velocity noise − latent) the
    velocity error is (latent − D)/σ; ``x0`` regresses D itself, as ComfyUI's own trainer does.
    """
    if prediction in ("eps", "flow"):
        return 1.0 / sigma
    if prediction == "v":
        if sigma_data == 1.0:
            return torch.sqrt(sigma * sigma + 1.0) / sigma
        return torch.sqrt(sigma * sigma + sigma_data * sigma_data) / (sigma * sigma_data)
    if prediction == "x0":
        return torch.ones_like(sigma)
    raise ValueError(f"unknown prediction type {prediction!r}")


def prediction_loss(
    denoised: torch.Tensor, latent: torch.Tensor, sigma: torch.Tensor, prediction: Prediction, sigma_data: float = 1.0
) -> torch.Tensor:
    """Per-sample MSE in the model's own target space (noise, v, velocity, or the clean latent).

    Every target error is the error of the denoised latent scaled per sample (``loss_weight``),
    so one formula serves each objective; regressing the denoised latent unweighted (as
    ComfyUI's own LoRA trainer does, ``x0``) weights noisy steps by σ² less than the papers.
    """
    sigma = sigma.reshape(-1, *([1] * (latent.dim() - 1))).to(denoised.dtype)
    scale = loss_weight(sigma, prediction, sigma_data)
    error = (latent.to(denoised.dtype) - denoised) * scale
    return error.pow(2).flatten(1).mean(dim=1)


# --------------------------------------------------------------------------- noise levels

# Flow sigmas stay inside (0, 1): the velocity error divides by σ.
FLOW_SIGMA_FLOOR = 1e-3


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift s·t / (1 + (s − 1)·t); Flux's μ is the shift s = e^μ."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def flux_resolution_mu(image_tokens: int, base: tuple[int, float] = (256, 0.5), top: tuple[int, float] = (4096, 1.15)) -> float:
    """Flux's μ for an image of ``image_tokens`` packed 2×2 latent patches: linear from 0.5 at
    256 tokens to 1.15 at 4096 (what BFL sample with, and kohya's ``flux_shift`` trains with)."""
    slope = (top[1] - base[1]) / (top[0] - base[0])
    return base[1] + slope * (image_tokens - base[0])


@dataclass(frozen=True)
class SigmaSampler:
    """Draws the noise level of each training sample.

    ``timesteps``: uniform integer timesteps (discrete-schedule models: SD1.x, SD2.x, SDXL), which
    the model's own schedule turns into sigmas. The others give sigmas directly:
    ``schedule``: uniform through ``table``, the model's own sigma schedule from high noise to low
    (as patched: a shift node, a continuous EDM/V schedule), interpolated;
    ``uniform``: σ ~ U(0, 1); ``logit-normal``: σ = sigmoid(N(0, 1)) (SD3's paper);
    ``flux-shift``: logit-normal, then shifted by ``shift`` (e^μ for Flux's resolution μ).
    ``sigma_range`` keeps flow sigmas in [lo, hi] (one expert of a two-expert model) by scaling.
    """

    scheme: SigmaScheme
    table: torch.Tensor | None = None
    shift: float = 1.0
    sigma_range: tuple[float, float] = (0.0, 1.0)

    @property
    def discrete(self) -> bool:
        return self.scheme == "timesteps"

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        if self.scheme == "timesteps":
            size = 1000 if self.table is None else int(self.table.shape[0])
            lo, hi = self._index_range(size)
            return (
                torch.randint(lo, hi, (count,), generator=generator) if (lo, hi) != (0, size) else sample_timesteps(count, generator, size)
            )
        if self.scheme == "schedule":
            if self.table is None:
                raise ValueError("the 'schedule' noise levels need the model's sigma table")
            u = torch.rand(count, generator=generator, dtype=torch.float64)
            sigmas = _interpolate(self.table.to(torch.float64), u * (self.table.shape[0] - 1))
            return self._in_range(sigmas, flow=False)
        if self.scheme == "uniform":
            t = torch.rand(count, generator=generator, dtype=torch.float64)
        elif self.scheme in ("logit-normal", "flux-shift"):
            t = torch.sigmoid(torch.randn(count, generator=generator, dtype=torch.float64))
            if self.scheme == "flux-shift":
                t = time_shift(t, self.shift)
        else:
            raise ValueError(f"unknown noise-level scheme {self.scheme!r}")
        return self._in_range(t, flow=True)

    def _index_range(self, size: int) -> tuple[int, int]:
        lo, hi = self.sigma_range
        if self.table is None or (lo, hi) == (0.0, 1.0):
            return 0, size
        inside = torch.nonzero((self.table >= lo) & (self.table <= hi)).flatten()
        if inside.numel() == 0:
            raise ValueError(f"no timestep of this model's schedule has a sigma in [{lo}, {hi}]")
        return int(inside[0]), int(inside[-1]) + 1

    def _in_range(self, sigmas: torch.Tensor, flow: bool) -> torch.Tensor:
        lo, hi = self.sigma_range
        if (lo, hi) != (0.0, 1.0):
            sigmas = lo + (hi - lo) * sigmas if flow else sigmas.clamp(lo, hi)
        if flow:
            sigmas = sigmas.clamp(FLOW_SIGMA_FLOOR, 1.0)
        return sigmas.to(torch.float32)


def _interpolate(table: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    low = position.floor().long().clamp(0, table.shape[0] - 1)
    high = (low + 1).clamp(max=table.shape[0] - 1)
    weight = position - low
    return table[low] * (1 - weight) + table[high] * weight


def repeat_to_common_length(conds: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack [1, T_i, D] conditionings whose token counts differ (prompts past 77 tokens).

    Repeating each to the least common multiple of the lengths is what ComfyUI's sampler
    does for cross-attention conditioning; attention over a repeated sequence is unchanged.
    """
    lengths = [c.shape[1] for c in conds]
    common = math.lcm(*lengths)
    return torch.cat([c.repeat(1, common // c.shape[1], 1) for c in conds], dim=0)


# --------------------------------------------------------------------------- init vectors


def init_vector_groups(num_tokens: int, num_vectors: int) -> list[list[int]]:
    """Which init-text tokens each new vector starts from.

    As many tokens as vectors: one each. Fewer tokens: they repeat in order. More tokens:
    consecutive tokens are averaged, so "a fluffy orange cat" still fits in 2 vectors.
    """
    if num_tokens < 1 or num_vectors < 1:
        raise ValueError("need at least one init token and one vector")
    if num_tokens <= num_vectors:
        return [[i % num_tokens] for i in range(num_vectors)]
    bounds = [round(i * num_tokens / num_vectors) for i in range(num_vectors + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(num_vectors)]


# --------------------------------------------------------------------------- loss tracking


@dataclass
class LossTracker:
    """Raw and exponentially smoothed loss per step, for progress and the loss curve."""

    smoothing: float = 0.9
    steps: list[int] = field(default_factory=list)
    raw: dict[str, list[float]] = field(default_factory=dict)
    smoothed: dict[str, list[float]] = field(default_factory=dict)

    def add(self, step: int, losses: dict[str, float]) -> None:
        self.steps.append(step)
        for name, value in losses.items():
            raw = self.raw.setdefault(name, [])
            smooth = self.smoothed.setdefault(name, [])
            raw.append(value)
            # Bias-corrected EMA: the first values are not dragged towards zero.
            count = len(raw)
            previous = smooth[-1] * (1 - self.smoothing ** (count - 1)) if smooth else 0.0
            ema = self.smoothing * previous + (1 - self.smoothing) * value
            smooth.append(ema / (1 - self.smoothing**count))

    def last(self, name: str = "loss") -> tuple[float | None, float | None]:
        if not self.raw.get(name):
            return None, None
        return self.raw[name][-1], self.smoothed[name][-1]
