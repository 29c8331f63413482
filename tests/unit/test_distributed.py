"""Keeping processes in step (nodes/core/distributed.py): two gloo processes under torchrun.

Sharded optimizer state (ZeRO stage 2) must give what plain data parallelism gives, which must
give what one process gives on the union of the processes' micro-batches; each process then
holds only its share of the optimizer state.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from core_package import core

distributed = core("distributed")
optimizers = core("optimizers")
WORKER = Path(__file__).resolve().parent / "sharding_worker.py"
sys.path.insert(0, str(WORKER.parent))
import sharding_worker  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(tmp_path: Path, how: str, sharding: str, device: str = "cpu") -> tuple[list[dict], list[dict]]:
    """Both processes' final weights and optimizer-state sizes (``device`` cuda: one GPU each, NCCL)."""
    out = tmp_path / f"{how}-{sharding}-{device}"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(_free_port()), str(WORKER), str(out), how, sharding, device]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    weights = [torch.load(out / f"weights-{r}.pt", weights_only=True) for r in (0, 1)]
    states = [json.loads((out / f"state-{r}.json").read_text()) for r in (0, 1)]
    return weights, states


def one_process(how: str) -> tuple[dict, int]:
    """One process, both micro-batches of every step accumulated (torch's clipping, no sync)."""
    net = sharding_worker.model()
    params = list(net.parameters())
    optimizer = optimizers.AdamW(params, lr=1e-2, seed=0) if how == "fused" else torch.optim.AdamW(params, lr=1e-2)
    for step in range(sharding_worker.STEPS):
        for index in (0, 1):
            sharding_worker.loss_of(net, step, index, 2).backward()
        if how == "whole":
            torch.nn.utils.clip_grad_norm_(params, sharding_worker.MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {f"p{i}": p.detach().clone() for i, p in enumerate(params)}, optimizers.state_bytes(optimizer)


@pytest.mark.parametrize("how", ["fused", "whole"])
def test_sharded_optimizer_state_trains_as_one_process_and_divides_the_state(tmp_path, how):
    sharded, sharded_states = two_processes(tmp_path, how, "shard")
    replicated, replicated_states = two_processes(tmp_path, how, "replicate")
    one, one_bytes = one_process(how)
    assert [s["sharded"] for s in sharded_states] == [True, True] and [s["sharded"] for s in replicated_states] == [False, False]
    for name in one:
        assert torch.equal(sharded[0][name], sharded[1][name]), f"{name}: both processes end with the owner's values"
        if how == "fused":
            assert torch.equal(sharded[0][name], replicated[0][name]), f"{name}: sharding changes no arithmetic"
        else:  # the whole-model norm is summed from the processes' shares: rounding differs
            torch.testing.assert_close(sharded[0][name], replicated[0][name], rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(sharded[0][name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [s["state_bytes"] for s in replicated_states] == [one_bytes, one_bytes], "data parallel: the whole state everywhere"
    shares = [s["state_bytes"] for s in sharded_states]
    assert abs(sum(shares) - one_bytes) <= 2 * 64, "the shards add up to the whole state (step counters aside)"
    assert max(shares) < 0.6 * one_bytes, f"each process holds about half: {shares} of {one_bytes}"


def test_sharded_bfloat16_weights_stay_the_same_on_every_process(tmp_path):
    """full_bf16's path: the owner's stochastically rounded update is what every process ends with;
    the whole update lands (bfloat16 weights moved), and each process holds about half the state."""
    sharded, states = two_processes(tmp_path, "fused-bf16", "shard")
    start = {f"p{i}": p.detach().to(torch.bfloat16) for i, p in enumerate(sharding_worker.model().parameters())}
    for name, value in start.items():
        assert sharded[0][name].dtype == torch.bfloat16
        assert torch.equal(sharded[0][name], sharded[1][name]), f"{name}: both processes end with the owner's values"
        assert not torch.equal(sharded[0][name], value), f"{name}: trained"
    one_bytes = sum(2 * 2 * v.numel() + 4 for v in start.values())  # bfloat16 moments and a step counter per tensor
    assert sum(s["state_bytes"] for s in states) == one_bytes and max(s["state_bytes"] for s in states) < 0.6 * one_bytes


def test_owners_are_balanced_and_the_same_everywhere():
    shapes = [(320, 320), (320,), (1280, 320), (320, 1280), (1280,), (4, 320, 3, 3), (320,), (8,)]
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    twins = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    for world in (2, 3, 4):
        assignments = [distributed.ShardedOptimizer(distributed.Partition(r, world), params) for r in range(world)]
        owners = [assignments[0].owner[id(p)] for p in params]
        assert all([a.owner[id(p)] for p in params] == owners for a in assignments), "every process computes the same owners"
        again = distributed.ShardedOptimizer(distributed.Partition(0, world), twins)
        assert [again.owner[id(p)] for p in twins] == owners, "from the shapes alone"
        loads = assignments[0].owned_elements
        assert sum(loads) == sum(p.numel() for p in params)
        assert max(loads) - min(loads) <= max(p.numel() for p in params), loads
        assert sorted(set(owners)) == list(range(world)), "every process owns something"


def test_one_process_or_no_sharding_is_plain_data_parallelism():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert not distributed.gradient_sync(distributed.SINGLE_PROCESS, params, shard=True).sharded
    assert not distributed.gradient_sync(distributed.Partition(0, 2), params, shard=False).sharded
    assert not distributed.gradient_sync(distributed.Partition(0, 2, shard_optimizer_state=False), params, shard=True).sharded
    assert distributed.gradient_sync(distributed.Partition(1, 2), params, shard=True).sharded
