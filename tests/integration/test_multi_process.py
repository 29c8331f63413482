"""Training on several processes (nodes/scaleout), on this CPU: two gloo workers started with torchrun.

A 2-process run ends with the same trained tensors on both processes, equal (to float
tolerance) to one process training on the union of their batches (gradient accumulation 2);
Cancel ends every worker and keeps the last save; a worker that dies or fails is reported on the
node with its message; one device never starts a process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from harness import cancel_at_step, pack_module, run_node, textual_inversion_inputs

launcher = pack_module("nodes.scaleout.launcher")
jobs = pack_module("nodes.scaleout.jobs")
ti = pack_module("nodes.training.textual_inversion")
db = pack_module("nodes.training.dreambooth")
TrainingImageSet = pack_module("nodes.core.training_images").TrainingImageSet
TRAIN = pack_module("nodes.graph_types").TRAIN_TEXTUAL_INVERSION
TWO_CPUS = ["cpu", "cpu"]


def _images(count: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(count, 1, 1, 3, generator=g) + 0.2 * torch.rand(count, size, size, 3, generator=g)).clamp(0, 1)


def _job_folders() -> set[Path]:
    import folder_paths

    root = Path(folder_paths.get_folder_paths("personalize_cache")[0]) / "jobs"
    return set(root.iterdir()) if root.is_dir() else set()


def _states(job: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(job.glob("state-rank-*.json"))]


def _workers() -> list[tuple[int, dict[str, str]]]:
    """(pid, environment) of every live training worker process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if not any(part.endswith(b"scaleout/worker.py") for part in cmdline):
                continue
            environ = dict(
                item.split("=", 1) for item in (entry / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in item
            )
            found.append((int(entry.name), environ))
        except (OSError, ValueError):
            continue
    return found


def test_devices_are_read_and_checked_before_any_work(tmp_path):
    assert jobs.parse_devices("") == [] and jobs.parse_devices("0, 1") == ["cuda:0", "cuda:1"]
    assert jobs.parse_devices("cpu,cpu") == TWO_CPUS and jobs.parse_devices("CUDA") == ["cuda:0"]
    for text, message in [("gpu0", "is no device"), ("cpu,cuda:0", "mixes CPU and GPU"), ("0,0", "lists a GPU twice")]:
        with pytest.raises(ValueError, match=message):
            jobs.parse_devices(text)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"cuda:0, cuda:1 asked for, this machine has 0 CUDA device"):
            launcher.check_devices("0,1")
    with pytest.raises(ValueError, match="is not a file"):
        launcher.check_devices("", "/nowhere/accelerate.yaml")
    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MEGATRON_LM\nnum_processes: 2\n")
    with pytest.raises(ValueError, match="distributed_type MEGATRON_LM: set it to MULTI_GPU"):
        launcher.check_devices("", str(config))
    config.write_text("- not\n- settings\n")
    with pytest.raises(ValueError, match="is not an accelerate config"):
        launcher.check_devices("", str(config))
    assert not launcher.distributed(launcher.check_devices("cpu")), "one device trains in ComfyUI's process"


@pytest.mark.parametrize(
    "sharding, shards, refused",
    [
        ("distributed_type: MULTI_GPU", True, None),
        ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n  offload_optimizer_device: none", True, None),
        ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 0", False, None),
        ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3", None, "ZeRO stage 3, which shards the parameters"),
        ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n  offload_optimizer_device: cpu", None, "offloads to cpu"),
        ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: DS_JSON", None, "ZeRO stage 3"),
        ("distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: SHARD_GRAD_OP", True, None),
        ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n  fsdp_reshard_after_forward: false", True, None),
        ("distributed_type: FSDP\nfsdp_config:\n  fsdp_reshard_after_forward: NO_SHARD", False, None),
        ("distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: 1", None, "FSDP FULL_SHARD, which shards the parameters"),
        ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2", None, "FULL_SHARD"),
        (
            "distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: 2\n  fsdp_offload_params: true",
            None,
            "fsdp_offload_params: false",
        ),
    ],
)
def test_accelerate_configs_asking_for_sharding_get_the_packs_or_a_reason(tmp_path, sharding, shards, refused):
    """DeepSpeed ZeRO 1-2 and FSDP SHARD_GRAD_OP ask for what full fine-tuning on the workers does
    (optimizer state and gradients sharded); parameter sharding and offloading are refused."""
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\nnum_processes: 2\n" + sharding.replace("DS_JSON", str(ds_json)) + "\n")
    if refused:
        with pytest.raises(ValueError, match=refused):
            launcher.check_devices("", str(config))
        return
    read = launcher.read_accelerate_config(str(config))
    assert read.shard_optimizer_state is shards
    launched = read.for_launch()
    assert launched["distributed_type"] == "MULTI_GPU" and launched["num_processes"] == 2
    assert "deepspeed_config" not in launched and "fsdp_config" not in launched, "DeepSpeed's launcher is not needed"


