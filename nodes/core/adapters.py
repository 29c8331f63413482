"""LoRA adapters in plain torch, and their file layout.

No ComfyUI import. A ``LoraPair`` adds ``alpha/rank · up(down(x))`` to a layer's output
(the "bypass" form): the layer's own weight is never formed into ``w + Δw`` nor copied, and
only ``up`` and ``down`` carry gradients. For a linear layer that is ``x @ (up @ down)ᵀ``;
for a convolution ``down`` is a convolution with the layer's kernel size, stride, padding
and dilation and ``up`` a 1×1 convolution, which equals convolving with ``Δw = up @ down``
reshaped to the kernel: the same change a loader applies to the weight.

File layout (kohya / AUTOMATIC1111 / ComfyUI LoraLoader): for a LoRA named ``NAME``,
``NAME.lora_down.weight`` ([rank, in] for a Linear, [rank, in, kh, kw] for a Conv),
``NAME.lora_up.weight`` ([out, rank] or [out, rank, 1, 1]) and ``NAME.alpha`` (a scalar);
the change is ``alpha / rank * up @ down``. Which NAME a weight gets is the bridge's
business (it asks ComfyUI's own key maps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConvGeometry:
    """How a convolution slides its kernel, for the adapter's ``down`` convolution."""

    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int


class LoraPair:
    """``y -> y + alpha/rank · up(down(x))`` for one layer; up starts at zero (no change at step 0)."""

    def __init__(
        self,
        weight_shape: torch.Size | tuple[int, ...],
        rank: int,
        alpha: float,
        *,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ):
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
        """The weight change ``alpha/rank · up @ down``, shaped like the weight (float32)."""
        return (self.up @ self.down).mul(self.scale).reshape(self.shape)

    def bypass(self, x: torch.Tensor, geometry: ConvGeometry | None = None) -> torch.Tensor:
        """The adapter's term for input ``x``, in ``x``'s dtype: add it to the layer's output."""
        down = self.down.to(x.dtype)
        up = self.up.to(x.dtype)
        if geometry is None:
            return F.linear(F.linear(x, down), up) * self.scale
        spatial = len(self.shape) - 2
        conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
        if geometry.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        hidden = conv(x, down.reshape(self.rank, *self.shape[1:]), None, geometry.stride, geometry.padding, geometry.dilation)
        return conv(hidden, up.reshape(self.shape[0], self.rank, *([1] * spatial))) * self.scale

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of this pair under ``name`` in the kohya layout, float32 on the CPU."""
        up = self.up.detach().to("cpu", torch.float32).clone()
        down = self.down.detach().to("cpu", torch.float32).clone()
        if len(self.shape) > 2:  # conv: down carries the kernel, up is a 1x1 conv
            down = down.reshape(self.rank, *self.shape[1:])
            up = up.reshape(self.shape[0], self.rank, *([1] * (len(self.shape) - 2)))
        return {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(self.alpha)}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], name: str) -> None:
        """Continue from a saved pair (``state_dict``'s layout): rank, alpha and both factors."""
        up = tensors[f"{name}.lora_up.weight"].to(torch.float32).flatten(1)
        down = tensors[f"{name}.lora_down.weight"].to(torch.float32).flatten(1)
        if up.shape[0] != self.shape[0] or down.shape[1] != math.prod(self.shape[1:]) or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"{name}: the saved LoRA ({tuple(up.shape)} @ {tuple(down.shape)}) does not fit a weight of shape {self.shape}"
            )
        self.rank = int(down.shape[0])
        alpha = tensors.get(f"{name}.alpha")
        self.alpha = float(alpha) if alpha is not None else float(self.rank)
        with torch.no_grad():
            self.up = torch.nn.Parameter(up.to(self.up.device).contiguous())
            self.down = torch.nn.Parameter(down.to(self.down.device).contiguous())

    def peft_state_dict(self, parts: Sequence[tuple[str, tuple[int, int] | None]]) -> dict[str, torch.Tensor]:
        """The pair in diffusers' PEFT layout (``NAME.lora_A.weight`` / ``NAME.lora_B.weight``, alpha/rank
        baked into B, no ``.alpha`` key), one entry per ``(name, rows)``: a fused weight (ComfyUI's qkv)
        is written as its parts (to_q, to_k, to_v), each with the same A and its rows of B."""
        if len(self.shape) > 2:
            raise ValueError("the PEFT layout here is for linear layers")
        up = self.up.detach().to("cpu", torch.float32) * self.scale
        down = self.down.detach().to("cpu", torch.float32).clone()
        out = {}
        for name, rows in parts:
            part = up if rows is None else up[rows[0] : rows[0] + rows[1]]
            out[f"{name}.lora_A.weight"] = down.clone()
            out[f"{name}.lora_B.weight"] = part.clone().contiguous()
        return out

    def load_peft_state_dict(self, tensors: Mapping[str, torch.Tensor], parts: Sequence[tuple[str, tuple[int, int] | None]]) -> None:
        """Continue from ``peft_state_dict``'s layout (the scale is in B: alpha becomes the rank)."""
        downs = [tensors[f"{name}.lora_A.weight"].to(torch.float32) for name, _ in parts]
        if any(not torch.equal(d, downs[0]) for d in downs[1:]):
            raise ValueError(f"{parts[0][0]}: the parts of this fused weight have different A matrices; it was not saved by this pack")
        ordered = sorted(parts, key=lambda part: 0 if part[1] is None else part[1][0])
        up = torch.cat([tensors[f"{name}.lora_B.weight"].to(torch.float32) for name, _ in ordered])
        down = downs[0]
        if up.shape[0] != self.shape[0] or down.shape[1] != math.prod(self.shape[1:]) or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"{parts[0][0]}: the saved LoRA ({tuple(up.shape)} @ {tuple(down.shape)}) does not fit a weight of shape {self.shape}"
            )
        self.rank = int(down.shape[0])
        self.alpha = float(self.rank)
        with torch.no_grad():
            self.up = torch.nn.Parameter(up.to(self.up.device).contiguous())
            self.down = torch.nn.Parameter(down.to(self.down.device).contiguous())


def lora_file_tensors(pairs: Mapping[str, LoraPair]) -> dict[str, torch.Tensor]:
    """All pairs' tensors, by LoRA name."""
    tensors: dict[str, torch.Tensor] = {}
    for name, pair in pairs.items():
        tensors.update(pair.state_dict(name))
    return tensors
