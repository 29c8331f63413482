"""Optimizers for memory-lean full fine-tuning, in plain torch (no ComfyUI import).

Full fine-tuning with float32 AdamW holds four copies of the model beside the one being
served: weights, gradients and two moment estimates. Two standard ways down, both here:

- ``AdamW`` keeps a bfloat16 parameter's weights *and* moments in bfloat16. The update is
  computed in float32 and written back with stochastic rounding: an update far below
  bfloat16's resolution (lr 5e-6 on a weight of 0.05 is 2 % of one step of the format)
  lands with the matching probability instead of never, so the weights follow the float32
  trajectory in expectation. float32 parameters are updated exactly as
  ``torch.optim.AdamW(fused=True)`` updates them (the same kernel, slice by slice).
- ``FusedBackwardStep`` steps each parameter from a post-accumulate-grad hook, the moment
  its gradient is complete in backward, and frees that gradient: no whole-model gradient
  ever exists. Clipping can then only see one tensor at a time.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any, Protocol

import torch

_LOW_HALF = -65536  # int32 mask 0xFFFF0000: keeps the bits a bfloat16 has


def stochastic_round_(
    target: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Write float32 ``value`` into bfloat16 ``target``, rounding up with probability equal to
    the fraction of a bfloat16 step that ``value`` lies above the lower neighbour.

    Works on the bit pattern: random low 16 bits are added to the float32 pattern and then
    cut off. Floats are sign-magnitude, so this is unbiased for negative values as well.
    ``value`` (a contiguous float32 tensor) is used as scratch space and overwritten.
    ``noise``: int32 values uniform in [0, 2**16) shaped like ``value``; drawn from
    ``generator`` when not given.
    """
    if target.dtype != torch.bfloat16:
        target.copy_(value)
        return target
    if value.dtype != torch.float32 or not value.is_contiguous():
        raise ValueError("stochastic rounding needs a contiguous float32 value")
    bits = value.view(torch.int32)
    if noise is None:
        noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    bits.add_(noise.view(bits.shape))
    bits.bitwise_and_(_LOW_HALF)
    target.copy_(value)  # exact: the low bits are zero
    return target


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter) that can step one parameter at a time.

    Moments are kept in the parameter's dtype. bfloat16 parameters are updated in float32
    and stochastically rounded back (see the module docstring); float32 ones in place.
    Both use torch's fused AdamW kernel, or its single-tensor arithmetic where torch or
    the device has no such kernel.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        seed: int = 0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._noise: dict[torch.device, RoundingNoise] = {}
        self._scratch: dict[torch.device, list[torch.Tensor]] = {}
        self._group_of: dict[int, dict[str, Any]] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    def _scratch_buffers(self, device: torch.device) -> list[torch.Tensor]:
        if device not in self._scratch:
            self._scratch[device] = [torch.empty(_CHUNK, dtype=torch.float32, device=device) for _ in range(5)]
        return self._scratch[device]

    def _rounding_noise(self, device: torch.device) -> RoundingNoise:
        if device not in self._noise:
            self._noise[device] = RoundingNoise(self._generator(device), random.Random(self._seed))
        return self._noise[device]

    def group_of(self, param: torch.Tensor) -> dict[str, Any]:
        if id(param) not in self._group_of:
            self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        return self._group_of[id(param)]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.step_parameter(param, group)
        return loss

    @torch.no_grad()
    def step_parameter(self, param: torch.Tensor, group: dict[str, Any] | None = None) -> None:
        """One AdamW update of ``param`` from its ``.grad``."""
        group = group if group is not None else self.group_of(param)
        if param.grad is None:
            return
        if param.grad.is_sparse:
            raise RuntimeError("AdamW does not support sparse gradients")
        state = self.state[param]
        if not state:
            state["step"] = 0
            # The fused kernel reads the step from a tensor on the parameter's device; kept
            # there and counted there, so a step never waits for a host-to-device copy.
            state["step_tensor"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        state["step_tensor"].add_(1)
        step = state["step"]
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        tensors = (param, param.grad, state["exp_avg"], state["exp_avg_sq"])
        scratch = None
        if all(x.is_contiguous() for x in tensors):
            # Elementwise, so in slices: float32 temporaries stay a few MB for any layer size.
            flat = [x.view(-1) for x in tensors]
            pieces = [[x[i : i + _CHUNK] for x in flat] for i in range(0, param.numel(), _CHUNK)]
            scratch = self._scratch_buffers(param.device)
        else:
            pieces = [list(tensors)]
        noise = self._rounding_noise(param.device) if param.dtype == torch.bfloat16 else None
        for weight, grad, exp_avg, exp_avg_sq in pieces:
            _adamw_update(
                weight,
                grad,
                exp_avg,
                exp_avg_sq,
                lr,
                beta1,
                beta2,
                eps,
                decay,
                bias_correction1,
                bias_correction2_sqrt,
                noise,
                scratch,
                state["step_tensor"],
            )


_CHUNK = 1 << 20


class RoundingNoise:
    """Uniform 16-bit noise for stochastic rounding, cheaply.

    Drawing fresh random numbers for every element costs more than the whole AdamW update
    on the CPU (torch's CPU generator is serial). Each rounding instead takes a slice at a
    random offset of a buffer of ``2 * _CHUNK`` draws, redrawn after ``reuse`` slices:
    every element still gets uniform noise (rounding stays unbiased); only elements of
    different slices may share draws, which does not bias either of them.

    The buffer is drawn on the parameters' device from ``generator`` (a generator of that
    device); the offsets come from ``offsets``, a host-side stream, so taking a slice
    never waits for the device.
    """

    def __init__(self, generator: torch.Generator, offsets: random.Random, reuse: int = 256):
        self.generator = generator
        self.offsets = offsets
        self.reuse = reuse
        self.buffer: torch.Tensor | None = None
        self.used = 0

    def _draw(self, count: int) -> torch.Tensor:
        return torch.randint(0, 1 << 16, (count,), dtype=torch.int32, device=self.generator.device, generator=self.generator)

    def take(self, count: int) -> torch.Tensor:
        if count > _CHUNK:
            return self._draw(count)
        if self.buffer is None or self.used >= self.reuse:
            self.buffer = self._draw(2 * _CHUNK)
            self.used = 0
        self.used += 1
        start = self.offsets.randrange(_CHUNK + 1)
        return self.buffer[start : start + count]


def _adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    decay: float,
    bias_correction1: float,
    bias_correction2_sqrt: float,
    noise: RoundingNoise | None,
    scratch: list[torch.Tensor] | None,
    step: torch.Tensor,
) -> None:
    """torch.optim.AdamW's update (its fused kernel where torch has one, else its single-tensor
    arithmetic); bfloat16 tensors go through float32.

    ``scratch``: five float32 buffers at least as long as the (flat) tensors; reusing them
    spares an allocation, and its page faults, per temporary.
    """
    count = param.numel()

    def as_float32(tensor: torch.Tensor, slot: int) -> torch.Tensor:
        if tensor.dtype == torch.float32:
            return tensor
        if scratch is None:
            return tensor.to(torch.float32).contiguous()
        return scratch[slot][:count].view(tensor.shape).copy_(tensor)

    weight, avg, avg_sq, grad = (as_float32(x, i) for i, x in enumerate((param, exp_avg, exp_avg_sq, grad)))

    if not _fused_update(weight, grad, avg, avg_sq, lr, beta1, beta2, eps, decay, step):
        weight.mul_(1 - lr * decay)
        avg.lerp_(grad, 1 - beta1)
        avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if scratch is None:
            denom = avg_sq.sqrt()
        else:
            denom = torch.sqrt(avg_sq, out=scratch[4][:count].view(avg_sq.shape))
        denom.div_(bias_correction2_sqrt).add_(eps)
        weight.addcdiv_(avg, denom, value=-lr / bias_correction1)

    for target, value in ((param, weight), (exp_avg, avg), (exp_avg_sq, avg_sq)):
        if target.dtype == torch.bfloat16:
            stochastic_round_(target, value, noise=noise.take(value.numel()))


