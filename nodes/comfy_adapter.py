"""Everything that touches ComfyUI internals lives here, so a ComfyUI change is mended in one place.

Public ComfyUI surfaces used elsewhere in the pack (``folder_paths``, ``comfy.utils``,
``comfy.model_management``, the server) are wrapped here as well, so the training cores
can run headless in a worker process that loads models with ``comfy.sd``.

How weights become trainable without changing the MODEL other graph branches use:

- LoRA (UNet and CLIP) and full text-encoder tuning: weight wrappers on a clone's patcher
  (``w -> w + change``), as ComfyUI's own trainer does; the stored weights are never written.
- Full UNet fine-tuning: a *private trainable copy* of the diffusion model (its own float32
  or bfloat16 parameters), and a DIFFUSION_MODEL wrapper in the training clone's ``model_options`` that
  runs that copy's forward instead of the shared module's. ComfyUI's own ``_apply_model``
  (input scaling, timestep conversion, conditioning casts, denoised output) still runs.
- Gradient checkpointing: the same wrapper runs a *view* of the diffusion model whose
  blocks are shallow copies with a checkpointed ``forward``; the shared modules get no
  attribute, hook or forward patch (ComfyUI's TrainLoraNode patches them in place).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

import comfy.lora
import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.sd1_clip
import comfy.utils
import folder_paths

from .embedding_file import atomic_write, resolve_inside

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- folders


def embedding_folders() -> list[str]:
    return folder_paths.get_folder_paths("embeddings")


def embedding_save_folder() -> Path:
    """The first embeddings folder: where ComfyUI (and extra_model_paths.yaml) put it."""
    return _first_folder("embeddings")


def embedding_file_names() -> list[str]:
    return folder_paths.get_filename_list("embeddings")


def embedding_file_path(name: str) -> Path:
    """The full path of an embedding listed in the dropdown; refuses names outside the folders."""
    path = folder_paths.get_full_path("embeddings", name)
    if path is None:
        raise FileNotFoundError(f"embedding '{name}' is not in {', '.join(embedding_folders())}")
    return Path(path)


# --------------------------------------------------------------------------- trigger words

# Bound words are rewritten to ComfyUI's own `embedding:` syntax with a name no file can
# have, and the tokenizer resolves that name from memory; prompt weighting, long prompts
# and chunking then behave exactly as for `embedding:file`.
_SENTINEL = "personalize-bound-word-"


def text_encoder_widths(clip: comfy.sd.CLIP) -> dict[str, int]:
    """The CLIP's text encoders that accept embeddings: encoder key -> vector width."""
    return {sub.embedding_key: int(sub.embedding_size) for _, sub in _sub_tokenizers(_base_tokenizer(clip.tokenizer))}


def _sub_tokenizers(tokenizer: Any) -> list[tuple[str, comfy.sd1_clip.SDTokenizer]]:
    if isinstance(tokenizer, comfy.sd1_clip.SDTokenizer):
        return [("", tokenizer)]
    return [(attr, value) for attr, value in vars(tokenizer).items() if isinstance(value, comfy.sd1_clip.SDTokenizer)]


def _base_tokenizer(tokenizer: Any) -> Any:
    return tokenizer.base if isinstance(tokenizer, TriggerWordTokenizer) else tokenizer


def _trigger_pattern(words: list[str]) -> re.Pattern[str]:
    # Longest first, so "<cat-2>" wins over "<cat"; a word stands alone (not inside another
    # word, nor part of an `embedding:` file name).
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![\w/\\:])(?:{alternatives})(?![\w])")


class TriggerWordTokenizer:
    """A CLIP tokenizer that splices bound vectors wherever their trigger word stands.

    It wraps the CLIP's original tokenizer without changing it: the sub-tokenizers are
    shallow copies whose embedding lookup first consults the bound vectors.
    """

    def __init__(self, base: Any, bindings: Mapping[str, Mapping[str, torch.Tensor]]):
        self.base = base
        self.bindings = dict(bindings)
        self._names = {f"{_SENTINEL}{i}": word for i, word in enumerate(self.bindings)}
        self._sentinel_of = {word: name for name, word in self._names.items()}
        self._pattern = _trigger_pattern(list(self.bindings)) if self.bindings else None
        self._patched = copy.copy(base)
        for attr, sub in _sub_tokenizers(base):
            patched_sub = copy.copy(sub)
            patched_sub._try_get_embedding = self._lookup_for(sub)
            if patched_sub.embedding_directory is None:
                # A CLIP loaded without an embeddings folder (headless comfy.sd) skips the
                # `embedding:` syntax altogether; an empty folder list keeps it on.
                patched_sub.embedding_directory = []
            if attr:
                setattr(self._patched, attr, patched_sub)
            else:
                self._patched = patched_sub

    def _lookup_for(self, sub: comfy.sd1_clip.SDTokenizer):
        original = sub._try_get_embedding
        key = sub.embedding_key

        def lookup(embedding_name: str) -> tuple[torch.Tensor | None, str]:
            words = embedding_name.split()
            word = self._names.get(words[0]) if words else None
            if word is None:
                return original(embedding_name)
            return self.bindings[word][key], " ".join(words[1:])

        return lookup

    def rewrite(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: f" embedding:{self._sentinel_of[m.group(0)]} ", text)

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> Any:
        return self._patched.tokenize_with_weights(self.rewrite(text), return_word_ids, **kwargs)

    def untokenize(self, token_weight_pair: Any) -> Any:
        return self._patched.untokenize(token_weight_pair)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def __getattr__(self, name: str) -> Any:
        # Nodes that reach into clip.tokenizer.clip_l etc. get the patched sub-tokenizers.
        if name in ("_patched", "base"):
            raise AttributeError(name)
        return getattr(self._patched, name)


