"""DreamBooth (Ruiz et al., 2023): fine-tune the diffusion model on a few images of a subject.

The training core. It takes ComfyUI's MODEL, CLIP and VAE objects and needs no server.
Prompts pair a rare identifier with the class noun ("a photo of sks dog"); with prior
preservation the model is also trained on images *it* generated for the class prompt
("a photo of dog"), so it keeps what a dog looks like:

    loss = E ||x̂θ(αt x + σt ε, c) − x||² + λ · E ||x̂θ(αt' x_pr + σt' ε', c_pr) − x_pr||²

both terms in the model's own target space (ε or v; see ``training_math.prediction_loss``).

Nothing the caller passed in is written to: LoRA and text-encoder changes are weight
wrappers on clones, full fine-tuning trains a private copy of the diffusion model
(bfloat16 or float32; see ``comfy_adapter.trainable_module_copy``), and the outputs are clones carrying the result as
patches, so other branches of the graph keep the original model.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch

from . import comfy_adapter, optimizers
from .embedding_file import EmbeddingFile
from .lora_weights import LoraPair, WeightDelta, lora_file_tensors
from .training_images import TrainingImageSet, group_into_buckets
from .training_math import LearningRateSchedule, LossTracker, parse_learning_rate, prediction_loss, sample_timesteps

log = logging.getLogger(__name__)

# The paper's Stable Diffusion rate for full fine-tuning; the usual one for LoRA.
AUTO_LEARNING_RATE = {"full": 5e-6, "lora": 1e-4}
AUTO_EMBEDDING_LEARNING_RATE = 5e-4
WEIGHT_DECAY = {"full": 1e-2, "lora": 1e-4}  # the diffusers examples' defaults
CLASS_SAMPLE_CHUNK = 4
MODES = ("lora", "full")
OPTIMIZERS = ("AdamW", "AdamW8bit")
# Class batches draw from their own random streams, so the instance half of every step is
# the same with or without prior preservation (and λ = 0 trains exactly as no prior).
_CLASS_STREAM = 0x5EED_C1A55


@dataclass
class DreamBoothSettings:
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
    steps: int = 800
    learning_rate: str = "auto"
    batch_size: int = 1
    gradient_accumulation: int = 1
    seed: int = 0
    resolution: int = 512
    resize_mode: Literal["crop", "resize", "pad"] = "crop"
    bucketing: bool = True
    flip: bool = False
    gradient_checkpointing: bool = False
    optimizer: Literal["AdamW", "AdamW8bit"] = "AdamW"
    full_bf16: bool = True
    fused_backward: bool = True
    max_grad_norm: float = 1.0
    save_every: int = 0
    file_name: str = ""
    overwrite: bool = False
    save: bool = True
    preview_every: int = 0  # render a preview with the model being trained every N steps (0: off)
    preview_prompt: str = ""  # empty: the instance prompt; {} is replaced by the identifier


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


@dataclass
class _Plan:
    identifier: str
    class_word: str
    schedule: LearningRateSchedule
    text_schedule: LearningRateSchedule
    embedding_schedule: LearningRateSchedule
    targets: dict[str, Path]
    notes: list[str]


# --------------------------------------------------------------------------- identifiers


_WORD = re.compile(r"[^\W_][\w'-]*|[<\[][^\s>\]]*[>\]]")
# Short English words the rare-token filter must never offer, whatever their token id.
_ENGLISH_SHORT = frozenset(
    "a an the and or but if of to in on at by for from up out off as is am are was be do did has had "
    "he she it we us you me my his her our its him they them who why how yes no not all any few new "
    "old one two six ten man men boy car cat dog sun sky sea red tan art war ice eye ear arm leg toe "
    "bag box cup pen map bed bus van toy zoo zip yet via wow oak elk ash owl ant bee fox pig cow hen "
    "yak emu ape bat rat gnu eel cod koi".split()
)


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w/\\:]){re.escape(phrase)}(?![\w])", re.IGNORECASE)


def derive_identifier(instance_prompt: str, class_prompt: str, identifier: str = "") -> str:
    """The identifier: given, or the instance prompt's words that the class prompt lacks.

    Raises ValueError (before any work) when there is none, it is ambiguous, or the class
    prompt contains it.
    """
    instance, klass = instance_prompt.strip(), class_prompt.strip()
    if not instance:
        raise ValueError("the instance prompt is empty: describe the subject with its identifier, e.g. 'a photo of sks dog'")
    if not klass:
        raise ValueError("the class prompt is empty: describe the subject's class, e.g. 'a photo of dog'")
    identifier = identifier.strip()
    if identifier:
        if not _phrase_pattern(identifier).search(instance):
            raise ValueError(f"the identifier '{identifier}' is not in the instance prompt '{instance}': use it there, e.g. 'a photo of {identifier} dog'")
        if _phrase_pattern(identifier).search(klass):
            raise ValueError(f"the class prompt '{klass}' contains the identifier '{identifier}': the class prompt describes any member of the class, without the identifier")
        return identifier
    class_words = {w.lower() for w in _words(klass)}
    words = _words(instance)
    extra = [i for i, w in enumerate(words) if w.lower() not in class_words]
    if not extra:
        raise ValueError(
            f"the instance prompt '{instance}' has no identifier: it needs a word the class prompt '{klass}' lacks, "
            "e.g. 'a photo of sks dog' with the class prompt 'a photo of dog'"
        )
    if extra != list(range(extra[0], extra[-1] + 1)):
        listed = ", ".join(f"'{words[i]}'" for i in extra)
        raise ValueError(f"the instance prompt has several words the class prompt lacks ({listed}): set the identifier input to the one that names the subject")
    return " ".join(words[i] for i in extra)


def class_word(instance_prompt: str, class_prompt: str, identifier: str) -> str:
    """The class noun: the first class-prompt word after the identifier, else the class prompt's last word."""
    match = _phrase_pattern(identifier).search(instance_prompt)
    class_words = {w.lower() for w in _words(class_prompt)}
    if match:
        for word in _words(instance_prompt[match.end():]):
            if word.lower() in class_words:
                return word
    words = _words(class_prompt)
    return words[-1] if words else class_prompt.strip()


