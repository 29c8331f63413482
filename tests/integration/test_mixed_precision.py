"""The CUDA precision paths, exercised on the CPU: float16 and bfloat16 compute under
``torch.autocast("cpu")`` on fp16-stored weights, through the same precision policy a GPU run
takes (nodes/core/precision.py). Gradients agree with float32 ones and are not flushed to zero;
loss scaling is what keeps small ones; the conditioning is CLIP Text Encode's whatever the
compute dtype; fp8-stored models train Textual Inversion and LoRA and refuse full fine-tuning.

Also the memory side that the CPU can show: nothing loads the model just to hash it, and a
training step does not reload it.
"""

from __future__ import annotations

import uuid

import comfy.model_management
import comfy.sd
import pytest
import torch
from harness import checkpoint_in_models, pack_module, run_node

ti = pack_module("nodes.training.textual_inversion")
db = pack_module("nodes.training.dreambooth")
common = pack_module("nodes.training.common")
diffusion_model = pack_module("nodes.comfy_bridge.diffusion_model")
TrainingImageSet = pack_module("nodes.core.training_images").TrainingImageSet

# A trained model's gradients are far smaller than the tiny random model's: the loss is shrunk
# by this much to show what float16 does to them (measured: every element flushed to 0 unscaled).
SHRINK = 1e-5


def _load(dtype: torch.dtype | None) -> dict:
    import folder_paths

    path = folder_paths.get_full_path("checkpoints", checkpoint_in_models("sd15"))
    options = {} if dtype is None else {"dtype": dtype}
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            path, model_options=options, embedding_directory=folder_paths.get_folder_paths("embeddings")
        )[:3]
    return {"model": model, "clip": clip, "vae": vae}


@pytest.fixture(scope="module")
def sd15_fp16():
    """The tiny SD1.5 checkpoint with its UNet stored in float16 (as on most GPUs)."""
    return _load(torch.float16)


def _images(count: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(count, 1, 1, 3, generator=g) + 0.2 * torch.rand(count, size, size, 3, generator=g)).clamp(0, 1)


def _ti_trainer(models, precision: str):
    settings = ti.TextualInversionSettings(
        trigger_word="<mp>", init_text="cat", steps=1, resolution=64, save=False, seed=3, precision=precision
    )
    init, _ = ti.initial_vectors(settings, models["clip"], None)
    return ti.TextualInversionTrainer(
        models["model"], models["clip"], models["vae"], TrainingImageSet.from_image_batch(_images()), settings, init
    )


def _ti_gradient(trainer, shrink: float = 1.0, scaled: bool = True) -> torch.Tensor:
    """The vectors' gradient on the trainer's first batch, through its precision policy."""
    batch = trainer.sampler.draw()
    batch.timesteps[:] = 500
    cond, pooled = trainer.encoder.encode(["a photo of <mp>"] * batch.latents.shape[0], trainer.unet.needs_pooled)
    loss = common.diffusion_loss(trainer.unet, batch.latents, batch.noise, batch.timesteps, cond, pooled) * shrink
    scaler = trainer.scaler if scaled else torch.amp.GradScaler("cpu", enabled=False)
    scaler.scale(loss).backward()
    scaler.unscale_(trainer.optimizer)
    grad = trainer.vectors["clip_l"].grad.detach().clone()
    if scaler.is_enabled():
        scaler.update()  # no step: the next gradient is taken from the same vectors
    trainer.optimizer.zero_grad(set_to_none=True)
    return grad


