"""Reference training loops (diffusers/transformers) for the speed and memory benchmarks.

The pack trains Textual Inversion and DreamBooth on ComfyUI's own model classes.  To say
whether it is fast and lean *enough*, it is timed against the loops people already know:
diffusers' ``textual_inversion``, ``train_dreambooth`` and ``train_dreambooth_lora``
examples, rewritten here (not copied) with the same optimiser set-up and per-step work,
but without accelerate, data loaders, logging or checkpointing, none of which the pack's
per-step figures include either.

Both halves must run on the *same* weights, so :func:`load_diffusers_modules` converts the
LDM-layout checkpoints of ``tests/tiny_models.py`` (the tiny one-level UNet, or with
``--unet sd15-full`` the real ~860M-param SD1.5 UNet) into diffusers/transformers modules,
and :func:`check_equivalence` proves the conversion against ComfyUI's own loading of that
file (text encoder output, UNet eps, VAE latents; fp32 on the CPU).

Memory on the CPU is the process's peak RSS, which never goes down, so every measured
configuration has to run in a fresh process: the CLI at the bottom is that process, and
:func:`run_reference_subprocess` starts it and parses the one JSON line it prints::

    python tests/benchmarks/reference_loops.py --check
    python tests/benchmarks/reference_loops.py --ti --resolution 64 --steps 5
    python tests/benchmarks/reference_loops.py --db --mode lora --prior --resolution 64 --steps 5

ComfyUI is only imported for the equivalence check and, when no cached tiny checkpoint
exists yet, to build one; the training runs never import it, so their RSS is the
reference stack's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

PathLike = str | Path

TESTS_DIR = Path(__file__).resolve().parents[1]
COMFYUI_DIR = Path(os.environ.get("COMFYUI_PATH", Path.home() / ".cache" / "comfyui" / "ComfyUI"))
TOKENIZER_DIR = COMFYUI_DIR / "comfy" / "sd1_tokenizer"
MODEL_CACHE = Path(os.environ.get("PERSONALIZE_TINY_MODELS", Path.home() / ".cache" / "comfy-personalize" / "tiny-models"))

# --------------------------------------------------------------------------------------
# Model configs matching tests/tiny_models.py (SD15_UNET_CONFIG, SD_VAE_DDCONFIG, CLIP-L)
# --------------------------------------------------------------------------------------

# One resolution level (channel_mult [1]) means the single down block is also the last
# one, so diffusers adds no downsampler and the single up block no upsampler, exactly as
# LDM's UNetModel skips them for the last level.  attention_head_dim=8 is diffusers'
# legacy spelling of "8 heads" for SD1.x (LDM's num_heads=8).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D",),
    "block_out_channels": (320,),
    "layers_per_block": 1,
    "transformer_layers_per_block": 1,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,  # SD1.x proj_in/proj_out are 1x1 convs
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "upcast_attention": False,
}

# The real SD1.5 UNet (tests/tiny_models.py's SD15_FULL_UNET_CONFIG, "sd15-full"):
# diffusers' UNet2DConditionModel defaults are SD1.5's except cross_attention_dim (1280
# there), spelt out here so a change of defaults cannot change the model.
SD15_FULL_UNET_CONFIG: dict[str, Any] = {
    **UNET_CONFIG,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
}

# SDXL: the real UNet (2.6B params) and a one-level one of the same interfaces. Built with random
# weights (no SDXL checkpoint is converted): step time and memory depend on the shapes alone.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SDXL_TINY_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG,
    "down_block_types": ("CrossAttnDownBlock2D",),
    "up_block_types": ("CrossAttnUpBlock2D",),
    "block_out_channels": (320,),
    "layers_per_block": 1,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 5,
}
SDXL_UNET_CONFIGS = {"sdxl": SDXL_UNET_CONFIG, "sdxl-tiny": SDXL_TINY_UNET_CONFIG}

# --unet names -> (tests/tiny_models.py cache kind, diffusers config). The SDXL ones take
# only the VAE from their checkpoint (SDXL's VAE has SD's architecture).
UNET_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("sd15", UNET_CONFIG),
    "sd15-full": ("sd15-full", SD15_FULL_UNET_CONFIG),
    "sdxl": ("sd15", SDXL_UNET_CONFIG),
    "sdxl-tiny": ("sd15", SDXL_TINY_UNET_CONFIG),
}
# Resolution levels (LDM channel_mult length) -> --unet name, for detecting it from a file.
_UNET_BY_LEVELS = {1: "tiny", 4: "sd15-full"}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

CLIP_L_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    # Only the pooled output depends on these (it pools at eos); SD1.5 never uses it.
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}

# Prefixes of the original LDM layout, as written by ComfyUI's state_dict_for_saving.
_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIX = "first_stage_model."
_CLIP_PREFIX = "cond_stage_model.transformer."

# Defaults of the diffusers examples (textual_inversion.py, train_dreambooth.py,
# train_dreambooth_lora.py).  TI's lr is the benchmark's choice, not the example's (its
# --learning_rate default is 1e-4; its README runs 5e-4 with --scale_lr); learning rates
# change what is learnt, not what a step costs.
TI_LR = 5e-3
DB_FULL_LR = 5e-6
DB_LORA_LR = 5e-4
DB_LORA_RANK = 4
ADAM_BETAS = (0.9, 0.999)
ADAM_WEIGHT_DECAY = 1e-2
ADAM_EPS = 1e-8
MAX_GRAD_NORM = 1.0
PRIOR_LOSS_WEIGHT = 1.0
LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")

TI_PLACEHOLDER = "<ref-concept>"
TI_INITIALIZER = "toy"
DB_INSTANCE_PROMPT = "a photo of sks dog"
DB_CLASS_PROMPT = "a photo of dog"
CHECK_PROMPT = "a photo of a cat sitting on a red chair"


# --------------------------------------------------------------------------------------
# Process memory
# --------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process over its whole life (ru_maxrss, KiB on
    Linux).  Monotone: it also holds the model-loading transient."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # reported in kB
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """Current RSS, so a peak can be told apart from what is still held."""
    rss = _proc_status_mb("VmRSS")
    if rss is not None:
        return rss
    import psutil  # not Linux; psutil is in the dev venv

    return psutil.Process().memory_info().rss / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS.

    Writing 5 to /proc/self/clear_refs (Linux >= 4.0) does this, which lets one process
    measure the training peak separately from the loading peak before it.  Returns
    False where unsupported; then :func:`peak_rss_since_reset_mb` is the lifetime peak.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mb() -> float:
    """VmHWM: peak RSS since :func:`reset_peak_rss` (or since start).  Read from /proc
    rather than ru_maxrss, which also keeps the peaks of threads that have exited."""
    hwm = _proc_status_mb("VmHWM")
    return hwm if hwm is not None else peak_rss_mb()


def _memory_snapshot(device: torch.device, label: str) -> dict[str, float]:
    snap = {f"rss_{label}_mb": round(current_rss_mb(), 1), f"peak_rss_{label}_mb": round(peak_rss_since_reset_mb(), 1)}
    if device.type == "cuda":
        snap[f"cuda_allocated_{label}_mb"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
        snap[f"cuda_peak_{label}_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return snap


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------
# ComfyUI bootstrap (only for the equivalence check and for building the tiny checkpoint)
# --------------------------------------------------------------------------------------


def _ensure_comfyui(cpu: bool = True) -> None:
    """Put ComfyUI and tests/ on sys.path and configure it before comfy.model_management
    is imported: that module reads args.cpu once, at import time."""
    for path in (str(COMFYUI_DIR), str(TESTS_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import comfy.cli_args
    import comfy.options

    if "comfy.model_management" in sys.modules and comfy.cli_args.args.cpu != cpu:
        raise RuntimeError("comfy.model_management was imported before the device was chosen")
    comfy.cli_args.args.cpu = cpu


def default_checkpoint(seed: int = 0, unet: str = "tiny") -> Path:
    """The tiny SD1.5 checkpoint the pack's tests use (``unet="tiny"``) or the one with
    the full-size SD1.5 UNet (``unet="sd15-full"``), built on first use."""
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    import tiny_models

    # tiny_models imports ComfyUI lazily and only when it has to build the file, so
    # a cache hit keeps ComfyUI out of the training process.
    _ensure_comfyui(cpu=True)
    return tiny_models.cached_checkpoint(UNET_CONFIGS[unet][0], MODEL_CACHE, seed=seed)


# --------------------------------------------------------------------------------------
# Loading the LDM checkpoint into diffusers / transformers modules
# --------------------------------------------------------------------------------------


def _read_prefixed(checkpoint_path: PathLike, prefix: str) -> dict[str, torch.Tensor]:
    """Only one component's fp16 tensors at a time, to keep the loading peak small:
    the RSS after loading is the baseline training overhead is measured from."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(checkpoint_path), framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is no mapping)
            if key.startswith(prefix):
                out[key] = f.get_tensor(key)
    if not out:
        raise KeyError(f"{checkpoint_path}: no keys under {prefix!r}; not an LDM SD1.x checkpoint?")
    return out


