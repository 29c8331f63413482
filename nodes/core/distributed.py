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


def _all_reduce_bucketed(tensors: list[torch.Tensor]) -> None:
    """All-reduce (sum) ``tensors`` in place, several per collective, grouped by dtype and device."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in groups.values():
        for bucket in _buckets(group, BUCKET_ELEMENTS):
            if len(bucket) == 1 and bucket[0].is_contiguous():
                torch.distributed.all_reduce(bucket[0])
                continue
            flat = torch.cat([t.reshape(-1) for t in bucket])
            torch.distributed.all_reduce(flat)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
