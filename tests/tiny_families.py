"""Seeded, randomly initialised flow-matching models (Flux.1, Chroma, SD3, SD3.5) for the tests.

The real models are 8-12B parameters plus a 4.7B T5-XXL, yet the nodes must be exercised on
what ComfyUI's *own* loaders make of such files: the detected ``model_config`` class, its
``model_sampling``, latent format, ``extra_conds`` and the family's text-encoder wrapper.  So,
like ``tiny_models`` for SD, this module writes small files built from ComfyUI's own module
classes and loads them exactly as the nodes do:

* the diffusion model as a ``.safetensors`` state dict loaded by ``comfy.sd.load_diffusion_model``
  ("Load Diffusion Model"), inside ``torch.inference_mode()`` as ComfyUI's executor runs nodes;
* the text encoders as the separate files DualCLIPLoader / CLIPLoader / TripleCLIPLoader take,
  loaded by ``comfy.sd.load_clip`` with the family's ``CLIPType``;
* a 16-channel VAE loaded by ``comfy.sd.VAE(sd=...)`` (VAELoader).

Where ComfyUI hard-codes the real sizes, the smallest honest route is taken and kept to the load:

* Detection of Flux/Chroma hard-codes hidden size, heads and context width (v0.3.64) and Chroma's
  guidance-approximator widths (both versions).  :func:`tiny_detection` wraps
  ``comfy.model_detection.detect_unet_config`` for the load only and restores exactly those
  keys (:attr:`FamilySpec.restorable`), for our state dicts only; any *other* difference raises,
  so detection still decides the class and every dimension it reads from the weights.
* Text-encoder sizes come from JSON configs, which ComfyUI's ``SDClipModel`` overlays with
  ``model_options["<name>_model_config"]``; the tiny sizes are passed that way to
  ``comfy.sd.load_clip`` (and kept in v0.28's ``cached_patcher_init``, so reloads match).  For
  CLIP files ``long_clipl.model_options_long_clip`` overwrites ``clip_l_model_config`` and
  ``clip_g_model_config`` with the *generic* ``model_options["model_config"]``, so one config
  applies to every CLIP of a load: SD3's CLIP-L and CLIP-G are both 128 wide (each keeps its
  own depth, 12 and 32 layers, from its JSON), Flux's CLIP-L gets none (full size).
* A single tiny T5 file is detected as ``T5_BASE`` (T5-XXL detection keys on block 24's FF
  weight: its width 4096 in v0.3.64, its 10240 FF in v0.28), so Chroma's one-file CLIPLoader path
  also wraps ``comfy.sd.detect_te_model`` for the load, reporting ``T5_XXL`` for our tiny T5 only.
  The two- and three-file loaders (Flux, SD3) route by key and need no wrapper.

Interface widths are the real ones wherever the text-encoder side produces them cheaply: Flux's
``y`` is the full-size CLIP-L's 768-wide pooled output (``tiny_models``' builder); SD3's context
is 4096 wide (``SD3ClipModel`` pads CLIP-L/G features to 4096 and appends the T5 tokens, so its T5
must be 4096 wide: one layer, but the 32128x4096 embedding table is real size), while its ``y``
(CLIP-L + CLIP-G pooled, 768 + 1280 in the real model) is 128 + 128 = 256, as its narrow CLIPs
produce it (CLIP-G must keep 32 layers: detection and SD3's key routing look for layer 31, and
at 1280 wide that is 10 s per prompt on a CPU).  Flux and Chroma use a 128-wide, 2-layer T5
(their context width).  The real T5 and CLIP tokenizers (shipped with ComfyUI) are used, and the
embedding keys stay ComfyUI's (``clip_l``, ``clip_g``, ``t5xxl``).

The caller must have put ComfyUI on ``sys.path`` and set ``comfy.cli_args.args`` first (as
``tests/conftest.py`` / ``comfyui_runtime.start`` do); ComfyUI is imported lazily.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import tiny_models
import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    import comfy.model_patcher
    import comfy.sd

# Bump when the initialisation or file layout changes in a way the config digests cannot see.
TINY_FAMILIES_VERSION = "1"

FAMILIES = ("flux-dev", "flux-schnell", "chroma", "sd3", "sd35")

LATENT_CHANNELS = 16
CLIP_L_WIDTH = 768  # CLIP-L hidden/pooled width: Flux's vec_in_dim, the first part of SD3's y
SD3_CONTEXT_WIDTH = 4096  # sd3_clip pads CLIP-L/G features to 4096 and appends T5 tokens
FLUX_T5_WIDTH = 128  # the tiny T5 of Flux and Chroma = their context_in_dim

# Overrides merged by ComfyUI over text_encoders/t5_config_xxl.json (d_kv 64, gated GELU,
# 32 relative-position buckets and the 32128-token vocabulary stay real).
FLUX_T5_CONFIG: dict[str, Any] = {"d_model": FLUX_T5_WIDTH, "num_heads": 2, "d_ff": 256, "num_layers": 2}
SD3_T5_CONFIG: dict[str, Any] = {"d_model": SD3_CONTEXT_WIDTH, "num_heads": 2, "d_ff": 256, "num_layers": 1}
# SD3's CLIPs: merged over sd1_clip_config.json (CLIP-L, 12 layers) and clip_config_bigg.json
# (CLIP-G, 32 layers); vocabulary, 77 positions, activations and depths stay real.
SD3_CLIP_CONFIG: dict[str, Any] = {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2}
SD3_POOLED_WIDTH = 2 * SD3_CLIP_CONFIG["hidden_size"]  # CLIP-L pooled ++ CLIP-G pooled

# The kl-f8 autoencoder ComfyUI's VAE(sd=...) builds for a 16-channel latent (Flux ae /
# SD3 VAE): the config is hard-coded there, only z_channels is read from the weights.
VAE16_DDCONFIG: dict[str, Any] = {**tiny_models.SD_VAE_DDCONFIG, "z_channels": LATENT_CHANNELS}

# Flux.1 / Chroma: hidden 256 = 2 heads of the real 128-dim RoPE head (axes 16+56+56), so
# v0.28's detection (heads = hidden // sum(axes)) reads every size from the weights.
_FLUX_COMMON: dict[str, Any] = {
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "patch_size": 2,
    "context_in_dim": FLUX_T5_WIDTH,
    "hidden_size": 256,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "qkv_bias": True,
    "txt_ids_dims": [],  # v0.28 FluxParams field (dropped where the installed ComfyUI lacks it)
}
_FLUX_RESTORABLE = frozenset({"hidden_size", "num_heads", "context_in_dim"})

# SD3 MMDiT: detection reads everything from shapes (hidden = 64 * depth, heads = depth).
_SD3_DEPTH = 2
_SD3_POS_EMBED_MAX = 16  # 16x16 patches: latents up to 32x32 (256 px images)


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """What a family is built as and must be detected as (see :func:`family_spec`)."""

    name: str
    config_class: str  # comfy.supported_models class ComfyUI must detect
    model_sampling: str  # comfy.model_sampling base class of model_sampling
    clip_type: str  # comfy.sd.CLIPType member the loader node passes
    encoders: tuple[str, ...]  # text-encoder files, in loader order; also the embedding keys
    t5_config: dict[str, Any]
    clip_config: dict[str, Any] | None  # model_options["model_config"]: every CLIP of the load
    context_width: int  # cond [B, T, context_width]
    pooled_width: int | None  # pooled_output width (None: the family has no y)
    dit: dict[str, Any]  # the diffusion model's unet_config as built
    restorable: frozenset[str]  # detection keys that may be hard-coded to real sizes

    @property
    def embedding_widths(self) -> dict[str, int]:
        """Width of a textual-inversion vector per embedding key (= the encoder's token width)."""
        clip_width = CLIP_L_WIDTH if self.clip_config is None else self.clip_config["hidden_size"]
        return {key: self.t5_config["d_model"] if key == "t5xxl" else clip_width for key in self.encoders}

    @property
    def te_model_options(self) -> dict[str, Any]:
        """``model_options`` for ``comfy.sd.load_clip``: the tiny sizes of the encoders."""
        options: dict[str, Any] = {"t5xxl_model_config": dict(self.t5_config)}
        if self.clip_config is not None:
            options["model_config"] = dict(self.clip_config)
        return options


def _params_fields(image_model: str) -> set[str] | None:
    """The constructor fields of the installed Flux/Chroma, so one spec fits every ComfyUI."""
    if image_model == "flux":
        import comfy.ldm.flux.model as module

        return set(module.FluxParams.__annotations__)
    if image_model == "chroma":
        import comfy.ldm.chroma.model as module

        return set(module.ChromaParams.__annotations__)
    return None


def _fit(dit: dict[str, Any]) -> dict[str, Any]:
    fields = _params_fields(dit.get("image_model", ""))
    if fields is None:
        return dit
    return {k: v for k, v in dit.items() if k == "image_model" or k in fields}


def _mmdit_config(self_attn_layers: list[int], qk_norm: str | None) -> dict[str, Any]:
    hidden = 64 * _SD3_DEPTH
    return {
        "in_channels": LATENT_CHANNELS,
        "patch_size": 2,
        "out_channels": LATENT_CHANNELS,
        "depth": _SD3_DEPTH,
        "input_size": None,
        "adm_in_channels": SD3_POOLED_WIDTH,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": SD3_CONTEXT_WIDTH, "out_features": hidden}},
        "num_patches": _SD3_POS_EMBED_MAX**2,
        "pos_embed_max_size": _SD3_POS_EMBED_MAX,
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": self_attn_layers,
        **({"qk_norm": qk_norm} if qk_norm else {}),
    }


def family_spec(name: str) -> FamilySpec:
    """The :class:`FamilySpec` of ``name`` (one of :data:`FAMILIES`) for the installed ComfyUI."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    if name in ("sd3", "sd35"):
        sd35 = name == "sd35"  # SD3.5: RMS qk-norm and x-block self-attention
        return FamilySpec(
            name=name,
            config_class="SD3",
            model_sampling="ModelSamplingDiscreteFlow",
            clip_type="SD3",
            encoders=("clip_l", "clip_g", "t5xxl"),
            t5_config=SD3_T5_CONFIG,
            clip_config=SD3_CLIP_CONFIG,
            context_width=SD3_CONTEXT_WIDTH,
            pooled_width=SD3_POOLED_WIDTH,
            dit=_mmdit_config([0] if sd35 else [], "rms" if sd35 else None),
            restorable=frozenset(),
        )
    if name == "chroma":
        dit = {
            "image_model": "chroma",
            **_FLUX_COMMON,
            # Chroma's img_in takes the 2x2-patchified latent (16 * 4 channels).
            "in_channels": LATENT_CHANNELS * 4,
            "out_channels": LATENT_CHANNELS * 4,
            "vec_in_dim": None,
            # The guidance approximator: in_dim 64 (16+16+32 sinusoidal features) and 5 layers
            # are the real ones; out_dim is the hidden size; hidden_dim 5120 -> 256.
            "in_dim": 64,
            "out_dim": _FLUX_COMMON["hidden_size"],
            "hidden_dim": 256,
            "n_layers": 5,
        }
        return FamilySpec(
            name=name,
            config_class="Chroma",
            model_sampling="ModelSamplingFlux",
            clip_type="CHROMA",
            encoders=("t5xxl",),
            t5_config=FLUX_T5_CONFIG,
            clip_config=None,
            context_width=FLUX_T5_WIDTH,
            pooled_width=None,
            dit=_fit(dit),
            restorable=_FLUX_RESTORABLE | {"out_dim", "hidden_dim"},
        )
    dev = name == "flux-dev"
    return FamilySpec(
        name=name,
        config_class="Flux" if dev else "FluxSchnell",
        model_sampling="ModelSamplingFlux" if dev else "ModelSamplingDiscreteFlow",
        clip_type="FLUX",
        encoders=("clip_l", "t5xxl"),
        t5_config=FLUX_T5_CONFIG,
        clip_config=None,  # full-size CLIP-L: its 768-wide pooled output is Flux's y
        context_width=FLUX_T5_WIDTH,
        pooled_width=CLIP_L_WIDTH,
        dit=_fit({"image_model": "flux", **_FLUX_COMMON, "vec_in_dim": CLIP_L_WIDTH, "guidance_embed": dev}),
        restorable=_FLUX_RESTORABLE,
    )


# --------------------------------------------------------------------------
# Seeded initialisation (tiny_models' rules, plus the norms and buffers of these families)
# --------------------------------------------------------------------------


@torch.no_grad()
def _initialise_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Fill every parameter deterministically; unknown kinds raise (in ``tiny_models``).

    RMS norms (Flux/Chroma QK and approximator norms, SD3.5's ``ln_q``/``ln_k``, T5's layer
    norms) are bare ``scale``/``weight`` vectors in several ComfyUI versions, not
    ``torch.nn`` norms, so they are recognised by their class name and set to 1.
    """
    for module_name, sub in module.named_modules():
        for name, param in sub.named_parameters(recurse=False):
            qualified = f"{module_name}.{name}" if module_name else name
            if param.dim() == 1 and name in ("scale", "weight") and "Norm" in type(sub).__name__:
                param.fill_(1.0)
            else:
                tiny_models._initialise_parameter_(sub, name, param, generator, qualified)


def _fill_sd3_pos_embed_(diffusion_model: torch.nn.Module) -> None:
    """SD3's ``pos_embed`` buffer is saved in its files: the fixed 2-D sin-cos table it holds."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

    buffer = diffusion_model.pos_embed
    table = get_2d_sincos_pos_embed(buffer.shape[-1], _SD3_POS_EMBED_MAX)
    buffer.copy_(torch.from_numpy(table).reshape(buffer.shape).to(buffer.dtype))


# --------------------------------------------------------------------------
# Component builders (state dicts in the layout of the real files)
# --------------------------------------------------------------------------


def _build_dit_state_dict(spec: FamilySpec, seed: int) -> dict[str, torch.Tensor]:
    import comfy.supported_models

    # Deep copy: ComfyUI only shallow-copies the config.  fp32 weights, no manual cast.
    model_config = getattr(comfy.supported_models, spec.config_class)(copy.deepcopy(spec.dit))
    model_config.set_inference_dtype(torch.float32, None)
    dm = model_config.get_model({}, device=torch.device("cpu")).diffusion_model
    _initialise_(dm, tiny_models._generator(seed, f"dit-{spec.name}"))
    if spec.config_class == "SD3":
        _fill_sd3_pos_embed_(dm)
    tiny_models._assert_finite(dm.named_buffers(), what=f"{spec.name} buffers")
    sd = dict(dm.state_dict())
    if spec.dit.get("image_model") in ("flux", "chroma"):
        # BFL's files (and ComfyUI v0.3.64's modules) name RMSNorm gains ``scale``; v0.28 builds
        # torch RMSNorms (``weight``) and converts ``scale`` on load.  Write the real layout so a
        # file loads on every ComfyUI.
        norms = {n for n, m in dm.named_modules() if "RMSNorm" in type(m).__name__}
        sd = {(k[: -len("weight")] + "scale" if k.rsplit(".", 1)[0] in norms and k.endswith(".weight") else k): v for k, v in sd.items()}
    return sd


def _build_t5_state_dict(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    import comfy.text_encoders.sd3_clip

    # The class ComfyUI instantiates for "t5xxl", with the same model_options as at load.
    t5 = comfy.text_encoders.sd3_clip.T5XXLModel(device="cpu", dtype=torch.float32, model_options={"t5xxl_model_config": dict(config)})
    _initialise_(t5, tiny_models._generator(seed, f"t5xxl-d{config['d_model']}"))
    return dict(t5.transformer.state_dict())


def _build_clip_state_dict(key: str, config: dict[str, Any] | None, seed: int) -> dict[str, torch.Tensor]:
    """CLIP-L or CLIP-G as its loader builds it, in the HF ``text_model.*`` layout of the files."""
    import comfy.sd1_clip
    import comfy.sdxl_clip

    if key == "clip_l" and config is None:
        # tiny_models' full-size CLIP-L: the same weights as its SD1.5 / SDXL files for this seed.
        return dict(tiny_models._build_clip_l(seed).transformer.state_dict())
    options = {f"{key}_model_config": dict(config or {})}
    if key == "clip_l":
        clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32, model_options=options)
    else:
        clip = comfy.sdxl_clip.SDXLClipG(device="cpu", dtype=torch.float32, model_options=options)
    _initialise_(clip, tiny_models._generator(seed, f"{key}-w{clip.transformer.text_projection.weight.shape[0]}"))
    return dict(clip.transformer.state_dict())


def _build_vae_state_dict(seed: int) -> dict[str, torch.Tensor]:
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    # What VAE(sd=...) builds for a 16-channel kl-f8 file without quant convs (Flux's ae).
    vae = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": dict(VAE16_DDCONFIG)},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": dict(VAE16_DDCONFIG)},
    )
    _initialise_(vae, tiny_models._generator(seed, "vae16"))
    return dict(vae.state_dict())


# --------------------------------------------------------------------------
# Detection wrappers (for the load only)
# --------------------------------------------------------------------------


def _is_our_dit(spec: FamilySpec, sd: dict[str, torch.Tensor], prefix: str) -> bool:
    """Whether ``sd`` is this family's tiny diffusion model (the wrapper leaves others alone)."""
    if spec.config_class == "SD3":
        weight, shape = sd.get(f"{prefix}context_embedder.weight"), (64 * spec.dit["depth"], spec.context_width)
    else:
        weight, shape = sd.get(f"{prefix}txt_in.weight"), (spec.dit["hidden_size"], spec.dit["context_in_dim"])
    return weight is not None and tuple(weight.shape) == shape


def _is_our_t5(spec: FamilySpec, sd: dict[str, torch.Tensor]) -> bool:
    shared = sd.get("shared.weight")
    return (
        shared is not None
        and shared.shape[-1] == spec.t5_config["d_model"]
        and f"encoder.block.{spec.t5_config['num_layers'] - 1}.layer.1.DenseReluDense.wi_1.weight" in sd
        and f"encoder.block.{spec.t5_config['num_layers']}.layer.0.SelfAttention.q.weight" not in sd
    )


@contextlib.contextmanager
def tiny_detection(name: str) -> Iterator[dict[str, Any]]:
    """Keep the tiny sizes of family ``name`` through ComfyUI's detection, for a load only.

    Wraps ``comfy.model_detection.detect_unet_config``: for *our* diffusion-model state dict it
    restores the keys of :attr:`FamilySpec.restorable` that detection hard-codes to the real
    model's values, and raises if detection disagrees on any other key of the built config.
    For a one-file T5 load (Chroma) it also wraps ``comfy.sd.detect_te_model`` to report
    ``T5_XXL`` for our tiny T5.  Yields a dict filled with what was restored,
    ``{key: (detected, restored)}`` (``"detect_te_model"`` for the T5 rerouting).
    """
    import comfy.model_detection
    import comfy.sd

    spec = family_spec(name)
    restored: dict[str, Any] = {}
    original_unet = comfy.model_detection.detect_unet_config
    original_te = comfy.sd.detect_te_model

    def detect_unet_config(state_dict, key_prefix, *args, **kwargs):
        config = original_unet(state_dict, key_prefix, *args, **kwargs)
        if config is None or not _is_our_dit(spec, state_dict, key_prefix):
            return config
        for key, value in spec.dit.items():
            detected = config.get(key, None)
            if detected == value or (isinstance(value, (list, tuple)) and list(detected or []) == list(value)):
                continue
            if key not in spec.restorable:
                raise RuntimeError(f"{name}: ComfyUI detects {key}={detected!r}, the file was built with {value!r}")
            restored[key] = (detected, copy.deepcopy(value))
            config[key] = copy.deepcopy(value)
        return config

    def detect_te_model(sd):
        detected = original_te(sd)
        if "t5xxl" in spec.encoders and detected != comfy.sd.TEModel.T5_XXL and _is_our_t5(spec, sd):
            restored["detect_te_model"] = (detected.name if detected is not None else None, "T5_XXL")
            return comfy.sd.TEModel.T5_XXL
        return detected

    comfy.model_detection.detect_unet_config = detect_unet_config
    comfy.sd.detect_te_model = detect_te_model
    try:
        yield restored
    finally:
        comfy.model_detection.detect_unet_config = original_unet
        comfy.sd.detect_te_model = original_te


# --------------------------------------------------------------------------
# Files (built once per cache dir, named by a digest of their config)
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FamilyFiles:
    diffusion_model: pathlib.Path
    text_encoders: tuple[pathlib.Path, ...]  # in FamilySpec.encoders order
    vae: pathlib.Path


def _cached(cache_dir: pathlib.Path, component: str, config: Any, seed: int, build: Callable[[], dict[str, torch.Tensor]]) -> pathlib.Path:
    blob = json.dumps(config, sort_keys=True, default=str).encode("utf-8")
    digest = hashlib.sha256(blob + repr(tiny_models.STORAGE_DTYPE).encode()).hexdigest()[:8]
    path = cache_dir / f"tiny-family-{component}-seed{seed}-v{TINY_FAMILIES_VERSION}-{digest}.safetensors"
    if path.is_file():
        return path
    sd = tiny_models._to_storage(build(), what=path.name)
    # Written to a temporary name and renamed: concurrent workers never see half a file.
    return tiny_models._save_atomically(sd, path)


def family_files(name: str, cache_dir: str | pathlib.Path, seed: int = 0) -> FamilyFiles:
    """Build (first time) or reuse the files of family ``name`` under ``cache_dir``.

    The diffusion model's detection is checked before it is written (under
    :func:`tiny_detection`), so a mismatch fails here rather than as a load error in a test.
    """
    import comfy.model_detection

    spec = family_spec(name)
    cache_dir = pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)

    def build_dit() -> dict[str, torch.Tensor]:
        sd = _build_dit_state_dict(spec, seed)
        with tiny_detection(name):
            detected = comfy.model_detection.model_config_from_unet(dict(sd), "")
        if type(detected).__name__ != spec.config_class:
            raise RuntimeError(f"{name}: ComfyUI detects {type(detected).__name__}, expected {spec.config_class}")
        return sd

    dit = _cached(cache_dir, f"dit-{name}", {"family": name, "dit": spec.dit}, seed, build_dit)
    encoders = []
    for key in spec.encoders:
        if key == "t5xxl":
            config, width = spec.t5_config, spec.t5_config["d_model"]
            build = functools.partial(_build_t5_state_dict, spec.t5_config, seed)
        else:
            config, width = spec.clip_config, (spec.clip_config or {}).get("hidden_size", "full")
            build = functools.partial(_build_clip_state_dict, key, spec.clip_config, seed)
        encoders.append(_cached(cache_dir, f"{key}-w{width}", {key: config}, seed, build))
    vae = _cached(cache_dir, "vae16", VAE16_DDCONFIG, seed, lambda: _build_vae_state_dict(seed))
    return FamilyFiles(dit, tuple(encoders), vae)


