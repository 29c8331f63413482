"""The tiny flow-matching families of tests/tiny_families.py, on the ComfyUI the suite runs on:
ComfyUI's own loaders detect the real classes, and the model, text encoders and VAE fit together
through ComfyUI's own nodes (CLIPTextEncode, KSampler, VAEDecode)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
import tiny_families
from harness import MODEL_CACHE, run_node

FAMILIES = tiny_families.FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """One family at a time (module scope + params: pytest finishes a family's tests, then
    drops it), loaded as the loader nodes do, with ComfyUI's embeddings folder."""
    import folder_paths

    name = request.param
    model, clip, vae = tiny_families.load_family(name, MODEL_CACHE, embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return {"name": name, "spec": tiny_families.family_spec(name), "model": model, "clip": clip, "vae": vae}


def test_loads_as_the_family_class(family):
    import comfy.model_detection
    import comfy.model_sampling
    import comfy.utils

    spec, model, vae = family["spec"], family["model"], family["vae"]
    assert type(model.model.model_config).__name__ == spec.config_class
    sampling = model.get_model_object("model_sampling")
    assert isinstance(sampling, getattr(comfy.model_sampling, spec.model_sampling))
    # ModelSamplingFlux is no ModelSamplingDiscreteFlow subclass, but check both ways anyway.
    other = {"ModelSamplingFlux": "ModelSamplingDiscreteFlow", "ModelSamplingDiscreteFlow": "ModelSamplingFlux"}[spec.model_sampling]
    assert not isinstance(sampling, getattr(comfy.model_sampling, other))
    assert model.model.latent_format.latent_channels == vae.latent_channels == 16

    # Detection decides the class and reads every size it can from the weights: the wrapper may
    # only restore the sizes it hard-codes (none at all for the shape-driven MMDiT).
    files = tiny_families.family_files(family["name"], MODEL_CACHE)
    with tiny_families.tiny_detection(family["name"]) as restored:
        detected = comfy.model_detection.model_config_from_unet(comfy.utils.load_torch_file(str(files.diffusion_model)), "")
    assert type(detected).__name__ == spec.config_class
    assert set(restored) <= spec.restorable


def test_two_sampler_steps_and_decode(family):
    import torch

    spec = family["spec"]
    (positive,) = run_node("CLIPTextEncode", text="a photo of a dog", clip=family["clip"])
    (negative,) = run_node("CLIPTextEncode", text="", clip=family["clip"])
    cond, extra = positive[0]
    assert cond.shape[0] == 1 and cond.shape[-1] == spec.context_width
    if spec.pooled_width is not None:
        assert tuple(extra["pooled_output"].shape) == (1, spec.pooled_width)

    (latent,) = run_node("EmptyLatentImage", width=64, height=64, batch_size=1)
    (out,) = run_node(
        "KSampler",
        model=family["model"],
        seed=0,
        steps=2,
        cfg=2.0,  # not 1.0: the negative goes through the model too (batched with the positive)
        sampler_name="euler",
        scheduler="simple",
        positive=positive,
        negative=negative,
        latent_image=latent,
        denoise=1.0,
    )
    samples = out["samples"]
    assert tuple(samples.shape) == (1, 16, 8, 8)
    assert torch.isfinite(samples).all()

    (image,) = run_node("VAEDecode", samples=out, vae=family["vae"])
    assert tuple(image.shape) == (1, 64, 64, 3)
    assert torch.isfinite(image).all() and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0


def test_embedding_keys_are_comfyuis(family, embeddings_dir: Path, caplog):
    import comfy.sd1_clip
    import safetensors.torch
    import torch

    spec, clip = family["spec"], family["clip"]
    tokenizers = [t for t in vars(clip.tokenizer).values() if isinstance(t, comfy.sd1_clip.SDTokenizer)]
    keys = {t.embedding_key for t in tokenizers}
    # SD3's tokenizer always carries all three, whichever encoders were loaded.
    assert keys == ({"clip_l", "clip_g", "t5xxl"} if spec.config_class == "SD3" else set(spec.encoders))

    widths = spec.embedding_widths
    generator = torch.Generator().manual_seed(0)
    vectors = {key: torch.randn(2, width, generator=generator) for key, width in widths.items()}
    name = f"tinyfam-{family['name']}-{uuid.uuid4().hex[:6]}"
    path = embeddings_dir / f"{name}.safetensors"
    safetensors.torch.save_file(vectors, str(path))
    try:
        tokens = clip.tokenize(f"a photo of embedding:{name}")
    finally:
        path.unlink()
    for tokenizer in tokenizers:
        if tokenizer.embedding_key not in vectors:
            continue
        (token_key,) = [k for k, v in vars(clip.tokenizer).items() if v is tokenizer]
        token_key = {"clip_l": "l", "clip_g": "g", "clip_t5xxl": "t5xxl"}.get(token_key, token_key)
        spliced = [t for chunk in tokens[token_key] for t in chunk if torch.is_tensor(t[0])]
        assert len(spliced) == 2, (tokenizer.embedding_key, len(spliced))
        assert torch.equal(torch.stack([t[0] for t in spliced]), vectors[tokenizer.embedding_key])

    with caplog.at_level(logging.WARNING):
        with_embedding, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert not [r for r in caplog.records if "embedding" in r.getMessage()]
    if spec.pooled_width is not None:
        assert tuple(pooled.shape) == (1, spec.pooled_width)
    plain = clip.encode_from_tokens(clip.tokenize(f"a photo of {name}"))
    assert with_embedding.shape[-1] == spec.context_width and torch.isfinite(with_embedding).all()
    assert not torch.equal(with_embedding[:, : plain.shape[1]], plain[:, : with_embedding.shape[1]])
