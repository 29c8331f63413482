"""Results as ComfyUI objects and files: tuned MODEL/CLIP clones, LoRA names, saved files.

Every file is written atomically (a temporary file renamed over the target) into the first
folder of its ComfyUI kind, under a name that cannot leave it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import comfy.lora
import comfy.model_management
import comfy.sd
import safetensors.torch
import torch

from ..core.adapters import LoraPair, lora_file_tensors
from ..core.embedding_file import EmbeddingFile, write_embedding
from ..core.files import atomic_write
from . import folders, tokens
from .diffusion_model import family_of


def model_with_diffs(model: Any, diffs: Mapping[str, torch.Tensor]) -> Any:
    """A clone of the MODEL (or CLIP) carrying ``diffs`` as ComfyUI "diff" patches."""
    patched = model.clone()
    added = patched.add_patches({k: ("diff", (v,)) for k, v in diffs.items()}, 1.0)
    missing = set(diffs) - set(added)
    if missing:
        raise RuntimeError(f"{len(missing)} tuned weights have no place in the model, e.g. {sorted(missing)[0]}")
    return patched


def apply_lora_tensors(model: Any, clip: comfy.sd.CLIP | None, tensors: Mapping[str, torch.Tensor]) -> tuple[Any, Any]:
    """The MODEL (and CLIP) with a LoRA state dict applied exactly as LoraLoader applies a file."""
    return comfy.sd.load_lora_for_models(model, clip, dict(tensors), 1.0, 1.0)


# --------------------------------------------------------------------------- LoRA names


def _preferred(candidates: Iterable[str], preferences: Iterable[str]) -> str | None:
    candidates = sorted(candidates)
    for prefix in preferences:
        for name in candidates:
            if name.startswith(prefix):
                return name
    return None


def unet_lora_names(model: Any, keys: Iterable[str]) -> dict[str, str]:
    """kohya LoRA names for diffusion-model weights, as ComfyUI's LoraLoader maps them back.

    The diffusers-style name (``lora_unet_down_blocks_0_attentions_0_...``, what kohya and
    AUTOMATIC1111 write) where ComfyUI knows one, else ComfyUI's LDM-style ``lora_unet_...``.
    """
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    reverse: dict[str, list[str]] = {}
    for lora_name, model_key in key_map.items():
        if lora_name.startswith("lora_unet_"):
            reverse.setdefault(model_key, []).append(lora_name)
    names = {}
    for key in keys:
        ldm = "lora_unet_" + key[len("diffusion_model.") : -len(".weight")].replace(".", "_")
        others = [n for n in reverse.get(key, []) if n != ldm]
        names[key] = sorted(others)[0] if others else ldm
        if key_map.get(names[key]) != key:
            raise RuntimeError(f"LoRA name {names[key]} would not load back onto {key}")
    return names


def unet_lora_parts(model: Any, keys: Iterable[str]) -> dict[str, list[tuple[str, tuple[int, int] | None]]]:
    """diffusers' PEFT names for diffusion-model weights (``transformer.…``), as ComfyUI's LoraLoader
    maps them back: a fused weight (SD3's qkv) becomes its parts with their rows, {key: [(name, (offset, rows) or None)]}."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    parts: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}
    for lora_name, target in key_map.items():
        if not lora_name.startswith("transformer."):
            continue
        if isinstance(target, str):
            parts.setdefault(target, []).append((lora_name, None))
        elif isinstance(target, tuple) and len(target) == 2 and target[1] is not None and target[1][0] == 0:
            parts.setdefault(target[0], []).append((lora_name, (int(target[1][1]), int(target[1][2]))))
    out = {}
    for key in keys:
        found = sorted(parts.get(key, []), key=lambda part: (0 if part[1] is None else part[1][0], part[0]))
        if not found or (found[0][1] is None and len(found) > 1):
            raise RuntimeError(f"{key} has no diffusers name ComfyUI maps back onto it: use LoRA targets whose layers diffusers names")
        out[key] = found[:1] if found[0][1] is None else found
    return out


def unet_lora_tensors(model: Any, pairs: Mapping[str, LoraPair]) -> dict[str, torch.Tensor]:
    """The diffusion model's LoRA as the family writes it: kohya names (SD, Flux, Chroma) or
    diffusers' PEFT names (SD3), each loading back through LoraLoader onto the same weights."""
    if family_of(model).lora_format == "diffusers":
        parts = unet_lora_parts(model, pairs)
        tensors: dict[str, torch.Tensor] = {}
        for key, pair in pairs.items():
            tensors.update(pair.peft_state_dict(parts[key]))
        return tensors
    names = unet_lora_names(model, pairs)
    return lora_file_tensors({names[k]: p for k, p in pairs.items()})


def load_unet_lora(model: Any, pairs: Mapping[str, LoraPair], tensors: Mapping[str, torch.Tensor], file_name: str) -> None:
    """Continue ``pairs`` from a LoRA file this pack wrote for the model's family."""
    diffusers = family_of(model).lora_format == "diffusers"
    layout = unet_lora_parts(model, pairs) if diffusers else unet_lora_names(model, pairs)
    for key, pair in pairs.items():
        first = layout[key][0][0] if diffusers else layout[key]
        wanted = f"{first}.lora_A.weight" if diffusers else f"{first}.lora_up.weight"
        if wanted not in tensors:
            raise ValueError(
                f"cannot resume: {file_name} has no weights for {key}; was it trained with other LoRA targets or without the text encoder?"
            )
        if diffusers:
            pair.load_peft_state_dict(tensors, layout[key])
        else:
            pair.load_state_dict(tensors, first)


def clip_lora_names(clip: comfy.sd.CLIP, keys: Iterable[str]) -> dict[str, str]:
    """kohya text-encoder LoRA names (``lora_te_`` for one encoder, ``lora_te1_``/``lora_te2_`` for SDXL)."""
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    reverse: dict[str, list[str]] = {}
    for lora_name, model_key in key_map.items():
        reverse.setdefault(model_key, []).append(lora_name)
    several = len(tokens.sub_tokenizers(clip)) > 1
    preferences = ("lora_te1_", "lora_te2_", "lora_te_") if several else ("lora_te_", "lora_te1_")
    names = {}
    for key in keys:
        name = _preferred(reverse.get(key, []), preferences) or "text_encoders." + key[: -len(".weight")]
        if key_map.get(name) != key:
            raise RuntimeError(f"LoRA name {name} would not load back onto {key}")
        names[key] = name
    return names


# --------------------------------------------------------------------------- files


def save_embedding_file(embedding: EmbeddingFile, name: str, **kwargs: Any) -> Path:
    """Write an embedding into the first embeddings folder (extra_model_paths.yaml honoured)."""
    return write_embedding(embedding, folders.first_folder("embeddings"), name, **kwargs)


def save_lora_file(tensors: Mapping[str, torch.Tensor], name: str, *, overwrite: bool, metadata: Mapping[str, str]) -> Path:
    content = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(
        folders.target("lora", name),
        lambda temp: safetensors.torch.save_file(content, str(temp), metadata=dict(metadata)),
        overwrite=overwrite,
    )


def _metadata(path: Path) -> dict[str, str]:
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
        return dict(handle.metadata() or {})


def read_lora_file(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA from models/loras: (tensors, metadata). safetensors only: nothing is unpickled."""
    path = folders.file_path("loras", name)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path.name}: resuming reads .safetensors LoRA files only")
    return safetensors.torch.load_file(str(path), device="cpu"), _metadata(path)


def save_checkpoint_file(model: Any, clip: comfy.sd.CLIP, vae: Any, name: str, *, overwrite: bool, metadata: Mapping[str, str]) -> Path:
    """A checkpoint CheckpointLoaderSimple loads: ComfyUI's own save_checkpoint, written atomically."""
    if not hasattr(clip, "state_dict_for_saving"):
        # ComfyUI before its lazy per-weight saving (0.2x) reads the CLIP's state dict before
        # it loads the models: load (and patch) the CLIP first, so its tuned weights are written.
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([model, clip.patcher], force_patch_weights=True)

    def write(temp: Path) -> None:
        # As ComfyUI's own save nodes run: under inference mode. Saved from inside a training run
        # (grad mode on), v0.28's lazy per-weight saving fails on the loaded inference weights
        # ("Setting requires_grad=True on inference tensor", seen on a GPU).
        with torch.inference_mode():
            comfy.sd.save_checkpoint(str(temp), model, clip=clip, vae=vae, metadata=dict(metadata))

    return atomic_write(folders.target("checkpoint", name), write, overwrite=overwrite)


def read_checkpoint(name: str, with_clip: bool) -> tuple[dict[str, str], Any, comfy.sd.CLIP | None]:
    """A checkpoint from models/checkpoints, loaded by ComfyUI's own loader: (metadata, MODEL, CLIP or None)."""
    path = folders.file_path("checkpoints", name)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path.name}: resuming reads .safetensors checkpoints only")
    model, clip = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=with_clip)[:2]
    return _metadata(path), model, clip if with_clip else None


