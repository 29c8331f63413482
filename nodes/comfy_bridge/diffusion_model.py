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
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import torch

from .. import families
from ..core.adapters import LoraPair
from ..core.training_layers import TrainingLayer, checkpointed_view, saved_activation_copies, training_view
from ..core.training_math import SigmaSampler, flux_resolution_mu
from ..families import Family
from . import devices, internals, layers

_WRAPPER_KEY = "personalize.training"


def family_of(model: Any) -> Family:
    """The model's family (``families``), from its ComfyUI config class and that class's bases."""
    return families.family_for([cls.__name__ for cls in type(model.model.model_config).__mro__])


def model_family(model: Any) -> str:
    """The family's name, as every file the pack writes calls it (``base_model``)."""
    return family_of(model).name


def _sampling(model: Any) -> Any:
    return model.get_model_object("model_sampling")


def prediction_type(model: Any) -> str:
    """What the model predicts, from its sampling as patched: 'eps', 'v', 'flow' or 'x0'.

    Any other parameterisation is refused with its name; so are models of no known family.
    """
    family = family_of(model)
    sampling = _sampling(model)
    ms = comfy.model_sampling
    kinds = [(getattr(ms, "IMG_TO_IMG", None), None), (getattr(ms, "IMG_TO_IMG_FLOW", None), None), (getattr(ms, "X0", None), "x0")]
    kinds += [(ms.EDM, "v"), (ms.V_PREDICTION, "v"), (ms.CONST, "flow"), (ms.EPS, "eps")]
    for cls, kind in kinds:
        if cls is not None and isinstance(sampling, cls):
            if kind is not None:
                return kind
            break
    raise ValueError(
        f"this {family.name} model uses {type(sampling).__name__} sampling; training here supports eps-, v-, x0- and flow-prediction models"
    )


def sigma_data(model: Any) -> float:
    return float(getattr(_sampling(model), "sigma_data", 1.0))


def sampling_patched(model: Any) -> bool:
    """Whether a node replaced the model's sampling (a shift node, ModelSamplingContinuousEDM/V, ...)."""
    return _sampling(model) is not model.model.model_sampling


def _discrete_schedule(sampling: Any) -> bool:
    discrete = comfy.model_sampling.ModelSamplingDiscrete
    return isinstance(sampling, discrete) and type(sampling).sigma is discrete.sigma


def schedule_table(model: Any, count: int = 1000) -> torch.Tensor:
    """The model's sigma schedule as sampled (patched sampling included), high noise to low."""
    sampling = _sampling(model)
    return torch.tensor([float(sampling.percent_to_sigma((i + 1) / (count + 1))) for i in range(count)], dtype=torch.float64)


NOISE_LEVEL_CHOICES = ("auto", "uniform", "logit-normal", "shift")


