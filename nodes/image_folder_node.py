"""The "Image Folder (training)" node: a folder of images with caption files, for both trainers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .comfy_bridge import folders
from .core.training_images import IMAGE_EXTENSIONS, load_image_folder
from .graph_types import CATEGORY, TRAINING_IMAGES

NO_FOLDER = "(none: use the path)"


def resolve_folder(folder: str, path: str, allow_any_path: bool) -> Path:
    """The folder to read: ``path`` when given, else ``folder`` under the input directory."""
    root = folders.input_directory().resolve()
    if path.strip():
        candidate = Path(path.strip()).expanduser()
        if not candidate.is_absolute():
            candidate = root / candidate
    elif folder and folder != NO_FOLDER:
        candidate = root / folder
    else:
        raise ValueError("no folder chosen: pick one under ComfyUI's input folder, or type a path")
    candidate = candidate.resolve()
    inside = os.path.commonpath([root, candidate]) == str(root)
    if not inside and not allow_any_path:
        raise ValueError(
            f"{candidate} is outside ComfyUI's input folder ({root}). Move the images there, "
            "or turn on 'allow_any_path' (only on a machine you alone use: it lets the graph read any folder)."
        )
    return candidate


class ImageFolder:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": (
                    [NO_FOLDER, *folders.input_subfolders()],
                    {
                        "tooltip": "A folder under ComfyUI's input folder holding the training images (png, jpg, webp) and optional same-name .txt captions."
                    },
                ),
                "path": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Or a path typed here (absolute, or relative to the input folder); used instead of 'folder' when not empty.",
                    },
                ),
                "on_bad_file": (
                    ["skip", "stop"],
                    {"default": "skip", "tooltip": "An unreadable or truncated image: skip it with a warning, or stop with its name."},
                ),
                "recursive": ("BOOLEAN", {"default": False, "tooltip": "Also read images in subfolders."}),
                "allow_any_path": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Allow a path outside ComfyUI's input folder. Leave off on a shared server."},
                ),
            }
        }

    RETURN_TYPES = (TRAINING_IMAGES, "INT")
    RETURN_NAMES = ("image_set", "count")
    OUTPUT_TOOLTIPS = ("The images with captions, for Train Textual Inversion or DreamBooth Fine-tune.", "How many images were read.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Load a folder of training images with optional .txt captions; sizes and aspect ratios are kept (the trainers bucket them)."
    )

    @classmethod
    def IS_CHANGED(cls, folder: str = NO_FOLDER, path: str = "", recursive: bool = False, allow_any_path: bool = False, **kwargs):
        # Re-read when files are added, removed or edited, not only when the inputs change.
        try:
            root = resolve_folder(folder, path, allow_any_path)
        except ValueError:
            return float("nan")
        digest = hashlib.sha256()
        pattern = "**/*" if recursive else "*"
        for file in sorted(root.glob(pattern)):
            if file.suffix.lower() in (*IMAGE_EXTENSIONS, ".txt") and file.is_file():
                stat = file.stat()
                digest.update(f"{file.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return digest.hexdigest()

    def load(self, folder: str, path: str, on_bad_file: str, recursive: bool, allow_any_path: bool):
        image_set = load_image_folder(resolve_folder(folder, path, allow_any_path), on_bad_file=on_bad_file, recursive=recursive)
        return (image_set, len(image_set.images))
