"""Words, tokens and embeddings: trigger words bound through ComfyUI's own ``embedding:`` syntax.

A bound word is rewritten to ``embedding:NAME``, where NAME is a file this module writes into a
private folder (under ComfyUI's temp folder) that the bound CLIP's tokenizers also search. So
ComfyUI's own tokenizer reads, weights and chunks the vectors exactly as for a file in
``models/embeddings`` (strength 1 equals ``embedding:file`` bit for bit), and no tokenizer method
is replaced.

Trainable vectors (Textual Inversion, pivotal tuning) are bound the same way, to a file of
*marker* rows; after ComfyUI's tokenizer has placed them, ``splice_trainable`` swaps each marker
row for the live vector it stands for, so gradients reach the vectors.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import comfy.sd
import comfy.sd1_clip
import safetensors.torch
import torch

from ..core.files import atomic_write
from . import folders, internals, layers

_PREFIX = "personalize-bound-"
# A marker row: [MARKER, binding number, vector number, 0, ...]. Small integers, exact in
# float16 and bfloat16 too, so a dtype change on the way could not hide them.
_MARKER = -1984.0


def _sub_tokenizers(tokenizer: Any) -> list[tuple[str, comfy.sd1_clip.SDTokenizer]]:
    """(attribute, SDTokenizer) of a CLIP's tokenizer: itself, or its clip_l/clip_g/... members."""
    if isinstance(tokenizer, comfy.sd1_clip.SDTokenizer):
        return [("", tokenizer)]
    return [(attr, value) for attr, value in vars(tokenizer).items() if isinstance(value, comfy.sd1_clip.SDTokenizer)]


def _base_tokenizer(tokenizer: Any) -> Any:
    return tokenizer.base if isinstance(tokenizer, TriggerWordTokenizer) else tokenizer


def sub_tokenizers(clip: comfy.sd.CLIP) -> list[comfy.sd1_clip.SDTokenizer]:
    return [sub for _, sub in _sub_tokenizers(_base_tokenizer(clip.tokenizer))]


def text_encoder_widths(clip: comfy.sd.CLIP) -> dict[str, int]:
    """The CLIP's text encoders that accept embeddings: encoder key -> vector width."""
    return {sub.embedding_key: int(sub.embedding_size) for sub in sub_tokenizers(clip)}


# --------------------------------------------------------------------------- binding


def bound_folder() -> Path:
    return folders.temp_directory() / "personalize-bound-embeddings"


def _vectors_file(vectors: Mapping[str, torch.Tensor]) -> str:
    """Write ``vectors`` ({encoder key: [n, width]}) as an embedding file named by its content; the name."""
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in sorted(vectors.items())}
    digest = hashlib.sha256()
    for key, value in tensors.items():
        digest.update(key.encode())
        digest.update(str(list(value.shape)).encode())
        digest.update(value.numpy().tobytes())
    name = _PREFIX + digest.hexdigest()[:32]
    target = bound_folder() / f"{name}.safetensors"
    if not target.is_file():
        atomic_write(target, lambda temp: safetensors.torch.save_file(tensors, str(temp)), overwrite=True)
    return name


def _marker_rows(number: int, vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rows = {}
    for key, value in vectors.items():
        marker = torch.zeros(value.shape, dtype=torch.float32)
        marker[:, 0] = _MARKER
        marker[:, 1] = float(number)
        marker[:, 2] = torch.arange(value.shape[0], dtype=torch.float32)
        rows[key] = marker
    return rows


def _trigger_pattern(words: list[str]) -> re.Pattern[str]:
    # Longest first, so "<cat-2>" wins over "<cat"; a word stands alone (not inside another
    # word, nor part of an `embedding:` file name).
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![\w/\\:])(?:{alternatives})(?![\w])")


class TriggerWordTokenizer:
    """A CLIP tokenizer that reads each bound word as ``embedding:<its vectors' file>``.

    It wraps the CLIP's original tokenizer without changing it: the sub-tokenizers are
    shallow copies whose embedding folders start with the private folder of bound vectors.
    ``trainable``: words whose vectors train; their file holds marker rows (see the module
    docstring) and ``splice_trainable`` puts the live vectors in.
    """

    def __init__(
        self,
        base: Any,
        bindings: Mapping[str, Mapping[str, torch.Tensor]],
        trainable: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ):
        internals.require()
        self.base = base
        self.bindings = dict(bindings)
        self.trainable = dict(trainable or {})
        self._numbers = {word: number for number, word in enumerate(self.trainable)}
        words = [*self.bindings, *self.trainable]
        self._pattern = _trigger_pattern(words) if words else None
        self._names: dict[str, str] = {}
        self._patched = copy.copy(base)
        folder = str(bound_folder())
        for attr, sub in _sub_tokenizers(base):
            internals.require_tokenizer(sub)
            patched = copy.copy(sub)
            # A CLIP loaded without an embeddings folder (headless comfy.sd) skips the
            # `embedding:` syntax altogether; with the private folder it works there too.
            patched.embedding_directory = [folder, *_folder_list(sub.embedding_directory)]
            if attr:
                setattr(self._patched, attr, patched)
            else:
                self._patched = patched

    def _file_name(self, word: str) -> str:
        # Written on first use and again if the file went (the temp folder is emptied when
        # ComfyUI starts): the name depends on the vectors alone.
        name = self._names.get(word)
        if name is None or not (bound_folder() / f"{name}.safetensors").is_file():
            vectors = self.bindings.get(word)
            if vectors is None:
                vectors = _marker_rows(self._numbers[word], self.trainable[word])
            name = self._names[word] = _vectors_file(vectors)
        return name

    def rewrite(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: f" embedding:{self._file_name(m.group(0))} ", text)

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> Any:
        return self._patched.tokenize_with_weights(self.rewrite(text), return_word_ids, **kwargs)

    def untokenize(self, token_weight_pair: Any) -> Any:
        return self._patched.untokenize(token_weight_pair)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def __getattr__(self, name: str) -> Any:
        # Nodes that reach into clip.tokenizer.clip_l etc. get the patched sub-tokenizers.
        if name in ("_patched", "base"):
            raise AttributeError(name)
        return getattr(self._patched, name)

    def splice_trainable(self, tokens: Mapping[str, list]) -> dict[str, list]:
        """``tokens`` (from ``clip.tokenize``) with every marker row replaced by its live vector."""
        if not self.trainable:
            return dict(tokens)
        by_number = list(self.trainable.values())
        out: dict[str, list] = {}
        for key, chunks in tokens.items():
            out[key] = [[self._live(token, by_number) for token in chunk] for chunk in chunks]
        return out

    @staticmethod
    def _live(token: tuple, by_number: list[Mapping[str, torch.Tensor]]) -> tuple:
        row = token[0]
        if not isinstance(row, torch.Tensor) or row.dim() != 1 or row.shape[0] < 3 or float(row[0]) != _MARKER:
            return token
        vectors = {int(v.shape[1]): v for v in by_number[int(row[1])].values()}
        return (vectors[int(row.shape[0])][int(row[2])], *token[1:])


