"""The LoRA files the pack writes load in diffusers with LoraLoader's effect.

For Flux.1-dev, Chroma, SD3 and SD3.5 (tiny random models loaded by ComfyUI's own loaders,
``tiny_families``) the DreamBooth node trains a LoRA for two steps and writes its file (kohya
``lora_unet_…`` names for Flux/Chroma, diffusers' PEFT ``transformer.…`` names for SD3). Then:

* ComfyUI: LoraLoader applies the file; each patched weight is what ComfyUI's model patcher
  computes (``comfy.lora.calculate_weight`` on a float32 copy, as ``patch_weight_to_device``
  does), and its delta against the unpatched weight is taken.
* diffusers: the family's transformer (``FluxTransformer2DModel``, ``ChromaTransformer2DModel``,
  ``SD3Transformer2DModel``) is built at the tiny sizes and filled with the very same weights through
  ComfyUI's own key maps (``comfy.utils.flux_to_diffusers`` / ``mmdit_to_diffusers``: the maps
  ComfyUI reads diffusers LoRAs with; fused qkv / linear1 are split by their slices), every
  parameter accounted for. The file is loaded by the family pipeline's own ``load_lora_weights``
  (a pipeline built around that transformer alone) with no warning from diffusers or peft (no
  unexpected, missing or unsupported key), fused (``fuse_lora``) and unloaded.
* Every diffusers delta, mapped back through the same key maps, equals ComfyUI's delta
  (relative to the delta's norm), the pieces cover every ComfyUI weight the LoRA changes, and
  diffusers changes nothing else.

One concession to the tiny sizes: diffusers' kohya-Flux converter splits ``single_blocks.N.linear1``
with Flux.1's real widths hard-coded (``dims=[3072, 3072, 3072, 12288]``); it is run with
those four numbers replaced by the tiny model's (hidden, hidden, hidden, 4 * hidden) and nothing
else changed. On the real Flux.1 sizes the numbers are the same as the hard-coded ones.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import uuid
import warnings
from pathlib import Path

import comfy.lora
import comfy.utils
import diffusers
import folder_paths
import peft  # noqa: F401 (diffusers' load_lora_weights needs it: tests/requirements.txt; missing, this fails rather than skips)
import pytest
import tiny_families
import torch
from harness import MODEL_CACHE, dreambooth_inputs, pack_module, run_node

DREAMBOOTH = pack_module("nodes.graph_types").DREAMBOOTH_FINETUNE

FAMILIES = ("flux-dev", "chroma", "sd3", "sd35")
PIPELINES = {"flux-dev": "FluxPipeline", "chroma": "ChromaPipeline", "sd3": "StableDiffusion3Pipeline", "sd35": "StableDiffusion3Pipeline"}
TRANSFORMERS = {
    "flux-dev": "FluxTransformer2DModel",
    "chroma": "ChromaTransformer2DModel",
    "sd3": "SD3Transformer2DModel",
    "sd35": "SD3Transformer2DModel",
}
RTOL = 1e-4  # |diffusers delta - ComfyUI delta| / |ComfyUI delta|, per ComfyUI weight (measured: <= 7.3e-7)


def _missing_in_diffusers(name: str) -> str | None:
    """What the installed diffusers lacks for the family (None: nothing)."""
    import diffusers.loaders.lora_pipeline as lora_pipeline

    missing = [n for n in (TRANSFORMERS[name], PIPELINES[name]) if not hasattr(diffusers, n)]
    if not missing and not hasattr(getattr(diffusers, PIPELINES[name]), "load_lora_weights"):
        missing.append(f"{PIPELINES[name]}.load_lora_weights")
    if name in ("flux-dev", "chroma") and not hasattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers"):
        missing.append("lora_pipeline._convert_kohya_flux_lora_to_diffusers (kohya Flux names)")
    return ", ".join(missing) or None


# ----------------------------------------------------------------------------- training


def _train(name: str) -> tuple[object, object, str]:
    """(MODEL, CLIP, LoRA file name in models/loras) after two DreamBooth steps on family ``name``."""
    model, clip, vae = tiny_families.load_family(name, MODEL_CACHE, check=False)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 1, 1, 3, generator=g) + 0.2 * torch.rand(2, 64, 64, 3, generator=g)).clamp(0, 1)
    file_name = f"interop-{name}-{uuid.uuid4().hex[:8]}"
    inputs = dreambooth_inputs(
        model,
        clip,
        vae,
        images=images,
        learning_rate="5e-3",
        lora_alpha=3.0,  # alpha != rank (and alpha/rank no power of two): the scale must reach diffusers
        class_scheduler="simple",
        class_cfg=1.0,
        file_name=file_name,
    )
    _, _, file_names, _, _ = run_node(DREAMBOOTH, **inputs)
    assert file_names.splitlines() == [f"loras/{file_name}.safetensors"]
    return model, clip, f"{file_name}.safetensors"


# ----------------------------------------------------------------------------- ComfyUI side


class _Records(logging.Handler):
    """The WARNING-and-above messages of the loggers it is added to."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def _comfy_deltas(model, clip, lora_name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base weights, LoraLoader's delta per patched weight), float32, keyed by ComfyUI's model keys."""
    records, root = _Records(), logging.getLogger()
    assert root.isEnabledFor(logging.WARNING)
    root.addHandler(records)
    try:
        loaded, _ = run_node("LoraLoader", model=model, clip=clip, lora_name=lora_name, strength_model=1.0, strength_clip=1.0)
    finally:
        root.removeHandler(records)
    assert not [m for m in records.messages if "lora key not loaded" in m], records.messages
    base = {k: v.detach().float().clone() for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}
    deltas = {}
    for key, patches in loaded.patches.items():
        patched = comfy.lora.calculate_weight(patches, base[key].clone(), key, intermediate_dtype=torch.float32)
        deltas[key] = patched.float() - base[key]
    assert deltas, "LoraLoader patched nothing"
    return base, deltas


