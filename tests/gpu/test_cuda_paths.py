"""Every CUDA path, on a real GPU: float16 Textual Inversion with loss scaling, bfloat16 full
fine-tuning with stochastic rounding and the fused backward step, LoRA, AdamW8bit, an fp8-stored
model, partial loading under a small memory budget, and ComfyUI's own server with DynamicVRAM
(its default on NVIDIA since v0.16). Skipped without CUDA (see conftest.py)."""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from gpu_models import load

TESTS_DIR = Path(__file__).resolve().parents[1]


def pack(name: str):
    import comfyui_runtime

    return comfyui_runtime.pack_module(name)


def _images(count: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(count, 1, 1, 3, generator=g) + 0.2 * torch.rand(count, size, size, 3, generator=g)).clamp(0, 1)


def _image_set():
    return pack("nodes.core.training_images").TrainingImageSet.from_image_batch(_images())


@pytest.fixture(scope="module")
def sd15_fp16(sd15_path):
    return load(sd15_path, torch.float16)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def _ti_gradient(models, precision: str, shrink: float = 1.0) -> tuple[torch.Tensor, object]:
    ti, common = pack("nodes.training.textual_inversion"), pack("nodes.training.common")
    settings = ti.TextualInversionSettings(
        trigger_word="<gpu>", init_text="cat", steps=1, resolution=64, save=False, seed=3, precision=precision
    )
    init, _ = ti.initial_vectors(settings, models["clip"], None)
    with torch.inference_mode(False), torch.enable_grad():
        trainer = ti.TextualInversionTrainer(models["model"], models["clip"], models["vae"], _image_set(), settings, init)
        batch = trainer.sampler.draw()
        batch.timesteps[:] = 500
        cond, pooled = trainer.encoder.encode(["a photo of <gpu>"] * batch.latents.shape[0], trainer.unet.needs_pooled)
        loss = common.diffusion_loss(trainer.unet, batch.latents, batch.noise, batch.timesteps, cond, pooled) * shrink
        trainer.scaler.scale(loss).backward()
        trainer.scaler.unscale_(trainer.optimizer)
        return trainer.vectors["clip_l"].grad.detach().clone(), trainer


def test_textual_inversion_on_a_float16_model_scales_its_loss(sd15_fp16):
    grad16, trainer = _ti_gradient(sd15_fp16, "auto", 1e-5)
    assert trainer.unet.device.type == "cuda" and trainer.unet.compute_dtype == torch.float16 and trainer.scaler.is_enabled()
    grad32, _ = _ti_gradient(sd15_fp16, "fp32", 1e-5)
    assert _cosine(grad16, grad32) > 0.999 and bool((grad16 != 0).any())
    ti = pack("nodes.training.textual_inversion")
    settings = ti.TextualInversionSettings(trigger_word=f"<g{uuid.uuid4().hex[:5]}>", init_text="cat", steps=3, resolution=64, save=False)
    with torch.inference_mode():
        result = ti.train_textual_inversion(sd15_fp16["model"], sd15_fp16["clip"], sd15_fp16["vae"], _image_set(), settings)
    assert all(torch.isfinite(torch.tensor(result.losses.raw["loss"])))


@pytest.mark.skipif(
    not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(including_emulation=False), reason="no bfloat16 on this GPU"
)
def test_full_fine_tuning_in_bfloat16_with_the_fused_step(sd15):
    db = pack("nodes.training.dreambooth")
    settings = db.DreamBoothSettings(
        mode="full", steps=2, resolution=64, save=False, prior_preservation=False, learning_rate="1e-4", seed=5
    )
    with torch.inference_mode(False), torch.enable_grad():
        plan = db.validate(settings, _image_set(), sd15["model"], sd15["clip"], None)
        trainer = db.DreamBoothTrainer(sd15["model"], sd15["clip"], sd15["vae"], _image_set(), settings, plan)
        assert trainer.bf16 and trainer.fused and trainer.unet.compute_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
        before = {n: p.detach().clone() for n, p in trainer.unet.view.named_parameters()}
        losses = [trainer.step(1)["loss"], trainer.step(2)["loss"]]  # the stochastic rounding draws on the GPU's generator
        changed = [n for n, p in trainer.unet.view.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert all(math.isfinite(v) for v in losses) and len(changed) > 0.9 * len(before)
    assert {p.device.type for p in trainer.unet.view.parameters()} == {"cuda"}


def test_lora_trained_on_the_gpu_reloads_through_lora_loader(sd15):
    import nodes

    db = pack("nodes.training.dreambooth")
    name = f"gpu-lora-{uuid.uuid4().hex[:6]}"
    settings = db.DreamBoothSettings(
        mode="lora", steps=2, resolution=64, file_name=name, prior_preservation=False, lora_rank=4, lora_alpha=4.0, learning_rate="5e-3"
    )
    with torch.inference_mode():
        result = db.train_dreambooth(sd15["model"], sd15["clip"], sd15["vae"], _image_set(), settings)
        loaded, _ = nodes.LoraLoader().load_lora(sd15["model"], sd15["clip"], f"{name}.safetensors", 1.0, 1.0)
        x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 768)
        outputs = []
        for model in (result.model, loaded):
            import comfy.model_management

            comfy.model_management.load_models_gpu([model])
            outputs.append(model.model.apply_model(x.cuda(), torch.tensor([3.0]).cuda(), c_crossattn=context.cuda()).float().cpu())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-3, atol=1e-3)