def _load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str, ignore_missing: Sequence[str] = ()) -> None:
    # copy_ inside load_state_dict casts the fp16 storage to the module's fp32 in place,
    # so no fp32 copy of the state dict is ever materialised.
    result = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in ignore_missing]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{what}: conversion mismatch; missing={missing[:10]} unexpected={list(result.unexpected_keys)[:10]}")


def detect_unet(checkpoint_path: PathLike) -> str:
    """The :data:`UNET_CONFIGS` name for an LDM SD1.x file, from its keys alone: the
    number of resolution levels is one more than the number of downsamplers
    (``input_blocks.N.0.op``).  The strict load then checks every key and shape."""
    from safetensors import safe_open

    with safe_open(str(checkpoint_path), framework="pt", device="cpu") as f:
        keys = [k for k in f.keys() if k.startswith(_UNET_PREFIX + "input_blocks.")]  # noqa: SIM118 (safe_open is no mapping)
    if not keys:
        raise KeyError(f"{checkpoint_path}: no {_UNET_PREFIX}input_blocks.* keys; not an LDM SD1.x checkpoint?")
    levels = 1 + sum(1 for k in keys if k.endswith(".0.op.weight"))
    if levels not in _UNET_BY_LEVELS:
        known = ", ".join(f"{name} ({n} levels)" for n, name in _UNET_BY_LEVELS.items())
        raise ValueError(f"{checkpoint_path}: a {levels}-level UNet; known: {known}")
    return _UNET_BY_LEVELS[levels]