# ----------------------------------------------------------------------------- diffusers side


def _key_map(name: str, unet_config: dict) -> dict[str, object]:
    """diffusers parameter -> ComfyUI key (``diffusion_model.…``), ``(key, (dim, offset, size))`` or
    ``(key, None, fn)``: ComfyUI's own map (the one its LoraLoader reads diffusers LoRAs with)."""
    if name.startswith("sd3"):
        return comfy.utils.mmdit_to_diffusers(unet_config, output_prefix="diffusion_model.")
    key_map = comfy.utils.flux_to_diffusers(unet_config, output_prefix="diffusion_model.")
    if name == "chroma":
        # Chroma's modulation approximator, which ComfyUI's (Flux) map has no names for and no
        # LoRA preset touches: diffusers' names for it (as its Chroma single-file converter maps them).
        prefix = "diffusion_model.distilled_guidance_layer."
        key_map["distilled_guidance_layer.in_proj.weight"] = prefix + "in_proj.weight"
        key_map["distilled_guidance_layer.in_proj.bias"] = prefix + "in_proj.bias"
        key_map["distilled_guidance_layer.out_proj.weight"] = prefix + "out_proj.weight"
        key_map["distilled_guidance_layer.out_proj.bias"] = prefix + "out_proj.bias"
        for i in range(unet_config["n_layers"]):
            for ours, theirs in (("linear_1", "in_layer"), ("linear_2", "out_layer")):
                for end in ("weight", "bias"):
                    key_map[f"distilled_guidance_layer.layers.{i}.{ours}.{end}"] = f"{prefix}layers.{i}.{theirs}.{end}"
            key_map[f"distilled_guidance_layer.norms.{i}.weight"] = f"{prefix}norms.{i}.scale"
    return key_map


def _target_key(target: object, comfy_keys: set[str]) -> str:
    key = target if isinstance(target, str) else target[0]
    if key not in comfy_keys and key.endswith(".scale"):
        key = key[: -len("scale")] + "weight"  # ComfyUI 0.28 loads BFL's RMSNorm scale as weight
    return key


def _piece(tensor: torch.Tensor, target: object) -> torch.Tensor:
    """The diffusers parameter's part of a ComfyUI weight."""
    if isinstance(target, str):
        return tensor
    if target[1] is not None:
        dim, offset, size = target[1]
        tensor = tensor.narrow(dim, offset, size)
    if len(target) > 2 and target[2] is not None:
        tensor = target[2](tensor)
    return tensor


def _put(whole: torch.Tensor, target: object, piece: torch.Tensor) -> None:
    """Write a diffusers parameter's value back into its place in a ComfyUI-shaped tensor (``_piece`` reversed)."""
    if not isinstance(target, str) and len(target) > 2 and target[2] is not None:
        assert target[2] is comfy.utils.swap_scale_shift, target  # its own inverse
        piece = target[2](piece)
    place = whole if isinstance(target, str) or target[1] is None else whole.narrow(target[1][0], target[1][1], target[1][2])
    place.copy_(piece)


