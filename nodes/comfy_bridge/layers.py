"""ComfyUI's weight layers (``comfy.ops``): which modules they are, and the weights they compute with."""

from __future__ import annotations

import inspect

import comfy.ops
import torch

# ComfyUI v0.28+ asks custom nodes for the offloadable form of its cast, with a matching
# uncast_bias_weight after the last use: under DynamicVRAM the uncast unpins the streamed
# weight's pages (the legacy form pins them for good). Earlier versions have the two-value form.
OFFLOADABLE = "offloadable" in inspect.signature(comfy.ops.cast_bias_weight).parameters and hasattr(comfy.ops, "uncast_bias_weight")

# Weights handed out by ``borrow`` and not yet released: id of the tensor handed out -> what uncast needs.
_BORROWED: dict[int, tuple[torch.Tensor, torch.Tensor | None, object]] = {}


def is_cast_layer(module: torch.nn.Module) -> bool:
    """One of ComfyUI's cast layers (``comfy.ops``): its weights go through ComfyUI's cast step."""
    return hasattr(module, "weight_function") and hasattr(module, "bias_function")


def _plain(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The same memory as a tensor autograd may use: loaded weights are inference tensors, which
    autograd may neither save nor track the version of (seen on CUDA, where a weight already in
    the compute dtype is handed out as it is). No copy is made."""
    if tensor is None or not tensor.is_inference():
        return tensor
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def borrow(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) ``module`` computes with for inputs of ``dtype`` on ``device``, for one
    use: give them back with ``release`` as soon as that use is over.

    ComfyUI's own cast step: patches the model carries (a LoRA loaded before training, applied on
    the fly under partial loading or DynamicVRAM), weights offloaded or streamed from another
    device, fp8 storage and quantized layers all give what ComfyUI's forward would use.
    """
    if not OFFLOADABLE:
        weight, bias = comfy.ops.cast_bias_weight(module, dtype=dtype, device=device, bias_dtype=dtype)
        return _plain(weight), _plain(bias)
    weight, bias, stream = comfy.ops.cast_bias_weight(module, dtype=dtype, device=device, bias_dtype=dtype, offloadable=True)
    handed = _plain(weight)
    _BORROWED[id(handed)] = (weight, bias, stream)
    return handed, _plain(bias)


def release(module: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Give back what ``borrow`` handed out (ComfyUI's uncast: buffers reused, streamed pages unpinned)."""
    entry = _BORROWED.pop(id(weight), None)
    if entry is not None:
        comfy.ops.uncast_bias_weight(module, *entry)


def cast(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) ``module`` computes with, as copies of the caller's own (a borrow, copied, released)."""
    weight, bias = borrow(module, dtype, device)
    try:
        return weight.detach().clone(), None if bias is None else bias.detach().clone()
    finally:
        release(module, weight, bias)


def borrowed_count() -> int:
    """Weights handed out by ``borrow`` and not given back (the tests check it is 0 after a step)."""
    return len(_BORROWED)
