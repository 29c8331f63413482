"""The "Train Textual Inversion" node."""

from __future__ import annotations

from .comfy_bridge import folders, tokens
from .core.embedding_file import read_embedding
from .core.loss_curve import draw_loss_curve
from .core.prompts import TEMPLATE_CHOICES
from .graph_types import CATEGORY, EMBEDDING
from .node_inputs import IMAGES_TOOLTIP, file_hash, image_inputs, resolution_input, shared, training_images
from .scaleout import launcher
from .training.textual_inversion import TextualInversionSettings

NO_RESUME = "(none: start from the init text)"


class TrainTextualInversion:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (from Load Checkpoint). Frozen: never changed."}),
                "clip": ("CLIP", {"tooltip": "The text encoder(s). Frozen; the output CLIP has the new word bound."}),
                "vae": ("VAE", {"tooltip": "Encodes the training images once into latents."}),
                "trigger_word": (
                    "STRING",
                    {
                        "default": "<my-subject>",
                        "tooltip": "The new word, one word without spaces, e.g. <my-cat>. Prompts use it like any word.",
                    },
                ),
                "init_text": (
                    "STRING",
                    {
                        "default": "*",
                        "tooltip": "Vectors start from these tokens' embeddings: a word close to the subject ('cat', 'watercolor'). Several tokens are averaged into the vectors (at most 75 are used).",
                    },
                ),
                "vectors_per_token": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 16,
                        "tooltip": "How many vectors the word stands for. More learns more detail but takes prompt space and overfits sooner. 1-4 is usual.",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 1500,
                        "min": 1,
                        "max": 100000,
                        "tooltip": "Optimizer steps. The paper used ~5000 at batch 8; 1000-3000 at batch 1 is typical.",
                    },
                ),
                "learning_rate": (
                    "STRING",
                    {
                        "default": "0.005",
                        "tooltip": "A number, or an AUTOMATIC1111-style schedule: '0.005:100, 1e-3:1000, 1e-5' (rate:until step, last one open-ended).",
                    },
                ),
                "batch_size": shared("batch_size"),
                "gradient_accumulation": shared("gradient_accumulation"),
                "seed": shared("seed"),
                "templates": (
                    list(TEMPLATE_CHOICES),
                    {
                        "default": "object",
                        "tooltip": "Training prompts: 'object' (a photo of a {}), 'style' (a painting in the style of {}), 'captions' (each image's caption file; {} or [name] marks the word, else it goes in front), or 'custom' (below).",
                    },
                ),
                "custom_templates": (
                    "STRING",
                    {
                        "default": "a photo of {}\na close-up photo of {}",
                        "multiline": True,
                        "tooltip": "Used when templates is 'custom': one prompt per line with {} (or [name]) where the word goes; [filewords] inserts the caption; lines starting with # are ignored.",
                    },
                ),
                "resolution": resolution_input(),
                "resize_mode": shared("resize_mode"),
                "aspect_buckets": shared("aspect_buckets"),
                "flip": shared("flip"),
                "save_every": shared("save_every"),
                "file_name": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "File name in models/embeddings (empty: the trigger word without < >). Subfolders allowed; it cannot leave the folder.",
                    },
                ),
                "file_format": (
                    ["safetensors", "pt"],
                    {"default": "safetensors", "tooltip": "safetensors (safe, with metadata) or AUTOMATIC1111's .pt."},
                ),
                "overwrite": shared("overwrite"),
                "preview_every": shared("preview_every"),
                "preview_prompt": (
                    "STRING",
                    {"default": "a photo of {}", "tooltip": "Prompt for the live preview; {} is replaced by the trigger word."},
                ),
                "resume_from": (
                    [NO_RESUME, *folders.file_names("embeddings")],
                    {
                        "tooltip": "Continue training an embedding from models/embeddings (same model family); its vector count and step count are used."
                    },
                ),
                "precision": shared("precision"),
                "devices": shared("devices"),
                "accelerate_config": shared("accelerate_config"),
            },
            "optional": image_inputs("Training images of the subject or style. " + IMAGES_TOOLTIP),
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = (EMBEDDING, "CLIP", "IMAGE", "STRING")
    RETURN_NAMES = ("embedding", "clip", "loss_curve", "file_name")
    OUTPUT_TOOLTIPS = (
        "The trained embedding, for Apply Embedding.",
        "The input CLIP with the trigger word bound: prompts can use it at once.",
        "Loss per step (faint) and smoothed (bold).",
        "The file written, as models/embeddings lists it (subfolders included; empty when not saved).",
    )
    FUNCTION = "train"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True  # it writes a file: a graph with nothing after it still runs
    DESCRIPTION = (
        "Textual Inversion: learn a new word for a subject or style from a few images. Only the new "
        "word's vectors train; the model stays as it is. The file works as embedding:NAME anywhere."
    )

    @classmethod
    def IS_CHANGED(cls, resume_from: str = NO_RESUME, **kwargs):
        return "" if resume_from == NO_RESUME else file_hash("embeddings", resume_from)

    def train(
        self,
        model,
        clip,
        vae,
        resume_from: str = NO_RESUME,
        aspect_buckets: bool = True,
        devices: str = "",
        accelerate_config: str = "",
        images=None,
        image_set=None,
        unique_id=None,
        **settings,
    ):
        resume = None if resume_from == NO_RESUME else read_embedding(folders.file_path("embeddings", resume_from))
        listed = launcher.check_devices(devices, accelerate_config)
        images_given = training_images(images, image_set)
        training_settings = TextualInversionSettings(bucketing=aspect_buckets, **settings)
        result = launcher.train_textual_inversion(
            model, clip, vae, images_given, training_settings, listed, accelerate_config, resume, unique_id
        )
        bound = tokens.bind_trigger_words(clip, {result.embedding.name: result.embedding.vectors})
        curve = draw_loss_curve(
            result.losses.steps, result.losses.raw, result.losses.smoothed, title=f"Textual Inversion: {result.embedding.name}"
        )
        name = folders.name_in_folder("embeddings", result.saved_path) if result.saved_path is not None else ""
        return (result.embedding, bound, curve, name)