def _diffusers_transformer(name: str, unet_config: dict, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The family's diffusers transformer at the tiny model's sizes (random weights)."""
    cls = getattr(diffusers, TRANSFORMERS[name])
    if name.startswith("sd3"):
        depth = unet_config["depth"]  # MMDiT: 64-wide heads, as many as blocks
        return cls(
            sample_size=unet_config["patch_size"] * unet_config["pos_embed_max_size"],
            patch_size=unet_config["patch_size"],
            in_channels=unet_config["in_channels"],
            num_layers=depth,
            attention_head_dim=64,
            num_attention_heads=depth,
            joint_attention_dim=sd["diffusion_model.context_embedder.weight"].shape[1],
            caption_projection_dim=64 * depth,
            pooled_projection_dim=sd["diffusion_model.y_embedder.mlp.0.weight"].shape[1],
            out_channels=unet_config["out_channels"],
            pos_embed_max_size=unet_config["pos_embed_max_size"],
            dual_attention_layers=tuple(unet_config.get("x_block_self_attn_layers", ())),
            qk_norm="rms_norm" if unet_config.get("qk_norm") == "rms" else None,
        )
    hidden, heads = unet_config["hidden_size"], unet_config["num_heads"]
    common = {
        "patch_size": 1,  # diffusers' Flux takes the 2x2-packed latent
        "in_channels": sd["diffusion_model.img_in.weight"].shape[1],
        "out_channels": sd["diffusion_model.final_layer.linear.weight"].shape[0],
        "num_layers": unet_config["depth"],
        "num_single_layers": unet_config["depth_single_blocks"],
        "attention_head_dim": hidden // heads,
        "num_attention_heads": heads,
        "joint_attention_dim": unet_config["context_in_dim"],
        "axes_dims_rope": tuple(unet_config["axes_dim"]),
    }
    if name == "chroma":
        return cls(
            **common,
            approximator_num_channels=unet_config["in_dim"],
            approximator_hidden_dim=unet_config["hidden_dim"],
            approximator_layers=unet_config["n_layers"],
        )
    return cls(
        **common, pooled_projection_dim=unet_config["vec_in_dim"], guidance_embeds="diffusion_model.guidance_in.in_layer.weight" in sd
    )


def _fill(transformer: torch.nn.Module, key_map: dict[str, object], base: dict[str, torch.Tensor]) -> None:
    """Every diffusers parameter (and buffer) from ComfyUI's weights through the key map."""
    own = transformer.state_dict()
    unmapped = sorted(p for p in own if p not in key_map)
    assert not unmapped, f"diffusers parameters ComfyUI's key map has no name for: {unmapped}"
    filled = {}
    for param, tensor in own.items():
        target = key_map[param]
        key = _target_key(target, set(base))
        assert key in base, f"{param} maps to {key}, not in ComfyUI's model"
        value = _piece(base[key], target)
        assert value.shape == tensor.shape, (param, key, tuple(value.shape), tuple(tensor.shape))
        filled[param] = value.clone()
    transformer.load_state_dict(filled, strict=True)
    # Every ComfyUI weight went somewhere (nothing of the model is left out of the comparison).
    used = {_target_key(key_map[p], set(base)) for p in own}
    assert not set(base) - used, f"ComfyUI weights with no diffusers parameter: {sorted(set(base) - used)[:8]}"


@contextlib.contextmanager
def _tiny_kohya_flux_converter(hidden: int):
    """diffusers' kohya-Flux converter with Flux.1's hard-coded linear1 split widths replaced by the tiny ones."""
    import diffusers.loaders.lora_conversion_utils as conversion
    import diffusers.loaders.lora_pipeline as lora_pipeline

    real = "dims=[3072, 3072, 3072, 12288]"
    source = inspect.getsource(conversion._convert_kohya_flux_lora_to_diffusers)
    assert source.count(real) == 1, "diffusers' kohya-Flux converter changed: review this test's concession"
    namespace = dict(vars(conversion))
    tiny = source.replace(real, f"dims=[{hidden}, {hidden}, {hidden}, {4 * hidden}]")
    exec(compile(tiny, conversion.__file__, "exec"), namespace)  # noqa: S102 (diffusers' own source, four numbers changed)
    original = lora_pipeline._convert_kohya_flux_lora_to_diffusers
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = namespace["_convert_kohya_flux_lora_to_diffusers"]
    try:
        yield
    finally:
        lora_pipeline._convert_kohya_flux_lora_to_diffusers = original


@contextlib.contextmanager
def _complaints():
    """Every warning diffusers and peft log or raise while the block runs."""
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield handler.messages
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            handler.messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)


