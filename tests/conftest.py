"""Test layout: unit/ (the pure core, no ComfyUI), integration/ (a real ComfyUI, in-process),
browser/ (a real ComfyUI server and its front end), distributed/ (worker processes), gpu/
(CUDA only). Shared helpers live here in tests/: comfyui_runtime, tiny_models, core_package."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
