"""Flux- and SD3.5-shaped diffusion models for the family benchmarks (``families.py``), in ComfyUI's
layout and, converted with ComfyUI's own key maps, in diffusers'.

What a training step costs depends on the widths, heads and token counts, not on how many blocks
are stacked: a block of Flux.1 at its real width (hidden 3072, 24 heads of 128, T5 context 4096,
CLIP vector 768) costs what it costs in the 12B model. So the benchmark models are the real
families cut to a few blocks, with random weights (``tiny_families``' seeded initialisation):

* ``flux``: Flux.1-dev (guidance embedding), ``depth`` double and ``depth_single_blocks`` single
  blocks. ComfyUI's detection reads every size from such a file (its hard-coded sizes are the real
  ones), so it loads through ``comfy.sd.load_diffusion_model`` untouched.
* ``sd35``: SD3.5 Medium's MMDiT-X (hidden 1536 = 64 × depth 24, 24 heads of 64, RMS QK-norm, the
  second self-attention in its first 13 blocks, context 4096, pooled 2048) with ``num_blocks``
  blocks, the last one's context half ``pre_only`` as in the real model. ComfyUI's detection derives
  the depth from the width and builds ``depth`` blocks; it never reads ``num_blocks``, so the load
  runs under :func:`mmdit_blocks_detection`, which adds that one key for this file only.
* ``flux-tiny`` / ``sd35-tiny`` (the benchmark's ``--quick``): ``tiny_families``' own ``flux-dev``
  and ``sd35`` files, loaded by its loader.

Each model is written once per cache directory, next to its diffusers twin (the state dict of
``FluxTransformer2DModel`` / ``SD3Transformer2DModel``, converted by
``comfy.utils.flux_to_diffusers`` / ``mmdit_to_diffusers``, read backwards) and a JSON file
(:class:`Built`) holding both configs, the diffusers modules matching each of the pack's LoRA
presets, and the equivalence check: one forward of both models on the same inputs, which proves
the reference trains the same function (fp32, CPU). The measuring processes then read plain files.

``mmdit_to_diffusers`` assumes ``num_blocks == depth``: it maps the ``pre_only`` context
modulation of block ``depth - 1`` (with its scale and shift swapped). For a cut model the
``pre_only`` block is ``num_blocks - 1``; :func:`diffusers_state_dict` maps that one instead.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
TESTS_DIR = BENCH_DIR.parent
for _path in (str(BENCH_DIR), str(TESTS_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# Bump when the initialisation, the conversion or the file layout changes.
FAMILY_MODELS_VERSION = "1"
LATENT_CHANNELS = 16
# ComfyUI's text sides, as its tokenizers pad a short prompt: Flux's T5 to 256 tokens; SD3's
# CLIP-L/G (77, padded to 4096 wide) followed by its T5 (77).
FLUX_TEXT_TOKENS = 256
SD3_TEXT_TOKENS = 77 + 77
# The latent formats' shift and scale (Flux ae, SD3 VAE), as the diffusers scripts read them from
# the VAE config; ComfyUI's latent_format.process_in applies the same.
LATENT_SHIFT_SCALE = {"flux": (0.1159, 0.3611), "mmdit": (0.0609, 1.5305)}
SD35_MEDIUM_SELF_ATTENTION_BLOCKS = 13
POS_EMBED_MAX = 64  # SD3 position table: 64² patches = latents up to 128² (1024 px); the real one is larger, never computed with


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str  # flux, sd35, flux-tiny, sd35-tiny
    kind: str  # flux / mmdit
    family: str  # tiny_families name: its text encoders (and, for the tiny shapes, its diffusion model)
    tiny: bool
    description: str


SHAPES = {
    "flux": Shape("flux", "flux", "flux-dev", False, "Flux.1-dev widths (hidden 3072, 24 heads, context 4096, vec 768)"),
    "sd35": Shape("sd35", "mmdit", "sd35", False, "SD3.5 Medium widths (hidden 1536, 24 heads, RMS qk-norm, dual attention)"),
    "flux-tiny": Shape("flux-tiny", "flux", "flux-dev", True, "tests' tiny Flux.1-dev (hidden 256, 2 heads, context 128)"),
    "sd35-tiny": Shape("sd35-tiny", "mmdit", "sd35", True, "tests' tiny SD3.5 (hidden 128, 2 heads, context 4096)"),
}
DEFAULT_BLOCKS = {"flux": (1, 1), "sd35": (2,)}


def flux_config(double: int, single: int) -> dict[str, Any]:
    """ComfyUI's unet_config of Flux.1-dev with ``double`` + ``single`` blocks (what detection gives)."""
    import tiny_families

    return tiny_families._fit(
        {
            "image_model": "flux",
            "in_channels": LATENT_CHANNELS,
            "out_channels": LATENT_CHANNELS,
            "vec_in_dim": 768,
            "context_in_dim": 4096,
            "hidden_size": 3072,
            "mlp_ratio": 4.0,
            "num_heads": 24,
            "depth": double,
            "depth_single_blocks": single,
            "axes_dim": [16, 56, 56],
            "theta": 10000,
            "patch_size": 2,
            "qkv_bias": True,
            "guidance_embed": True,
            "txt_ids_dims": [],
        }
    )


