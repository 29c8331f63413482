"""Models for the GPU tests, loaded as CheckpointLoaderSimple loads them."""

from __future__ import annotations

from pathlib import Path

import torch


def load(path: Path, dtype: torch.dtype | None = None) -> dict:
    """A checkpoint as CheckpointLoaderSimple loads it (optionally with the UNet stored in ``dtype``)."""
    import comfy.sd
    import folder_paths

    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            str(path),
            model_options={} if dtype is None else {"dtype": dtype},
            embedding_directory=folder_paths.get_folder_paths("embeddings"),
        )[:3]
    return {"model": model, "clip": clip, "vae": vae}
