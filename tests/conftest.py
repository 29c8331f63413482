"""Test set-up: a real ComfyUI, imported in-process on the CPU, with this pack loaded by
ComfyUI's own custom-node loader, and small random-weight checkpoints made by the tests.

ComfyUI is on no package registry. The checkout is found, in this order:
``COMFYUI_PATH``; the ComfyUI enclosing this pack (``ComfyUI/custom_nodes/<pack>``);
``~/.cache/comfyui/ComfyUI``; else a shallow clone of the public repository into that cache.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parents[1]
CACHE_CHECKOUT = Path.home() / ".cache" / "comfyui" / "ComfyUI"
REFERENCE_COMMIT = "a125cd84"
COMFYUI_REPOSITORY = "https://github.com/comfyanonymous/ComfyUI"


def _is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "sd.py").is_file() and (path / "nodes.py").is_file()


def find_comfyui() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if not _is_comfyui(Path(env)):
            pytest.exit(f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/sd.py and nodes.py)", returncode=4)
        return Path(env)
    if PACK_DIR.parent.name == "custom_nodes" and _is_comfyui(PACK_DIR.parent.parent):
        return PACK_DIR.parent.parent
    if _is_comfyui(CACHE_CHECKOUT):
        return CACHE_CHECKOUT
    CACHE_CHECKOUT.parent.mkdir(parents=True, exist_ok=True)
    clone = subprocess.run(
        ["git", "clone", "--depth", "1", COMFYUI_REPOSITORY, str(CACHE_CHECKOUT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if clone.returncode == 0 and _is_comfyui(CACHE_CHECKOUT):
        return CACHE_CHECKOUT
    pytest.exit(
        "No ComfyUI checkout found, and cloning one failed "
        f"({(clone.stderr or '').strip().splitlines()[-1:] or 'no output'}).\n"
        "Provide one of:\n"
        "  - COMFYUI_PATH=/path/to/ComfyUI (a git checkout; the reference is v0.3.64, commit "
        f"{REFERENCE_COMMIT})\n"
        "  - this pack placed in ComfyUI/custom_nodes/\n"
        f"  - a checkout at {CACHE_CHECKOUT} (e.g. `git clone {COMFYUI_REPOSITORY} {CACHE_CHECKOUT}`)",
        returncode=4,
    )


COMFYUI_DIR = find_comfyui()
SESSION_DIR = Path(tempfile.mkdtemp(prefix="personalize-tests-"))
MODEL_CACHE = Path(os.environ.get("PERSONALIZE_TINY_MODELS", Path.home() / ".cache" / "comfy-personalize" / "tiny-models"))


def _start_comfyui() -> None:
    """Import ComfyUI the way main.py does, on the CPU, with its folders in a temp dir."""
    sys.path.insert(0, str(COMFYUI_DIR))
    import comfy.options  # noqa: F401  (args parsing stays off: pytest's argv is not ComfyUI's)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    # main.py imports utils.extra_config before nodes: afterwards `utils` means comfy/utils.py.
    import utils.extra_config  # noqa: F401
    import folder_paths

    models = SESSION_DIR / "models"
    for folder in ("checkpoints", "embeddings", "loras", "personalize_cache"):
        (models / folder).mkdir(parents=True, exist_ok=True)
        extensions = folder_paths.folder_names_and_paths.get(folder, ([], folder_paths.supported_pt_extensions))[1]
        folder_paths.folder_names_and_paths[folder] = ([str(models / folder)], extensions)
    for kind in ("output", "input", "temp"):
        (SESSION_DIR / kind).mkdir(exist_ok=True)
    folder_paths.set_output_directory(str(SESSION_DIR / "output"))
    folder_paths.set_input_directory(str(SESSION_DIR / "input"))
    folder_paths.set_temp_directory(str(SESSION_DIR / "temp"))

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(PACK_DIR))):
        raise RuntimeError("ComfyUI did not load the pack (see the log above)")


_start_comfyui()


def pack_module(name: str = ""):
    """A module of this pack as ComfyUI loaded it (``pack_module("nodes.embedding_file")``)."""
    root = str(PACK_DIR).replace(".", "_x_")
    return sys.modules[root + ("." + name if name else "")]


def run_node(node_type: str, **inputs):
    """Call a node as ComfyUI's executor does: by its registered type, under inference mode."""
    import nodes
    import torch

    cls = nodes.NODE_CLASS_MAPPINGS[node_type]
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)


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
