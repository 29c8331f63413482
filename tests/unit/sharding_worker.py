"""One process of tests/unit/test_distributed.py's runs, started by torchrun on gloo.

Trains a small MLP on this process's micro-batch of every step, keeping the processes in step
with ``core.distributed``'s gradient sync (sharded or not), with the fused backward step or a
whole-model step, and writes its final weights and optimizer-state size for the test to compare.

    torchrun --nproc_per_node 2 sharding_worker.py OUT_DIR {fused,fused-bf16,whole} {shard,replicate} [cuda]

``fused-bf16``: bfloat16 weights and moments, updated with stochastic rounding (full_bf16).

With ``cuda`` each process trains on its own GPU (LOCAL_RANK) over NCCL (tests/gpu); weights are
written back on the CPU.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core_package import core

distributed = core("distributed")
optimizers = core("optimizers")
STEPS = 4
MAX_NORM = 0.05  # small enough that every step clips


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))


def micro_batch(step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + index)
    return torch.randn(6, 16, generator=g), torch.randn(6, 8, generator=g)


def loss_of(net: torch.nn.Module, step: int, index: int, micro_batches: int, device: str = "cpu") -> torch.Tensor:
    dtype = next(net.parameters()).dtype
    inputs, targets = (t.to(device, dtype) for t in micro_batch(step, index))
    return ((net(inputs).float() - targets.float()) ** 2).mean() / micro_batches


def main(out: Path, how: str, sharding: str, device: str = "cpu") -> None:
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    partition = distributed.Partition(torch.distributed.get_rank(), torch.distributed.get_world_size())
    net = model().to(device, torch.bfloat16 if how == "fused-bf16" else torch.float32)
    params = list(net.parameters())
    sync = distributed.gradient_sync(partition, params, shard=sharding == "shard")
    if how.startswith("fused"):
        optimizer = optimizers.AdamW(params, lr=1e-2, seed=0)
        fused = optimizers.FusedBackwardStep(optimizer, sync=sync)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-2)
    for step in range(STEPS):
        loss_of(net, step, partition.rank, partition.world_size, device).backward()
        if how == "whole":
            sync.reduce_all(params)
            sync.clip_grad_norm_(params, MAX_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync.publish_all(params)
    if how.startswith("fused"):
        fused.remove()
    torch.save({f"p{i}": p.detach().cpu().clone() for i, p in enumerate(params)}, out / f"weights-{partition.rank}.pt")
    (out / f"state-{partition.rank}.json").write_text(
        json.dumps({"state_bytes": optimizers.state_bytes(optimizer), "sharded": sync.sharded}), encoding="utf-8"
    )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
