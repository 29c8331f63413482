"""DreamBooth (Ruiz et al., 2023): fine-tune the diffusion model on a few images of a subject.

Prompts pair a rare identifier with the class noun ("a photo of sks dog"); with prior
preservation the model is also trained on images *it* generated for the class prompt
("a photo of dog"), so it keeps what a dog looks like:

    loss = E ||x̂θ(αt x + σt ε, c) − x||² + λ · E ||x̂θ(αt' x_pr + σt' ε', c_pr) − x_pr||²

both terms in the model's own target space (ε or v; see ``core.training_math.prediction_loss``).

Nothing the caller passed in is written to. LoRA adapters add their term to the layers' outputs
in training views of the diffusion model and text encoders; full fine-tuning trains weights of
the views' own (bfloat16 or float32); the outputs are clones carrying the result as LoRA or
"diff" patches, so other branches of the graph keep the original model.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..comfy_bridge import devices, folders, sampling, saving, tokens
from ..comfy_bridge.diffusion_model import (
    DiffusionModelForTraining,
    family_of,
    model_family,
    model_identity,
    noise_level_sampler,
    prediction_type,
    training_mode,
    unet_lora_weights,
)
from ..comfy_bridge.diffusion_model import weight_count as diffusion_weight_count
from ..comfy_bridge.progress import ComfyProgress
from ..comfy_bridge.text_encoders import TrainingTextEncoder, clip_lora_weights, encode_prompt
from ..comfy_bridge.text_encoders import weight_count as text_weight_count
from ..core import class_cache, optimizers
from ..core.adapters import LoraPair, lora_file_tensors
from ..core.distributed import SINGLE_PROCESS, Partition, gradient_sync
from ..core.embedding_file import EmbeddingFile, read_embedding, vectors_for_encoders
from ..core.identifiers import class_word, derive_identifier, suggest_identifier
from ..core.precision import Precision
from ..core.trainer import (
    BatchSampler,
    LatentSample,
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
from ..core.training_math import LearningRateSchedule, LossTracker
from ..families import SamplingDefaults
from .common import diffusion_loss, grad_scaler, precision_for
from .textual_inversion import model_family_of

log = logging.getLogger(__name__)

AUTO_EMBEDDING_LEARNING_RATE = 5e-4
WEIGHT_DECAY = {"full": 1e-2, "lora": 1e-4}  # the diffusers examples' defaults
MAX_GRAD_NORM = 1.0  # the diffusers examples' gradient clipping
CLASS_SAMPLE_CHUNK = 4
MODES = ("lora", "full")
OPTIMIZERS = ("AdamW", "AdamW8bit")
NO_RESUME = ""
# Class batches draw from their own random streams, so the instance half of every step is
# the same with or without prior preservation (and λ = 0 trains exactly as no prior).
_CLASS_STREAM = 0x5EED_C1A55


@dataclass
class DreamBoothSettings(TrainingSettings):
    instance_prompt: str = "a photo of sks dog"
    class_prompt: str = "a photo of dog"
    identifier: str = ""  # empty: the instance prompt's words missing from the class prompt
    mode: Literal["lora", "full"] = "lora"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: str = "attention"
    train_text_encoder: bool = False
    text_encoder_learning_rate: str = "auto"
    pivotal_tuning: bool = False
    embedding_learning_rate: str = "auto"
    prior_preservation: bool = True
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_sampler: str = "euler_ancestral"
    class_scheduler: str = "normal"
    class_steps: int = 30
    class_cfg: float = 7.0
    noise_levels: str = "auto"  # auto / uniform / logit-normal / shift (see comfy_bridge.diffusion_model)
    sigma_min: float = 0.0
    sigma_max: float = 1.0
    guidance: float = -1.0  # guidance-distilled models (Flux.1-dev): the value trained with; below 0: the family's
    loss_target: Literal["model", "x0"] = "model"  # the model's own target (eps / v / velocity), or ComfyUI core's x0
    steps: int = 800
    gradient_checkpointing: bool = False
    optimizer: Literal["AdamW", "AdamW8bit"] = "AdamW"
    full_bf16: bool = True
    fused_backward: bool = True
    max_grad_norm: float = MAX_GRAD_NORM
    resume_from: str = NO_RESUME  # "loras/NAME" (LoRA mode) or "checkpoints/NAME" (full mode)


@dataclass
class DreamBoothResult:
    model: Any
    clip: Any
    identifier: str
    losses: LossTracker
    saved: dict[str, Path]
    steps_trained: int
    notes: list[str] = field(default_factory=list)
    embedding: EmbeddingFile | None = None
    class_images: str = "none"  # "none", "given", "cached", "generated"
    lora: dict[str, torch.Tensor] | None = None  # the LoRA file's tensors (LoRA mode)
    diffs: dict[str, dict[str, torch.Tensor]] | None = None  # full mode: {"model"/"clip": trained − starting weights}
    optimizer_state_bytes: int = 0  # what this process's optimizer kept (full mode on several processes: its shard)


@dataclass
class _Plan:
    identifier: str
    class_word: str
    schedule: LearningRateSchedule
    text_schedule: LearningRateSchedule
    embedding_schedule: LearningRateSchedule
    targets: dict[str, Path]
    notes: list[str]


# --------------------------------------------------------------------------- validation


def output_name(settings: DreamBoothSettings, identifier: str) -> str:
    if settings.file_name.strip():
        return settings.file_name.strip()
    import re

    slug = re.sub(r"[^\w-]+", "_", identifier).strip("_") or "subject"
    return f"dreambooth-{slug}"


def identifier_notes(identifier: str, clip: Any, seed: int) -> list[str]:
    """Warnings about a weak identifier, and rare-token alternatives."""
    vocab = tokens.first_vocabulary(clip)
    size = max(vocab.values()) + 1
    notes = []
    ids = tokens.first_token_ids(clip, identifier)
    if len(ids) > 3:
        notes.append(
            f"identifier '{identifier}' splits into {len(ids)} tokens: each token keeps its own meaning; 1-3 rare tokens work best"
        )
    for word in identifier.split():
        word_ids = tokens.first_token_ids(clip, word)
        if len(word_ids) == 1 and word_ids[0] < size * 0.2:
            notes.append(
                f"identifier word '{word}' is a common word (token #{word_ids[0]} of {size}): the model must unlearn its meaning; a rare token works better"
            )
    for note in notes:
        log.warning("DreamBooth: %s", note)
    try:
        suggestions = [
            suggest_identifier(vocab, seed + i, 1, lambda w: tokens.is_single_known_token(clip, w, everywhere=True)) for i in range(3)
        ]
        notes.append("rare-token identifiers you could use: " + ", ".join(f"'{s}'" for s in suggestions))
    except ValueError:
        pass
    return notes


def validate(
    settings: DreamBoothSettings, images: TrainingImageSet | None, model: Any, clip: Any, class_images: torch.Tensor | None
) -> _Plan:
    """Every check that can fail before work starts (class images, training)."""
    validate_common(settings, images, "instance images")
    identifier = derive_identifier(settings.instance_prompt, settings.class_prompt, settings.identifier)
    if settings.mode not in MODES:
        raise ValueError(f"mode must be 'lora' or 'full' (got '{settings.mode}')")
    if settings.mode == "lora":
        if settings.lora_rank < 1:
            raise ValueError(f"LoRA rank must be at least 1 (got {settings.lora_rank})")
        if not (settings.lora_alpha > 0 and math.isfinite(settings.lora_alpha)):
            raise ValueError(f"LoRA alpha must be a positive number (got {settings.lora_alpha})")
    if not math.isfinite(settings.prior_loss_weight) or settings.prior_loss_weight < 0:
        raise ValueError(f"the prior loss weight λ must be 0 or more (got {settings.prior_loss_weight})")
    if settings.prior_preservation and class_images is None:
        if settings.num_class_images < 1:
            raise ValueError("prior preservation needs at least 1 class image (num class images)")
        if settings.class_sampler not in sampling.sampler_names():
            raise ValueError(f"unknown sampler '{settings.class_sampler}'")
        if settings.class_scheduler not in sampling.scheduler_names():
            raise ValueError(f"unknown scheduler '{settings.class_scheduler}'")
        if settings.class_steps < 1:
            raise ValueError("class image steps must be at least 1")
    if class_images is not None and (not isinstance(class_images, torch.Tensor) or class_images.ndim != 4 or class_images.shape[0] < 1):
        raise ValueError("class images must be an IMAGE batch")
    if settings.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
    if settings.optimizer == "AdamW8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("optimizer AdamW8bit needs the bitsandbytes package (pip install bitsandbytes); or choose AdamW") from None
    family = family_of(model)
    schedule = learning_rate(settings.learning_rate, family.learning_rates[settings.mode])
    text_schedule = schedule
    if settings.text_encoder_learning_rate.strip().lower() != "auto":
        text_schedule = learning_rate(settings.text_encoder_learning_rate, schedule.rate(1), "text encoder learning rate")
    embedding_schedule = learning_rate(settings.embedding_learning_rate, AUTO_EMBEDDING_LEARNING_RATE, "embedding learning rate")
    prediction_type(model)  # refuses families trained another way, with their name
    if settings.loss_target not in ("model", "x0"):
        raise ValueError(f"loss target must be 'model' or 'x0' (got '{settings.loss_target}')")
    if not math.isfinite(settings.guidance):
        raise ValueError("guidance must be a number (below 0: the model family's)")
    noise_level_sampler(model, settings.noise_levels, settings.resolution, (settings.sigma_min, settings.sigma_max))
    precision_for(model, settings.precision, full=settings.mode == "full", full_bf16=settings.full_bf16)  # refuses fp8 full mode
    if settings.mode == "lora":
        unet_lora_weights(model, settings.lora_targets)
        if settings.gradient_checkpointing and family.activation_copies:
            # Recomputing these blocks in backward gives the LoRA terms' saved inputs another layout
            # than the forward did, which torch's checkpoint refuses; not yet mended.
            raise ValueError(
                f"gradient checkpointing with a LoRA on {family.name} is not supported yet: turn gradient checkpointing off "
                "(full fine-tuning supports it)"
            )
        if settings.train_text_encoder:
            clip_lora_weights(clip)
    if settings.pivotal_tuning:
        model_family_of(clip)
    resume_kind(settings)
    targets: dict[str, Path] = {}
    if settings.save:
        name = output_name(settings, identifier)
        targets["lora" if settings.mode == "lora" else "checkpoint"] = folders.target(
            "lora" if settings.mode == "lora" else "checkpoint", name
        )
        if settings.pivotal_tuning:
            targets["embedding"] = folders.target("embedding", name)
        for path in targets.values():
            if path.exists() and not settings.overwrite:
                raise FileExistsError(f"{path.name} already exists in {path.parent}: choose another file name, or turn on overwrite")
    notes = identifier_notes(identifier, clip, settings.seed)
    return _Plan(
        identifier,
        class_word(settings.instance_prompt, settings.class_prompt, identifier),
        schedule,
        text_schedule,
        embedding_schedule,
        targets,
        notes,
    )


def resume_kind(settings: DreamBoothSettings) -> str | None:
    """'loras' or 'checkpoints' for a resumed run (checked against the mode), None for a fresh one."""
    if not settings.resume_from:
        return None
    kind, _, name = settings.resume_from.partition("/")
    wanted = "loras" if settings.mode == "lora" else "checkpoints"
    if kind not in ("loras", "checkpoints") or not name:
        raise ValueError(f"resume from '{settings.resume_from}': choose a LoRA (loras/...) or a checkpoint (checkpoints/...) from the list")
    if kind != wanted:
        raise ValueError(
            f"resume from '{settings.resume_from}': mode '{settings.mode}' continues a {'LoRA' if wanted == 'loras' else 'full checkpoint'} "
            f"({wanted}/...)"
        )
    folders.file_path(kind, name)  # exists and is inside its folder
    return kind


# --------------------------------------------------------------------------- class images


# The class-image settings the node starts with: left as they are, the family's own are used.
_UNCHANGED_CLASS_SAMPLING = ("euler_ancestral", "normal", 30, 7.0)


def class_sampling(model: Any, settings: DreamBoothSettings) -> SamplingDefaults:
    """How class images are sampled: the family's usual settings unless the user changed the node's.

    Flux.1-dev samples with cfg 1 and its guidance in the conditioning, Chroma and SD3 with real
    CFG; SD keeps the settings the node starts with. Settings a user changed are used as given
    (a guidance-distilled model keeps its family's guidance value).
    """
    family = family_of(model)
    given = (settings.class_sampler, settings.class_scheduler, settings.class_steps, float(settings.class_cfg))
    if given == _UNCHANGED_CLASS_SAMPLING:
        return family.class_sampling
    return SamplingDefaults(*given, guidance=family.class_sampling.guidance, negative=family.class_sampling.negative)


def class_cache_key(model: Any, settings: DreamBoothSettings) -> tuple[str, dict[str, Any]]:
    how = class_sampling(model, settings)
    description = {
        "model": model_identity(model),
        "family": model_family(model),
        "prompt": settings.class_prompt.strip(),
        "negative": how.negative,
        "sampler": how.sampler,
        "scheduler": how.scheduler,
        "steps": how.steps,
        "cfg": float(how.cfg),
        "width": settings.resolution,
        "height": settings.resolution,
        "seed": settings.seed,
        "count": settings.num_class_images,
        "chunk": CLASS_SAMPLE_CHUNK,
    }
    if how.guidance is not None:
        description["guidance"] = float(how.guidance)
    return class_cache.cache_key(description), description


def class_latents(
    model: Any, clip: Any, settings: DreamBoothSettings, node_id: str | None = None, partition: Partition = SINGLE_PROCESS
) -> tuple[torch.Tensor, bool]:
    """Class images generated by the frozen model, as raw LATENT samples; (latents, from_cache).

    Several processes share the sampling (chunk by chunk) and each ends with all of them; the
    first writes the cache. The images are the same as one process would make.
    """
    key, description = class_cache_key(model, settings)
    cached = class_cache.read_class_cache(folders.cache_folder(), key, settings.num_class_images)
    if cached is not None:
        log.info("DreamBooth: reusing %d cached class images for '%s'", cached.shape[0], settings.class_prompt)
        return cached, True
    how = class_sampling(model, settings)
    log.info("DreamBooth: generating %d class images for '%s' (%s)", settings.num_class_images, settings.class_prompt, how.describe())
    latents = sampling.sample_latents(
        model,
        clip,
        settings.class_prompt.strip(),
        settings.num_class_images,
        settings.resolution,
        settings.resolution,
        settings.seed,
        how.sampler,
        how.scheduler,
        how.steps,
        how.cfg,
        negative_prompt=how.negative,
        guidance=how.guidance,
        chunk_size=CLASS_SAMPLE_CHUNK,
        node_id=node_id,
        owned=partition.owns if partition.distributed else None,
    )
    latents = partition.sum_tensor(latents)  # each chunk was sampled by one process, zeros elsewhere
    if partition.rank == 0:
        class_cache.write_class_cache(folders.cache_folder(), key, latents, description)
    return latents, False


# --------------------------------------------------------------------------- training


def memory_plan(settings: DreamBoothSettings, precision: Precision) -> tuple[bool, bool, list[str]]:
    """(bfloat16 trained copy, fused backward step, notes) for these settings."""
    bf16 = settings.mode == "full" and precision.copy_dtype == torch.bfloat16
    if settings.mode != "full" or not (settings.full_bf16 or settings.fused_backward):
        return False, False, []
    if settings.optimizer != "AdamW":
        return (
            False,
            False,
            [
                f"full_bf16 and fused_backward work with the AdamW optimizer; {settings.optimizer} trains a float32 copy with whole-model steps"
            ],
        )
    if settings.fused_backward and settings.gradient_accumulation > 1:
        return bf16, False, ["fused_backward needs gradient accumulation 1: whole-model gradients are kept"]
    if settings.fused_backward and precision.loss_scaling:
        return (
            bf16,
            False,
            ["fused_backward on float16 compute needs full_bf16 (the fused step has no loss scaling): whole-model gradients are kept"],
        )
    return bf16, settings.fused_backward, []


def full_shards(settings: DreamBoothSettings, precision: Precision, partition: Partition) -> bool:
    """Whether the processes divide the optimizer state among them (ZeRO stage 2).

    Full fine-tuning's optimizer state is the largest thing a process holds. Not under loss
    scaling: a step skipped for an overflow must be skipped everywhere, and each process would
    see only the gradients it owns."""
    return settings.mode == "full" and partition.distributed and partition.shard_optimizer_state and not precision.loss_scaling


def _make_optimizer(kind: str, groups: list[dict], weight_decay: float, own: bool = False, seed: int = 0) -> torch.optim.Optimizer:
    for group in groups:
        group.setdefault("weight_decay", weight_decay)
    if own:
        return optimizers.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, seed=seed)
    if kind == "AdamW8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


class DreamBoothTrainer:
    """The trainable state and one step; ``train_dreambooth`` drives it on the skeleton."""

    def __init__(
        self,
        model: Any,
        clip: Any,
        vae: Any,
        images: TrainingImageSet,
        settings: DreamBoothSettings,
        plan: _Plan,
        class_raw: torch.Tensor | None = None,
        class_pixels: torch.Tensor | None = None,
        partition: Partition = SINGLE_PROCESS,
    ):
        self.settings = settings
        self.partition = partition
        self.plan = plan
        self.model, self.clip, self.vae = model, clip, vae
        self.start_step = 0
        full = settings.mode == "full"
        self.precision = precision_for(model, settings.precision, full=full, full_bf16=settings.full_bf16)
        self.bf16, self.fused, notes = memory_plan(settings, self.precision)
        self.own_optimizer = self.bf16 or self.fused  # the pack's AdamW (moments in the weights' dtype)
        self.shards_state = full_shards(settings, self.precision, partition)
        self.notes = [*self.precision.notes, *notes]
        init = torch.Generator().manual_seed(settings.seed)

        # --- the diffusion model
        self.unet_pairs: dict[str, LoraPair] = {}
        if settings.mode == "lora":
            for key, shape in unet_lora_weights(model, settings.lora_targets).items():
                self.unet_pairs[key] = LoraPair(shape, settings.lora_rank, settings.lora_alpha, device=model.load_device, generator=init)
        own_dtype = (torch.bfloat16 if self.bf16 else torch.float32) if full else None
        trainable_bytes = sum(math.prod(p.shape) for pair in self.unet_pairs.values() for p in pair.parameters()) * 16
        if full:
            # ComfyUI keeps this much free beside the frozen weights (offloading some where it must:
            # the view computes with its own copy, so frozen weights are only read at the start and end).
            shards = partition.world_size if self.shards_state else 1

            def held(weights: int, dtype: torch.dtype) -> int:
                return optimizers.full_training_bytes(
                    weights, dtype, settings.optimizer, fused_backward=self.fused, shards=shards, own_state=self.own_optimizer
                )

            trainable_bytes = held(diffusion_weight_count(model), own_dtype)
            if settings.train_text_encoder:
                trainable_bytes += held(text_weight_count(clip), torch.float32)  # its own copy is float32
            share = f", this process's share of the optimizer state of {partition.world_size}" if shards > 1 else ""
            self.notes.append(
                f"full fine-tuning holds about {trainable_bytes / 2**30:.2f} GiB beyond the frozen model (its own weights{share}); "
                "ComfyUI keeps that free, offloading frozen weights where it must"
            )
        noise_levels, noise_note = noise_level_sampler(
            model, settings.noise_levels, settings.resolution, (settings.sigma_min, settings.sigma_max)
        )
        family = family_of(model)
        if not noise_levels.discrete:  # SD's uniform timesteps are what every SD trainer does: no note
            self.notes.append(noise_note)
        self.notes.extend(family.notes)
        self.unet = DiffusionModelForTraining(
            model,
            self.precision.compute_dtype,
            adapters=self.unet_pairs,
            own_dtype=own_dtype,
            gradient_checkpointing=settings.gradient_checkpointing,
            memory_required=devices.training_memory(model, settings.batch_size, settings.resolution, trainable_bytes),
            noise_levels=noise_levels,
            guidance=None if settings.guidance < 0 else settings.guidance,
            prediction="x0" if settings.loss_target == "x0" else None,
        )
        if self.unet.guidance is not None:
            self.notes.append(f"guidance {self.unet.guidance:g} embedded while training ({family.name})")
        if settings.loss_target == "x0":
            self.notes.append("loss on the denoised latent (x0), as ComfyUI's own trainer; noisy steps weigh σ² less")

        # --- the text side
        self.clip_pairs: dict[str, LoraPair] = {}
        if settings.train_text_encoder and settings.mode == "lora":
            for key, shape in clip_lora_weights(clip).items():
                self.clip_pairs[key] = LoraPair(
                    shape, settings.lora_rank, settings.lora_alpha, device=clip.patcher.load_device, generator=init
                )
        self.vectors: dict[str, torch.nn.Parameter] = {}
        if settings.pivotal_tuning:
            rows = tokens.token_embedding_rows(clip, plan.class_word)
            self.vectors = {
                k: torch.nn.Parameter(v.mean(dim=0, keepdim=True).to(clip.patcher.load_device, torch.float32)) for k, v in rows.items()
            }
        self.resume()
        self.encoder: TrainingTextEncoder | None = None
        text_own = torch.float32 if settings.train_text_encoder and full else None
        if self.clip_pairs or self.vectors or text_own is not None:
            self.encoder = TrainingTextEncoder(
                clip,
                trainable_words={plan.identifier: self.vectors} if self.vectors else None,
                adapters=self.clip_pairs,
                own_dtype=text_own,
            )
            if self.resumed_text is not None:
                _copy_weights(self.encoder.view, self.resumed_text)
        self.unet.load(clip.patcher)

        # --- latents, cached once
        self.instance = BatchSampler(
            encode_buckets(images, settings, lambda pixels: self.unet.latents_from_pixels(vae, pixels)),
            settings.seed,
            settings.batch_size,
            self.unet.device,
            noise_levels,
        )
        self.klass: BatchSampler | None = None
        if settings.prior_preservation:
            if class_pixels is not None:
                class_buckets = encode_buckets(
                    TrainingImageSet.from_image_batch(class_pixels), settings, lambda pixels: self.unet.latents_from_pixels(vae, pixels)
                )
            else:
                scaled = self.unet.scaled_latents(class_raw)
                class_buckets = [[LatentSample(scaled[i], None, None) for i in range(scaled.shape[0])]]
            self.klass = BatchSampler(class_buckets, settings.seed ^ _CLASS_STREAM, settings.batch_size, self.unet.device, noise_levels)

        self.frozen_text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        with torch.no_grad():
            for prompt in self._prompts():
                if self.encoder is None or (prompt == settings.class_prompt.strip() and not (self.clip_pairs or text_own is not None)):
                    self.frozen_text[prompt] = encode_prompt(clip, prompt)

        # --- the optimizer
        groups = []
        unet_params = [p for pair in self.unet_pairs.values() for p in pair.parameters()] + self.unet.trained_parameters()
        groups.append({"params": unet_params, "lr": plan.schedule.rate(1), "name": "unet"})
        text_params = [p for pair in self.clip_pairs.values() for p in pair.parameters()]
        if self.encoder is not None:
            text_params += self.encoder.trained_parameters()
        if text_params:
            groups.append({"params": text_params, "lr": plan.text_schedule.rate(1), "name": "text_encoder"})
        if self.vectors:
            groups.append(
                {"params": list(self.vectors.values()), "lr": plan.embedding_schedule.rate(1), "name": "embedding", "weight_decay": 0.0}
            )
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = _make_optimizer(
            settings.optimizer, groups, WEIGHT_DECAY[settings.mode], own=self.own_optimizer, seed=settings.seed
        )
        self.scaler = grad_scaler(self.unet, self.precision)
        self.sync = gradient_sync(partition, self.params, shard=self.shards_state)
        if self.sync.sharded:
            owned = self.sync.owned_elements
            self.notes.append(
                f"optimizer state sharded over {partition.world_size} processes (ZeRO stage 2): this one steps "
                f"{owned[partition.rank] / 1e6:.1f}M of {sum(owned) / 1e6:.1f}M trained weights"
            )
        elif full and partition.distributed and partition.shard_optimizer_state:
            self.notes.append("optimizer state not sharded: float16 compute's loss scaling needs every gradient on every process")
        self.optimizer_state_bytes = 0
        self.fused_step = optimizers.FusedBackwardStep(self.optimizer, settings.max_grad_norm, sync=self.sync) if self.fused else None
        # Every process starts from the same adapters (the full copy is the same file's weights everywhere).
        partition.broadcast(
            [p for pair in (*self.unet_pairs.values(), *self.clip_pairs.values()) for p in pair.parameters()] + list(self.vectors.values())
        )

    # ----------------------------------------------------------------------- resuming

    resumed_text: torch.nn.Module | None = None

    def resume(self) -> None:
        """Start from a saved LoRA (with its pivotal embedding) or full checkpoint; the step count goes on."""
        kind = resume_kind(self.settings)
        if kind is None:
            return
        name = self.settings.resume_from.partition("/")[2]
        if kind == "loras":
            tensors, metadata = saving.read_lora_file(name)
            saving.load_unet_lora(self.model, self.unet_pairs, tensors, name)
            if self.clip_pairs:
                names = saving.clip_lora_names(self.clip, self.clip_pairs)
                for key, pair in self.clip_pairs.items():
                    if f"{names[key]}.lora_up.weight" not in tensors:
                        raise ValueError(
                            f"cannot resume: {name} has no weights for {key}; was it trained with other LoRA targets or "
                            "without the text encoder?"
                        )
                    pair.load_state_dict(tensors, names[key])
            if self.vectors:
                embedding_path = folders.first_folder("embeddings") / Path(name).with_suffix(".safetensors")
                if embedding_path.is_file():
                    saved = vectors_for_encoders(read_embedding(embedding_path), tokens.text_encoder_widths(self.clip))
                    for key, vector in self.vectors.items():
                        vector.data.copy_(saved[key][:1].to(vector.device))
        else:
            metadata, resumed_model, resumed_clip = saving.read_checkpoint(name, with_clip=self.settings.train_text_encoder)
            _copy_weights(self.unet.view, resumed_model.model.diffusion_model)
            self.resumed_text = None if resumed_clip is None else resumed_clip.cond_stage_model
        self.start_step = int(metadata.get("steps", "0") or 0)
        self.notes.append(f"resumed from {self.settings.resume_from} at step {self.start_step}")

    # ----------------------------------------------------------------------- steps

    def _prompts(self) -> list[str]:
        prompts = [self.settings.instance_prompt.strip()]
        if self.settings.prior_preservation:
            prompts.append(self.settings.class_prompt.strip())
        return prompts

    def text(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if prompt in self.frozen_text:
            return self.frozen_text[prompt]
        return self.encoder.encode([prompt], self.unet.needs_pooled)

    def preview_models(self) -> tuple[Any, Any]:
        """(MODEL, CLIP) that draw what the training has learned so far, for a live preview.

        No copies: the training clone itself (its forward runs the training view: the LoRA
        adapters or the trained weights) and the training CLIP when the text side trains,
        else the input CLIP.
        """
        return self.unet.patcher, self.encoder.clip if self.encoder is not None else self.clip

    def losses(self, instance: Any, klass: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(instance loss, prior loss) of given batches: each paired with its own prompt."""
        cond, pooled = self.text(self.settings.instance_prompt.strip())
        instance_loss = diffusion_loss(self.unet, instance.latents, instance.noise, instance.timesteps, cond, pooled)
        prior_loss = None
        if klass is not None:
            cond, pooled = self.text(self.settings.class_prompt.strip())
            prior_loss = diffusion_loss(self.unet, klass.latents, klass.noise, klass.timesteps, cond, pooled)
        return instance_loss, prior_loss

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step (1-based); returns the losses."""
        s = self.settings
        rates = {"unet": self.plan.schedule, "text_encoder": self.plan.text_schedule, "embedding": self.plan.embedding_schedule}
        for group in self.optimizer.param_groups:
            group["lr"] = rates[group["name"]].rate(step)
        if self.fused_step is not None:
            return self._fused_step()
        accumulated = {"instance": 0.0, "prior": 0.0}
        micro_batches = self.partition.micro_batches(s.gradient_accumulation)
        for index in range(micro_batches):
            # Every process draws every micro-batch (the streams stay in step) and computes its own.
            instance = self.instance.draw()
            klass = None if self.klass is None else self.klass.draw()
            if not self.partition.owns(index):
                continue
            # Instance and class halves run (and free their activations) one after the
            # other: the instance half is then identical with or without the prior.
            instance_loss, _ = self.losses(instance)
            self.scaler.scale(instance_loss / micro_batches).backward()
            accumulated["instance"] += instance_loss.item() / micro_batches
            if klass is not None:
                cond, pooled = self.text(s.class_prompt.strip())
                prior_loss = diffusion_loss(self.unet, klass.latents, klass.noise, klass.timesteps, cond, pooled)
                self.scaler.scale(s.prior_loss_weight * prior_loss / micro_batches).backward()
                accumulated["prior"] += prior_loss.item() / micro_batches
        # Summed before the scaler and the clipping look at them: every process takes the same step
        # (sharded: each steps what it owns, then sends it to the others).
        self.sync.reduce_all(self.params)
        accumulated = {k: self.partition.sum(v) for k, v in accumulated.items()}
        if s.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            self.sync.clip_grad_norm_(self.params, s.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.sync.publish_all(self.params)
        return self._losses_out(accumulated["instance"], accumulated["prior"])

    def _fused_step(self) -> dict[str, float]:
        """Both halves in one backward, which updates each weight as its gradient completes (after
        summing it across processes: each process computes one micro-batch of the step)."""
        micro_batches = self.partition.world_size
        instance_value = prior = 0.0
        for index in range(micro_batches):
            # Each set of batches draws from its own random streams: drawing both first changes nothing.
            instance = self.instance.draw()
            klass = None if self.klass is None else self.klass.draw()
            if not self.partition.owns(index):
                continue
            instance_loss, prior_loss = self.losses(instance, klass)
            total = instance_loss
            if prior_loss is not None:
                total = instance_loss + self.settings.prior_loss_weight * prior_loss
                prior = prior_loss.item() / micro_batches
            done = self.fused_step.steps
            (total / micro_batches).backward()
            if self.fused_step.steps == done:
                raise RuntimeError("the fused optimizer step updated nothing: no trainable weight received a gradient")
            instance_value = instance_loss.item() / micro_batches
        return self._losses_out(self.partition.sum(instance_value), self.partition.sum(prior))

    def _losses_out(self, instance: float, prior: float) -> dict[str, float]:
        out = {"loss": instance + self.settings.prior_loss_weight * prior, "instance": instance}
        if self.klass is not None:
            out["prior"] = prior
        return out

    def end_training(self) -> None:
        """Drop what only further steps need (optimizer state, hooks), before the final outputs."""
        if self.fused_step is not None:
            self.fused_step.remove()
            self.fused_step = None
        self.optimizer_state_bytes = optimizers.state_bytes(self.optimizer)
        self.optimizer.state.clear()

    # ----------------------------------------------------------------------- results

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        tensors = saving.unet_lora_tensors(self.model, self.unet_pairs)
        if self.clip_pairs:
            clip_names = saving.clip_lora_names(self.clip, self.clip_pairs)
            tensors.update(lora_file_tensors({clip_names[k]: p for k, p in self.clip_pairs.items()}))
        return tensors

    def embedding(self) -> EmbeddingFile | None:
        if not self.vectors:
            return None
        return EmbeddingFile({k: v.detach().to("cpu", torch.float32).clone() for k, v in self.vectors.items()}, name=self.plan.identifier)

    def outputs(self) -> tuple[Any, Any, dict[str, torch.Tensor] | None]:
        """(MODEL, CLIP without bound words, LoRA tensors or None), all new objects."""
        if self.settings.mode == "lora":
            tensors = self.lora_tensors()
            return (*tuned_models(self.model, self.clip, lora=tensors), tensors)
        return (*tuned_models(self.model, self.clip, diffs=self.diffs()), None)

    def diffs(self) -> dict[str, dict[str, torch.Tensor]]:
        """Full mode: trained minus starting weights of the model and (when it trained) the text encoder."""
        out = {"model": self.unet.diffs()}
        if self.encoder is not None and self.encoder.trained_parameters():
            out["clip"] = self.encoder.diffs()
        return out

    def metadata(self, step: int) -> dict[str, str]:
        s = self.settings
        data = {
            "format": "comfyui-personalize.dreambooth/1",
            "method": f"dreambooth-{s.mode}",
            "identifier": self.plan.identifier,
            "instance_prompt": s.instance_prompt.strip(),
            "class_prompt": s.class_prompt.strip(),
            "base_model": self.unet.family.name,
            "steps": str(step),
            "training_settings": json.dumps(
                {k: v for k, v in asdict(s).items() if k not in ("overwrite", "save")}, sort_keys=True, default=str
            ),
        }
        if s.mode == "lora":
            rank = next(iter(self.unet_pairs.values())).rank if self.unet_pairs else s.lora_rank
            alpha = next(iter(self.unet_pairs.values())).alpha if self.unet_pairs else s.lora_alpha
            data.update(
                {
                    "ss_network_module": "networks.lora",
                    "ss_network_dim": str(rank),
                    "ss_network_alpha": f"{alpha:g}",
                    "ss_training_comment": f"DreamBooth LoRA for '{s.instance_prompt.strip()}'",
                }
            )
        return data


def tuned_models(
    model: Any, clip: Any, *, lora: dict[str, torch.Tensor] | None = None, diffs: dict[str, dict[str, torch.Tensor]] | None = None
) -> tuple[Any, Any]:
    """The input MODEL and CLIP with what a run trained, as new objects: a LoRA applied as
    LoraLoader applies its file, or full fine-tuning's weight differences as patches."""
    if lora is not None:
        with_clip = any(key.startswith(("lora_te", "text_encoders.")) for key in lora)
        tuned_model, tuned_clip = saving.apply_lora_tensors(model, clip if with_clip else None, lora)
        return tuned_model, tuned_clip if tuned_clip is not None else clip
    diffs = diffs or {}
    tuned_model = saving.model_with_diffs(model, diffs.get("model", {}))
    tuned_clip = saving.model_with_diffs(clip, diffs["clip"]) if diffs.get("clip") else clip
    return tuned_model, tuned_clip


def _copy_weights(view: torch.nn.Module, source: torch.nn.Module) -> None:
    """Start a view's own weights from another model's (a resumed checkpoint), layer by layer."""
    from ..comfy_bridge import layers
    from ..core.training_layers import TrainingLayer

    with torch.no_grad():
        for name, trained in view.named_parameters():
            module_name, _, attr = name.rpartition(".")
            module = view.get_submodule(module_name) if module_name else view
            other = source.get_submodule(module_name) if module_name else source
            if isinstance(module, TrainingLayer):
                value = dict(zip(("weight", "bias"), layers.cast(other, torch.float32, trained.device), strict=False))[attr]
            else:
                value = getattr(other, attr)
            trained.copy_(value.to(trained.device, trained.dtype))


class _DreamBoothRun:
    """The StepTrainer the skeleton drives: steps, previews and saves of one DreamBooth run."""

    def __init__(self, trainer: DreamBoothTrainer, vae: Any, name: str):
        self.trainer = trainer
        self.vae = vae
        self.name = name
        self.saved: dict[str, Path] = {}
        s = trainer.settings
        # The preview prompt: empty means the instance prompt; {} stands for the identifier.
        self.preview_prompt = (s.preview_prompt.strip() or s.instance_prompt.strip()).replace("{}", trainer.plan.identifier)

    def step(self, step: int) -> dict[str, float]:
        return self.trainer.step(step)

    def preview(self) -> Any:
        """What the model being trained draws now (no copies; nothing it trains is touched)."""
        t = self.trainer
        if t.partition.rank != 0:
            return None  # one process shows what is learnt
        preview_model, preview_clip = t.preview_models()
        how = t.unet.family.preview_sampling
        image = sampling.render_preview(
            preview_model,
            preview_clip,
            self.vae,
            self.preview_prompt,
            t.settings.seed,
            t.settings.resolution,
            t.settings.resolution,
            steps=how.steps,
            cfg=how.cfg,
            sampler_name=how.sampler,
            scheduler=how.scheduler,
            guidance=how.guidance,
            negative_prompt=how.negative,
        )
        t.unet.load(t.clip.patcher)  # sampling and decoding may have swapped our models out
        return sampling.preview_payload(image)

    def save(self, step: int, outputs: tuple[Any, Any, Any] | None = None) -> None:
        t = self.trainer
        s = t.settings
        if not s.save or t.partition.rank != 0:
            return  # one process writes the files
        metadata = t.metadata(step)
        overwrite = s.overwrite or bool(self.saved)
        if s.mode == "lora":
            self.saved["lora"] = saving.save_lora_file(t.lora_tensors(), self.name, overwrite=overwrite, metadata=metadata)
        else:
            out_model, out_clip, _ = outputs or t.outputs()
            self.saved["checkpoint"] = saving.save_checkpoint_file(
                out_model, out_clip, self.vae, self.name, overwrite=overwrite, metadata=metadata
            )
            del out_model, out_clip
            if outputs is None:
                t.unet.load(t.clip.patcher)  # saving loaded the tuned clone; training goes on with ours
        embedding = t.embedding()
        if embedding is not None:
            self.saved["embedding"] = saving.save_embedding_file(
                embedding,
                self.name,
                overwrite=overwrite,
                base_model=t.unet.family.name,
                steps=step,
                training_settings={"method": "dreambooth-pivotal", "identifier": t.plan.identifier},
            )


def train_dreambooth(
    model: Any,
    clip: Any,
    vae: Any,
    images: TrainingImageSet | None,
    settings: DreamBoothSettings,
    *,
    class_images: torch.Tensor | None = None,
    node_id: str | None = None,
    host: TrainingHost | None = None,
    partition: Partition = SINGLE_PROCESS,
) -> DreamBoothResult:
    """Fine-tune ``model`` (and optionally the text encoder) on the instance images; saves as configured."""
    plan = validate(settings, images, model, clip, class_images)
    notes = list(plan.notes)
    identifier = plan.identifier
    notes.insert(0, f"identifier '{identifier}', class word '{plan.class_word}'")

    class_raw = None
    class_source = "none"
    if settings.prior_preservation:
        if class_images is not None:
            class_source = "given"
            notes.append(f"prior preservation with the {class_images.shape[0]} class images given")
        else:
            class_raw, cached = class_latents(model, clip, settings, node_id, partition)
            class_source = "cached" if cached else "generated"
            notes.append(
                f"prior preservation with {class_raw.shape[0]} class images ({class_source}) for '{settings.class_prompt.strip()}', "
                f"λ = {settings.prior_loss_weight:g}"
            )
    host = host or ComfyProgress(settings.steps, node_id, "dreambooth")
    with torch.inference_mode(False), torch.enable_grad(), training_mode():
        trainer = DreamBoothTrainer(
            model, clip, vae, images, settings, plan, class_raw=class_raw, class_pixels=class_images, partition=partition
        )
        notes.extend(trainer.notes)
        for note in notes:
            log.info("DreamBooth: %s", note)
        tracker = LossTracker()
        run = _DreamBoothRun(trainer, vae, output_name(settings, identifier))
        total = trainer.start_step + settings.steps
        run_training(run, LoopPlan(settings.steps, trainer.start_step, settings.save_every, settings.preview_every), host, tracker)
        trainer.end_training()  # the optimizer state goes before the final outputs are built
        diffs = trainer.diffs() if settings.mode == "full" else None
        lora = trainer.lora_tensors() if settings.mode == "lora" else None
        out_model, out_clip = tuned_models(model, clip, lora=lora, diffs=diffs)
        run.save(total, (out_model, out_clip, lora))
        embedding = trainer.embedding()
        if embedding is not None:
            out_clip = tokens.bind_trigger_words(out_clip, {identifier: embedding.vectors})
        report_done(host, tracker, settings.steps)
    for kind, path in run.saved.items():
        notes.append(f"saved {kind}: {path.name}")
    return DreamBoothResult(
        model=out_model,
        clip=out_clip,
        identifier=identifier,
        losses=tracker,
        saved=run.saved,
        steps_trained=settings.steps,
        notes=notes,
        embedding=embedding,
        class_images=class_source,
        lora=lora,
        diffs=diffs,
        optimizer_state_bytes=trainer.optimizer_state_bytes,
    )
