"""The "Train Textual Inversion" node."""
from __future__ import annotations

import hashlib

from . import comfy_adapter
from .embedding_file import read_embedding
from .graph_types import CATEGORY, EMBEDDING, TRAINING_IMAGES
from .loss_curve import draw_loss_curve
from .prompts import TEMPLATE_CHOICES
from .textual_inversion import TextualInversionSettings, train_textual_inversion
from .training_images import TrainingImageSet

NO_RESUME = "(none: start from the init text)"


def training_images(images, image_set) -> TrainingImageSet | None:
    """The images a training node was given: the image-folder set, else the IMAGE batch."""
    if image_set is not None:
        return image_set
    if images is not None:
        return TrainingImageSet.from_image_batch(images)
    return None


class TrainTextualInversion:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (from Load Checkpoint). Frozen: never changed."}),
                "clip": ("CLIP", {"tooltip": "The text encoder(s). Frozen; the output CLIP has the new word bound."}),
                "vae": ("VAE", {"tooltip": "Encodes the training images once into latents."}),
                "trigger_word": ("STRING", {"default": "<my-subject>", "tooltip": "The new word, one word without spaces, e.g. <my-cat>. Prompts use it like any word."}),
                "init_text": ("STRING", {"default": "*", "tooltip": "Vectors start from these tokens' embeddings: a word close to the subject ('cat', 'watercolor'). Several tokens are averaged into the vectors."}),
                "vectors_per_token": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "How many vectors the word stands for. More learns more detail but takes prompt space and overfits sooner. 1-4 is usual."}),
                "steps": ("INT", {"default": 1500, "min": 1, "max": 100000, "tooltip": "Optimizer steps. The paper used ~5000 at batch 8; 1000-3000 at batch 1 is typical."}),
                "learning_rate": ("STRING", {"default": "0.005", "tooltip": "A number, or an AUTOMATIC1111-style schedule: '0.005:100, 1e-3:1000, 1e-5' (rate:until step, last one open-ended)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per micro-step (same aspect bucket)."}),
                "gradient_accumulation": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Micro-steps summed per optimizer step: effective batch = batch size × this, at the memory of one batch."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Seed for noise, timesteps, templates and batch order."}),
                "templates": (list(TEMPLATE_CHOICES), {"default": "object", "tooltip": "Training prompts: 'object' (a photo of a {}), 'style' (a painting in the style of {}), 'captions' (each image's caption file; {} or [name] marks the word, else it goes in front), or 'custom' (below)."}),
                "custom_templates": ("STRING", {"default": "a photo of {}\na close-up photo of {}", "multiline": True, "tooltip": "Used when templates is 'custom': one prompt per line with {} (or [name]) where the word goes; [filewords] inserts the caption."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip": "Training resolution (multiple of 64). 512 for SD1.x, 768 for SD2-768, 1024 for SDXL."}),
                "resize_mode": (["crop", "resize", "pad"], {"default": "crop", "tooltip": "How images are brought to their bucket size: crop (cover, centre crop), resize (stretch) or pad (fit, white borders)."}),
                "aspect_buckets": ("BOOLEAN", {"default": True, "tooltip": "Keep aspect ratios: group images into buckets of about resolution² pixels. Off: every image becomes a resolution×resolution square."}),
                "flip": ("BOOLEAN", {"default": False, "tooltip": "Randomly mirror images left-right. Good for symmetric subjects and styles; off for text or asymmetric subjects."}),
                "save_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Save the embedding every N steps (0: only at the end). Each save is a complete file, so an interrupted run keeps the last one."}),
                "file_name": ("STRING", {"default": "", "tooltip": "File name in models/embeddings (empty: the trigger word without < >). Subfolders allowed; it cannot leave the folder."}),
                "file_format": (["safetensors", "pt"], {"default": "safetensors", "tooltip": "safetensors (safe, with metadata) or AUTOMATIC1111's .pt."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of the same name. Off: an existing file stops the run before training."}),
                "preview_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Render a preview on the node every N steps with the preview prompt (0: off). Costs a sampling run (20 steps) each time."}),
                "preview_prompt": ("STRING", {"default": "a photo of {}", "tooltip": "Prompt for the live preview; {} is replaced by the trigger word."}),
                "resume_from": ([NO_RESUME] + comfy_adapter.embedding_file_names(), {"tooltip": "Continue training an existing embedding from models/embeddings (same model family); its vector count is used."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Training images (3-50 of the subject or style). Any size: they are bucketed and resized."}),
                "image_set": (TRAINING_IMAGES, {"tooltip": "Images from the Image Folder node (with captions and buckets); used instead of 'images'."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = (EMBEDDING, "CLIP", "IMAGE", "STRING")
    RETURN_NAMES = ("embedding", "clip", "loss_curve", "file_name")
    OUTPUT_TOOLTIPS = (
        "The trained embedding, for Apply Embedding.",
        "The input CLIP with the trigger word bound: prompts can use it at once.",
        "Loss per step (faint) and smoothed (bold).",
        "The file written to models/embeddings (empty when not saved).",
    )
    FUNCTION = "train"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Textual Inversion: learn a new word for a subject or style from a few images. Only the new "
        "word's vectors train; the model stays as it is. The file works as embedding:NAME anywhere."
    )

    @classmethod
    def IS_CHANGED(cls, resume_from: str = NO_RESUME, **kwargs):
        if resume_from == NO_RESUME:
            return ""
        try:
            return hashlib.sha256(comfy_adapter.embedding_file_path(resume_from).read_bytes()).hexdigest()
        except OSError:
            return float("nan")

    def train(self, model, clip, vae, resume_from: str = NO_RESUME, aspect_buckets: bool = True, images=None, image_set=None, unique_id=None, **settings):
        resume = None if resume_from == NO_RESUME else read_embedding(comfy_adapter.embedding_file_path(resume_from))
        result = train_textual_inversion(
            model, clip, vae, training_images(images, image_set),
            TextualInversionSettings(bucketing=aspect_buckets, **settings),
            resume=resume, node_id=unique_id,
        )
        bound = comfy_adapter.bind_trigger_words(clip, {result.embedding.name: result.embedding.vectors})
        curve = draw_loss_curve(result.losses.steps, result.losses.raw, result.losses.smoothed, title=f"Textual Inversion: {result.embedding.name}")
        name = result.saved_path.name if result.saved_path is not None else ""
        return (result.embedding, bound, curve, name)
