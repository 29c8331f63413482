"""Test set-up: a real ComfyUI, imported in-process on the CPU, with this pack loaded by
ComfyUI's own custom-node loader, and small random-weight checkpoints made by the tests.

ComfyUI is on no package registry. The checkout is found, in this order:
``COMFYUI_PATH``; the ComfyUI enclosing this pack (``ComfyUI/custom_nodes/<pack>``);
``~/.cache/comfyui/ComfyUI``; else a shallow clone of the public repository into that cache.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import comfyui_runtime  # noqa: E402
from comfyui_runtime import MODEL_CACHE, PACK_DIR, find_comfyui, pack_module  # noqa: E402,F401

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


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return SESSION_DIR


@pytest.fixture(scope="session")
def embeddings_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("embeddings")[0])


def _checkpoint_in_models(kind: str) -> str:
    """Build (or reuse) a tiny checkpoint and expose it under models/checkpoints."""
    sys.path.insert(0, str(Path(__file__).parent))
    import folder_paths
    import tiny_models

    source = tiny_models.cached_checkpoint(kind, MODEL_CACHE)
    name = source.name
    link = Path(folder_paths.get_folder_paths("checkpoints")[0]) / name
    if not link.exists():
        link.symlink_to(source)
    return name


def _load_checkpoint(kind: str):
    name = _checkpoint_in_models(kind)
    model, clip, vae = run_node("CheckpointLoaderSimple", ckpt_name=name)
    return {"name": name, "model": model, "clip": clip, "vae": vae}


@pytest.fixture(scope="session")
def sd15():
    """The tiny SD1.5 checkpoint loaded through CheckpointLoaderSimple: dict of name, model, clip, vae."""
    return _load_checkpoint("sd15")


@pytest.fixture(scope="session")
def sd2():
    return _load_checkpoint("sd2")


@pytest.fixture(scope="session")
def sdxl_clip():
    """The real-size SDXL text encoders (CLIP-L + OpenCLIP-G) loaded as DualCLIPLoader does."""
    sys.path.insert(0, str(Path(__file__).parent))
    import folder_paths
    import tiny_models
    import torch

    paths = tiny_models.cached_sdxl_text_encoders(MODEL_CACHE)
    with torch.inference_mode():
        return tiny_models.load_sdxl_clip(paths, folder_paths.get_folder_paths("embeddings"))


@pytest.fixture(scope="session")
def tiny_sdxl_model():
    """A small SDXL-shaped UNet (the detectable one is 2.6B parameters), built once per session."""
    import tiny_models
    import torch

    with torch.inference_mode():  # as ComfyUI's loaders run: weights become inference tensors
        return tiny_models.build_tiny_sdxl_model(seed=0)
