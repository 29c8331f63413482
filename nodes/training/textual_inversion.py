"""Textual Inversion (Gal et al., 2022): learn new token vectors for a trigger word.

Only the new vectors train: they are their own small tensors (the only thing a multi-GPU run
synchronises); the diffusion model, text encoder and VAE are never written to, and nothing of
them is copied per step (frozen weights are read where they lie, see ``core.training_layers``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..comfy_bridge import devices, folders, sampling, saving, tokens
from ..comfy_bridge.diffusion_model import DiffusionModelForTraining
from ..comfy_bridge.progress import ComfyProgress
from ..comfy_bridge.text_encoders import TrainingTextEncoder
from ..core.distributed import SINGLE_PROCESS, Partition
from ..core.embedding_file import MODEL_FAMILY_BY_ENCODERS, EmbeddingFile, EmbeddingMismatchError, vectors_for_encoders
from ..core.files import resolve_inside
from ..core.prompts import TEMPLATE_SETS, choose_prompts, fill_template, parse_custom_templates
from ..core.trainer import (
    BatchSampler,
    LoopPlan,
    TrainingHost,
    TrainingSettings,
    encode_buckets,
    learning_rate,
    report_done,
    run_training,
    validate_common,
)
from ..core.training_images import TrainingImageSet
from ..core.training_math import LossTracker, init_vector_groups
from .common import diffusion_loss, grad_scaler, precision_for

log = logging.getLogger(__name__)

MAX_INIT_TOKENS = 75


@dataclass
class TextualInversionSettings(TrainingSettings):
    trigger_word: str = ""
    init_text: str = "*"
    vectors_per_token: int = 1
    steps: int = 1500
    learning_rate: str = "0.005"
    templates: Literal["object", "style", "captions", "custom"] = "object"
    custom_templates: str = ""
    file_format: Literal["safetensors", "pt"] = "safetensors"
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


def check_trigger_word(word: str, clip: Any) -> str:
    word = word.strip()
    if not word:
        raise ValueError("the trigger word is empty: name the new word, e.g. <my-cat>")
    if any(c.isspace() for c in word):
        raise ValueError(f"the trigger word '{word}' contains spaces: use one word, e.g. <{'-'.join(word.split())}>")
    if tokens.is_single_known_token(clip, word):
        raise ValueError(
            f"'{word}' already is a word the text encoder knows (a single token): training would fight "
            f"its meaning. Use a new word such as <{word}>."
        )
    return word


def model_family_of(clip: Any) -> tuple[str, dict[str, int]]:
    widths = tokens.text_encoder_widths(clip)
    family = MODEL_FAMILY_BY_ENCODERS.get(tuple(sorted(widths)))
    if family is None:
        described = ", ".join(f"{k} {w}" for k, w in widths.items()) or "none"
        raise ValueError(f"Textual Inversion here supports SD1.x, SD2.x and SDXL; this CLIP's text encoders are {described}")
    return family, widths


def validate(settings: TextualInversionSettings, images: TrainingImageSet | None, clip: Any, resume: EmbeddingFile | None) -> None:
    """Every check that can fail before training starts."""
    validate_common(settings, images, "training images")
    check_trigger_word(settings.trigger_word, clip)
    family, widths = model_family_of(clip)
    learning_rate(settings.learning_rate, 0.005)
    if not 1 <= settings.vectors_per_token <= 16:
        raise ValueError(f"vectors per token must be 1-16 (got {settings.vectors_per_token})")
    if settings.templates == "captions" and not images.has_captions:
        raise ValueError(
            "templates 'captions' needs a caption for every image: use an image folder with .txt captions, or 'object'/'style'"
        )
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
        target = resolve_inside(folders.first_folder("embeddings"), settings.output_name(), "." + settings.file_format)
        if target.exists() and not settings.overwrite:
            raise FileExistsError(f"{target.name} already exists in {target.parent}: choose another file name, or turn on overwrite")


def initial_vectors(
    settings: TextualInversionSettings, clip: Any, resume: EmbeddingFile | None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    notes: list[str] = []
    _, widths = model_family_of(clip)
    if resume is not None:
        notes.append(f"resumed from {resume.describe()}; its {resume.num_vectors} vector(s) set the vector count")
        return {k: v.clone() for k, v in vectors_for_encoders(resume, widths).items()}, notes
    rows = tokens.token_embedding_rows(clip, settings.init_text)
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


class TextualInversionTrainer:
    """The trainable vectors and one step; ``train_textual_inversion`` drives it on the skeleton."""

    def __init__(
        self,
        model: Any,
        clip: Any,
        vae: Any,
        images: TrainingImageSet,
        settings: TextualInversionSettings,
        init: dict[str, torch.Tensor],
        start_step: int = 0,
        teacher_vectors: dict[str, torch.Tensor] | None = None,
        partition: Partition = SINGLE_PROCESS,
    ):
        self.settings = settings
        self.partition = partition
        self.model, self.clip, self.vae = model, clip, vae
        self.family, _ = model_family_of(clip)
        self.trigger = settings.trigger_word.strip()
        self.schedule = learning_rate(settings.learning_rate, 0.005)
        self.start_step = start_step
        self.templates = None
        if settings.templates == "custom":
            self.templates = parse_custom_templates(settings.custom_templates)
        elif settings.templates != "captions":
            self.templates = TEMPLATE_SETS[settings.templates]
        self.precision = precision_for(model, settings.precision)
        self.notes = list(self.precision.notes)

        self.unet = DiffusionModelForTraining(
            model, self.precision.compute_dtype, memory_required=devices.training_memory(model, settings.batch_size, settings.resolution)
        )
        self.unet.load(clip.patcher)
        self.sampler = BatchSampler(
            encode_buckets(images, settings, lambda pixels: self.unet.latents_from_pixels(vae, pixels)),
            settings.seed,
            settings.batch_size,
            self.unet.device,
        )
        self.vectors = {k: torch.nn.Parameter(v.to(clip.patcher.load_device, torch.float32).clone()) for k, v in init.items()}
        self.encoder = TrainingTextEncoder(clip, trainable_words={self.trigger: self.vectors})
        self.teacher = None
        if teacher_vectors is not None:
            frozen = {k: v.to(clip.patcher.load_device).clone() for k, v in teacher_vectors.items()}
            self.teacher = TrainingTextEncoder(clip, trainable_words={self.trigger: frozen})
        self.optimizer = torch.optim.AdamW(list(self.vectors.values()), lr=self.schedule.rate(start_step + 1), weight_decay=0.0)
        self.scaler = grad_scaler(self.unet, self.precision)
        self.partition.broadcast(self.vectors.values())
        self.saved_path: Path | None = None
        self.training_settings = {k: v for k, v in asdict(settings).items() if k not in ("overwrite", "save")}

    def snapshot(self) -> EmbeddingFile:
        return EmbeddingFile(vectors={k: v.detach().to("cpu", torch.float32).clone() for k, v in self.vectors.items()}, name=self.trigger)

    def step(self, step: int) -> dict[str, float]:
        s = self.settings
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.rate(step)
        total = 0.0
        micro_batches = self.partition.micro_batches(s.gradient_accumulation)
        for index in range(micro_batches):
            batch = self.sampler.draw()
            prompts = choose_prompts(self.templates, batch.captions, self.trigger, self.sampler.rng)
            if not self.partition.owns(index):
                continue  # another process computes it (every process draws, so the streams agree)
            # The text encoder computes in float32 outside the diffusion model's autocast, as
            # CLIP Text Encode does.
            cond, pooled = self.encoder.encode(prompts, self.unet.needs_pooled)
            target = None
            if self.teacher is not None:
                with torch.no_grad():
                    t_cond, t_pooled = self.teacher.encode(prompts, self.unet.needs_pooled)
                    sigma = self.unet.sigmas(batch.timesteps)
                    target = self.unet.denoise(self.unet.noisy(batch.latents, batch.noise, sigma), sigma, t_cond, t_pooled)
            loss = diffusion_loss(self.unet, batch.latents, batch.noise, batch.timesteps, cond, pooled, target)
            self.scaler.scale(loss / micro_batches).backward()
            total += loss.item() / micro_batches
        # Summed before the scaler looks at them, so every process takes the same step.
        self.partition.sum_gradients(self.vectors.values())
        total = self.partition.sum(total)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": total}

    def preview(self) -> Any:
        if self.partition.rank != 0:
            return None  # one process shows what is learnt
        image = sampling.render_preview(
            self.model,
            self.encoder.clip,
            self.vae,
            fill_template(self.settings.preview_prompt, self.trigger),
            self.settings.seed,
            self.settings.resolution,
            self.settings.resolution,
        )
        self.unet.load(self.clip.patcher)  # sampling and decoding may have swapped our models out
        return sampling.preview_payload(image)

    def save(self, step: int) -> None:
        s = self.settings
        if not s.save or self.partition.rank != 0:
            return  # one process writes the file
        self.saved_path = saving.save_embedding_file(
            self.snapshot(),
            s.output_name(),
            file_format=s.file_format,
            overwrite=s.overwrite or self.saved_path is not None,
            base_model=self.family,
            steps=step,
            training_settings=self.training_settings,
        )


def train_textual_inversion(
    model: Any,
    clip: Any,
    vae: Any,
    images: TrainingImageSet,
    settings: TextualInversionSettings,
    *,
    resume: EmbeddingFile | None = None,
    node_id: str | None = None,
    host: TrainingHost | None = None,
    teacher_vectors: dict[str, torch.Tensor] | None = None,
    partition: Partition = SINGLE_PROCESS,
) -> TextualInversionResult:
    """Train the trigger word's vectors; saves to models/embeddings as configured.

    ``teacher_vectors``: regress the frozen model's predictions made with these vectors
    instead of the images (distillation; with planted vectors it is a known-answer test).
    """
    validate(settings, images, clip, resume)
    init, notes = initial_vectors(settings, clip, resume)
    start_step = int(resume.metadata.get("steps", "0") or 0) if resume is not None else 0
    host = host or ComfyProgress(settings.steps, node_id, "textual_inversion")
    with torch.inference_mode(False), torch.enable_grad():
        trainer = TextualInversionTrainer(model, clip, vae, images, settings, init, start_step, teacher_vectors, partition)
        notes += trainer.notes
        for note in notes:
            log.info("Textual Inversion: %s", note)
        tracker = LossTracker()
        plan = LoopPlan(settings.steps, start_step, settings.save_every, settings.preview_every)
        run_training(trainer, plan, host, tracker)
        trainer.save(start_step + settings.steps)
        report_done(host, tracker, settings.steps)
    return TextualInversionResult(
        embedding=trainer.snapshot(),
        losses=tracker,
        saved_path=trainer.saved_path,
        steps_trained=settings.steps,
        total_steps=start_step + settings.steps,
        notes=notes,
    )