def rare_token_candidates(vocab: Mapping[str, int], low_fraction: float = 0.8) -> list[str]:
    """Whole-word tokens of 2-3 ASCII letters from the rarest part of a BPE vocabulary.

    BPE ids follow merge order, so the last ids are the rarest words; the paper samples
    short tokens from such a range (T5 ids 5000-10000 for Imagen).
    """
    if not vocab:
        return []
    size = max(vocab.values()) + 1
    low = int(size * low_fraction)
    found = []
    for token, index in vocab.items():
        word = token[:-4] if token.endswith("</w>") else None
        if word is None or not low <= index < size - 2:  # the last ids are start/end tokens
            continue
        if re.fullmatch(r"[a-z]{2,3}", word) and len(set(word)) > 1 and word not in _ENGLISH_SHORT:
            found.append((index, word))
    return [w for _, w in sorted(found)]


def suggest_identifier(vocab: Mapping[str, int], seed: int = 0, count: int = 1, accept: Callable[[str], bool] | None = None) -> str:
    """A rare-token identifier: ``count`` (1-3) rare whole-word tokens, space separated.

    Deterministic for a vocabulary and seed. ``accept`` can veto a token (e.g. one that
    another tokenizer of the same CLIP splits).
    """
    if not 1 <= count <= 3:
        raise ValueError(f"an identifier has 1-3 rare tokens (asked for {count})")
    candidates = rare_token_candidates(vocab)
    random.Random(seed).shuffle(candidates)
    chosen = [w for w in candidates if accept is None or accept(w)][:count]
    if len(chosen) < count:
        raise ValueError("the tokenizer's vocabulary has too few rare short tokens to suggest an identifier")
    return " ".join(chosen)


