"""The memory-lean optimizer pieces (nodes/core/optimizers.py), in plain torch."""

from __future__ import annotations

import pytest
import torch
from core_package import core

optimizers = core("optimizers")


def _bf16_neighbours(x: float) -> tuple[float, float]:
    """The two bfloat16 numbers around ``x``: its float32 pattern cut to 16 bits, and one step out."""
    bits = int(torch.tensor([x], dtype=torch.float32).view(torch.int32)) & -65536
    inner = torch.tensor([bits], dtype=torch.int32).view(torch.float32)
    outer = torch.tensor([bits + 65536], dtype=torch.int32).view(torch.float32)
    return tuple(sorted((float(inner), float(outer))))


@pytest.mark.parametrize("value", [1.0 + 2.0**-10, -(3.0 + 2.0**-8), 0.05 + 1e-6, -1.7e-5])
def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased(value):
    low, high = _bf16_neighbours(value)
    assert low < value < high, "the value lies strictly between two bfloat16 numbers"
    values = torch.full((200_000,), value, dtype=torch.float32)
    target = torch.empty_like(values, dtype=torch.bfloat16)
    optimizers.stochastic_round_(target, values.clone(), torch.Generator().manual_seed(0))
    landed = set(target.float().unique().tolist())
    assert landed == {low, high}, "only the two neighbours, both of them"
    expected_up = (value - low) / (high - low)
    frequency_up = float((target.float() == high).double().mean())
    assert frequency_up == pytest.approx(expected_up, abs=0.01)
    assert float(target.double().mean()) == pytest.approx(value, abs=(high - low) * 0.01)
    nearest = values.to(torch.bfloat16)
    assert bool((nearest == nearest[0]).all()), "round-to-nearest would always give the same neighbour"


def test_stochastic_rounding_keeps_representable_values():
    exact = torch.randn(1000, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    target = torch.zeros_like(exact)
    optimizers.stochastic_round_(target, exact.float(), torch.Generator().manual_seed(2))
    assert torch.equal(target, exact)


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(64, 16, generator=g)
    targets = torch.randn(64, 8, generator=g)
    weight = torch.randn(8, 16, generator=g) * 0.1
    bias = torch.randn(8, generator=g) * 0.1
    return inputs, targets, weight, bias


def _train(make_optimizer, dtype=torch.float32, steps: int = 20, lr: float = 1e-2):
    inputs, targets, weight, bias = _problem()
    params = [torch.nn.Parameter(weight.to(dtype)), torch.nn.Parameter(bias.to(dtype))]
    optimizer = make_optimizer([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr)
    losses = []
    for _ in range(steps):
        loss = ((inputs @ params[0].float().T + params[1].float() - targets) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return params, losses


def test_float32_adamw_matches_torch():
    ours, our_losses = _train(lambda groups, lr: optimizers.AdamW(groups, lr=lr, weight_decay=1e-2))
    theirs, their_losses = _train(lambda groups, lr: torch.optim.AdamW(groups, lr=lr, weight_decay=1e-2, foreach=False))
    for a, b in zip(ours, theirs, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert our_losses[-1] < our_losses[0] * 0.9
    assert our_losses == pytest.approx(their_losses, rel=1e-6)


def test_bfloat16_adamw_follows_float32_where_plain_bfloat16_stalls():
    """lr far below bfloat16's resolution: plain rounding loses every update, ours keeps them."""
    lr, steps = 1e-4, 300
    reference, _ = _train(lambda groups, lr: torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, foreach=False), steps=steps, lr=lr)
    start = _problem()[2]
    lean, _ = _train(lambda groups, lr: optimizers.AdamW(groups, lr=lr, weight_decay=0.0, seed=3), dtype=torch.bfloat16, steps=steps, lr=lr)
    plain, _ = _train(
        lambda groups, lr: torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, foreach=False), dtype=torch.bfloat16, steps=steps, lr=lr
    )
    assert lean[0].dtype == torch.bfloat16
    wanted = reference[0].detach() - start
    moved_lean = lean[0].detach().float() - start.to(torch.bfloat16).float()
    moved_plain = plain[0].detach().float() - start.to(torch.bfloat16).float()
    cosine = torch.nn.functional.cosine_similarity(moved_lean.flatten(), wanted.flatten(), dim=0)
    assert cosine > 0.9, f"the bfloat16 weights move the way float32 ones do (cosine {cosine:.3f})"
    assert float(moved_lean.norm()) == pytest.approx(float(wanted.norm()), rel=0.2)
    assert moved_plain.norm() < 0.5 * wanted.norm(), "without stochastic rounding most updates are lost"


def test_bfloat16_states_stay_bfloat16():
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    optimizer = optimizers.AdamW([param], lr=0.1)  # a step far above bfloat16's resolution
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert {t.dtype for t in (optimizer.state[param]["exp_avg"], optimizer.state[param]["exp_avg_sq"])} == {torch.bfloat16}
    assert optimizer.state[param]["step"] == 1
    assert param.dtype == torch.bfloat16 and bool((param.detach() < 0.95).all())


def test_fused_backward_step_equals_step_after_backward_and_frees_gradients():
    def run(fused: bool):
        inputs, targets, _weight, _bias = _problem()
        layer = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
        torch.manual_seed(0)
        for module in layer:
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.2)
                torch.nn.init.zeros_(module.bias)
        optimizer = optimizers.AdamW(layer.parameters(), lr=1e-2)
        hooks = optimizers.FusedBackwardStep(optimizer) if fused else None
        grads_left = []
        for _ in range(5):
            loss = ((layer(inputs) - targets) ** 2).mean() + 0.5 * ((layer(inputs * 0.5) - targets) ** 2).mean()
            loss.backward()
            grads_left.append(sum(p.grad is not None for p in layer.parameters()))
            if not fused:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in layer.parameters()], grads_left, hooks

    separate, left_separate, _ = run(False)
    fused, left_fused, hooks = run(True)
    for a, b in zip(fused, separate, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert left_fused == [0] * 5, "every gradient was freed inside backward"
    assert left_separate == [4] * 5
    assert hooks.steps == 4 * 5, "one update per parameter per backward, although each is used twice"


def test_fused_backward_clips_each_tensor():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = optimizers.AdamW([param], lr=1.0, weight_decay=0.0, betas=(0.0, 0.0), eps=0.0)
    seen = []
    original = optimizer.step_parameter
    optimizer.step_parameter = lambda p, group=None: (seen.append(p.grad.norm().item()), original(p, group))
    optimizers.FusedBackwardStep(optimizer, max_grad_norm=0.5)
    (param * torch.tensor([30.0, 40.0, 0.0])).sum().backward()
    assert seen == [pytest.approx(0.5, rel=1e-5)]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="invalid AdamW"):
        optimizers.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=-1.0)


