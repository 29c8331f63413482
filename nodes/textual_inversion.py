"""Textual Inversion (Gal et al., 2022): learn new token vectors for a trigger word.

The training core. It takes ComfyUI's MODEL, CLIP and VAE objects, but needs no server:
a worker process that loads them with ``comfy.sd`` can run it as it is. Only the new
vectors train (their own small tensors, the only thing a multi-GPU run would sync);
the model, text encoder and VAE are never written to.
"""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from . import comfy_adapter
from .embedding_file import EmbeddingFile, EmbeddingMismatchError, resolve_inside, vectors_for_encoders
from .prompts import TEMPLATE_SETS, choose_prompts, fill_template, parse_custom_templates
from .training_images import TrainingImageSet, group_into_buckets
from .training_math import LossTracker, init_vector_groups, parse_learning_rate, prediction_loss, sample_timesteps

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = {("clip_l",): "SD1.x", ("clip_h",): "SD2.x", ("clip_g", "clip_l"): "SDXL"}
MAX_INIT_TOKENS = 75


@dataclass
class TextualInversionSettings:
    trigger_word: str
    init_text: str = "*"
    vectors_per_token: int = 1
    steps: int = 1500
    learning_rate: str = "0.005"
    batch_size: int = 1
    gradient_accumulation: int = 1
    seed: int = 0
    templates: Literal["object", "style", "captions", "custom"] = "object"
    custom_templates: str = ""
    resolution: int = 512
    resize_mode: Literal["crop", "resize", "pad"] = "crop"
    bucketing: bool = True
    flip: bool = False
    save_every: int = 0
    file_name: str = ""
    file_format: Literal["safetensors", "pt"] = "safetensors"
    overwrite: bool = False
    save: bool = True
    preview_every: int = 0
    preview_prompt: str = "a photo of {}"

    def output_name(self) -> str:
        return self.file_name.strip() or self.trigger_word.strip().strip("<>") or "embedding"


@dataclass
class TextualInversionResult:
    embedding: EmbeddingFile
    losses: LossTracker
    saved_path: Path | None
    steps_trained: int
    total_steps: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class _Sample:
    latent: torch.Tensor
    flipped: torch.Tensor | None
    caption: str | None


def check_trigger_word(word: str, clip: Any) -> str:
    word = word.strip()
    if not word:
        raise ValueError("the trigger word is empty: name the new word, e.g. <my-cat>")
    if any(c.isspace() for c in word):
        raise ValueError(f"the trigger word '{word}' contains spaces: use one word, e.g. <{'-'.join(word.split())}>")
    if comfy_adapter.single_known_token(clip, word):
        raise ValueError(
            f"'{word}' already is a word the text encoder knows (a single token): training would fight "
            f"its meaning. Use a new word such as <{word}>."
        )
    return word


def model_family_of(clip: Any) -> tuple[str, dict[str, int]]:
    widths = comfy_adapter.text_encoder_widths(clip)
    family = SUPPORTED_FAMILIES.get(tuple(sorted(widths)))
    if family is None:
        described = ", ".join(f"{k} {w}" for k, w in widths.items()) or "none"
        raise ValueError(
            f"Textual Inversion here supports SD1.x, SD2.x and SDXL; this CLIP's text encoders are {described}"
        )
    return family, widths


def validate(settings: TextualInversionSettings, images: TrainingImageSet | None, clip: Any, resume: EmbeddingFile | None) -> list[str]:
    """Every check that can fail before training starts. Returns notes for the user."""
    notes: list[str] = []
    if images is None or len(images) == 0:
        raise ValueError("no training images: connect an IMAGE batch or an image folder with 3-50 images")
    check_trigger_word(settings.trigger_word, clip)
    family, widths = model_family_of(clip)
    if settings.steps < 1:
        raise ValueError(f"steps must be at least 1 (got {settings.steps})")
    parse_learning_rate(settings.learning_rate)
    if not 1 <= settings.vectors_per_token <= 16:
        raise ValueError(f"vectors per token must be 1-16 (got {settings.vectors_per_token})")
    if settings.batch_size < 1 or settings.gradient_accumulation < 1:
        raise ValueError("batch size and gradient accumulation must be at least 1")
    if settings.resolution < 64 or settings.resolution % 64:
        raise ValueError(f"resolution must be a multiple of 64 (got {settings.resolution})")
    if settings.preview_every < 0:
        raise ValueError("preview every must be 0 (off) or a number of steps")
    if settings.save_every < 0:
        raise ValueError("save every must be 0 (only at the end) or a number of steps")
    if settings.templates == "captions" and not images.has_captions:
        raise ValueError("templates 'captions' needs a caption for every image: use an image folder with .txt captions, or 'object'/'style'")
    if settings.templates == "custom":
        parse_custom_templates(settings.custom_templates)
    elif settings.templates not in TEMPLATE_SETS and settings.templates != "captions":
        raise ValueError(f"unknown templates '{settings.templates}'")
    if resume is not None:
        try:
            vectors_for_encoders(resume, widths)
        except EmbeddingMismatchError as error:
            raise ValueError(f"cannot resume: the file is for {resume.model_family}, this model is {family}. {error}") from None
    elif not settings.init_text.strip():
        raise ValueError("init text is empty: give a word close to the subject (e.g. 'cat', 'painting'), or '*'")
    if settings.save:
        target = resolve_inside(comfy_adapter.embedding_save_folder(), settings.output_name(), "." + settings.file_format)
        if target.exists() and not settings.overwrite:
            raise FileExistsError(
                f"{target.name} already exists in {target.parent}: choose another file name, or turn on overwrite"
            )
    return notes


