"""Everything that touches ComfyUI internals lives here, so a ComfyUI change is mended in one place.

Public ComfyUI surfaces used elsewhere in the pack (``folder_paths``, ``comfy.utils``,
``comfy.model_management``, the server) are wrapped here as well, so the training cores
can run headless in a worker process that loads models with ``comfy.sd``.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

import comfy.model_management
import comfy.sd
import comfy.sd1_clip
import folder_paths

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- folders


def embedding_folders() -> list[str]:
    return folder_paths.get_folder_paths("embeddings")


def embedding_save_folder() -> Path:
    """The first embeddings folder: where ComfyUI (and extra_model_paths.yaml) put it."""
    folders = embedding_folders()
    if not folders:
        raise RuntimeError("ComfyUI has no 'embeddings' folder configured")
    return Path(folders[0])


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
    """

    def __init__(self, module: torch.nn.Module, attr: str):
        self.module = module
        self.attr = attr

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
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
        source = getattr(tensor, "_personalize_source", None)
        if source is not None:
            return (_RECAST, source[0], source[1], tensor.dtype, tensor.device)
        if clone_activations and tensor.requires_grad:
            return tensor.clone()
        return tensor

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple) and packed and packed[0] is _RECAST:
            _, module, attr, dtype, device = packed
            return getattr(module, attr).to(device=device, dtype=dtype, copy=True)
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
        dtype = self.patcher.model.get_dtype()
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

        import comfy.utils

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
    import comfy.sample
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
