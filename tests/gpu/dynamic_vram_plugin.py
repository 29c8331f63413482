"""pytest plugin (-p dynamic_vram_plugin, with tests/gpu on PYTHONPATH): run tests/gpu with ComfyUI started as main.py starts it on
NVIDIA, DynamicVRAM (ModelPatcherDynamic) on. Loaded before the conftests import torch."""

from __future__ import annotations

import os
import sys

import dynamic_vram as dynvram

dynvram.pre_torch()


def pytest_configure(config):
    tests = os.path.join(os.getcwd(), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import comfyui_runtime

    original = comfyui_runtime.start

    def start(base_dir, cpu=True, load_extra_nodes=True):
        if not cpu:
            dynvram.enable()
            print(f"\n[dynamic_vram_plugin] {dynvram.STATE}", flush=True)
        return original(base_dir, cpu=cpu, load_extra_nodes=load_extra_nodes)

    comfyui_runtime.start = start


def pytest_terminal_summary(terminalreporter):
    import comfy.model_patcher

    terminalreporter.write_line(
        f"[dynamic_vram_plugin] state {dynvram.STATE}; CoreModelPatcher = {comfy.model_patcher.CoreModelPatcher.__name__}"
    )
