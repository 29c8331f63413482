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

Prediction = Literal["eps", "v"]


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


def prediction_loss(denoised: torch.Tensor, latent: torch.Tensor, sigma: torch.Tensor, prediction: Prediction) -> torch.Tensor:
    """Per-sample MSE in the model's own target space (noise for eps models, v for v models).

    ComfyUI returns the denoised estimate (k-diffusion parameterisation, x = latent + sigma*noise).
    For an eps model, eps_pred - noise = (latent - denoised) / sigma; for a v model (sigma_data = 1)
    v_pred - v = (latent - denoised) * sqrt(sigma^2 + 1) / sigma. So both are the MSE on the
    denoised latent, weighted per timestep; regressing the denoised latent unweighted (as
    ComfyUI's own LoRA trainer does) would train a different objective.
    """
    sigma = sigma.reshape(-1, *([1] * (latent.dim() - 1))).to(denoised.dtype)
    if prediction == "eps":
        scale = 1.0 / sigma
    elif prediction == "v":
        scale = torch.sqrt(sigma * sigma + 1.0) / sigma
    else:
        raise ValueError(f"unknown prediction type {prediction!r}")
    error = (latent.to(denoised.dtype) - denoised) * scale
    return error.pow(2).flatten(1).mean(dim=1)


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