def test_one_device_never_starts_a_process(sd15, monkeypatch):
    started = []
    monkeypatch.setattr(launcher, "run_job", lambda *a, **k: started.append(a))
    settings = textual_inversion_inputs(steps=1, devices="cpu")
    run_node(TRAIN, model=sd15["model"], clip=sd15["clip"], vae=sd15["vae"], images=_images(1), **settings)
    assert started == []


def _accelerate_config(folder: Path, processes: int, distributed_type: str = "distributed_type: MULTI_GPU\n", machines: int = 1) -> Path:
    """What `accelerate config` writes for machines with several GPUs (here run on the CPU)."""
    port = jobs.free_port()
    config = folder / "accelerate.yaml"
    config.write_text(
        f"compute_environment: LOCAL_MACHINE\n{distributed_type}gpu_ids: all\nmachine_rank: 0\n"
        f"main_process_ip: 127.0.0.1\nmain_process_port: {port}\nmixed_precision: 'no'\nnum_machines: {machines}\n"
        f"num_processes: {processes}\nrdzv_backend: static\nsame_network: true\nuse_cpu: false\n"
    )
    return config


def _second_machine_joins(before: set[Path], log: Path) -> tuple[threading.Thread, list[subprocess.Popen]]:
    """Start "machine 1" with README's command once the node has written its job folder."""
    started: list[subprocess.Popen] = []

    def join() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            for job in _job_folders() - before:
                if (job / "job.json").is_file() and (job / "accelerate.yaml").is_file():
                    accelerate = Path(sys.executable).parent / "accelerate"  # `accelerate launch`, as README says
                    command = [str(accelerate), "launch", "--config_file", str(job / "accelerate.yaml"), "--machine_rank", "1"]
                    command += [str(launcher.WORKER), "--job", str(job / "job.json")]
                    with open(log, "w") as out:
                        started.append(
                            subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
                        )
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=join, daemon=True)
    thread.start()
    return thread, started


@pytest.mark.parametrize("launch", ["torchrun", "accelerate", "two-machines"])
def test_textual_inversion_on_two_processes_equals_one_on_the_union_of_their_batches(sd15, launch, tmp_path):
    """torchrun; accelerate launch on one machine; and two "machines" (one process each, both on
    this one) joined as README says: the node starts machine 0, machine 1 runs the job's config."""
    images = TrainingImageSet.from_image_batch(_images())
    # A word bound on the input CLIP (as Apply Embedding binds it) means the same in the workers.
    tokens = pack_module("nodes.comfy_bridge.tokens")
    generator = torch.Generator().manual_seed(3)
    bound = {key: torch.randn(2, width, generator=generator) for key, width in tokens.text_encoder_widths(sd15["clip"]).items()}
    clip = tokens.bind_trigger_words(sd15["clip"], {"<bound>": bound})
    common = dict(
        init_text="cat",
        steps=2,
        resolution=64,
        seed=7,
        learning_rate="0.01",
        save=False,
        templates="custom",
        custom_templates="a photo of {} next to <bound>",
    )
    settings = ti.TextualInversionSettings(trigger_word="<two>", **common)
    config = "" if launch == "torchrun" else str(_accelerate_config(tmp_path, 2, machines=2 if launch == "two-machines" else 1))
    devices = launcher.check_devices("" if config else "cpu,cpu", config)
    before = _job_folders()
    joining, second = _second_machine_joins(before, tmp_path / "machine1.log") if launch == "two-machines" else (None, [])
    with torch.inference_mode():
        two = launcher.train_textual_inversion(sd15["model"], clip, sd15["vae"], images, settings, devices, config)
    if joining is not None:
        joining.join()
        assert second and second[0].wait(60) == 0, (tmp_path / "machine1.log").read_text()[-2000:]
    with torch.inference_mode():
        one = ti.train_textual_inversion(
            sd15["model"],
            clip,
            sd15["vae"],
            images,
            ti.TextualInversionSettings(trigger_word="<two>", gradient_accumulation=2, **common),
        )
    [job] = _job_folders() - before
    states = _states(job)
    assert [s["rank"] for s in states] == [0, 1] and states[0]["digests"] == states[1]["digests"], "both processes end the same"
    torch.testing.assert_close(two.embedding.vectors["clip_l"], one.embedding.vectors["clip_l"], rtol=1e-5, atol=1e-6)
    assert two.losses.raw["loss"] == pytest.approx(one.losses.raw["loss"], rel=1e-5)
    assert f"trained on {'accelerate' if config else 'cpu, cpu'}" in two.notes


