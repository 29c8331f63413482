"""DreamBooth on the flow-matching families (Flux.1-dev/schnell, Chroma, SD3, SD3.5), through the family seam.

Tiny random models of each family, loaded by ComfyUI's own loaders (``tiny_families``): gradients
of the training pass (context, LoRA factors, full weights) against Richardson-extrapolated central
differences; the node trains, saves a LoRA that LoraLoader reloads to the same model, λ = 0 trains
exactly as no prior, and the shared MODEL is bitwise unchanged.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections import OrderedDict
from pathlib import Path

import comfy.model_management
import folder_paths
import pytest
import safetensors
import safetensors.torch
import tiny_families
import torch
from harness import MODEL_CACHE, dreambooth_inputs, pack_module, richardson_check, run_node

common = pack_module("nodes.training.common")
db = pack_module("nodes.training.dreambooth")
db_node = pack_module("nodes.dreambooth_node")
diffusion_model = pack_module("nodes.comfy_bridge.diffusion_model")
text_encoders = pack_module("nodes.comfy_bridge.text_encoders")
adapters = pack_module("nodes.core.adapters")
DREAMBOOTH = pack_module("nodes.graph_types").DREAMBOOTH_FINETUNE

FAMILIES = ("flux-dev", "flux-schnell", "chroma", "sd3", "sd35")
EXPECTED = {
    "flux-dev": ("Flux.1-dev", 1.0),
    "flux-schnell": ("Flux.1-schnell", None),
    "chroma": ("Chroma", 0.0),
    "sd3": ("SD3", None),
    "sd35": ("SD3", None),
}
# The last two families loaded (each holds a full-size CLIP-L): loading one again takes about a second.
_LOADED: OrderedDict[str, tuple] = OrderedDict()


def family(name: str) -> dict:
    if name not in _LOADED:
        while len(_LOADED) >= 2:
            _LOADED.popitem(last=False)
            comfy.model_management.unload_all_models()
        _LOADED[name] = tiny_families.load_family(name, MODEL_CACHE)
    _LOADED.move_to_end(name)
    model, clip, vae = _LOADED[name]
    return {"name": name, "model": model, "clip": clip, "vae": vae}


@pytest.fixture(scope="module", autouse=True)
def _release_families():
    yield
    _LOADED.clear()
    comfy.model_management.unload_all_models()


def _state_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _images(count: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(count, 1, 1, 3, generator=g)
    return (base + 0.2 * torch.rand(count, size, size, 3, generator=g)).clamp(0, 1)


def _check(loss_fn, params, h: float, seed: int = 0, rel: float = 0.02) -> None:
    richardson_check(loss_fn, params, h, seed=seed, rel=rel, floor=1e-6)


def _training_pass(entry: dict, mode: str):
    """(unet, adapters, cond, pooled, latents, noise, sigmas) for one family and mode, in float32."""
    model, clip = entry["model"], entry["clip"]
    g = torch.Generator().manual_seed(11)
    with torch.inference_mode(False), torch.enable_grad():
        pairs = {}
        if mode == "lora":
            keys = sorted(diffusion_model.unet_lora_weights(model, "attention").items())
            for key, shape in keys[:3] + keys[-1:]:
                pair = adapters.LoraPair(shape, 2, 2.0, generator=g)
                with torch.no_grad():
                    pair.up.normal_(0, 0.2, generator=g)  # B = 0 would give A no gradient
                pairs[key] = pair
        noise_levels, _ = diffusion_model.noise_level_sampler(model, "auto", 64)
        unet = diffusion_model.DiffusionModelForTraining(
            model, torch.float32, adapters=pairs, own_dtype=torch.float32 if mode == "full" else None, noise_levels=noise_levels
        )
        unet.load(clip.patcher)
        with torch.no_grad():
            cond, pooled = text_encoders.encode_prompt(clip, "a photo of sks dog")
        channels = model.get_model_object("latent_format").latent_channels
        latents = torch.randn(1, channels, 8, 8, generator=g)
        noise = torch.randn(latents.shape, generator=g)
        sigmas = torch.tensor([0.6])
    return unet, pairs, cond.float().clone(), None if pooled is None else pooled.float().clone(), latents, noise, sigmas


@pytest.mark.parametrize("name", ("flux-dev", "chroma", "sd3", "sd35"))
def test_context_and_lora_gradients_match_finite_differences(name):
    entry = family(name)
    before = _state_hash(entry["model"].model)
    with diffusion_model.training_mode():
        unet, pairs, cond, pooled, latents, noise, sigmas = _training_pass(entry, "lora")
        assert unet.prediction == "flow" and unet.family.name == EXPECTED[name][0] and unet.guidance == EXPECTED[name][1]
        context = cond.clone().requires_grad_(True)

        def loss():
            return common.diffusion_loss(unet, latents, noise, sigmas, context, pooled)

        _check(loss, [context], h=0.05 * float(cond.norm()))
        factors = [p for pair in pairs.values() for p in pair.parameters()]
        _check(loss, factors, h=0.5, seed=1)
    comfy.model_management.load_models_gpu([entry["model"]], force_full_load=True)  # as ComfyUI does before the input is used again
    assert _state_hash(entry["model"].model) == before


@pytest.mark.parametrize("name", ("flux-dev", "chroma", "sd35"))
def test_full_weight_gradients_match_finite_differences(name):
    entry = family(name)
    before = _state_hash(entry["model"].model)
    with diffusion_model.training_mode():
        unet, _, cond, pooled, latents, noise, sigmas = _training_pass(entry, "full")
        own = dict(unet.view.named_parameters())
        # Attention weights, and the weights that sit outside ComfyUI's cast layers (QK-norm, RMSNorm).
        picks = [n for n in own if n.endswith(("qkv.weight", "linear1.weight"))][:1]
        picks += [n for n in own if ("norm" in n or ".ln_q." in n) and ("scale" in n or n.endswith(".weight"))][:1]
        assert len(picks) == 2, sorted(own)[:20]

        def loss():
            return common.diffusion_loss(unet, latents, noise, sigmas, cond, pooled)

        _check(loss, [own[n] for n in picks], h=0.5)
    comfy.model_management.load_models_gpu([entry["model"]], force_full_load=True)
    assert _state_hash(entry["model"].model) == before


def _inputs(entry: dict, **overrides) -> dict:
    values = {
        "images": _images(),
        "learning_rate": "5e-3",
        "class_scheduler": "simple",
        "class_cfg": 1.0,
        "file_name": f"flow-{uuid.uuid4().hex[:8]}",
    }
    values.update(overrides)
    return dreambooth_inputs(entry["model"], entry["clip"], entry["vae"], **values)


def run_dreambooth(**inputs):
    return run_node(DREAMBOOTH, **inputs)


def _model_output(model, entry: dict, seed: int = 7) -> torch.Tensor:
    """apply_model of a MODEL (patches applied, as sampling would) on a fixed input, conditioned as the sampler does."""
    g = torch.Generator().manual_seed(seed)
    channels = model.get_model_object("latent_format").latent_channels
    x = torch.randn(1, channels, 8, 8, generator=g)
    sigma = torch.tensor([0.7])
    with torch.inference_mode():
        cond, pooled = text_encoders.encode_prompt(entry["clip"], "a photo of sks dog")
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        params = {"cross_attn": cond, "pooled_output": pooled, "device": x.device, "noise": x, "width": 64, "height": 64}
        conds = {k: v.process_cond(batch_size=1, device=x.device, area=None).cond for k, v in model.model.extra_conds(**params).items()}
        return model.model.apply_model(x, sigma, **conds).float().clone()


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_file_reloads_through_lora_loader(name):
    entry = family(name)
    before = _state_hash(entry["model"].model)
    inputs = _inputs(entry)
    model, _clip, file_names, _curve, status = run_dreambooth(**inputs)
    file_name = inputs["file_name"]
    assert file_names.splitlines() == [f"loras/{file_name}.safetensors"]
    path = Path(folder_paths.get_full_path("loras", f"{file_name}.safetensors"))
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert metadata["base_model"] == EXPECTED[name][0]
    if name.startswith(("flux", "chroma")):
        assert all(k.startswith("lora_unet_") for k in keys) and any("double_blocks" in k for k in keys)
    else:  # diffusers' PEFT names, the fused qkv as to_q / to_k / to_v, no .alpha (diffusers' SD3 loader refuses it)
        assert all(k.startswith("transformer.transformer_blocks.") and ".lora_" in k for k in keys), keys[:4]
        assert any(".attn.to_k.lora_B" in k for k in keys) and any(".attn.add_q_proj.lora_A" in k for k in keys)
    loaded, _ = run_node(
        "LoraLoader", model=entry["model"], clip=entry["clip"], lora_name=f"{file_name}.safetensors", strength_model=1.0, strength_clip=1.0
    )
    trained = _model_output(model, entry)
    assert torch.equal(_model_output(loaded, entry), trained)
    assert not torch.equal(trained, _model_output(entry["model"], entry)), "the LoRA changes the model"
    assert "noise levels:" in status
    if name == "flux-schnell":
        assert "step-distilled" in status
    comfy.model_management.load_models_gpu([entry["model"]], force_full_load=True)
    assert _state_hash(entry["model"].model) == before


def _saved_lora(file_name: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder_paths.get_full_path("loras", f"{file_name}.safetensors"))


@pytest.mark.parametrize("name", ("flux-dev", "sd3"))
def test_lambda_zero_trains_exactly_as_without_prior(name):
    entry = family(name)
    plain = _inputs(entry)
    run_dreambooth(**plain)
    with_prior = _inputs(entry, prior_preservation=True, prior_loss_weight=0.0, class_images=_images(seed=5))
    run_dreambooth(**with_prior)
    a, b = _saved_lora(plain["file_name"]), _saved_lora(with_prior["file_name"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    weighted = _inputs(entry, prior_preservation=True, prior_loss_weight=1.0, class_images=_images(seed=5))
    run_dreambooth(**weighted)
    c = _saved_lora(weighted["file_name"])
    assert any(not torch.equal(a[k], c[k]) for k in a), "the prior term changes the training"


def test_flux_class_images_sample_with_guidance_in_the_conditioning(monkeypatch):
    """Left at the node's settings, Flux.1-dev class images use the family's sampling: cfg 1 and guidance 3.5."""
    import comfy.sample

    entry = family("flux-dev")
    seen = []
    original = comfy.sample.sample

    def recording(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, *args, **kwargs):
        seen.append((steps, cfg, sampler_name, scheduler, positive[0][1].get("guidance")))
        return original(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, *args, **kwargs)

    monkeypatch.setattr(comfy.sample, "sample", recording)
    inputs = _inputs(
        entry,
        prior_preservation=True,
        class_sampler="euler_ancestral",
        class_scheduler="normal",
        class_steps=30,
        class_cfg=7.0,
        num_class_images=1,
        steps=1,
        class_prompt=f"a photo of dog {uuid.uuid4().hex[:4]}",
    )
    *_, status = run_dreambooth(**inputs)
    assert seen and seen[0] == (20, 1.0, "euler", "simple", 3.5), seen
    assert "guidance 1 embedded while training" in status


def test_chroma_text_encoder_lora_is_refused_with_the_reason():
    entry = family("chroma")
    with pytest.raises(ValueError, match="T5 and LLM encoders are not trained"):
        run_dreambooth(**_inputs(entry, train_text_encoder=True))


def test_a_sampling_patch_sets_the_noise_levels():
    """A ModelSamplingFlux node on Flux.1-dev: 'auto' trains on the sigmas that patched sampling gives."""
    entry = family("flux-dev")
    (patched,) = run_node("ModelSamplingFlux", model=entry["model"], max_shift=2.0, base_shift=2.0, width=1024, height=1024)
    sampler, note = diffusion_model.noise_level_sampler(patched, "auto", 64)
    assert sampler.scheme == "schedule" and "as patched" in note
    draws = sampler.draw(4096, torch.Generator().manual_seed(0))
    # uniform t through μ = 2: σ = e²/(e² + 1/t − 1), so half the draws lie below σ(0.5) = e²/(e² + 1)
    median = math.exp(2.0) / (math.exp(2.0) + 1)
    assert float((draws < median).float().mean()) == pytest.approx(0.5, abs=0.03)
    unpatched, note = diffusion_model.noise_level_sampler(entry["model"], "auto", 64)
    assert unpatched.scheme == "flux-shift" and "flux_shift" in note


@pytest.mark.parametrize("name", ("flux-dev", "sd3"))
def test_a_lora_run_resumes_from_its_file(name):
    """Each family's file layout (kohya for Flux, diffusers' PEFT with the fused qkv split for SD3) reads back to continue."""
    entry = family(name)
    first = _inputs(entry, steps=2)
    run_dreambooth(**first)
    saved = _saved_lora(first["file_name"])
    resumed = _inputs(entry, steps=1, resume_from=f"loras/{first['file_name']}.safetensors", file_name=f"{first['file_name']}-more")
    *_, status = run_dreambooth(**resumed)
    assert f"resumed from loras/{first['file_name']}.safetensors at step 2" in status
    path = folder_paths.get_full_path("loras", f"{resumed['file_name']}.safetensors")
    with safetensors.safe_open(path, framework="pt") as handle:
        assert handle.metadata()["steps"] == "3"
    more = _saved_lora(resumed["file_name"])
    assert more.keys() == saved.keys() and any(not torch.equal(more[k], saved[k]) for k in saved)


@pytest.mark.parametrize("name", ("flux-dev", "sd35"))
def test_full_fine_tuning_trains_a_copy_and_saves_a_checkpoint(name):
    entry = family(name)
    comfy.model_management.load_models_gpu([entry["model"]], force_full_load=True)
    before = _state_hash(entry["model"].model)
    untouched = _model_output(entry["model"], entry)
    inputs = _inputs(entry, mode="full", steps=2, learning_rate="1e-3")
    model, _clip, file_names, _curve, _status = run_dreambooth(**inputs)
    assert file_names.splitlines() == [f"checkpoints/{inputs['file_name']}.safetensors"]
    with safetensors.safe_open(folder_paths.get_full_path("checkpoints", f"{inputs['file_name']}.safetensors"), framework="pt") as handle:
        assert handle.metadata()["base_model"] == EXPECTED[name][0]
        assert any(k.startswith("model.diffusion_model.") for k in handle.keys())  # noqa: SIM118 (safe_open has no __iter__)
    assert not torch.equal(_model_output(model, entry), untouched), "the tuned weights change the model"
    comfy.model_management.load_models_gpu([entry["model"]], force_full_load=True)
    assert _state_hash(entry["model"].model) == before
    assert torch.equal(_model_output(entry["model"], entry), untouched)


def test_lora_with_gradient_checkpointing_on_flux_is_refused_before_any_work():
    entry = family("flux-dev")
    with pytest.raises(ValueError, match=r"gradient checkpointing with a LoRA on Flux\.1-dev is not supported yet"):
        run_dreambooth(**_inputs(entry, gradient_checkpointing=True))
