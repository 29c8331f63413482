"""Start ComfyUI in-process the way its main.py does on NVIDIA, DynamicVRAM included.

main.py (v0.16+), in this order: imports cuda_malloc before torch (cudaMallocAsync for +cu13x
torch), calls comfy_aimdo.control.init() before torch is imported, imports execution/server/
nodes/model_management, then -- when enables_dynamic_vram() and the GPU is NVIDIA -- calls
comfy_aimdo.control.init_devices(...), makes ModelPatcherDynamic the CoreModelPatcher and sets
comfy.memory_management.aimdo_enabled. tests/comfyui_runtime.start() does none of this, so
tests/gpu runs the legacy patcher unless started with this module's plugin:

    PYTHONPATH=tests/gpu python -m pytest -p dynamic_vram_plugin tests/gpu

pre_torch() must run before anything imports torch; enable() after comfy.model_management is
importable (it imports it), before the checkpoints are loaded.
"""

from __future__ import annotations

import logging
import os
import sys

STATE: dict = {}


def _comfy_dir() -> str:
    path = os.environ["COMFYUI_PATH"]
    if path not in sys.path:
        sys.path.insert(0, path)
    return path


def pre_torch() -> dict:
    _comfy_dir()
    STATE["torch_imported_before_aimdo_init"] = "torch" in sys.modules
    import comfy.options  # noqa: F401  (argument parsing stays off: defaults, as the tests)
    import cuda_malloc  # noqa: F401  (main.py: sets PYTORCH_CUDA_ALLOC_CONF before torch)
    from comfy.cli_args import enables_dynamic_vram

    STATE["PYTORCH_CUDA_ALLOC_CONF"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    import comfy_aimdo.control

    STATE["enables_dynamic_vram"] = enables_dynamic_vram()
    if enables_dynamic_vram():
        try:
            STATE["aimdo_init"] = comfy_aimdo.control.init(simple_vram_headroom=None)
        except TypeError:
            STATE["aimdo_init"] = comfy_aimdo.control.init()
    return STATE


def enable() -> dict:
    """main.py's DynamicVRAM block (after `import utils.extra_config` as main.py orders it)."""
    _comfy_dir()
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher
    import comfy_aimdo.control
    import folder_paths  # noqa: F401
    import utils.extra_config  # noqa: F401  (before nodes, as main.py)
    from comfy.cli_args import args, enables_dynamic_vram

    mm = comfy.model_management
    if args.enable_dynamic_vram or (enables_dynamic_vram() and mm.is_nvidia() and not mm.is_wsl()):
        if (not args.enable_dynamic_vram) and mm.torch_version_numeric < (2, 8):
            STATE["dynamic_vram"] = "torch < 2.8: legacy ModelPatcher"
        else:
            try:
                ok = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024**3)) for d in mm.get_all_torch_devices())
            except TypeError:
                ok = comfy_aimdo.control.init_devices(d.index for d in mm.get_all_torch_devices())
            STATE["aimdo_init_devices"] = ok
            if ok:
                comfy_aimdo.control.set_log_info()
                comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
                comfy.memory_management.aimdo_enabled = True
                logging.info("DynamicVRAM support detected and enabled")
                STATE["dynamic_vram"] = "enabled"
            else:
                STATE["dynamic_vram"] = "comfy-aimdo init_devices failed: legacy ModelPatcher"
    else:
        STATE["dynamic_vram"] = "not enabled by ComfyUI's own rule"
    return STATE