def _folder_list(directory: Any) -> list[str]:
    if directory is None:
        return []
    if isinstance(directory, (str, Path)):
        return [str(directory)]
    return [str(d) for d in directory]


def bind_trigger_words(
    clip: comfy.sd.CLIP,
    bindings: Mapping[str, Mapping[str, torch.Tensor]],
    trainable: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> comfy.sd.CLIP:
    """A clone of ``clip`` whose prompts use ``bindings[word][encoder_key]`` for each word.

    The CLIP given is left as it was; words bound earlier in a chain stay bound.
    ``trainable``: words bound to live (trainable) vectors, for training passes only.
    """
    widths = text_encoder_widths(clip)
    for word, vectors in {**bindings, **(trainable or {})}.items():
        missing = [key for key in widths if key not in vectors]
        if missing:
            raise ValueError(f"no vectors for the CLIP's encoder(s) {missing} for '{word}'")
    previous = clip.tokenizer.bindings if isinstance(clip.tokenizer, TriggerWordTokenizer) else {}
    bound = clip.clone()
    bound.tokenizer = TriggerWordTokenizer(_base_tokenizer(clip.tokenizer), {**previous, **bindings}, trainable)
    return bound


def trigger_word_bindings(clip: comfy.sd.CLIP) -> dict[str, dict[str, torch.Tensor]]:
    """The words bound on ``clip`` (by Apply Embedding or a trainer) and their vectors; a checkpoint
    saved from the CLIP does not carry them, so worker processes bind them again."""
    tokenizer = clip.tokenizer
    return {word: dict(vectors) for word, vectors in tokenizer.bindings.items()} if isinstance(tokenizer, TriggerWordTokenizer) else {}


def tokenize(clip: comfy.sd.CLIP, text: str) -> dict[str, list]:
    """ComfyUI's tokens for ``text``, live trainable vectors in place."""
    tokens = clip.tokenize(text)
    if isinstance(clip.tokenizer, TriggerWordTokenizer):
        tokens = clip.tokenizer.splice_trainable(tokens)
    return tokens


# --------------------------------------------------------------------------- the vocabulary


def word_token_ids(clip: comfy.sd.CLIP, text: str) -> dict[str, list[int]]:
    """Token ids of ``text``'s words (no start, end or padding tokens), per text encoder key."""
    out: dict[str, list[int]] = {}
    for sub in sub_tokenizers(clip):
        ids = sub.tokenizer(text)["input_ids"]
        end = len(ids) - 1 if sub.tokenizer_adds_end_token else len(ids)
        out[sub.embedding_key] = list(ids[sub.tokens_start : end])
    return out


def is_single_known_token(clip: comfy.sd.CLIP, word: str, everywhere: bool = False) -> bool:
    """Whether ``word`` already is one token of the vocabulary (of every tokenizer with ``everywhere``)."""
    counts = [len(ids) == 1 for ids in word_token_ids(clip, word).values()]
    return all(counts) if everywhere else any(counts)


def first_vocabulary(clip: comfy.sd.CLIP) -> dict[str, int]:
    """The BPE vocabulary of the CLIP's first tokenizer: token text -> id."""
    subs = sub_tokenizers(clip)
    if not subs:
        raise ValueError("this CLIP has no CLIP tokenizer")
    return dict(subs[0].tokenizer.get_vocab())


def first_token_ids(clip: comfy.sd.CLIP, text: str) -> list[int]:
    """Token ids of ``text`` with the CLIP's first tokenizer."""
    return next(iter(word_token_ids(clip, text).values()))


def token_embedding_rows(clip: comfy.sd.CLIP, text: str) -> dict[str, torch.Tensor]:
    """The input-embedding rows of ``text``'s tokens, per text encoder: {key: [n_tokens, width]}, float32."""
    rows: dict[str, torch.Tensor] = {}
    for key, ids in word_token_ids(clip, text).items():
        encoder = getattr(clip.cond_stage_model, key, None)
        if encoder is None:
            raise ValueError(f"this CLIP has no '{key}' text encoder")
        embeddings = encoder.transformer.get_input_embeddings()
        table, bias = layers.borrow(embeddings, torch.float32, torch.device("cpu"))
        try:
            rows[key] = table[torch.tensor(ids, dtype=torch.long)].detach().clone()
        finally:
            layers.release(embeddings, table, bias)
    return rows
