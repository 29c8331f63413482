"""Seeded, randomly initialised Stable Diffusion models for the test-suite.

Real checkpoints are gigabytes and cannot be downloaded in CI, yet the nodes
under test must be exercised through ComfyUI's real loading paths
(``CheckpointLoaderSimple`` -> ``comfy.sd.load_checkpoint_guess_config``,
``DualCLIPLoader`` -> ``comfy.sd.load_clip``).  This module therefore builds
files that ComfyUI *detects* as the real architectures, with random weights:

* SD1.5 / SD2.x checkpoints whose text encoder and VAE are full size (so that
  tokenisation, embedding widths and latent shapes are the real ones) but
  whose UNet has a single resolution level (detection only looks at widths,
  context dim and the linear/conv projection flag, so ~26M params suffice).
* The two SDXL text encoders (CLIP-L + OpenCLIP-G) at full size, as the
  separate files DualCLIPLoader(type="sdxl") takes.
* An in-memory SDXL-*shaped* diffusion model; the smallest UNet ComfyUI
  detects as SDXL has 2.6B params, so it is built from ComfyUI's classes
  with a reduced config instead of from a file.

Every model is constructed with ComfyUI's own classes and the checkpoints are
laid out by ComfyUI's own ``state_dict_for_saving``, so the key layout tracks
whatever the installed ComfyUI expects.  ComfyUI's ops skip weight
initialisation (weights are ``torch.empty``), so every parameter is filled
from a seeded ``torch.Generator``; an unknown parameter kind raises instead of
being silently left as uninitialised memory.

The caller (``tests/conftest.py``) must have put ComfyUI on ``sys.path`` and
set ``comfy.cli_args.args`` before calling anything here; ComfyUI modules are
imported lazily inside functions so that importing this module is free.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pathlib
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    import comfy.model_patcher
    import comfy.sd

# Bump whenever the initialisation scheme or file layout changes in a way the
# config digest below cannot see, so stale cache files are never reused.
TINY_MODELS_VERSION = "1"

# Everything stored on disk is fp16, like the checkpoints people actually use,
# which also exercises ComfyUI's dtype handling on load.
STORAGE_DTYPE = torch.float16

# std of token / position embeddings, as in CLIP's own initialisation; the
# pre-LayerNorm transformer makes the exact value irrelevant for stability.
EMBEDDING_STD = 0.02

# CLIP initialises its temperature to 1/0.07.
CLIP_LOGIT_SCALE = math.log(1.0 / 0.07)

# The standard LDM "kl-f8" first-stage config (SD1.x, SD2.x and SDXL VAEs all
# use it); ComfyUI's VAE(sd=...) infers exactly this config from the keys.
SD_VAE_DDCONFIG: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
SD_VAE_EMBED_DIM = 4

# Keys common to every LDM-style UNet config; they mirror what
# comfy.model_detection.detect_unet_config reports for such a state dict, so
# the model we build and the model ComfyUI rebuilds on load are identical.
_UNET_COMMON: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

# One resolution level with one res block and one transformer: the output
# side of a level has num_res_blocks + 1 blocks, hence two output depths.
_ONE_LEVEL: dict[str, Any] = {
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
}

SD15_UNET_CONFIG: dict[str, Any] = {
    **_UNET_COMMON,
    **_ONE_LEVEL,
    "model_channels": 320,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
}

# The real SD1.5 UNet (~860M params): four levels of two res blocks, cross-attention
# on the first three, exactly comfy.model_detection's hard-coded "SD15" config (less its
# dtype and num_heads, which comfy.supported_models.SD15.unet_extra_config adds).  Used
# by the benchmarks so memory figures are not dominated by fixed process costs; the
# output side of a level has num_res_blocks + 1 blocks, hence 12 output depths.
SD15_FULL_UNET_CONFIG: dict[str, Any] = {
    **_UNET_COMMON,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
    "model_channels": 320,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
}

SD2_UNET_CONFIG: dict[str, Any] = {
    **_UNET_COMMON,
    **_ONE_LEVEL,
    "model_channels": 320,
    "context_dim": 1024,
    "use_linear_in_transformer": True,
    "adm_in_channels": None,
}

# SDXL's ADM vector is the 1280-wide CLIP-G pooled output plus six 256-wide
# Fourier embeddings of the size/crop conditioning: 1280 + 6 * 256 = 2816.
SDXL_ADM_CHANNELS = 2816
SDXL_CONTEXT_DIM = 2048  # CLIP-L penultimate (768) ++ CLIP-G penultimate (1280)


# The real SDXL UNet (2.6B params), comfy.model_detection's SDXL config less its dtype: for the
# GPU report's SDXL-size figures (built in memory, never by the test-suite).
SDXL_FULL_UNET_CONFIG: dict[str, Any] = {
    **_UNET_COMMON,
    "num_classes": "sequential",
    "adm_in_channels": SDXL_ADM_CHANNELS,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": SDXL_CONTEXT_DIM,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
}


def tiny_sdxl_unet_config(model_channels: int = 320) -> dict[str, Any]:
    """The reduced SDXL UNet config used by :func:`build_tiny_sdxl_model`.

    Exposed so tests can assert on the shape they are running against.
    """
    return {
        **_UNET_COMMON,
        **_ONE_LEVEL,
        "num_classes": "sequential",
        "model_channels": model_channels,
        "context_dim": SDXL_CONTEXT_DIM,
        "use_linear_in_transformer": True,
        "adm_in_channels": SDXL_ADM_CHANNELS,
    }


# --------------------------------------------------------------------------
# Seeded initialisation
# --------------------------------------------------------------------------


def _generator(seed: int, component: str) -> torch.Generator:
    """A generator per (seed, component).

    Independent streams mean that resizing one component (say the UNet)
    leaves the weights of the others unchanged, and that a CLIP-L built for
    an SD1.5 file equals the CLIP-L built for the SDXL pair with the same seed.
    """
    mixed = (int(seed) * 0x9E3779B1 + zlib.crc32(component.encode("utf-8"))) % (2**63)
    return torch.Generator(device="cpu").manual_seed(mixed)


def _fill_normal_(param: torch.Tensor, std: float, generator: torch.Generator) -> None:
    if param.dtype == torch.float32 and param.device.type == "cpu":
        # In place: no temporary, which matters for the 2.8 GB CLIP-G.
        param.normal_(0.0, std, generator=generator)
    else:
        # Sample in fp32 on the CPU anyway so the values do not depend on the
        # device or dtype the module happened to be created with.
        sample = torch.randn(tuple(param.shape), generator=generator, dtype=torch.float32)
        param.copy_(sample.mul_(std))


def _initialise_parameter_(module: torch.nn.Module, name: str, param: torch.Tensor, generator: torch.Generator, qualified: str) -> None:
    # ComfyUI's ops subclass the torch.nn classes, so isinstance sees through them.
    if isinstance(module, torch.nn.Embedding) and name == "weight":
        _fill_normal_(param, EMBEDDING_STD, generator)
        return
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and name in ("weight", "bias"):
        param.fill_(1.0 if name == "weight" else 0.0)
        return
    if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
        if name == "weight":
            # N(0, 1/fan_in) keeps every layer's output at the scale of its
            # input, so deep stacks (32-layer CLIP-G, the VAE) stay O(1)-ish.
            fan_in = param[0].numel()
            _fill_normal_(param, 1.0 / math.sqrt(fan_in), generator)
            return
        if name == "bias":
            param.zero_()
            return
    if name == "logit_scale" and param.dim() == 0:
        param.fill_(CLIP_LOGIT_SCALE)
        return
    raise TypeError(
        f"tiny_models does not know how to initialise {qualified} "
        f"({type(module).__name__}, shape {tuple(param.shape)}); ComfyUI would "
        "leave it as uninitialised memory, so add a rule for it"
    )


@torch.no_grad()
def _initialise_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Overwrite every parameter of ``module`` in place, deterministically.

    named_modules() order is registration order, hence stable across runs.
    Parameters need no finiteness check (they come from randn/fill), but
    buffers are computed by ComfyUI (e.g. the sigma schedule), so a future
    ``torch.empty`` buffer would show up here.
    """
    for module_name, sub in module.named_modules():
        for name, param in sub.named_parameters(recurse=False):
            qualified = f"{module_name}.{name}" if module_name else name
            _initialise_parameter_(sub, name, param, generator, qualified)
    _assert_finite(module.named_buffers(), what=f"{type(module).__name__} buffers")


