"""The training core imports with no ComfyUI anywhere: what headless workers and unit tests rely on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from core_package import MODULES

TESTS_DIR = Path(__file__).resolve().parents[1]

_BLOCK_COMFYUI = """
import importlib.abc, sys
COMFYUI = ("comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "nodes", "server", "execution", "latent_preview")
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in COMFYUI:
            raise ImportError(f"{name} is not importable in this test")
        return None
sys.meta_path.insert(0, Blocked())
"""


def test_every_core_module_imports_without_comfyui():
    assert len(MODULES) >= 12, MODULES
    code = (
        _BLOCK_COMFYUI
        + f"""
sys.path.insert(0, {str(TESTS_DIR)!r})
from core_package import MODULES, core
for name in MODULES:
    core(name)
loaded = sorted(k for k in sys.modules if k.split(".")[0] in COMFYUI)
assert not loaded, loaded
print(len(MODULES), "core modules imported")
"""
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(MODULES)} core modules imported" in result.stdout


def test_the_check_would_catch_an_import_of_comfyui():
    code = _BLOCK_COMFYUI + "import folder_paths\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "not importable in this test" in result.stderr
