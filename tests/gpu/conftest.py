"""CUDA-only tests: every path that runs on NVIDIA GPUs only. They skip without CUDA.

They need ComfyUI started on the GPU, so they run on their own (``pytest tests/gpu``); in a run
of the whole suite the integration tests start ComfyUI with ``--cpu`` first, and these skip
saying so. ``python tests/benchmarks/gpu_report.py`` runs them and prints the result with the
GPU figures.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch

GPU_DIR = Path(__file__).resolve().parent


def _why_not() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device: the GPU paths run on a GPU machine (python tests/benchmarks/gpu_report.py)"
    if "comfy.cli_args" in sys.modules and sys.modules["comfy.cli_args"].args.cpu:
        return "ComfyUI was started on the CPU by other tests of this run: run `pytest tests/gpu` on its own"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _why_not()
    if reason is None:
        return
    for item in items:
        if GPU_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def comfyui_on_gpu() -> Path:
    import comfyui_runtime

    if "comfy.model_management" in sys.modules:
        return comfyui_runtime.find_comfyui()
    return comfyui_runtime.start(Path(tempfile.mkdtemp(prefix="personalize-gpu-tests-")), cpu=False)


@pytest.fixture(scope="session")
def sd15_path(comfyui_on_gpu) -> Path:
    import comfyui_runtime

    return comfyui_runtime.tiny_checkpoint("sd15")


@pytest.fixture(scope="session")
def sd15(sd15_path) -> dict:
    from gpu_models import load

    return load(sd15_path)
