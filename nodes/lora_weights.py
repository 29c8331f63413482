"""Trainable weight changes in plain torch: LoRA pairs and full deltas, and their file layout.

No ComfyUI import. Each object here is a *weight wrapper*: called with a layer's weight (the
fresh copy ComfyUI's cast step hands to wrappers) it returns the changed weight, so the
layer's module and its stored weight are never touched.

File layout (kohya / AUTOMATIC1111 / ComfyUI LoraLoader): for a LoRA named ``NAME``,
``NAME.lora_down.weight`` ([rank, in] for a Linear, [rank, in, kh, kw] for a Conv),
``NAME.lora_up.weight`` ([out, rank] or [out, rank, 1, 1]) and ``NAME.alpha`` (a scalar);
the change is ``alpha / rank * up @ down``. Which NAME a weight gets is the adapter's
business (it asks ComfyUI's own key maps).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch


class LoraPair:
    """``w -> w + alpha/rank * up @ down`` for one weight; up starts at zero (no change at step 0)."""

    def __init__(self, weight_shape: torch.Size | tuple[int, ...], rank: int, alpha: float, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None):
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1 (got {rank})")
        if len(weight_shape) < 2:
            raise ValueError(f"LoRA needs a matrix or conv kernel, got a weight of shape {tuple(weight_shape)}")
        self.shape = tuple(int(s) for s in weight_shape)
        self.rank = int(rank)
        self.alpha = float(alpha)
        out_dim, in_dim = self.shape[0], math.prod(self.shape[1:])
        down = torch.empty(self.rank, in_dim, dtype=torch.float32)
        # nn.Linear's default (Kaiming-uniform, a = sqrt(5)): bound = 1 / sqrt(fan_in).
        bound = 1.0 / math.sqrt(in_dim)
        down.uniform_(-bound, bound, generator=generator)
        self.down = torch.nn.Parameter(down.to(device))
        self.up = torch.nn.Parameter(torch.zeros(out_dim, self.rank, dtype=torch.float32, device=device))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.up, self.down]

    def delta(self) -> torch.Tensor:
        return (self.up @ self.down).mul(self.scale).reshape(self.shape)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.device, weight.dtype)

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of this pair under ``name`` in the kohya layout, float32 on the CPU."""
        up = self.up.detach().to("cpu", torch.float32).clone()
        down = self.down.detach().to("cpu", torch.float32).clone()
        if len(self.shape) > 2:  # conv: down carries the kernel, up is a 1x1 conv
            down = down.reshape(self.rank, *self.shape[1:])
            up = up.reshape(self.shape[0], self.rank, *([1] * (len(self.shape) - 2)))
        return {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(self.alpha)}


class WeightDelta:
    """``w -> w + delta`` with a float32 delta that starts at zero: full fine-tuning of one weight."""

    def __init__(self, weight_shape: torch.Size | tuple[int, ...], *, device: torch.device | str = "cpu"):
        self.delta = torch.nn.Parameter(torch.zeros(tuple(weight_shape), dtype=torch.float32, device=device))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.delta]

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta.to(weight.device, weight.dtype)


def lora_file_tensors(pairs: Mapping[str, LoraPair]) -> dict[str, torch.Tensor]:
    """All pairs' tensors, by LoRA name."""
    tensors: dict[str, torch.Tensor] = {}
    for name, pair in pairs.items():
        tensors.update(pair.state_dict(name))
    return tensors


def lora_delta_from_tensors(tensors: Mapping[str, torch.Tensor], name: str, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """The change a LoRA file makes to one weight (float32), as a loader computes it."""
    up = tensors[f"{name}.lora_up.weight"].to(torch.float32).flatten(1)
    down = tensors[f"{name}.lora_down.weight"].to(torch.float32).flatten(1)
    alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(down.shape[0])
    return (up @ down).mul(alpha / down.shape[0]).reshape(weight_shape)