def identifier_notes(identifier: str, clip: Any, seed: int) -> list[str]:
    """Warnings about a weak identifier, and rare-token alternatives."""
    vocab = comfy_adapter.tokenizer_vocab(clip)
    size = max(vocab.values()) + 1
    notes = []
    ids = comfy_adapter.prompt_token_ids(clip, identifier)
    if len(ids) > 3:
        notes.append(f"identifier '{identifier}' splits into {len(ids)} tokens: each token keeps its own meaning; 1-3 rare tokens work best")
    for word in identifier.split():
        word_ids = comfy_adapter.prompt_token_ids(clip, word)
        if len(word_ids) == 1 and word_ids[0] < size * 0.2:
            notes.append(f"identifier word '{word}' is a common word (token #{word_ids[0]} of {size}): the model must unlearn its meaning; a rare token works better")
    if notes:
        for note in notes:
            log.warning("DreamBooth: %s", note)
    accept = lambda w: comfy_adapter.single_token_everywhere(clip, w)  # noqa: E731
    try:
        suggestions = [suggest_identifier(vocab, seed + i, 1, accept) for i in range(3)]
        notes.append("rare-token identifiers you could use: " + ", ".join(f"'{s}'" for s in suggestions))
    except ValueError:
        pass
    return notes


# --------------------------------------------------------------------------- validation


def _rate(text: str, auto: float, what: str) -> LearningRateSchedule:
    text = str(text).strip()
    if text.lower() in ("", "auto"):
        return parse_learning_rate(auto)
    try:
        return parse_learning_rate(text)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


def output_name(settings: DreamBoothSettings, identifier: str) -> str:
    if settings.file_name.strip():
        return settings.file_name.strip()
    slug = re.sub(r"[^\w-]+", "_", identifier).strip("_") or "subject"
    return f"dreambooth-{slug}"


def validate(settings: DreamBoothSettings, images: TrainingImageSet | None, model: Any, clip: Any, class_images: torch.Tensor | None) -> _Plan:
    """Every check that can fail before work starts (class images, training)."""
    if images is None or len(images) == 0:
        raise ValueError("no instance images: connect an IMAGE batch or an image folder with 3-5 images of the subject")
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
        if settings.class_sampler not in comfy_adapter.SAMPLER_NAMES:
            raise ValueError(f"unknown sampler '{settings.class_sampler}'")
        if settings.class_scheduler not in comfy_adapter.SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler '{settings.class_scheduler}'")
        if settings.class_steps < 1:
            raise ValueError("class image steps must be at least 1")
    if class_images is not None and (not isinstance(class_images, torch.Tensor) or class_images.ndim != 4 or class_images.shape[0] < 1):
        raise ValueError("class images must be an IMAGE batch")
    if settings.steps < 1:
        raise ValueError(f"steps must be at least 1 (got {settings.steps})")
    if settings.batch_size < 1 or settings.gradient_accumulation < 1:
        raise ValueError("batch size and gradient accumulation must be at least 1")
    if settings.resolution < 64 or settings.resolution % 64:
        raise ValueError(f"resolution must be a multiple of 64 (got {settings.resolution})")
    if settings.save_every < 0:
        raise ValueError("save every must be 0 (only at the end) or a number of steps")
    if settings.preview_every < 0:
        raise ValueError(f"preview every must be 0 (off) or a number of steps (got {settings.preview_every})")
    if settings.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
    if settings.optimizer == "AdamW8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("optimizer AdamW8bit needs the bitsandbytes package (pip install bitsandbytes); or choose AdamW") from None
    schedule = _rate(settings.learning_rate, AUTO_LEARNING_RATE[settings.mode], "learning rate")
    text_schedule = _rate(settings.text_encoder_learning_rate, schedule.rate(1), "text encoder learning rate") if settings.text_encoder_learning_rate.strip().lower() != "auto" else schedule
    embedding_schedule = _rate(settings.embedding_learning_rate, AUTO_EMBEDDING_LEARNING_RATE, "embedding learning rate")
    comfy_adapter.prediction_type(model)  # refuses families trained another way, with their name
    if settings.mode == "lora":
        comfy_adapter.unet_lora_weights(model, settings.lora_targets)
        if settings.train_text_encoder:
            comfy_adapter.clip_lora_weights(clip)
    if settings.pivotal_tuning:
        from .textual_inversion import model_family_of

        model_family_of(clip)
    targets: dict[str, Path] = {}
    if settings.save:
        name = output_name(settings, identifier)
        targets["lora" if settings.mode == "lora" else "checkpoint"] = (
            comfy_adapter.lora_target(name) if settings.mode == "lora" else comfy_adapter.checkpoint_target(name)
        )
        if settings.pivotal_tuning:
            targets["embedding"] = comfy_adapter.embedding_target(name)
        for path in targets.values():
            if path.exists() and not settings.overwrite:
                raise FileExistsError(f"{path.name} already exists in {path.parent}: choose another file name, or turn on overwrite")
    notes = identifier_notes(identifier, clip, settings.seed)
    return _Plan(identifier, class_word(settings.instance_prompt, settings.class_prompt, identifier), schedule, text_schedule, embedding_schedule, targets, notes)


