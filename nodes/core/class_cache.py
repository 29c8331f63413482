"""DreamBooth's class-image cache: generated class latents on disk, keyed by what made them.

A file holds the latents of ``count`` class images and the key (a hash of the model, prompt,
sampler settings, size, seed and count); a file with another key, count or a broken body is
regenerated, never trusted. No ComfyUI import.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from .files import atomic_write

log = logging.getLogger(__name__)
FORMAT_TAG = "comfyui-personalize.class-latents/1"


def cache_key(description: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(description), sort_keys=True).encode()).hexdigest()


def cache_path(folder: Path, key: str) -> Path:
    return folder / f"dreambooth-class-latents-{key[:32]}.safetensors"


def read_class_cache(folder: Path, key: str, count: int) -> torch.Tensor | None:
    """Cached class latents for ``key``, or None (missing, unreadable, or another key or count)."""
    path = cache_path(folder, key)
    if not path.is_file():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
        latents = safetensors.torch.load_file(str(path), device="cpu")["latents"]
    except Exception as error:  # a broken cache file is regenerated, never trusted
        log.warning("DreamBooth: ignoring unreadable class-image cache %s: %s", path.name, error)
        return None
    if metadata.get("key") != key or latents.shape[0] != count or not bool(torch.isfinite(latents).all()):
        return None
    return latents.to(torch.float32)


def write_class_cache(folder: Path, key: str, latents: torch.Tensor, description: Mapping[str, Any]) -> Path:
    tensors = {"latents": latents.detach().to("cpu", torch.float32).contiguous()}
    metadata = {"key": key, "format": FORMAT_TAG, "settings": json.dumps(dict(description), sort_keys=True)}
    return atomic_write(
        cache_path(folder, key), lambda temp: safetensors.torch.save_file(tensors, str(temp), metadata=metadata), overwrite=True
    )
