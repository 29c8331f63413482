"""What a training worker process does (worker.py starts it): join the process group, load the
exported checkpoint with ``comfy.sd``, run the same trainer the node runs in-process on its share
of every step, and, as rank 0, report progress and write the results and files."""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..comfy_bridge import saving, tokens
from ..core.distributed import Partition
from ..core.embedding_file import read_embedding
from ..training import dreambooth, textual_inversion
from .jobs import JobFolder, free_port, tensor_digests


class JobProgress:
    """The training host of a worker: rank 0 writes progress lines (and preview images) for the
    node to show; Cancel is the node ending the process group, so there is nothing to check."""

    def __init__(self, job: JobFolder, rank: int):
        self.job = job
        self.rank = rank

    def check_cancelled(self) -> None:
        pass

    def is_cancel(self, error: BaseException) -> bool:
        return False

    def report(self, step: int, losses: Mapping[str, float], smoothed: Mapping[str, float], preview: Any = None) -> None:
        if self.rank != 0:
            return
        record: dict[str, Any] = {"step": step, "losses": dict(losses), "smoothed": dict(smoothed), "pid": os.getpid(), "time": time.time()}
        if preview is not None:
            name = f"preview-{step}.jpg"
            preview[1].save(self.job.path / name, quality=90)
            record["preview"] = name
        self.job.append_progress(record)

    def finish(
        self, step: int, status: str, losses: Mapping[str, float] | None = None, smoothed: Mapping[str, float] | None = None
    ) -> None:
        if self.rank == 0:
            self.job.append_progress({"status": status, "final_step": step})


def _losses(tracker: Any) -> dict[str, Any]:
    return {"steps": tracker.steps, "raw": tracker.raw, "smoothed": tracker.smoothed}


def _textual_inversion(
    job: JobFolder, spec: Any, models: tuple, partition: Partition, host: JobProgress
) -> tuple[dict[str, torch.Tensor], int]:
    settings = textual_inversion.TextualInversionSettings(**spec.settings)
    resume = read_embedding(job.path / "resume.safetensors") if job.has("resume.safetensors") else None
    result = textual_inversion.train_textual_inversion(*models, job.read_images(), settings, resume=resume, host=host, partition=partition)
    if partition.rank == 0:
        job.write_embedding("result-embedding", result.embedding)
        job.write_json(
            "result",
            {
                "saved_path": str(result.saved_path) if result.saved_path else None,
                "losses": _losses(result.losses),
                "notes": result.notes,
                "total_steps": result.total_steps,
            },
        )
    return result.embedding.vectors, 0  # a few vectors' optimizer state: not worth counting


def _dreambooth(job: JobFolder, spec: Any, models: tuple, partition: Partition, host: JobProgress) -> tuple[dict[str, torch.Tensor], int]:
    """Trains; (the trained tensors, for the ranks' digests; the bytes of this rank's optimizer state)."""
    settings = dreambooth.DreamBoothSettings(**spec.settings)
    class_images = job.read_tensors("class_images")[0]["images"] if job.has("class_images.safetensors") else None
    result = dreambooth.train_dreambooth(*models, job.read_images(), settings, class_images=class_images, host=host, partition=partition)
    trained: dict[str, torch.Tensor] = {}
    if result.lora is not None:
        trained.update(result.lora)
    for part, diffs in (result.diffs or {}).items():
        trained.update({f"{part}/{key}": value for key, value in diffs.items()})
    if result.embedding is not None:
        trained.update({f"embedding/{key}": value for key, value in result.embedding.vectors.items()})
    if partition.rank == 0:
        if result.lora is not None:
            job.write_tensors("result-lora", result.lora)
        for part, diffs in (result.diffs or {}).items():
            job.write_tensors(f"result-{part}-diffs", diffs)
        if result.embedding is not None:
            job.write_embedding("result-embedding", result.embedding)
        job.write_json(
            "result",
            {
                "identifier": result.identifier,
                "saved": {k: str(v) for k, v in result.saved.items()},
                "notes": result.notes,
                "class_images": result.class_images,
                "losses": _losses(result.losses),
            },
        )
    return trained, result.optimizer_state_bytes


def _memory(device: str, field: str) -> int:
    """This process's memory: ``field`` "now" or "peak" (since the last reset): allocated GPU
    memory on CUDA; resident memory on the CPU (Linux's VmRSS / VmHWM; 0 where not readable)."""
    if device != "cpu" and torch.cuda.is_available():
        return int(torch.cuda.memory_allocated() if field == "now" else torch.cuda.max_memory_allocated())
    name = "VmRSS:" if field == "now" else "VmHWM:"
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith(name):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _reset_peak_memory(device: str) -> None:
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")  # Linux: VmHWM starts again from VmRSS


def run(job_dir: Path, device: str) -> int:
    job = JobFolder(job_dir)
    spec = job.read_spec()
    rank = int(os.environ.get("RANK", "0"))
    try:
        # The launcher (torchrun, accelerate launch) says where the group meets: env:// variables.
        # accelerate's single-process launch (distributed_type NO) sets none: a group of one.
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(
                {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
            )
        torch.distributed.init_process_group("nccl" if device != "cpu" else "gloo")
        partition = Partition(torch.distributed.get_rank(), torch.distributed.get_world_size(), spec.shard_optimizer_state)
        rank = partition.rank
        with torch.inference_mode():
            model, clip, vae = saving.load_checkpoint(Path(spec.checkpoint))
        loaded = _memory(device, "now")
        _reset_peak_memory(device)
        bindings = job.read_bindings()
        models = (model, tokens.bind_trigger_words(clip, bindings) if bindings else clip, vae)
        host = JobProgress(job, rank)
        train = _textual_inversion if spec.trainer == "textual_inversion" else _dreambooth
        trained, state_bytes = train(job, spec, models, partition, host)
        job.write_json(
            f"state-rank-{rank}",
            {
                "rank": rank,
                "world_size": partition.world_size,
                "device": device,
                "digests": tensor_digests(trained),
                "optimizer_state_bytes": state_bytes,
                "loaded_memory_bytes": loaded,  # with the model loaded, before training
                "peak_memory_bytes": _memory(device, "peak"),  # during training, the loaded model included
            },
        )
        torch.distributed.barrier()
    except BaseException as error:
        job.write_json(
            f"error-rank-{rank}",
            {"rank": rank, "device": device, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()},
        )
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
