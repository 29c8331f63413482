"""The loss-curve IMAGE the training nodes output. Pillow only."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from PIL import Image, ImageDraw

COLOURS = ((66, 135, 245), (245, 130, 48), (60, 180, 75), (220, 50, 120))


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def draw_loss_curve(
    steps: Sequence[int],
    raw: Mapping[str, Sequence[float]],
    smoothed: Mapping[str, Sequence[float]],
    title: str = "training loss",
    size: tuple[int, int] = (768, 384),
) -> torch.Tensor:
    """A [1, H, W, 3] float image: raw losses faint, smoothed bold, one colour per series."""
    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 16, 28, height - 36
    draw.rectangle([left, top, right, bottom], outline=(180, 180, 180))
    draw.text((left, 8), title, fill=(0, 0, 0))

    values = [v for series in raw.values() for v in _finite(series)]
    if not steps or not values:
        draw.text((left + 10, (top + bottom) // 2), "no steps trained", fill=(0, 0, 0))
        return _to_tensor(image)

    # Diffusion losses span decades across timesteps: a log axis keeps the trend readable.
    positive = [v for v in values if v > 0]
    log_scale = bool(positive) and len(positive) == len(values) and max(positive) / min(positive) > 20
    transform = (lambda v: math.log10(v)) if log_scale else (lambda v: v)
    low, high = min(map(transform, values)), max(map(transform, values))
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    first, last = steps[0], steps[-1] if steps[-1] != steps[0] else steps[0] + 1

    def point(step: float, value: float) -> tuple[float, float]:
        x = left + (step - first) / (last - first) * (right - left)
        y = bottom - (transform(value) - low) / (high - low) * (bottom - top)
        return x, y

    for index, name in enumerate(raw):
        colour = COLOURS[index % len(COLOURS)]
        faint = tuple(c + (255 - c) * 2 // 3 for c in colour)
        raw_points = [
            point(s, v) for s, v in zip(steps, raw[name], strict=False) if v is not None and math.isfinite(v) and (v > 0 or not log_scale)
        ]
        if len(raw_points) > 1:
            draw.line(raw_points, fill=faint, width=1)
        smooth_points = [
            point(s, v) for s, v in zip(steps, smoothed.get(name, []), strict=False) if math.isfinite(v) and (v > 0 or not log_scale)
        ]
        if len(smooth_points) > 1:
            draw.line(smooth_points, fill=colour, width=2)
        draw.text((right - 140, top + 6 + 14 * index), f"{name} (smoothed)", fill=colour)

    label = (lambda v: f"{10**v:.3g}") if log_scale else (lambda v: f"{v:.3g}")
    draw.text((4, top), label(high), fill=(0, 0, 0))
    draw.text((4, bottom - 10), label(low), fill=(0, 0, 0))
    draw.text((left, bottom + 6), f"step {first}", fill=(0, 0, 0))
    draw.text((right - 80, bottom + 6), f"step {steps[-1]}", fill=(0, 0, 0))
    if log_scale:
        draw.text((left + 4, bottom - 14), "log scale", fill=(120, 120, 120))
    return _to_tensor(image)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.reshape(image.height, image.width, 3).to(torch.float32).div(255.0).unsqueeze(0)
