"""Sampling with ComfyUI's own sampler: live previews and prior-preservation class images."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import torch

from . import progress
from .devices import intermediate_device
from .text_encoders import conditioning


def sampler_names() -> list[str]:
    """KSampler's samplers now (packs loaded after this one may have added some)."""
    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    return list(comfy.samplers.KSampler.SCHEDULERS)


def with_guidance(conditioning: list, guidance: float | None) -> list:
    """CONDITIONING with a guidance value, as the FluxGuidance node sets it (guidance-distilled models)."""
    if guidance is None:
        return conditioning
    return [[cond, {**extra, "guidance": guidance}] for cond, extra in conditioning]


def render_preview(
    model: Any,
    clip: comfy.sd.CLIP,
    vae: Any,
    prompt: str,
    seed: int,
    width: int,
    height: int,
    steps: int = 20,
    cfg: float = 7.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    guidance: float | None = None,
    negative_prompt: str = "",
) -> Any:
    """An image (PIL) from ComfyUI's own sampler, for the node's live preview."""
    from PIL import Image

    with torch.inference_mode():
        positive = with_guidance(conditioning(clip, prompt), guidance)
        negative = with_guidance(conditioning(clip, negative_prompt), guidance)
        channels = model.get_model_object("latent_format").latent_channels
        latent = torch.zeros(1, channels, height // 8, width // 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        # No callback and no progress bar: the training node owns its bar.
        samples = comfy.sample.sample(
            model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent, disable_pbar=True, seed=seed
        )
        pixels = vae.decode(samples)[0].clamp(0, 1)
    array = (pixels.reshape(-1, *pixels.shape[-3:])[0].float().cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def sample_latents(
    model: Any,
    clip: comfy.sd.CLIP,
    prompt: str,
    count: int,
    width: int,
    height: int,
    seed: int,
    sampler_name: str,
    scheduler: str,
    steps: int,
    cfg: float,
    *,
    negative_prompt: str = "",
    guidance: float | None = None,
    chunk_size: int = 4,
    node_id: str | None = None,
    owned: Callable[[int], bool] | None = None,
) -> torch.Tensor:
    """``count`` latents sampled by ``model`` as KSampler would (raw LATENT space, [N, C, h, w]).

    Image ``i`` starts from the noise KSampler gives batch index ``i`` for ``seed``; chunks
    of ``chunk_size`` are sampled at a time (sampler seed ``seed + first index``), so a
    batch of at most ``chunk_size`` equals KSampler on an empty latent of that batch size.
    ``owned(chunk number)``: sample only those chunks (several processes share the work); the
    others stay zeros.
    """
    positive = with_guidance(conditioning(clip, prompt), guidance)
    negative = with_guidance(conditioning(clip, negative_prompt), guidance)
    channels = model.get_model_object("latent_format").latent_channels
    chunks = [list(range(s, min(count, s + chunk_size))) for s in range(0, count, chunk_size)]
    bar = comfy.utils.ProgressBar(len(chunks) * steps, node_id=node_id)
    out = []
    for number, indices in enumerate(chunks):
        progress.raise_if_cancelled()
        if owned is not None and not owned(number):
            out.append(torch.zeros(len(indices), channels, height // 8, width // 8))
            continue
        empty = torch.zeros([len(indices), channels, height // 8, width // 8], device=intermediate_device())
        empty = comfy.sample.fix_empty_latent_channels(model, empty)
        noise = comfy.sample.prepare_noise(empty, seed, indices)

        def callback(step: int, x0: Any, x: Any, total_steps: int, _done: int = number * steps) -> None:
            progress.raise_if_cancelled()
            bar.update_absolute(_done + step + 1, len(chunks) * steps)

        samples = comfy.sample.sample(
            model,
            noise,
            steps,
            cfg,
            sampler_name,
            scheduler,
            positive,
            negative,
            empty,
            denoise=1.0,
            callback=callback,
            disable_pbar=True,
            seed=(seed + indices[0]) % 2**64,
        )
        out.append(samples.to("cpu", torch.float32))
    return torch.cat(out)


def preview_payload(image: Any) -> tuple[str, Any, int]:
    """What ComfyUI's progress bar takes as a preview image."""
    return ("JPEG", image, 512)
