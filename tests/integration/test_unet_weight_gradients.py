"""Gradients w.r.t. the UNet's trainable weights, through the pass DreamBooth trains with.

Each check is one directional derivative along a seeded random direction in one trainable
tensor: autograd against Richardson-extrapolated central finite differences of
``training.common.diffusion_loss`` (ComfyUI's own ``apply_model`` through the training clone,
the model's own parameterisation, the eps/v-space loss). The tiny SD1.5 UNet computes in
float32 on the CPU and its ``apply_model`` casts the input to the model dtype, so the loss
cannot be taken in float64 here; the step is chosen for float32 instead (see ``_H``).

- LoRA mode: the A (down) and B (up) matrices of attention layers and of a 1x1-conv
  projection, every "attention+mlp" layer wrapped, B non-zero (at B = 0, A's gradient is 0).
- Full mode: the training view's own weights (``core.training_layers``) that the clone's
  DIFFUSION_MODEL wrapper routes the forward to: a ResBlock conv, cross-attention to_k,
  GroupNorm and LayerNorm weights, the timestep MLP.
- Full mode with gradient checkpointing (``checkpointed_view`` of the same view): the
  blocks do recompute in backward, the gradients equal those without checkpointing, and
  they agree with the same finite differences.

Latents are 8x8 (64x64 pixels), batch 1. Unloaded, a forward takes ~0.06 s (full) to
~0.15 s (LoRA, every weight wrapped) on the CPU; the file makes ~55 of them.
"""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import pytest
import torch
from harness import pack_module

common = pack_module("nodes.training.common")
diffusion_model = pack_module("nodes.comfy_bridge.diffusion_model")
adapters = pack_module("nodes.core.adapters")
training_layers = pack_module("nodes.core.training_layers")

# Finite-difference step along a unit-norm direction. Measured on the tiny SD1.5 UNet:
# Richardson estimates at h = 1 agree with autograd to <= 1.1e-3 relative for every tensor
# below; at h = 1/16 float32 rounding of the loss (about 1) alone costs up to 4e-3, and at
# h = 4 curvature does up to 1e-2 (the 1x1-conv LoRA). Weights have norm ~18, LoRA
# factors ~1-2, so h = 1 is a small step for the weights and for the change LoRA makes.
_H = 1.0
_REL = 0.01
# The smallest directional derivative measured here is ~1e-4: a disconnected or
# zero-gradient path would give a numeric derivative at the rounding floor (~1e-6).
_FLOOR = 1e-5

LORA_LAYERS = [
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q",  # self-attention, input block
    "middle_block.1.transformer_blocks.0.attn2.to_k",  # cross-attention, reads the text context
    "output_blocks.1.1.transformer_blocks.0.attn2.to_out.0",
    "input_blocks.1.1.proj_in",  # 1x1 conv: the LoRA is reshaped to a kernel
]
FULL_PARAMS = [
    "input_blocks.1.0.in_layers.2.weight",  # 3x3 conv in a ResBlock
    "middle_block.1.transformer_blocks.0.attn2.to_k.weight",  # cross-attention key
    "input_blocks.1.1.transformer_blocks.0.norm1.weight",  # LayerNorm
    "output_blocks.1.1.norm.weight",  # GroupNorm of a SpatialTransformer
    "time_embed.0.weight",  # sigma -> timestep -> embedding
]


def _batch(seed: int, timestep: int):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, 768, generator=g)  # CLIP-L-shaped conditioning, unit scale
    return latents, noise, torch.tensor([timestep]), context


def _loss_fn(unet, batch):
    latents, noise, timesteps, context = batch
    return lambda: common.diffusion_loss(unet, latents, noise, timesteps, context, None)


def _gradients(loss_fn, params):
    # A tensor the graph does not reach gets a zero gradient (not an error here), so a cut
    # graph fails the "all-zero gradient" assertions of the tests that concern it alone.
    with torch.inference_mode(False), torch.enable_grad():
        loss = loss_fn()
        return float(loss.detach()), torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


