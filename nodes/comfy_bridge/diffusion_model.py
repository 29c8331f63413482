"""The MODEL prepared for training: a training view of its diffusion model, run by ComfyUI's own code.

``DiffusionModelForTraining`` clones the MODEL and makes the clone's forward run a training view
of the diffusion model (``core.training_layers``) through a DIFFUSION_MODEL wrapper in the
clone's ``model_options``. ComfyUI's ``apply_model`` (input scaling, timestep conversion,
conditioning casts, the denoised output) runs as in inference; the shared modules get no
attribute, hook, wrapper or forward patch, so the MODEL other branches of the graph use is
untouched and nothing ComfyUI's memory management does to its weights (partial loading,
DynamicVRAM streaming, patches applied on the fly) escapes the training.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import comfy.model_sampling
import comfy.patcher_extension
import torch

from ..core.adapters import LoraPair
from ..core.training_layers import TrainingLayer, checkpointed_view, training_view
from . import devices, internals, layers

_WRAPPER_KEY = "personalize.training"


def model_family(model: Any) -> str:
    return type(model.model.model_config).__name__


def prediction_type(model: Any) -> str:
    """'eps' or 'v'; other parameterisations are refused with the family named."""
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, (comfy.model_sampling.EDM, comfy.model_sampling.CONST)) or not isinstance(sampling, comfy.model_sampling.EPS):
        raise ValueError(
            f"this {model_family(model)} model uses {type(sampling).__name__} sampling; training here supports "
            "eps- and v-prediction models (SD1.x, SD2.x, SDXL and their fine-tunes)"
        )
    return "v" if isinstance(sampling, comfy.model_sampling.V_PREDICTION) else "eps"


def storage_dtype(model: Any) -> torch.dtype:
    """The dtype the diffusion model's weights are stored in (fp8 for fp8 checkpoints)."""
    return model.model.get_dtype()


