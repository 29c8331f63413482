"""The ComfyUI internals the pack relies on beyond its public behaviour, checked before use.

Each entry names one internal and what the pack needs of it. ``require()`` checks them all
(once) and raises ``ComfyUIIncompatible`` naming what is missing and the versions known to
work, so a ComfyUI that changed one fails loudly before any work, never with a silently
different conditioning or gradient. tests/comfy/test_comfyui_internals.py checks each by
behaviour as well.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import comfy.ops
import comfy.patcher_extension
import comfy.sd
import comfy.sd1_clip

KNOWN_TO_WORK = "ComfyUI v0.3.64 (a125cd84) to v0.28.0 (700821e1)"


class ComfyUIIncompatible(RuntimeError):
    def __init__(self, internal: str, problem: str):
        super().__init__(
            f"this ComfyUI's {internal} {problem}; the Personalize nodes need it as in {KNOWN_TO_WORK}. "
            "Update the pack, or use a ComfyUI version known to work."
        )
        self.internal = internal


def _parameters(function: Callable) -> set[str]:
    return set(inspect.signature(function).parameters)


# (internal, check that returns a problem or None)
STATIC_CHECKS: list[tuple[str, Callable[[], str | None]]] = [
    (
        "comfy.ops.cast_bias_weight",
        lambda: (
            None
            if {"s", "dtype", "device", "bias_dtype"} <= _parameters(comfy.ops.cast_bias_weight)
            else "does not take (module, dtype=, device=, bias_dtype=)"
        ),
    ),
    (
        "comfy.ops cast layers (weight_function / bias_function)",
        lambda: (
            None
            if hasattr(comfy.ops.CastWeightBiasOp, "weight_function") and hasattr(comfy.ops.CastWeightBiasOp, "bias_function")
            else "have no weight_function / bias_function"
        ),
    ),
    (
        "comfy.patcher_extension DIFFUSION_MODEL wrappers",
        lambda: (
            None
            if hasattr(comfy.patcher_extension, "add_wrapper_with_key") and hasattr(comfy.patcher_extension.WrappersMP, "DIFFUSION_MODEL")
            else "are missing"
        ),
    ),
    (
        "comfy.sd.CLIP",
        lambda: (
            None
            if all(hasattr(comfy.sd.CLIP, name) for name in ("clone", "tokenize", "encode_from_tokens", "load_model"))
            else "lacks clone / tokenize / encode_from_tokens / load_model"
        ),
    ),
    (
        "comfy.sd1_clip.SDTokenizer",
        lambda: (
            None
            if {"embedding_directory", "embedding_size", "embedding_key"} <= _parameters(comfy.sd1_clip.SDTokenizer.__init__)
            else "is no longer built with embedding_directory / embedding_size / embedding_key"
        ),
    ),
]

# Attributes of each SDTokenizer instance the pack reads or sets (on its own copies).
TOKENIZER_ATTRIBUTES = (
    "embedding_directory",
    "embedding_identifier",
    "embedding_key",
    "embedding_size",
    "tokenizer",
    "tokens_start",
    "tokenizer_adds_end_token",
)


@functools.cache
def require() -> None:
    """Raise ComfyUIIncompatible if an internal the pack needs is missing or changed shape."""
    for internal, check in STATIC_CHECKS:
        problem = check()
        if problem:
            raise ComfyUIIncompatible(internal, problem)


def require_tokenizer(tokenizer: Any) -> None:
    missing = [name for name in TOKENIZER_ATTRIBUTES if not hasattr(tokenizer, name)]
    if missing:
        raise ComfyUIIncompatible("comfy.sd1_clip.SDTokenizer", f"instances have no {', '.join(missing)}")
