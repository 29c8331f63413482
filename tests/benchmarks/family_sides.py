"""The measured sides of the family benchmarks (``families.py``): one side, one configuration, one
fresh process (peak RSS is per process), one JSON line::

    python tests/benchmarks/family_sides.py --side pack --mode lora --model BUILT.json --resolution 512
    python tests/benchmarks/family_sides.py --side core --mode lora --model BUILT.json --resolution 512
    python tests/benchmarks/family_sides.py --side reference --mode full --model BUILT.json --resolution 512

``BUILT.json`` is a model written by ``family_models.py`` (its ComfyUI file, its diffusers twin).
Every side trains the diffusion model on the same random stand-ins: raw 16-channel latents (as a
VAE would give them, encoded once: the diffusers scripts' ``--cache_latents``, ComfyUI's LATENT
input, the pack's cached latents) and one prompt's conditioning of the real shapes (Flux: T5
256 × 4096 and CLIP-L's pooled 768; SD3: 77 + 77 tokens × 4096 and the pooled 2048), precomputed
as all three do for a frozen text encoder. What differs is each side's own training step:

* ``pack``: the pack's library, as the DreamBooth node runs it minus the node: ``validate``, then
  ``DreamBoothTrainer`` and its ``step`` inside ``training_mode()`` (``train_dreambooth``'s loop
  body). No prior preservation. The trainer takes a CLIP and a VAE: the family's small test
  encoders (their prompt encoding at set-up is replaced by the stand-in conditioning) and a
  stand-in VAE whose ``encode`` returns the stand-in latents.
* ``core``: ComfyUI's own Train LoRA node (``comfy_extras/nodes_train.py``, ``TrainLoraNode``) called
  with the model, a LATENT and a CONDITIONING, as the executor calls it (inside
  ``torch.inference_mode()``); steps are timed from its per-step loss callback. LoRA only (it has
  no full fine-tuning). Its dtype is the pack's compute dtype (fp32 on the CPU, bf16 on CUDA) and
  its gradient checkpointing follows ``--gradient-checkpointing`` (its own default is on).
  ``--core-load-for-autograd`` loads the model outside inference mode, which v0.3.64's node needs
  for these families (v0.28's rebuilds the model itself, ``clone(force_deepcopy=True)``).
* ``reference``: the loop of diffusers' ``train_dreambooth_lora_flux.py`` / ``_sd3.py`` (LoRA) and
  ``train_dreambooth_flux.py`` / ``_sd3.py`` (full), rewritten with diffusers' own
  ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` holding the same weights: the scripts'
  noise levels, packing, guidance, loss weighting, LoRA through peft (``add_adapter``, gaussian
  init, alpha = rank) on the modules that hold the weights the pack adapts (the scripts'
  ``--lora_layers``), AdamW, gradient clipping at 1.0. No ComfyUI import: its RSS is the
  reference stack's alone.

Memory on the CPU: "adds" = peak RSS during set-up and training minus RSS with the model loaded
(the high-water mark is reset after loading); on CUDA the peak allocated minus what the loaded
model holds. Time: the mean wall seconds of the timed steps after ``--warmup`` untimed ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
TESTS_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(TESTS_DIR))

from family_models import LATENT_SHIFT_SCALE, Built, diffusers_class  # noqa: E402
from reference_loops import ADAM_BETAS, ADAM_EPS, MAX_GRAD_NORM, Amp, current_rss_mb, peak_rss_mb, reset_peak_rss  # noqa: E402
from reference_loops import _ManualLoRALinear as ManualLoRALinear  # noqa: E402
from reference_loops import _memory_snapshot as snapshot  # noqa: E402

SIDES = ("pack", "core", "reference")
MODES = ("lora", "full")
LEARNING_RATE = {"lora": 1e-4, "full": 1e-5}
WEIGHT_DECAY = {"lora": 1e-4, "full": 1e-2}  # the diffusers scripts' --adam_weight_decay (LoRA), the pack's full-mode one
GUIDANCE = 1.0  # Flux.1-dev: the value embedded while training (the pack's; diffusers' --guidance_scale; core: in the conditioning)
INSTANCE_PROMPT = "a photo of sks dog"


# --------------------------------------------------------------------------- shared inputs


def stand_ins(built: Built, resolution: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw latents [count, 16, r/8, r/8], text conditioning [1, T, C], pooled [1, P]): the same
    values in every process for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(count, 16, resolution // 8, resolution // 8, generator=gen)
    cond = torch.randn(1, built.text_tokens, built.context_width, generator=gen)
    pooled = torch.randn(1, built.pooled_width, generator=gen)
    return latents, cond, pooled


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _base(args: argparse.Namespace, built: Built, impl: str) -> dict[str, Any]:
    return {
        "impl": impl,
        "side": args.side,
        "mode": args.mode,
        "model": built.shape,
        "blocks": built.blocks,
        "parameters": built.parameters,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "lora_rank": args.lora_rank if args.mode == "lora" else None,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "seed": args.seed,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }


def _loaded(result: dict[str, Any], device: torch.device, began: float) -> None:
    """Figures once the model is loaded; the peak is measured from here on."""
    result["load_s"] = round(time.perf_counter() - began, 2)
    result.update(snapshot(device, "after_load"))
    result["peak_rss_reset"] = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _finish(
    result: dict[str, Any], device: torch.device, times: list[float], cpu_times: list[float], losses: list[float]
) -> dict[str, Any]:
    result.update(snapshot(device, "end"))
    result["s_per_step"] = round(statistics.fmean(times), 4)
    result["s_per_step_min"] = round(min(times), 4)
    result["step_times_s"] = [round(t, 4) for t in times]
    # Process CPU seconds per step: steadier than wall time on a shared machine.
    result["cpu_s_per_step"] = round(statistics.fmean(cpu_times), 4)
    result["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["losses"] = [round(v, 6) for v in losses]
    result["train_overhead_peak_rss_mb"] = round(result["peak_rss_end_mb"] - result["rss_after_load_mb"], 1)
    result["peak_rss_mb"] = round(max(result["peak_rss_after_load_mb"], result["peak_rss_end_mb"], peak_rss_mb()), 1)
    if device.type == "cuda":
        result["cuda_peak_mb"] = result["cuda_peak_end_mb"]
        result["train_overhead_cuda_peak_mb"] = round(result["cuda_peak_end_mb"] - result["cuda_allocated_after_load_mb"], 1)
    return result


def _timed(step: Callable[[int], float], warmup: int, steps: int, device: torch.device) -> tuple[list[float], list[float], list[float]]:
    times, cpu_times, losses = [], [], []
    for index in range(1, warmup + steps + 1):
        _sync(device)
        began, cpu_began = time.perf_counter(), time.process_time()
        losses.append(step(index))
        _sync(device)
        if index > warmup:
            times.append(time.perf_counter() - began)
            cpu_times.append(time.process_time() - cpu_began)
    return times, cpu_times, losses


# --------------------------------------------------------------------------- ComfyUI sides


def _start_comfyui(args: argparse.Namespace) -> Any:
    import comfyui_runtime

    comfyui_runtime.start(Path(tempfile.mkdtemp(prefix="personalize-bench-")), cpu=args.device == "cpu", load_extra_nodes=False)
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def on_device(model: Any, device: torch.device) -> None:
    """On CUDA, the weights onto the GPU before the baseline is taken (ComfyUI loads them there only
    when a model is first used), so "adds" is what training adds on every side; the CPU is where
    they are already."""
    if device.type == "cuda":
        import comfy.model_management

        comfy.model_management.load_models_gpu([model])


class StandInVAE:
    """What the pack's trainer encodes its images with, once at set-up: the stand-in latents (a
    real VAE's encoding is not part of a training step, and the other sides get latents too)."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents
        self.given = 0

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.latents[self.given : self.given + pixels.shape[0]]
        self.given += pixels.shape[0]
        return out.clone()