def initial_vectors(settings: TextualInversionSettings, clip: Any, resume: EmbeddingFile | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    notes: list[str] = []
    _, widths = model_family_of(clip)
    if resume is not None:
        notes.append(f"resumed from {resume.describe()}; its {resume.num_vectors} vector(s) set the vector count")
        return {k: v.clone() for k, v in vectors_for_encoders(resume, widths).items()}, notes
    rows = comfy_adapter.token_embedding_rows(clip, settings.init_text)
    count = next(iter(rows.values())).shape[0]
    if count == 0:
        raise ValueError(f"init text '{settings.init_text}' gives no tokens: use a word such as 'cat'")
    if count > MAX_INIT_TOKENS:
        notes.append(f"init text is {count} tokens: only the first {MAX_INIT_TOKENS} are used")
        rows = {k: v[:MAX_INIT_TOKENS] for k, v in rows.items()}
        count = MAX_INIT_TOKENS
    groups = init_vector_groups(count, settings.vectors_per_token)
    if count > settings.vectors_per_token:
        notes.append(f"init text is {count} tokens for {settings.vectors_per_token} vector(s): consecutive tokens are averaged")
    elif count < settings.vectors_per_token:
        notes.append(f"init text is {count} token(s) for {settings.vectors_per_token} vectors: the tokens repeat")
    return {k: torch.stack([v[g].mean(dim=0) for g in groups]) for k, v in rows.items()}, notes


def _cache_latents(unet: comfy_adapter.DiffusionModelForTraining, vae: Any, images: TrainingImageSet, settings: TextualInversionSettings) -> list[list[_Sample]]:
    """VAE-encode every image (and its mirror image) once, grouped by aspect bucket."""
    buckets = []
    for _size, pixels, captions in group_into_buckets(images, settings.resolution, settings.resize_mode, settings.bucketing):
        latents = torch.cat([unet.latents_from_pixels(vae, pixels[i : i + 4]) for i in range(0, pixels.shape[0], 4)])
        flipped = None
        if settings.flip:
            mirrored = pixels.flip(2)
            flipped = torch.cat([unet.latents_from_pixels(vae, mirrored[i : i + 4]) for i in range(0, mirrored.shape[0], 4)])
        buckets.append([_Sample(latents[i], None if flipped is None else flipped[i], captions[i]) for i in range(latents.shape[0])])
    return buckets


def train_textual_inversion(
    model: Any,
    clip: Any,
    vae: Any,
    images: TrainingImageSet,
    settings: TextualInversionSettings,
    *,
    resume: EmbeddingFile | None = None,
    node_id: str | None = None,
    teacher_vectors: dict[str, torch.Tensor] | None = None,
) -> TextualInversionResult:
    """Train the trigger word's vectors; saves to models/embeddings as configured.

    ``teacher_vectors``: regress the frozen model's predictions made with these vectors
    instead of the images (distillation; with planted vectors it is a known-answer test).
    """
    notes = validate(settings, images, clip, resume)
    family, _widths = model_family_of(clip)
    trigger = settings.trigger_word.strip()
    init, init_notes = initial_vectors(settings, clip, resume)
    notes += init_notes
    for note in notes:
        log.info("Textual Inversion: %s", note)

    schedule = parse_learning_rate(settings.learning_rate)
    templates = None
    if settings.templates == "custom":
        templates = parse_custom_templates(settings.custom_templates)
    elif settings.templates != "captions":
        templates = TEMPLATE_SETS[settings.templates]
    start_step = int(resume.metadata.get("steps", "0") or 0) if resume is not None else 0
    total_steps = start_step + settings.steps

    with torch.inference_mode(False), torch.enable_grad():
        unet = comfy_adapter.DiffusionModelForTraining(model)
        unet.load()
        with torch.no_grad():
            buckets = _cache_latents(unet, vae, images, settings)
        vectors = {k: torch.nn.Parameter(v.to(unet.device, torch.float32).clone()) for k, v in init.items()}
        encoder = comfy_adapter.TrainableTextEncoder(clip, trigger, vectors)
        teacher = None
        if teacher_vectors is not None:
            teacher = comfy_adapter.TrainableTextEncoder(clip, trigger, {k: v.to(unet.device).clone() for k, v in teacher_vectors.items()})
        optimizer = torch.optim.AdamW(list(vectors.values()), lr=schedule.rate(start_step + 1), weight_decay=0.0)

        generator = torch.Generator().manual_seed(settings.seed)
        rng = random.Random(settings.seed)
        weights = [len(b) for b in buckets]
        tracker = LossTracker()
        progress = comfy_adapter.ProgressReporter(settings.steps, node_id, "textual_inversion")
        saved_path: Path | None = None
        training_settings = {k: v for k, v in asdict(settings).items() if k not in ("overwrite", "save")}

        def snapshot() -> EmbeddingFile:
            return EmbeddingFile(vectors={k: v.detach().to("cpu", torch.float32).clone() for k, v in vectors.items()}, name=trigger)

        def save(step: int) -> Path | None:
            nonlocal saved_path
            if not settings.save:
                return None
            saved_path = comfy_adapter.save_embedding_file(
                snapshot(), settings.output_name(), file_format=settings.file_format,
                overwrite=settings.overwrite or saved_path is not None,
                base_model=family, steps=step, training_settings=training_settings,
            )
            return saved_path

        done = 0
        try:
            for done in range(1, settings.steps + 1):
                comfy_adapter.raise_if_cancelled()
                step = start_step + done
                for group in optimizer.param_groups:
                    group["lr"] = schedule.rate(step)
                step_loss = 0.0
                for _ in range(settings.gradient_accumulation):
                    bucket = buckets[rng.choices(range(len(buckets)), weights=weights)[0]]
                    picks = [bucket[rng.randrange(len(bucket))] for _ in range(settings.batch_size)]
                    latents = torch.stack(
                        [p.flipped if p.flipped is not None and rng.random() < 0.5 else p.latent for p in picks]
                    ).to(unet.device)
                    prompts = choose_prompts(templates, [p.caption for p in picks], trigger, rng)
                    noise = torch.randn(latents.shape, generator=generator).to(unet.device)
                    sigma = unet.sigmas(sample_timesteps(latents.shape[0], generator))
                    x = unet.noisy(latents, noise, sigma)
                    with unet.autocast():
                        cond, pooled = encoder.encode(prompts, unet.needs_pooled)
                        denoised = unet.denoise(x, sigma, cond, pooled)
                        target = latents
                        if teacher is not None:
                            with torch.no_grad():
                                t_cond, t_pooled = teacher.encode(prompts, unet.needs_pooled)
                                target = unet.denoise(x, sigma, t_cond, t_pooled)
                    loss = prediction_loss(denoised.float(), target.float(), sigma, unet.prediction).mean()
                    (loss / settings.gradient_accumulation).backward()
                    step_loss += loss.item() / settings.gradient_accumulation
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.add(step, {"loss": step_loss})
                raw, smooth = tracker.last()
                preview = None
                if settings.preview_every and (done % settings.preview_every == 0 or done == settings.steps):
                    preview = comfy_adapter.preview_payload(comfy_adapter.render_preview(
                        model, comfy_adapter.bind_trigger_words(clip, {trigger: snapshot().vectors}), vae,
                        fill_template(settings.preview_prompt, trigger), settings.seed, settings.resolution, settings.resolution,
                    ))
                progress.update(done, {"loss": raw}, {"loss": smooth}, preview=preview)
                if settings.save_every and done % settings.save_every == 0 and done < settings.steps:
                    save(step)
        except comfy_adapter.Cancelled:
            progress.finish(done - 1, "cancelled")
            raise
        save(total_steps)
        raw, smooth = tracker.last()
        progress.finish(settings.steps, "done", {"loss": raw} if raw is not None else None, {"loss": smooth} if smooth is not None else None)
        return TextualInversionResult(
            embedding=snapshot(), losses=tracker, saved_path=saved_path, steps_trained=settings.steps,
            total_steps=total_steps, notes=notes,
        )