def _unet_config(unet: str | dict[str, Any] | None, checkpoint_path: PathLike) -> dict[str, Any]:
    if isinstance(unet, dict):
        return unet
    return UNET_CONFIGS[unet or detect_unet(checkpoint_path)][1]


def load_diffusers_modules(
    checkpoint_path: PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    unet_config: str | dict[str, Any] | None = None,
) -> tuple[Any, Any, Any, Any, Any]:
    """``(unet, text_encoder, tokenizer, vae, noise_scheduler)`` holding the checkpoint's weights.

    ``unet_config`` is a :data:`UNET_CONFIGS` name (``"tiny"``, ``"sd15-full"``), a
    ``UNet2DConditionModel`` config dict, or None to pick the name with :func:`detect_unet`.

    Keys are converted with diffusers' own single-file helpers
    (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
    ``convert_ldm_clip_checkpoint``), i.e. the code ``from_single_file`` runs.  All
    modules come back in eval mode with gradients enabled; the loops decide what trains.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    device = torch.device(device)

    unet = UNet2DConditionModel(**_unet_config(unet_config, checkpoint_path))
    sd = convert_ldm_unet_checkpoint(_read_prefixed(checkpoint_path, _UNET_PREFIX), dict(unet.config))
    _load_strict(unet, sd, "unet")
    del sd

    vae = AutoencoderKL(**VAE_CONFIG)
    sd = convert_ldm_vae_checkpoint(_read_prefixed(checkpoint_path, _VAE_PREFIX), dict(vae.config))
    _load_strict(vae, sd, "vae")
    del sd

    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG))
    sd = convert_ldm_clip_checkpoint(_read_prefixed(checkpoint_path, _CLIP_PREFIX))
    if not hasattr(text_encoder, "text_model"):
        # transformers 5 flattened CLIPTextModel (its from_pretrained strips the
        # base_model_prefix); 4.x keeps the text_model wrapper the file's keys name.
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    # position_ids is a non-persistent buffer (an arange) that SD files do not carry.
    _load_strict(text_encoder, sd, "text_encoder", ignore_missing=("text_model.embeddings.position_ids", "embeddings.position_ids"))
    del sd

    # ComfyUI's copy says model_max_length 8192 (it chunks long prompts itself); the HF SD
    # repos the examples load say 77, the CLIP context, which the examples pad to.
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=CLIP_L_CONFIG["max_position_embeddings"])
    noise_scheduler = DDPMScheduler(**SCHEDULER_CONFIG)

    for module in (unet, vae, text_encoder):
        # Built in fp32 already; a no-op cast would only trigger diffusers' dtype warning.
        if dtype != torch.float32:
            module.to(dtype=dtype)
        module.to(device=device)
        module.eval()
    return unet, text_encoder, tokenizer, vae, noise_scheduler


def _text_transformer(text_encoder: Any) -> Any:
    """The module holding embeddings/encoder/final_layer_norm (transformers 4 vs 5)."""
    return getattr(text_encoder, "text_model", text_encoder)


def _tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    # The examples pad every prompt to the full 77-token window, as SD1.x was trained.
    return tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


# --------------------------------------------------------------------------------------
# Equivalence with ComfyUI
# --------------------------------------------------------------------------------------


def check_equivalence(
    checkpoint_path: PathLike | None = None, seed: int = 0, timesteps: Sequence[int] = (50, 500, 950)
) -> dict[str, float]:
    """Max |diffusers - ComfyUI| for the same file, fp32 on the CPU.

    Keys: ``token_id_mismatches`` (count), ``text_encoder``, ``ddpm_x_t`` (diffusers'
    add_noise vs ComfyUI's sigma parameterisation), ``unet_eps_t{t}`` per timestep,
    ``vae_latent_mean`` and ``vae_decode``.  Besides the absolute differences, each
    ``*_ref_scale`` entry gives max |value| so the differences can be read as relative.
    """
    _ensure_comfyui(cpu=True)
    import comfy.model_management
    import comfy.sd

    checkpoint_path = Path(checkpoint_path) if checkpoint_path else default_checkpoint()
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}

    unet, text_encoder, tokenizer, vae, scheduler = load_diffusers_modules(checkpoint_path)
    with torch.inference_mode():
        model, clip, comfy_vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(checkpoint_path),
            output_vae=True,
            output_clip=True,
            model_options={"dtype": torch.float32},
            te_model_options={"dtype": torch.float32},
        )
        comfy.model_management.load_models_gpu([model])

        # (a) text encoder: ComfyUI's SD1.5 CLIP returns the last layer after final_layer_norm.
        comfy_tokens = clip.tokenize(CHECK_PROMPT)
        comfy_ids = torch.tensor([[tok for tok, _weight in comfy_tokens["l"][0]]])
        ids = _tokenize(tokenizer, [CHECK_PROMPT])
        out["token_id_mismatches"] = float((comfy_ids != ids).sum())
        ctx = text_encoder(ids)[0]
        comfy_ctx = clip.encode_from_tokens(comfy_tokens).float()
        out["text_encoder"] = float((ctx - comfy_ctx).abs().max())
        out["text_encoder_ref_scale"] = float(comfy_ctx.abs().max())

        # (b) UNet: ComfyUI works in k-diffusion terms (x = latent + sigma*noise,
        # apply_model returns the denoised estimate); diffusers in DDPM terms.
        latent = torch.randn(2, 4, 8, 8, generator=gen)
        noise = torch.randn(2, 4, 8, 8, generator=gen)
        ctx2 = torch.cat([ctx, torch.randn(1, 77, 768, generator=gen)])  # a 2nd, unrelated context
        sampling = model.model.model_sampling
        for t in timesteps:
            t_batch = torch.full((2,), t, dtype=torch.long)
            sigma = sampling.sigma(t_batch.float())
            x = latent + sigma.view(-1, 1, 1, 1) * noise
            denoised = model.model.apply_model(x, sigma, c_crossattn=ctx2).float()
            comfy_eps = (x - denoised) / sigma.view(-1, 1, 1, 1)
            x_t = x / torch.sqrt(sigma.view(-1, 1, 1, 1) ** 2 + 1.0)
            ddpm_x_t = scheduler.add_noise(latent, noise, t_batch)
            out["ddpm_x_t"] = max(out.get("ddpm_x_t", 0.0), float((ddpm_x_t - x_t).abs().max()))
            eps = unet(x_t, t_batch, encoder_hidden_states=ctx2).sample
            out[f"unet_eps_t{t}"] = float((eps - comfy_eps).abs().max())
            out[f"unet_eps_t{t}_ref_scale"] = float(comfy_eps.abs().max())

        # (c) VAE: ComfyUI takes [B,H,W,C] in 0..1 and returns the posterior mode unscaled.
        image = torch.rand(1, 64, 64, 3, generator=gen)
        comfy_latent = comfy_vae.encode(image).float()
        mean = vae.encode(image.movedim(-1, 1) * 2.0 - 1.0).latent_dist.mean
        out["vae_latent_mean"] = float((mean - comfy_latent).abs().max())
        out["vae_latent_mean_ref_scale"] = float(comfy_latent.abs().max())
        # Decode returns ComfyUI's clamped 0..1 [B,H,W,C]; map diffusers' [-1,1] the same way.
        comfy_pixels = comfy_vae.decode(comfy_latent).float().reshape(1, 64, 64, 3)
        pixels = ((vae.decode(comfy_latent).sample + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)
        out["vae_decode"] = float((pixels - comfy_pixels).abs().max())
    return out


# --------------------------------------------------------------------------------------
# Shared helpers for the loops
# --------------------------------------------------------------------------------------


def _synthetic_images(count: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """Stand-ins for the examples' preprocessed images (resized, cropped, in [-1, 1]).
    Random pixels cost the VAE exactly what real ones do."""
    return torch.rand(count, 3, resolution, resolution, generator=generator) * 2.0 - 1.0


def _time_steps(
    step: Callable[[int], float], steps: int, warmup: int, device: torch.device
) -> tuple[list[float], list[float], list[float]]:
    """Run ``warmup`` untimed steps (first-call allocations, optimiser state creation),
    then ``steps`` timed ones.  Returns (timed wall seconds, timed process CPU seconds,
    all losses)."""
    losses: list[float] = []
    times: list[float] = []
    cpu_times: list[float] = []
    for i in range(warmup + steps):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step(i))
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times, losses


def _base_result(
    method: str, checkpoint_path: PathLike, resolution: int, steps: int, warmup: int, batch_size: int, seed: int, device: torch.device
) -> dict[str, Any]:
    return {
        "impl": "diffusers-reference",
        "method": method,
        "checkpoint": str(checkpoint_path),
        "resolution": resolution,
        "batch_size": batch_size,
        "steps": steps,
        "warmup_steps": warmup,
        "seed": seed,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }


def _finish_result(
    result: dict[str, Any], times: list[float], cpu_times: list[float], losses: list[float], device: torch.device
) -> dict[str, Any]:
    result.update(_memory_snapshot(device, "end"))
    result["s_per_step"] = round(statistics.fmean(times), 4) if times else float("nan")
    result["s_per_step_median"] = round(statistics.median(times), 4) if times else float("nan")
    # The least-disturbed step: the best estimate of uncontended speed on a shared machine.
    result["s_per_step_min"] = round(min(times), 4) if times else float("nan")
    result["step_times_s"] = [round(t, 4) for t in times]
    # On a shared CPU, wall time per step depends on who else is running; CPU seconds
    # per step much less so, and cpu_utilisation well below 1 flags a contended run.
    if times:
        result["cpu_s_per_step"] = round(statistics.fmean(cpu_times), 4)
        result["cpu_utilisation"] = round(sum(cpu_times) / (sum(times) * torch.get_num_threads()), 3)
    result["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["losses"] = [round(v, 6) for v in losses]
    # The high-water mark was reset right after loading, so this is the peak of set-up
    # plus training, and the overhead is what the method adds on top of loaded models.
    result["peak_rss_train_mb"] = result["peak_rss_end_mb"]
    result["train_overhead_peak_rss_mb"] = round(result["peak_rss_train_mb"] - result["rss_after_load_mb"], 1)
    # Whole process, loading included; resetting VmHWM also resets ru_maxrss, hence the max.
    result["peak_rss_mb"] = round(max(result["peak_rss_after_load_mb"], result["peak_rss_train_mb"], peak_rss_mb()), 1)
    if device.type == "cuda":
        result["cuda_peak_mb"] = result["cuda_peak_end_mb"]
        result["train_overhead_cuda_peak_mb"] = round(result["cuda_peak_end_mb"] - result["cuda_allocated_after_load_mb"], 1)
    return result


def _load_for_training(
    checkpoint_path: PathLike, device: torch.device, result: dict[str, Any], unet_config: str | None = None
) -> tuple[Any, Any, Any, Any, Any]:
    result["unet"] = unet_config or detect_unet(checkpoint_path)
    result.update(_memory_snapshot(device, "before_load"))
    start = time.perf_counter()
    modules = load_diffusers_modules(checkpoint_path, device=device, unet_config=result["unet"])
    result["load_s"] = round(time.perf_counter() - start, 3)
    result.update(_memory_snapshot(device, "after_load"))
    # Start the set-up + training peak from the loaded state; the loading transient
    # (one component's fp16 tensors next to the fp32 models) would otherwise hide it.
    result["peak_rss_reset"] = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return modules


class Amp:
    """What ``accelerate launch --mixed_precision fp16|bf16`` gives the diffusers examples: frozen
    modules cast to the half dtype, forwards under autocast, and for fp16 a GradScaler."""

    def __init__(self, mixed_precision: str, device: torch.device):
        if mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed precision must be no, fp16 or bf16 (got {mixed_precision!r})")
        self.name = mixed_precision
        self.dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type, enabled=mixed_precision == "fp16")

    def autocast(self) -> Any:
        import contextlib

        return torch.autocast(self.device.type, dtype=self.dtype) if self.name != "no" else contextlib.nullcontext()

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip: Sequence[torch.nn.Parameter] = ()) -> None:
        self.scaler.scale(loss).backward()
        if clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(clip, MAX_GRAD_NORM)
        self.scaler.step(optimizer)
        self.scaler.update()


def _load_sdxl_for_training(checkpoint_path: PathLike, device: torch.device, result: dict[str, Any], unet_name: str) -> tuple[Any, ...]:
    """(unet, None, None, vae, scheduler): an SDXL UNet of random weights built on ``device``,
    the SD VAE from the checkpoint. The text encoders are not loaded (their output is fixed)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    result["unet"] = unet_name
    result.update(_memory_snapshot(device, "before_load"))
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIGS[unet_name])
    vae = AutoencoderKL(**VAE_CONFIG)
    _load_strict(vae, convert_ldm_vae_checkpoint(_read_prefixed(checkpoint_path, _VAE_PREFIX), dict(vae.config)), "vae")
    vae.to(device).eval()
    unet.eval()
    result["load_s"] = round(time.perf_counter() - start, 3)
    result.update(_memory_snapshot(device, "after_load"))
    result["peak_rss_reset"] = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return unet, None, None, vae, DDPMScheduler(**SCHEDULER_CONFIG)


