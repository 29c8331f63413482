"""The node's side of training on several devices.

The node exports the weights it was handed (patches included) to a checkpoint keyed by content,
writes the job (settings, images, ComfyUI's folders), frees its own GPU memory and starts the
workers: ``python -m torch.distributed.run`` (torchrun; it ships with torch), one process per
device, or ``accelerate launch --config_file CONFIG`` (several machines). It follows rank 0's
progress (step, loss, previews) on the node exactly as in-process training shows it; ComfyUI's
Cancel ends the whole process group (the last periodic save stays); a worker that fails is
reported with its own message. The results come back as the same types the in-process trainers
return, and the files land where they would.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..comfy_bridge import devices as device_bridge
from ..comfy_bridge import folders, saving, tokens
from ..comfy_bridge.progress import ComfyProgress
from ..core.embedding_file import EmbeddingFile
from ..core.training_images import TrainingImageSet
from ..core.training_math import LossTracker
from .jobs import JobFolder, JobSpec, parse_devices

WORKER = Path(__file__).resolve().parent / "worker.py"
STOP_GRACE_S = 10.0


def check_devices(text: str, accelerate_config: str = "") -> list[str]:
    """The devices to train on (empty: in-process on ComfyUI's own), refused before any work if
    they do not exist here."""
    listed = parse_devices(text)
    if accelerate_config.strip():
        config = Path(accelerate_config.strip()).expanduser()
        if not config.is_file():
            raise ValueError(f"accelerate config '{accelerate_config}' is not a file: write one with `accelerate config`")
        _check_accelerate_config(config)
        if importlib.util.find_spec("accelerate") is None:
            raise ValueError("an accelerate config needs the accelerate package in ComfyUI's Python (pip install accelerate)")
        return listed or ["accelerate"]
    cuda = [d for d in listed if d != "cpu"]
    if cuda and (not torch.cuda.is_available() or max(int(d[5:]) for d in cuda) >= torch.cuda.device_count()):
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ValueError(f"devices: {', '.join(cuda)} asked for, this machine has {available} CUDA device(s)")
    return listed


# The workers synchronise with plain torch.distributed data parallelism; accelerate only launches
# them. A config asking for sharding (DeepSpeed, FSDP, Megatron) would otherwise start and silently
# train unsharded, so it is refused.
# MULTI_CPU is left out too: on one machine accelerate then starts a single process (several need
# mpirun); MULTI_GPU on a machine without GPUs runs the workers on the CPU (ACCELERATE_USE_CPU).
ACCELERATE_TYPES = ("NO", "MULTI_GPU")


def _check_accelerate_config(config: Path) -> None:
    import yaml  # ComfyUI's own requirement; accelerate writes YAML (JSON reads as YAML too)

    try:
        settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"accelerate config '{config}' cannot be read ({error}): write one with `accelerate config`") from error
    if not isinstance(settings, dict):
        raise ValueError(f"accelerate config '{config}' is not an accelerate config (no settings in it)")
    kind = str(settings.get("distributed_type", "NO")).upper()
    if kind not in ACCELERATE_TYPES:
        raise ValueError(
            f"accelerate config '{config}' asks for distributed_type {kind}: set it to MULTI_GPU (machines without GPUs "
            f"too: the workers then run on the CPU). The pack trains with data parallelism only: DeepSpeed, FSDP and "
            f"Megatron are not supported, and MULTI_CPU would start a single process"
        )


def distributed(devices: list[str]) -> bool:
    """Whether these devices mean worker processes (a single device trains in-process)."""
    return len(devices) > 1 or devices == ["accelerate"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(job: JobFolder, devices: list[str], accelerate_config: str) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    script = [str(WORKER), "--job", str(job.path / "job.json")]
    if accelerate_config.strip():
        if all(d == "cpu" for d in devices if d != "accelerate") and not torch.cuda.is_available():
            # Without it accelerate runs every process as rank 0 on a machine with no GPU.
            env["ACCELERATE_USE_CPU"] = "1"
        config = str(Path(accelerate_config.strip()).expanduser())
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *script], env
    cuda = [d[5:] for d in devices if d != "cpu"]
    if cuda:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(cuda)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(len(devices)),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        *script,
    ]
    return command, env


def _stop(process: subprocess.Popen) -> None:
    """End the launcher and every worker it started (one process group), politely then firmly."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def _follow(process: subprocess.Popen, job: JobFolder, host: ComfyProgress) -> None:
    from PIL import Image

    from ..comfy_bridge.sampling import preview_payload

    offset, last, latest = 0, 0, {}
    try:
        while True:
            finished = process.poll() is not None
            records, offset = job.read_progress(offset)
            for record in records:
                if "step" not in record:
                    continue
                last, latest = record["step"], record
                preview = None
                if record.get("preview"):
                    with Image.open(job.path / record["preview"]) as image:
                        preview = preview_payload(image.convert("RGB"))
                host.report(last, record["losses"], record["smoothed"], preview)
            if finished:
                break
            host.check_cancelled()
            time.sleep(0.2)
    except BaseException as error:
        _stop(process)
        host.finish(last, "cancelled" if host.is_cancel(error) else "error")
        raise
    if process.returncode != 0:
        host.finish(last, "error")
        errors = list(job.errors())
        if errors:
            first = errors[0]
            raise RuntimeError(f"training worker (rank {first['rank']}, {first['device']}) failed: {first['error']}")
        tail = (job.path / "launcher.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"a training worker process died (exit code {process.returncode}) without saying why; its log ends:\n{tail}")
    host.finish(last, "done", latest.get("losses"), latest.get("smoothed"))


def run_job(
    trainer: str,
    model: Any,
    clip: Any,
    vae: Any,
    images: TrainingImageSet,
    settings: Any,
    devices: list[str],
    accelerate_config: str = "",
    node_id: str | None = None,
    kind: str = "",
    extra: dict[str, Any] | None = None,
) -> JobFolder:
    """Train on worker processes; returns the finished job's folder (its results)."""
    job = JobFolder(folders.cache_folder() / "jobs" / f"{trainer}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    for name, value in (extra or {}).items():
        if isinstance(value, EmbeddingFile):
            job.write_tensors(name, value.vectors, {**value.metadata, "trigger_word": value.name})
        elif isinstance(value, torch.Tensor):
            job.write_tensors(name, {"images": value})
    job.write_images(images)
    job.write_bindings(tokens.trigger_word_bindings(clip))
    checkpoint = saving.export_checkpoint(model, clip, vae)
    listed = [d for d in devices if d != "accelerate"]
    job.write_spec(
        JobSpec(trainer, asdict(settings), str(checkpoint), str(folders.comfyui_directory()), folders.snapshot(), listed, node_id)
    )
    device_bridge.free_all()  # the workers take the GPUs
    command, env = _command(job, devices, accelerate_config)
    # Other machines join with this job file (README, "Several GPUs and machines").
    logging.info("personalize: training on worker processes, job %s: %s", job.path / "job.json", " ".join(command))
    host = ComfyProgress(settings.steps, node_id, kind or trainer)
    with open(job.path / "launcher.log", "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _follow(process, job, host)
    return job


def losses_from(record: dict[str, Any]) -> LossTracker:
    tracker = LossTracker()
    tracker.steps, tracker.raw, tracker.smoothed = record["steps"], record["raw"], record["smoothed"]
    return tracker


# --------------------------------------------------------------------------- the trainers, on workers


def train_textual_inversion(
    model: Any,
    clip: Any,
    vae: Any,
    images: TrainingImageSet,
    settings: Any,
    devices: list[str],
    accelerate_config: str = "",
    resume: EmbeddingFile | None = None,
    node_id: str | None = None,
) -> Any:
    """``training.textual_inversion.train_textual_inversion`` on ``devices``: worker processes when
    they are several, else in this process as without the setting; the same result either way."""
    from ..training import textual_inversion as ti

    if not distributed(devices):
        return ti.train_textual_inversion(model, clip, vae, images, settings, resume=resume, node_id=node_id)
    ti.validate(settings, images, clip, resume)  # every check before any work, here as in-process
    job = run_job(
        "textual_inversion",
        model,
        clip,
        vae,
        images,
        settings,
        devices,
        accelerate_config,
        node_id,
        extra={"resume": resume} if resume is not None else None,
    )
    vectors, metadata = job.read_tensors("result-embedding")
    result = job.read_json("result")
    return ti.TextualInversionResult(
        embedding=EmbeddingFile(vectors, name=metadata["name"]),
        losses=losses_from(result["losses"]),
        saved_path=Path(result["saved_path"]) if result["saved_path"] else None,
        steps_trained=settings.steps,
        total_steps=result["total_steps"],
        notes=[*result["notes"], f"trained on {', '.join(devices)}"],
    )


def train_dreambooth(
    model: Any,
    clip: Any,
    vae: Any,
    images: TrainingImageSet,
    settings: Any,
    devices: list[str],
    accelerate_config: str = "",
    class_images: torch.Tensor | None = None,
    node_id: str | None = None,
) -> Any:
    """``training.dreambooth.train_dreambooth`` on ``devices``: worker processes when they are
    several, else in this process as without the setting; the same result either way."""
    from ..training import dreambooth as db

    if not distributed(devices):
        return db.train_dreambooth(model, clip, vae, images, settings, class_images=class_images, node_id=node_id)
    db.validate(settings, images, model, clip, class_images)
    job = run_job(
        "dreambooth",
        model,
        clip,
        vae,
        images,
        settings,
        devices,
        accelerate_config,
        node_id,
        extra={"class_images": class_images} if class_images is not None else None,
    )
    result = job.read_json("result")
    lora = job.read_tensors("result-lora")[0] if job.has("result-lora.safetensors") else None
    diffs = {part: job.read_tensors(f"result-{part}-diffs")[0] for part in ("model", "clip") if job.has(f"result-{part}-diffs.safetensors")}
    out_model, out_clip = db.tuned_models(model, clip, lora=lora, diffs=diffs or None)
    embedding = None
    if job.has("result-embedding.safetensors"):
        vectors, metadata = job.read_tensors("result-embedding")
        embedding = EmbeddingFile(vectors, name=metadata["name"])
        out_clip = tokens.bind_trigger_words(out_clip, {result["identifier"]: embedding.vectors})
    return db.DreamBoothResult(
        model=out_model,
        clip=out_clip,
        identifier=result["identifier"],
        losses=losses_from(result["losses"]),
        saved={k: Path(v) for k, v in result["saved"].items()},
        steps_trained=settings.steps,
        notes=[*result["notes"], f"trained on {', '.join(devices)}"],
        embedding=embedding,
        class_images=result["class_images"],
        lora=lora,
        diffs=diffs or None,
    )