# --------------------------------------------------------------------------
# Loading as the nodes do
# --------------------------------------------------------------------------


def load_diffusion_model(
    name: str, path: str | pathlib.Path, model_options: dict[str, Any] | None = None, **kwargs: Any
) -> comfy.model_patcher.ModelPatcher:
    """``comfy.sd.load_diffusion_model`` (UNETLoader) under :func:`tiny_detection`.

    On ComfyUI versions whose patchers can reload themselves (``cached_patcher_init``, used by
    ``clone(force_deepcopy=True)``), the reload is pointed back here so it keeps the tiny sizes.
    ``kwargs`` (e.g. ``disable_dynamic``) go to ComfyUI's loader.
    """
    import comfy.sd

    model_options = dict(model_options or {})
    with tiny_detection(name):
        model = comfy.sd.load_diffusion_model(str(path), model_options=model_options, **kwargs)
    if hasattr(model, "cached_patcher_init"):
        model.cached_patcher_init = (load_diffusion_model, (name, str(path), model_options))
    return model


def load_clip(
    name: str,
    paths: Sequence[str | pathlib.Path],
    embedding_directory: str | pathlib.Path | Sequence[str] | None = None,
    model_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> comfy.sd.CLIP:
    """``comfy.sd.load_clip`` as CLIPLoader/DualCLIPLoader/TripleCLIPLoader call it with the
    family's ``CLIPType``, plus the tiny encoder sizes in ``model_options`` (under
    :func:`tiny_detection` for Chroma's one-file T5)."""
    import comfy.sd

    spec = family_spec(name)
    if isinstance(embedding_directory, (str, pathlib.Path)):
        embedding_directory = str(embedding_directory)
    elif embedding_directory is not None:
        embedding_directory = list(embedding_directory)
    options = {**spec.te_model_options, **(model_options or {})}
    str_paths = [str(p) for p in paths]
    clip_type = getattr(comfy.sd.CLIPType, spec.clip_type)
    with tiny_detection(name):
        clip = comfy.sd.load_clip(str_paths, embedding_directory=embedding_directory, clip_type=clip_type, model_options=options, **kwargs)
    patcher = clip.patcher
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (_reload_clip_patcher, (name, str_paths, embedding_directory, options))
    return clip


def _reload_clip_patcher(name: str, paths: list[str], embedding_directory: Any, model_options: dict[str, Any], **kwargs: Any) -> Any:
    return load_clip(name, paths, embedding_directory, model_options, **kwargs).patcher


def load_vae(path: str | pathlib.Path) -> comfy.sd.VAE:
    """VAELoader's core: ``comfy.sd.VAE(sd=...)`` detects the 16-channel kl-f8 autoencoder."""
    import comfy.sd
    import comfy.utils

    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))