def _direction(param: torch.Tensor, name: str) -> torch.Tensor:
    """A unit-norm random direction in ``param``'s space, seeded by the tensor's name."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    direction = torch.randn(param.shape, generator=g)
    return (direction / direction.norm()).to(param.device, param.dtype)


def _analytic(grad: torch.Tensor, name: str) -> float:
    return float((grad * _direction(grad, name)).sum())


def _numeric(loss_fn, param: torch.Tensor, name: str, h: float = _H) -> float:
    """Finite-difference derivative of loss_fn along ``_direction(param, name)``.

    Richardson-extrapolated central differences at h and h/2 (truncation error O(h^4)),
    as in the Textual Inversion tests. ``param`` is restored bit for bit after each
    shifted evaluation.
    """
    direction = _direction(param, name)
    original = param.detach().clone()

    def shifted(t: float) -> float:
        with torch.inference_mode(False), torch.no_grad():
            param.add_(t * direction)
            try:
                return float(loss_fn())
            finally:
                param.copy_(original)

    central = {step: (shifted(step) - shifted(-step)) / (2 * step) for step in (h, h / 2)}
    return (4 * central[h / 2] - central[h]) / 3


def _assert_matches(analytic: float, numeric: float, name: str) -> None:
    assert abs(numeric) > _FLOOR, f"{name}: the loss must depend on this tensor (numeric {numeric:.3g})"
    assert analytic == pytest.approx(numeric, rel=_REL), f"{name}: autograd {analytic:.6g} vs finite differences {numeric:.6g}"


# --------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora_case(sd15):
    model = sd15["model"]
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode(False), torch.enable_grad():
        pairs = {}
        for key, shape in diffusion_model.unet_lora_weights(model, "attention+mlp").items():
            pairs[key] = adapters.LoraPair(shape, 4, 8.0, generator=g)
            with torch.no_grad():
                pairs[key].up.normal_(0, 0.05, generator=g)  # as after some training: A's gradient is then non-zero
        unet = diffusion_model.DiffusionModelForTraining(model, torch.float32, adapters=pairs)
        unet.load()
    loss_fn = _loss_fn(unet, _batch(seed=11, timestep=300))
    named = {}
    for layer in LORA_LAYERS:
        pair = pairs[f"diffusion_model.{layer}.weight"]
        named[f"{layer}.up"] = pair.up
        named[f"{layer}.down"] = pair.down
    _, grads = _gradients(loss_fn, list(named.values()))
    return SimpleNamespace(loss_fn=loss_fn, params=named, grads=dict(zip(named, grads, strict=False)))


@pytest.mark.parametrize("factor", ["up", "down"])
@pytest.mark.parametrize("layer", LORA_LAYERS)
def test_lora_weight_gradient_matches_finite_differences(lora_case, layer, factor):
    name = f"{layer}.{factor}"
    param, grad = lora_case.params[name], lora_case.grads[name]
    assert float(grad.abs().max()) > 0, f"{name}: all-zero gradient"
    _assert_matches(_analytic(grad, name), _numeric(lora_case.loss_fn, param, name), name)


# --------------------------------------------------------------------------- full fine-tuning


@pytest.fixture(scope="module")
def full_case(sd15):
    """One training view with weights of its own, run plainly by one training clone and through
    its checkpointed view by another; gradients of every own parameter from both."""
    model = sd15["model"]
    with torch.inference_mode(False), torch.enable_grad():
        plain = diffusion_model.DiffusionModelForTraining(model, torch.float32, own_dtype=torch.float32)
        plain.load()
        copy = plain.view
        plain_route = plain.route
        checkpointed = diffusion_model.DiffusionModelForTraining(model, torch.float32)
        checkpointed.load()
        checkpointed_route = checkpointed.route
        checkpointed_route.target = training_layers.checkpointed_view(copy)  # the same weights, checkpointed

    batch = _batch(seed=12, timestep=700)
    params = dict(copy.named_parameters())
    # A layer the view shares with the copy: how often it runs per forward + backward
    # shows whether the checkpointed blocks recompute in backward.
    runs: list[int] = []
    hook = copy.middle_block[1].proj_in.register_forward_hook(lambda *_: runs.append(1))
    try:
        plain_loss, plain_grads = _gradients(_loss_fn(plain, batch), list(params.values()))
        plain_runs, runs[:] = len(runs), []
        ckpt_loss, ckpt_grads = _gradients(_loss_fn(checkpointed, batch), list(params.values()))
        ckpt_runs = len(runs)
    finally:
        hook.remove()

    # Finite differences of the loss, once per tensor, through the plain clone. They are
    # the checkpointed clone's as well: its loss is the same function (its value at the
    # starting point is compared in test_checkpointing_recomputes_...; without grad its
    # blocks run their plain forward), so cases 2 and 3 share them and only their
    # autograd sides differ.
    numerics: dict[str, float] = {}

    def numeric(name: str) -> float:
        if name not in numerics:
            calls = plain_route.calls
            numerics[name] = _numeric(_loss_fn(plain, batch), params[name], name)
            assert plain_route.calls > calls, "the clone's forward must run the private copy"
        return numerics[name]

    return SimpleNamespace(
        params=params,
        numeric=numeric,
        plain=SimpleNamespace(route=plain_route, loss=plain_loss, grads=dict(zip(params, plain_grads, strict=False)), runs=plain_runs),
        checkpointed=SimpleNamespace(
            route=checkpointed_route, loss=ckpt_loss, grads=dict(zip(params, ckpt_grads, strict=False)), runs=ckpt_runs
        ),
    )


@pytest.mark.parametrize("name", FULL_PARAMS)
def test_full_finetune_weight_gradient_matches_finite_differences(full_case, name):
    param, grad = full_case.params[name], full_case.plain.grads[name]
    assert param.dtype == torch.float32 and param.requires_grad
    assert float(grad.abs().max()) > 0, f"{name}: all-zero gradient"
    _assert_matches(_analytic(grad, name), full_case.numeric(name), name)


def test_checkpointing_recomputes_and_gives_the_same_gradients(full_case):
    plain, ckpt = full_case.plain, full_case.checkpointed
    assert plain.route.calls >= 1 and ckpt.route.calls >= 1, "both clones must run the private copy"
    assert plain.runs == 1, "without checkpointing a layer runs once per forward + backward"
    assert ckpt.runs == 2, "the checkpointed view must recompute its blocks in backward"
    assert ckpt.loss == plain.loss, "the checkpointed view computes the same loss"
    assert any(float(g.abs().max()) > 0 for g in plain.grads.values())
    for name, grad in plain.grads.items():
        torch.testing.assert_close(ckpt.grads[name], grad, rtol=1e-5, atol=1e-8, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("name", FULL_PARAMS)
def test_checkpointed_weight_gradient_matches_finite_differences(full_case, name):
    grad = full_case.checkpointed.grads[name]
    assert float(grad.abs().max()) > 0, f"{name}: all-zero gradient"
    _assert_matches(_analytic(grad, name), full_case.numeric(name), name)