def sd35_config(blocks: int) -> dict[str, Any]:
    """ComfyUI's unet_config of SD3.5 Medium cut to ``blocks`` blocks."""
    depth = 24
    return {
        "in_channels": LATENT_CHANNELS,
        "patch_size": 2,
        "out_channels": LATENT_CHANNELS,
        "depth": depth,
        "num_blocks": blocks,
        "input_size": None,
        "adm_in_channels": 2048,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 64 * depth}},
        "num_patches": POS_EMBED_MAX**2,
        "pos_embed_max_size": POS_EMBED_MAX,
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": list(range(min(blocks, SD35_MEDIUM_SELF_ATTENTION_BLOCKS))),
        "qk_norm": "rms",
    }


def comfy_config(shape: Shape, blocks: tuple[int, ...]) -> dict[str, Any]:
    if shape.tiny:
        import tiny_families

        return copy.deepcopy(tiny_families.family_spec(shape.family).dit)
    return flux_config(*blocks) if shape.kind == "flux" else sd35_config(*blocks)


def diffusers_config(shape: Shape, config: dict[str, Any]) -> dict[str, Any]:
    """The diffusers transformer's constructor arguments for ComfyUI's ``config``."""
    if shape.kind == "flux":
        heads = config["num_heads"]
        return {
            "patch_size": 1,
            "in_channels": config["in_channels"] * 4,
            "out_channels": None,
            "num_layers": config["depth"],
            "num_single_layers": config["depth_single_blocks"],
            "attention_head_dim": config["hidden_size"] // heads,
            "num_attention_heads": heads,
            "joint_attention_dim": config["context_in_dim"],
            "pooled_projection_dim": config["vec_in_dim"],
            "guidance_embeds": bool(config.get("guidance_embed", False)),
            "axes_dims_rope": tuple(config["axes_dim"]),
        }
    depth = config["depth"]
    return {
        "sample_size": 128,
        "patch_size": config["patch_size"],
        "in_channels": config["in_channels"],
        "num_layers": config.get("num_blocks", depth),
        "attention_head_dim": 64,
        "num_attention_heads": depth,
        "joint_attention_dim": config["context_embedder_config"]["params"]["in_features"],
        "caption_projection_dim": 64 * depth,
        "pooled_projection_dim": config["adm_in_channels"],
        "out_channels": config["out_channels"],
        "pos_embed_max_size": config["pos_embed_max_size"],
        "dual_attention_layers": tuple(config.get("x_block_self_attn_layers", ())),
        "qk_norm": "rms_norm" if config.get("qk_norm") == "rms" else None,
    }


def diffusers_class(kind: str) -> Any:
    if kind == "flux":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel


