"""The pack's pure training core (nodes/core), imported on its own: no ComfyUI, no pack __init__.

``core("optimizers")`` is ``nodes/core/optimizers.py`` as module ``personalize_core.optimizers``.
The unit tests use it, so they run (and pass) on a machine that has no ComfyUI at all.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACK_DIR = Path(__file__).resolve().parents[1]
CORE_DIR = PACK_DIR / "nodes" / "core"
PACKAGE = "personalize_core"
MODULES = sorted(p.stem for p in CORE_DIR.glob("*.py") if p.stem != "__init__")


def _package() -> ModuleType:
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, CORE_DIR / "__init__.py", submodule_search_locations=[str(CORE_DIR)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return sys.modules[PACKAGE]


def core(name: str) -> ModuleType:
    _package()
    return importlib.import_module(f"{PACKAGE}.{name}")
