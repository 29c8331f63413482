"""In-process ComfyUI for the integration tests: started once (on import), with this pack loaded
by ComfyUI's own custom-node loader; nodes are called as ComfyUI's executor calls them.

ComfyUI is on no package registry. The checkout is found, in this order: ``COMFYUI_PATH``;
the ComfyUI enclosing this pack (``ComfyUI/custom_nodes/<pack>``); ``~/.cache/comfyui/ComfyUI``.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import comfyui_runtime
import pytest
from comfyui_runtime import MODEL_CACHE, PACK_DIR, pack_module  # noqa: F401

SESSION_DIR = Path(tempfile.mkdtemp(prefix="personalize-tests-"))
try:
    COMFYUI_DIR = comfyui_runtime.start(SESSION_DIR, cpu=True)
except comfyui_runtime.ComfyUINotFound as error:
    pytest.exit(str(error), returncode=4)


def run_node(node_type: str, **inputs):
    """Call a node as ComfyUI's executor does: by its registered type, under inference mode."""
    import nodes
    import torch

    cls = nodes.NODE_CLASS_MAPPINGS[node_type]
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)


def textual_inversion_inputs(**overrides) -> dict:
    """Every widget of Train Textual Inversion, set for a quick run on the tests' tiny models (a
    fresh trigger word each call); ``overrides`` replace or add inputs."""
    import uuid

    values = {
        "trigger_word": f"<t{uuid.uuid4().hex[:6]}>",
        "init_text": "cat",
        "vectors_per_token": 1,
        "steps": 3,
        "learning_rate": "0.005",
        "batch_size": 1,
        "gradient_accumulation": 1,
        "seed": 0,
        "templates": "object",
        "custom_templates": "a photo of {}",
        "resolution": 64,
        "resize_mode": "crop",
        "flip": False,
        "save_every": 0,
        "file_name": "",
        "file_format": "safetensors",
        "overwrite": False,
        "resume_from": pack_module("nodes.textual_inversion_node").NO_RESUME,
        "aspect_buckets": True,
    }
    values.update(overrides)
    return values


def dreambooth_inputs(model, clip, vae, **overrides) -> dict:
    """Every widget of DreamBooth Fine-tune, set for a quick LoRA run on the tests' tiny models (a
    fresh file name each call); ``overrides`` replace or add inputs (``images`` among them)."""
    import uuid

    values = {
        "model": model,
        "clip": clip,
        "vae": vae,
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of dog",
        "identifier": "",
        "mode": "lora",
        "prior_preservation": False,
        "num_class_images": 2,
        "prior_loss_weight": 1.0,
        "steps": 2,
        "learning_rate": "auto",
        "lora_rank": 4,
        "lora_alpha": 4.0,
        "lora_targets": "attention",
        "train_text_encoder": False,
        "text_encoder_learning_rate": "auto",
        "pivotal_tuning": False,
        "embedding_learning_rate": "auto",
        "batch_size": 1,
        "gradient_accumulation": 1,
        "seed": 0,
        "resolution": 64,
        "resize_mode": "crop",
        "aspect_buckets": True,
        "flip": False,
        "class_sampler": "euler",
        "class_scheduler": "normal",
        "class_steps": 2,
        "class_cfg": 5.0,
        "gradient_checkpointing": False,
        "optimizer": "AdamW",
        "save_every": 0,
        "file_name": f"db-{uuid.uuid4().hex[:8]}",
        "overwrite": False,
    }
    values.update(overrides)
    return values


def richardson_check(loss_fn, params, h: float, seed: int = 0, rel: float = 0.02, floor: float = 1e-7) -> float:
    """Autograd's directional derivative of ``loss_fn`` along a seeded random unit direction in
    ``params`` against Richardson-extrapolated central differences (steps h and h/2); returns it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    directions = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    norm = torch.sqrt(sum((d * d).sum() for d in directions))
    directions = [d / norm for d in directions]

    def central(step: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, directions, strict=True):
                p.add_(step * d)
            up = float(loss_fn())
            for p, d in zip(params, directions, strict=True):
                p.sub_(2 * step * d)
            down = float(loss_fn())
            for p, d in zip(params, directions, strict=True):
                p.add_(step * d)
        return (up - down) / (2 * step)

    with torch.inference_mode(False), torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), params)
        analytic = float(sum((gr * d).sum() for gr, d in zip(grads, directions, strict=True)))
        numeric = (4 * central(h / 2) - central(h)) / 3
    assert abs(numeric) > floor, "the numeric derivative is at the rounding floor: nothing connects"
    assert analytic == pytest.approx(numeric, rel=rel), (analytic, numeric)
    return analytic


@contextlib.contextmanager
def cancel_at_step(step: int):
    """Press ComfyUI's Cancel when a node's progress bar reaches ``step``; the body must raise
    ComfyUI's interrupt exception (checked here). The hook and the flag are reset afterwards."""
    import comfy.model_management
    import comfy.utils

    def hook(value, total, preview, node_id=None):
        if value == step:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            yield
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)


def checkpoint_in_models(kind: str) -> str:
    """Build (or reuse) a tiny checkpoint and expose it under models/checkpoints."""
    import folder_paths
    import tiny_models

    source = tiny_models.cached_checkpoint(kind, MODEL_CACHE)
    name = source.name
    link = Path(folder_paths.get_folder_paths("checkpoints")[0]) / name
    if not link.exists():
        link.symlink_to(source)
    return name


def load_checkpoint(kind: str) -> dict:
    name = checkpoint_in_models(kind)
    model, clip, vae = run_node("CheckpointLoaderSimple", ckpt_name=name)
    return {"name": name, "model": model, "clip": clip, "vae": vae}