# --------------------------------------------------------------------------------------
# Textual Inversion (diffusers examples/textual_inversion/textual_inversion.py)
# --------------------------------------------------------------------------------------


def textual_inversion_reference_step(
    *,
    unet: Any,
    vae: Any,
    text_encoder: Any,
    noise_scheduler: Any,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    orig_embeds: torch.Tensor,
    index_no_updates: torch.Tensor,
    amp: Amp | None = None,
) -> float:
    """One TI optimisation step; returns the loss.

    Per step, like the example: VAE-encode the batch (a fresh posterior sample every
    step), noise at uniform timesteps, encode the prompt through the text encoder (the
    only path with a trainable leaf: the input-embedding matrix), eps-MSE, AdamW on the
    whole matrix, then copy back every row except the placeholder's, because AdamW's
    weight decay and momentum would otherwise move all 49k rows.
    """
    # No no_grad here, as in the example: the VAE has no trainable parameters, so no
    # graph is recorded anyway.
    amp = amp or Amp("no", pixel_values.device)
    with amp.autocast():
        latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample().detach()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids)[0].to(amp.dtype if amp.name != "no" else torch.float32)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    amp.backward_and_step(loss, optimizer)
    lr_scheduler.step()
    optimizer.zero_grad()
    with torch.no_grad():
        weight = text_encoder.get_input_embeddings().weight
        weight[index_no_updates] = orig_embeds[index_no_updates]
    return float(loss.detach())