# --------------------------------------------------------------------------- worker processes


def export_checkpoint(model: Any, clip: comfy.sd.CLIP, vae: Any) -> Path:
    """The MODEL, CLIP and VAE as one checkpoint (patches in memory applied) for worker processes,
    under models/personalize_cache, named by what they compute with: written once, then reused."""
    import hashlib

    from .diffusion_model import model_identity, weights_identity

    digest = hashlib.sha256(model_identity(model).encode())
    digest.update(weights_identity(clip.cond_stage_model, getattr(clip.patcher, "patches", {})).encode())
    digest.update(weights_identity(vae.first_stage_model).encode())
    target = folders.cache_folder() / f"exported-{digest.hexdigest()[:32]}.safetensors"
    if target.is_file():
        return target
    if not hasattr(clip, "state_dict_for_saving"):
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([model, clip.patcher], force_patch_weights=True)

    def write(temp: Path) -> None:
        with torch.inference_mode():  # as save_checkpoint_file
            comfy.sd.save_checkpoint(str(temp), model, clip=clip, vae=vae)

    return atomic_write(target, write, overwrite=True)


def load_checkpoint(path: Path) -> tuple[Any, comfy.sd.CLIP, Any]:
    """(MODEL, CLIP, VAE) of a checkpoint file, as CheckpointLoaderSimple loads it."""
    import folder_paths

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings")
    )[:3]
    return model, clip, vae