def weight_count(model: Any) -> int:
    """Weights of the diffusion model (what full fine-tuning trains)."""
    return sum(p.numel() for p in model.model.diffusion_model.parameters())


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype ComfyUI computes the diffusion model in."""
    return getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()


def _attention_pytorch(func: Any, *args: Any, **kwargs: Any) -> Any:
    import comfy.ldm.modules.attention as attention

    return attention.attention_pytorch(*args, **kwargs)


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

    def __deepcopy__(self, memo: dict) -> RouteDiffusionModel:
        return self  # ComfyUI 0.3.x clones deep-copy model_options: never copy the view


class DiffusionModelForTraining:
    """A clone of a MODEL whose forward runs a training view of its diffusion model.

    ``adapters``: {"diffusion_model.X.weight": LoraPair}; ``own_dtype``: full fine-tuning, the
    view's layers get trainable weights of their own (the model is loaded first, so they start
    from its effective weights, patches included); ``compute_dtype``: what the layers compute in.
    """

    def __init__(
        self,
        model: Any,
        compute_dtype: torch.dtype,
        *,
        adapters: Mapping[str, LoraPair] | None = None,
        own_dtype: torch.dtype | None = None,
        gradient_checkpointing: bool = False,
        memory_required: int = 0,
    ):
        internals.require()
        self.prediction = prediction_type(model)
        self.family = model_family(model)
        self.compute_dtype = compute_dtype
        self.memory_required = memory_required
        self.patcher = model.clone()
        self.device = self.patcher.load_device
        if self.device.type == "cpu":
            # ComfyUI's CPU default is sub-quadratic attention: about twice as slow for training.
            options = self.patcher.model_options.setdefault("transformer_options", {})
            options["optimized_attention_override"] = _attention_pytorch
        self.sampling = self.patcher.get_model_object("model_sampling")
        # SDXL-style models read the pooled text embedding (their `y`); SD1/SD2 do not.
        self.needs_pooled = getattr(self.patcher.model, "adm_channels", 0) > 0
        if own_dtype is not None:
            self.load()
        source = self.patcher.model.diffusion_model
        prefix = "diffusion_model."
        by_path = {key[len(prefix) : -len(".weight")]: pair for key, pair in (adapters or {}).items()}
        self.view = training_view(
            source, layers.cast, compute_dtype, is_layer=layers.is_cast_layer, adapters=by_path, own_dtype=own_dtype, device=self.device
        )
        target = checkpointed_view(self.view) if gradient_checkpointing else self.view
        self.route = RouteDiffusionModel(source, target)
        comfy.patcher_extension.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
            _WRAPPER_KEY,
            self.route,
            self.patcher.model_options,
            is_model_options=True,
        )

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """The view's own weights (full fine-tuning); adapters' parameters are their owners'."""
        return list(self.view.own_parameters)

    def load(self, *others: Any) -> None:
        """Load the model (and ``others``, e.g. the CLIP's patcher) for training."""
        devices.load([self.patcher, *others], self.memory_required)

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.sampling.sigma(timesteps.to(self.sampling.log_sigmas.device)).to(self.device, torch.float32)

    def noisy(self, latent: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.sampling.noise_scaling(sigma, noise, latent)

    def adm(self, pooled: torch.Tensor | None, height: int, width: int) -> torch.Tensor | None:
        """The class/size vector (SDXL's `y`) for latents of this pixel size, or None."""
        if pooled is None:
            return None
        return self.patcher.model.encode_adm(
            pooled_output=pooled,
            width=width,
            height=height,
            target_width=width,
            target_height=height,
            crop_w=0,
            crop_h=0,
            device=self.device,
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype in (torch.float16, torch.bfloat16) and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The denoised estimate (ComfyUI's ``apply_model``), computed by the training view."""
        height, width = x.shape[-2] * 8, x.shape[-1] * 8
        extra: dict[str, Any] = {}
        adm = self.adm(pooled, height, width)
        if adm is not None:
            extra["y"] = adm.to(self.device)
        calls = self.route.calls
        with self.autocast():
            out = self.patcher.model.apply_model(
                x.to(self.device),
                sigma.to(self.device),
                c_crossattn=cond.to(self.device),
                transformer_options=self.patcher.model_options.get("transformer_options", {}),
                **extra,
            )
        if self.route.calls == calls:
            raise RuntimeError(
                f"this {self.family} diffusion model does not run through ComfyUI's diffusion-model wrappers, so it cannot be trained here"
            )
        return out

    def latents_from_pixels(self, vae: Any, pixels: torch.Tensor) -> torch.Tensor:
        """VAE-encode [B,H,W,3] pixels into the model's latent space (scaled)."""
        return self.scaled_latents(vae.encode(pixels[..., :3]))

    def scaled_latents(self, raw: torch.Tensor) -> torch.Tensor:
        """LATENT samples in the model's training space (what ``latents_from_pixels`` gives)."""
        return self.patcher.model.process_latent_in(raw.to(torch.float32)).to(torch.float32)

    def diffs(self) -> dict[str, torch.Tensor]:
        """Full fine-tuning: trained minus starting weights, per changed weight, as ComfyUI "diff" patches take them.

        The model is loaded first, so the starting weights are its effective ones (patches applied).
        """
        self.load()
        return weight_diffs(self.view, self.patcher.model.diffusion_model, "diffusion_model.", self.device, self.patcher.offload_device)


def weight_diffs(
    view: torch.nn.Module, source: torch.nn.Module, prefix: str, device: torch.device, offload_device: torch.device
) -> dict[str, torch.Tensor]:
    """{prefix + name: trained − starting weight} for the view's changed own weights, in the stored dtype."""
    out = {}
    starts: dict[str, dict[str, torch.Tensor | None]] = {}
    with torch.no_grad():
        for name, trained in view.named_parameters():
            module_name, _, attr = name.rpartition(".")
            module = view.get_submodule(module_name) if module_name else view
            stored = source.get_parameter(name)
            if isinstance(module, TrainingLayer):
                if module_name not in starts:
                    starts[module_name] = dict(zip(("weight", "bias"), layers.cast(module.source, torch.float32, device), strict=False))
                start = starts[module_name][attr]
            else:
                start = stored.to(device, torch.float32)
            diff = trained.detach().to(device, torch.float32) - start
            if bool(diff.any()):
                dtype = stored.dtype if stored.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
                out[prefix + name] = diff.to(offload_device, dtype)
    return out


# --------------------------------------------------------------------------- which weights a LoRA adapts

_UNET_LORA_PATTERNS = {
    "attention": (r"\.attn\d\.(to_q|to_k|to_v|to_out\.0)$",),
    "attention+mlp": (r"\.attn\d\.(to_q|to_k|to_v|to_out\.0)$", r"\.ff\.net\.(0\.proj|2)$", r"\.(proj_in|proj_out)$"),
    "all": (r".",),
}
LORA_TARGET_CHOICES = tuple(_UNET_LORA_PATTERNS)


def _adaptable(module: torch.nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if (
            layers.is_cast_layer(sub)
            and weight is not None
            and isinstance(sub, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
            and getattr(sub, "groups", 1) == 1
        ):
            shapes[f"{prefix}{name}.weight"] = tuple(weight.shape)
    return shapes


def unet_lora_weights(model: Any, targets: str) -> dict[str, tuple[int, ...]]:
    """Diffusion-model weights a LoRA of ``targets`` adapts: {"diffusion_model.X.weight": shape}."""
    if targets not in _UNET_LORA_PATTERNS:
        raise ValueError(f"unknown LoRA targets '{targets}': use one of {', '.join(LORA_TARGET_CHOICES)}")
    patterns = [re.compile(p) for p in _UNET_LORA_PATTERNS[targets]]
    adaptable = _adaptable(model.model.diffusion_model, "diffusion_model.")
    chosen = {key: shape for key, shape in adaptable.items() if any(p.search(key[: -len(".weight")]) for p in patterns)}
    if not chosen:
        raise ValueError(
            f"no '{targets}' layers found in this {model_family(model)} diffusion model (the names follow SD's UNet); "
            "use LoRA targets 'all'"
        )
    return chosen


# --------------------------------------------------------------------------- identity


def _tensors_in(value: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 4 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _tensors_in(value[key], depth + 1)
    elif depth < 4 and hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module):
        yield from _tensors_in(vars(value), depth + 1)


def _digest_tensor(digest: Any, tensor: torch.Tensor, limit: int = 1 << 20) -> None:
    digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
    digest.update(tensor.detach().reshape(-1)[:limit].to("cpu", torch.float32).contiguous().numpy().tobytes())


def weights_identity(root: torch.nn.Module, patches: Mapping[str, Any] | None = None, samples: int = 16) -> str:
    """A hash of what ``root`` computes with: a sample of its cast layers' effective weights and
    the patches its patcher carries (nothing is loaded onto the device for it)."""
    digest = hashlib.sha256()
    cast_layers = [(name, m) for name, m in root.named_modules() if layers.is_cast_layer(m) and getattr(m, "weight", None) is not None]
    if not cast_layers:
        raise ValueError(f"this {type(root).__name__} has no weights")
    count = min(samples, len(cast_layers))
    picks = sorted({round(i * (len(cast_layers) - 1) / max(count - 1, 1)) for i in range(count)})
    for index in picks:
        name, module = cast_layers[index]
        weight, _ = layers.cast(module, torch.float32, torch.device("cpu"))
        digest.update(name.encode())
        _digest_tensor(digest, weight)
    for key in sorted(patches or {}):
        digest.update(str(key).encode())
        for patch in patches[key]:
            digest.update(str([p for p in patch if isinstance(p, (int, float, str))]).encode())
            for tensor in _tensors_in(patch):
                _digest_tensor(digest, tensor, 1 << 12)
    return digest.hexdigest()


def model_identity(model: Any, samples: int = 16) -> str:
    """A hash of what the diffusion model computes with: family, sampling, a sample of its
    layers' effective weights and the patches it carries (a LoRA applied before training gets
    its own class images). Nothing is loaded onto the device for it."""
    digest = hashlib.sha256(model_family(model).encode())
    digest.update(type(model.get_model_object("model_sampling")).__name__.encode())
    digest.update(weights_identity(model.model.diffusion_model, getattr(model, "patches", {}), samples).encode())
    return digest.hexdigest()
