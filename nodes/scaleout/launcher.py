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
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..comfy_bridge import devices as device_bridge
from ..comfy_bridge import folders, saving, tokens
from ..comfy_bridge.progress import ComfyProgress
from ..core.embedding_file import EmbeddingFile
from ..core.training_images import TrainingImageSet
from ..core.training_math import LossTracker
from .jobs import JobFolder, JobSpec, free_port, parse_devices

WORKER = Path(__file__).resolve().parent / "worker.py"
STOP_GRACE_S = 10.0


def check_devices(text: str, accelerate_config: str = "") -> list[str]:
    """The devices to train on (empty: in-process on ComfyUI's own), refused before any work if
    they do not exist here."""
    listed = parse_devices(text)
    if accelerate_config.strip():
        read_accelerate_config(accelerate_config)
        if importlib.util.find_spec("accelerate") is None:
            raise ValueError("an accelerate config needs the accelerate package in ComfyUI's Python (pip install accelerate)")
        return listed or ["accelerate"]
    cuda = [d for d in listed if d != "cpu"]
    if cuda and (not torch.cuda.is_available() or max(int(d[5:]) for d in cuda) >= torch.cuda.device_count()):
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ValueError(f"devices: {', '.join(cuda)} asked for, this machine has {available} CUDA device(s)")
    return listed


# The workers synchronise with plain torch.distributed (core.distributed); accelerate only launches
# them. Full fine-tuning on several processes shards the optimizer state and gradients (ZeRO stage 2,
# FSDP's SHARD_GRAD_OP), so a DeepSpeed or FSDP config asking for that much is honoured by the pack's
# own sharding and launched as MULTI_GPU (DeepSpeed's launcher is not needed). What would silently
# not happen is refused: parameter sharding (ZeRO-3, FULL_SHARD), offloading, Megatron.
# MULTI_CPU is left out too: on one machine accelerate then starts a single process (several need
# mpirun); MULTI_GPU on a machine without GPUs runs the workers on the CPU (ACCELERATE_USE_CPU).
ACCELERATE_TYPES = ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP")
FSDP_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")  # accelerate's order, from 1
_STAGE_TWO = "the pack's workers each hold the whole model and shard the optimizer state and gradients (ZeRO stage 2)"


@dataclass(frozen=True)
class AccelerateConfig:
    path: Path
    settings: dict[str, Any]
    kind: str  # distributed_type
    shard_optimizer_state: bool  # what the config asks for, as the pack does it

    def for_launch(self) -> dict[str, Any]:
        """The config accelerate launch is given: the same processes and machines, the pack's own
        synchronisation (sharding travels in the job file)."""
        if self.kind not in ("DEEPSPEED", "FSDP"):
            return dict(self.settings)
        settings = {k: v for k, v in self.settings.items() if k not in ("deepspeed_config", "fsdp_config", "megatron_lm_config")}
        settings["distributed_type"] = "MULTI_GPU"
        return settings


def read_accelerate_config(text: str) -> AccelerateConfig:
    """An accelerate config file, checked before any work: refused, with what to change, where it
    asks for what the workers would not do."""
    import yaml  # ComfyUI's own requirement; accelerate writes YAML (JSON reads as YAML too)

    config = Path(text.strip()).expanduser()
    if not config.is_file():
        raise ValueError(f"accelerate config '{text}' is not a file: write one with `accelerate config`")
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
            f"too: the workers then run on the CPU), DEEPSPEED (ZeRO stage 1 or 2) or FSDP (SHARD_GRAD_OP). Megatron is "
            f"not supported, and MULTI_CPU would start a single process"
        )
    shard = True
    if kind == "DEEPSPEED":
        shard = _deepspeed_shards(config, settings.get("deepspeed_config") or {})
    elif kind == "FSDP":
        shard = _fsdp_shards(config, settings.get("fsdp_config") or {})
    return AccelerateConfig(config, settings, kind, shard)