# --------------------------------------------------------------------------- class images


def class_cache_key(model: Any, settings: DreamBoothSettings) -> tuple[str, dict[str, Any]]:
    description = {
        "model": comfy_adapter.model_identity(model),
        "family": comfy_adapter.model_family(model),
        "prompt": settings.class_prompt.strip(),
        "negative": "",
        "sampler": settings.class_sampler,
        "scheduler": settings.class_scheduler,
        "steps": settings.class_steps,
        "cfg": float(settings.class_cfg),
        "width": settings.resolution,
        "height": settings.resolution,
        "seed": settings.seed,
        "count": settings.num_class_images,
        "chunk": CLASS_SAMPLE_CHUNK,
    }
    import hashlib

    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest(), description


def class_latents(model: Any, clip: Any, settings: DreamBoothSettings, node_id: str | None = None) -> tuple[torch.Tensor, bool]:
    """Class images generated by the frozen model, as raw LATENT samples; (latents, from_cache)."""
    key, description = class_cache_key(model, settings)
    cached = comfy_adapter.read_class_cache(key, settings.num_class_images)
    if cached is not None:
        log.info("DreamBooth: reusing %d cached class images for '%s'", cached.shape[0], settings.class_prompt)
        return cached, True
    log.info("DreamBooth: generating %d class images for '%s'", settings.num_class_images, settings.class_prompt)
    latents = comfy_adapter.sample_latents(
        model, clip, settings.class_prompt.strip(), settings.num_class_images, settings.resolution, settings.resolution,
        settings.seed, settings.class_sampler, settings.class_scheduler, settings.class_steps, settings.class_cfg,
        chunk_size=CLASS_SAMPLE_CHUNK, node_id=node_id,
    )
    comfy_adapter.write_class_cache(key, latents, description)
    return latents, False


# --------------------------------------------------------------------------- training