def _agreement(grad: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    grad, reference = grad.double(), reference.double()
    cosine = float(torch.nn.functional.cosine_similarity(grad.flatten(), reference.flatten(), dim=0))
    relative = float((grad - reference).norm() / reference.norm())
    return cosine, relative


@pytest.fixture(scope="module")
def ti_gradients(sd15_fp16):
    with torch.inference_mode(False), torch.enable_grad():
        trainers = {p: _ti_trainer(sd15_fp16, p) for p in ("fp32", "fp16", "bf16")}
        for name, trainer in trainers.items():
            assert trainer.unet.compute_dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
        return {
            "fp32": _ti_gradient(trainers["fp32"]),
            "fp16": _ti_gradient(trainers["fp16"]),
            "bf16": _ti_gradient(trainers["bf16"]),
            "fp32 small": _ti_gradient(trainers["fp32"], SHRINK),
            "fp16 small scaled": _ti_gradient(trainers["fp16"], SHRINK),
            "fp16 small unscaled": _ti_gradient(trainers["fp16"], SHRINK, scaled=False),
            "scaler": trainers["fp16"].scaler,
            "bf16 scaler": trainers["bf16"].scaler,
        }


def test_textual_inversion_gradients_in_half_precision_agree_with_float32(ti_gradients):
    for name, floor in (("fp16", 0.999), ("bf16", 0.99)):
        cosine, relative = _agreement(ti_gradients[name], ti_gradients["fp32"])
        print(f"{name}: cosine {cosine:.5f}, relative error {relative:.4f}")
        assert cosine > floor and relative < (0.05 if name == "fp16" else 0.15), name
        assert (ti_gradients[name] != 0).float().mean() > 0.99, f"{name}: gradient elements flushed to zero"
    assert ti_gradients["scaler"].is_enabled() and not ti_gradients["bf16 scaler"].is_enabled(), "float16 is scaled, bfloat16 not"


def test_loss_scaling_keeps_the_small_gradients_float16_would_flush(ti_gradients):
    reference = ti_gradients["fp32 small"]
    cosine, relative = _agreement(ti_gradients["fp16 small scaled"], reference)
    unscaled_zero = float((ti_gradients["fp16 small unscaled"] == 0).float().mean())
    print(f"loss x{SHRINK:g}: scaled cosine {cosine:.5f}, relative error {relative:.4f}; unscaled: {unscaled_zero:.0%} of elements zero")
    assert cosine > 0.999 and relative < 0.05
    assert unscaled_zero > 0.5, "without scaling float16 loses these gradients"


def test_the_conditioning_is_clip_text_encodes_whatever_the_compute_dtype(sd15_fp16):
    clip = sd15_fp16["clip"]
    with torch.inference_mode(False), torch.no_grad():
        trainer = _ti_trainer(sd15_fp16, "fp16")
        ours, _ = trainer.encoder.encode(["a photo of a cat"])
        with trainer.unet.autocast():
            in_autocast, _ = trainer.encoder.encode(["a photo of a cat"])
    (conditioning,) = run_node("CLIPTextEncode", clip=clip, text="a photo of a cat")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, conditioning[0][0], rtol=1e-5, atol=1e-5)
    assert not torch.equal(in_autocast.float(), ours), "the text encoder must not run under the diffusion model's autocast"


@pytest.mark.parametrize("mode, precision, floor", [("lora", "fp16", 0.999), ("lora", "bf16", 0.99), ("full", "bf16", 0.98)])
def test_dreambooth_gradients_in_half_precision_agree_with_float32(sd15_fp16, mode, precision, floor):
    """One step's gradients of what trains (LoRA factors; the full copy's weights) at t = 500."""
    images = TrainingImageSet.from_image_batch(_images())
    grads = {}
    for p in ("fp32", precision):
        settings = db.DreamBoothSettings(
            mode=mode,
            steps=1,
            resolution=64,
            save=False,
            seed=8,
            prior_preservation=False,
            lora_rank=4,
            lora_alpha=4.0,
            precision=p,
            full_bf16=False,
            fused_backward=False,
            max_grad_norm=0.0,
        )
        with torch.inference_mode(False), torch.enable_grad():
            plan = db.validate(settings, images, sd15_fp16["model"], sd15_fp16["clip"], None)
            trainer = db.DreamBoothTrainer(sd15_fp16["model"], sd15_fp16["clip"], sd15_fp16["vae"], images, settings, plan)
            batch = trainer.instance.draw()
            batch.timesteps[:] = 500
            loss, _ = trainer.losses(batch)
            trainer.scaler.scale(loss).backward()
            trainer.scaler.unscale_(trainer.optimizer)
            grads[p] = torch.cat([q.grad.detach().float().flatten() for q in trainer.params if q.grad is not None])
    cosine, relative = _agreement(grads[precision], grads["fp32"])
    print(f"DreamBooth {mode} {precision}: cosine {cosine:.5f}, relative error {relative:.4f}")
    assert cosine > floor
    assert (grads[precision] != 0).float().mean() > 0.5 * (grads["fp32"] != 0).float().mean()