def run_pack(args: argparse.Namespace, built: Built) -> dict[str, Any]:
    device = _start_comfyui(args)
    import comfyui_runtime
    import family_models

    pack = comfyui_runtime.pack_module
    db = pack("nodes.training.dreambooth")
    images_module = pack("nodes.core.training_images")
    training_mode = pack("nodes.comfy_bridge.diffusion_model").training_mode
    result = _base(args, built, "comfyui-personalize")
    result["device"] = str(device)
    count = max(4, args.batch_size)
    latents, cond, pooled = stand_ins(built, args.resolution, count, args.seed)
    # The small CLIP the trainer is handed is no part of what is compared (the other sides get the
    # conditioning alone): loaded first, its memory is part of the process's base, and left out of
    # the peak reported (on CUDA, where the trainer loads it onto the device, out of both figures).
    rss = current_rss_mb()
    with torch.inference_mode():
        clip = family_models.load_text_encoders(built)
    stand_in_clip_mb = current_rss_mb() - rss
    result.update(snapshot(device, "before_load"))
    began = time.perf_counter()
    with torch.inference_mode():
        model = family_models.load_comfy_model(built)
        on_device(model, device)
    _loaded(result, device, began)

    pixels = torch.rand(count, args.resolution, args.resolution, 3, generator=torch.Generator().manual_seed(args.seed))
    images = images_module.TrainingImageSet.from_image_batch(pixels)
    began = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad(), training_mode():
        settings = db.DreamBoothSettings(
            instance_prompt=INSTANCE_PROMPT,
            mode=args.mode,
            prior_preservation=False,
            steps=args.warmup + args.steps,
            resolution=args.resolution,
            batch_size=args.batch_size,
            bucketing=False,
            seed=args.seed,
            gradient_checkpointing=args.gradient_checkpointing,
            save=False,
            lora_rank=args.lora_rank,
            lora_alpha=float(args.lora_rank),
            lora_targets=args.lora_targets,
            full_bf16=not args.no_full_bf16,
            fused_backward=not args.no_fused_backward,
            precision=args.precision,
        )
        plan = db.validate(settings, images, model, clip, None)
        trainer = db.DreamBoothTrainer(model, clip, StandInVAE(latents), images, settings, plan)
        # The prompt's conditioning: the stand-in of the real shapes, not the small test encoders' output.
        trainer.frozen_text[INSTANCE_PROMPT] = (cond.to(trainer.unet.device), pooled.to(trainer.unet.device))
        result["notes"] = list(trainer.notes)
        result["compute_dtype"] = str(trainer.unet.compute_dtype).removeprefix("torch.")
        result["trainable_params"] = sum(p.numel() for p in trainer.params)
        if args.mode == "full":
            result["ran_full_bf16"], result["ran_fused_backward"] = trainer.bf16, trainer.fused
        else:
            result["lora_targets"] = args.lora_targets
            result["adapted_layers"] = len(trainer.unet_pairs)
        result["setup_s"] = round(time.perf_counter() - began, 2)
        result.update(snapshot(device, "after_setup"))
        times, cpu_times, losses = _timed(lambda i: trainer.step(i)["loss"], args.warmup, args.steps, device)
    result = _finish(result, device, times, cpu_times, losses)
    result["stand_in_clip_mb"] = round(stand_in_clip_mb, 1)
    result["peak_rss_mb"] = round(result["peak_rss_mb"] - stand_in_clip_mb, 1)
    if device.type == "cuda":
        clip_cuda_mb = (
            sum(t.numel() * t.element_size() for t in clip.cond_stage_model.state_dict().values() if t.device.type == "cuda") / 2**20
        )
        result["stand_in_clip_cuda_mb"] = round(clip_cuda_mb, 1)
        result["cuda_peak_mb"] = round(result["cuda_peak_mb"] - clip_cuda_mb, 1)
        result["train_overhead_cuda_peak_mb"] = round(result["train_overhead_cuda_peak_mb"] - clip_cuda_mb, 1)
    return result


