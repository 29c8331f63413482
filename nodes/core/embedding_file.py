"""Textual Inversion embedding files: read every format in circulation, write ours.

Pure torch + safetensors, no ComfyUI import, so training workers started outside
the server (torchrun, accelerate) can read and write embeddings too.

Formats read
- AUTOMATIC1111 ``.pt``: ``{"string_to_param": {"*": tensor[n, d]}, "name": ..., "step": ...}``
- the Textual Inversion paper's own ``.pt`` (``string_to_param`` is a pickled ``torch.nn.ParameterDict``;
  that container class alone is allowed to the tensors-only unpickler, so no code runs)
- AUTOMATIC1111 ``.safetensors``: ``{"emb_params": tensor[n, d]}``
- diffusers ``learned_embeds`` (``.bin`` or ``.safetensors``): ``{"<token>": tensor[d] | tensor[n, d]}``
- SDXL: ``{"clip_l": tensor[n, 768], "clip_g": tensor[n, 1280]}``
- a bare tensor ``[d]`` or ``[n, d]``

Formats written
- ``.safetensors`` (default): ``emb_params`` for one text encoder, ``clip_l``/``clip_g`` for
  SDXL, with string metadata (see ``EmbeddingFile.metadata``).
- ``.pt`` on request, in AUTOMATIC1111's layout (``string_to_param``) for one encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from .files import atomic_write, resolve_inside

FORMAT_TAG = "comfyui-personalize.embedding/1"
EXTENSIONS = (".safetensors", ".pt", ".bin")

# The text encoder a single-encoder file belongs to follows from its width alone:
# A1111 and diffusers files do not say which encoder they were trained for.
ENCODER_BY_WIDTH = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}
# The model families the pack knows, by the (sorted) keys of their text encoders.
MODEL_FAMILY_BY_ENCODERS = {
    ("clip_l",): "SD1.x",
    ("clip_h",): "SD2.x",
    ("clip_g", "clip_l"): "SDXL",
}
# Containers the Textual Inversion paper's code pickles around its vectors: allowed to
# torch.load(weights_only=True), which then rebuilds them without running any other code.
_ALLOWED_CONTAINERS = (torch.nn.ParameterDict, torch.nn.ParameterList)
# Keys of our own metadata, and those we never treat as vectors in foreign dict files.
_NON_VECTOR_KEYS = {"name", "step", "sd_checkpoint", "sd_checkpoint_name", "string_to_token"}


class EmbeddingFormatError(ValueError):
    """A file that is not an embedding we can read, with the reason and what to do."""


class EmbeddingMismatchError(ValueError):
    """An embedding whose vectors do not fit a CLIP's text encoders."""


@dataclass(frozen=True)
class EmbeddingFile:
    """Learned token vectors for one trigger word, per text encoder.

    ``vectors`` maps an encoder key (``clip_l``, ``clip_g``, ``clip_h``, or
    ``emb_params`` for a width no known encoder has) to a float32 ``[n, width]`` tensor.
    Every encoder carries the same number of vectors: they stand for the same tokens.
    """

    vectors: dict[str, torch.Tensor]
    name: str
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.vectors:
            raise EmbeddingFormatError("an embedding needs at least one tensor of vectors")
        counts = {k: v.shape[0] for k, v in self.vectors.items()}
        for key, tensor in self.vectors.items():
            if tensor.dim() != 2 or tensor.shape[0] < 1:
                raise EmbeddingFormatError(f"vectors for {key} must be [n, width], got {list(tensor.shape)}")
        if len(set(counts.values())) != 1:
            raise EmbeddingFormatError(f"every text encoder needs the same number of vectors, got {counts}")
        for key, tensor in self.vectors.items():
            if not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise EmbeddingFormatError(
                    f"the {key} vectors hold {bad} NaN or infinite value(s): such an embedding would turn every "
                    "prompt that uses it (and every image) into noise"
                )

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> dict[str, int]:
        return {k: int(v.shape[1]) for k, v in self.vectors.items()}

    @property
    def model_family(self) -> str:
        return MODEL_FAMILY_BY_ENCODERS.get(tuple(sorted(self.vectors)), "unknown")

    def renamed(self, name: str) -> EmbeddingFile:
        return replace(self, name=name)

    def vectors_sha256(self) -> str:
        return vectors_sha256(self.vectors)

    def describe(self) -> str:
        widths = ", ".join(f"{k} {w}" for k, w in self.widths.items())
        return f"'{self.name}': {self.num_vectors} vector(s), {widths} wide ({self.model_family})"