def _is_finite(tensor: torch.Tensor, bound: float = math.inf) -> bool:
    # One aminmax pass is several times faster than isfinite().all() on CPU,
    # and NaN propagates into both results.
    lo, hi = (float(v) for v in torch.aminmax(tensor.detach()))
    return math.isfinite(lo) and math.isfinite(hi) and -bound <= lo and hi <= bound


def _assert_finite(items: Iterable[tuple[str, torch.Tensor]], what: str, bound: float = math.inf) -> None:
    for key, tensor in items:
        if tensor.is_floating_point() and tensor.numel() > 0 and not _is_finite(tensor, bound):
            raise RuntimeError(f"{what}: non-finite (or out of fp16 range) values in {key}")


# --------------------------------------------------------------------------
# Component builders (ComfyUI classes, fp32, seeded)
# --------------------------------------------------------------------------


def _build_base_model(config_cls: type, unet_config: dict[str, Any], seed: int, dtype: torch.dtype = torch.float32) -> Any:
    """Instantiate ``config_cls``'s model_base model in ``dtype`` and seed its UNet."""
    # Deep copy: ComfyUI only shallow-copies the config, and the module-level
    # constants must not be changed by (or change) any model built from them.
    model_config = config_cls(copy.deepcopy(unet_config))
    # Weights in the compute dtype with no manual cast makes ComfyUI pick plain
    # disable_weight_init ops, i.e. the model computes in the dtype we seed in.
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    _initialise_(model.diffusion_model, _generator(seed, "unet"))
    _assert_finite(model.named_buffers(), what="model_base buffers")
    return model


