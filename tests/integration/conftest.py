"""Fixtures of the integration tests: a real ComfyUI in-process (see harness.py) and tiny models
ComfyUI's own loaders detect."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import MODEL_CACHE, SESSION_DIR, load_checkpoint


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return SESSION_DIR


@pytest.fixture(scope="session")
def embeddings_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("embeddings")[0])


@pytest.fixture(scope="session")
def sd15():
    """The tiny SD1.5 checkpoint loaded through CheckpointLoaderSimple: dict of name, model, clip, vae."""
    return load_checkpoint("sd15")


@pytest.fixture(scope="session")
def sd2():
    return load_checkpoint("sd2")


@pytest.fixture(scope="session")
def sdxl_clip():
    """The real-size SDXL text encoders (CLIP-L + OpenCLIP-G) loaded as DualCLIPLoader does."""
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
