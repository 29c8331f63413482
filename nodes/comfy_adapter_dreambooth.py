"""ComfyUI internals that DreamBooth needs, on top of ``comfy_adapter``.

Written as an extension of ``comfy_adapter`` (to be merged into it): the training core in
``dreambooth.py`` touches ComfyUI only through here.

How weights become trainable without changing the MODEL other graph branches use:

- LoRA (UNet and CLIP) and full text-encoder tuning: weight wrappers on a clone's patcher
  (``w -> w + change``), as ComfyUI's own trainer does; the stored weights are never written.
- Full UNet fine-tuning: a *private trainable copy* of the diffusion model (its own float32
  parameters), and a DIFFUSION_MODEL wrapper in the training clone's ``model_options`` that
  runs that copy's forward instead of the shared module's. ComfyUI's own ``_apply_model``
  (input scaling, timestep conversion, conditioning casts, denoised output) still runs.
- Gradient checkpointing: the same wrapper runs a *view* of the diffusion model whose
  blocks are shallow copies with a checkpointed ``forward``; the shared modules get no
  attribute, hook or forward patch (ComfyUI's TrainLoraNode patches them in place).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

import comfy.lora
import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths

from .comfy_adapter import (
    TrainableTextEncoder,
    _add_fresh_weight_wrappers,
    _base_tokenizer,
    _sub_tokenizers,
    bind_trigger_words,
    conditioning,
    model_family,
    token_ids,
)
from .embedding_file import atomic_write, resolve_inside

log = logging.getLogger(__name__)

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
    from .comfy_adapter import raise_if_cancelled

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


def trainable_module_copy(root: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy of ``root`` with its own float32 trainable parameters on ``device``.

    Only the tree structure is copied (module objects, their parameter/buffer/child dicts);
    code and config attributes are shared. ComfyUI's cast layers in the copy cast their
    float32 weights to the input's dtype, as ComfyUI's inference does with stored weights.
    """
    modules: dict[int, torch.nn.Module] = {}
    params: dict[int, torch.nn.Parameter] = {}

    def copy_param(p: torch.nn.Parameter) -> torch.nn.Parameter:
        if id(p) not in params:
            data = p.detach().to(device=device, dtype=torch.float32 if p.is_floating_point() else p.dtype, copy=True)
            params[id(p)] = torch.nn.Parameter(data, requires_grad=p.is_floating_point())
        return params[id(p)]

    def copy_module(m: torch.nn.Module) -> torch.nn.Module:
        if id(m) in modules:
            return modules[id(m)]
        new = copy.copy(m)
        modules[id(m)] = new
        new._parameters = {n: None if p is None else copy_param(p) for n, p in m._parameters.items()}
        new._buffers = {n: None if b is None else b.detach().to(device).clone() for n, b in m._buffers.items()}
        new._modules = {n: None if c is None else copy_module(c) for n, c in m._modules.items()}
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            if hasattr(m, hooks):
                setattr(new, hooks, copy.copy(getattr(m, hooks)))
        if hasattr(m, "weight_function"):
            new.weight_function = []
            new.bias_function = []
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
