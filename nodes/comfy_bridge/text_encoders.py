"""Text encoders: ComfyUI's own CLIP pass, frozen (conditioning) or on a training view.

``TrainingTextEncoder`` is a clone of the CLIP whose ``cond_stage_model`` is a training view of
the input's (``core.training_layers``): frozen layers, LoRA adapters or, for full tuning, weights
of its own; trigger words may be bound to trainable vectors. ComfyUI's tokenizer, prompt
weighting, chunking and encoder code compute the conditioning, so it equals CLIP Text Encode's
for the same prompt and vectors, and the input CLIP is never changed.
"""

from __future__ import annotations

from collections.abc import Mapping

import comfy.lora
import comfy.sd
import torch

from ..core.adapters import LoraPair
from ..core.training_layers import saved_activation_copies, training_view
from ..core.training_math import repeat_to_common_length
from . import devices, internals, layers, tokens
from .diffusion_model import weight_diffs

# ComfyUI computes every text encoder in float32 (CLIP Text Encode included).
TEXT_ENCODER_DTYPE = torch.float32


def encode_prompt(clip: comfy.sd.CLIP, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditioning exactly as CLIP Text Encode computes it: (cond, pooled)."""
    return clip.encode_from_tokens(tokens.tokenize(clip, text), return_pooled=True)


def conditioning(clip: comfy.sd.CLIP, text: str) -> list:
    """CONDITIONING as CLIP Text Encode returns it (for sampling)."""
    return clip.encode_from_tokens_scheduled(tokens.tokenize(clip, text))


class TrainingTextEncoder:
    """A CLIP clone that computes on a training view of the input CLIP's text encoders.

    ``trainable_words``: {word: {encoder key: vectors}} bound to live vectors (Textual Inversion,
    pivotal tuning). ``adapters``: {weight key: LoraPair} (text-encoder LoRA). ``own_dtype``:
    full tuning, every layer gets weights of its own.
    """

    def __init__(
        self,
        clip: comfy.sd.CLIP,
        *,
        trainable_words: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        adapters: Mapping[str, LoraPair] | None = None,
        own_dtype: torch.dtype | None = None,
    ):
        internals.require()
        self.source = clip
        self.device = clip.patcher.load_device
        training_clip = tokens.bind_trigger_words(clip, {}, trainable_words) if trainable_words else clip.clone()
        if own_dtype is not None:
            devices.load([clip.patcher])  # the own weights start from the effective (patched) ones
        by_path = {key[: -len(".weight")]: pair for key, pair in (adapters or {}).items()}
        self.view = training_view(
            clip.cond_stage_model,
            layers.borrow,
            TEXT_ENCODER_DTYPE,
            is_layer=layers.is_cast_layer,
            adapters=by_path,
            own_dtype=own_dtype,
            device=self.device,
            release=layers.release,
        )
        training_clip.cond_stage_model = self.view
        self.clip = training_clip

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.view.own_parameters)

    def encode(self, prompts: list[str], need_pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond [B, T, D], pooled [B, P] or None) for a batch of prompts.

        Prompts that fit one 77-token chunk go through the encoder as one batch (ComfyUI's
        encoder takes a prompt's chunks as a batch); the pooled output exists per prompt
        only when each is encoded alone, so SDXL (whose model reads it) encodes one by one.
        """
        token_sets = [tokens.tokenize(self.clip, prompt) for prompt in prompts]
        single_chunk = all(len(chunks) == 1 for token_set in token_sets for chunks in token_set.values())
        with saved_activation_copies():
            if len(prompts) > 1 and single_chunk and not need_pooled:
                merged = {key: [token_set[key][0] for token_set in token_sets] for key in token_sets[0]}
                cond = self.clip.encode_from_tokens(merged)
                return cond.reshape(len(prompts), -1, cond.shape[-1]), None
            encoded = [self.clip.encode_from_tokens(token_set, return_pooled=True) for token_set in token_sets]
        conds = [cond for cond, _ in encoded]
        pooled = [pool for _, pool in encoded]
        pooled_batch = torch.cat(pooled) if need_pooled and all(p is not None for p in pooled) else None
        return repeat_to_common_length(conds), pooled_batch

    def diffs(self) -> dict[str, torch.Tensor]:
        """Full tuning: trained minus starting weights, keyed as the CLIP's patches are."""
        devices.load([self.source.patcher])
        return weight_diffs(self.view, self.source.cond_stage_model, "", self.device, self.source.patcher.offload_device)


# --------------------------------------------------------------------------- which weights a LoRA adapts


def weight_count(clip: comfy.sd.CLIP) -> int:
    """Weights of the text encoders (what full fine-tuning of the text side trains)."""
    return sum(p.numel() for p in clip.cond_stage_model.parameters())


def clip_lora_weights(clip: comfy.sd.CLIP) -> dict[str, tuple[int, ...]]:
    """Text-encoder weights a LoRA adapts: attention q/k/v/out and the MLP of every layer."""
    suffixes = tuple(f".{name}.weight" for name in comfy.lora.LORA_CLIP_MAP)
    chosen = {}
    for name, module in clip.cond_stage_model.named_modules():
        key = f"{name}.weight"
        if layers.is_cast_layer(module) and isinstance(module, torch.nn.Linear) and ".encoder.layers." in key and key.endswith(suffixes):
            chosen[key] = tuple(module.weight.shape)
    if not chosen:
        raise ValueError(
            "text-encoder LoRA trains CLIP text encoders (SD1.x, SD2.x, SDXL, and Flux's and SD3's CLIP-L/CLIP-G); this CLIP has none. "
            "T5 and LLM encoders are not trained (too large to tune well, and no trainer people use does it): turn 'train text encoder' off"
        )
    return chosen