@dataclasses.dataclass
class Built:
    """What the measuring processes read (the JSON next to the files)."""

    shape: str
    kind: str
    family: str
    tiny: bool
    description: str
    comfy_path: str
    diffusers_path: str
    comfy_config: dict[str, Any]
    diffusers_config: dict[str, Any]
    parameters: int
    context_width: int
    pooled_width: int
    text_tokens: int
    lora_modules: dict[str, list[str]]  # pack LoRA preset -> diffusers module names adapting the same weights
    check: dict[str, float]

    @property
    def blocks(self) -> str:
        c = self.comfy_config
        if self.kind == "flux":
            return f"{c['depth']}+{c['depth_single_blocks']} blocks"
        return f"{c.get('num_blocks', c['depth'])} blocks"

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1), encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: Path | str) -> Built:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


# --------------------------------------------------------------------------- loading in ComfyUI


def _our_mmdit(state_dict: dict[str, Any], prefix: str, config: dict[str, Any]) -> bool:
    weight = state_dict.get(f"{prefix}x_embedder.proj.weight")
    blocks = config.get("num_blocks", config["depth"])
    return (
        weight is not None
        and weight.shape[0] == 64 * config["depth"]
        and f"{prefix}joint_blocks.{blocks - 1}.x_block.attn.qkv.weight" in state_dict
        and f"{prefix}joint_blocks.{blocks}.x_block.attn.qkv.weight" not in state_dict
    )


@contextlib.contextmanager
def mmdit_blocks_detection(config: dict[str, Any]) -> Iterator[None]:
    """ComfyUI's detection for a cut MMDiT: ``num_blocks`` added for a file of this config only.

    Every other key is detection's own, and must equal what the file was built with."""
    import comfy.model_detection

    original = comfy.model_detection.detect_unet_config

    def detect_unet_config(state_dict, key_prefix, *args, **kwargs):
        detected = original(state_dict, key_prefix, *args, **kwargs)
        if detected is None or "num_blocks" not in config or not _our_mmdit(state_dict, key_prefix, config):
            return detected
        detected["num_blocks"] = config["num_blocks"]
        differing = {k: (detected.get(k), v) for k, v in config.items() if detected.get(k) != v}
        if differing:
            raise RuntimeError(f"ComfyUI detects this SD3.5-shaped file differently from how it was built: {differing}")
        return detected

    comfy.model_detection.detect_unet_config = detect_unet_config
    try:
        yield
    finally:
        comfy.model_detection.detect_unet_config = original


def load_comfy_model(built: Built, **kwargs: Any) -> Any:
    """The MODEL as UNETLoader makes it (``comfy.sd.load_diffusion_model``); call it inside
    ``torch.inference_mode()``, as ComfyUI's executor runs loader nodes. Where ComfyUI can reload
    a model by itself (v0.28's ``cached_patcher_init``, used by ``clone(force_deepcopy=True)``,
    which its own Train LoRA calls), the reload comes back here so it gets the same model."""
    import comfy.sd

    if built.tiny:
        import tiny_families

        return tiny_families.load_diffusion_model(built.family, built.comfy_path, **kwargs)
    with mmdit_blocks_detection(built.comfy_config):
        model = comfy.sd.load_diffusion_model(built.comfy_path, **kwargs)
    if hasattr(model, "cached_patcher_init"):
        model.cached_patcher_init = (_reload, (built.comfy_path, json.dumps(dataclasses.asdict(built))))
    return model


def _reload(path: str, built_json: str, **kwargs: Any) -> Any:
    return load_comfy_model(Built(**json.loads(built_json)), **kwargs)


def load_text_encoders(built: Built) -> Any:
    """A CLIP of the family (``tiny_families``' small encoders): the pack's trainer takes one, and
    encodes its prompts once at set-up. The conditioning the benchmark trains on is random, of the
    real shapes (see ``family_sides.conditioning``)."""
    import comfyui_runtime
    import tiny_families

    files = tiny_families.family_files(built.family, comfyui_runtime.MODEL_CACHE)
    return tiny_families.load_clip(built.family, files.text_encoders)


# --------------------------------------------------------------------------- building


