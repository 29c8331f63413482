"""The pack's side of the benchmarks: one configuration's training steps, timed and measured, in
this process (peak RSS is per process, so every configuration runs in a fresh one).

ComfyUI is imported headless as main.py does (tests/comfyui_runtime.py) and loads the checkpoint
with its own loader under ``torch.inference_mode()``, as the executor does; the trainers run
exactly as the nodes run them, minus the node (``TextualInversionTrainer.step``,
``DreamBoothTrainer.step``). Prints one JSON line::

    python tests/benchmarks/pack_side.py --mode ti --unet sd15-full --resolution 512 --steps 3

Latents are encoded once and frozen prompts too (the reference loops redo both every step);
with prior preservation the class latents are random stand-ins (generating class images is not
part of a step). The CPU figures: wall seconds per step, process CPU seconds per step, and
"training adds" = peak RSS during set-up and training minus RSS with the models loaded; on
CUDA, peak allocated memory.
"""

from __future__ import annotations

import argparse
import json
import os
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

from reference_loops import SDXL_UNET_CONFIGS, UNET_CONFIGS, default_checkpoint, peak_rss_mb, reset_peak_rss  # noqa: E402
from reference_loops import _memory_snapshot as snapshot  # noqa: E402

MODES = ("ti", "lora", "full")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import comfyui_runtime

    comfyui_runtime.start(Path(tempfile.mkdtemp(prefix="personalize-bench-")), cpu=args.device == "cpu", load_extra_nodes=False)
    import comfy.model_management
    import comfy.sd
    import torch

    pack = comfyui_runtime.pack_module
    images_module = pack("nodes.core.training_images")
    path = args.checkpoint or default_checkpoint(unet=args.unet)
    device = comfy.model_management.get_torch_device()
    result: dict[str, Any] = {
        "impl": "comfyui-personalize",
        "mode": args.mode,
        "unet": args.unet,
        "checkpoint": str(path),
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "prior_preservation": args.prior,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "device": str(device),
        "precision": args.precision,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }
    result.update(snapshot(device, "before_load"))
    began = time.perf_counter()
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
        if args.unet in SDXL_UNET_CONFIGS:
            # SDXL: the UNet built in memory (random weights, stored as SDXL checkpoints store
            # it), its two real-size text encoders; the SD VAE (SDXL's has its architecture).
            import folder_paths
            import tiny_models

            model = tiny_models.build_sdxl_model(full=args.unet == "sdxl", dtype=torch.float16 if device.type == "cuda" else torch.float32)
            clip = tiny_models.load_sdxl_clip(
                tiny_models.cached_sdxl_text_encoders(comfyui_runtime.MODEL_CACHE), folder_paths.get_folder_paths("embeddings")
            )
    result["load_s"] = round(time.perf_counter() - began, 2)
    result.update(snapshot(device, "after_load"))
    result["peak_rss_reset"] = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    generator = torch.Generator().manual_seed(args.seed)
    pixels = torch.rand(max(4, args.batch_size), args.resolution, args.resolution, 3, generator=generator)
    images = images_module.TrainingImageSet.from_image_batch(pixels)
    began = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        if args.mode == "ti":
            ti = pack("nodes.training.textual_inversion")
            settings = ti.TextualInversionSettings(
                trigger_word="<bench>",
                init_text="cat",
                steps=args.warmup + args.steps,
                batch_size=args.batch_size,
                resolution=args.resolution,
                bucketing=False,
                save=False,
                seed=args.seed,
                precision=args.precision,
            )
            init, _ = ti.initial_vectors(settings, clip, None)
            trainer = ti.TextualInversionTrainer(model, clip, vae, images, settings, init)
            trainable = list(trainer.vectors.values())
            unet = trainer.unet
        else:
            db = pack("nodes.training.dreambooth")
            settings = db.DreamBoothSettings(
                mode=args.mode,
                prior_preservation=args.prior,
                num_class_images=max(4, args.batch_size),
                steps=args.warmup + args.steps,
                resolution=args.resolution,
                batch_size=args.batch_size,
                bucketing=False,
                seed=args.seed,
                gradient_checkpointing=args.gradient_checkpointing,
                save=False,
                lora_rank=args.lora_rank,
                lora_alpha=float(args.lora_rank),  # the reference's DreamBooth LoRA rank (diffusers' default 4)
                full_bf16=not args.no_full_bf16,
                fused_backward=not args.no_fused_backward,
                precision=args.precision,
            )
            class_raw = None
            if args.prior:
                channels = model.get_model_object("latent_format").latent_channels
                class_raw = torch.randn(
                    settings.num_class_images, channels, args.resolution // 8, args.resolution // 8, generator=generator
                )
            plan = db.validate(settings, images, model, clip, None)
            trainer = db.DreamBoothTrainer(model, clip, vae, images, settings, plan, class_raw=class_raw)
            trainable = trainer.params
            unet = trainer.unet
            result["ran_full_bf16"], result["ran_fused_backward"] = trainer.bf16, trainer.fused
        result["notes"] = list(trainer.notes)
        result["compute_dtype"] = str(unet.compute_dtype).removeprefix("torch.")
        result["trainable_params"] = sum(p.numel() for p in trainable)
        result["setup_s"] = round(time.perf_counter() - began, 2)
        result.update(snapshot(device, "after_setup"))
        times, cpu_times, losses = [], [], []
        for step in range(1, args.warmup + args.steps + 1):
            _sync(device)
            began, cpu_began = time.perf_counter(), time.process_time()
            losses.append(trainer.step(step)["loss"])
            _sync(device)
            if step > args.warmup:
                times.append(time.perf_counter() - began)
                cpu_times.append(time.process_time() - cpu_began)
    result.update(snapshot(device, "end"))
    result["s_per_step"] = round(statistics.fmean(times), 4)
    result["s_per_step_min"] = round(min(times), 4)
    result["step_times_s"] = [round(t, 4) for t in times]
    # CPU seconds of this process per step: steadier than wall time on a shared machine.
    result["cpu_s_per_step"] = round(statistics.fmean(cpu_times), 4)
    result["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["losses"] = [round(v, 6) for v in losses]
    result["train_overhead_peak_rss_mb"] = round(result["peak_rss_end_mb"] - result["rss_after_load_mb"], 1)
    result["peak_rss_mb"] = round(max(result["peak_rss_after_load_mb"], result["peak_rss_end_mb"], peak_rss_mb()), 1)
    if device.type == "cuda":
        result["cuda_peak_mb"] = result["cuda_peak_end_mb"]
        result["train_overhead_cuda_peak_mb"] = round(result["cuda_peak_end_mb"] - result["cuda_allocated_after_load_mb"], 1)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--unet", choices=tuple(UNET_CONFIGS), default="tiny")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--prior", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--no-full-bf16", action="store_true")
    p.add_argument("--no-fused-backward", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    print(json.dumps(run(parser().parse_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