def bind_trigger_words(clip: comfy.sd.CLIP, bindings: Mapping[str, Mapping[str, torch.Tensor]]) -> comfy.sd.CLIP:
    """A clone of ``clip`` whose prompts splice ``bindings[word][encoder_key]`` for each word.

    The CLIP given is left as it was; words bound earlier in a chain stay bound.
    """
    widths = text_encoder_widths(clip)
    for word, vectors in bindings.items():
        missing = [key for key in widths if key not in vectors]
        if missing:
            raise ValueError(f"no vectors for the CLIP's encoder(s) {missing} for '{word}'")
    previous = clip.tokenizer.bindings if isinstance(clip.tokenizer, TriggerWordTokenizer) else {}
    bound = clip.clone()
    bound.tokenizer = TriggerWordTokenizer(_base_tokenizer(clip.tokenizer), {**previous, **bindings})
    return bound


def encode_prompt(clip: comfy.sd.CLIP, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditioning exactly as CLIP Text Encode computes it: (cond, pooled)."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


# --------------------------------------------------------------------------- training models


class _FreshWeight:
    """Weight wrapper for training clones.

    ComfyUI's cast step copies a weight whenever a wrapper is set; the copy is an ordinary
    tensor, where the loaded weight is an inference tensor that autograd refuses to save.
    The copy is tagged with its source so the saved-tensor policy below can keep a
    reference instead of the copy and cast again in backward: frozen weights then cost no
    memory between forward and backward.

    ``frozen``: the copy is cut from the stored weight's graph. ComfyUI's loaded weights
    are Parameters that require grad, so without the cut every backward would compute a
    gradient for every frozen weight and leave it in ``.grad`` of the shared MODEL/CLIP
    (a whole model of memory, and most of a backward's work, for nothing).
    """

    def __init__(self, module: torch.nn.Module, attr: str, frozen: bool = True):
        self.module = module
        self.attr = attr
        self.frozen = frozen

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            weight = weight.detach()
        functions = getattr(self.module, f"{self.attr}_function", [])
        # Only when nothing (a low-VRAM LoRA patch, say) altered it before us is the
        # copy a plain cast of the stored tensor.
        if functions and functions[0] is self:
            weight._personalize_source = (self.module, self.attr)
        return weight


def _add_fresh_weight_wrappers(patcher: Any, module: torch.nn.Module, prefix: str = "") -> None:
    for name, sub in module.named_modules():
        if not hasattr(sub, "weight_function"):
            continue
        for attr in ("weight", "bias"):
            if getattr(sub, attr, None) is not None:
                patcher.add_weight_wrapper(f"{prefix}{name}.{attr}", _FreshWeight(sub, attr))


_RECAST = object()


@contextlib.contextmanager
def _saved_tensors_policy(clone_activations: bool) -> Iterator[None]:
    """How autograd keeps tensors for backward inside ComfyUI's modules.

    - A frozen weight's per-forward copy: kept as a reference to the stored weight and
      cast again when backward needs it (no copy lives between forward and backward).
    - With ``clone_activations``: activations that depend on what trains are copied.
      ComfyUI's CLIP adds residuals in place (x += attn(x)), so the tensors autograd saved
      get overwritten and the gradient comes back silently wrong; saving copies makes it
      exact (checked against finite differences in the tests).
    """

    def pack(tensor: torch.Tensor) -> Any:
        base, view = tensor, None
        source = getattr(tensor, "_personalize_source", None)
        if source is None and tensor._base is not None and tensor._base.is_contiguous():
            # Linear layers save the transposed weight, a view of the tagged copy.
            base = tensor._base
            source = getattr(base, "_personalize_source", None)
            view = (tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())
        if source is not None:
            return (_RECAST, source[0], source[1], base.dtype, base.device, view)
        if clone_activations and tensor.requires_grad:
            return tensor.clone()
        return tensor

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple) and packed and packed[0] is _RECAST:
            _, module, attr, dtype, device, view = packed
            if view is None:
                return getattr(module, attr).to(device=device, dtype=dtype, copy=True)
            return getattr(module, attr).to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True).as_strided(*view)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _attention_pytorch_override(func: Any, *args: Any, **kwargs: Any) -> Any:
    import comfy.ldm.modules.attention as attention

    return attention.attention_pytorch(*args, **kwargs)


def model_family(model: Any) -> str:
    return type(model.model.model_config).__name__


def prediction_type(model: Any) -> str:
    """'eps' or 'v'; other parameterisations are refused with the family named."""
    import comfy.model_sampling as sampling

    ms = model.get_model_object("model_sampling")
    if isinstance(ms, (sampling.EDM, sampling.CONST)) or not isinstance(ms, sampling.EPS):
        raise ValueError(
            f"this {model_family(model)} model uses {type(ms).__name__} sampling; training here supports "
            "eps- and v-prediction models (SD1.x, SD2.x, SDXL and their fine-tunes)"
        )
    return "v" if isinstance(ms, sampling.V_PREDICTION) else "eps"


