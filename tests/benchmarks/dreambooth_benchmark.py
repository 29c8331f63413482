"""Our side of the DreamBooth benchmark: seconds per step and peak RSS of the training core.

An SD1.5 checkpoint of ``tests/tiny_models.py`` (the tiny one-level UNet, or with
``--unet sd15-full`` the real ~860M-param SD1.5 UNet, random weights) is loaded by ComfyUI itself (headless, the
pack loaded as a custom node by ``tests/comfyui_runtime.py``,
``comfy.sd.load_checkpoint_guess_config`` under ``torch.inference_mode()``, as the executor
loads it) and ``DreamBoothTrainer.step`` of ``nodes/dreambooth.py`` runs N timed steps after
warm-up ones. Peak RSS never goes down within a process, so every configuration runs in a
fresh process and prints one JSON line::

    python tests/benchmarks/dreambooth_benchmark.py                   # full/LoRA x prior off/on
    python tests/benchmarks/dreambooth_benchmark.py --one --mode lora --prior on --steps 5
    python tests/benchmarks/dreambooth_benchmark.py --compare         # side by side with the
                                                                      # diffusers reference loops
    python tests/benchmarks/dreambooth_benchmark.py --compare --unet sd15-full --mode full --prior off \
        --steps 2 --no-full-bf16 --no-fused-backward                  # full-size UNet, float32 path

Full mode runs the pack's defaults (``full_bf16`` and ``fused_backward`` on) unless
``--no-full-bf16`` / ``--no-fused-backward`` ask for the float32 path.

What a step includes differs from the reference loops by design: the pack VAE-encodes the
images once and encodes frozen prompts once, the reference examples do both every step.
With prior preservation the class images are random latents (the reference uses random
class pixels): generating them is not part of a training step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
TESTS_DIR = BENCH_DIR.parent
PACK_DIR = TESTS_DIR.parent
MODEL_CACHE = Path(os.environ.get("PERSONALIZE_TINY_MODELS", Path.home() / ".cache" / "comfy-personalize" / "tiny-models"))
CONFIGS = (("lora", False), ("lora", True), ("full", False), ("full", True))


# --------------------------------------------------------------------------- memory

# The same measurements as the reference loops, so the two columns compare.
sys.path.insert(0, str(BENCH_DIR))
from reference_loops import _memory_snapshot as _snapshot, peak_rss_mb, reset_peak_rss  # noqa: E402
from reference_loops import UNET_CONFIGS, detect_unet, run_json_command  # noqa: E402


# --------------------------------------------------------------------------- ComfyUI, headless


def start_comfyui(cpu: bool) -> None:
    """ComfyUI imported as main.py does (tests/comfyui_runtime.py), folders in a temporary directory."""
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    import comfyui_runtime

    comfyui_runtime.start(Path(tempfile.mkdtemp(prefix="dreambooth-bench-")), cpu=cpu, load_extra_nodes=False)


def pack_module(name: str) -> types.ModuleType:
    """A module of this pack as ComfyUI loaded it."""
    import comfyui_runtime

    return comfyui_runtime.pack_module(name)


# --------------------------------------------------------------------------- one configuration


def run_one(mode: str, prior: bool, *, steps: int, warmup: int, resolution: int, batch_size: int, seed: int,
            device: str, gradient_checkpointing: bool, checkpoint: Optional[Path] = None, unet: Optional[str] = None,
            full_bf16: bool = True, fused_backward: bool = True) -> dict[str, Any]:
    start_comfyui(cpu=device == "cpu")
    import torch

    import comfy.model_management
    import comfy.sd
    import tiny_models

    db = pack_module("nodes.dreambooth")
    images_mod = pack_module("nodes.training_images")
    path = checkpoint or tiny_models.cached_checkpoint(UNET_CONFIGS[unet or "tiny"][0], MODEL_CACHE)
    if unet is None:
        try:
            unet = detect_unet(path)
        except ValueError:
            unet = "other"
    torch_device = comfy.model_management.get_torch_device()
    result: dict[str, Any] = {
        "impl": "comfyui-personalize", "method": f"dreambooth_{mode}", "mode": mode, "prior_preservation": prior,
        "checkpoint": str(path), "unet": unet, "full_bf16": full_bf16, "fused_backward": fused_backward, "resolution": resolution, "batch_size": batch_size, "steps": steps, "warmup_steps": warmup,
        "seed": seed, "device": str(torch_device), "gradient_checkpointing": gradient_checkpointing,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "loadavg_start": list(os.getloadavg()),
    }
    result.update(_snapshot(torch_device, "before_load"))
    began = time.perf_counter()
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    result["load_s"] = round(time.perf_counter() - began, 3)
    result.update(_snapshot(torch_device, "after_load"))
    result["peak_rss_reset"] = reset_peak_rss()
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(max(4, batch_size), resolution, resolution, 3, generator=generator)
    images = images_mod.TrainingImageSet.from_image_batch(pixels)
    settings = db.DreamBoothSettings(
        mode=mode, prior_preservation=prior, num_class_images=max(4, batch_size), steps=warmup + steps, resolution=resolution,
        batch_size=batch_size, seed=seed, gradient_checkpointing=gradient_checkpointing, save=False, bucketing=False,
        lora_rank=4, lora_alpha=4.0,  # the reference's DreamBooth LoRA rank (diffusers' default)
        full_bf16=full_bf16, fused_backward=fused_backward,  # full mode only; LoRA ignores them
    )
    class_raw = None
    if prior:  # stand-ins for generated class images: a step costs the same with any latents
        class_raw = torch.randn(settings.num_class_images, 4, resolution // 8, resolution // 8, generator=generator)
    began = time.perf_counter()
    with torch.inference_mode():
        plan = db.validate(settings, images, model, clip, None)
        with torch.inference_mode(False), torch.enable_grad():
            trainer = db.DreamBoothTrainer(model, clip, vae, images, settings, plan, class_raw=class_raw)
            result["setup_s"] = round(time.perf_counter() - began, 3)
            result.update(_snapshot(torch_device, "after_setup"))
            result["trainable_params"] = sum(p.numel() for p in trainer.params)
            # What the trainer's memory plan made of the two settings (off in LoRA mode, or
            # when the optimiser / accumulation rule them out; its notes say why).
            result["ran_full_bf16"] = bool(getattr(trainer, "bf16", False))
            result["ran_fused_backward"] = bool(getattr(trainer, "fused", False))
            result["memory_notes"] = list(getattr(trainer, "notes", []) or [])
            times, cpu_times, losses = [], [], []
            for step in range(1, warmup + steps + 1):
                if torch_device.type == "cuda":
                    torch.cuda.synchronize(torch_device)
                began, cpu_began = time.perf_counter(), time.process_time()
                losses.append(trainer.step(step)["loss"])
                if torch_device.type == "cuda":
                    torch.cuda.synchronize(torch_device)
                if step > warmup:
                    times.append(time.perf_counter() - began)
                    cpu_times.append(time.process_time() - cpu_began)
    result.update(_snapshot(torch_device, "end"))
    result["s_per_step"] = round(statistics.fmean(times), 4)
    result["s_per_step_median"] = round(statistics.median(times), 4)
    result["s_per_step_min"] = round(min(times), 4)
    result["step_times_s"] = [round(t, 4) for t in times]
    # CPU seconds of this process per step: steadier than wall time on a shared machine.
    result["cpu_s_per_step"] = round(statistics.fmean(cpu_times), 4)
    result["cpu_utilisation"] = round(sum(cpu_times) / sum(times) / max(1, torch.get_num_threads()), 3)
    result["loadavg_end"] = list(os.getloadavg())
    result["losses"] = [round(v, 6) for v in losses]
    result["train_overhead_peak_rss_mb"] = round(result["peak_rss_end_mb"] - result["rss_after_load_mb"], 1)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if torch_device.type == "cuda":
        result["cuda_peak_mb"] = result["cuda_peak_end_mb"]
        result["train_overhead_cuda_peak_mb"] = round(result["cuda_peak_end_mb"] - result["cuda_allocated_after_load_mb"], 1)
    return result


# --------------------------------------------------------------------------- fresh processes


def one_command(mode: str, prior: bool, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--mode", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--resolution", str(args.resolution), "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--device", args.device]
    cmd += ["--prior", "on" if prior else "off"]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.checkpoint is not None:
        cmd += ["--checkpoint", str(args.checkpoint)]
    if args.unet is not None:
        cmd += ["--unet", args.unet]
    if args.no_full_bf16:
        cmd.append("--no-full-bf16")
    if args.no_fused_backward:
        cmd.append("--no-fused-backward")
    return cmd


def resolve_checkpoint(args: argparse.Namespace) -> None:
    """Set ``args.checkpoint`` to the cached checkpoint for ``--unet`` (building it in a
    process of its own on first use), so no measured process pays for, or has its peak
    RSS raised by, building the file, and both sides train the same one."""
    if args.checkpoint is not None:
        return
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import reference_loops; "
            "print(reference_loops.default_checkpoint(unet=sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", code, str(BENCH_DIR), args.unet or "tiny"],
                          capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"building the {args.unet or 'tiny'} checkpoint failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    args.checkpoint = Path(proc.stdout.strip().splitlines()[-1])


def _configs(args: argparse.Namespace) -> list[tuple[str, bool]]:
    modes = ("lora", "full") if args.mode == "both" else (args.mode,)
    priors = {"off": (False,), "on": (True,), "both": (False, True)}[args.prior]
    return [(m, p) for m in modes for p in priors]


def compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Ours and the diffusers reference loop per configuration, each in its own process."""
    sys.path.insert(0, str(BENCH_DIR))
    import reference_loops

    resolve_checkpoint(args)
    rows = []
    for mode, prior in _configs(args):
        ours = run_json_command(one_command(mode, prior, args), args.timeout)
        print(json.dumps(ours), flush=True)
        reference = reference_loops.run_reference_subprocess(
            "db", timeout=args.timeout, resolution=args.resolution, steps=args.steps, mode=mode, prior=prior,
            batch_size=args.batch_size, seed=args.seed, device=args.device, warmup=args.warmup,
            checkpoint=args.checkpoint, gradient_checkpointing=args.gradient_checkpointing, unet=args.unet,
        )
        print(json.dumps(reference), flush=True)
        rows.append({"mode": mode, "prior": prior, "ours": ours, "reference": reference})
    return rows