def test_an_accelerate_config_for_one_process_trains_on_one_worker(sd15, tmp_path):
    """distributed_type NO: accelerate starts the worker without a process group's variables."""
    config = tmp_path / "one.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\nuse_cpu: true\n")
    settings = ti.TextualInversionSettings(trigger_word="<alone>", init_text="cat", steps=1, resolution=64, save=False)
    before = _job_folders()
    with torch.inference_mode():
        result = launcher.train_textual_inversion(
            sd15["model"], sd15["clip"], sd15["vae"], TrainingImageSet.from_image_batch(_images()), settings, ["accelerate"], str(config)
        )
    [job] = _job_folders() - before
    [state] = _states(job)
    assert state["world_size"] == 1 and state["peak_memory_bytes"] > 100 * 2**20, state
    assert result.embedding.vectors["clip_l"].shape == (1, 768) and len(result.losses.raw["loss"]) == 1


@pytest.mark.parametrize("run", ["lora", "full", "full-whole-step"])
def test_dreambooth_on_two_processes_equals_one_on_the_union_of_their_batches(sd15, run, tmp_path):
    """LoRA (with the text encoder and pivotal tuning) and full fine-tuning, prior preservation
    with class images the two processes generate between them. Full fine-tuning shards the
    optimizer state: with the fused backward step (launched by accelerate with a DeepSpeed ZeRO-2
    config) and with a whole-model step and gradient clipping (torchrun)."""
    mode = run.split("-")[0]
    whole_step = run == "full-whole-step"
    images = TrainingImageSet.from_image_batch(_images())
    common = dict(
        mode=mode,
        steps=2,
        resolution=64,
        seed={"lora": 9, "full": 10, "full-whole-step": 11}[run],  # its own class images: the run that generates them shares the work
        save=False,
        prior_preservation=True,
        num_class_images=2,
        class_steps=2,
        class_sampler="euler",
        lora_rank=2,
        lora_alpha=2.0,
        train_text_encoder=mode == "lora",
        pivotal_tuning=mode == "lora",
        learning_rate="1e-3" if mode == "lora" else "1e-4",
        full_bf16=False,
        max_grad_norm=0.01 if whole_step else 0.0,  # small enough to clip every step
    )
    devices, config = TWO_CPUS, ""
    if run == "full":  # launched by accelerate with a DeepSpeed ZeRO-2 config: the pack's sharding, no DeepSpeed
        config = _accelerate_config(tmp_path, 2, "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n")
        devices = launcher.check_devices("", str(config))
    before = _job_folders()
    with torch.inference_mode():
        two = launcher.train_dreambooth(
            sd15["model"],
            sd15["clip"],
            sd15["vae"],
            images,
            db.DreamBoothSettings(fused_backward=not whole_step, **common),
            devices,
            str(config),
        )
        one = db.train_dreambooth(
            sd15["model"], sd15["clip"], sd15["vae"], images, db.DreamBoothSettings(gradient_accumulation=2, fused_backward=False, **common)
        )
    [job] = _job_folders() - before
    states = _states(job)
    assert states[0]["digests"] == states[1]["digests"] and len(states[0]["digests"]) > 0
    assert two.losses.raw["instance"] == pytest.approx(one.losses.raw["instance"], rel=1e-5)
    assert two.losses.raw["prior"] == pytest.approx(one.losses.raw["prior"], rel=1e-5)
    if mode == "lora":
        assert two.lora.keys() == one.lora.keys()
        # AdamW divides by the gradient's own size, so where a gradient is near zero the summation
        # order's rounding moves an element by up to ~10 % of the learning rate (1e-3): measured
        # 1e-5 at most on an Intel Xeon, 5.9e-5 on an AMD EPYC (one element of 1536). A process's
        # gradient missing from the sum would move them by ~1e-3.
        for key in one.lora:
            torch.testing.assert_close(two.lora[key], one.lora[key], rtol=1e-4, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
        torch.testing.assert_close(two.embedding.vectors["clip_l"], one.embedding.vectors["clip_l"], rtol=1e-4, atol=1e-6)
    else:
        assert two.diffs["model"].keys() == one.diffs["model"].keys()
        # The fused step (our AdamW, tensor by tensor) against torch's AdamW over accumulated
        # gradients: the same update up to rounding, which AdamW magnifies only where a gradient
        # is near zero (measured: 9e-5 relative over the whole update, a handful of elements off by
        # more than 1e-6). A process's gradient missing from the sum would change all of it.
        a = torch.cat([two.diffs["model"][k].float().flatten() for k in one.diffs["model"]])
        b = torch.cat([one.diffs["model"][k].float().flatten() for k in one.diffs["model"]])
        assert float((a - b).norm() / b.norm()) < 1e-3
        assert float(((a - b).abs() > 1e-6).float().mean()) < 1e-4
        # ZeRO stage 2: each process held the optimizer state of the weights it owns, about half.
        shares = [state["optimizer_state_bytes"] for state in states]
        assert abs(sum(shares) - one.optimizer_state_bytes) < 0.001 * one.optimizer_state_bytes, (shares, one.optimizer_state_bytes)
        assert max(shares) < 0.55 * one.optimizer_state_bytes, (shares, one.optimizer_state_bytes)
        assert any("sharded over 2 processes" in note for note in two.notes)
        if config:
            assert yaml.safe_load((job / "accelerate.yaml").read_text())["distributed_type"] == "MULTI_GPU"
    assert two.class_images == "generated" and one.class_images == "cached", "the processes shared the sampling and wrote the cache"


def test_cancel_ends_every_worker_and_keeps_the_last_save(sd15, embeddings_dir, caplog):
    caplog.set_level(logging.INFO)
    name = f"cancelled-{uuid.uuid4().hex[:6]}"
    settings = ti.TextualInversionSettings(
        trigger_word=f"<{name}>", init_text="cat", steps=200, save_every=1, resolution=64, file_name=name
    )
    with cancel_at_step(2), torch.inference_mode():
        launcher.train_textual_inversion(
            sd15["model"], sd15["clip"], sd15["vae"], TrainingImageSet.from_image_batch(_images()), settings, TWO_CPUS, node_id="41"
        )
    assert _workers() == [], "no worker process is left"
    saved = pack_module("nodes.core.embedding_file").read_embedding(embeddings_dir / f"{name}.safetensors")
    assert int(saved.metadata["steps"]) >= 1, "the last periodic save stays"
    [job_file] = re.findall(r"on worker processes, job (\S+job\.json)", caplog.text)
    assert Path(job_file).is_file(), "the log names the job file other machines join with"


def test_a_worker_that_dies_is_reported_on_the_node(sd15):
    settings = ti.TextualInversionSettings(trigger_word="<dies>", init_text="cat", steps=500, resolution=64, save=False)
    killed = []

    def kill_rank_one():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for pid, environ in _workers():
                if environ.get("RANK") == "1" and _job_started():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.5)

    def _job_started() -> bool:
        return any((job / "progress.jsonl").exists() for job in _job_folders())

    thread = threading.Thread(target=kill_rank_one, daemon=True)
    thread.start()
    with pytest.raises(RuntimeError, match=r"died|failed") as error, torch.inference_mode():
        launcher.train_textual_inversion(
            sd15["model"], sd15["clip"], sd15["vae"], TrainingImageSet.from_image_batch(_images()), settings, TWO_CPUS
        )
    thread.join()
    assert killed, "a worker was killed"
    assert "SIGKILL" in str(error.value) or "Signal 9" in str(error.value) or "signal" in str(error.value).lower(), str(error.value)[-1500:]
    assert _workers() == []


def test_a_workers_error_reaches_the_node_with_its_message(sd15):
    """A LoRA file without the layers this run trains: the workers find out when they load it."""
    import folder_paths
    import safetensors.torch

    name = f"foreign-{uuid.uuid4().hex[:6]}.safetensors"
    safetensors.torch.save_file(
        {"lora_unet_nothing.lora_up.weight": torch.zeros(4, 2)}, str(Path(folder_paths.get_folder_paths("loras")[0]) / name)
    )
    settings = db.DreamBoothSettings(mode="lora", steps=1, resolution=64, save=False, prior_preservation=False, resume_from=f"loras/{name}")
    with (
        pytest.raises(RuntimeError, match=r"training worker \(rank \d, cpu\) failed: ValueError: cannot resume: .* has no weights for"),
        torch.inference_mode(),
    ):
        launcher.train_dreambooth(
            sd15["model"], sd15["clip"], sd15["vae"], TrainingImageSet.from_image_batch(_images()), settings, TWO_CPUS
        )
    assert _workers() == []