def test_eight_bit_adamw_trains_the_full_model(sd15):
    pytest.importorskip("bitsandbytes")
    db = pack("nodes.training.dreambooth")
    settings = db.DreamBoothSettings(mode="full", steps=1, resolution=64, save=False, prior_preservation=False, optimizer="AdamW8bit")
    with torch.inference_mode():
        result = db.train_dreambooth(sd15["model"], sd15["clip"], sd15["vae"], _image_set(), settings)
    assert all(v == v for v in result.losses.raw["loss"]) and any("AdamW8bit" in n for n in result.notes)


def test_an_fp8_model_trains_textual_inversion_and_lora(sd15_path):
    models = load(sd15_path, torch.float8_e4m3fn)
    ti, db = pack("nodes.training.textual_inversion"), pack("nodes.training.dreambooth")
    with torch.inference_mode():
        settings = ti.TextualInversionSettings(
            trigger_word=f"<f{uuid.uuid4().hex[:5]}>", init_text="cat", steps=2, resolution=64, save=False
        )
        embedding = ti.train_textual_inversion(models["model"], models["clip"], models["vae"], _image_set(), settings).embedding
        lora = db.train_dreambooth(
            models["model"],
            models["clip"],
            models["vae"],
            _image_set(),
            db.DreamBoothSettings(mode="lora", steps=1, resolution=64, save=False, prior_preservation=False),
        ).lora
    assert all(torch.isfinite(v).all() for v in embedding.vectors.values()) and all(torch.isfinite(v).all() for v in lora.values())
    with pytest.raises(ValueError, match="full fine-tuning of a model stored in float8"):
        db.train_dreambooth(
            models["model"],
            models["clip"],
            models["vae"],
            _image_set(),
            db.DreamBoothSettings(mode="full", steps=1, resolution=64, save=False, prior_preservation=False),
        )


def test_partial_loading_under_a_small_memory_budget_trains_the_same(sd15_path, monkeypatch):
    """What --reserve-vram does: leave ComfyUI little memory, so it loads part of the model and
    offloads the rest; the training views cast the offloaded weights layer by layer."""
    import comfy.model_management as mm

    models = load(sd15_path)
    full, _ = _ti_gradient(models, "fp32")
    mm.unload_all_models()
    free = mm.get_free_memory(mm.get_torch_device())
    monkeypatch.setattr(mm, "EXTRA_RESERVED_VRAM", max(0, free - 300 * 1024**2))
    partial, trainer = _ti_gradient(models, "fp32")
    loaded, size = trainer.unet.patcher.loaded_size(), trainer.unet.patcher.model_size()
    print(f"partially loaded: {loaded / 2**20:.0f} of {size / 2**20:.0f} MB")
    assert loaded < size, "the budget must force a partial load"
    assert _cosine(partial, full) > 0.99999


# --------------------------------------------------------------------------- ComfyUI's own server