def core_dtype(args: argparse.Namespace, device: torch.device) -> str:
    """Train LoRA's training_dtype and lora_dtype: the pack's compute dtype on this device."""
    if args.core_dtype != "auto":
        return args.core_dtype
    return "fp32" if device.type == "cpu" else "bf16"


def run_core(args: argparse.Namespace, built: Built) -> dict[str, Any]:
    """ComfyUI's own Train LoRA node on the same model, latents and conditioning.

    v0.3.64: ``TrainLoraNode().train(...)`` (inputs as values); v0.28+: the V3 node's
    ``TrainLoraNode.execute(...)`` (every input a list: ``is_input_list``). Both run the same loop:
    LoRA (alpha 1) on every weight with a ``weight_function`` and a ``.diff``/``.diff_b`` on every
    1-D weight and bias, σ uniform through the model's schedule, MSE on x0, AdamW.
    """
    if args.mode != "lora":
        raise ValueError("ComfyUI's Train LoRA trains LoRA only")
    device = _start_comfyui(args)
    import comfy_extras.nodes_train as nodes_train
    import family_models

    result = _base(args, built, "comfyui-train-lora")
    result["device"] = str(device)
    count = max(4, args.batch_size)
    latents, cond, pooled = stand_ins(built, args.resolution, count, args.seed)
    result.update(snapshot(device, "before_load"))
    began = time.perf_counter()
    # As a workflow loads it (the executor runs loaders under inference mode), unless asked otherwise:
    # v0.3.64's Train LoRA cannot train such a model's bare parameters (norm gains), v0.28's rebuilds it.
    result["loaded_in_inference_mode"] = not args.core_load_for_autograd
    with torch.inference_mode(not args.core_load_for_autograd):
        model = family_models.load_comfy_model(built)
        on_device(model, device)
    _loaded(result, device, began)

    stamps: list[tuple[float, float, float]] = []

    class TimedTrainSampler(nodes_train.TrainSampler):
        """Train LoRA's sampler, stamping the time when each step's backward is done (its loss callback)."""

        def __init__(self, *a: Any, loss_callback: Any = None, **k: Any):
            def stamped(loss: float) -> None:
                stamps.append((time.perf_counter(), time.process_time(), float(loss)))
                if loss_callback is not None:
                    loss_callback(loss)

            super().__init__(*a, loss_callback=stamped, **k)

    nodes_train.TrainSampler = TimedTrainSampler
    extras = {"pooled_output": pooled}
    if built.kind == "flux":
        extras["guidance"] = GUIDANCE
    positive = [[cond, extras]]
    dtype = core_dtype(args, device)
    inputs = {
        "model": model,
        "latents": {"samples": latents},
        "positive": positive,
        "batch_size": args.batch_size,
        "steps": args.warmup + args.steps,
        "grad_accumulation_steps": 1,
        "learning_rate": LEARNING_RATE["lora"],
        "rank": args.lora_rank,
        "optimizer": "AdamW",
        "loss_function": "MSE",
        "seed": args.seed,
        "training_dtype": dtype,
        "lora_dtype": dtype,
        "algorithm": "LoRA",
        "gradient_checkpointing": args.gradient_checkpointing,
        "existing_lora": "[None]",
    }
    node = nodes_train.TrainLoraNode
    began = time.perf_counter()
    with torch.inference_mode():
        if hasattr(node, "execute"):  # v0.28+: a V3 node
            inputs.update(
                {"quantized_backward": False, "checkpoint_depth": 1, "offloading": False, "bucket_mode": False, "bypass_mode": False}
            )
            out = node.execute(**{k: [v] for k, v in inputs.items()})
            lora = out.result[0] if hasattr(out, "result") else out[0]
            result["api"] = "TrainLoraNode.execute (V3, inputs as lists)"
        else:
            lora = node().train(**inputs)[1]
            result["api"] = "TrainLoraNode().train"
    result["train_call_s"] = round(time.perf_counter() - began, 2)
    result["training_dtype"] = dtype
    result["trainable_params"] = sum(t.numel() for t in lora.values())
    result["adapted_layers"] = sum(1 for k in lora if k.endswith(".lora_up.weight"))
    if len(stamps) != args.warmup + args.steps:
        raise RuntimeError(f"Train LoRA reported {len(stamps)} steps, {args.warmup + args.steps} were asked")
    # Between two loss callbacks: the earlier step's optimizer update, then the later one's forward and backward.
    times = [stamps[i][0] - stamps[i - 1][0] for i in range(args.warmup, len(stamps))]
    cpu_times = [stamps[i][1] - stamps[i - 1][1] for i in range(args.warmup, len(stamps))]
    import comfy.ldm.modules.attention as attention

    result["attention"] = getattr(attention.optimized_attention, "__name__", "?")
    return _finish(result, device, times, cpu_times, [s[2] for s in stamps])