def test_large_tensors_are_updated_in_slices_with_the_same_result():
    g = torch.Generator().manual_seed(5)
    start = torch.randn(3 * (1 << 19) + 7, generator=g)  # more than one slice, a ragged last one
    grads = [torch.randn(start.shape, generator=g) for _ in range(3)]
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizer_ours = optimizers.AdamW([ours], lr=1e-3)
    optimizer_theirs = torch.optim.AdamW([theirs], lr=1e-3, fused=True)  # the kernel ours runs slice by slice
    for grad in grads:
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        optimizer_ours.step()
        optimizer_theirs.step()
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, start)


# --------------------------------------------------------------------------- on a GPU: no host round trips


class _CountingTorch:
    """Stands in for ``torch`` inside the optimizer module: checks every random call's device
    against its generator's, and counts tensors made from host values."""

    def __init__(self):
        self.made_from_host = 0

    def __getattr__(self, name):
        real = getattr(torch, name)
        if name in ("randint", "randn", "rand", "randperm", "normal"):

            def checked(*args, **kwargs):
                generator = kwargs.get("generator")
                if generator is not None:
                    assert "device" in kwargs, f"torch.{name} with a generator but no device"
                    assert torch.device(kwargs["device"]) == generator.device, f"torch.{name}: tensor and generator on other devices"
                return real(*args, **kwargs)

            return checked
        if name in ("tensor", "zeros", "full"):

            def counted(*args, **kwargs):
                self.made_from_host += 1
                return real(*args, **kwargs)

            return counted
        return real


def test_random_calls_name_their_generators_device_and_steps_make_no_host_round_trips(monkeypatch):
    """On CUDA a random call without device= fills a CPU tensor from a CUDA generator (an error at
    the first bf16 update); a tensor made from a host value, or a tensor read back as a number,
    stalls the GPU. After the first step (state set up) a step does neither."""
    counting = _CountingTorch()
    monkeypatch.setattr(optimizers, "torch", counting)
    reads = []
    for method in ("item", "__int__", "__float__", "__bool__"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _m=method, _o=original: (reads.append(_m), _o(self, *a))[1])
    params = [torch.nn.Parameter(torch.randn(3 * optimizers._CHUNK + 5).to(torch.bfloat16)), torch.nn.Parameter(torch.randn(7, 3))]
    optimizer = optimizers.AdamW(params, lr=1e-3, seed=1)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    counting.made_from_host, reads[:] = 0, []
    for _ in range(2):
        optimizer.step()
    assert counting.made_from_host == 0 and reads == [], (counting.made_from_host, reads)
    assert {int(s["step_tensor"]) for s in optimizer.state.values()} == {3}


@pytest.mark.parametrize("kind", ["torch", "ours-bf16"])
def test_full_training_bytes_is_what_a_step_holds(kind):
    """The estimate ComfyUI is given equals what weights, gradients and optimizer state then hold."""
    layer = torch.nn.Linear(300, 200)
    if kind == "ours-bf16":
        layer = layer.to(torch.bfloat16)
        optimizer = optimizers.AdamW(layer.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.randn(4, 300, dtype=layer.weight.dtype)).float().square().mean().backward()
    optimizer.step()
    params = list(layer.parameters())
    weights = sum(p.numel() for p in params)
    held = sum(p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size() for p in params) + optimizers.state_bytes(optimizer)
    estimate = optimizers.full_training_bytes(weights, layer.weight.dtype, "AdamW", fused_backward=False, own_state=kind == "ours-bf16")
    assert held == pytest.approx(estimate, rel=0.001)
    halves = optimizers.full_training_bytes(
        weights, layer.weight.dtype, "AdamW", fused_backward=False, shards=2, own_state=kind == "ours-bf16"
    )
    moments = optimizers.state_bytes(optimizer) - 4 * len(params)  # less each tensor's float32 step counter
    assert estimate - halves == moments // 2, "two processes: half the moments each"
