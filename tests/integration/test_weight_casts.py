"""How training reads frozen weights through ComfyUI's cast step (nodes/comfy_bridge/layers.py).

On ComfyUI v0.28+ every weight the training borrows through the offloadable cast is given back
with ComfyUI's own ``uncast_bias_weight`` (under DynamicVRAM that is what unpins its pages),
counted through ComfyUI's functions over a DreamBooth LoRA step; weights ComfyUI hands out as
they are (inference tensors) reach autograd as plain tensors on the same memory.
"""

from __future__ import annotations

import comfy.ops
import pytest
import torch
from harness import pack_module

layers = pack_module("nodes.comfy_bridge.layers")
db = pack_module("nodes.training.dreambooth")
TrainingImageSet = pack_module("nodes.core.training_images").TrainingImageSet


class _Counting:
    def __init__(self, monkeypatch):
        self.casts = 0
        self.uncasts = 0
        cast, uncast = comfy.ops.cast_bias_weight, getattr(comfy.ops, "uncast_bias_weight", None)

        def counting_cast(*args, **kwargs):
            self.casts += 1
            return cast(*args, **kwargs)

        monkeypatch.setattr(comfy.ops, "cast_bias_weight", counting_cast)
        if uncast is not None:

            def counting_uncast(*args, **kwargs):
                self.uncasts += 1
                return uncast(*args, **kwargs)

            monkeypatch.setattr(comfy.ops, "uncast_bias_weight", counting_uncast)


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 64, 64, 3, generator=g)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_every_cast_of_a_training_step_is_given_back(sd15, monkeypatch, mode):
    settings = db.DreamBoothSettings(
        resolution=64, steps=1, lora_rank=2, lora_alpha=2.0, prior_preservation=False, save=False, mode=mode, train_text_encoder=True
    )
    images = TrainingImageSet.from_image_batch(_images())
    plan = db.validate(settings, images, sd15["model"], sd15["clip"], None)
    with torch.inference_mode(False), torch.enable_grad():
        trainer = db.DreamBoothTrainer(sd15["model"], sd15["clip"], sd15["vae"], images, settings, plan)
        counting = _Counting(monkeypatch)
        trainer.step(1)
    if mode == "lora":  # full mode trains copies of its own: nothing frozen is read in a step
        assert counting.casts > 50, "the step reads its frozen weights through ComfyUI's cast"
    assert layers.borrowed_count() == 0, "a borrowed weight was never given back"
    if layers.OFFLOADABLE:
        assert counting.uncasts == counting.casts, (counting.casts, counting.uncasts)
    else:
        assert not hasattr(comfy.ops, "uncast_bias_weight") or counting.uncasts == 0


def test_an_inference_weight_reaches_autograd_without_a_copy():
    with torch.inference_mode():
        layer = comfy.ops.manual_cast.Linear(4, 4, dtype=torch.float32)
        layer.weight = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
        layer.bias = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    weight, bias = layers.borrow(layer, torch.float32, torch.device("cpu"))
    try:
        assert not weight.is_inference() and weight.data_ptr() == layer.weight.data_ptr()
        x = torch.randn(2, 3, 4, requires_grad=True)
        torch.nn.functional.linear(x, weight, bias).pow(2).sum().backward()  # saves the weight for backward
        assert x.grad is not None
    finally:
        layers.release(layer, weight, bias)
    assert layers.borrowed_count() == 0
