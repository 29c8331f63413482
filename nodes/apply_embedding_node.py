"""The "Apply Embedding" node: bind an embedding to a CLIP under a trigger word."""

from __future__ import annotations

from .comfy_bridge import folders, tokens
from .core.embedding_file import EmbeddingFile, read_embedding, vectors_for_encoders
from .graph_types import CATEGORY, EMBEDDING
from .node_inputs import file_hash

NO_FILE = "(none: use the embedding input)"


def validate_trigger_word(word: str) -> str:
    word = word.strip()
    if not word:
        raise ValueError("the trigger word is empty: type the word your prompts will use, e.g. <my-cat>")
    if any(c.isspace() for c in word):
        raise ValueError(f"the trigger word '{word}' contains spaces: use one word, e.g. <{'-'.join(word.split())}>")
    if word.startswith("embedding:"):
        raise ValueError("the trigger word must not start with 'embedding:' (that prefix names files)")
    return word


class ApplyEmbedding:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP to teach the word to. It is cloned: other branches keep the original."}),
                "embedding_file": (
                    [NO_FILE, *folders.file_names("embeddings")],
                    {"tooltip": "An embedding from models/embeddings. Ignored when the embedding input is connected."},
                ),
                "trigger_word": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "The word your prompts use for the embedding, e.g. <my-cat>. Empty: the name stored in the embedding.",
                    },
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -10.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "Scales the embedding's vectors. 1 = as trained; lower weakens it.",
                    },
                ),
            },
            "optional": {
                "embedding": (EMBEDDING, {"tooltip": "An embedding from a training node; takes precedence over the file."}),
            },
        }

    RETURN_TYPES = ("CLIP", "STRING")
    RETURN_NAMES = ("clip", "trigger_word")
    OUTPUT_TOOLTIPS = (
        "The CLIP with the trigger word bound: use the word anywhere in a prompt.",
        "The trigger word that was bound.",
    )
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Bind a Textual Inversion embedding to a CLIP under a trigger word, so prompts can use "
        "the word like any other. Chain several to use several embeddings."
    )

    @classmethod
    def IS_CHANGED(cls, embedding_file: str = NO_FILE, **kwargs):
        return "" if embedding_file == NO_FILE else file_hash("embeddings", embedding_file)

    def apply(self, clip, embedding_file: str, trigger_word: str, strength: float, embedding: EmbeddingFile | None = None):
        if embedding is None:
            if embedding_file == NO_FILE:
                raise ValueError("no embedding: choose a file in 'embedding_file' or connect a training node's embedding")
            embedding = read_embedding(folders.file_path("embeddings", embedding_file))
        word = validate_trigger_word(trigger_word or embedding.name)
        vectors = vectors_for_encoders(embedding, tokens.text_encoder_widths(clip))
        scaled = {key: tensor * strength for key, tensor in vectors.items()}
        return (tokens.bind_trigger_words(clip, {word: scaled}), word)
