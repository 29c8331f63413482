"""ComfyUI's folders (``folder_paths``): where files are read from and written to."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..core.files import resolve_inside

CACHE_FOLDER = "personalize_cache"
if CACHE_FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path(CACHE_FOLDER, os.path.join(folder_paths.models_dir, CACHE_FOLDER))

# Where each kind of file the pack writes goes, by ComfyUI folder name.
FOLDER_OF = {"embedding": "embeddings", "lora": "loras", "checkpoint": "checkpoints"}


def first_folder(kind: str) -> Path:
    """The first folder of a ComfyUI model folder kind (extra_model_paths.yaml honoured): where files are written."""
    folders = folder_paths.get_folder_paths(kind)
    if not folders:
        raise RuntimeError(f"ComfyUI has no '{kind}' folder configured")
    return Path(folders[0])


def file_names(kind: str) -> list[str]:
    """The files of a model folder kind, as ComfyUI lists them in dropdowns."""
    return folder_paths.get_filename_list(kind)


def file_path(kind: str, name: str) -> Path:
    """The full path of a file listed in a dropdown; refuses names outside the folders."""
    path = folder_paths.get_full_path(kind, name)
    if path is None:
        raise FileNotFoundError(f"'{name}' is not in {', '.join(folder_paths.get_folder_paths(kind))}")
    return Path(path)


def target(what: str, name: str, extension: str = ".safetensors") -> Path:
    """Where a file the pack writes (``what``: embedding, lora, checkpoint) called ``name`` goes."""
    return resolve_inside(first_folder(FOLDER_OF[what]), name, extension)


def name_in_folder(kind: str, path: Path) -> str:
    """``path`` as the name ComfyUI lists it under in a ``kind`` folder (subfolders included)."""
    for folder in folder_paths.get_folder_paths(kind):
        try:
            return Path(path).resolve().relative_to(Path(folder).resolve()).as_posix()
        except ValueError:
            continue
    return Path(path).name


def cache_folder() -> Path:
    return first_folder(CACHE_FOLDER)


def temp_directory() -> Path:
    return Path(folder_paths.get_temp_directory())


def input_directory() -> Path:
    return Path(folder_paths.get_input_directory())


def input_subfolders() -> list[str]:
    """Folders under ComfyUI's input directory (relative, '/'-separated), for a dropdown."""
    root = input_directory()
    if not root.is_dir():
        return []
    found = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir() and not p.name.startswith(".")]
    return sorted(found, key=str.lower)


# The folders a training worker process needs, as this process has them.
WORKER_FOLDERS = ("embeddings", "loras", "checkpoints", CACHE_FOLDER)


def snapshot() -> dict[str, list[str]]:
    """ComfyUI's folders a worker process must see exactly as this process does."""
    out = {name: list(folder_paths.get_folder_paths(name)) for name in WORKER_FOLDERS}
    out["temp"] = [folder_paths.get_temp_directory()]
    return out


def comfyui_directory() -> Path:
    """The ComfyUI checkout this process runs (worker processes import ComfyUI from it)."""
    import comfy.sd  # comfy is a namespace package: no __file__ of its own

    return Path(comfy.sd.__file__).resolve().parents[1]
