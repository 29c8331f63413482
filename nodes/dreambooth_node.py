"""The "DreamBooth Fine-tune" node."""

from __future__ import annotations

from .comfy_bridge import folders, sampling
from .comfy_bridge.diffusion_model import LORA_TARGET_CHOICES, NOISE_LEVEL_CHOICES
from .core.loss_curve import draw_loss_curve
from .graph_types import CATEGORY
from .node_inputs import IMAGES_TOOLTIP, file_hash, image_inputs, resolution_input, shared, training_images
from .scaleout import launcher
from .training.dreambooth import NO_RESUME, DreamBoothSettings

NO_RESUME_CHOICE = "(none: start fresh)"


def _resume_choices() -> list[str]:
    return (
        [NO_RESUME_CHOICE]
        + [f"loras/{n}" for n in folders.file_names("loras") if n.endswith(".safetensors")]
        + [f"checkpoints/{n}" for n in folders.file_names("checkpoints") if n.endswith(".safetensors")]
    )


class DreamBoothFinetune:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    "MODEL",
                    {
                        "tooltip": "The diffusion model to fine-tune (from Load Checkpoint). It stays as it is for the rest of the graph; the output MODEL is the tuned one."
                    },
                ),
                "clip": (
                    "CLIP",
                    {
                        "tooltip": "The text encoder(s): encodes the prompts, and is tuned too when 'train text encoder' is on (the input CLIP stays as it is)."
                    },
                ),
                "vae": (
                    "VAE",
                    {"tooltip": "Encodes the instance (and given class) images once into latents; written into a saved full checkpoint."},
                ),
                "instance_prompt": (
                    "STRING",
                    {
                        "default": "a photo of sks dog",
                        "tooltip": "The prompt for every instance image: the identifier followed by the class noun, e.g. 'a photo of sks dog'.",
                    },
                ),
                "class_prompt": (
                    "STRING",
                    {
                        "default": "a photo of dog",
                        "tooltip": "The same prompt without the identifier, e.g. 'a photo of dog'. Class images are generated from it.",
                    },
                ),
                "identifier": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "The word(s) that will name your subject. Empty: the instance prompt's words that the class prompt lacks. A rare token (see the status output) works better than a common word.",
                    },
                ),
                "mode": (
                    ["lora", "full"],
                    {
                        "default": "lora",
                        "tooltip": "lora: train small low-rank changes (a LoRA file in models/loras, little memory). full: fine-tune every UNet weight as in the paper (a checkpoint in models/checkpoints, much more memory).",
                    },
                ),
                "prior_preservation": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Also train on images the frozen model generates for the class prompt, so it keeps knowing the class (the paper's prior-preservation loss against language drift).",
                    },
                ),
                "num_class_images": (
                    "INT",
                    {
                        "default": 100,
                        "min": 1,
                        "max": 10000,
                        "tooltip": "How many class images to generate (cached under models/personalize_cache and reused by later runs with the same model and settings). The paper used ~200-1000.",
                    },
                ),
                "prior_loss_weight": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.05,
                        "tooltip": "λ: the weight of the prior-preservation loss. The paper uses 1. 0 trains as without prior preservation.",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 800,
                        "min": 1,
                        "max": 100000,
                        "tooltip": "Optimizer steps. The paper: ~1000 steps with 3-5 images; fewer for LoRA.",
                    },
                ),
                "learning_rate": (
                    "STRING",
                    {
                        "default": "auto",
                        "tooltip": "auto: 5e-6 for full (the paper's SD rate), 1e-4 for LoRA. Or a number, or a schedule '1e-4:500, 5e-5' (rate:until step).",
                    },
                ),
                "lora_rank": (
                    "INT",
                    {
                        "default": 16,
                        "min": 1,
                        "max": 1024,
                        "tooltip": "LoRA rank: capacity of the change per layer. 4-32 is usual. Ignored in full mode.",
                    },
                ),
                "lora_alpha": (
                    "FLOAT",
                    {
                        "default": 16.0,
                        "min": 0.01,
                        "max": 1024.0,
                        "step": 0.5,
                        "tooltip": "LoRA alpha: the change is scaled by alpha/rank. Set equal to the rank for scale 1. Ignored in full mode.",
                    },
                ),
                "lora_targets": (
                    list(LORA_TARGET_CHOICES),
                    {
                        "default": "attention",
                        "tooltip": "Which UNet layers get a LoRA: attention (q/k/v/out, as diffusers' DreamBooth LoRA), attention+mlp (also feed-forward and projections), all (every linear and conv layer).",
                    },
                ),
                "train_text_encoder": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Tune the text encoder too (full: all its weights; LoRA: its attention and MLP layers, in the same LoRA file). Better subject fidelity, more memory, more drift.",
                    },
                ),
                "text_encoder_learning_rate": (
                    "STRING",
                    {"default": "auto", "tooltip": "Learning rate of the text encoder (auto: the UNet's). A number or a schedule."},
                ),
                "pivotal_tuning": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Also learn a new token vector for the identifier (started from the class word), saved to models/embeddings next to the model: use it as embedding:NAME.",
                    },
                ),
                "embedding_learning_rate": (
                    "STRING",
                    {"default": "auto", "tooltip": "Learning rate of the pivotal-tuning vector (auto: 5e-4)."},
                ),
                "batch_size": shared(
                    "batch_size", tooltip="Instance images per micro-step (and as many class images with prior preservation)."
                ),
                "gradient_accumulation": shared("gradient_accumulation"),
                "seed": shared("seed"),
                "resolution": resolution_input(" Class images are generated at resolution × resolution."),
                "resize_mode": shared("resize_mode"),
                "aspect_buckets": shared("aspect_buckets"),
                "flip": shared("flip"),
                "class_sampler": (
                    sampling.sampler_names(),
                    {"default": "euler_ancestral", "tooltip": "Sampler for the class images (the paper used an ancestral sampler)."},
                ),
                "class_scheduler": (sampling.scheduler_names(), {"default": "normal", "tooltip": "Scheduler for the class images."}),
                "class_steps": ("INT", {"default": 30, "min": 1, "max": 1000, "tooltip": "Sampling steps per class image."}),
                "class_cfg": (
                    "FLOAT",
                    {
                        "default": 7.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "tooltip": "CFG scale for the class images (negative prompt empty).",
                    },
                ),
                "gradient_checkpointing": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Recompute activations in backward instead of keeping them: much less memory, about 30% slower. Only this training's copy is affected.",
                    },
                ),
                "optimizer": (
                    ["AdamW", "AdamW8bit"],
                    {
                        "default": "AdamW",
                        "tooltip": "AdamW, or AdamW8bit (optimizer state in 8 bits: less memory for full fine-tuning; needs the bitsandbytes package).",
                    },
                ),
                "full_bf16": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Full mode: keep the trained copy of the UNet and its AdamW state in bfloat16, with stochastic rounding so small updates still land (as kohya's full_bf16 / OneTrainer). Half the memory of float32; off: float32 as the paper.",
                    },
                ),
                "fused_backward": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Full mode: update each weight as soon as its gradient is ready and free that gradient (kohya's fused_backward_pass), so no whole-model gradient is held. Gradient clipping is then per weight tensor. Needs gradient accumulation 1 and the AdamW optimizer; otherwise the usual step is used.",
                    },
                ),
                "save_every": shared("save_every"),
                "preview_every": shared("preview_every"),
                "preview_prompt": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Prompt for the live preview. Empty: the instance prompt. {} is replaced by the identifier, e.g. 'a watercolor painting of {} dog'.",
                    },
                ),
                "file_name": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "File name in models/loras (LoRA) or models/checkpoints (full), and models/embeddings for pivotal tuning. Empty: dreambooth-<identifier>. It cannot leave the folder.",
                    },
                ),
                "overwrite": shared("overwrite"),
                "resume_from": (
                    _resume_choices(),
                    {
                        "tooltip": "Continue a run: a LoRA from models/loras (lora mode; its pivotal-tuning embedding of the same name too) or a checkpoint this node saved in models/checkpoints (full mode). Its step count continues."
                    },
                ),
                "precision": shared("precision"),
                "devices": shared("devices"),
                "accelerate_config": shared("accelerate_config"),
            },
            "optional": {
                **image_inputs("Instance images: photos of your subject. " + IMAGES_TOOLTIP),
                "class_images": ("IMAGE", {"tooltip": "Your own class images for prior preservation, instead of generating them."}),
                "noise_levels": (
                    list(NOISE_LEVEL_CHOICES),
                    {
                        "default": "auto",
                        "tooltip": "How training draws noise levels. auto: the family's usual (SD: uniform timesteps; Flux/Chroma: logit-normal shifted for the resolution, as kohya's flux_shift; SD3: logit-normal), or the model's own schedule when a ModelSampling node patched it. shift: uniform through the model's own (shifted) schedule. uniform / logit-normal: flow-matching models only.",
                    },
                ),
                "sigma_min": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.001,
                        "tooltip": "Flow-matching models: train only noise levels from this sigma (0 = all).",
                    },
                ),
                "sigma_max": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.001,
                        "tooltip": "Flow-matching models: train only noise levels up to this sigma (1 = all); e.g. one expert of a two-expert model.",
                    },
                ),
                "guidance": (
                    "FLOAT",
                    {
                        "default": -1.0,
                        "min": -1.0,
                        "max": 100.0,
                        "step": 0.1,
                        "tooltip": "Guidance-distilled models (Flux.1-dev): the guidance embedded while training. -1: the family's (1.0 for Flux.1-dev, as kohya, ai-toolkit and SimpleTuner train; 0 for Chroma).",
                    },
                ),
                "loss_target": (
                    ["model", "x0"],
                    {
                        "default": "model",
                        "tooltip": "model: the loss on what the model predicts (noise, v, or the flow velocity), as the papers train. x0: on the denoised latent, as ComfyUI's own Train LoRA (weighs noisy steps less).",
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("model", "clip", "file_names", "loss_curve", "status")
    OUTPUT_TOOLTIPS = (
        "The fine-tuned model (the input MODEL with the tuned weights as patches).",
        "The CLIP to prompt it with: tuned when the text encoder trained, with the identifier bound to the learned vector after pivotal tuning.",
        "The files written, one per line, as folder/name (empty when nothing was saved).",
        "Instance loss and prior loss per step (faint) and smoothed (bold).",
        "Notes: the identifier, warnings about it, rare-token suggestions, class images, files.",
    )
    FUNCTION = "train"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True  # it writes files: a graph with nothing after it still runs
    DESCRIPTION = (
        "DreamBooth: fine-tune the model on 3-5 images of a subject named by a rare identifier, with the "
        "class-specific prior-preservation loss. Saves a LoRA or a full checkpoint; the input model is unchanged."
    )

    @classmethod
    def IS_CHANGED(cls, resume_from: str = NO_RESUME_CHOICE, **kwargs):
        if resume_from == NO_RESUME_CHOICE:
            return ""
        kind, _, name = resume_from.partition("/")
        return file_hash(kind, name)

    def train(
        self,
        model,
        clip,
        vae,
        aspect_buckets: bool = True,
        resume_from: str = NO_RESUME_CHOICE,
        devices: str = "",
        accelerate_config: str = "",
        images=None,
        image_set=None,
        class_images=None,
        unique_id=None,
        **settings,
    ):
        resume = NO_RESUME if resume_from == NO_RESUME_CHOICE else resume_from
        listed = launcher.check_devices(devices, accelerate_config)
        images_given = training_images(images, image_set)
        training_settings = DreamBoothSettings(bucketing=aspect_buckets, resume_from=resume, **settings)
        result = launcher.train_dreambooth(
            model, clip, vae, images_given, training_settings, listed, accelerate_config, class_images, unique_id
        )
        raw = {k: v for k, v in result.losses.raw.items() if k != "loss"}
        smoothed = {k: v for k, v in result.losses.smoothed.items() if k != "loss"}
        curve = draw_loss_curve(
            result.losses.steps, raw, smoothed, title=f"DreamBooth ({settings.get('mode', 'lora')}): {result.identifier}"
        )
        files = "\n".join(
            f"{folders.FOLDER_OF[kind]}/{folders.name_in_folder(folders.FOLDER_OF[kind], path)}" for kind, path in result.saved.items()
        )
        return (result.model, result.clip, files, curve, "\n".join(result.notes))