# --------------------------------------------------------------------------- diffusers reference


def load_reference(built: Built, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The diffusers transformer with the converted weights in ``dtype`` (built on the meta device,
    then every tensor loaded: a strict load, so nothing is left uninitialised)."""
    from safetensors.torch import load_file

    with torch.device("meta"):
        model = diffusers_class(built.kind)(**built.diffusers_config)
    saved = set(model.state_dict())
    unsaved = [name for name, _ in model.named_buffers() if name not in saved]
    if unsaved:
        raise RuntimeError(f"buffers outside the state dict would stay uninitialised: {unsaved}")
    model.to_empty(device=device)
    model.load_state_dict(load_file(built.diffusers_path), strict=True)
    return model.to(dtype=dtype).eval()


def add_lora(model: torch.nn.Module, modules: Sequence[str], rank: int) -> str:
    """What the LoRA scripts do: freeze, then ``add_adapter(LoraConfig(r, lora_alpha=r,
    init_lora_weights="gaussian", target_modules=...))``; returns the implementation used."""
    model.requires_grad_(False)
    try:
        import peft
        from peft import LoraConfig
    except ImportError:
        peft = None
    if peft is not None:
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(modules)))
        return f"peft {peft.__version__}"
    for name in modules:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, ManualLoRALinear(getattr(owner, child), rank, float(rank)))
    return "manual (peft not installed)"


class FlowSteps:
    """The scripts' noise levels: u from ``compute_density_for_timestep_sampling`` (Flux LoRA
    script: ``none``, uniform; SD3: ``logit_normal``), a timestep of the shifted flow scheduler
    (shift 3, both models' scheduler configs), its sigma (their ``get_sigmas``)."""

    def __init__(self, weighting: str, device: torch.device):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        self.weighting = weighting
        self.device = device

    def draw(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        u = compute_density_for_timestep_sampling(self.weighting, count, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        indices = (u * self.scheduler.config.num_train_timesteps).long()
        timesteps = self.scheduler.timesteps[indices].to(self.device)
        schedule = self.scheduler.timesteps.to(self.device)
        sigmas = self.scheduler.sigmas.to(self.device)[[int((schedule == t).nonzero().item()) for t in timesteps]]
        sigmas = sigmas.reshape(-1, 1, 1, 1)
        return timesteps, sigmas, compute_loss_weighting_for_sd3(self.weighting, sigmas)


def reference_step(
    built: Built,
    transformer: torch.nn.Module,
    flow: FlowSteps,
    amp: Amp,
    raw: torch.Tensor,
    cond: torch.Tensor,
    pooled: torch.Tensor,
) -> torch.Tensor:
    """One step's loss, as ``train_dreambooth(_lora)_flux.py`` / ``_sd3.py`` compute it from cached latents."""
    shift, scale = LATENT_SHIFT_SCALE[built.kind]
    model_input = (raw - shift) * scale
    noise = torch.randn_like(model_input)
    count, channels, height, width = model_input.shape
    timesteps, sigmas, weighting = flow.draw(count)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    with amp.autocast():
        if built.kind == "flux":
            from diffusers import FluxPipeline

            image_ids = FluxPipeline._prepare_latent_image_ids(count, height // 2, width // 2, raw.device, amp.dtype)
            text_ids = torch.zeros(cond.shape[1], 3, device=raw.device, dtype=amp.dtype)
            packed = FluxPipeline._pack_latents(noisy, count, channels, height, width)
            guidance = torch.tensor([GUIDANCE], device=raw.device).expand(count)
            pred = transformer(
                hidden_states=packed,
                timestep=timesteps / 1000,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=cond,
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]
            pred = FluxPipeline._unpack_latents(pred, height=height * 8, width=width * 8, vae_scale_factor=8)
            target = noise - model_input
        else:
            pred = transformer(
                hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond, pooled_projections=pooled, return_dict=False
            )[0]
            pred = pred * (-sigmas) + noisy  # --precondition_outputs (the SD3 scripts' default): x0 against the latents
            target = model_input
    return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(count, -1), 1).mean()


def run_reference(args: argparse.Namespace, built: Built) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    result = _base(args, built, "diffusers-reference")
    result["device"] = str(device)
    count = max(4, args.batch_size)
    latents, cond, pooled = stand_ins(built, args.resolution, count, args.seed)
    amp = Amp(args.reference_precision, device)
    result["mixed_precision"] = args.reference_precision
    result.update(snapshot(device, "before_load"))
    began = time.perf_counter()
    # LoRA: the frozen weights in the mixed-precision dtype (the scripts' weight_dtype); full: float32.
    transformer = load_reference(built, device, amp.dtype if args.mode == "lora" else torch.float32)
    _loaded(result, device, began)

    began = time.perf_counter()
    if args.mode == "lora":
        modules = built.lora_modules[args.lora_targets]
        result["lora_impl"] = add_lora(transformer, modules, args.lora_rank)
        result["lora_targets"] = args.lora_targets
        result["adapted_layers"] = len(modules)
        for p in transformer.parameters():  # cast_training_params: the adapters train in float32
            if p.requires_grad:
                p.data = p.data.float()
    else:
        transformer.requires_grad_(True)  # full: float32 weights (mixed precision autocasts the compute only)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE[args.mode], betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY[args.mode], eps=ADAM_EPS)
    flow = FlowSteps("none" if built.kind == "flux" else "logit_normal", device)
    pool = latents.to(device)
    cond, pooled = cond.to(device, amp.dtype), pooled.to(device, amp.dtype)
    result["setup_s"] = round(time.perf_counter() - began, 2)
    result.update(snapshot(device, "after_setup"))

    def step(index: int) -> float:
        rows = [((index - 1) * args.batch_size + j) % pool.shape[0] for j in range(args.batch_size)]
        batch_cond = cond.expand(args.batch_size, -1, -1)
        batch_pooled = pooled.expand(args.batch_size, -1)
        loss = reference_step(built, transformer, flow, amp, pool[rows], batch_cond, batch_pooled)
        amp.backward_and_step(loss, optimizer, params)  # clip_grad_norm_(params, 1.0) inside
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    times, cpu_times, losses = _timed(step, args.warmup, args.steps, device)
    result["max_grad_norm"] = MAX_GRAD_NORM
    return _finish(result, device, times, cpu_times, losses)


# --------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=SIDES, required=True)
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--model", type=Path, required=True, help="a model's JSON written by family_models.py")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-targets", default="attention", help="the pack's LoRA preset; the reference adapts the same weights")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--precision", default="auto", help="the pack's precision setting")
    p.add_argument("--no-full-bf16", action="store_true")
    p.add_argument("--no-fused-backward", action="store_true")
    p.add_argument("--core-dtype", choices=("auto", "fp32", "bf16"), default="auto", help="Train LoRA's training and LoRA dtype")
    p.add_argument(
        "--core-load-for-autograd",
        action="store_true",
        help="Train LoRA's model loaded outside inference mode (not as a workflow loads it; for v0.3.64, which cannot train it otherwise)",
    )
    p.add_argument("--reference-precision", choices=("no", "fp16", "bf16"), default="no", help="as accelerate's --mixed_precision")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.warmup < 1:
        raise SystemExit("--warmup must be at least 1 (Train LoRA's steps are timed between its loss callbacks)")
    built = Built.read(args.model)
    run = {"pack": run_pack, "core": run_core, "reference": run_reference}[args.side]
    try:
        result = run(args, built)
    except Exception as error:  # a side that cannot train this model is a result too: its reason, as one line
        traceback.print_exc()
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        kind = type(error).__qualname__ if type(error).__module__ == "builtins" else f"{type(error).__module__}.{type(error).__qualname__}"
        result = {"side": args.side, "mode": args.mode, "error": f"{kind}: {first}"[:400]}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
