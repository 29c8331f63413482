"""Data parallelism for the trainers, in plain torch.distributed.

Every process draws the same micro-batches from the same random streams; process ``rank`` of
``world_size`` computes micro-batches ``rank, rank + world_size, ...`` of each step and the
gradients of what trains are summed across processes before the optimizer step. A step on W
processes with gradient accumulation A therefore equals a step of one process with gradient
accumulation W·A (the union of the processes' batches), up to float rounding. Only what trains
is ever communicated (Textual Inversion's vectors, LoRA factors, full fine-tuning's weights);
the frozen model is loaded by each process from the same file and never sent.

``Partition()`` (one process) makes every call here a no-op, so the single-process path is
unchanged.

How the trained tensors are kept in step is a ``GradientSync``: ``DataParallel`` sums every
gradient on every process and every process steps every tensor (what DDP does);
``ShardedOptimizer`` gives each tensor one owning process, which alone receives its summed
gradient, keeps its optimizer state and steps it, then sends the new values to the others
(ZeRO stage 2, Rajbhandari et al. 2020; FSDP's SHARD_GRAD_OP). Both send the same bytes (a
reduce plus a broadcast is an all-reduce); sharding divides the optimizer state and the step's
arithmetic by the number of processes. Parameters themselves are not sharded (ZeRO stage 3):
every process holds the whole model to run its forward.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

# Gradients are summed in buckets of this many elements: one collective per bucket, and the
# flat buffer never holds more than this (25M float32 = 100 MB, as DDP's default bucket).
BUCKET_ELEMENTS = 25 * 2**20


@dataclass(frozen=True)
class Partition:
    rank: int = 0
    world_size: int = 1
    # Full fine-tuning's optimizer state divided among the processes (see ``gradient_sync``).
    shard_optimizer_state: bool = True

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owns(self, micro_batch: int) -> bool:
        """Whether this process computes micro-batch ``micro_batch`` of a step."""
        return micro_batch % self.world_size == self.rank

    def micro_batches(self, per_process: int) -> int:
        """Micro-batches in a step of all processes together."""
        return per_process * self.world_size

    def sum_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Sum ``.grad`` across processes. A parameter without a gradient (unused by the model)
        has none on every process, since all run the same graph: it is left out everywhere."""
        if not self.distributed:
            return
        _all_reduce_bucketed([p.grad for p in parameters if p.grad is not None])

    def sum_gradient(self, grad: torch.Tensor) -> None:
        """Sum one gradient across processes (the fused backward step, tensor by tensor)."""
        if self.distributed:
            torch.distributed.all_reduce(grad)

    def sum(self, value: float) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        torch.distributed.all_reduce(tensor)
        return float(tensor.item())

    def broadcast(self, tensors: Iterable[torch.Tensor], source: int = 0) -> None:
        """Make ``tensors`` what process ``source`` holds (trainable state at the start)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for tensor in tensors:
                torch.distributed.broadcast(tensor.data, source)

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed across processes (on the collective's device), e.g. shards filled where owned."""
        if not self.distributed:
            return tensor
        device = tensor.device
        summed = tensor.to(_collective_device())
        torch.distributed.all_reduce(summed)
        return summed.to(device)


SINGLE_PROCESS = Partition()


class DataParallel:
    """Every process ends a step with every summed gradient and steps every tensor itself."""

    sharded = False

    def __init__(self, partition: Partition):
        self.partition = partition

    def reduce(self, param: torch.Tensor) -> bool:
        """Sum ``param.grad`` where this process needs it; whether this process steps ``param``."""
        self.partition.sum_gradient(param.grad)
        return True

    def reduce_all(self, parameters: Iterable[torch.Tensor]) -> None:
        self.partition.sum_gradients(parameters)

    def publish(self, param: torch.Tensor) -> None:
        """Give every process ``param``'s stepped value (each stepped it already)."""

    def publish_all(self, parameters: Iterable[torch.Tensor]) -> None:
        pass

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float) -> float | torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)


