"""One call on a CUDA machine: the GPU figures, side by side with the reference loops, and the
CUDA-only tests.

    python tests/benchmarks/gpu_report.py                       # on a GPU machine, under 8 minutes on one H100
    python tests/benchmarks/gpu_report.py --device cpu --quick  # the same code on the CPU, tiny models (CI)

Figures, each from a fresh process per side (``benchmark.measure``): Textual Inversion, DreamBooth
LoRA and DreamBooth full at 512² on a random-weight UNet of SD1.5's real size (860M parameters,
full CLIP-L and VAE), and DreamBooth LoRA at 1024² on an SDXL-size one (2.6B parameters, both
real-size text encoders); iterations per second and peak GPU memory (what the process holds,
the loaded models included). The pack runs with its defaults (precision auto: the model's own
float16; full mode bf16 with the fused step), the reference as the diffusers examples run under
``accelerate launch --mixed_precision fp16``. Then ``pytest tests/gpu`` and its result line.
Targets, printed next to the figures: SD1.5 Textual Inversion at least 20 it/s under 6 GB,
DreamBooth full under 12 GB, LoRA under 8 GB, each ahead of its reference.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
TESTS_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import benchmark  # noqa: E402

# (mode, UNet, resolution, timed steps, warm-up steps, memory limit MB or None, it/s floor or None)
GPU_RUNS = (
    ("ti", "sd15-full", 512, 20, 5, 6 * 1024, 20.0),
    ("lora", "sd15-full", 512, 20, 5, 8 * 1024, None),
    ("full", "sd15-full", 512, 10, 3, 12 * 1024, None),
    ("lora", "sdxl", 1024, 8, 2, None, None),
)
QUICK_RUNS = (
    ("ti", "tiny", 64, 1, 1, None, None),
    ("lora", "tiny", 64, 1, 1, None, None),
    ("full", "tiny", 64, 1, 1, None, None),
    ("lora", "sdxl-tiny", 64, 1, 1, None, None),
)


def _gpu_name(device: str) -> str:
    if not device.startswith("cuda"):
        return benchmark.machine()
    import torch

    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"


def _memory_mb(side: dict[str, Any]) -> float | None:
    return side.get("cuda_peak_mb", side.get("peak_rss_mb"))


def _row(run: tuple, measured: dict[str, Any]) -> str:
    mode, unet, resolution, _, _, limit, floor = run
    ours, ref = measured["pack"], measured["reference"]
    its, ref_its = 1 / ours["s_per_step"], 1 / ref["s_per_step"]
    mem, ref_mem = _memory_mb(ours), _memory_mb(ref)
    checks = ["faster" if its > ref_its else "SLOWER than the reference"]
    # Peaks include the loaded models (the SDXL reference loads no text encoder): the verdict
    # compares what training adds, as benchmark.py does.
    adds, ref_adds = benchmark.memory_added(ours), benchmark.memory_added(ref)
    if adds is not None and ref_adds is not None:
        checks.append("adds less memory" if adds <= ref_adds else "adds MORE memory than the reference")
    if limit is not None:
        checks.append(f"{'under' if mem < limit else 'OVER'} {limit / 1024:.0f} GB")
    if floor is not None:
        checks.append(f"{'at least' if its >= floor else 'BELOW'} {floor:g} it/s")
    return (
        f"| {benchmark.LABEL[mode]}, {unet}, {resolution}² | {its:.2f} | {ref_its:.2f} | {mem:.0f} | {ref_mem:.0f} | "
        f"{ours.get('compute_dtype', '?')} / {ref.get('mixed_precision', '?')} | {', '.join(checks)} |"
    )


def gpu_tests() -> str:
    """``pytest tests/gpu`` in a process of its own (it starts ComfyUI on the GPU); its result line."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(TESTS_DIR / "gpu"), "-q", "-rs", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        cwd=TESTS_DIR,
        timeout=1800,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode not in (0, 5):
        print(proc.stdout[-6000:], proc.stderr[-3000:], file=sys.stderr)
    return lines[-1] if lines else f"pytest printed nothing (exit {proc.returncode}): {proc.stderr[-500:]}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny models, one step each (runs on the CPU: CI keeps it working)")
    p.add_argument("--out", type=Path, default=TESTS_DIR / "artifacts" / "benchmarks")
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)
    runs = QUICK_RUNS if args.quick else GPU_RUNS
    began = time.monotonic()
    print(f"GPU report: {_gpu_name(args.device)}; device {args.device}", flush=True)
    lines = [
        "| configuration | pack it/s | reference it/s | pack peak MB | reference peak MB | compute (pack / reference) | targets |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    failures = 0
    for run in runs:
        mode, unet, resolution, steps, warmup, _, _ = run
        options = argparse.Namespace(
            steps=steps,
            warmup=warmup,
            seed=0,
            device=args.device,
            unet=unet,
            prior=False,
            gradient_checkpointing=False,
            precision="auto",
            no_full_bf16=False,
            no_fused_backward=False,
            reference_precision="no" if args.device == "cpu" else "fp16",
            timeout=args.timeout,
        )
        try:
            measured = benchmark.measure(mode, resolution, 1, options, benchmark._checkpoint(unet, args.timeout))
            lines.append(_row(run, measured))
        except Exception as error:  # one configuration failing must not hide the others
            failures += 1
            lines.append(f"| {benchmark.LABEL[mode]}, {unet}, {resolution}² | failed: {str(error).splitlines()[0][:200]} | | | | | |")
        print(lines[-1], flush=True)
    tests = gpu_tests()
    report = "\n".join([*lines, "", f"tests/gpu: {tests}", f"report took {(time.monotonic() - began) / 60:.1f} min"])
    print("\n" + report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu-report-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(f"{_gpu_name(args.device)}\n\n{report}\n", encoding="utf-8")
    return 1 if failures or "failed" in tests else 0


if __name__ == "__main__":
    sys.exit(main())
