"""Input declarations both training nodes share, with one tooltip each, and small node helpers.

Node input names are a public interface (saved workflows store widget values by position and
API prompts by name): each node still lists its inputs in its own order; this module only keeps
the declarations of the shared ones in one place.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from .comfy_bridge import folders
from .core.precision import PRECISION_CHOICES
from .core.training_images import TrainingImageSet
from .graph_types import TRAINING_IMAGES

IMAGES_TOOLTIP = "3-5 images are enough (the papers used 3-5); up to a few dozen for a style. Any size: they are bucketed and resized."

SHARED_INPUTS: dict[str, tuple[Any, dict[str, Any]]] = {
    "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per micro-step (from one aspect bucket)."}),
    "gradient_accumulation": (
        "INT",
        {
            "default": 1,
            "min": 1,
            "max": 64,
            "tooltip": "Micro-steps summed per optimizer step: effective batch = batch size × this, at the memory of one batch.",
        },
    ),
    "seed": (
        "INT",
        {
            "default": 0,
            "min": 0,
            "max": 0xFFFFFFFFFFFFFFFF,
            "tooltip": "Seed for noise, timesteps, prompts, batch order (and LoRA init and class images).",
        },
    ),
    "resize_mode": (
        ["crop", "resize", "pad"],
        {
            "default": "crop",
            "tooltip": "How images are brought to their bucket size: crop (cover, centre crop), resize (stretch) or pad (fit, white borders).",
        },
    ),
    "aspect_buckets": (
        "BOOLEAN",
        {
            "default": True,
            "tooltip": "Keep aspect ratios: group images into buckets of about resolution² pixels (multiples of 64). Off: every image becomes a resolution×resolution square.",
        },
    ),
    "flip": (
        "BOOLEAN",
        {
            "default": False,
            "tooltip": "Randomly mirror images left-right. Good for symmetric subjects and styles; off for text, logos or asymmetric subjects.",
        },
    ),
    "save_every": (
        "INT",
        {
            "default": 0,
            "min": 0,
            "max": 100000,
            "tooltip": "Also save every N steps (0: only at the end). Each save is a complete file written atomically, so a cancelled or crashed run keeps the last one.",
        },
    ),
    "overwrite": (
        "BOOLEAN",
        {"default": False, "tooltip": "Replace existing files of the same name. Off: an existing file stops the run before training."},
    ),
    "preview_every": (
        "INT",
        {
            "default": 0,
            "min": 0,
            "max": 100000,
            "tooltip": "Render a preview on the node every N steps and at the end (0: off), with the model being trained: no copy of it. Costs a 20-step sampling run each time.",
        },
    ),
    "devices": (
        "STRING",
        {
            "default": "",
            "tooltip": "Train on several devices at once: cuda:0,cuda:1 (or 0,1) starts one worker process per GPU (torchrun) that share every step; cpu,cpu two CPU workers. Full fine-tuning then divides its optimizer state among them (ZeRO stage 2). Empty (or one device): the device ComfyUI uses, in ComfyUI's own process.",
        },
    ),
    "accelerate_config": (
        "STRING",
        {
            "default": "",
            "tooltip": "Optional: the path of an accelerate config file (made with `accelerate config`). The workers are then started with accelerate launch, e.g. across several machines (see the README). MULTI_GPU, DeepSpeed ZeRO stage 1-2 and FSDP SHARD_GRAD_OP are accepted (the pack shards the optimizer state itself); ZeRO-3, FULL_SHARD and offloading are refused.",
        },
    ),
    "precision": (
        list(PRECISION_CHOICES),
        {
            "default": "auto",
            "tooltip": "Compute precision. auto: the model's own (fp16 or bf16 on most GPUs, fp32 on the CPU). fp16 trains with loss scaling; bf16 needs a GPU that has it (Ampere or newer), else fp16 is used and the status says so.",
        },
    ),
}


def shared(name: str, **changes: Any) -> tuple[Any, dict[str, Any]]:
    """A shared input's declaration, with node-specific ``changes`` to its options."""
    kind, options = SHARED_INPUTS[name]
    return kind, {**options, **changes}


def resolution_input(tooltip_extra: str = "") -> tuple[str, dict[str, Any]]:
    return (
        "INT",
        {
            "default": 512,
            "min": 64,
            "max": 2048,
            "step": 64,
            "tooltip": "Training resolution (multiple of 64): 512 for SD1.x, 768 for SD2-768, 1024 for SDXL." + tooltip_extra,
        },
    )


def image_inputs(images_tooltip: str) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "images": ("IMAGE", {"tooltip": images_tooltip}),
        "image_set": (
            TRAINING_IMAGES,
            {"tooltip": "Images from the Image Folder (training) node (with captions); used instead of 'images'."},
        ),
    }


def training_images(images: torch.Tensor | None, image_set: TrainingImageSet | None) -> TrainingImageSet | None:
    """The images a training node was given: the image-folder set, else the IMAGE batch."""
    if image_set is not None:
        return image_set
    if images is not None:
        return TrainingImageSet.from_image_batch(images)
    return None


def file_hash(kind: str, name: str) -> str | float:
    """IS_CHANGED for a file input: its content hash (NaN, "always changed", when unreadable).

    ComfyUI caches node outputs by inputs; a file retrained under the same name must re-run.
    """
    try:
        return hashlib.sha256(folders.file_path(kind, name).read_bytes()).hexdigest()
    except (OSError, FileNotFoundError):
        return float("nan")
