"""The precision policy both trainers use: compute dtype, autocast, loss scaling, the trained copy.

Plain torch and plain rules, decided once per run from what the device can do and how the model
is stored; every choice that departs from what was asked is returned as a note for ``status``.

- The diffusion model computes in its own compute dtype (ComfyUI's: float16 or bfloat16 on
  most GPUs, float32 on the CPU), or in the one asked for. float16 and bfloat16 run under
  autocast, which keeps softmax, norms and the loss in float32.
- float16 gets dynamic loss scaling: a trained model's gradients are small enough that float16
  flushes many of them to zero (measured: at a gradient scale of 1e-5 every element of a
  Textual Inversion gradient is exactly 0 unscaled, and matches float32 scaled by 65,536).
  bfloat16 has float32's range and needs none.
- The text encoder is never run under the diffusion model's autocast: it computes in float32,
  as CLIP Text Encode does, so the conditioning trained on is the one prompts get.
- fp8-stored models (fp8 checkpoints, ``--fp8_e4m3fn-unet``): the frozen weights stay fp8 and are
  cast to the compute dtype layer by layer (Textual Inversion and LoRA train over them); full
  fine-tuning is refused, since tuned weights written back to fp8 would lose the small updates.
- Full fine-tuning's trained copy is bfloat16 when asked (``full_bf16``) and the device has
  bfloat16 arithmetic, else float32; on a GPU a bfloat16 copy also computes in bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")
_BY_NAME = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, name)
)


@dataclass(frozen=True)
class DeviceCapabilities:
    """What the training device can compute in."""

    device_type: str  # "cuda", "cpu", ...
    bf16: bool  # native bfloat16 arithmetic (Ampere and newer; not T4, V100, RTX 20xx)
    fp16: bool


@dataclass(frozen=True)
class Precision:
    compute_dtype: torch.dtype  # the diffusion model's layers compute in this
    loss_scaling: bool  # dynamic loss scaling (float16 compute)
    copy_dtype: torch.dtype  # full fine-tuning: the trained copy's dtype
    notes: tuple[str, ...] = field(default=())

    @property
    def autocast(self) -> bool:
        return self.compute_dtype in (torch.float16, torch.bfloat16)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def choose_precision(
    requested: str,
    capabilities: DeviceCapabilities,
    model_compute_dtype: torch.dtype,
    storage_dtype: torch.dtype,
    *,
    full: bool = False,
    full_bf16: bool = False,
) -> Precision:
    """The precision of one training run; raises ValueError (before any work) where none fits."""
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)} (got '{requested}')")
    notes: list[str] = []
    if full and is_fp8(storage_dtype):
        raise ValueError(
            f"full fine-tuning of a model stored in {str(storage_dtype).removeprefix('torch.')} would round every tuned weight back to fp8 "
            "and lose the small updates: load the model in fp16/bf16 (weight_dtype 'default'), or train a LoRA over it"
        )
    if requested == "auto":
        compute = model_compute_dtype if capabilities.device_type != "cpu" else torch.float32
        if compute not in (torch.float32, torch.float16, torch.bfloat16):
            compute = torch.bfloat16 if capabilities.bf16 else torch.float16
    else:
        compute = _BY_NAME[requested]
    if compute == torch.bfloat16 and not capabilities.bf16:
        compute = torch.float16 if capabilities.fp16 else torch.float32
        notes.append(
            f"this {capabilities.device_type} device has no bfloat16 arithmetic: computing in {str(compute).removeprefix('torch.')}"
            + (" with loss scaling" if compute == torch.float16 else "")
        )
    copy_dtype = torch.float32
    if full and full_bf16:
        if capabilities.bf16:
            copy_dtype = torch.bfloat16
            if requested == "auto" and capabilities.device_type != "cpu":
                compute = torch.bfloat16  # a bfloat16 copy computes in bfloat16: no loss scaling, no float16 casts
        else:
            notes.append(f"full_bf16: this {capabilities.device_type} device has no bfloat16 arithmetic, so the trained copy is float32")
    return Precision(compute_dtype=compute, loss_scaling=compute == torch.float16, copy_dtype=copy_dtype, notes=tuple(notes))
