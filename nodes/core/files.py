"""Files in a models folder: names that cannot leave it, writes that cannot leave half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def resolve_inside(directory: str | os.PathLike, name: str, extension: str) -> Path:
    """The file path for ``name`` under ``directory``; refuses names that would leave it."""
    if not name or not name.strip():
        raise ValueError("the file name is empty: give the file a name")
    if "\x00" in name:
        raise ValueError("the file name contains a NUL character")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"'{name}' is an absolute path: give a name relative to the models folder")
    parts = Path(name.replace("\\", "/")).parts
    if ".." in parts:
        raise ValueError(f"'{name}' would leave the models folder ('..' is not allowed in names)")
    if not name.lower().endswith(extension):
        name = name + extension
    root = Path(directory).resolve()
    target = (root / name).resolve()
    if os.path.commonpath([root, target]) != str(root):
        raise ValueError(f"'{name}' would leave the models folder {root}")
    return target


def atomic_write(target: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Write through a temporary file in the same folder, then rename over the target.

    A crash mid-write leaves the previous file (or none) in place, never half a file.
    """
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target.name} already exists in {target.parent}; choose another name or allow overwriting")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        with open(temp, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target
