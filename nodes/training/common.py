"""What both trainers compute the same way: the precision of a run, and the diffusion loss."""

from __future__ import annotations

from typing import Any

import torch

from ..comfy_bridge import devices
from ..comfy_bridge.diffusion_model import DiffusionModelForTraining, compute_dtype, storage_dtype
from ..core.precision import Precision, choose_precision
from ..core.training_math import prediction_loss


def precision_for(model: Any, requested: str, *, full: bool = False, full_bf16: bool = False) -> Precision:
    """The precision policy's choice for ``model`` on its training device."""
    capabilities = devices.capabilities(model.load_device)
    return choose_precision(requested, capabilities, compute_dtype(model), storage_dtype(model), full=full, full_bf16=full_bf16)


def grad_scaler(unet: DiffusionModelForTraining, precision: Precision) -> torch.amp.GradScaler:
    """Dynamic loss scaling for float16 compute (a disabled scaler otherwise)."""
    return torch.amp.GradScaler(unet.device.type, enabled=precision.loss_scaling)


def diffusion_loss(
    unet: DiffusionModelForTraining,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    pooled: torch.Tensor | None,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss of one batch in the model's own target space (eps or v); a [1, T, D] ``cond``
    conditions every sample. ``target``: the denoised latents to regress instead of ``latents``."""
    sigma = unet.sigmas(timesteps)
    x = unet.noisy(latents, noise, sigma)
    count = latents.shape[0]
    if cond.shape[0] == 1 and count > 1:
        cond = cond.expand(count, -1, -1)
        pooled = None if pooled is None else pooled.expand(count, -1)
    denoised = unet.denoise(x, sigma, cond, pooled)
    goal = latents if target is None else target
    return prediction_loss(denoised.float(), goal.float(), sigma, unet.prediction, unet.sigma_data).mean()