def _comfy_state_dict(shape: Shape, config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """The diffusion model built with ComfyUI's own classes, seeded as the tests' tiny models."""
    import comfy.supported_models
    import tiny_families
    import tiny_models

    config_class = "Flux" if shape.kind == "flux" else "SD3"
    model_config = getattr(comfy.supported_models, config_class)(copy.deepcopy(config))
    model_config.set_inference_dtype(torch.float32, None)
    dm = model_config.get_model({}, device=torch.device("cpu")).diffusion_model
    tiny_families._initialise_(dm, tiny_models._generator(seed, f"bench-dit-{shape.name}"))
    if shape.kind == "mmdit":
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

        table = get_2d_sincos_pos_embed(dm.pos_embed.shape[-1], config["pos_embed_max_size"])
        dm.pos_embed.copy_(torch.from_numpy(table).reshape(dm.pos_embed.shape).to(dm.pos_embed.dtype))
    sd = dict(dm.state_dict())
    if shape.kind == "flux":
        # BFL's layout (RMSNorm gains named ``scale``), which every ComfyUI version loads.
        norms = {n for n, m in dm.named_modules() if "RMSNorm" in type(m).__name__}
        sd = {(k[: -len("weight")] + "scale" if k.rsplit(".", 1)[0] in norms and k.endswith(".weight") else k): v for k, v in sd.items()}
    return sd


def _key_map(shape: Shape, config: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's diffusers -> ComfyUI key map for this model (see the module docstring for the fix)."""
    import comfy.utils

    if shape.kind == "flux":
        return comfy.utils.flux_to_diffusers(config, output_prefix="")
    key_map = comfy.utils.mmdit_to_diffusers(config, output_prefix="")
    last = config.get("num_blocks", config["depth"]) - 1
    if last != config["depth"] - 1:
        for end in ("weight", "bias"):
            key_map[f"transformer_blocks.{last}.norm1_context.linear.{end}"] = (
                f"joint_blocks.{last}.context_block.adaLN_modulation.1.{end}",
                None,
                comfy.utils.swap_scale_shift,
            )
    return key_map


def _source_key(comfy_sd: dict[str, torch.Tensor], key: str) -> str:
    if key in comfy_sd:
        return key
    alternative = key[: -len("weight")] + "scale" if key.endswith(".weight") else key[: -len("scale")] + "weight"
    if alternative in comfy_sd:
        return alternative
    raise KeyError(f"ComfyUI's key map names {key}, which the ComfyUI state dict lacks")


def diffusers_state_dict(shape: Shape, config: dict[str, Any], comfy_sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
    """(the diffusers model's state dict from ``comfy_sd``, the key map used), every key of both
    accounted for: each diffusers tensor is a ComfyUI tensor, a slice of one (fused qkv, linear1) or
    one with its scale and shift halves swapped."""
    with torch.device("meta"):
        reference = diffusers_class(shape.kind)(**diffusers_config(shape, config))
    wanted = reference.state_dict()
    key_map = _key_map(shape, config)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, meta in wanted.items():
        target = key_map.get(key)
        if target is None:
            raise KeyError(f"ComfyUI's key map has no entry for diffusers' {key}")
        if isinstance(target, str):
            source = _source_key(comfy_sd, target)
            value = comfy_sd[source]
        elif target[1] is None:
            source = _source_key(comfy_sd, target[0])
            value = target[2](comfy_sd[source])
        else:
            source = _source_key(comfy_sd, target[0])
            dim, start, length = target[1]
            value = comfy_sd[source].narrow(dim, start, length)
        if tuple(value.shape) != tuple(meta.shape):
            raise ValueError(f"{key}: {tuple(value.shape)} from {source}, diffusers wants {tuple(meta.shape)}")
        out[key] = value.contiguous().clone()
        used.add(source)
    unused = sorted(set(comfy_sd) - used)
    if unused:
        raise KeyError(f"ComfyUI weights the diffusers model does not take: {unused[:8]}")
    return out, key_map


def lora_modules(shape: Shape, model: Any, key_map: dict[str, Any], diffusers_keys: list[str], pack: Any) -> dict[str, list[str]]:
    """For each of the pack's LoRA presets, the diffusers Linear modules whose weights are (slices
    of) the weights the pack adapts: the reference's ``--lora_layers``, so both adapt the same."""
    dm = pack("nodes.comfy_bridge.diffusion_model")
    family = dm.family_of(model)
    out: dict[str, list[str]] = {}
    for preset in family.lora_targets:
        adapted = {key[len("diffusion_model.") :] for key in dm.unet_lora_weights(model, preset)}
        names = []
        for key in diffusers_keys:
            if not key.endswith(".weight"):
                continue
            target = key_map[key]
            source = target if isinstance(target, str) else target[0]
            if source in adapted:
                names.append(key[: -len(".weight")])
        out[preset] = names
    return out


def check_equivalence(shape: Shape, built: Built, model: Any, seed: int = 0) -> dict[str, float]:
    """Max |ComfyUI − diffusers| of one forward (fp32, CPU) of the same weights on the same inputs:
    a 16×16 latent, 8 text tokens, two noise levels (and Flux's guidance)."""
    from safetensors.torch import load_file

    reference = diffusers_class(shape.kind)(**built.diffusers_config)
    reference.load_state_dict(load_file(built.diffusers_path), strict=True)
    reference.eval()
    comfy_dm = model.model.diffusion_model
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, LATENT_CHANNELS, 16, 16, generator=gen)
    context = torch.randn(2, 8, built.context_width, generator=gen)
    pooled = torch.randn(2, built.pooled_width, generator=gen)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        if shape.kind == "flux":
            from diffusers import FluxPipeline

            guidance = torch.tensor([1.0, 3.5])
            ours = comfy_dm(x, sigma, context, y=pooled, guidance=guidance, transformer_options={})
            packed = FluxPipeline._pack_latents(x, 2, LATENT_CHANNELS, 16, 16)
            image_ids = FluxPipeline._prepare_latent_image_ids(2, 8, 8, x.device, x.dtype)
            theirs = reference(
                hidden_states=packed,
                encoder_hidden_states=context,
                pooled_projections=pooled,
                timestep=sigma,
                img_ids=image_ids,
                txt_ids=torch.zeros(8, 3),
                guidance=guidance,
                return_dict=False,
            )[0]
            theirs = FluxPipeline._unpack_latents(theirs, 16 * 8, 16 * 8, 8)
        else:
            ours = comfy_dm(x, sigma * 1000, context=context, y=pooled)
            theirs = reference(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma * 1000).sample
    return {"max_abs_diff": float((ours - theirs).abs().max()), "max_abs_output": float(ours.abs().max())}


def _cache_names(shape: Shape, config: dict[str, Any], seed: int) -> str:
    import tiny_families

    blob = json.dumps({"shape": shape.name, "config": config, "tiny_families": tiny_families.TINY_FAMILIES_VERSION}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    return f"bench-{shape.name}-seed{seed}-v{FAMILY_MODELS_VERSION}-{digest}"


def build(shape_name: str, blocks: tuple[int, ...], cache_dir: Path, pack: Any, seed: int = 0) -> Path:
    """Write (first time) the model's ComfyUI and diffusers files and its JSON; returns the JSON's path.

    Needs ComfyUI started (``comfyui_runtime.start``) and the pack loaded (its LoRA presets)."""
    import comfy.utils
    import tiny_families
    import tiny_models

    shape = SHAPES[shape_name]
    config = comfy_config(shape, blocks)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = _cache_names(shape, config, seed)
    meta_path = cache_dir / f"{stem}.json"
    if complete(meta_path):
        return meta_path
    if shape.tiny:
        comfy_path = tiny_families.family_files(shape.family, cache_dir, seed).diffusion_model
        comfy_sd = comfy.utils.load_torch_file(str(comfy_path))
    else:
        comfy_path = cache_dir / f"{stem}-comfy.safetensors"
        comfy_sd = {k: v.to(torch.bfloat16) for k, v in _comfy_state_dict(shape, config, seed).items()}
        tiny_models._save_atomically(comfy_sd, comfy_path)
    comfy_sd = {k: v.float() for k, v in comfy_sd.items()}
    converted, key_map = diffusers_state_dict(shape, config, comfy_sd)
    diffusers_keys = list(converted)
    diffusers_path = cache_dir / f"{stem}-diffusers.safetensors"
    tiny_models._save_atomically({k: v.to(torch.bfloat16) if not shape.tiny else v for k, v in converted.items()}, diffusers_path)
    parameters = sum(v.numel() for k, v in comfy_sd.items() if k != "pos_embed")
    del comfy_sd, converted
    if shape.kind == "flux":
        context, pooled, tokens = config["context_in_dim"], config["vec_in_dim"], FLUX_TEXT_TOKENS
    else:
        context, pooled, tokens = config["context_embedder_config"]["params"]["in_features"], config["adm_in_channels"], SD3_TEXT_TOKENS
    built = Built(
        shape=shape.name,
        kind=shape.kind,
        family=shape.family,
        tiny=shape.tiny,
        description=shape.description,
        comfy_path=str(comfy_path),
        diffusers_path=str(diffusers_path),
        comfy_config=config,
        diffusers_config=diffusers_config(shape, config),
        parameters=parameters,
        context_width=context,
        pooled_width=pooled,
        text_tokens=tokens,
        lora_modules={},
        check={},
    )
    with torch.inference_mode():
        model = load_comfy_model(built)
    loaded = sum(p.numel() for p in model.model.diffusion_model.parameters())
    if loaded != parameters:
        raise RuntimeError(f"{shape.name}: ComfyUI loaded {loaded} weights, the file has {parameters}")
    built.lora_modules = lora_modules(shape, model, key_map, diffusers_keys, pack)
    built.check = check_equivalence(shape, built, model, seed)
    if not built.check["max_abs_diff"] <= 1e-3 * max(1.0, built.check["max_abs_output"]):
        raise RuntimeError(f"{shape.name}: ComfyUI and diffusers compute different things: {built.check}")
    return built.save(meta_path)


def complete(meta_path: Path) -> bool:
    """Whether a model's JSON and both files it names are there."""
    if not meta_path.is_file():
        return False
    built = Built.read(meta_path)
    return Path(built.comfy_path).is_file() and Path(built.diffusers_path).is_file()


def parse_blocks(text: str) -> tuple[int, ...]:
    blocks = tuple(int(v) for v in text.split(","))
    if not blocks or any(b < 1 for b in blocks) or len(blocks) > 2:
        raise ValueError(f"blocks: one count (SD3.5) or double,single (Flux), each at least 1 (got {text!r})")
    return blocks


def main(argv: list[str] | None = None) -> int:
    """Build the models named on the command line, ``shape[:blocks]``; print each JSON's path."""
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("models", nargs="+", help="e.g. flux:1,1 sd35:2 flux-tiny sd35-tiny")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import comfyui_runtime

    wanted = []
    for item in args.models:
        name, _, blocks = item.partition(":")
        wanted.append((item, name, parse_blocks(blocks) if blocks else DEFAULT_BLOCKS.get(name, ())))
    # The files are named by the configs, which need ComfyUI's model classes only: when every one
    # is there already, nothing more is started (the quick form's budget).
    comfy_dir = str(comfyui_runtime.find_comfyui())
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    cache = comfyui_runtime.MODEL_CACHE
    found = {
        item: cache / f"{_cache_names(SHAPES[name], comfy_config(SHAPES[name], blocks), args.seed)}.json" for item, name, blocks in wanted
    }
    if not all(complete(path) for path in found.values()):
        comfyui_runtime.start(Path(tempfile.mkdtemp(prefix="personalize-bench-build-")), cpu=True, load_extra_nodes=False)
        found = {item: build(name, blocks, cache, comfyui_runtime.pack_module, args.seed) for item, name, blocks in wanted}
    for item, path in found.items():
        print(json.dumps({"model": item, "built": str(path)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
