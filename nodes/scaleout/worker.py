"""The entry point of a training worker process: ``torchrun ... worker.py --job JOB/job.json``.

Run as a script (torchrun and accelerate start files, not modules): it imports ComfyUI from the
checkout the node runs in, the way ComfyUI's main.py does, configures ComfyUI's folders as the
node's process has them, then imports this pack under a package name of its own and runs
``worker_main``. No ComfyUI server is started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[2]
PACKAGE = "personalize_pack"


def _start_comfyui(job: dict, device: str) -> None:
    comfy_dir = job["comfy_dir"]
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args
    import comfy.options  # argument parsing stays off: our argv is not ComfyUI's

    comfy.cli_args.args.cpu = device == "cpu"
    comfy.cli_args.args.disable_dynamic_vram = True  # a worker's weights are its own: plain loading
    # main.py imports utils.extra_config before anything that makes `utils` mean comfy/utils.py.
    import folder_paths
    import utils.extra_config  # noqa: F401

    for name, paths in job["folders"].items():
        extensions = folder_paths.folder_names_and_paths.get(name, ([], folder_paths.supported_pt_extensions))[1]
        folder_paths.folder_names_and_paths[name] = (list(paths), extensions)
    if job["folders"].get("temp"):
        folder_paths.set_temp_directory(job["folders"]["temp"][0])


def _import_pack() -> types.ModuleType:
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(PACK_DIR)]
    sys.modules[PACKAGE] = package
    import importlib

    return importlib.import_module(f"{PACKAGE}.nodes.scaleout.worker_main")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", type=Path, required=True)
    args = parser.parse_args(argv)
    job = json.loads(args.job.read_text(encoding="utf-8"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if job["devices"]:
        device = job["devices"][local_rank % len(job["devices"])]
    else:  # started by accelerate launch: its config decides
        import torch

        device = "cuda" if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "") in ("", "0", "false") else "cpu"
    if device != "cpu":
        import torch

        torch.cuda.set_device(local_rank)  # the node lists the GPUs in CUDA_VISIBLE_DEVICES, in order
    _start_comfyui(job, device)
    return _import_pack().run(args.job.parent, device)


if __name__ == "__main__":
    sys.exit(main())
