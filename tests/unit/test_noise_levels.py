"""Noise levels and the objectives of the family seam (nodes/core/training_math.py), in plain torch.

Known answers: the flow-matching velocity loss worked out from its definition, the loss weights
of each objective against the definitions of eps, v and velocity, and each noise-level scheme
against its formula on the same random draws.
"""

from __future__ import annotations

import math

import pytest
import torch
from core_package import core

tm = core("training_math")
trainer = core("trainer")


def test_flow_loss_is_the_velocity_error():
    """x_t = σ·n + (1 − σ)·x0, the model's velocity v̂ gives D = x_t − σ·v̂ (ComfyUI's CONST): the
    'flow' loss is |v̂ − (n − x0)|² per sample, whatever D's parameterisation."""
    g = torch.Generator().manual_seed(3)
    x0, noise, v_hat = (torch.randn(2, 16, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.3, 0.85], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    x_t = s * noise + (1 - s) * x0
    denoised = x_t - s * v_hat
    expected = (v_hat - (noise - x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(tm.prediction_loss(denoised, x0, sigma, "flow"), expected)
    # ComfyUI core's x0 loss is σ² times it.
    torch.testing.assert_close(tm.prediction_loss(denoised, x0, sigma, "x0"), expected * sigma**2)


def test_eps_and_v_losses_are_their_definitions():
    g = torch.Generator().manual_seed(4)
    x0, noise, out = (torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.1, 1.0, 7.0], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    x = x0 + s * noise
    # eps: D = x − σ·ε̂
    torch.testing.assert_close(tm.prediction_loss(x - s * out, x0, sigma, "eps"), (out - noise).pow(2).flatten(1).mean(1))
    # v (σ_data = 0.5, as a ModelSamplingContinuousEDM node may set): D = x·σd²/(σ²+σd²) − v̂·σ·σd/√(σ²+σd²)
    sd = 0.5
    denoised = x * sd**2 / (s**2 + sd**2) - out * s * sd / (s**2 + sd**2).sqrt()
    # The v that makes D exactly x0: solve D(v) = x0 for v.
    v_target = ((x * sd**2 / (s**2 + sd**2)) - x0) * (s**2 + sd**2).sqrt() / (s * sd)
    torch.testing.assert_close(tm.prediction_loss(denoised, x0, sigma, "v", sd), (out - v_target).pow(2).flatten(1).mean(1))


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="unknown prediction type"):
        tm.prediction_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), "edm-ish")


def test_discrete_timesteps_draw_as_before():
    """SD keeps its stream: the default sampler draws exactly what sample_timesteps drew."""
    a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(tm.SigmaSampler("timesteps").draw(5, a), tm.sample_timesteps(5, b))
    batch_sampler = trainer.BatchSampler([[trainer.LatentSample(torch.zeros(4, 2, 2), None, None)]], 0, 3, "cpu")
    assert batch_sampler.noise_levels.discrete and batch_sampler.draw().timesteps.dtype == torch.int64


@pytest.mark.parametrize("scheme", ["uniform", "logit-normal", "flux-shift"])
def test_flow_schemes_follow_their_formulas(scheme):
    shift = math.exp(1.15)
    sampler = tm.SigmaSampler(scheme, shift=shift)
    draws = sampler.draw(4096, torch.Generator().manual_seed(1))
    reference = torch.Generator().manual_seed(1)
    if scheme == "uniform":
        t = torch.rand(4096, generator=reference, dtype=torch.float64)
    else:
        t = torch.sigmoid(torch.randn(4096, generator=reference, dtype=torch.float64))
        if scheme == "flux-shift":
            t = shift * t / (1 + (shift - 1) * t)
    torch.testing.assert_close(draws, t.clamp(tm.FLOW_SIGMA_FLOOR, 1).float())
    assert draws.min() >= tm.FLOW_SIGMA_FLOOR and draws.max() <= 1.0
    if scheme == "flux-shift":
        assert draws.median() > 0.7  # shifted towards noise: sigmoid(0)=0.5 → 3.16·0.5/(1+2.16·0.5) ≈ 0.76


def test_sigma_range_scales_flow_sigmas_into_it():
    draws = tm.SigmaSampler("uniform", sigma_range=(0.875, 1.0)).draw(2048, torch.Generator().manual_seed(2))
    assert draws.min() >= 0.875 and draws.max() <= 1.0 and draws.std() > 0.02


def test_schedule_is_uniform_through_the_table():
    table = torch.linspace(1.0, 0.0, 11, dtype=torch.float64) ** 2  # any monotone schedule
    draws = tm.SigmaSampler("schedule", table=table).draw(8, torch.Generator().manual_seed(5))
    u = torch.rand(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 10
    low = u.floor()
    expected = table[low.long()] * (1 - (u - low)) + table[(low.long() + 1).clamp(max=10)] * (u - low)
    torch.testing.assert_close(draws, expected.float())


def test_time_shift_and_flux_mu():
    t = torch.tensor([0.25, 0.5, 0.75])
    torch.testing.assert_close(tm.time_shift(t, 3.0), 3 * t / (1 + 2 * t))
    assert tm.flux_resolution_mu(256) == pytest.approx(0.5) and tm.flux_resolution_mu(4096) == pytest.approx(1.15)
    assert tm.flux_resolution_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)