def _deepspeed_shards(config: Path, deepspeed: dict[str, Any]) -> bool:
    stage, offload = deepspeed.get("zero_stage", 2), [deepspeed.get("offload_optimizer_device"), deepspeed.get("offload_param_device")]
    if deepspeed.get("deepspeed_config_file"):
        path = Path(str(deepspeed["deepspeed_config_file"])).expanduser()
        try:
            zero = json.loads(path.read_text(encoding="utf-8")).get("zero_optimization") or {}
        except (OSError, ValueError, AttributeError) as error:
            raise ValueError(f"accelerate config '{config}': its DeepSpeed file '{path}' cannot be read ({error})") from error
        stage = zero.get("stage", 0)
        offload = [(zero.get(k) or {}).get("device") for k in ("offload_optimizer", "offload_param")]
    try:
        stage = int(stage)
    except (TypeError, ValueError):
        raise ValueError(f"accelerate config '{config}': zero_stage '{stage}' is not a number; set it to 2") from None
    if stage >= 3:
        raise ValueError(
            f"accelerate config '{config}' asks for ZeRO stage {stage}, which shards the parameters too: {_STAGE_TWO}; set zero_stage: 2"
        )
    if any(str(device or "none").lower() != "none" for device in offload):
        raise ValueError(
            f"accelerate config '{config}' offloads to {', '.join(str(d) for d in offload if str(d or 'none').lower() != 'none')}: "
            "offloading is not built; set offload_optimizer_device and offload_param_device to none"
        )
    return stage >= 1


def _fsdp_shards(config: Path, fsdp: dict[str, Any]) -> bool:
    if str(fsdp.get("fsdp_offload_params", False)).lower() in ("true", "1", "yes"):
        raise ValueError(f"accelerate config '{config}' offloads parameters to the CPU: not built; set fsdp_offload_params: false")
    strategy = fsdp.get("fsdp_reshard_after_forward", fsdp.get("fsdp_sharding_strategy", "FULL_SHARD"))
    if isinstance(strategy, bool) or str(strategy).lower() in ("true", "false"):
        strategy = "FULL_SHARD" if str(strategy).lower() == "true" else "SHARD_GRAD_OP"  # FSDP2's switch
    elif str(strategy).isdigit() and 1 <= int(strategy) <= len(FSDP_STRATEGIES):
        strategy = FSDP_STRATEGIES[int(strategy) - 1]
    strategy = str(strategy).upper()
    if strategy not in FSDP_STRATEGIES:
        raise ValueError(f"accelerate config '{config}': FSDP sharding strategy '{strategy}' is unknown; use SHARD_GRAD_OP")
    if strategy in ("FULL_SHARD", "HYBRID_SHARD"):
        raise ValueError(
            f"accelerate config '{config}' asks for FSDP {strategy}, which shards the parameters too: {_STAGE_TWO}; "
            "set fsdp_sharding_strategy: SHARD_GRAD_OP (FSDP2: fsdp_reshard_after_forward: false)"
        )
    return strategy != "NO_SHARD"


def distributed(devices: list[str]) -> bool:
    """Whether these devices mean worker processes (a single device trains in-process)."""
    return len(devices) > 1 or devices == ["accelerate"]


def _command(job: JobFolder, devices: list[str], accelerate: AccelerateConfig | None) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    script = [str(WORKER), "--job", str(job.path / "job.json")]
    if accelerate is not None:
        if all(d == "cpu" for d in devices if d != "accelerate") and not torch.cuda.is_available():
            # Without it accelerate runs every process as rank 0 on a machine with no GPU.
            env["ACCELERATE_USE_CPU"] = "1"
        # The config as launched, in the job folder: other machines join with it (--machine_rank N).
        config = job.write_yaml("accelerate", accelerate.for_launch())
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *script], env
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
        str(free_port()),
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
    shard_optimizer_state: bool | None = None,
) -> JobFolder:
    """Train on worker processes; returns the finished job's folder (its results).
    ``shard_optimizer_state``: None is what the accelerate config asks for (else yes)."""
    job = JobFolder(folders.cache_folder() / "jobs" / f"{trainer}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    for name, value in (extra or {}).items():
        if isinstance(value, EmbeddingFile):
            job.write_tensors(name, value.vectors, {**value.metadata, "trigger_word": value.name})
        elif isinstance(value, torch.Tensor):
            job.write_tensors(name, {"images": value})
    job.write_images(images)
    job.write_bindings(tokens.trigger_word_bindings(clip))
    accelerate = read_accelerate_config(accelerate_config) if accelerate_config.strip() else None
    checkpoint = saving.export_checkpoint(model, clip, vae)
    listed = [d for d in devices if d != "accelerate"]
    job.write_spec(
        JobSpec(
            trainer,
            asdict(settings),
            str(checkpoint),
            str(folders.comfyui_directory()),
            folders.snapshot(),
            listed,
            node_id,
            shard_optimizer_state=(
                shard_optimizer_state
                if shard_optimizer_state is not None
                else (accelerate.shard_optimizer_state if accelerate is not None else True)
            ),
        )
    )
    device_bridge.free_all()  # the workers take the GPUs
    command, env = _command(job, devices, accelerate)
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
    result = job.read_json("result")
    return ti.TextualInversionResult(
        embedding=job.read_embedding("result-embedding"),
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
        embedding = job.read_embedding("result-embedding")
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
