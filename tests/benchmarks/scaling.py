"""Training on several processes: step throughput and memory per process for 1 and N, side by side.

The node's own path: ``launcher.run_job`` exports the model, starts the workers with torchrun
(one per device) and follows rank 0; nothing here is a stand-in. For each mode it runs one
worker (the reference) and N workers; full fine-tuning also runs N workers with the optimizer
state replicated (plain data parallelism) next to the sharded default (ZeRO stage 2)::

    python tests/benchmarks/scaling.py --device cuda --processes 1,8 --unet sd15-full --resolution 512
    python tests/benchmarks/scaling.py --device cpu --processes 1,2 --unet sd15-full --resolution 256
    python tests/benchmarks/scaling.py --quick      # CI: tiny model, 64², CPU, 1 and 2 workers

Figures: seconds per step from rank 0's progress timestamps (the median gap between steps after
the first, so loading and warm-up are left out); throughput = images per second of all workers
(each computes batch size × gradient accumulation images a step); scaling = throughput over N
times the one-worker throughput (the target on GPUs is ≥ 0.9); peak memory per worker (GPU: peak
allocated; CPU: peak RSS; both include the loaded model), what training adds to the memory the
loaded model holds, and the optimizer state per worker. On a CPU
the workers share the cores (torchrun gives each one thread when there are several), so CPU
scaling says nothing of GPU scaling. Printed and written to ``--out``; nothing is asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
TESTS_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(TESTS_DIR))

from benchmark import LABEL, MODES, add_run_arguments, machine  # noqa: E402
from reference_loops import default_checkpoint  # noqa: E402


def settings_for(pack: Any, mode: str, args: argparse.Namespace) -> tuple[str, Any]:
    common = dict(steps=args.steps, resolution=args.resolution, batch_size=args.batch_size, bucketing=False, save=False, seed=0)
    if mode == "ti":
        ti = pack("nodes.training.textual_inversion")
        return "textual_inversion", ti.TextualInversionSettings(trigger_word="<scaling>", init_text="cat", **common)
    db = pack("nodes.training.dreambooth")
    return "dreambooth", db.DreamBoothSettings(
        mode=mode, prior_preservation=False, lora_rank=4, lora_alpha=4.0, full_bf16=True, fused_backward=True, **common
    )


def devices_for(device: str, processes: int) -> list[str]:
    return ["cpu"] * processes if device == "cpu" else [f"cuda:{i}" for i in range(processes)]


def measure(pack: Any, models: tuple, images: Any, mode: str, processes: int, shard: bool, args: argparse.Namespace) -> dict[str, Any]:
    launcher = pack("nodes.scaleout.launcher")
    trainer, settings = settings_for(pack, mode, args)
    began = time.perf_counter()
    job = launcher.run_job(
        trainer, *models, images, settings, devices_for(args.device, processes), kind=trainer, shard_optimizer_state=shard
    )
    wall = time.perf_counter() - began
    records, _ = job.read_progress(0)
    times = [r["time"] for r in records if "step" in r]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    s_per_step = statistics.median(gaps) if gaps else float("nan")
    states = [json.loads(p.read_text()) for p in sorted(job.path.glob("state-rank-*.json"))]
    images_per_step = processes * settings.batch_size * settings.gradient_accumulation
    return {
        "mode": mode,
        "processes": processes,
        "sharded": shard and mode == "full" and processes > 1,
        "device": args.device,
        "unet": args.unet,
        "resolution": args.resolution,
        "batch_size": settings.batch_size,
        "steps": settings.steps,
        "s_per_step": round(s_per_step, 4),
        "images_per_s": round(images_per_step / s_per_step, 4),
        "peak_memory_mb_per_process": [round(s["peak_memory_bytes"] / 2**20, 1) for s in states],
        "training_adds_mb_per_process": [round((s["peak_memory_bytes"] - s["loaded_memory_bytes"]) / 2**20, 1) for s in states],
        "optimizer_state_mb_per_process": [round(s["optimizer_state_bytes"] / 2**20, 1) for s in states],
        "wall_s": round(wall, 1),
        "job": str(job.path),
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    one = {r["mode"]: r for r in rows if r["processes"] == 1}
    lines = [
        "| mode | workers | optimizer state | s/step | images/s | scaling vs 1 worker | peak per worker MB | training adds per worker MB "
        "| optimizer state per worker MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        base = one.get(r["mode"])
        scaling = f"{r['images_per_s'] / (r['processes'] * base['images_per_s']):.2f}" if base and r["processes"] > 1 else "(reference)"
        state = "sharded" if r["sharded"] else ("—" if r["mode"] != "full" else "whole")
        peak = max(r["peak_memory_mb_per_process"])
        adds = max(r["training_adds_mb_per_process"])
        opt = max(r["optimizer_state_mb_per_process"]) if r["mode"] != "ti" else float("nan")
        lines.append(
            f"| {LABEL[r['mode']]} | {r['processes']} | {state} | {r['s_per_step']:.3f} | {r['images_per_s']:.3f} | {scaling} | "
            f"{peak:.0f} | {adds:.0f} | {'' if opt != opt else f'{opt:.0f}'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(p, steps=5, steps_help="steps per run (the first gap is left out)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--processes", default="", help="worker counts, e.g. 1,8 (default: 1 and every GPU; on the CPU 1,2)")
    p.add_argument("--quick", action="store_true", help="tiny model, 64², CPU, 1 and 2 workers, 3 steps")
    p.add_argument("--out", type=Path, default=TESTS_DIR / "artifacts" / "benchmarks")
    args = p.parse_args(argv)
    if args.quick:
        args.unet, args.resolution, args.device, args.steps, args.processes = "tiny", 64, "cpu", 3, "1,2"

    import comfyui_runtime

    comfyui_runtime.start(Path(tempfile.mkdtemp(prefix="personalize-scaling-")), cpu=args.device == "cpu", load_extra_nodes=False)
    import comfy.sd
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu)")
    counts = (
        [int(n) for n in args.processes.split(",")] if args.processes else [1, torch.cuda.device_count() if args.device == "cuda" else 2]
    )
    pack = comfyui_runtime.pack_module
    with torch.inference_mode():
        models = tuple(
            comfy.sd.load_checkpoint_guess_config(str(default_checkpoint(unet=args.unet)), output_vae=True, output_clip=True)[:3]
        )
    pixels = torch.rand(
        max(4, 2 * args.batch_size * max(counts)), args.resolution, args.resolution, 3, generator=torch.Generator().manual_seed(0)
    )
    images = pack("nodes.core.training_images").TrainingImageSet.from_image_batch(pixels)

    rows = []
    for mode in MODES if args.mode == "all" else (args.mode,):
        for processes in counts:
            for shard in (True, False) if mode == "full" and processes > 1 else (True,):
                with torch.inference_mode():
                    row = measure(pack, models, images, mode, processes, shard, args)
                print(json.dumps(row), flush=True)
                rows.append(row)
    header = f"Machine: {machine()}; torch {torch.__version__}; {args.unet} at {args.resolution}², batch {args.batch_size} per worker"
    text = header + "\n\n" + table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"scaling-{args.unet}-{args.device}-{time.strftime('%Y-%m-%d')}"
    (args.out / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (args.out / f"{stem}.md").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