class ShardedOptimizer(DataParallel):
    """ZeRO stage 2: each trained tensor has one owning process, which alone receives its summed
    gradient (the others drop theirs), holds its optimizer state and steps it, then broadcasts it.

    Owners are assigned largest tensor first to the process that owns the fewest elements so far,
    from the shapes alone, so every process computes the same assignment without talking. An
    optimizer whose state is made on a tensor's first step with a gradient (torch's AdamW, the
    pack's AdamW, bitsandbytes') then keeps state only for what its process owns.
    """

    sharded = True

    def __init__(self, partition: Partition, parameters: Iterable[torch.Tensor]):
        super().__init__(partition)
        loads = [0] * partition.world_size
        self.owner: dict[int, int] = {}
        indexed = list(enumerate(parameters))
        for _index, param in sorted(indexed, key=lambda item: (-item[1].numel(), item[0])):
            rank = min(range(partition.world_size), key=lambda r: (loads[r], r))
            self.owner[id(param)] = rank
            loads[rank] += param.numel()
        self.owned_elements = loads

    def owns(self, param: torch.Tensor) -> bool:
        return self.owner[id(param)] == self.partition.rank

    def reduce(self, param: torch.Tensor) -> bool:
        torch.distributed.reduce(param.grad, self.owner[id(param)])
        if not self.owns(param):
            param.grad = None
            return False
        return True

    def reduce_all(self, parameters: Iterable[torch.Tensor]) -> None:
        with_grad = [p for p in parameters if p.grad is not None]
        for owner, group in _by_owner(with_grad, self.owner):
            _reduce_bucketed([p.grad for p in group], owner)
            if owner != self.partition.rank:
                for param in group:
                    param.grad = None

    def publish(self, param: torch.Tensor) -> None:
        with torch.no_grad():
            torch.distributed.broadcast(param.data, self.owner[id(param)])

    def publish_all(self, parameters: Iterable[torch.Tensor]) -> None:
        with torch.no_grad():
            for owner, group in _by_owner(list(parameters), self.owner):
                _broadcast_bucketed([p.data for p in group], owner)

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model, each process holding the
        gradients it owns: the squared norms are summed across processes (on the device: no
        host round trip per tensor)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        device = _collective_device()
        squares = torch.zeros((), dtype=torch.float32, device=device)
        if grads:
            norms = [torch.linalg.vector_norm(g, dtype=torch.float32).to(device) for g in grads]
            squares = torch.stack(norms).square().sum()
        total = self.partition.sum_tensor(squares).sqrt()
        coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(coefficient.to(grad.device, grad.dtype))
        return total


def gradient_sync(partition: Partition, parameters: Iterable[torch.Tensor], shard: bool) -> DataParallel:
    """How trained tensors stay in step across processes: sharded optimizer state when asked for
    (and allowed by ``partition``) on several processes, else plain data parallelism."""
    if partition.distributed and shard and partition.shard_optimizer_state:
        return ShardedOptimizer(partition, parameters)
    return DataParallel(partition)


def _by_owner(tensors: list[torch.Tensor], owner: dict[int, int]) -> list[tuple[int, list[torch.Tensor]]]:
    groups: dict[int, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(owner[id(tensor)], []).append(tensor)
    return sorted(groups.items())


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _buckets(tensors: list[torch.Tensor], limit: int) -> Iterable[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        if bucket and size + tensor.numel() > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel()
    if bucket:
        yield bucket


def _bucketed(tensors: list[torch.Tensor], collective, write_back: bool = True) -> None:
    """Run ``collective`` (in place on one tensor) over ``tensors``, several per call through a
    flat buffer, grouped by dtype and device; the results are copied back when ``write_back``."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in groups.values():
        for bucket in _buckets(group, BUCKET_ELEMENTS):
            if len(bucket) == 1 and bucket[0].is_contiguous():
                collective(bucket[0])
                continue
            flat = torch.cat([t.reshape(-1) for t in bucket])
            collective(flat)
            if not write_back:
                continue
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def _all_reduce_bucketed(tensors: list[torch.Tensor]) -> None:
    """All-reduce (sum) ``tensors`` in place."""
    _bucketed(tensors, torch.distributed.all_reduce)


def _reduce_bucketed(tensors: list[torch.Tensor], owner: int) -> None:
    """Sum ``tensors`` into process ``owner``'s (the others' are left undefined)."""
    rank = torch.distributed.get_rank()
    _bucketed(tensors, lambda t: torch.distributed.reduce(t, owner), write_back=rank == owner)


def _broadcast_bucketed(tensors: list[torch.Tensor], owner: int) -> None:
    """Make ``tensors`` what process ``owner`` holds."""
    rank = torch.distributed.get_rank()
    _bucketed(tensors, lambda t: torch.distributed.broadcast(t, owner), write_back=rank != owner)