def _pipeline(name: str, transformer: torch.nn.Module):
    """The family's pipeline around the transformer alone (no text encoders, VAE or scheduler)."""
    cls = getattr(diffusers, PIPELINES[name])
    components = {p: None for p in inspect.signature(cls.__init__).parameters if p != "self"}
    components["transformer"] = transformer
    return cls(**components)


def _diffusers_deltas(name: str, transformer: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Load the file with the pipeline's ``load_lora_weights``, fuse it; delta per diffusers parameter."""
    before = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    pipe = _pipeline(name, transformer)
    converter = _tiny_kohya_flux_converter(transformer.inner_dim) if name in ("flux-dev", "chroma") else contextlib.nullcontext()
    with converter, _complaints() as complaints:
        # What diffusers reads the file as (kohya names converted): every key must be the transformer's,
        # as load_lora_weights hands the transformer only the "transformer." keys.
        read = type(pipe).lora_state_dict(str(path))
        pipe.load_lora_weights(str(path), adapter_name="pack")
    # The text encoders left out of the pipeline (None) get no keys, and diffusers says so: not the file's doing.
    benign = re.compile(r"No LoRA keys associated to NoneType found with the prefix='text_encoder(_\d)?'")
    complaints = [c for c in complaints if not benign.search(c)]
    assert not complaints, f"diffusers/peft complained loading {path.name}: {complaints}"
    assert all(k.startswith("transformer.") and ".lora_" in k for k in read), sorted(read)[:8]
    wanted = {k[len("transformer.") :].rsplit(".lora_", 1)[0] for k in read}
    adapted = {n for n, m in transformer.named_modules() if "pack" in getattr(m, "lora_A", {})}
    assert adapted == wanted, f"LoRA layers diffusers made {sorted(adapted)} != the file's modules {sorted(wanted)}"
    transformer.fuse_lora()
    transformer.unload_lora()
    after = transformer.state_dict()
    assert after.keys() == before.keys()
    return {k: after[k].float() - before[k].float() for k in before}


# ----------------------------------------------------------------------------- the test


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_file_loads_in_diffusers_with_lora_loaders_effect(name):
    """One file, two loaders: diffusers' fused weights move exactly as LoraLoader's patched ones."""
    missing = _missing_in_diffusers(name)
    if missing:
        pytest.skip(f"diffusers {diffusers.__version__} lacks {missing}")
    model, clip, lora_name = _train(name)
    path = Path(folder_paths.get_full_path("loras", lora_name))
    base, comfy_deltas = _comfy_deltas(model, clip, lora_name)
    assert all(float(d.abs().max()) > 0 for d in comfy_deltas.values()), "a LoRA weight with no effect: train harder"

    unet_config = model.model.model_config.unet_config
    key_map = _key_map(name, unet_config)
    torch.manual_seed(0)
    transformer = _diffusers_transformer(name, unet_config, base).float().eval()
    _fill(transformer, key_map, base)
    diffusers_deltas = _diffusers_deltas(name, transformer, path)

    # Map diffusers' deltas back onto ComfyUI's weights; rows each piece covers are counted.
    assembled: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    comfy_keys = set(base)
    for param, delta in diffusers_deltas.items():
        key = _target_key(key_map[param], comfy_keys)
        if key not in comfy_deltas:
            assert float(delta.abs().max()) == 0, f"diffusers changed {param} ({key}), which LoraLoader leaves alone"
            continue
        whole = assembled.setdefault(key, torch.zeros_like(comfy_deltas[key]))
        count = covered.setdefault(key, torch.zeros_like(comfy_deltas[key]))
        _put(whole, key_map[param], delta)
        _put(count, key_map[param], _piece(count, key_map[param]) + 1)
    assert assembled.keys() == comfy_deltas.keys(), (
        f"ComfyUI weights the LoRA changes that diffusers' does not reach: {sorted(set(comfy_deltas) - set(assembled))}"
    )
    worst = 0.0
    for key, expected in comfy_deltas.items():
        assert bool((covered[key] == 1).all()), f"{key}: diffusers' pieces do not tile it exactly once"
        error = float((assembled[key] - expected).norm() / expected.norm())
        worst = max(worst, error)
        assert error <= RTOL, f"{key}: diffusers' delta differs from LoraLoader's by {error:.2e} (relative)"
    print(f"\n{name}: {len(comfy_deltas)} weights, worst relative delta difference {worst:.2e}")