# --------------------------------------------------------------------------- fp8-stored models


@pytest.fixture(scope="module")
def sd15_fp8():
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        pytest.skip("this torch has no float8_e4m3fn")
    models = _load(dtype)
    assert diffusion_model.storage_dtype(models["model"]) == dtype
    return models


def test_an_fp8_model_trains_textual_inversion_over_its_frozen_weights(sd15_fp8, embeddings_dir):
    before = {k: v.clone() for k, v in sd15_fp8["model"].model.diffusion_model.state_dict().items()}
    settings = ti.TextualInversionSettings(
        trigger_word=f"<f{uuid.uuid4().hex[:6]}>",
        init_text="cat",
        steps=2,
        resolution=64,
        save=False,
        learning_rate="0.01",
        precision="bf16",
    )
    with torch.inference_mode():
        result = ti.train_textual_inversion(
            sd15_fp8["model"], sd15_fp8["clip"], sd15_fp8["vae"], TrainingImageSet.from_image_batch(_images()), settings
        )
    start, _ = ti.initial_vectors(settings, sd15_fp8["clip"], None)
    assert not torch.equal(result.embedding.vectors["clip_l"], start["clip_l"])
    assert all(torch.isfinite(torch.tensor(result.losses.raw["loss"])))
    after = sd15_fp8["model"].model.diffusion_model.state_dict()
    assert all(torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)) for k, v in before.items() if v.dtype.itemsize == 1)


def test_an_fp8_model_trains_a_lora_and_refuses_full_fine_tuning(sd15_fp8):
    images = TrainingImageSet.from_image_batch(_images())
    settings = db.DreamBoothSettings(mode="lora", steps=1, resolution=64, save=False, prior_preservation=False, lora_rank=2, lora_alpha=2.0)
    with torch.inference_mode():
        result = db.train_dreambooth(sd15_fp8["model"], sd15_fp8["clip"], sd15_fp8["vae"], images, settings)
    assert result.lora and all(torch.isfinite(v).all() for v in result.lora.values())
    full = db.DreamBoothSettings(mode="full", steps=1, resolution=64, save=False, prior_preservation=False)
    with pytest.raises(ValueError, match=r"full fine-tuning of a model stored in float8_e4m3fn.*train a LoRA"):
        db.train_dreambooth(sd15_fp8["model"], sd15_fp8["clip"], sd15_fp8["vae"], images, full)


# --------------------------------------------------------------------------- memory


def test_nothing_loads_the_model_to_hash_it_and_steps_do_not_reload_it(sd15, monkeypatch):
    calls = []
    original = comfy.model_management.load_models_gpu

    def recording(models, *args, **kwargs):
        calls.append(list(models))
        return original(models, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", recording)
    diffusion_model.model_identity(sd15["model"])
    assert calls == [], "model_identity loads nothing"
    with torch.inference_mode(False), torch.enable_grad():
        trainer = _ti_trainer(sd15, "auto")
        assert any(trainer.unet.patcher in call for call in calls), "prepared once"
        calls.clear()
        for step in (1, 2):
            trainer.step(step)
    assert not any(trainer.unet.patcher in call for call in calls), "a training step never reloads the model"