class DiffusionModelForTraining:
    """A clone of a MODEL prepared for backward, and its denoiser call.

    The clone wraps every weight so each forward uses fresh (non-inference) copies: the
    loaded weights are inference tensors, and the MODEL other branches use is unchanged.
    """

    def __init__(self, model: Any, extra_wrappers: Mapping[str, list[Any]] | None = None):
        self.prediction = prediction_type(model)
        self.autocast_dtype: torch.dtype | None = None  # None: the model's dtype
        self.family = model_family(model)
        self.patcher = model.clone()
        diffusion_model = self.patcher.model.diffusion_model
        _add_fresh_weight_wrappers(self.patcher, diffusion_model, "diffusion_model.")
        for key, wrappers in (extra_wrappers or {}).items():
            for wrapper in wrappers:
                self.patcher.add_weight_wrapper(key, wrapper)
        self.device = self.patcher.load_device
        if self.device.type == "cpu":
            # ComfyUI's CPU default is sub-quadratic attention: about twice as slow for training.
            options = self.patcher.model_options.setdefault("transformer_options", {})
            options["optimized_attention_override"] = _attention_pytorch_override
        self.sampling = self.patcher.get_model_object("model_sampling")
        # SDXL-style models read the pooled text embedding (their `y`); SD1/SD2 do not.
        self.needs_pooled = getattr(self.patcher.model, "adm_channels", 0) > 0

    def load(self) -> None:
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.sampling.sigma(timesteps.to(self.sampling.log_sigmas.device)).to(self.device, torch.float32)

    def noisy(self, latent: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.sampling.noise_scaling(sigma, noise, latent)

    def adm(self, pooled: torch.Tensor | None, height: int, width: int) -> torch.Tensor | None:
        """The class/size vector (SDXL's `y`) for latents of this pixel size, or None."""
        if pooled is None:
            return None
        return self.patcher.model.encode_adm(
            pooled_output=pooled, width=width, height=height, target_width=width, target_height=height,
            crop_w=0, crop_h=0, device=self.device,
        )

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        # Loading the text encoder, the VAE or a preview sampler may have swapped our clone
        # out (and its weight wrappers with it) on a small GPU; this is a no-op otherwise.
        self.load()
        height, width = x.shape[-2] * 8, x.shape[-1] * 8
        extra: dict[str, Any] = {}
        adm = self.adm(pooled, height, width)
        if adm is not None:
            extra["y"] = adm.to(self.device)
        with _saved_tensors_policy(clone_activations=False):
            return self.patcher.model.apply_model(
                x.to(self.device), sigma.to(self.device), c_crossattn=cond.to(self.device),
                transformer_options=self.patcher.model_options.get("transformer_options", {}), **extra,
            )

    def latents_from_pixels(self, vae: Any, pixels: torch.Tensor) -> torch.Tensor:
        """VAE-encode [B,H,W,3] pixels into the model's latent space (scaled), once."""
        return self.patcher.model.process_latent_in(vae.encode(pixels[..., :3])).to(torch.float32)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype or self.patcher.model.get_dtype()
        if self.device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()


class TrainableTextEncoder:
    """ComfyUI's own text-encoder pass with trainable vectors spliced in for a trigger word.

    The conditioning equals CLIP Text Encode's for the same prompt and vectors, because it
    is ComfyUI's code that computes it; only saved tensors are copied so backward is right.
    """

    def __init__(self, clip: comfy.sd.CLIP, trigger: str, vectors: Mapping[str, torch.Tensor]):
        training_clip = clip.clone()
        _add_fresh_weight_wrappers(training_clip.patcher, training_clip.cond_stage_model)
        self.clip = bind_trigger_words(training_clip, {trigger: vectors})

    def encode(self, prompts: list[str], need_pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond [B, T, D], pooled [B, P] or None) for a batch of prompts.

        Prompts that fit one 77-token chunk go through the encoder as one batch (ComfyUI's
        encoder takes a prompt's chunks as a batch); the pooled output exists per prompt
        only when each is encoded alone, so SDXL (whose model reads it) encodes one by one.
        """
        from .training_math import repeat_to_common_length

        token_sets = [self.clip.tokenize(prompt) for prompt in prompts]
        single_chunk = all(len(chunks) == 1 for tokens in token_sets for chunks in tokens.values())
        with _saved_tensors_policy(clone_activations=True):
            if len(prompts) > 1 and single_chunk and not need_pooled:
                merged = {key: [tokens[key][0] for tokens in token_sets] for key in token_sets[0]}
                cond = self.clip.encode_from_tokens(merged)
                return cond.reshape(len(prompts), -1, cond.shape[-1]), None
            encoded = [self.clip.encode_from_tokens(tokens, return_pooled=True) for tokens in token_sets]
        conds = [cond for cond, _ in encoded]
        pooled = [pool for _, pool in encoded]
        pooled_batch = torch.cat(pooled) if need_pooled and all(p is not None for p in pooled) else None
        return repeat_to_common_length(conds), pooled_batch


def token_embedding_rows(clip: comfy.sd.CLIP, text: str) -> dict[str, torch.Tensor]:
    """The input-embedding rows of ``text``'s tokens, per text encoder: {key: [n_tokens, width]}."""
    rows: dict[str, torch.Tensor] = {}
    tokenizer = _base_tokenizer(clip.tokenizer)
    for _, sub in _sub_tokenizers(tokenizer):
        ids = token_ids(sub, text)
        encoder = getattr(clip.cond_stage_model, sub.embedding_key, None)
        if encoder is None:
            raise ValueError(f"this CLIP has no '{sub.embedding_key}' text encoder")
        table = encoder.transformer.get_input_embeddings().weight
        rows[sub.embedding_key] = table[torch.tensor(ids, dtype=torch.long, device=table.device)].detach().to("cpu", torch.float32).clone()
    return rows


def token_ids(sub: comfy.sd1_clip.SDTokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without the start and end tokens."""
    ids = sub.tokenizer(text)["input_ids"]
    start = sub.tokens_start
    end = len(ids) - 1 if sub.tokenizer_adds_end_token else len(ids)
    return list(ids[start:end])


def single_known_token(clip: comfy.sd.CLIP, word: str) -> bool:
    """Whether ``word`` already is one token of the CLIP's vocabulary."""
    return any(len(token_ids(sub, word)) == 1 for _, sub in _sub_tokenizers(_base_tokenizer(clip.tokenizer)))


# --------------------------------------------------------------------------- progress and cancel

PROGRESS_EVENT = "personalize.training"


def _json_number(value: Any) -> float | None:
    # json.dumps writes NaN/Infinity as bare words, which browsers refuse as JSON.
    import math

    return float(value) if value is not None and math.isfinite(float(value)) else None
Cancelled = comfy.model_management.InterruptProcessingException


def raise_if_cancelled() -> None:
    """Honour ComfyUI's Cancel button; raises its InterruptProcessingException."""
    comfy.model_management.throw_exception_if_processing_interrupted()


class ProgressReporter:
    """Progress on the node (ComfyUI's progress bar) plus live loss messages for web/."""

    def __init__(self, total: int, node_id: str | None, kind: str, min_interval_s: float = 0.25):
        import time

        self._time = time.monotonic
        self.total = total
        self.node_id = node_id
        self.kind = kind
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.min_interval_s = min_interval_s
        self._started = self._time()
        self._last_sent = -1e9
        self._pending_points: list[list[float]] = []

    def _send(self, payload: dict[str, Any]) -> None:
        if self.node_id is None:
            return
        try:
            from server import PromptServer
        except ImportError:  # headless worker: no server to tell
            return
        instance = getattr(PromptServer, "instance", None)
        if instance is None:
            return
        instance.send_sync(PROGRESS_EVENT, payload, instance.client_id)

    def update(self, step: int, losses: Mapping[str, float], smoothed: Mapping[str, float], preview: Any = None, status: str = "running") -> None:
        self.bar.update_absolute(step, self.total, preview)
        main = "loss" if "loss" in smoothed else next(iter(smoothed), None)
        if main is not None and status == "running":
            self._pending_points.append([step, _json_number(smoothed[main])])
        now = self._time()
        if status == "running" and now - self._last_sent < self.min_interval_s and step < self.total:
            return
        elapsed = now - self._started
        self._last_sent = now
        self._send(
            {
                "node": str(self.node_id),
                "kind": self.kind,
                "status": status,
                "step": step,
                "total": self.total,
                "loss": _json_number(losses.get(main)) if main is not None else None,
                "loss_smoothed": _json_number(smoothed.get(main)) if main is not None else None,
                "losses": {k: _json_number(v) for k, v in smoothed.items()},
                "elapsed_s": elapsed,
                "eta_s": elapsed / step * (self.total - step) if step > 0 else None,
                "points": self._pending_points,
            }
        )
        self._pending_points = []

    def finish(self, step: int, status: str, losses: Mapping[str, float] | None = None, smoothed: Mapping[str, float] | None = None) -> None:
        self._last_sent = -1e9
        self.update(step, losses or {}, smoothed or {}, status=status)


def save_embedding_file(embedding: Any, name: str, **kwargs: Any) -> Path:
    """Write an embedding into the first embeddings folder (extra_model_paths.yaml honoured)."""
    from .embedding_file import write_embedding

    return write_embedding(embedding, embedding_save_folder(), name, **kwargs)


# --------------------------------------------------------------------------- input folder


def input_directory() -> Path:
    return Path(folder_paths.get_input_directory())


def input_subfolders() -> list[str]:
    """Folders under ComfyUI's input directory (relative, '/'-separated), for a dropdown."""
    root = input_directory()
    if not root.is_dir():
        return []
    found = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir() and not p.name.startswith(".")]
    return sorted(found, key=str.lower)


# --------------------------------------------------------------------------- previews


def conditioning(clip: comfy.sd.CLIP, text: str) -> list:
    """CONDITIONING as CLIP Text Encode returns it."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def render_preview(model: Any, clip: comfy.sd.CLIP, vae: Any, prompt: str, seed: int, width: int, height: int,
                   steps: int = 20, cfg: float = 7.0, sampler_name: str = "euler", scheduler: str = "normal") -> Any:
    """An image (PIL) from ComfyUI's own sampler, for the node's live preview."""
    from PIL import Image

    with torch.inference_mode():
        positive, negative = conditioning(clip, prompt), conditioning(clip, "")
        latent = torch.zeros(1, 4, height // 8, width // 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        # No callback and no progress bar: the training node owns its bar.
        samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                      disable_pbar=True, seed=seed)
        pixels = vae.decode(samples)[0].clamp(0, 1)
    array = (pixels.reshape(-1, *pixels.shape[-3:])[0].cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def preview_payload(image: Any) -> tuple[str, Any, int]:
    """What ComfyUI's progress bar takes as a preview image."""
    return ("JPEG", image, 512)


# =========================================================================== DreamBooth

CACHE_FOLDER = "personalize_cache"
if CACHE_FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path(CACHE_FOLDER, os.path.join(folder_paths.models_dir, CACHE_FOLDER))

SAMPLER_NAMES: tuple[str, ...] = tuple(comfy.samplers.KSampler.SAMPLERS)
SCHEDULER_NAMES: tuple[str, ...] = tuple(comfy.samplers.KSampler.SCHEDULERS)
_FLOAT_STORAGE = (torch.float32, torch.float16, torch.bfloat16)

# --------------------------------------------------------------------------- folders


def _first_folder(kind: str) -> Path:
    folders = folder_paths.get_folder_paths(kind)
    if not folders:
        raise RuntimeError(f"ComfyUI has no '{kind}' folder configured")
    return Path(folders[0])


def cache_folder() -> Path:
    return _first_folder(CACHE_FOLDER)


def checkpoint_target(name: str) -> Path:
    """Where a checkpoint called ``name`` goes (models/checkpoints); refuses names leaving it."""
    return resolve_inside(_first_folder("checkpoints"), name, ".safetensors")


def lora_target(name: str) -> Path:
    return resolve_inside(_first_folder("loras"), name, ".safetensors")


def embedding_target(name: str) -> Path:
    return resolve_inside(_first_folder("embeddings"), name, ".safetensors")


def name_in_folder(kind: str, path: Path) -> str:
    """``path`` as the name ComfyUI lists it under in a ``kind`` folder (subfolders included)."""
    for folder in folder_paths.get_folder_paths(kind):
        try:
            return Path(path).resolve().relative_to(Path(folder).resolve()).as_posix()
        except ValueError:
            continue
    return Path(path).name


# --------------------------------------------------------------------------- tokenizer


def tokenizer_vocab(clip: comfy.sd.CLIP) -> dict[str, int]:
    """The BPE vocabulary of the CLIP's first tokenizer: token text -> id."""
    subs = _sub_tokenizers(_base_tokenizer(clip.tokenizer))
    if not subs:
        raise ValueError("this CLIP has no CLIP tokenizer")
    return dict(subs[0][1].tokenizer.get_vocab())


def prompt_token_ids(clip: comfy.sd.CLIP, text: str) -> list[int]:
    """Token ids of ``text`` (no start/end tokens) with the CLIP's first tokenizer."""
    subs = _sub_tokenizers(_base_tokenizer(clip.tokenizer))
    return token_ids(subs[0][1], text)


def single_token_everywhere(clip: comfy.sd.CLIP, word: str) -> bool:
    """Whether ``word`` is exactly one token in every tokenizer of the CLIP."""
    return all(len(token_ids(sub, word)) == 1 for _, sub in _sub_tokenizers(_base_tokenizer(clip.tokenizer)))


# --------------------------------------------------------------------------- model identity and class images


def model_identity(model: Any, samples: int = 16) -> str:
    """A hash of the family and a sample of the diffusion model's effective weights.

    The model is loaded first, so patches it carries (a LoRA applied before training)
    are in the weights hashed: a patched model gets its own class images.
    """
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    state = model.model.diffusion_model.state_dict()
    keys = sorted(state)
    if not keys:
        raise ValueError("the diffusion model has no weights")
    count = min(samples, len(keys))
    picks = sorted({keys[round(i * (len(keys) - 1) / max(count - 1, 1))] for i in range(count)})
    digest = hashlib.sha256(model_family(model).encode())
    digest.update(type(model.get_model_object("model_sampling")).__name__.encode())
    for key in picks:
        tensor = state[key].detach().to("cpu", torch.float32).flatten()[: 1 << 20].contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(state[key].shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def class_cache_path(key: str) -> Path:
    return cache_folder() / f"dreambooth-class-latents-{key[:32]}.safetensors"


def read_class_cache(key: str, count: int) -> torch.Tensor | None:
    """Cached class latents for ``key``, or None (missing, unreadable, or another key)."""
    import safetensors
    import safetensors.torch

    path = class_cache_path(key)
    if not path.is_file():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
        latents = safetensors.torch.load_file(str(path), device="cpu")["latents"]
    except Exception as error:  # a broken cache file is regenerated, never trusted
        log.warning("DreamBooth: ignoring unreadable class-image cache %s: %s", path.name, error)
        return None
    if metadata.get("key") != key or latents.shape[0] != count:
        return None
    return latents.to(torch.float32)


def write_class_cache(key: str, latents: torch.Tensor, description: Mapping[str, Any]) -> Path:
    import safetensors.torch

    path = class_cache_path(key)
    tensors = {"latents": latents.detach().to("cpu", torch.float32).contiguous()}
    metadata = {"key": key, "format": "comfyui-personalize.class-latents/1", "settings": json.dumps(dict(description), sort_keys=True)}
    return atomic_write(path, lambda temp: safetensors.torch.save_file(tensors, str(temp), metadata=metadata), overwrite=True)


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
    chunk_size: int = 4,
    node_id: str | None = None,
) -> torch.Tensor:
    """``count`` latents sampled by ``model`` as KSampler would (raw LATENT space, [N, C, h, w]).

    Image ``i`` starts from the noise KSampler gives batch index ``i`` for ``seed``; chunks
    of ``chunk_size`` are sampled at a time (sampler seed ``seed + first index``), so a
    batch of at most ``chunk_size`` equals KSampler on an empty latent of that batch size.
    """
    positive = conditioning(clip, prompt)
    negative = conditioning(clip, negative_prompt)
    channels = model.get_model_object("latent_format").latent_channels
    chunks = [list(range(s, min(count, s + chunk_size))) for s in range(0, count, chunk_size)]
    bar = comfy.utils.ProgressBar(len(chunks) * steps, node_id=node_id)
    out = []
    for number, indices in enumerate(chunks):
        raise_if_cancelled()
        empty = torch.zeros([len(indices), channels, height // 8, width // 8], device=comfy.model_management.intermediate_device())
        empty = comfy.sample.fix_empty_latent_channels(model, empty)
        noise = comfy.sample.prepare_noise(empty, seed, indices)

        def callback(step, x0, x, total_steps, _done=number * steps):
            raise_if_cancelled()
            bar.update_absolute(_done + step + 1, len(chunks) * steps)

        samples = comfy.sample.sample(
            model, noise, steps, cfg, sampler_name, scheduler, positive, negative, empty,
            denoise=1.0, callback=callback, disable_pbar=True, seed=(seed + indices[0]) % 2**64,
        )
        out.append(samples.to("cpu", torch.float32))
    return torch.cat(out)


def scaled_latents(model: Any, raw: torch.Tensor) -> torch.Tensor:
    """LATENT samples in the model's training space (what ``latents_from_pixels`` gives)."""
    return model.model.process_latent_in(raw.to(torch.float32)).to(torch.float32)


# --------------------------------------------------------------------------- which weights train

_UNET_LORA_PATTERNS = {
    "attention": (r"\.attn\d\.(to_q|to_k|to_v|to_out\.0)$",),
    "attention+mlp": (r"\.attn\d\.(to_q|to_k|to_v|to_out\.0)$", r"\.ff\.net\.(0\.proj|2)$", r"\.(proj_in|proj_out)$"),
    "all": (r".",),
}
LORA_TARGET_CHOICES = tuple(_UNET_LORA_PATTERNS)


def _wrappable_weights(module: torch.nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, sub in module.named_modules():
        if hasattr(sub, "weight_function") and getattr(sub, "weight", None) is not None:
            shapes[f"{prefix}{name}.weight"] = tuple(sub.weight.shape)
    return shapes


def unet_lora_weights(model: Any, targets: str) -> dict[str, tuple[int, ...]]:
    """Diffusion-model weights a LoRA of ``targets`` adapts: {"diffusion_model.X.weight": shape}."""
    import re

    if targets not in _UNET_LORA_PATTERNS:
        raise ValueError(f"unknown LoRA targets '{targets}': use one of {', '.join(LORA_TARGET_CHOICES)}")
    patterns = [re.compile(p) for p in _UNET_LORA_PATTERNS[targets]]
    chosen = {}
    for key, shape in _wrappable_weights(model.model.diffusion_model, "diffusion_model.").items():
        module_name = key[: -len(".weight")]
        if len(shape) >= 2 and any(p.search(module_name) for p in patterns):
            chosen[key] = shape
    if not chosen:
        raise ValueError(
            f"no '{targets}' layers found in this {model_family(model)} diffusion model (the names follow SD's UNet); "
            "use LoRA targets 'all'"
        )
    return chosen


def clip_lora_weights(clip: comfy.sd.CLIP) -> dict[str, tuple[int, ...]]:
    """Text-encoder weights a LoRA adapts: attention q/k/v/out and the MLP of every layer."""
    suffixes = tuple(f".{name}.weight" for name in comfy.lora.LORA_CLIP_MAP)
    chosen = {k: s for k, s in _wrappable_weights(clip.cond_stage_model, "").items() if ".encoder.layers." in k and k.endswith(suffixes)}
    if not chosen:
        raise ValueError("text-encoder LoRA supports CLIP text encoders (SD1.x, SD2.x, SDXL); this CLIP has none")
    return chosen


def clip_weights(clip: comfy.sd.CLIP) -> dict[str, tuple[int, ...]]:
    """Every text-encoder weight and bias ComfyUI can wrap: what full text-encoder tuning trains."""
    shapes = {}
    for name, sub in clip.cond_stage_model.named_modules():
        if not hasattr(sub, "weight_function"):
            continue
        for attr in ("weight", "bias"):
            tensor = getattr(sub, attr, None)
            if tensor is not None:
                shapes[f"{name}.{attr}"] = tuple(tensor.shape)
    return shapes


def _preferred(candidates: Iterable[str], preferences: Iterable[str]) -> str | None:
    candidates = sorted(candidates)
    for prefix in preferences:
        for name in candidates:
            if name.startswith(prefix):
                return name
    return None


def unet_lora_names(model: Any, keys: Iterable[str]) -> dict[str, str]:
    """kohya LoRA names for diffusion-model weights, as ComfyUI's LoraLoader maps them back.

    The diffusers-style name (``lora_unet_down_blocks_0_attentions_0_...``, what kohya and
    AUTOMATIC1111 write) where ComfyUI knows one, else ComfyUI's LDM-style ``lora_unet_...``.
    """
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    reverse: dict[str, list[str]] = {}
    for lora_name, model_key in key_map.items():
        if lora_name.startswith("lora_unet_"):
            reverse.setdefault(model_key, []).append(lora_name)
    names = {}
    for key in keys:
        ldm = "lora_unet_" + key[len("diffusion_model."): -len(".weight")].replace(".", "_")
        others = [n for n in reverse.get(key, []) if n != ldm]
        names[key] = sorted(others)[0] if others else ldm
        if key_map.get(names[key]) != key:
            raise RuntimeError(f"LoRA name {names[key]} would not load back onto {key}")
    return names


def clip_lora_names(clip: comfy.sd.CLIP, keys: Iterable[str]) -> dict[str, str]:
    """kohya text-encoder LoRA names (``lora_te_`` for one encoder, ``lora_te1_``/``lora_te2_`` for SDXL)."""
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    reverse: dict[str, list[str]] = {}
    for lora_name, model_key in key_map.items():
        reverse.setdefault(model_key, []).append(lora_name)
    several = len(_sub_tokenizers(_base_tokenizer(clip.tokenizer))) > 1
    preferences = ("lora_te1_", "lora_te2_", "lora_te_") if several else ("lora_te_", "lora_te1_")
    names = {}
    for key in keys:
        name = _preferred(reverse.get(key, []), preferences) or "text_encoders." + key[: -len(".weight")]
        if key_map.get(name) != key:
            raise RuntimeError(f"LoRA name {name} would not load back onto {key}")
        names[key] = name
    return names


# --------------------------------------------------------------------------- trainable text encoder


class TrainableClip(TrainableTextEncoder):
    """ComfyUI's own CLIP pass on a clone whose weights carry trainable wrappers.

    ``extra_wrappers``: {weight key: [callables]} (LoRA pairs, full-tuning deltas);
    ``trigger``/``vectors``: a word bound to trainable input vectors (pivotal tuning).
    Saved tensors follow ``_saved_tensors_policy`` during the pass.
    """

    def __init__(self, clip: comfy.sd.CLIP, extra_wrappers: Mapping[str, list[Callable]] | None = None,
                 trigger: str | None = None, vectors: Mapping[str, torch.Tensor] | None = None):
        training_clip = clip.clone()
        _add_fresh_weight_wrappers(training_clip.patcher, training_clip.cond_stage_model)
        for key, wrappers in (extra_wrappers or {}).items():
            for wrapper in wrappers:
                training_clip.patcher.add_weight_wrapper(key, wrapper)
        self.clip = bind_trigger_words(training_clip, {trigger: vectors}) if trigger else training_clip


# --------------------------------------------------------------------------- private diffusion-model copies

_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


def trainable_module_copy(root: torch.nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A copy of ``root`` with its own trainable parameters on ``device``.

    Only the tree structure is copied (module objects, their parameter/buffer/child dicts);
    code and config attributes are shared. ComfyUI's cast layers in the copy cast their
    weights to the input's dtype, as ComfyUI's inference does with stored weights; their
    parameters are stored in ``dtype``, any other parameter in float32. When that cast
    makes a copy (``dtype`` is not the compute dtype), the copy is tagged like a frozen
    weight's, so autograd keeps a reference instead of a float32 copy of every weight
    between forward and backward (see ``_saved_tensors_policy``).
    """
    modules: dict[int, torch.nn.Module] = {}
    params: dict[int, torch.nn.Parameter] = {}

    def copy_param(p: torch.nn.Parameter, cast_layer: bool) -> torch.nn.Parameter:
        if id(p) not in params:
            wanted = (dtype if cast_layer else torch.float32) if p.is_floating_point() else p.dtype
            data = p.detach().to(device=device, dtype=wanted, copy=True)
            params[id(p)] = torch.nn.Parameter(data, requires_grad=p.is_floating_point())
        return params[id(p)]

    def copy_module(m: torch.nn.Module) -> torch.nn.Module:
        if id(m) in modules:
            return modules[id(m)]
        new = copy.copy(m)
        modules[id(m)] = new
        cast_layer = hasattr(m, "weight_function")
        new._parameters = {n: None if p is None else copy_param(p, cast_layer) for n, p in m._parameters.items()}
        new._buffers = {n: None if b is None else b.detach().to(device).clone() for n, b in m._buffers.items()}
        new._modules = {n: None if c is None else copy_module(c) for n, c in m._modules.items()}
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            if hasattr(m, hooks):
                setattr(new, hooks, copy.copy(getattr(m, hooks)))
        if cast_layer:
            # On the CPU ComfyUI computes in float32, so float32 weights are used as they are.
            tag = dtype != torch.float32 or torch.device(device).type != "cpu"
            new.weight_function = [_FreshWeight(new, "weight", frozen=False)] if tag and new._parameters.get("weight") is not None else []
            new.bias_function = [_FreshWeight(new, "bias", frozen=False)] if tag and new._parameters.get("bias") is not None else []
            new.comfy_cast_weights = True
        return new

    return copy_module(root)


def _checkpointed(forward: Callable) -> Callable:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # Snapshot option dicts: ComfyUI's blocks write into transformer_options as the
        # forward proceeds, and the recomputation in backward must see them as they were.
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _has_parameters(module: torch.nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _checkpoint_tree(module: torch.nn.Module) -> torch.nn.Module:
    if not _has_parameters(module) or hasattr(module, "weight_function"):
        return module  # one layer (or none): shared as it is, its weight wrappers included
    if isinstance(module, _CONTAINERS):
        new = copy.copy(module)
        new._modules = {n: None if c is None else _checkpoint_tree(c) for n, c in module._modules.items()}
        return new
    new = copy.copy(module)
    new.forward = _checkpointed(module.forward)
    return new


def checkpointed_view(root: torch.nn.Module) -> torch.nn.Module:
    """``root`` whose top-level blocks recompute their activations in backward.

    The blocks (the highest modules below ``root`` and its lists, e.g. each ResBlock and
    SpatialTransformer) are shallow copies whose ``forward`` runs under
    ``torch.utils.checkpoint``; layers and weights are the originals, untouched.
    """
    view = copy.copy(root)
    view._modules = {n: None if c is None else _checkpoint_tree(c) for n, c in root._modules.items()}
    return view


class RouteDiffusionModel:
    """DIFFUSION_MODEL wrapper: run ``target``'s forward where the shared module's would run."""

    def __init__(self, source: torch.nn.Module, target: torch.nn.Module):
        self.source = source
        self.target = target
        self.calls = 0

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        original = executor.original
        if getattr(original, "__self__", None) is not self.source:
            raise RuntimeError("the diffusion model's forward is not the one this trainer prepared for")
        self.calls += 1
        return getattr(self.target, original.__name__)(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "RouteDiffusionModel":
        return self  # patcher clones deep-copy model_options: never copy the module


def route_diffusion_model(patcher: Any, target: torch.nn.Module) -> RouteDiffusionModel:
    """Make ``patcher``'s forwards (through its model_options) run ``target`` instead."""
    route = RouteDiffusionModel(patcher.model.diffusion_model, target)
    comfy.patcher_extension.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "personalize.dreambooth", route, patcher.model_options, is_model_options=True,
    )
    return route


def diffs_from_copy(trained: torch.nn.Module, patcher: Any, prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """Trained minus current weights, per changed parameter, in the storage dtype on the offload device.

    ``patcher`` must be loaded (its patches applied): the differences are then relative to
    the weights the training started from.
    """
    current = dict(patcher.model.diffusion_model.named_parameters())
    diffs = {}
    for name, param in trained.named_parameters():
        base = current[name]
        diff = param.detach().to(torch.float32) - base.detach().to(param.device, torch.float32)
        if not bool(diff.any()):
            continue
        dtype = base.dtype if base.dtype in _FLOAT_STORAGE else torch.float32
        diffs[prefix + name] = diff.to(patcher.offload_device, dtype)
    return diffs


def load_for_training(*patchers: Any) -> None:
    comfy.model_management.load_models_gpu(list(patchers), force_full_load=True)


# --------------------------------------------------------------------------- outputs


def model_with_diffs(model: Any, diffs: Mapping[str, torch.Tensor]) -> Any:
    """A clone of the MODEL (or CLIP) carrying ``diffs`` as ComfyUI "diff" patches."""
    patched = model.clone()
    added = patched.add_patches({k: ("diff", (v,)) for k, v in diffs.items()}, 1.0)
    missing = set(diffs) - set(added)
    if missing:
        raise RuntimeError(f"{len(missing)} tuned weights have no place in the model, e.g. {sorted(missing)[0]}")
    return patched


def apply_lora_tensors(model: Any, clip: comfy.sd.CLIP | None, tensors: Mapping[str, torch.Tensor]) -> tuple[Any, Any]:
    """The MODEL (and CLIP) with a LoRA state dict applied exactly as LoraLoader applies a file."""
    return comfy.sd.load_lora_for_models(model, clip, dict(tensors), 1.0, 1.0)


def save_lora_file(tensors: Mapping[str, torch.Tensor], name: str, *, overwrite: bool, metadata: Mapping[str, str]) -> Path:
    import safetensors.torch

    target = lora_target(name)
    content = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(target, lambda temp: safetensors.torch.save_file(content, str(temp), metadata=dict(metadata)), overwrite=overwrite)


def save_checkpoint_file(model: Any, clip: comfy.sd.CLIP, vae: Any, name: str, *, overwrite: bool, metadata: Mapping[str, str]) -> Path:
    """A checkpoint CheckpointLoaderSimple loads: ComfyUI's own save_checkpoint, written atomically."""
    target = checkpoint_target(name)
    # save_checkpoint reads the CLIP's state dict before it loads the models: load (and
    # patch) the CLIP first so its tuned weights are the ones written.
    comfy.model_management.load_models_gpu([model, clip.patcher], force_patch_weights=True)

    def write(temp: Path) -> None:
        comfy.sd.save_checkpoint(str(temp), model, clip=clip, vae=vae, metadata=dict(metadata))

    return atomic_write(target, write, overwrite=overwrite)