def _encode_buckets(unet: comfy_adapter.DiffusionModelForTraining, vae: Any, images: TrainingImageSet, settings: DreamBoothSettings) -> list[list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Each image (and its mirror image) VAE-encoded once, grouped by aspect bucket."""
    buckets = []
    for _size, pixels, _captions in group_into_buckets(images, settings.resolution, settings.resize_mode, settings.bucketing):
        latents = torch.cat([unet.latents_from_pixels(vae, pixels[i : i + 4]) for i in range(0, pixels.shape[0], 4)])
        flipped = None
        if settings.flip:
            mirrored = pixels.flip(2)
            flipped = torch.cat([unet.latents_from_pixels(vae, mirrored[i : i + 4]) for i in range(0, mirrored.shape[0], 4)])
        buckets.append([(latents[i], None if flipped is None else flipped[i]) for i in range(latents.shape[0])])
    return buckets


class _Batches:
    """Random batches from one set of latents, with their own random streams."""

    def __init__(self, buckets: list[list[tuple[torch.Tensor, torch.Tensor | None]]], seed: int, batch_size: int, device: torch.device):
        self.buckets = buckets
        self.weights = [len(b) for b in buckets]
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size
        self.device = device

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, noise, timesteps)."""
        bucket = self.buckets[self.rng.choices(range(len(self.buckets)), weights=self.weights)[0]]
        picks = [bucket[self.rng.randrange(len(bucket))] for _ in range(self.batch_size)]
        latents = torch.stack([f if f is not None and self.rng.random() < 0.5 else x for x, f in picks]).to(self.device)
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        return latents, noise, sample_timesteps(latents.shape[0], self.generator)


def diffusion_loss(unet: comfy_adapter.DiffusionModelForTraining, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   cond: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    """Mean loss of one batch, every sample conditioned on ``cond`` ([1, T, D])."""
    sigma = unet.sigmas(timesteps)
    x = unet.noisy(latents, noise, sigma)
    count = latents.shape[0]
    with unet.autocast():
        denoised = unet.denoise(x, sigma, cond.expand(count, -1, -1), None if pooled is None else pooled.expand(count, -1))
    return prediction_loss(denoised.float(), latents.float(), sigma, unet.prediction).mean()


class DreamBoothTrainer:
    """The trainable state and one step; ``train_dreambooth`` drives it."""

    def __init__(self, model: Any, clip: Any, vae: Any, images: TrainingImageSet, settings: DreamBoothSettings, plan: _Plan,
                 class_raw: torch.Tensor | None = None, class_pixels: torch.Tensor | None = None):
        self.settings = settings
        self.plan = plan
        self.model, self.clip, self.vae = model, clip, vae
        init = torch.Generator().manual_seed(settings.seed)

        # --- the diffusion model
        self.unet_pairs: dict[str, LoraPair] = {}
        wrappers: dict[str, list] = {}
        if settings.mode == "lora":
            device = model.load_device
            for key, shape in comfy_adapter.unet_lora_weights(model, settings.lora_targets).items():
                pair = LoraPair(shape, settings.lora_rank, settings.lora_alpha, device=device, generator=init)
                self.unet_pairs[key] = pair
                wrappers[key] = [pair]
        self.unet = comfy_adapter.DiffusionModelForTraining(model, extra_wrappers=wrappers)
        self.unet.load()
        self.copy: torch.nn.Module | None = None
        self.route = None
        real = self.unet.patcher.model.diffusion_model
        cuda_fp16 = self.unet.device.type == "cuda" and self.unet.patcher.model.get_dtype() == torch.float16
        self.bf16, self.fused, self.notes = memory_plan(settings, cuda_fp16)
        if settings.mode == "full":
            self.copy = comfy_adapter.trainable_module_copy(real, self.unet.device, torch.bfloat16 if self.bf16 else torch.float32)
            if self.bf16:
                self.unet.autocast_dtype = torch.bfloat16  # on CUDA: bf16 compute needs no loss scaling
        if self.copy is not None or settings.gradient_checkpointing:
            target = self.copy if self.copy is not None else real
            if settings.gradient_checkpointing:
                target = comfy_adapter.checkpointed_view(target)
            self.route = comfy_adapter.route_diffusion_model(self.unet.patcher, target)

        # --- latents, cached once
        with torch.no_grad():
            self.instance = _Batches(_encode_buckets(self.unet, vae, images, settings), settings.seed, settings.batch_size, self.unet.device)
            self.klass: _Batches | None = None
            if settings.prior_preservation:
                if class_pixels is not None:
                    class_set = TrainingImageSet.from_image_batch(class_pixels)
                    class_buckets = _encode_buckets(self.unet, vae, class_set, settings)
                else:
                    scaled = comfy_adapter.scaled_latents(self.unet.patcher, class_raw)
                    class_buckets = [[(scaled[i], None) for i in range(scaled.shape[0])]]
                self.klass = _Batches(class_buckets, settings.seed ^ _CLASS_STREAM, settings.batch_size, self.unet.device)

        # --- the text side
        self.clip_pairs: dict[str, LoraPair] = {}
        self.clip_deltas: dict[str, WeightDelta] = {}
        clip_wrappers: dict[str, list] = {}
        if settings.train_text_encoder:
            device = clip.patcher.load_device
            if settings.mode == "lora":
                for key, shape in comfy_adapter.clip_lora_weights(clip).items():
                    pair = LoraPair(shape, settings.lora_rank, settings.lora_alpha, device=device, generator=init)
                    self.clip_pairs[key] = pair
                    clip_wrappers[key] = [pair]
            else:
                for key, shape in comfy_adapter.clip_weights(clip).items():
                    delta = WeightDelta(shape, device=device)
                    self.clip_deltas[key] = delta
                    clip_wrappers[key] = [delta]
        self.vectors: dict[str, torch.nn.Parameter] = {}
        if settings.pivotal_tuning:
            rows = comfy_adapter.token_embedding_rows(clip, plan.class_word)
            self.vectors = {k: torch.nn.Parameter(v.mean(dim=0, keepdim=True).to(clip.patcher.load_device, torch.float32)) for k, v in rows.items()}
        self.text_trains = bool(clip_wrappers or self.vectors)
        self.encoder = None
        if self.text_trains:
            self.encoder = comfy_adapter.TrainableClip(clip, clip_wrappers, plan.identifier if self.vectors else None, self.vectors or None)
        self.frozen_text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        with torch.no_grad():
            for prompt in self._prompts():
                if self.encoder is None or (prompt == settings.class_prompt.strip() and not clip_wrappers):
                    self.frozen_text[prompt] = comfy_adapter.encode_prompt(clip, prompt)

        # --- the optimizer
        groups = []
        unet_params = [p for pair in self.unet_pairs.values() for p in pair.parameters()]
        if self.copy is not None:
            unet_params = [p for p in self.copy.parameters() if p.requires_grad]
        groups.append({"params": unet_params, "lr": plan.schedule.rate(1), "name": "unet"})
        text_params = [p for pair in self.clip_pairs.values() for p in pair.parameters()] + [p for d in self.clip_deltas.values() for p in d.parameters()]
        if text_params:
            groups.append({"params": text_params, "lr": plan.text_schedule.rate(1), "name": "text_encoder"})
        if self.vectors:
            groups.append({"params": list(self.vectors.values()), "lr": plan.embedding_schedule.rate(1), "name": "embedding", "weight_decay": 0.0})
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = _make_optimizer(settings.optimizer, groups, WEIGHT_DECAY[settings.mode], own=self.bf16 or self.fused, seed=settings.seed)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda_fp16 and not self.bf16)
        self.fused_step = optimizers.FusedBackwardStep(self.optimizer, settings.max_grad_norm) if self.fused else None

    def _prompts(self) -> list[str]:
        prompts = [self.settings.instance_prompt.strip()]
        if self.settings.prior_preservation:
            prompts.append(self.settings.class_prompt.strip())
        return prompts

    def text(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if prompt in self.frozen_text:
            return self.frozen_text[prompt]
        with self.unet.autocast():
            return self.encoder.encode([prompt], getattr(self.unet, "needs_pooled", True))

    def preview_models(self) -> tuple[Any, Any]:
        """(MODEL, CLIP) that draw what the training has learned so far, for a live preview.

        No copies: the training clone itself (LoRA mode: its LoRA weight wrappers; full
        mode: its wrapper routing the forward to the trained copy) and the training CLIP
        when the text side trains (its LoRA or deltas, the identifier's pivotal vectors),
        else the input CLIP. Sample them under inference mode, then ``self.unet.load()``.
        """
        return self.unet.patcher, self.encoder.clip if self.encoder is not None else self.clip

    def losses(self, instance: tuple[torch.Tensor, ...], klass: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(instance loss, prior loss) of given batches: each paired with its own prompt."""
        cond, pooled = self.text(self.settings.instance_prompt.strip())
        instance_loss = diffusion_loss(self.unet, *instance, cond, pooled)
        prior_loss = None
        if klass is not None:
            cond, pooled = self.text(self.settings.class_prompt.strip())
            prior_loss = diffusion_loss(self.unet, *klass, cond, pooled)
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
        for _ in range(s.gradient_accumulation):
            # Instance and class halves run (and free their activations) one after the
            # other: the instance half is then identical with or without the prior.
            instance_loss, _ = self.losses(self.instance.draw())
            self.scaler.scale(instance_loss / s.gradient_accumulation).backward()
            accumulated["instance"] += instance_loss.item() / s.gradient_accumulation
            if self.klass is not None:
                cond, pooled = self.text(s.class_prompt.strip())
                prior_loss = diffusion_loss(self.unet, *self.klass.draw(), cond, pooled)
                self.scaler.scale(s.prior_loss_weight * prior_loss / s.gradient_accumulation).backward()
                accumulated["prior"] += prior_loss.item() / s.gradient_accumulation
            self._check_route()
        if s.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return self._losses_out(accumulated["instance"], accumulated["prior"])

    def _fused_step(self) -> dict[str, float]:
        """Both halves in one backward, which updates each weight as its gradient completes."""
        # Each set of batches draws from its own random streams: drawing both first changes nothing.
        instance_loss, prior_loss = self.losses(self.instance.draw(), None if self.klass is None else self.klass.draw())
        total, prior = instance_loss, 0.0
        if prior_loss is not None:
            total = instance_loss + self.settings.prior_loss_weight * prior_loss
            prior = prior_loss.item()
        done = self.fused_step.steps
        total.backward()
        self._check_route()
        if self.fused_step.steps == done:
            raise RuntimeError("the fused optimizer step updated nothing: no trainable weight received a gradient")
        return self._losses_out(instance_loss.item(), prior)

    def _check_route(self) -> None:
        if self.route is not None and self.route.calls == 0:
            raise RuntimeError(f"this {self.unet.family} diffusion model does not run through ComfyUI's diffusion-model wrappers: "
                               "full fine-tuning and gradient checkpointing are not available for it; use LoRA without checkpointing")

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
        self.optimizer.state.clear()

    # ----------------------------------------------------------------------- results

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        names = comfy_adapter.unet_lora_names(self.model, self.unet_pairs)
        tensors = lora_file_tensors({names[k]: p for k, p in self.unet_pairs.items()})
        if self.clip_pairs:
            clip_names = comfy_adapter.clip_lora_names(self.clip, self.clip_pairs)
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
            model, clip = comfy_adapter.apply_lora_tensors(self.model, self.clip if self.clip_pairs else None, tensors)
            return model, clip if clip is not None else self.clip, tensors
        self.unet.load()  # the shared weights as training started, before differences are taken
        with torch.no_grad():
            model = comfy_adapter.model_with_diffs(self.model, comfy_adapter.diffs_from_copy(self.copy, self.unet.patcher))
            clip = self.clip
            if self.clip_deltas:
                diffs = {}
                for key, delta in self.clip_deltas.items():
                    if bool(delta.delta.detach().any()):
                        base = _clip_tensor(self.clip, key)
                        dtype = base.dtype if base.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
                        diffs[key] = delta.delta.detach().to(self.clip.patcher.offload_device, dtype)
                clip = comfy_adapter.model_with_diffs(self.clip, diffs)
        return model, clip, None

    def metadata(self, step: int) -> dict[str, str]:
        s = self.settings
        data = {
            "format": "comfyui-personalize.dreambooth/1",
            "method": f"dreambooth-{s.mode}",
            "identifier": self.plan.identifier,
            "instance_prompt": s.instance_prompt.strip(),
            "class_prompt": s.class_prompt.strip(),
            "base_model": self.unet.family,
            "steps": str(step),
            "training_settings": json.dumps({k: v for k, v in asdict(s).items() if k not in ("overwrite", "save")}, sort_keys=True, default=str),
        }
        if s.mode == "lora":
            data.update({"ss_network_module": "networks.lora", "ss_network_dim": str(s.lora_rank), "ss_network_alpha": f"{s.lora_alpha:g}",
                         "ss_training_comment": f"DreamBooth LoRA for '{s.instance_prompt.strip()}'"})
        return data


def _clip_tensor(clip: Any, key: str) -> torch.Tensor:
    module_name, _, attr = key.rpartition(".")
    return getattr(clip.cond_stage_model.get_submodule(module_name), attr)


def memory_plan(settings: DreamBoothSettings, cuda_fp16: bool) -> tuple[bool, bool, list[str]]:
    """(bfloat16 trained copy, fused backward step, notes) for these settings."""
    if settings.mode != "full" or not (settings.full_bf16 or settings.fused_backward):
        return False, False, []
    if settings.optimizer != "AdamW":
        return False, False, [f"full_bf16 and fused_backward work with the AdamW optimizer; {settings.optimizer} trains a float32 copy with whole-model steps"]
    if settings.fused_backward and settings.gradient_accumulation > 1:
        return settings.full_bf16, False, ["fused_backward needs gradient accumulation 1: whole-model gradients are kept"]
    if settings.fused_backward and cuda_fp16 and not settings.full_bf16:
        return False, False, ["fused_backward on a float16 model needs full_bf16 (the fused step has no loss scaling): whole-model gradients are kept"]
    return settings.full_bf16, settings.fused_backward, []


def _make_optimizer(kind: str, groups: list[dict], weight_decay: float, own: bool = False, seed: int = 0) -> torch.optim.Optimizer:
    for group in groups:
        group.setdefault("weight_decay", weight_decay)
    if own:
        return optimizers.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, seed=seed)
    if kind == "AdamW8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


def train_dreambooth(
    model: Any,
    clip: Any,
    vae: Any,
    images: TrainingImageSet | None,
    settings: DreamBoothSettings,
    *,
    class_images: torch.Tensor | None = None,
    node_id: str | None = None,
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
            class_raw, cached = class_latents(model, clip, settings, node_id)
            class_source = "cached" if cached else "generated"
            notes.append(f"prior preservation with {class_raw.shape[0]} class images ({class_source}) for '{settings.class_prompt.strip()}', λ = {settings.prior_loss_weight:g}")
    for note in notes:
        log.info("DreamBooth: %s", note)

    with torch.inference_mode(False), torch.enable_grad():
        trainer = DreamBoothTrainer(model, clip, vae, images, settings, plan, class_raw=class_raw, class_pixels=class_images)
        for note in trainer.notes:
            log.info("DreamBooth: %s", note)
        notes.extend(trainer.notes)
        tracker = LossTracker()
        progress = comfy_adapter.ProgressReporter(settings.steps, node_id, "dreambooth")
        saved: dict[str, Path] = {}
        name = output_name(settings, identifier)

        def save(step: int, outputs: tuple[Any, Any, Any] | None = None) -> None:
            if not settings.save:
                return
            metadata = trainer.metadata(step)
            overwrite = settings.overwrite or bool(saved)
            if settings.mode == "lora":
                saved["lora"] = comfy_adapter.save_lora_file(trainer.lora_tensors(), name, overwrite=overwrite, metadata=metadata)
            else:
                out_model, out_clip, _ = outputs or trainer.outputs()
                saved["checkpoint"] = comfy_adapter.save_checkpoint_file(out_model, out_clip, vae, name, overwrite=overwrite, metadata=metadata)
                del out_model, out_clip
                if outputs is None:
                    trainer.unet.load()  # saving loaded the tuned clone; training goes on with ours
            embedding = trainer.embedding()
            if embedding is not None:
                saved["embedding"] = comfy_adapter.save_embedding_file(
                    embedding, name, overwrite=overwrite, base_model=trainer.unet.family, steps=step,
                    training_settings={"method": "dreambooth-pivotal", "identifier": identifier},
                )

        # The preview prompt: empty means the instance prompt; {} stands for the identifier.
        preview_prompt = (settings.preview_prompt.strip() or settings.instance_prompt.strip()).replace("{}", identifier)

        def preview() -> tuple[str, Any, int]:
            """What the model being trained draws now (no copies; nothing it trains is touched)."""
            preview_model, preview_clip = trainer.preview_models()
            image = comfy_adapter.render_preview(preview_model, preview_clip, vae, preview_prompt, settings.seed,
                                                 settings.resolution, settings.resolution)
            trainer.unet.load()  # sampling and decoding may have swapped our clone out; training goes on with it
            return comfy_adapter.preview_payload(image)

        done = 0
        try:
            for done in range(1, settings.steps + 1):
                comfy_adapter.raise_if_cancelled()
                losses = trainer.step(done)
                tracker.add(done, losses)
                smooth = {k: tracker.smoothed[k][-1] for k in losses}
                image = None
                if settings.preview_every and (done % settings.preview_every == 0 or done == settings.steps):
                    image = preview()
                progress.update(done, losses, smooth, preview=image)
                if settings.save_every and done % settings.save_every == 0 and done < settings.steps:
                    save(done)
        except comfy_adapter.Cancelled:
            progress.finish(done - 1, "cancelled")
            raise
        trainer.end_training()  # the optimizer state goes before the final outputs are built
        out_model, out_clip, lora = trainer.outputs()
        save(settings.steps, (out_model, out_clip, lora))
        embedding = trainer.embedding()
        if embedding is not None:
            out_clip = comfy_adapter.bind_trigger_words(out_clip, {identifier: embedding.vectors})
        last = {k: v[-1] for k, v in tracker.raw.items()}
        progress.finish(settings.steps, "done", last, {k: v[-1] for k, v in tracker.smoothed.items()})
    for kind, path in saved.items():
        notes.append(f"saved {kind}: {path.name}")
    return DreamBoothResult(
        model=out_model, clip=out_clip, identifier=identifier, losses=tracker, saved=saved, steps_trained=settings.steps,
        notes=notes, embedding=embedding, class_images=class_source, lora=lora,
    )