def run_textual_inversion_reference(
    checkpoint_path: PathLike,
    resolution: int,
    steps: int,
    batch_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    learning_rate: float = TI_LR,
    gradient_checkpointing: bool = False,
    unet_config: str | None = None,
    mixed_precision: str = "no",
) -> dict[str, Any]:
    """Time ``steps`` TI steps after ``warmup`` untimed ones; figures as a flat dict.

    Memory keys (MiB): ``rss_after_load_mb`` (models loaded; the baseline),
    ``peak_rss_after_load_mb`` (loading peak); the high-water mark is then reset (see
    :func:`reset_peak_rss`, ``peak_rss_reset`` says whether that worked), so
    ``peak_rss_after_setup_mb`` is the set-up peak (resize_token_embeddings, the copy of
    the original embeddings, the optimiser) and ``peak_rss_train_mb`` the peak of set-up
    plus training; ``train_overhead_peak_rss_mb = peak_rss_train_mb - rss_after_load_mb``;
    ``peak_rss_mb`` is the whole process's peak (loading included).  On CUDA also
    ``cuda_allocated_after_load_mb``, ``cuda_peak_mb`` (max_memory_allocated since
    loading) and ``train_overhead_cuda_peak_mb``.  Time keys: ``s_per_step`` (mean wall),
    ``s_per_step_median``, ``s_per_step_min``, ``step_times_s``, ``cpu_s_per_step`` (process CPU seconds, all
    threads), ``cpu_utilisation`` (CPU / (wall * threads); << 1 means a contended CPU).
    """
    from diffusers.optimization import get_scheduler

    device = torch.device(device)
    torch.manual_seed(seed)
    result = _base_result("textual_inversion", checkpoint_path, resolution, steps, warmup, batch_size, seed, device)
    result.update({"learning_rate": learning_rate, "gradient_checkpointing": gradient_checkpointing})
    unet, text_encoder, tokenizer, vae, noise_scheduler = _load_for_training(checkpoint_path, device, result, unet_config)

    if tokenizer.add_tokens(TI_PLACEHOLDER) != 1:
        raise ValueError(f"tokenizer already contains {TI_PLACEHOLDER!r}")
    init_ids = tokenizer.encode(TI_INITIALIZER, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(f"initializer {TI_INITIALIZER!r} must be a single token")
    placeholder_id = tokenizer.convert_tokens_to_ids(TI_PLACEHOLDER)
    text_encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        token_embeds = text_encoder.get_input_embeddings().weight
        token_embeds[placeholder_id] = token_embeds[init_ids[0]].clone()

    amp = Amp(mixed_precision, device)
    result["mixed_precision"] = mixed_precision
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    # The example: the frozen UNet and VAE in the mixed-precision dtype, the text encoder
    # (whose embedding matrix trains) in float32.
    unet.to(dtype=amp.dtype)
    vae.to(dtype=amp.dtype)
    text_model = _text_transformer(text_encoder)
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    if gradient_checkpointing:
        # The example switches the UNet to train mode so its checkpointing is active.
        unet.train()
        text_encoder.gradient_checkpointing_enable()
        unet.enable_gradient_checkpointing()
    text_encoder.train()

    optimizer = torch.optim.AdamW(
        text_encoder.get_input_embeddings().parameters(), lr=learning_rate, betas=ADAM_BETAS, weight_decay=ADAM_WEIGHT_DECAY, eps=ADAM_EPS
    )
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    orig_embeds = text_encoder.get_input_embeddings().weight.data.clone()
    index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool, device=device)
    index_no_updates[placeholder_id] = False

    gen = torch.Generator().manual_seed(seed)
    pool = _synthetic_images(max(4, batch_size), resolution, gen).to(device)
    # Tokenising a fixed prompt is sub-millisecond; done once so the timed step is model work.
    input_ids = _tokenize(tokenizer, [f"a photo of {TI_PLACEHOLDER}"] * batch_size).to(device)
    if int((input_ids == placeholder_id).sum()) != batch_size:
        raise RuntimeError("placeholder did not tokenise to its own single token")
    result.update(_memory_snapshot(device, "after_setup"))

    def step(i: int) -> float:
        idx = [(i * batch_size + j) % pool.shape[0] for j in range(batch_size)]
        return textual_inversion_reference_step(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            noise_scheduler=noise_scheduler,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            pixel_values=pool[idx],
            input_ids=input_ids,
            orig_embeds=orig_embeds,
            index_no_updates=index_no_updates,
            amp=amp,
        )

    times, cpu_times, losses = _time_steps(step, steps, warmup, device)
    with torch.no_grad():
        weight = text_encoder.get_input_embeddings().weight
        result["placeholder_moved"] = float((weight[placeholder_id] - weight[init_ids[0]]).abs().max())
        result["other_rows_changed"] = float((weight[index_no_updates] - orig_embeds[index_no_updates]).abs().max())
    result["trainable_params"] = sum(p.numel() for p in optimizer.param_groups[0]["params"])
    return _finish_result(result, times, cpu_times, losses, device)