def _fused_update(
    weight: torch.Tensor,
    grad: torch.Tensor,
    avg: torch.Tensor,
    avg_sq: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    decay: float,
    step: torch.Tensor,
) -> bool:
    """The update in one pass with the kernel behind ``torch.optim.AdamW(fused=True)``;
    False where this torch or device has none (the caller then does it op by op).
    ``step``: the step count (already counted for this update) as a tensor on the weight's device."""
    kernel = getattr(torch, "_fused_adamw_", None)
    if kernel is None or weight.device.type not in ("cpu", "cuda"):
        return False
    try:
        kernel(
            [weight],
            [grad],
            [avg],
            [avg_sq],
            [],
            [step],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=decay,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def full_training_bytes(
    weights: int, weight_dtype: torch.dtype, optimizer: str, *, fused_backward: bool, shards: int = 1, own_state: bool = False
) -> int:
    """Bytes full fine-tuning of ``weights`` weights holds beyond the frozen model: its own copy
    of the weights, the optimizer's moments (this process's share of them when ``shards``
    processes divide the state) and, without the fused backward step, whole-model gradients.

    ``own_state``: the pack's AdamW, which keeps its moments in the weights' dtype; torch's AdamW
    keeps them in float32, bitsandbytes' AdamW8bit in 8 bits.
    """
    size = torch.tensor([], dtype=weight_dtype).element_size()
    moment = size if own_state else (1 if optimizer == "AdamW8bit" else 4)
    gradients = 0 if fused_backward else size
    return weights * (size + gradients) + -(-weights * 2 * moment // max(shards, 1))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensors in ``optimizer``'s state (moments, step counters)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


class GradientSync(Protocol):
    """How a gradient is shared across processes (``core.distributed``): ``reduce`` sums it where
    it is needed and says whether this process steps the tensor; ``publish`` then sends the
    stepped tensor to the processes that did not step it."""

    def reduce(self, param: torch.Tensor) -> bool: ...

    def publish(self, param: torch.Tensor) -> None: ...


class FusedBackwardStep:
    """Step each parameter as soon as backward has finished its gradient, then free it.

    Only for one backward per optimizer step (no gradient accumulation): the hook fires
    once per ``backward()`` call, after every use of the parameter in that graph.
    ``max_grad_norm`` > 0 clips each gradient tensor on its own (the whole-model norm
    is never available). ``sync``: several processes' gradients summed before the step (every
    process runs the same graph, so the hooks fire in the same order everywhere).
    """

    def __init__(self, optimizer: AdamW, max_grad_norm: float = 0.0, sync: GradientSync | None = None):
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.sync = sync
        self.steps = 0
        self._handles = [
            param.register_post_accumulate_grad_hook(self._hook) for group in optimizer.param_groups for param in group["params"]
        ]

    def _hook(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        self.steps += 1
        if self.sync is not None and not self.sync.reduce(param):
            param.grad = None
            self.sync.publish(param)  # receives the owner's stepped value
            return
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
        self.optimizer.step_parameter(param)
        param.grad = None
        if self.sync is not None:
            self.sync.publish(param)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