def noise_level_sampler(
    model: Any, choice: str, resolution: int, sigma_range: tuple[float, float] = (0.0, 1.0)
) -> tuple[SigmaSampler, str]:
    """How training draws noise levels for ``model``, and a sentence saying so.

    'auto' is the family's usual (SD: uniform timesteps; Flux and Chroma: kohya's flux_shift with μ
    from the resolution; SD3: logit-normal), but the model's own schedule when a node patched its
    sampling; 'shift' is uniform through the model's own (shifted) schedule, as ComfyUI samples;
    'uniform' and 'logit-normal' draw flow sigmas directly.
    """
    family = family_of(model)
    sampling = _sampling(model)
    flow = prediction_type(model) == "flow"
    if choice not in NOISE_LEVEL_CHOICES:
        raise ValueError(f"unknown noise-level sampling '{choice}': use one of {', '.join(NOISE_LEVEL_CHOICES)}")
    lo, hi = sigma_range
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"the sigma range must satisfy 0 <= min < max <= 1 (got {lo:g}, {hi:g})")
    if (lo, hi) != (0.0, 1.0) and not flow:
        raise ValueError(f"a sigma range is for flow-matching models; this {family.name} model trains on its own schedule: set 0 to 1")
    if choice in ("uniform", "logit-normal") and not flow:
        raise ValueError(f"'{choice}' noise levels are for flow-matching models; {family.name} trains on its own schedule: use auto")
    rng = f", sigmas in [{lo:g}, {hi:g}]" if (lo, hi) != (0.0, 1.0) else ""
    if _discrete_schedule(sampling) and choice in ("auto", "shift"):
        return SigmaSampler("timesteps"), "noise levels: uniform timesteps of the model's schedule"
    if choice == "auto" and not sampling_patched(model) and family.noise_levels == "flux-shift":
        tokens = (resolution // 16) ** 2
        mu = flux_resolution_mu(tokens)
        return (
            SigmaSampler("flux-shift", shift=math.exp(mu), sigma_range=sigma_range),
            f"noise levels: logit-normal, shifted by μ = {mu:.2f} for {resolution}px (kohya's flux_shift){rng}",
        )
    if (choice == "auto" and not sampling_patched(model) and family.noise_levels == "logit-normal") or choice == "logit-normal":
        return SigmaSampler("logit-normal", sigma_range=sigma_range), f"noise levels: logit-normal (SD3's){rng}"
    if choice == "uniform":
        return SigmaSampler("uniform", sigma_range=sigma_range), f"noise levels: uniform{rng}"
    patched = " as patched" if sampling_patched(model) else ""
    return (
        SigmaSampler("schedule", table=schedule_table(model), sigma_range=sigma_range),
        f"noise levels: uniform through the model's own {type(sampling).__name__} schedule{patched}{rng}",
    )


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """ComfyUI's process-wide training flag, set only while training computes.

    From v0.28 ComfyUI's RoPE (Flux, Qwen-Image, Lumina 2) is a comfy_kitchen op without a
    backward unless ``model_management.in_training`` is set; ComfyUI's own trainer sets it around
    its loop the same way. Versions without the flag need nothing.
    """
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = previous


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


class SwapDiffusionModel:
    """For models whose forward runs no DIFFUSION_MODEL wrappers (SD3's MMDiT): the training view
    stands in the model's ``diffusion_model`` slot only for the length of one call of ComfyUI's
    ``apply_model`` (a training step's, or the sampler's through this clone's
    ``model_function_wrapper``), and the shared module is back in place when it returns."""

    def __init__(self, base_model: torch.nn.Module, source: torch.nn.Module, target: torch.nn.Module, inner: Any = None):
        self.base_model = base_model
        self.source = source
        self.target = target
        self.inner = inner  # a model_function_wrapper the input MODEL already had: still applied
        self.calls = 0

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        if self.base_model._modules.get("diffusion_model") is not self.source:
            raise RuntimeError("the diffusion model is not the one this trainer prepared for")
        self.base_model._modules["diffusion_model"] = self.target
        self.calls += 1
        try:
            yield
        finally:
            self.base_model._modules["diffusion_model"] = self.source

    def __call__(self, apply_model: Any, args: dict) -> Any:
        with self.swapped():
            if self.inner is not None:
                return self.inner(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])

    def __deepcopy__(self, memo: dict) -> SwapDiffusionModel:
        return self


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
        noise_levels: SigmaSampler | None = None,
        guidance: float | None = None,
        prediction: str | None = None,
    ):
        internals.require()
        self.family = family_of(model)
        self.prediction = prediction or prediction_type(model)
        self.sigma_data = sigma_data(model)
        self.noise_levels = noise_levels or SigmaSampler("timesteps")
        self.guidance = self.family.training_guidance if guidance is None else guidance
        self.compute_dtype = compute_dtype
        self.memory_required = memory_required
        self.patcher = model.clone()
        self.device = self.patcher.load_device
        if self.device.type == "cpu":
            # ComfyUI's CPU default is sub-quadratic attention: about twice as slow for training.
            options = self.patcher.model_options.setdefault("transformer_options", {})
            options["optimized_attention_override"] = _attention_pytorch
        self.sampling = self.patcher.get_model_object("model_sampling")
        # SDXL, Flux and SD3 read the pooled text embedding (their `y`); SD1/SD2 do not.
        self.needs_pooled = self.family.pooled_text
        if own_dtype is not None:
            self.load()
        source = self.patcher.model.diffusion_model
        self.source = source
        prefix = "diffusion_model."
        by_path = {key[len(prefix) : -len(".weight")]: pair for key, pair in (adapters or {}).items()}
        self.view = training_view(
            source,
            layers.borrow,
            compute_dtype,
            is_layer=layers.is_cast_layer,
            adapters=by_path,
            own_dtype=own_dtype,
            device=self.device,
            release=layers.release,
        )
        target = checkpointed_view(self.view) if gradient_checkpointing else self.view
        self.route: RouteDiffusionModel | SwapDiffusionModel
        if self.family.diffusion_model_wrappers:
            self.route = RouteDiffusionModel(source, target)
            comfy.patcher_extension.add_wrapper_with_key(
                comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                _WRAPPER_KEY,
                self.route,
                self.patcher.model_options,
                is_model_options=True,
            )
        else:
            self.route = SwapDiffusionModel(self.patcher.model, source, target, self.patcher.model_options.get("model_function_wrapper"))
            self.patcher.set_model_unet_function_wrapper(self.route)

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """The view's own weights (full fine-tuning); adapters' parameters are their owners'."""
        return list(self.view.own_parameters)

    def load(self, *others: Any) -> None:
        """Load the model (and ``others``, e.g. the CLIP's patcher) for training."""
        devices.load([self.patcher, *others], self.memory_required)

    def sigmas(self, levels: torch.Tensor) -> torch.Tensor:
        """Sigmas of a batch's noise levels: integer timesteps through the model's schedule, or sigmas already."""
        if self.noise_levels.discrete:
            return self.sampling.sigma(levels.to(self.sampling.log_sigmas.device)).to(self.device, torch.float32)
        return levels.to(self.device, torch.float32)

    def noisy(self, latent: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.sampling.noise_scaling(sigma, noise, latent)

    def conditioning(self, x: torch.Tensor, cond: torch.Tensor, pooled: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``apply_model``'s conditioning kwargs, built by the model's own ``extra_conds`` as the sampler
        builds them (SDXL's size vector, Flux's `y` and `guidance`, SD3's pooled `y`), never by hand."""
        height, width = x.shape[-2] * 8, x.shape[-1] * 8
        params: dict[str, Any] = {
            "cross_attn": cond,
            "device": self.device,
            "noise": x,
            "width": width,
            "height": height,
            "target_width": width,
            "target_height": height,
            "crop_w": 0,
            "crop_h": 0,
            "prompt_type": "positive",
            "pooled_output": pooled,  # as CLIP Text Encode's conditioning carries it, None included
        }
        if self.guidance is not None:
            params["guidance"] = self.guidance
        count = x.shape[0]
        out = {}
        for name, value in self.patcher.model.extra_conds(**params).items():
            processed = value.process_cond(batch_size=count, device=self.device, area=None).cond
            out[name] = processed.to(self.device) if isinstance(processed, torch.Tensor) else processed
        return out

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype in (torch.float16, torch.bfloat16) and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The denoised estimate (ComfyUI's ``apply_model``), computed by the training view."""
        x = x.to(self.device)
        conds = self.conditioning(x, cond.to(self.device), None if pooled is None else pooled.to(self.device))
        calls = self.route.calls
        copies = saved_activation_copies() if self.family.activation_copies else contextlib.nullcontext()
        swap = self.route.swapped() if isinstance(self.route, SwapDiffusionModel) else contextlib.nullcontext()
        with self.autocast(), copies, swap, self._inputs_in_compute_dtype():
            out = self.patcher.model.apply_model(
                x, sigma.to(self.device), transformer_options=self.patcher.model_options.get("transformer_options", {}), **conds
            )
        if self.route.calls == calls:
            raise RuntimeError(
                f"this {self.family.name} diffusion model does not run through ComfyUI's diffusion-model wrappers, so it cannot be trained here"
            )
        return out

    @contextlib.contextmanager
    def _inputs_in_compute_dtype(self) -> Iterator[None]:
        """ComfyUI's ``apply_model`` casts its inputs (latent, conditioning) to the dtype the model
        infers in; training in another (float32 over a float16 checkpoint on a GPU) must get them
        in its own, or a Textual Inversion gradient underflows at the model's input (seen on CUDA).
        The model's ``manual_cast_dtype`` says which, for the length of this call only."""
        base = self.patcher.model
        previous = getattr(base, "manual_cast_dtype", None)
        inference = previous or base.get_dtype()
        if inference == self.compute_dtype:
            yield
            return
        base.manual_cast_dtype = self.compute_dtype
        try:
            yield
        finally:
            base.manual_cast_dtype = previous

    def latents_from_pixels(self, vae: Any, pixels: torch.Tensor) -> torch.Tensor:
        """VAE-encode [B,H,W,3] pixels into the model's latent space (scaled)."""
        return self.scaled_latents(vae.encode(pixels[..., :3]))

    def scaled_latents(self, raw: torch.Tensor) -> torch.Tensor:
        """LATENT samples in the model's training space (what ``latents_from_pixels`` gives)."""
        # The patcher's latent format: a node may have patched it (ModelSamplingContinuousEDM's playground v2.5).
        latent_format = self.patcher.get_model_object("latent_format")
        return latent_format.process_in(raw.to(torch.float32)).to(torch.float32)

    def diffs(self) -> dict[str, torch.Tensor]:
        """Full fine-tuning: trained minus starting weights, per changed weight, as ComfyUI "diff" patches take them.

        The model is loaded first, so the starting weights are its effective ones (patches applied).
        """
        self.load()
        return weight_diffs(self.view, self.source, "diffusion_model.", self.device, self.patcher.offload_device)


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

LORA_TARGET_CHOICES = ("attention", "attention+mlp", "all")


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
    """Diffusion-model weights a LoRA of ``targets`` adapts (the family's preset): {"diffusion_model.X.weight": shape}."""
    family = family_of(model)
    if targets not in family.lora_targets:
        raise ValueError(f"unknown LoRA targets '{targets}': use one of {', '.join(family.lora_targets)}")
    patterns = [re.compile(p) for p in family.lora_targets[targets]]
    prefix = "diffusion_model."
    adaptable = _adaptable(model.model.diffusion_model, prefix)
    chosen = {key: shape for key, shape in adaptable.items() if any(p.search(key[len(prefix) : -len(".weight")]) for p in patterns)}
    if not chosen:
        raise ValueError(f"no '{targets}' layers found in this {family.name} diffusion model; use LoRA targets 'all'")
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
