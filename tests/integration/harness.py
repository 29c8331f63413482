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
