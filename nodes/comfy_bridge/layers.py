"""ComfyUI's weight layers (``comfy.ops``): which modules they are, and the weights they compute with."""

from __future__ import annotations

import comfy.ops
import torch


def is_cast_layer(module: torch.nn.Module) -> bool:
    """One of ComfyUI's cast layers (``comfy.ops``): its weights go through ComfyUI's cast step."""
    return hasattr(module, "weight_function") and hasattr(module, "bias_function")


def cast(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) ``module`` computes with for inputs of ``dtype`` on ``device``.

    ComfyUI's own cast step: patches the model carries (a LoRA loaded before training, applied on
    the fly under partial loading or DynamicVRAM), weights offloaded or streamed from another
    device, fp8 storage and quantized layers all give what ComfyUI's forward would use. The
    two-value form of ``cast_bias_weight`` is the one every ComfyUI since 2024 has.
    """
    weight, bias = comfy.ops.cast_bias_weight(module, dtype=dtype, device=device, bias_dtype=dtype)
    return weight, bias