def _queue(server, prompt: dict, timeout: float = 600) -> dict:
    answer = server.post_json("/prompt", {"prompt": prompt})
    prompt_id = answer["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = server.get_json(f"/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(1)
    raise TimeoutError(f"prompt {prompt_id} did not finish; log:\n{server.log_tail()}")


def test_training_in_comfyuis_server_with_its_default_memory_management(sd15_path):
    """main.py on the GPU: since v0.16 ComfyUI streams weights with DynamicVRAM by default on NVIDIA
    (weights stay in CPU memory, LoRA patches are applied on the fly, force_patch_weights asserts).
    A full checkpoint save, and a LoRA trained over a model that carries a LoRA, go through it."""
    import sys

    sys.path.insert(0, str(TESTS_DIR / "browser"))
    import comfyui_runtime
    from comfy_process import ComfyServer

    with ComfyServer(comfyui_runtime.find_comfyui(), cpu=False) as server:
        checkpoints = Path(server.base_dir) / "models" / "checkpoints"
        (checkpoints / "tiny.safetensors").symlink_to(sd15_path)
        folder = Path(server.base_dir) / "input" / "gpu-subject"
        folder.mkdir(parents=True)
        from PIL import Image

        for i in range(3):
            Image.new("RGB", (64, 64), (40 * i, 120, 200)).save(folder / f"{i}.png")
        common = {
            "resolution": 64,
            "steps": 2,
            "prior_preservation": False,
            "num_class_images": 1,
            "learning_rate": "auto",
            "seed": 0,
            "overwrite": True,
        }
        train_inputs = {
            "model": ["1", 0],
            "clip": ["1", 1],
            "vae": ["1", 2],
            "image_set": ["2", 0],
            "instance_prompt": "a photo of sks dog",
            "class_prompt": "a photo of dog",
            "identifier": "",
        }
        base = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
            "2": {
                "class_type": "PersonalizeImageFolder",
                "inputs": {"folder": "gpu-subject", "path": "", "on_bad_file": "stop", "recursive": False, "allow_any_path": False},
            },
        }
        full = {
            **base,
            "3": {
                "class_type": "PersonalizeDreamBoothFinetune",
                "inputs": {**train_inputs, **common, "mode": "full", "file_name": "gpu-full"},
            },
        }
        result = _queue(server, _fill_defaults(server, full))
        assert result["status"]["status_str"] == "success", json.dumps(result["status"])[:3000] + server.log_tail()
        assert (checkpoints / "gpu-full.safetensors").is_file()
        log = server.log_text()
        print("DynamicVRAM:", "DynamicVRAM" in log or "dynamic" in log.lower())

        loras = Path(server.base_dir) / "models" / "loras"
        lora_file = _probe_lora(loras)
        over_lora = {
            **base,
            "4": {
                "class_type": "LoraLoader",
                "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_file, "strength_model": 1.0, "strength_clip": 1.0},
            },
            "3": {
                "class_type": "PersonalizeDreamBoothFinetune",
                "inputs": {**train_inputs, "model": ["4", 0], "clip": ["4", 1], **common, "mode": "lora", "file_name": "gpu-lora"},
            },
        }
        result = _queue(server, _fill_defaults(server, over_lora))
        assert result["status"]["status_str"] == "success", json.dumps(result["status"])[:3000] + server.log_tail()
        assert (loras / "gpu-lora.safetensors").is_file()


def _fill_defaults(server, prompt: dict) -> dict:
    """Every widget input the prompt leaves out, at its default (as the front end would send it)."""
    info = server.get_json("/object_info")
    for node in prompt.values():
        spec = info[node["class_type"]]["input"]
        for section in ("required", "optional"):
            for name, declaration in spec.get(section, {}).items():
                if name in node["inputs"] or not isinstance(declaration, list) or len(declaration) < 2:
                    continue
                options = declaration[1] if isinstance(declaration[1], dict) else {}
                if "default" in options:
                    node["inputs"][name] = options["default"]
                elif isinstance(declaration[0], list) and declaration[0] and section == "required":
                    node["inputs"][name] = declaration[0][0]
    return prompt


def _probe_lora(loras: Path) -> str:
    """A small LoRA on the tiny SD1.5 UNet's attention, as a model carrying patches before training."""
    import safetensors.torch

    name = "probe-lora.safetensors"
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    safetensors.torch.save_file(
        {
            f"{key}.lora_up.weight": torch.full((320, 2), 0.01),
            f"{key}.lora_down.weight": torch.full((2, 320), 0.01),
            f"{key}.alpha": torch.tensor(2.0),
        },
        str(loras / name),
    )
    return name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_sharded_optimizer_state_over_nccl_trains_as_one_process(tmp_path):
    """core.distributed's ZeRO-2 sharding on two GPUs (NCCL): the CPU test's checks, on CUDA."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    import test_distributed

    one, one_bytes = test_distributed.one_process("fused")
    for how in ("fused", "whole"):
        weights, states = test_distributed.two_processes(tmp_path, how, "shard", "cuda")
        reference = one if how == "fused" else test_distributed.one_process("whole")[0]
        for name in reference:
            assert torch.equal(weights[0][name], weights[1][name]), name
            torch.testing.assert_close(weights[0][name], reference[name], rtol=1e-4, atol=1e-5, msg=name)
        assert max(s["state_bytes"] for s in states) < 0.6 * one_bytes