# --------------------------------------------------------------------------------------
# DreamBooth (examples/dreambooth/train_dreambooth.py and train_dreambooth_lora.py)
# --------------------------------------------------------------------------------------


class _ManualLoRALinear(torch.nn.Module):
    """Fallback when peft is missing: y = W x + (alpha/r) * B A x, A ~ N(0, 1/r), B = 0,
    which is peft's init_lora_weights="gaussian" with lora_alpha = r."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        torch.nn.init.normal_(self.lora_A.weight, std=1.0 / rank)
        torch.nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


def add_lora_to_unet(unet: Any, rank: int = DB_LORA_RANK) -> str:
    """Freeze the UNet and add LoRA adapters to every attention projection; returns
    which implementation was used ("peft <version>" or "manual")."""
    unet.requires_grad_(False)
    try:
        import peft
        from peft import LoraConfig
    except ImportError:
        peft = None
    if peft is not None:
        # What train_dreambooth_lora.py does (its add_k_proj/add_v_proj targets do not
        # exist in an SD1.x UNet, so they are left out).
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGET_MODULES)))
        return f"peft {peft.__version__}"
    replacements = []
    for name, module in unet.named_modules():
        if not name.endswith((".attn1", ".attn2")):
            continue
        for suffix in LORA_TARGET_MODULES:
            parent_path, _, child = suffix.rpartition(".")
            replacements.append((module.get_submodule(parent_path) if parent_path else module, child))
    # Collected first: replacing while iterating named_modules() would revisit the wrappers.
    for parent, child in replacements:
        setattr(parent, child, _ManualLoRALinear(getattr(parent, child), rank, float(rank)))
    return "manual"


def dreambooth_reference_step(
    *,
    unet: Any,
    vae: Any,
    text_encoder: Any,
    noise_scheduler: Any,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    params_to_clip: Sequence[torch.nn.Parameter],
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    prior_preservation: bool,
    prior_loss_weight: float = PRIOR_LOSS_WEIGHT,
    set_grads_to_none: bool = False,
    amp: Amp | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> float:
    """One DreamBooth step; with prior preservation the batch is instance ++ class images
    (and prompts) and the loss is mse(instance) + prior_loss_weight * mse(class)."""
    amp = amp or Amp("no", pixel_values.device)
    with amp.autocast():
        model_input = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample()
        model_input = model_input * vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        bsz = model_input.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=model_input.device)
        noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
        if encoder_hidden_states is None:
            # Frozen text encoder, run every step (the example's default, no pre-computed embeddings).
            encoder_hidden_states = text_encoder(input_ids)[0]
        model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
        target = noise
        if prior_preservation:
            model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
            target, target_prior = torch.chunk(target, 2, dim=0)
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
            loss = loss + prior_loss_weight * prior_loss
        else:
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    amp.backward_and_step(loss, optimizer, params_to_clip)
    lr_scheduler.step()
    # train_dreambooth.py's default (--set_grads_to_none off) zeroes the grads in place, so
    # the full UNet's grad buffers stay allocated between steps; train_dreambooth_lora.py
    # calls plain zero_grad(), which frees them.
    optimizer.zero_grad(set_to_none=set_grads_to_none)
    return float(loss.detach())


def run_dreambooth_reference(
    checkpoint_path: PathLike,
    resolution: int,
    steps: int,
    mode: Literal["full", "lora"] = "full",
    prior_preservation: bool = False,
    batch_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    learning_rate: float | None = None,
    lora_rank: int = DB_LORA_RANK,
    gradient_checkpointing: bool = False,
    unet_config: str | None = None,
    mixed_precision: str = "no",
) -> dict[str, Any]:
    """Time ``steps`` DreamBooth steps after ``warmup`` untimed ones.

    ``batch_size`` counts instance images; with prior preservation the UNet sees twice
    as many.  ``learning_rate`` defaults to 5e-6 (full) / 5e-4 (LoRA).  ``unet_config``
    names the UNet (:data:`UNET_CONFIGS`; None: detected from the file).  Same memory keys
    as :func:`run_textual_inversion_reference`.
    """
    from diffusers.optimization import get_scheduler

    if mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora', not {mode!r}")
    device = torch.device(device)
    torch.manual_seed(seed)
    lr = learning_rate if learning_rate is not None else (DB_FULL_LR if mode == "full" else DB_LORA_LR)
    result = _base_result(f"dreambooth_{mode}", checkpoint_path, resolution, steps, warmup, batch_size, seed, device)
    result.update(
        {"mode": mode, "prior_preservation": prior_preservation, "learning_rate": lr, "gradient_checkpointing": gradient_checkpointing}
    )
    amp = Amp(mixed_precision, device)
    result["mixed_precision"] = mixed_precision
    sdxl = unet_config in SDXL_UNET_CONFIGS
    if sdxl:
        unet, text_encoder, tokenizer, vae, noise_scheduler = _load_sdxl_for_training(checkpoint_path, device, result, unet_config)
    else:
        unet, text_encoder, tokenizer, vae, noise_scheduler = _load_for_training(checkpoint_path, device, result, unet_config)

    # The examples: frozen modules in the mixed-precision dtype; the trained UNet (full) in float32.
    vae.requires_grad_(False).to(dtype=amp.dtype)
    if text_encoder is not None:
        text_encoder.requires_grad_(False).to(dtype=amp.dtype)
    if mode == "lora":
        unet.to(dtype=amp.dtype)
        result["lora_impl"] = add_lora_to_unet(unet, lora_rank)
        result["lora_rank"] = lora_rank
        unet.to(device)
        for p in unet.parameters():  # diffusers' cast_training_params: the adapters train in float32
            if p.requires_grad:
                p.data = p.data.float()
    else:
        unet.requires_grad_(True)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, weight_decay=ADAM_WEIGHT_DECAY, eps=ADAM_EPS)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    result["trainable_params"] = sum(p.numel() for p in params)

    gen = torch.Generator().manual_seed(seed)
    instance_pool = _synthetic_images(max(4, batch_size), resolution, gen).to(device)
    class_pool = _synthetic_images(max(4, batch_size), resolution, gen).to(device) if prior_preservation else None
    prompts = [DB_INSTANCE_PROMPT] * batch_size
    if prior_preservation:
        prompts += [DB_CLASS_PROMPT] * batch_size
    input_ids = _tokenize(tokenizer, prompts).to(device) if tokenizer is not None else None
    hidden, added = None, None
    if sdxl:
        # diffusers' SDXL LoRA example encodes fixed prompts once (no text-encoder training):
        # stand-in embeddings of the right shapes, and the size/crop time ids.
        count = len(prompts)
        hidden = torch.randn(count, 77, 2048, generator=gen).to(device, amp.dtype)
        added = {
            "text_embeds": torch.randn(count, 1280, generator=gen).to(device, amp.dtype),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * count, dtype=amp.dtype, device=device),
        }
    result.update(_memory_snapshot(device, "after_setup"))

    def step(i: int) -> float:
        idx = [(i * batch_size + j) % instance_pool.shape[0] for j in range(batch_size)]
        pixel_values = instance_pool[idx]
        if class_pool is not None:
            pixel_values = torch.cat([pixel_values, class_pool[idx]], dim=0)
        return dreambooth_reference_step(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            noise_scheduler=noise_scheduler,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            params_to_clip=params,
            pixel_values=pixel_values,
            input_ids=input_ids,
            prior_preservation=prior_preservation,
            set_grads_to_none=(mode == "lora"),
            amp=amp,
            encoder_hidden_states=hidden,
            added_cond_kwargs=added,
        )

    times, cpu_times, losses = _time_steps(step, steps, warmup, device)
    return _finish_result(result, times, cpu_times, losses, device)


# --------------------------------------------------------------------------------------
# Fresh-process runner and CLI
# --------------------------------------------------------------------------------------


def reference_command(
    method: Literal["ti", "db", "check"],
    *,
    resolution: int = 64,
    steps: int = 5,
    mode: Literal["full", "lora"] = "full",
    prior: bool = False,
    batch_size: int = 1,
    seed: int = 0,
    device: str = "cpu",
    warmup: int = 1,
    checkpoint: PathLike | None = None,
    gradient_checkpointing: bool = False,
    unet: str | None = None,
    python: str = sys.executable,
) -> list[str]:
    """argv for one measurement in a fresh interpreter (peak RSS is per process).

    ``unet`` (a :data:`UNET_CONFIGS` name) picks the diffusers UNet config and, without
    ``checkpoint``, the cached checkpoint; None: the tiny checkpoint, or the UNet
    detected from ``checkpoint``."""
    cmd = [python, str(Path(__file__).resolve()), f"--{method}"]
    if method != "check":
        cmd += [
            "--resolution",
            str(resolution),
            "--steps",
            str(steps),
            "--batch-size",
            str(batch_size),
            "--seed",
            str(seed),
            "--device",
            device,
            "--warmup",
            str(warmup),
        ]
        if method == "db":
            cmd += ["--mode", mode] + (["--prior"] if prior else [])
        if gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    if unet is not None:
        cmd += ["--unet", unet]
    return cmd


def run_json_command(cmd: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run a measuring process and return the last JSON line it printed (plus ``wall_s``).

    Every measurement runs in a process of its own, because peak RSS is per process.
    """
    start = time.perf_counter()
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"measurement printed no JSON line:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    data = json.loads(lines[-1])
    data["wall_s"] = round(time.perf_counter() - start, 2)
    return data