def vectors_sha256(vectors: Mapping[str, torch.Tensor]) -> str:
    """A hash of the vectors' values, so a file can be told apart from a retrained one."""
    digest = hashlib.sha256()
    for key in sorted(vectors):
        tensor = vectors[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(key.encode())
        digest.update(str(list(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def encoder_key_for_width(width: int) -> str:
    return ENCODER_BY_WIDTH.get(width, "emb_params")


def _describe_widths(widths: Mapping[str, int]) -> str:
    return ", ".join(f"{key} {width}" for key, width in widths.items())


def vectors_for_encoders(embedding: EmbeddingFile, encoder_widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The embedding's vectors for each of a CLIP's text encoders, or a clear error.

    Every encoder of the CLIP needs its own vectors of its own width: an SD1.x embedding
    (768) does not fit an SDXL CLIP (768 + 1280), whose prompts go through both encoders.
    """
    if not encoder_widths:
        raise EmbeddingMismatchError("this CLIP has no text encoder that takes embeddings")
    chosen: dict[str, torch.Tensor] = {}
    for key, width in encoder_widths.items():
        tensor = embedding.vectors.get(key)
        if tensor is None or tensor.shape[1] != width:
            raise EmbeddingMismatchError(
                f"embedding {embedding.describe()} does not fit this CLIP: its vectors are "
                f"{_describe_widths(embedding.widths)} wide, the CLIP's text encoders take "
                f"{_describe_widths(encoder_widths)}. Use an embedding trained for this model family "
                f"({MODEL_FAMILY_BY_ENCODERS.get(tuple(sorted(encoder_widths)), 'this model')})."
            )
        chosen[key] = tensor
    return chosen


# --------------------------------------------------------------------------- reading


def read_embedding(path: str | os.PathLike) -> EmbeddingFile:
    """Read an embedding in any supported format; pickles are never executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path}")
    suffix = path.suffix.lower()
    metadata: dict[str, str] = {}
    if suffix == ".safetensors":
        import safetensors
        import safetensors.torch

        try:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
            content: Any = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own error types
            raise EmbeddingFormatError(f"{path.name} is not a readable safetensors file: {error}") from error
    elif suffix in (".pt", ".bin", ".ckpt", ".pth"):
        content = _load_tensors_only(path)
    else:
        raise EmbeddingFormatError(f"{path.name}: unknown embedding extension '{suffix}'; expected one of {', '.join(EXTENSIONS)}")
    vectors, stored_name, extra = _vectors_from_content(content, path.name)
    metadata = {**extra, **metadata}
    name = metadata.get("trigger_word") or stored_name or path.stem
    try:
        return EmbeddingFile(vectors=vectors, name=name, metadata=metadata)
    except EmbeddingFormatError as error:
        raise EmbeddingFormatError(f"{path.name} refused: {error}") from None


def _load_tensors_only(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(list(_ALLOWED_CONTAINERS)):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise EmbeddingFormatError(
            f"{path.name} refused: it is a pickle that needs code beyond plain tensors to load, "
            f"and pickles are never executed here ({str(error).splitlines()[0]}). If the file is "
            "from a source you trust, convert it to .safetensors with the tool that made it."
        ) from error
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise EmbeddingFormatError(f"{path.name} is not a readable torch file: {error}") from error


def _as_matrix(value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise EmbeddingFormatError(f"{where}: expected a tensor, found {type(value).__name__}")
    tensor = value.detach().to(torch.float32)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise EmbeddingFormatError(f"{where}: expected vectors shaped [n, width], got {list(tensor.shape)}")
    return tensor.contiguous()


def _vectors_from_content(content: Any, filename: str) -> tuple[dict[str, torch.Tensor], str | None, dict[str, str]]:
    """Map a loaded object to (vectors by encoder, stored name, metadata)."""
    if isinstance(content, torch.Tensor):
        tensor = _as_matrix(content, filename)
        return {encoder_key_for_width(tensor.shape[1]): tensor}, None, {}
    if not isinstance(content, Mapping):
        raise EmbeddingFormatError(f"{filename}: not an embedding (top level is {type(content).__name__})")

    extra: dict[str, str] = {}
    if "step" in content and content["step"] is not None:
        extra["steps"] = str(content["step"])
    if content.get("sd_checkpoint_name"):
        extra["base_model"] = str(content["sd_checkpoint_name"])
    stored_name = content.get("name") if isinstance(content.get("name"), str) else None

    if "string_to_param" in content:  # AUTOMATIC1111 .pt, or the paper's ParameterDict
        params = content["string_to_param"]
        if isinstance(params, torch.nn.ParameterDict):
            params = dict(params.items())
        if not isinstance(params, Mapping) or not params:
            raise EmbeddingFormatError(f"{filename}: 'string_to_param' holds no tensors")
        tensor = _as_matrix(next(iter(params.values())), f"{filename} string_to_param")
        return {encoder_key_for_width(tensor.shape[1]): tensor}, stored_name, extra

    if "clip_l" in content or "clip_g" in content:  # SDXL
        vectors = {k: _as_matrix(content[k], f"{filename} {k}") for k in ("clip_l", "clip_g") if k in content}
        return vectors, stored_name, extra

    if "emb_params" in content:  # AUTOMATIC1111 .safetensors
        tensor = _as_matrix(content["emb_params"], f"{filename} emb_params")
        return {encoder_key_for_width(tensor.shape[1]): tensor}, stored_name, extra

    tensors = {k: v for k, v in content.items() if isinstance(v, torch.Tensor) and k not in _NON_VECTOR_KEYS}
    if len(tensors) == 1:  # diffusers learned_embeds: {token: tensor}
        token, value = next(iter(tensors.items()))
        tensor = _as_matrix(value, f"{filename} {token}")
        return {encoder_key_for_width(tensor.shape[1]): tensor}, stored_name or token, extra
    if not tensors:
        raise EmbeddingFormatError(f"{filename}: no tensors found (keys: {', '.join(map(str, content)) or 'none'})")
    raise EmbeddingFormatError(
        f"{filename}: holds {len(tensors)} tensors ({', '.join(list(tensors)[:5])}) and none of the known "
        "embedding keys (string_to_param, emb_params, clip_l/clip_g); is it a LoRA or a checkpoint?"
    )


# --------------------------------------------------------------------------- writing


def embedding_metadata(
    embedding: EmbeddingFile,
    *,
    base_model: str | None = None,
    steps: int | None = None,
    training_settings: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The string metadata stored in our safetensors files (safetensors allows str only)."""
    metadata = dict(embedding.metadata)
    metadata.update(
        {
            "format": FORMAT_TAG,
            "trigger_word": embedding.name,
            "num_vectors": str(embedding.num_vectors),
            "model_family": embedding.model_family,
            "vectors_sha256": embedding.vectors_sha256(),
        }
    )
    if base_model is not None:
        metadata["base_model"] = base_model
    if steps is not None:
        metadata["steps"] = str(steps)
    if training_settings is not None:
        metadata["training_settings"] = json.dumps(dict(training_settings), sort_keys=True, default=str)
    return metadata


def write_embedding(
    embedding: EmbeddingFile,
    directory: str | os.PathLike,
    name: str,
    *,
    file_format: Literal["safetensors", "pt"] = "safetensors",
    overwrite: bool = False,
    base_model: str | None = None,
    steps: int | None = None,
    training_settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``embedding`` as ``directory/name.<format>`` atomically; returns the path written."""
    if file_format not in ("safetensors", "pt"):
        raise ValueError(f"unknown embedding format '{file_format}': use 'safetensors' or 'pt'")
    target = resolve_inside(directory, name, "." + file_format)
    metadata = embedding_metadata(embedding, base_model=base_model, steps=steps, training_settings=training_settings)
    vectors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in embedding.vectors.items()}
    single = len(vectors) == 1 and "clip_g" not in vectors

    if file_format == "safetensors":
        import safetensors.torch

        tensors = {"emb_params": next(iter(vectors.values()))} if single else vectors

        def write(temp: Path) -> None:
            safetensors.torch.save_file(tensors, str(temp), metadata=metadata)

    else:
        if single:
            # AUTOMATIC1111's layout; its loader also reads "name" and "step".
            content: dict[str, Any] = {
                "string_to_token": {"*": 265},
                "string_to_param": {"*": next(iter(vectors.values()))},
                "name": embedding.name,
                "step": steps or 0,
                "sd_checkpoint": None,
                "sd_checkpoint_name": base_model,
            }
        else:
            content = {**vectors, "name": embedding.name, "step": steps or 0}

        def write(temp: Path) -> None:
            torch.save(content, str(temp))

    return atomic_write(target, write, overwrite=overwrite)