def _config_label(mode: str, prior: bool, ours: dict[str, Any]) -> str:
    """e.g. ``full, sd15-full, full_bf16 on, fused_backward off``; the two settings only
    exist in full mode, and where the trainer ran otherwise the label says so."""
    parts = [f"{mode}{' + prior' if prior else ''}", str(ours.get("unet", "?"))]
    if mode == "full":
        onoff = {True: "on", False: "off"}
        asked = (ours.get("full_bf16", True), ours.get("fused_backward", True))
        parts += [f"full_bf16 {onoff[asked[0]]}", f"fused_backward {onoff[asked[1]]}"]
        ran = (ours.get("ran_full_bf16"), ours.get("ran_fused_backward"))
        if None not in ran and ran != asked:
            parts.append(f"(ran: full_bf16 {onoff[ran[0]]}, fused_backward {onoff[ran[1]]})")
    return ", ".join(parts)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("config", "ours s/step", "ref s/step", "ours/ref", "ours CPU s/step", "ref CPU s/step",
              "ours peak RSS MB", "ref peak RSS MB", "ours train +RSS MB", "ref train +RSS MB")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        ours, ref = row["ours"], row["reference"]
        ratio = ours["s_per_step"] / ref["s_per_step"] if ref.get("s_per_step") else float("nan")
        config = _config_label(row["mode"], row["prior"], ours)
        lines.append(" | ".join([
            config, f"{ours['s_per_step']:.3f}", f"{ref['s_per_step']:.3f}", f"{ratio:.2f}",
            f"{ours.get('cpu_s_per_step', float('nan')):.3f}", f"{ref.get('cpu_s_per_step', float('nan')):.3f}",
            f"{ours['peak_rss_mb']:.0f}", f"{ref['peak_rss_mb']:.0f}",
            f"{ours['train_overhead_peak_rss_mb']:.0f}", f"{ref['train_overhead_peak_rss_mb']:.0f}",
        ]))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", action="store_true", help="run one configuration in this process (what the others spawn)")
    parser.add_argument("--compare", action="store_true", help="also run the diffusers reference loop per configuration and print a table")
    parser.add_argument("--mode", choices=("lora", "full", "both"), default="both")
    parser.add_argument("--prior", choices=("off", "on", "both"), default="both", help="prior preservation")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--checkpoint", type=Path, default=None, help="an SD1.x .safetensors (default: the cached checkpoint for --unet)")
    parser.add_argument("--unet", choices=tuple(UNET_CONFIGS), default=None,
                        help="'tiny' (the tests' one-level UNet, the default) or 'sd15-full' (the real ~860M-param SD1.5 "
                             "UNet, random weights, built and cached on first use); with --checkpoint, detected from the file")
    parser.add_argument("--no-full-bf16", action="store_true", help="full mode: train a float32 copy (DreamBoothSettings.full_bf16=False)")
    parser.add_argument("--no-fused-backward", action="store_true",
                        help="full mode: whole-model gradients and optimiser step (DreamBoothSettings.fused_backward=False)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per process")
    args = parser.parse_args(argv)

    if args.one:
        if args.mode == "both" or args.prior == "both":
            parser.error("--one runs one configuration: --mode lora|full and --prior on|off")
        result = run_one(args.mode, args.prior == "on", steps=args.steps, warmup=args.warmup, resolution=args.resolution,
                         batch_size=args.batch_size, seed=args.seed, device=args.device,
                         gradient_checkpointing=args.gradient_checkpointing, checkpoint=args.checkpoint, unet=args.unet,
                         full_bf16=not args.no_full_bf16, fused_backward=not args.no_fused_backward)
        print(json.dumps(result), flush=True)
        return 0
    if args.compare:
        rows = compare(args)
        print(format_table(rows), flush=True)
        return 0
    resolve_checkpoint(args)
    for mode, prior in _configs(args):
        print(json.dumps(run_json_command(one_command(mode, prior, args), args.timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