def run_reference_subprocess(method: Literal["ti", "db", "check"], timeout: float | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run :func:`reference_command` and return its JSON line (plus ``wall_s``)."""
    return run_json_command(reference_command(method, **kwargs), timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--check", action="store_true", help="diffusers vs ComfyUI max abs differences")
    what.add_argument("--ti", action="store_true", help="textual inversion reference loop")
    what.add_argument("--db", action="store_true", help="DreamBooth reference loop")
    parser.add_argument("--checkpoint", type=Path, default=None, help="LDM SD1.x .safetensors (default: the cached checkpoint for --unet)")
    parser.add_argument(
        "--unet",
        choices=tuple(UNET_CONFIGS),
        default=None,
        help="UNet architecture: 'tiny' (one level, the tests' checkpoint) or 'sd15-full' "
        "(the real ~860M-param SD1.5 UNet); default: detected from --checkpoint, else tiny",
    )
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=("full", "lora"), default="full")
    parser.add_argument("--prior", action="store_true", help="prior preservation (DreamBooth)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default="no",
        help="as accelerate's --mixed_precision for the examples (GPU runs)",
    )
    args = parser.parse_args(argv)

    checkpoint = args.checkpoint if args.checkpoint is not None else default_checkpoint(unet=args.unet or "tiny")
    start = time.perf_counter()
    if args.check:
        result: dict[str, Any] = check_equivalence(checkpoint, seed=args.seed)
    elif args.ti:
        result = run_textual_inversion_reference(
            checkpoint,
            args.resolution,
            args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
            warmup=args.warmup,
            gradient_checkpointing=args.gradient_checkpointing,
            unet_config=args.unet,
            mixed_precision=args.mixed_precision,
        )
    else:
        result = run_dreambooth_reference(
            checkpoint,
            args.resolution,
            args.steps,
            mode=args.mode,
            prior_preservation=args.prior,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
            warmup=args.warmup,
            gradient_checkpointing=args.gradient_checkpointing,
            unet_config=args.unet,
            mixed_precision=args.mixed_precision,
        )
    result["run_s"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
