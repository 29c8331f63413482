"""SD paths the family seam opened: a v-prediction SD2 model, SDXL's pooled `y`, a non-square SDXL
bucket, and sampling a user patched (ModelSamplingDiscrete / ModelSamplingContinuousEDM nodes).

Each trains on the objective and the noise levels the model's sampling (as patched) defines;
gradients through the training pass are checked against Richardson-extrapolated central
differences.
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import pack_module, richardson_check, run_node

common = pack_module("nodes.training.common")
diffusion_model = pack_module("nodes.comfy_bridge.diffusion_model")
text_encoders = pack_module("nodes.comfy_bridge.text_encoders")
adapters = pack_module("nodes.core.adapters")
training_math = pack_module("nodes.core.training_math")


def _check(loss_fn, params, h: float, seed: int = 0, rel: float = 0.02) -> float:
    return richardson_check(loss_fn, params, h, seed=seed, rel=rel)


def _lora_unet(model, clip, **kwargs):
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode(False), torch.enable_grad():
        key, shape = sorted(diffusion_model.unet_lora_weights(model, "attention").items())[-1]
        pair = adapters.LoraPair(shape, 2, 2.0, generator=g)
        with torch.no_grad():
            pair.up.normal_(0, 0.2, generator=g)
        unet = diffusion_model.DiffusionModelForTraining(model, torch.float32, adapters={key: pair}, **kwargs)
        unet.load(clip.patcher)
    return unet, pair


def test_v_prediction_sd2_trains_on_the_v_objective(sd2):
    """A ModelSamplingDiscrete node makes the tiny SD2 a v-prediction model (as SD2-768 is)."""
    (model,) = run_node("ModelSamplingDiscrete", model=sd2["model"], sampling="v_prediction", zsnr=False)
    assert diffusion_model.prediction_type(model) == "v"
    sampler, _ = diffusion_model.noise_level_sampler(model, "auto", 64)
    assert sampler.discrete
    unet, pair = _lora_unet(model, sd2["clip"], noise_levels=sampler)
    assert unet.prediction == "v"
    with torch.no_grad():
        cond, _ = text_encoders.encode_prompt(sd2["clip"], "a photo of sks dog")
    g = torch.Generator().manual_seed(5)
    latents, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    timesteps = torch.tensor([400])
    context = cond.float().clone().requires_grad_(True)

    def loss():
        return common.diffusion_loss(unet, latents, noise, timesteps, context, None)

    _check(loss, [context], h=0.05 * float(context.detach().norm()))
    _check(loss, list(pair.parameters()), h=0.5, seed=1)
    # The v loss is the denoised error weighted √(σ²+1)/σ, not the eps weight 1/σ.
    with torch.no_grad():
        sigma = unet.sigmas(timesteps)
        denoised = unet.denoise(unet.noisy(latents, noise, sigma), sigma, context)
        v = training_math.prediction_loss(denoised.float(), latents, sigma, "v")
        eps = training_math.prediction_loss(denoised.float(), latents, sigma, "eps")
    torch.testing.assert_close(v / eps, (sigma**2 + 1).cpu())
    with torch.no_grad():
        torch.testing.assert_close(loss(), v.mean())


def test_sdxl_gradient_reaches_the_pooled_text_embedding(tiny_sdxl_model, sdxl_clip):
    unet, _ = _lora_unet(tiny_sdxl_model, sdxl_clip)
    with torch.no_grad():
        cond, pooled = text_encoders.encode_prompt(sdxl_clip, "a photo of sks dog")
    g = torch.Generator().manual_seed(6)
    latents, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    pooled = pooled.float().clone().requires_grad_(True)

    def loss():
        return common.diffusion_loss(unet, latents, noise, torch.tensor([300]), cond.float(), pooled)

    _check(loss, [pooled], h=0.05 * float(pooled.detach().norm()))


def test_a_non_square_sdxl_bucket_is_conditioned_on_its_own_size(tiny_sdxl_model, sdxl_clip):
    """SDXL's size vector comes from the latent's own shape (a 128x64 bucket), built by the model's extra_conds."""
    unet, _ = _lora_unet(tiny_sdxl_model, sdxl_clip)
    with torch.no_grad():
        cond, pooled = text_encoders.encode_prompt(sdxl_clip, "a photo of sks dog")
        x = torch.zeros(1, 4, 8, 16)
        y = unet.conditioning(x, cond, pooled)["y"]
        expected = tiny_sdxl_model.model.encode_adm(
            pooled_output=pooled, width=128, height=64, target_width=128, target_height=64, crop_w=0, crop_h=0, device=x.device
        )
        assert torch.equal(y, expected)
        square = unet.conditioning(torch.zeros(1, 4, 8, 8), cond, pooled)["y"]
        assert not torch.equal(square, y)
        out = unet.denoise(torch.randn(1, 4, 8, 16), torch.tensor([2.0]), cond, pooled)
    assert out.shape == (1, 4, 8, 16)


def test_a_continuous_edm_patch_trains_on_its_schedule_and_objective(tiny_sdxl_model, sdxl_clip):
    """ModelSamplingContinuousEDM (edm, σd = 0.5) on SDXL: noise levels log-uniform between its σ
    bounds, the v objective with that σd, gradients still exact."""
    (model,) = run_node("ModelSamplingContinuousEDM", model=tiny_sdxl_model, sampling="edm", sigma_max=80.0, sigma_min=0.002)
    assert diffusion_model.prediction_type(model) == "v" and diffusion_model.sigma_data(model) == 0.5
    sampler, note = diffusion_model.noise_level_sampler(model, "auto", 64)
    assert sampler.scheme == "schedule" and "as patched" in note
    draws = sampler.draw(4096, torch.Generator().manual_seed(0))
    assert float(draws.min()) >= 0.002 and float(draws.max()) <= 80.0
    assert float(draws.log().median()) == pytest.approx((math.log(0.002) + math.log(80.0)) / 2, abs=0.3)
    unet, pair = _lora_unet(model, sdxl_clip, noise_levels=sampler)
    assert unet.sigma_data == 0.5
    with torch.no_grad():
        cond, pooled = text_encoders.encode_prompt(sdxl_clip, "a photo of sks dog")
    g = torch.Generator().manual_seed(8)
    latents, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    sigmas = torch.tensor([1.5])

    def loss():
        return common.diffusion_loss(unet, latents, noise, sigmas, cond.float(), pooled.float())

    _check(loss, list(pair.parameters()), h=0.5, seed=2)
