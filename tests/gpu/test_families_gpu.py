"""DreamBooth LoRA on the flow-matching families on a real GPU (Flux.1-dev through ComfyUI's diffusion-model
wrappers, SD3.5 through the swapped diffusion model), in the GPU's own precision: the bfloat16
gradient against a float32 one, the saved file reloading through LoraLoader, the input MODEL left
as it was, and no borrowed weight left unreleased (DynamicVRAM unpins on release)."""

from __future__ import annotations

import hashlib

import pytest
import torch


def pack(name: str):
    import comfyui_runtime

    return comfyui_runtime.pack_module(name)


@pytest.fixture(scope="module", params=["flux-dev", "sd35"])
def family(request, comfyui_on_gpu):
    import tempfile
    from pathlib import Path

    import tiny_families

    model, clip, vae = tiny_families.load_family(request.param, Path(tempfile.gettempdir()) / "personalize-gpu-tiny")
    return {"name": request.param, "model": model, "clip": clip, "vae": vae}


def _state_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _lora_gradient(family: dict, precision: str) -> torch.Tensor:
    db, common = pack("nodes.training.dreambooth"), pack("nodes.training.common")
    images = pack("nodes.core.training_images").TrainingImageSet.from_image_batch(
        torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    )
    settings = db.DreamBoothSettings(
        resolution=64, steps=1, lora_rank=4, lora_alpha=4.0, prior_preservation=False, save=False, precision=precision
    )
    plan = db.validate(settings, images, family["model"], family["clip"], None)
    with torch.inference_mode(False), torch.enable_grad(), pack("nodes.comfy_bridge.diffusion_model").training_mode():
        trainer = db.DreamBoothTrainer(family["model"], family["clip"], family["vae"], images, settings, plan)
        for pair in trainer.unet_pairs.values():
            with torch.no_grad():
                pair.up.normal_(0, 0.05, generator=torch.Generator(pair.up.device).manual_seed(1))
        batch = trainer.instance.draw()
        batch.timesteps[:] = 0.6
        cond, pooled = trainer.text(settings.instance_prompt)
        loss = common.diffusion_loss(trainer.unet, batch.latents, batch.noise, batch.timesteps, cond, pooled)
        trainer.scaler.scale(loss).backward()
        trainer.scaler.unscale_(trainer.optimizer)
        return torch.cat([p.grad.detach().float().flatten() for pair in trainer.unet_pairs.values() for p in pair.parameters()])


def test_gpu_precision_gradient_matches_float32(family):
    auto = _lora_gradient(family, "auto")
    reference = _lora_gradient(family, "fp32")
    cosine = float(torch.nn.functional.cosine_similarity(auto.double(), reference.double(), dim=0))
    assert torch.isfinite(auto).all() and float(reference.norm()) > 0
    assert cosine > 0.99, cosine
    assert pack("nodes.comfy_bridge.layers").borrowed_count() == 0


def test_lora_trains_and_reloads_on_the_gpu(family):
    import uuid

    import comfy.model_management
    import comfy.sd
    import folder_paths

    db = pack("nodes.training.dreambooth")
    images = pack("nodes.core.training_images").TrainingImageSet.from_image_batch(
        torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    )
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([family["model"]], force_full_load=True)
    before = _state_hash(family["model"].model)
    name = f"gpu-{family['name']}-{uuid.uuid4().hex[:6]}"
    settings = db.DreamBoothSettings(
        resolution=64, steps=3, lora_rank=4, lora_alpha=4.0, prior_preservation=False, file_name=name, learning_rate="5e-3"
    )
    result = db.train_dreambooth(family["model"], family["clip"], family["vae"], images, settings)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in result.losses.raw.values())
    path = folder_paths.get_full_path("loras", f"{name}.safetensors")
    import safetensors.torch

    loaded, _ = comfy.sd.load_lora_for_models(family["model"], None, safetensors.torch.load_file(path), 1.0, 0.0)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    outputs = []
    for model in (result.model, loaded):
        with torch.inference_mode():  # as ComfyUI's executor loads and runs models
            comfy.model_management.load_models_gpu([model], force_full_load=True)
            cond, pooled = family["clip"].encode_from_tokens(family["clip"].tokenize("a photo of sks dog"), return_pooled=True)
            device = model.load_device
            params = {"cross_attn": cond, "pooled_output": pooled, "device": device, "noise": x, "width": 64, "height": 64}
            conds = {k: v.process_cond(batch_size=1, device=device, area=None).cond for k, v in model.model.extra_conds(**params).items()}
            outputs.append(model.model.apply_model(x.to(device), torch.tensor([0.7], device=device), **conds).float().cpu())
    assert torch.equal(outputs[0], outputs[1])
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([family["model"]], force_full_load=True)
    assert _state_hash(family["model"].model) == before
    assert pack("nodes.comfy_bridge.layers").borrowed_count() == 0