def _build_vae_state_dict(seed: int) -> dict[str, torch.Tensor]:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    vae = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=SD_VAE_EMBED_DIM)
    _initialise_(vae, _generator(seed, "vae"))
    return vae.state_dict()


def _build_clip_l(seed: int) -> torch.nn.Module:
    import comfy.sd1_clip

    # SDClipModel is what SD1ClipModel ("clip_l") and SDXLClipModel.clip_l wrap.
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    _initialise_(clip, _generator(seed, "clip_l"))
    return clip


def _build_clip_g(seed: int) -> torch.nn.Module:
    import comfy.sdxl_clip

    clip = comfy.sdxl_clip.SDXLClipG(device="cpu", dtype=torch.float32)
    _initialise_(clip, _generator(seed, "clip_g"))
    return clip


def _build_clip_h(seed: int) -> torch.nn.Module:
    import comfy.text_encoders.sd2_clip

    clip = comfy.text_encoders.sd2_clip.SD2ClipHModel(device="cpu", dtype=torch.float32)
    _initialise_(clip, _generator(seed, "clip_h"))
    return clip


# --------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------


def _to_storage(sd: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Cast to fp16 one tensor at a time, dropping the fp32 source as we go.

    Range-checking the fp32 source against fp16's max guarantees the stored
    tensor is finite (overflow to inf is what would bite here) at a fraction of
    the cost of scanning the fp16 result.
    """
    limit = torch.finfo(STORAGE_DTYPE).max
    out: dict[str, torch.Tensor] = {}
    for key in list(sd.keys()):
        tensor = sd.pop(key)
        if tensor.is_floating_point():
            _assert_finite([(key, tensor)], what=what, bound=limit)
            tensor = tensor.to(STORAGE_DTYPE)
        out[key] = tensor.contiguous()
    return out


def _save_atomically(sd: dict[str, torch.Tensor], path: pathlib.Path) -> pathlib.Path:
    """Write next to ``path`` and rename, so readers never see a partial file."""
    import comfy.utils

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        comfy.utils.save_torch_file(sd, tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def _assert_detected_as(sd: dict[str, torch.Tensor], expected: type, path: pathlib.Path) -> None:
    """Run ComfyUI's own detection before writing, so a mismatch fails loudly
    here rather than as a confusing 'could not detect model type' in a test."""
    import comfy.model_detection

    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    detected = comfy.model_detection.model_config_from_unet(sd, prefix)
    if type(detected) is not expected:
        raise RuntimeError(f"{path.name}: ComfyUI detects {type(detected).__name__}, expected {expected.__name__}")


def _state_dict_for_saving(model: Any, clip_sd: dict[str, torch.Tensor], vae_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BaseModel.state_dict_for_saving: since ComfyUI v0.2x it takes the UNet's state dict first."""
    import inspect

    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:
        return model.state_dict_for_saving(model.diffusion_model.state_dict(), clip_sd, vae_sd)
    return model.state_dict_for_saving(clip_sd, vae_sd)


def _build_checkpoint(
    path: pathlib.Path,
    config_cls: type,
    unet_config: dict[str, Any],
    clip_builder: Callable[[int], torch.nn.Module],
    clip_prefix: str,
    seed: int,
) -> pathlib.Path:
    path = pathlib.Path(path)
    model = _build_base_model(config_cls, unet_config, seed)
    clip = clip_builder(seed)
    # The SD1ClipModel/SD2ClipModel wrappers only add the "clip_l."/"clip_h."
    # prefix that process_clip_state_dict_for_saving expects; prefixing
    # ourselves avoids instantiating them (and comfy.sd.CLIP's device
    # management) just to get a key layout.
    clip_sd = {f"{clip_prefix}{k}": v for k, v in clip.state_dict().items()}
    vae_sd = _build_vae_state_dict(seed)
    # ComfyUI's own conversion to the original LDM layout: model.diffusion_model.*,
    # cond_stage_model.* (incl. OpenCLIP renaming for SD2), first_stage_model.*
    sd = _state_dict_for_saving(model, clip_sd, vae_sd)
    del model, clip, clip_sd, vae_sd
    sd = _to_storage(sd, what=path.name)
    _assert_detected_as(sd, config_cls, path)
    return _save_atomically(sd, path)


# --------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------


def build_sd15_checkpoint(path: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write an SD1.5-detectable checkpoint (``comfy.supported_models.SD15``).

    One-level UNet (~26M params), full CLIP-L text encoder (123M) and full
    kl-f8 VAE (84M), fp16, original LDM key layout.  Like real SD1.5 files it
    carries no CLIP ``text_projection``/``logit_scale`` (ComfyUI's SD15 saver
    drops them and would mis-route them on load), so the *pooled* output of
    the loaded CLIP comes from ComfyUI's uninitialised projection and must not
    be relied on; SD1.5 never uses it.
    """
    import comfy.supported_models

    return _build_checkpoint(pathlib.Path(path), comfy.supported_models.SD15, SD15_UNET_CONFIG, _build_clip_l, "clip_l.", seed)


def build_sd15_full_checkpoint(path: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Like :func:`build_sd15_checkpoint` but with the full-size SD1.5 UNet
    (:data:`SD15_FULL_UNET_CONFIG`, ~860M params; ~2 GB on disk), for benchmarks.

    The fp32 UNet is ~3.4 GB; :func:`_to_storage` drops each fp32 tensor as it
    casts it, so the build peaks at roughly the fp32 models (~4.5 GB) plus the
    fp16 copies made so far, not at twice the model.
    """
    import comfy.supported_models

    return _build_checkpoint(pathlib.Path(path), comfy.supported_models.SD15, SD15_FULL_UNET_CONFIG, _build_clip_l, "clip_l.", seed)


def build_sd2_checkpoint(path: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write an SD2.x-detectable checkpoint (``comfy.supported_models.SD20``, EPS).

    One-level UNet with linear transformer projections and 64-channel heads,
    full 24-layer OpenCLIP-H text encoder stored as ``cond_stage_model.model.*``
    (ComfyUI's saver performs the HF -> OpenCLIP conversion), full VAE.
    """
    import comfy.supported_models

    return _build_checkpoint(pathlib.Path(path), comfy.supported_models.SD20, SD2_UNET_CONFIG, _build_clip_h, "clip_h.", seed)


SDXL_CLIP_L_FILENAME = "clip_l.safetensors"
SDXL_CLIP_G_FILENAME = "clip_g.safetensors"


def build_sdxl_text_encoders(path_dir: str | pathlib.Path, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """Write full-size SDXL text encoders as ``(clip_l, clip_g)`` safetensors.

    Both are in the HF ``text_model.*`` + ``text_projection.weight`` layout that
    ``comfy.sd.load_clip`` detects per file (CLIP-G by its 31st layer), so the
    pair loads as ``comfy.sdxl_clip.SDXLClipModel``.  The encoders are built
    and saved one after the other to keep peak memory at one model (CLIP-G is
    695M params, 2.8 GB in fp32).
    """
    path_dir = pathlib.Path(path_dir)
    paths = []
    for builder, filename in ((_build_clip_l, SDXL_CLIP_L_FILENAME), (_build_clip_g, SDXL_CLIP_G_FILENAME)):
        clip = builder(seed)
        # load_clip feeds each file to the inner CLIPTextModel, so save that level.
        sd = _to_storage(clip.transformer.state_dict(), what=filename)
        del clip
        paths.append(_save_atomically(sd, path_dir / filename))
        del sd
    return paths[0], paths[1]


def load_sdxl_clip(
    paths: Sequence[str | pathlib.Path],
    embedding_directory: str | pathlib.Path | Sequence[str] | None = None,
    model_options: dict[str, Any] | None = None,
) -> comfy.sd.CLIP:
    """Load the CLIP-L/CLIP-G pair exactly as DualCLIPLoader(type="sdxl") does.

    ``model_options`` is passed through to ``comfy.sd.load_clip`` (e.g.
    ``{"dtype": torch.float32}``); the default mirrors the node, which passes
    none.  Expect ~10 s per encode on a 2-core CPU: CLIP-G is full size.
    """
    import comfy.sd

    if isinstance(embedding_directory, (str, pathlib.Path)):
        embedding_directory = str(embedding_directory)
    # comfy.utils.load_torch_file picks the safetensors reader from a str suffix,
    # so pathlib.Path objects must not reach it.
    return comfy.sd.load_clip(
        [str(p) for p in paths],
        embedding_directory=embedding_directory,
        clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
        model_options=dict(model_options or {}),
    )


def build_tiny_sdxl_model(seed: int = 0, model_channels: int = 320) -> comfy.model_patcher.ModelPatcher:
    """An SDXL-shaped diffusion model (``comfy.model_base.SDXL``) in memory.

    The real SDXL UNet is the only one ComfyUI detects as SDXL and is 2.6B
    params, so this one is not loadable from a file: it is
    ``comfy.supported_models.SDXL`` with a one-level UNet that keeps SDXL's
    interfaces (2048-wide cross-attention context, 2816-wide ADM ``y``, SDXL
    latent format, ``encode_adm``).  ~34M params at ``model_channels=320``.
    Weights are fp32 so CPU tests compute in full precision.  Build it
    outside ``torch.inference_mode()`` if a test is going to train it, since
    parameters created there are inference tensors.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    model = _build_base_model(comfy.supported_models.SDXL, tiny_sdxl_unet_config(model_channels), seed)
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def build_sdxl_model(full: bool, seed: int = 0, dtype: torch.dtype = torch.float16) -> comfy.model_patcher.ModelPatcher:
    """An SDXL diffusion model in memory: the real 2.6B-param UNet (``full``) or the tiny one,
    stored in ``dtype`` (float16, as SDXL checkpoints are)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = SDXL_FULL_UNET_CONFIG if full else tiny_sdxl_unet_config()
    model = _build_base_model(comfy.supported_models.SDXL, config, seed, dtype)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(), offload_device=comfy.model_management.unet_offload_device()
    )


def sdxl_adm(model_patcher: comfy.model_patcher.ModelPatcher, pooled: torch.Tensor, width: int, height: int, **extra: int) -> torch.Tensor:
    """Build SDXL's ``y`` vector [B, 2816] with ComfyUI's ``SDXL.encode_adm``.

    ``width``/``height`` are pixel sizes (what CLIPTextEncodeSDXL passes);
    ``extra`` may carry ``crop_w``, ``crop_h``, ``target_width``,
    ``target_height``, which default to 0 / the image size inside ComfyUI.
    """
    return model_patcher.model.encode_adm(pooled_output=pooled, width=width, height=height, **extra)


# --------------------------------------------------------------------------
# Per-session cache
# --------------------------------------------------------------------------

_KIND_CONFIGS: dict[str, Any] = {
    "sd15": {"unet": SD15_UNET_CONFIG, "vae": SD_VAE_DDCONFIG, "clip": "clip_l"},
    "sd2": {"unet": SD2_UNET_CONFIG, "vae": SD_VAE_DDCONFIG, "clip": "clip_h"},
    "sdxl_te": {"clip": ["clip_l", "clip_g"]},
    # Not tiny: the real SD1.5 UNet, for benchmarks (the test-suite never builds it).
    "sd15-full": {"unet": SD15_FULL_UNET_CONFIG, "vae": SD_VAE_DDCONFIG, "clip": "clip_l"},
}

CACHE_KINDS = tuple(_KIND_CONFIGS)


def _cache_name(kind: str, seed: int) -> str:
    # The digest makes config edits invalidate the cache even if nobody
    # remembers to bump TINY_MODELS_VERSION.
    blob = json.dumps(_KIND_CONFIGS[kind], sort_keys=True, default=str).encode("utf-8")
    digest = hashlib.sha256(blob + repr(STORAGE_DTYPE).encode()).hexdigest()[:8]
    return f"tiny-{kind}-seed{seed}-v{TINY_MODELS_VERSION}-{digest}"


def cached_checkpoint(kind: str, cache_dir: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Build a model file once per cache dir and reuse it afterwards.

    ``kind`` is ``"sd15"``, ``"sd2"`` or ``"sd15-full"`` (the full-size SD1.5
    UNet; returns the ``.safetensors`` file) or
    ``"sdxl_te"`` (returns a directory holding ``clip_l.safetensors`` and
    ``clip_g.safetensors``; see :func:`cached_sdxl_text_encoders`).  Builds go
    to a temporary name and are renamed into place, so an interrupted run or
    a concurrent xdist worker never leaves or sees a half-written result.
    """
    if kind not in _KIND_CONFIGS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {CACHE_KINDS}")
    cache_dir = pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = _cache_name(kind, seed)

    if kind == "sdxl_te":
        final_dir = cache_dir / name
        if (final_dir / SDXL_CLIP_L_FILENAME).is_file() and (final_dir / SDXL_CLIP_G_FILENAME).is_file():
            return final_dir
        tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
        try:
            build_sdxl_text_encoders(tmp_dir, seed=seed)
            try:
                os.rename(tmp_dir, final_dir)
            except OSError:
                # Another worker won the race (or a stale partial dir exists).
                if not ((final_dir / SDXL_CLIP_L_FILENAME).is_file() and (final_dir / SDXL_CLIP_G_FILENAME).is_file()):
                    shutil.rmtree(final_dir, ignore_errors=True)
                    os.rename(tmp_dir, final_dir)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return final_dir

    final = cache_dir / f"{name}.safetensors"
    if final.is_file():
        return final
    builder = {"sd15": build_sd15_checkpoint, "sd2": build_sd2_checkpoint, "sd15-full": build_sd15_full_checkpoint}[kind]
    # The builders already write to a temporary name and os.replace it.
    return builder(final, seed=seed)


def cached_sdxl_text_encoders(cache_dir: str | pathlib.Path, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """Cached ``(clip_l, clip_g)`` paths, ready for :func:`load_sdxl_clip`."""
    directory = cached_checkpoint("sdxl_te", cache_dir, seed=seed)
    return directory / SDXL_CLIP_L_FILENAME, directory / SDXL_CLIP_G_FILENAME
