"""Textual Inversion speed and memory: this pack's training step next to a diffusers reference loop.

    python tests/benchmarks/textual_inversion_benchmark.py --compare --resolution 64 --steps 10
    python tests/benchmarks/textual_inversion_benchmark.py --compare --resolution 512 --steps 3

Both run on the same weights (the tiny random-weight SD1.5 checkpoint the tests build, or
``--checkpoint``), each in a fresh process because peak RSS only grows within a process.
The reference (``reference_loops.py``) does what diffusers' textual_inversion example does:
VAE-encode every step, the whole token-embedding matrix in AdamW. The pack caches latents
once and trains only the new vectors. A benchmark, not a test: figures are printed, never
asserted, since timings depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def run_pack(checkpoint: Path | None, resolution: int, steps: int, warmup: int, batch_size: int, seed: int, device: str) -> dict[str, Any]:
    import tempfile

    import comfyui_runtime

    comfyui_runtime.start(Path(tempfile.mkdtemp(prefix="personalize-bench-")), cpu=(device == "cpu"), load_extra_nodes=False)
    import comfy.sd
    import comfy.utils
    import torch

    import reference_loops as ref

    checkpoint = checkpoint or comfyui_runtime.tiny_checkpoint("sd15")
    ti = comfyui_runtime.pack_module("nodes.textual_inversion")
    images_module = comfyui_runtime.pack_module("nodes.training_images")
    torch_device = torch.device(device)
    result: dict[str, Any] = {
        "impl": "comfyui-personalize", "method": "ti", "checkpoint": str(checkpoint), "resolution": resolution,
        "batch_size": batch_size, "steps": steps, "warmup_steps": warmup, "seed": seed, "device": device,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }
    result.update(ref._memory_snapshot(torch_device, "before_load"))
    start = time.perf_counter()
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True)[:3]
    result["load_s"] = round(time.perf_counter() - start, 3)
    result.update(ref._memory_snapshot(torch_device, "after_load"))
    result["peak_rss_reset"] = ref.reset_peak_rss()
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(4, resolution, resolution, 3, generator=generator)
    images = images_module.TrainingImageSet.from_image_batch(pixels)
    settings = ti.TextualInversionSettings(
        trigger_word="<bench>", init_text="cat", steps=warmup + steps, learning_rate="0.005",
        batch_size=batch_size, resolution=resolution, save=False, seed=seed,
    )
    stamps: list[tuple[float, float]] = []

    def on_step(value: int, total: int, preview: Any, node_id: Any = None) -> None:
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append((time.perf_counter(), time.process_time()))

    comfy.utils.set_progress_bar_global_hook(on_step)
    begin = (time.perf_counter(), time.process_time())
    with torch.inference_mode():
        run = ti.train_textual_inversion(model, clip, vae, images, settings, node_id="bench")
    comfy.utils.set_progress_bar_global_hook(None)
    result["setup_and_train_s"] = round(time.perf_counter() - begin[0], 3)
    # The hook fires after each step; the first stamps cover caching latents and warm-up.
    marks = stamps[: warmup + steps]
    times = [b[0] - a[0] for a, b in zip(marks[warmup - 1 : -1], marks[warmup:])] if warmup else []
    cpu_times = [b[1] - a[1] for a, b in zip(marks[warmup - 1 : -1], marks[warmup:])] if warmup else []
    return ref._finish_result(result, times, cpu_times, run.losses.raw["loss"], torch_device)


def compare(args: argparse.Namespace) -> None:
    import reference_loops as ref

    common = ["--resolution", str(args.resolution), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--device", args.device]
    if args.checkpoint:
        common += ["--checkpoint", str(args.checkpoint)]
    ours = ref.run_json_command([sys.executable, str(Path(__file__).resolve()), *common])
    reference = ref.run_json_command([sys.executable, str(HERE / "reference_loops.py"), "--ti", *common])
    rows = [
        ("s/step (mean)", "s_per_step"), ("s/step (median)", "s_per_step_median"), ("s/step (min)", "s_per_step_min"),
        ("peak RSS MB (process)", "peak_rss_mb"), ("peak RSS MB (training)", "peak_rss_train_mb"),
        ("RSS MB after load", "rss_after_load_mb"), ("training overhead MB", "train_overhead_peak_rss_mb"),
    ]
    if args.device.startswith("cuda"):
        rows.append(("peak CUDA MB", "cuda_peak_mb"))
    print(f"Textual Inversion, {args.resolution}x{args.resolution}, batch {args.batch_size}, {args.steps} timed steps, device {args.device}")
    print(f"{'':28}{'this pack':>14}{'diffusers ref':>16}{'ratio':>10}")
    for label, key in rows:
        a, b = ours.get(key), reference.get(key)
        ratio = f"{b / a:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else ""
        print(f"{label:28}{a!s:>14}{b!s:>16}{ratio:>10}")
    print("(ratio = reference / pack: above 1 means the pack is faster or smaller)")
    print(json.dumps({"pack": ours, "reference": reference}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", action="store_true", help="run the pack and the reference, print side by side")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.compare:
        compare(args)
        return 0
    print(json.dumps(run_pack(args.checkpoint, args.resolution, args.steps, max(args.warmup, 1), args.batch_size, args.seed, args.device)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
