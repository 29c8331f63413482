"""A multi-process training job on disk: what the node hands its worker processes, and what
they hand back. Plain Python, safetensors, JSON and YAML (no pickle, no ComfyUI import).

A job folder holds:

- ``job.json``: what to train (trainer, settings, the exported checkpoint, ComfyUI's folders, devices,
  whether full fine-tuning shards its optimizer state); ``accelerate.yaml``: the config accelerate launched with;
- ``images.safetensors``: the training images (``image_N`` [H, W, 3], captions in the metadata),
  and ``class_images.safetensors`` / ``resume.safetensors`` when given;
- ``progress.jsonl``: one line per reported step, written by rank 0 (previews as JPEG files);
- ``result.json`` + ``result-*.safetensors``: rank 0's results; ``state-rank-N.json``: a digest
  of every rank's trained tensors (all ranks end with the same ones);
- ``error-rank-N.json``: a worker's exception, for the node to show.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from ..core.embedding_file import EmbeddingFile
from ..core.files import atomic_write
from ..core.training_images import TrainingImage, TrainingImageSet


def free_port() -> int:
    """A TCP port free on this machine now, for a process group to meet on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_devices(text: str) -> list[str]:
    """``"cuda:0,cuda:1"`` (or ``"0,1"``) -> one worker per device; ``"cpu,cpu"`` -> two CPU workers.

    Empty: the device ComfyUI uses, in ComfyUI's process. Raises ValueError with what to write.
    """
    entries = [e.strip().lower() for e in str(text).replace(";", ",").split(",") if e.strip()]
    devices = []
    for entry in entries:
        if entry.isdigit():
            entry = f"cuda:{entry}"
        if entry == "cuda":
            entry = "cuda:0"
        if not (entry == "cpu" or (entry.startswith("cuda:") and entry[5:].isdigit())):
            raise ValueError(f"devices: '{entry}' is no device; list GPUs as cuda:0,cuda:1 (or 0,1), or cpu,cpu for CPU workers")
        devices.append(entry)
    kinds = {d.split(":")[0] for d in devices}
    if len(kinds) > 1:
        raise ValueError(f"devices: {', '.join(devices)} mixes CPU and GPU workers; list one kind")
    cuda = [d for d in devices if d != "cpu"]
    if len(set(cuda)) != len(cuda):
        raise ValueError(f"devices: {', '.join(devices)} lists a GPU twice; one worker per GPU")
    return devices


@dataclass
class JobSpec:
    trainer: str  # "textual_inversion" or "dreambooth"
    settings: dict[str, Any]
    checkpoint: str  # the exported MODEL/CLIP/VAE, loaded by every worker with comfy.sd
    comfy_dir: str
    folders: dict[str, list[str]]  # ComfyUI folder name -> paths, as in the node's process
    devices: list[str]
    node_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    shard_optimizer_state: bool = True  # full fine-tuning's optimizer state divided among the workers


class JobFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ the job

    def write_spec(self, spec: JobSpec) -> Path:
        text = json.dumps(spec.__dict__, indent=1, default=str)
        return atomic_write(self.path / "job.json", lambda temp: temp.write_text(text, encoding="utf-8"), overwrite=True)

    def read_spec(self) -> JobSpec:
        return JobSpec(**json.loads((self.path / "job.json").read_text(encoding="utf-8")))

    def write_tensors(self, name: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
        content = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        return atomic_write(
            self.path / f"{name}.safetensors",
            lambda temp: safetensors.torch.save_file(content, str(temp), metadata=dict(metadata or {})),
            overwrite=True,
        )

    def read_tensors(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        path = self.path / f"{name}.safetensors"
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
        return safetensors.torch.load_file(str(path), device="cpu"), metadata

    def write_embedding(self, name: str, embedding: EmbeddingFile) -> Path:
        """A trained embedding handed back: its vectors, and its trigger word as ``name``."""
        return self.write_tensors(name, embedding.vectors, {"name": embedding.name})

    def read_embedding(self, name: str) -> EmbeddingFile:
        vectors, metadata = self.read_tensors(name)
        return EmbeddingFile(vectors, name=metadata["name"])

    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    def write_images(self, images: TrainingImageSet, name: str = "images") -> Path:
        tensors = {f"image_{i}": image.pixels for i, image in enumerate(images.images)}
        metadata = {
            "captions": json.dumps([image.caption for image in images.images]),
            "sources": json.dumps([image.source for image in images.images]),
        }
        return self.write_tensors(name, tensors, metadata)

    def read_images(self, name: str = "images") -> TrainingImageSet:
        tensors, metadata = self.read_tensors(name)
        captions, sources = json.loads(metadata["captions"]), json.loads(metadata["sources"])
        return TrainingImageSet([TrainingImage(tensors[f"image_{i}"], captions[i], sources[i]) for i in range(len(captions))])

    # ------------------------------------------------------------------ progress (rank 0 -> node)

    def write_bindings(self, bindings: Mapping[str, Mapping[str, torch.Tensor]], name: str = "bindings") -> None:
        """Trigger words bound on the node's CLIP, with their vectors (none: nothing written)."""
        if bindings:
            words = list(bindings)
            tensors = {f"{number}/{key}": vectors for number, word in enumerate(words) for key, vectors in bindings[word].items()}
            self.write_tensors(name, tensors, {"words": json.dumps(words)})

    def read_bindings(self, name: str = "bindings") -> dict[str, dict[str, torch.Tensor]]:
        if not self.has(f"{name}.safetensors"):
            return {}
        tensors, metadata = self.read_tensors(name)
        words = json.loads(metadata["words"])
        out: dict[str, dict[str, torch.Tensor]] = {word: {} for word in words}
        for key, vectors in tensors.items():
            number, encoder = key.split("/", 1)
            out[words[int(number)]][encoder] = vectors
        return out

    def append_progress(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(dict(record)) + "\n"
        with open(self.path / "progress.jsonl", "a", encoding="utf-8") as stream:
            stream.write(line)
            stream.flush()
            os.fsync(stream.fileno())

    def read_progress(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """The complete lines after byte ``offset``, and the offset after them."""
        path = self.path / "progress.jsonl"
        if not path.exists():
            return [], offset
        with open(path, "rb") as stream:
            stream.seek(offset)
            data = stream.read()
        end = data.rfind(b"\n") + 1
        lines = [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line.strip()]
        return lines, offset + end

    # ------------------------------------------------------------------ results and errors

    def write_yaml(self, name: str, value: Mapping[str, Any]) -> Path:
        import yaml

        text = yaml.safe_dump(dict(value), sort_keys=False)
        return atomic_write(self.path / f"{name}.yaml", lambda temp: temp.write_text(text, encoding="utf-8"), overwrite=True)

    def write_json(self, name: str, value: Any) -> Path:
        text = json.dumps(value, indent=1, default=str)
        return atomic_write(self.path / f"{name}.json", lambda temp: temp.write_text(text, encoding="utf-8"), overwrite=True)

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / f"{name}.json").read_text(encoding="utf-8"))

    def errors(self) -> Iterator[dict[str, Any]]:
        for path in sorted(self.path.glob("error-rank-*.json")):
            yield json.loads(path.read_text(encoding="utf-8"))


def tensor_digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """A sha256 per tensor (its dtype, shape and bytes): equal digests mean bitwise-equal tensors."""
    out = {}
    for name, tensor in sorted(tensors.items()):
        data = tensor.detach().to("cpu").contiguous()
        digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        out[name] = digest.hexdigest()
    return out