def load_family(
    name: str,
    cache_dir: str | pathlib.Path,
    seed: int = 0,
    embedding_directory: str | pathlib.Path | Sequence[str] | None = None,
    check: bool = True,
) -> tuple[comfy.model_patcher.ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE]:
    """``(MODEL, CLIP, VAE)`` of family ``name`` loaded through ComfyUI's own loaders.

    Loaded inside ``torch.inference_mode()`` as ComfyUI's executor runs loader nodes (weights
    are inference tensors, like a real workflow's).  With ``check`` the pieces are verified to
    fit (:func:`check_family`): a few seconds on a 2-core CPU, mostly CLIP-L.
    """
    files = family_files(name, cache_dir, seed)
    with torch.inference_mode():
        model = load_diffusion_model(name, files.diffusion_model)
        clip = load_clip(name, files.text_encoders, embedding_directory)
        vae = load_vae(files.vae)
    if check:
        check_family(name, model, clip, vae, files)
    return model, clip, vae


def check_family(name: str, model: Any, clip: Any, vae: Any, files: FamilyFiles | None = None) -> None:
    """Assert that ComfyUI loaded what family ``name`` must be, and that the pieces fit.

    The detected config class and ``model_sampling`` type; 16 latent channels in model and
    VAE; with ``files``, every weight of the diffusion model and the text encoders equal to the
    file's (nothing left as uninitialised memory by a missing key, no size silently changed);
    the CLIP's conditioning widths; and one step of
    ComfyUI's own sampler on that conditioning (an 8x8 latent, i.e. a 64x64 image).
    """
    import comfy.model_sampling
    import comfy.sample
    import comfy.utils

    spec = family_spec(name)
    detected = type(model.model.model_config).__name__
    if detected != spec.config_class:
        raise AssertionError(f"{name}: loaded as {detected}, expected {spec.config_class}")
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, getattr(comfy.model_sampling, spec.model_sampling)):
        raise AssertionError(f"{name}: model_sampling {type(sampling).__mro__}, expected {spec.model_sampling}")
    if spec.model_sampling == "ModelSamplingDiscreteFlow" and isinstance(sampling, comfy.model_sampling.ModelSamplingFlux):
        raise AssertionError(f"{name}: model_sampling is ModelSamplingFlux")
    if model.model.latent_format.latent_channels != LATENT_CHANNELS or vae.latent_channels != LATENT_CHANNELS:
        raise AssertionError(f"{name}: latent channels {model.model.latent_format.latent_channels} / VAE {vae.latent_channels}")

    if files is not None:
        loaded = [("diffusion model", model.model.diffusion_model, files.diffusion_model)]
        loaded += [
            (key, getattr(clip.cond_stage_model, key).transformer, path)
            for key, path in zip(spec.encoders, files.text_encoders, strict=True)
        ]
        for what, module, path in loaded:
            stored = comfy.utils.load_torch_file(str(path))
            for key, tensor in module.state_dict().items():
                # v0.28 loads BFL's RMSNorm ``scale`` into torch RMSNorm ``weight``.
                source = stored.get(key, stored.get(key[: -len("weight")] + "scale") if key.endswith(".weight") else None)
                if source is None or not torch.equal(source.to(tensor.dtype), tensor):
                    raise AssertionError(f"{name}: the loaded {what}'s {key} is not the file's")

    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a dog"))
        cond, extra = positive[0]
        if cond.shape[-1] != spec.context_width:
            raise AssertionError(f"{name}: conditioning {tuple(cond.shape)}, expected width {spec.context_width}")
        pooled = extra.get("pooled_output")
        if spec.pooled_width is not None and (pooled is None or pooled.shape[-1] != spec.pooled_width):
            raise AssertionError(f"{name}: pooled {None if pooled is None else tuple(pooled.shape)}, expected width {spec.pooled_width}")
        latent = torch.zeros(1, LATENT_CHANNELS, 8, 8)
        noise = comfy.sample.prepare_noise(latent, 0)
        out = comfy.sample.sample(model, noise, 1, 1.0, "euler", "simple", positive, positive, latent, disable_pbar=True, seed=0)
    if tuple(out.shape) != tuple(latent.shape) or not torch.isfinite(out).all():
        raise AssertionError(f"{name}: one sampler step gave {tuple(out.shape)}, finite={bool(torch.isfinite(out).all())}")
