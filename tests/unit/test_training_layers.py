"""Training views in plain torch (nodes/core/training_layers.py and adapters.py): a view computes
what the model computes, its gradients are the model's, frozen weights are never saved for
backward, a LoRA bypass equals the weight change a loader applies, and own weights train."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_package import core

layers = core("training_layers")
adapters = core("adapters")


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.proj = torch.nn.Conv2d(8, 8, 1)
        self.ln = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 6)

    def forward(self, x):
        h = F.silu(self.norm(self.conv(x)))
        h = self.proj(h) + h
        h = self.ln(h.permute(0, 2, 3, 1))
        return self.fc(h)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.blocks[1].conv = torch.nn.Conv2d(6, 8, 3, padding=1)

    def forward(self, x):
        x = self.blocks[0](x).permute(0, 3, 1, 2)
        return self.blocks[1](x)


def _frozen_model(seed: int = 0) -> Model:
    """A model whose weights are inference tensors, as ComfyUI loads them."""
    torch.manual_seed(seed)
    with torch.inference_mode():
        model = Model()
    return model


def _cast(module, dtype, device):
    bias = module.bias.to(device, dtype) if getattr(module, "bias", None) is not None else None
    return module.weight.to(device, dtype), bias


def _plain_copy(model: Model) -> Model:
    """The same model with ordinary (non-inference) weights, for reference gradients."""
    copy = Model()
    copy.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    return copy


def _view(model, **kwargs):
    return layers.training_view(model, _cast, torch.float32, is_layer=lambda m: layers.layer_kind(m) is not None, **kwargs)


def _input(seed: int = 1):
    return torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(seed))


def test_the_shared_model_cannot_train_directly():
    model = _frozen_model()
    x = _input().requires_grad_()
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
        model(x).sum().backward()


def test_a_frozen_view_computes_the_model_and_its_input_gradient():
    model = _frozen_model()
    view = _view(model)
    x = _input().requires_grad_()
    y = view(x)
    (grad,) = torch.autograd.grad((y * y).sum(), x)
    reference = _plain_copy(model)
    x_ref = _input().requires_grad_()
    y_ref = reference(x_ref)
    (grad_ref,) = torch.autograd.grad((y_ref * y_ref).sum(), x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)
    assert list(view.parameters()) == [], "a frozen view trains nothing"
    assert all(p.grad is None for p in model.parameters())


def test_frozen_matmul_weights_are_not_kept_between_forward_and_backward():
    model = _frozen_model()
    view = _view(model)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = _input().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = view(x)
    weight_shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert saved and not [tuple(t.shape) for t in saved if tuple(t.shape) in weight_shapes]
    y.sum().backward()


def test_the_view_reads_the_weights_cast_gives_at_the_time():
    """Backward casts again: it sees what forward saw (ComfyUI streams and re-casts weights)."""
    model = _frozen_model()
    calls = []

    def counting_cast(module, dtype, device):
        calls.append(module)
        return _cast(module, dtype, device)

    view = layers.training_view(model, counting_cast, torch.float32, is_layer=lambda m: layers.layer_kind(m) is not None)
    x = _input().requires_grad_()
    y = view(x)
    forward_calls = len(calls)
    y.sum().backward()
    affine = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules())
    assert forward_calls == sum(layers.layer_kind(m) is not None for m in model.modules())
    assert len(calls) - forward_calls == affine, "one cast per linear/conv layer in backward"


@pytest.mark.parametrize("layer", ["blocks.0.conv", "blocks.1.proj", "blocks.1.fc"])
def test_lora_bypass_equals_the_weight_change_a_loader_applies(layer):
    model = _frozen_model()
    module = model.get_submodule(layer)
    g = torch.Generator().manual_seed(2)
    pair = adapters.LoraPair(tuple(module.weight.shape), 3, 6.0, generator=g)
    with torch.no_grad():
        pair.up.normal_(0, 0.3, generator=g)
    view = _view(model, adapters={layer: pair})
    merged = _plain_copy(model)
    with torch.no_grad():
        merged.get_submodule(layer).weight.add_(pair.delta())
    torch.testing.assert_close(view(_input()), merged(_input()), rtol=1e-5, atol=1e-5)
    loss = view(_input()).pow(2).mean()
    up, down = torch.autograd.grad(loss, [pair.up, pair.down])
    # The same gradients as through the merged weight: d/dup = d/dW @ down^T * scale, etc.
    merged_weight = merged.get_submodule(layer).weight
    (d_weight,) = torch.autograd.grad(merged(_input()).pow(2).mean(), merged_weight)
    flat = d_weight.reshape(d_weight.shape[0], -1)
    torch.testing.assert_close(up, flat @ pair.down.detach().t() * pair.scale, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(down, pair.up.detach().t() @ flat * pair.scale, rtol=1e-4, atol=1e-7)


def test_an_adapter_without_its_layer_is_refused():
    with pytest.raises(ValueError, match="found no layer"):
        _view(_frozen_model(), adapters={"blocks.0.nothing": adapters.LoraPair((8, 4), 2, 2.0)})


@pytest.mark.parametrize("own_dtype", [torch.float32, torch.bfloat16])
def test_own_weights_train_like_the_models_parameters(own_dtype):
    model = _frozen_model()
    view = _view(model, own_dtype=own_dtype, device=torch.device("cpu"))
    reference = _plain_copy(model)
    names = [n for n, _ in view.named_parameters()]
    assert names == [n for n, _ in reference.named_parameters()], "own weights under the model's names"
    assert all(p.dtype == own_dtype for p in view.parameters())
    loss = view(_input()).pow(2).mean()
    grads = dict(zip(names, torch.autograd.grad(loss, list(view.parameters())), strict=True))
    ref_loss = reference(_input()).pow(2).mean()
    ref_grads = dict(zip(names, torch.autograd.grad(ref_loss, list(reference.parameters())), strict=True))
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if own_dtype == torch.float32 else {"rtol": 0.05, "atol": 2e-3}
    for name in names:
        assert grads[name].dtype == own_dtype
        if own_dtype == torch.float32:
            torch.testing.assert_close(grads[name], ref_grads[name], **tolerance, msg=name)
        else:
            cosine = F.cosine_similarity(grads[name].float().flatten(), ref_grads[name].flatten(), dim=0)
            assert cosine > 0.99, (name, float(cosine))
    assert all(p.grad is None for p in model.parameters()), "the shared model got no gradient"


def test_checkpointed_view_recomputes_and_gives_the_same_gradients():
    model = _frozen_model()
    view = _view(model, own_dtype=torch.float32, device=torch.device("cpu"))
    checkpointed = layers.checkpointed_view(view)
    runs = []
    handle = view.blocks[1].conv.register_forward_hook(lambda *_: runs.append(1))  # a block's first layer: recomputed
    plain = torch.autograd.grad(view(_input()).pow(2).mean(), list(view.parameters()))
    plain_runs, runs[:] = len(runs), []
    ckpt = torch.autograd.grad(checkpointed(_input()).pow(2).mean(), list(view.parameters()))
    handle.remove()
    assert plain_runs == 1 and len(runs) == 2, "the checkpointed blocks run again in backward"
    for a, b in zip(plain, ckpt, strict=True):
        assert torch.equal(a, b)


def test_saved_activation_copies_make_an_in_place_residual_exact():
    """ComfyUI's CLIP adds residuals in place: without copies the saved input is overwritten."""
    norm = torch.nn.LayerNorm(5)
    x0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))

    def block(x):
        h = x * 1.0
        h += norm(h)  # overwrites what layer_norm saved
        return h.pow(2).sum()

    x = x0.clone().requires_grad_()
    with layers.saved_activation_copies():
        (grad,) = torch.autograd.grad(block(x), x)
    x_ref = x0.clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad((x_ref + norm(x_ref)).pow(2).sum(), x_ref)
    torch.testing.assert_close(grad, grad_ref)
