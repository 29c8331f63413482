"""Devices and memory through ``comfy.model_management``: what the device computes in, and loading.

Models are loaded with ComfyUI's own memory management and a training memory estimate, so on a
small GPU ComfyUI loads what fits and offloads the rest (the training views cast offloaded
weights to the device layer by layer); on a large one everything is loaded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import comfy.model_management
import torch

from ..core.precision import DeviceCapabilities

# Training keeps every activation for backward, inference frees them as it goes: ComfyUI's
# inference estimate (BaseModel.memory_required) times this is what a training step adds.
TRAINING_ACTIVATION_FACTOR = 4.0


def capabilities(device: torch.device) -> DeviceCapabilities:
    if device.type == "cpu":
        # Emulated where the processor lacks it, but exact: torch computes bfloat16 on any CPU.
        return DeviceCapabilities("cpu", bf16=True, fp16=True)
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return DeviceCapabilities("cuda", bf16=bf16, fp16=True)
    return DeviceCapabilities(
        device.type, bf16=bool(comfy.model_management.should_use_bf16(device)), fp16=bool(comfy.model_management.should_use_fp16(device))
    )


def training_memory(model: Any, batch_size: int, resolution: int, trainable_bytes: int = 0) -> int:
    """Bytes a training step needs on the device beyond the frozen weights (an estimate)."""
    channels = model.get_model_object("latent_format").latent_channels
    shape = (batch_size * 2, channels, resolution // 8, resolution // 8)  # with prior preservation, two batches
    activations = model.model.memory_required(shape) * TRAINING_ACTIVATION_FACTOR
    return int(activations + trainable_bytes)


def load(patchers: Sequence[Any], memory_required: int = 0) -> None:
    """Load ``patchers`` for computing, leaving ``memory_required`` free (ComfyUI offloads what does not fit).

    Under inference mode, as ComfyUI's executor loads every model: called from a training run (grad
    mode on), moving and patching the loaded (inference) weights outside it leaves weights that
    autograd and ComfyUI's own forward then refuse ("Inference tensors do not track version
    counter", seen on CUDA with a LoRA applied before training)."""
    with torch.inference_mode():
        comfy.model_management.load_models_gpu(list(patchers), memory_required=memory_required)


def intermediate_device() -> torch.device:
    return comfy.model_management.intermediate_device()


def free_cached_memory() -> None:
    comfy.model_management.soft_empty_cache()


def free_all() -> None:
    """Unload every model from the device (worker processes are about to take it)."""
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
