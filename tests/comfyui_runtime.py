"""A real ComfyUI, imported in-process (as main.py does), with this pack loaded by its own loader.

Used by the test suite (conftest.py) and by the benchmarks, which run the training cores
headless: no server, the same way a torchrun/accelerate worker would.

The checkout is found, in this order: ``COMFYUI_PATH``; the ComfyUI enclosing this pack
(``ComfyUI/custom_nodes/<pack>``); ``~/.cache/comfyui/ComfyUI``; else a shallow clone of
the public repository into that cache.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

PACK_DIR = Path(__file__).resolve().parents[1]
CACHE_CHECKOUT = Path.home() / ".cache" / "comfyui" / "ComfyUI"
REFERENCE_COMMIT = "a125cd84"
COMFYUI_REPOSITORY = "https://github.com/comfyanonymous/ComfyUI"
MODEL_CACHE = Path(os.environ.get("PERSONALIZE_TINY_MODELS", Path.home() / ".cache" / "comfy-personalize" / "tiny-models"))


class ComfyUINotFound(RuntimeError):
    pass


def _is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "sd.py").is_file() and (path / "nodes.py").is_file()


def find_comfyui() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if not _is_comfyui(Path(env)):
            raise ComfyUINotFound(f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/sd.py and nodes.py)")
        return Path(env)
    if PACK_DIR.parent.name == "custom_nodes" and _is_comfyui(PACK_DIR.parent.parent):
        return PACK_DIR.parent.parent
    if _is_comfyui(CACHE_CHECKOUT):
        return CACHE_CHECKOUT
    CACHE_CHECKOUT.parent.mkdir(parents=True, exist_ok=True)
    try:
        clone = subprocess.run(
            ["git", "clone", "--depth", "1", COMFYUI_REPOSITORY, str(CACHE_CHECKOUT)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        reason = (clone.stderr or "").strip().splitlines()[-1:] or ["no output"]
    except (OSError, subprocess.TimeoutExpired) as error:
        reason = [str(error)]
    if _is_comfyui(CACHE_CHECKOUT):
        return CACHE_CHECKOUT
    raise ComfyUINotFound(
        f"No ComfyUI checkout found, and cloning one failed ({reason[0]}).\n"
        "Provide one of:\n"
        f"  - COMFYUI_PATH=/path/to/ComfyUI (a git checkout; the reference is v0.3.64, commit {REFERENCE_COMMIT})\n"
        "  - this pack placed in ComfyUI/custom_nodes/\n"
        f"  - a checkout at {CACHE_CHECKOUT} (e.g. `git clone {COMFYUI_REPOSITORY} {CACHE_CHECKOUT}`)"
    )


def start(base_dir: Path, cpu: bool = True, load_extra_nodes: bool = True) -> Path:
    """Import ComfyUI with its folders under ``base_dir``, then load this pack as a custom node."""
    comfy_dir = find_comfyui()
    sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args
    import comfy.options

    comfy.cli_args.args.cpu = cpu
    # main.py imports utils.extra_config before nodes: afterwards `utils` means comfy/utils.py.
    import folder_paths
    import utils.extra_config  # noqa: F401

    models = base_dir / "models"
    for folder in ("checkpoints", "embeddings", "loras", "personalize_cache"):
        (models / folder).mkdir(parents=True, exist_ok=True)
        extensions = folder_paths.folder_names_and_paths.get(folder, ([], folder_paths.supported_pt_extensions))[1]
        folder_paths.folder_names_and_paths[folder] = ([str(models / folder)], extensions)
    for kind in ("output", "input", "temp"):
        (base_dir / kind).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(base_dir / "output"))
    folder_paths.set_input_directory(str(base_dir / "input"))
    folder_paths.set_temp_directory(str(base_dir / "temp"))

    import nodes

    if load_extra_nodes:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(PACK_DIR))):
        raise RuntimeError("ComfyUI did not load the pack (see the log above)")
    return comfy_dir


def pack_module(name: str = "") -> ModuleType:
    """A module of this pack as ComfyUI loaded it (``pack_module("nodes.embedding_file")``)."""
    root = str(PACK_DIR).replace(".", "_x_")
    return sys.modules[root + ("." + name if name else "")]


def tiny_checkpoint(kind: str = "sd15") -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_models

    return tiny_models.cached_checkpoint(kind, MODEL_CACHE)
