"""Generate example_workflows/*.json by building each graph in the real ComfyUI front end.

Run from the pack's root with the Python environment that runs ComfyUI (torch, etc.), after
`cd tests && npm ci` (playwright-core) and with Chromium installed:

    python tests/browser/make_example_workflows.py            # (re)write example_workflows/*.json
    python tests/browser/make_example_workflows.py --check    # exit 1 if a file is out of date
    python tests/browser/make_example_workflows.py --only textual_inversion

It starts ComfyUI (main.py, CPU, in a throw-away base directory with this pack linked into
custom_nodes; the checkout is found as the tests find it: COMFYUI_PATH, an enclosing ComfyUI,
or ~/.cache/comfyui/ComfyUI), opens the app in Chromium, and for each workflow below creates
the nodes with LiteGraph.createNode(type), sets widgets BY NAME, connects slots BY NAME, lays
the nodes out in columns (left to right, none overlapping), and saves app.graph.serialize().
So widget order, hidden widgets (control_after_generate after a seed), defaults and the
workflow format are exactly what the installed front end writes, and a renamed or removed
input makes this script fail instead of silently shifting widgets_values. Re-run it whenever
a node's inputs change (test_example_workflows.py fails while a file is out of date). Besides
serialize(), only the workflow's "id" (a fixed UUID per file, so regenerating gives the same
file) and extra.ds (the view it opens with: all of it, at a zoom where text is drawn) are set.

Every workflow carries a MarkdownNote saying what to set and what it produces. Model and
file names are placeholders users replace (v1-5-pruned-emaonly.safetensors; for Flux.1-dev
flux1-dev.safetensors, clip_l.safetensors, t5xxl_fp16.safetensors and ae.safetensors; for
SD3.5 sd3.5_medium.safetensors with clip_g.safetensors; input/my-subject), named as the
models' own downloads and ComfyUI's examples name them.
tests/browser/test_example_workflows.py loads each file as drag-and-drop does and runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

BROWSER_DIR = Path(__file__).resolve().parent
PACK_DIR = BROWSER_DIR.parents[1]
OUT_DIR = PACK_DIR / "example_workflows"
sys.path.insert(0, str(BROWSER_DIR))
sys.path.insert(0, str(BROWSER_DIR.parent))

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
# Flux.1-dev and SD3.5 as their users load them (ComfyUI's own examples): Flux's diffusion model,
# its two text encoders and its autoencoder are separate files; SD3.5's checkpoint holds the
# MMDiT and the VAE, its three text encoders come from TripleCLIPLoader.
FLUX_MODEL = "flux1-dev.safetensors"
FLUX_VAE = "ae.safetensors"
SD35_CHECKPOINT = "sd3.5_medium.safetensors"
CLIP_L = "clip_l.safetensors"
CLIP_G = "clip_g.safetensors"
T5XXL = "t5xxl_fp16.safetensors"
IMAGES_FOLDER = "my-subject"
ID_NAMESPACE = uuid.UUID("5b0c3a8e-5f1e-4f57-9b8a-1c2d3e4f5a6b")

# Colours of ComfyUI's own default workflow: green positive, red negative prompt.
GREEN = {"color": "#232", "bgcolor": "#353"}
RED = {"color": "#322", "bgcolor": "#533"}
NOTE_COLOR = {"color": "#432", "bgcolor": "#653"}

NEGATIVE = "blurry, low quality, jpeg artifacts, watermark, text, deformed"


def _note(text: str, height: int = 640) -> dict:
    return {"type": "MarkdownNote", "title": "Read me", "widgets": {"text": text.strip() + "\n"}, "size": [440, height], **NOTE_COLOR}


def _render(
    prefix: str,
    positive: str,
    negative: str = NEGATIVE,
    sampling: dict | None = None,
    latent: str = "EmptyLatentImage",
    size: int = 512,
    negative_title: str = "Negative prompt",
) -> dict:
    """The nodes of a plain text-to-image render (keys pos, neg, latent, sampler, decode, save)."""
    return {
        "pos": {"type": "CLIPTextEncode", "title": "Positive prompt", "widgets": {"text": positive}, "size": [400, 150], **GREEN},
        "neg": {"type": "CLIPTextEncode", "title": negative_title, "widgets": {"text": negative}, "size": [400, 150], **RED},
        "latent": {"type": latent, "widgets": {"width": size, "height": size, "batch_size": 1}},
        "sampler": {
            "type": "KSampler",
            "widgets": {
                "seed": 42,
                "control_after_generate": "randomize",
                "steps": 25,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                **(sampling or {}),
            },
        },
        "decode": {"type": "VAEDecode"},
        "save": {"type": "SaveImage", "widgets": {"filename_prefix": prefix}, "size": [420, 460]},
    }


TEXTUAL_INVERSION_NOTE = f"""
## Textual Inversion: a new word for your subject

Teaches the model a new word, **`<my-subject>`**, from a few photos. Only the word's vectors are
trained: the checkpoint itself is not changed, and the result is a small embedding file.

**Set**
1. **Load Checkpoint**: your SD 1.5 checkpoint (`{CHECKPOINT}` here). SD 2.x and SDXL work too
   (use resolution 768 / 1024).
2. **Image Folder**: put 5-20 photos of the subject in `ComfyUI/input/{IMAGES_FOLDER}/`, with
   optional same-name `.txt` captions. `path` is `{IMAGES_FOLDER}`; or pick the folder in `folder`
   (press R to refresh the list) and clear `path`.
3. **Train Textual Inversion**:
   - `trigger_word`: the word your prompts will use (`<my-subject>`).
   - `init_text`: a word close to the subject (`cat`, `person`, `toy`, `watercolor`).
   - `steps`: 1500 (1000-3000 at batch 1 is typical); `resolution` 512 for SD 1.5.
   - `templates`: `object` for a subject, `style` for a style, `captions` to use your captions.
4. Change the prompts of the render to use the word, then **Queue**.

While it trains the node shows step, loss, ETA and a loss chart, and a preview every 250 steps.
Cancel keeps the last periodic save (`save_every`).

**You get**
- `ComfyUI/models/embeddings/my-subject.safetensors`: use it in any workflow with
  **Apply Embedding**, or as `embedding:my-subject` in a prompt.
- An image of `<my-subject>` on a beach, rendered with the trained CLIP, and the loss curve.

The training seed is *fixed*: queueing again re-renders without retraining. To train again under
the same name, turn on `overwrite` or change `file_name`.
"""

APPLY_EMBEDDING_NOTE = f"""
## Apply Embedding: a trained word in any workflow

**Apply Embedding** binds a Textual Inversion embedding to the CLIP under a trigger word:
`my-subject.safetensors`, the file the *textual_inversion* example writes, as `<my-subject>`.
Every prompt encoded with the CLIP that comes out of it may use the word, anywhere a word can
stand (also inside `(word:1.2)` weights).

**Set**
1. **Load Checkpoint**: the checkpoint family the embedding was trained on (`{CHECKPOINT}`).
2. **Apply Embedding**: `embedding_file` from `ComfyUI/models/embeddings/` (press R after adding
   files), and `trigger_word`, the word the prompts use (empty: the name stored in the file).
   `strength` scales the vectors (1 = as trained; 0.5-0.8 for a weaker effect). Instead of a
   file, connect a training node's `embedding` output.
3. Write the prompt with the trigger word, then **Queue**.

**More words**: chain more Apply Embedding nodes (each adds its word). A *negative* embedding
(one trained on, or downloaded for, what you do *not* want) goes in the same chain, and its word
in the negative prompt: both prompts are encoded with the CLIP at the end of the chain.

**You get** an image of your subject in a new scene, in `ComfyUI/output/apply_embedding/`.
"""

DREAMBOOTH_PRIOR_NOTE = f"""
## DreamBooth: full fine-tune with prior preservation

Fine-tunes the whole UNet on 3-5 photos of one subject, named by a rare identifier: **`sks`**
in *"a photo of sks dog"*. Prior preservation also trains on images the original model makes for
*"a photo of dog"*, so the model keeps knowing what dogs in general look like.

**Set**
1. **Load Checkpoint**: your SD 1.5 checkpoint (`{CHECKPOINT}` here).
2. **Image Folder**: 3-5 photos of the subject in `ComfyUI/input/{IMAGES_FOLDER}/`
   (`path` = `{IMAGES_FOLDER}`, or pick it in `folder` and clear `path`).
3. **DreamBooth Fine-tune** (`mode` = `full`):
   - `instance_prompt`: identifier + class noun (`a photo of sks dog`); `class_prompt`: the same
     without the identifier (`a photo of dog`). Use your subject's class (`man`, `cat`, `backpack`).
   - `num_class_images`: 100 (the paper: 200-1000); they are generated once, with `class_steps`,
     and cached in `models/personalize_cache` for later runs.
   - `steps` 800, `learning_rate` auto (5e-6), `resolution` 512.
   - Full fine-tuning needs a lot of memory: turn on `gradient_checkpointing`, or use `AdamW8bit`.
   - `preview_every` 100: the node shows what the model draws for `preview_prompt` (empty: the
     instance prompt) as it trains; 0 turns the previews off (each is a 20-step render).
4. **Queue**.

**You get**
- `ComfyUI/models/checkpoints/dreambooth-sks.safetensors` (`file_name` to change it), loadable
  with Load Checkpoint in any workflow;
- a render of *"a photo of sks dog in a bucket"* with the tuned MODEL and CLIP, straight away;
- the loss curve (instance and prior loss) and notes on the identifier and class images.

The training seed is *fixed*: queueing again re-renders without retraining.
"""

DREAMBOOTH_LORA_NOTE = f"""
## DreamBooth LoRA with pivotal tuning

Trains a small LoRA on 3-5 photos of one subject, and with **pivotal tuning** also learns a new
vector for the identifier **`sks`** (started from the class word), as in Textual Inversion.
Much less memory and disk than a full fine-tune.

**Set**
1. **Load Checkpoint**: your SD 1.5 checkpoint (`{CHECKPOINT}` here).
2. **Image Folder**: 3-5 photos of the subject in `ComfyUI/input/{IMAGES_FOLDER}/`
   (`path` = `{IMAGES_FOLDER}`, or pick it in `folder` and clear `path`).
3. **DreamBooth Fine-tune** (`mode` = `lora`, `pivotal_tuning` on):
   - `instance_prompt` `a photo of sks dog`, `class_prompt` `a photo of dog`: use your subject's
     class noun. Prior preservation generates `num_class_images` class images once (cached).
   - `lora_rank` / `lora_alpha` 16 (4-32 is usual), `steps` 800, `learning_rate` auto (1e-4).
   - `train_text_encoder` adds the text encoder's layers to the LoRA (more fidelity, more drift).
   - `preview_every` 100: a preview of the LoRA and vector in training, with `preview_prompt`
     (empty: the instance prompt; `{{}}` stands for the identifier, e.g. `a watercolor painting of {{}} dog`).
4. **Queue**.

**You get**
- `ComfyUI/models/loras/dreambooth-sks.safetensors`: load it with **Load LoRA** on the same
  checkpoint;
- `ComfyUI/models/embeddings/dreambooth-sks.safetensors`: the identifier's learned vector. With
  the LoRA in other workflows, bind it with **Apply Embedding** (trigger word `sks`) or write
  `embedding:dreambooth-sks` where the prompt says `sks`;
- a render of *"a watercolor painting of sks dog"* with the tuned MODEL and CLIP (LoRA and vector
  applied), and the loss curve.
"""

DREAMBOOTH_FLUX_NOTE = f"""
## DreamBooth LoRA for Flux.1-dev, with prior preservation

Trains a LoRA on Flux.1-dev from 3-5 photos of one subject, named by a rare identifier:
**`sks`** in *"a photo of sks dog"*. Prior preservation also trains on images Flux itself makes
for *"a photo of dog"*, so the LoRA keeps the rest of the class as it was.

**Set**
1. **Load Diffusion Model**: `{FLUX_MODEL}` (in `ComfyUI/models/diffusion_models/`), `weight_dtype`
   default. With 24 GB or less, pick `fp8_e4m3fn`: the LoRA trains over the fp8 weights.
2. **DualCLIPLoader** (*Load CLIP (Dual)*): `{CLIP_L}` and `{T5XXL}` (or the fp8 T5) from
   `models/text_encoders/`, `type` flux. **Load VAE**: `{FLUX_VAE}` from `models/vae/`.
3. **Image Folder**: 3-5 photos of the subject in `ComfyUI/input/{IMAGES_FOLDER}/`
   (`path` = `{IMAGES_FOLDER}`, or pick it in `folder` and clear `path`).
4. **DreamBooth Fine-tune** (`mode` = `lora`, `prior_preservation` on):
   - `instance_prompt` `a photo of sks dog`, `class_prompt` `a photo of dog`: use your
     subject's class noun (`man`, `cat`, `backpack`).
   - `num_class_images` 100, generated once (cached in `models/personalize_cache`) the way Flux
     samples: euler/simple, 20 steps, cfg 1, guidance 3.5. That is what `class_sampler`,
     `class_scheduler`, `class_steps` and `class_cfg` mean *left at their values*; change one
     and yours are used.
   - `resolution` 512, as many Flux LoRAs are trained: 1024 (Flux's own) gives more detail
     for much more memory and time.
   - `lora_rank` / `lora_alpha` 16, `lora_targets` attention, `steps` 1000, `learning_rate`
     auto (1e-4). Guidance 1.0 is embedded while training, as kohya and ai-toolkit do.
   - `train_text_encoder` adds CLIP-L to the LoRA (T5 is not trained); pivotal tuning is
     not available for Flux.
5. **Queue**.

**You get**
- `ComfyUI/models/loras/dreambooth-sks-flux.safetensors` (kohya's names): load it with
  **LoraLoaderModelOnly** (or **Load LoRA**, with CLIP-L trained) on `{FLUX_MODEL}`;
- a render of *"a photo of sks dog ..."* with the tuned model, sampled as Flux.1-dev is:
  FluxGuidance 3.5, cfg 1, euler/simple (at cfg 1 the negative prompt is not used);
- the loss curve (instance and prior loss) and training notes.

The training seed is *fixed*: queueing again re-renders without retraining.
"""

DREAMBOOTH_SD35_NOTE = f"""
## DreamBooth LoRA for Stable Diffusion 3.5

Trains a LoRA on SD3.5 (medium or large) from 3-5 photos of one subject, named by a rare
identifier: **`sks`** in *"a photo of sks dog"*, with prior preservation on *"a photo of dog"*.

**Set**
1. **Load Checkpoint**: `{SD35_CHECKPOINT}` (or `sd3.5_large.safetensors`) in
   `ComfyUI/models/checkpoints/`: its MODEL and VAE are used.
2. **TripleCLIPLoader** (*Load CLIP (Triple)*): `{CLIP_L}`, `{CLIP_G}` and `{T5XXL}` (or the fp8
   T5) from `models/text_encoders/`. A checkpoint that includes its text encoders
   (`..._incl_clips_...`) can give its own CLIP instead: connect Load Checkpoint's CLIP.
3. **Image Folder**: 3-5 photos of the subject in `ComfyUI/input/{IMAGES_FOLDER}/`
   (`path` = `{IMAGES_FOLDER}`, or pick it in `folder` and clear `path`).
4. **DreamBooth Fine-tune** (`mode` = `lora`):
   - `instance_prompt` `a photo of sks dog`, `class_prompt` `a photo of dog`: use your
     subject's class noun. `prior_preservation` generates `num_class_images` class images once
     (cached) the way SD3.5 samples (euler/sgm_uniform, 28 steps, cfg 4.5): the class sampling
     widgets left at their values mean that. Off, it trains on your photos only (faster).
   - `resolution` 1024, `lora_rank` / `lora_alpha` 16, `lora_targets` attention, `steps` 800,
     `learning_rate` auto (1e-4).
   - `train_text_encoder` adds CLIP-L and CLIP-G to the LoRA (T5 is not trained).
5. **Queue**.

**You get**
- `ComfyUI/models/loras/dreambooth-sks-sd35.safetensors` (diffusers' names, which Load LoRA and
  diffusers both read): load it with **Load LoRA** on the same checkpoint;
- a render of *"a photo of sks dog ..."* with the tuned MODEL and CLIP, sampled as SD3.5 is:
  cfg 4.5, euler/sgm_uniform, 28 steps;
- the loss curve and training notes.

The training seed is *fixed*: queueing again re-renders without retraining.
"""


def textual_inversion() -> dict:
    return {
        "columns": [["note", "ckpt", "images"], ["train"], ["pos", "neg", "latent"], ["sampler", "loss"], ["decode", "save"]],
        "nodes": {
            "note": _note(TEXTUAL_INVERSION_NOTE, 500),
            "ckpt": {"type": "CheckpointLoaderSimple", "widgets": {"ckpt_name": CHECKPOINT}, "size": [440, 100]},
            "images": {"type": "PersonalizeImageFolder", "widgets": {"path": IMAGES_FOLDER}, "size": [440, 200]},
            "train": {
                "type": "PersonalizeTrainTextualInversion",
                "widgets": {
                    "trigger_word": "<my-subject>",
                    "init_text": "*",
                    "vectors_per_token": 1,
                    "steps": 1500,
                    "learning_rate": "0.005",
                    "batch_size": 1,
                    "seed": 0,
                    "control_after_generate": "fixed",
                    "templates": "object",
                    "resolution": 512,
                    "save_every": 500,
                    "file_name": "",
                    "preview_every": 250,
                    "preview_prompt": "a photo of {}",
                },
            },
            **_render("textual_inversion/my-subject", "a photo of <my-subject> on a beach, golden hour, detailed"),
            "loss": {"type": "PreviewImage", "title": "Loss curve", "size": [400, 330]},
        },
        "links": [
            ("ckpt", "MODEL", "train", "model"),
            ("ckpt", "CLIP", "train", "clip"),
            ("ckpt", "VAE", "train", "vae"),
            ("images", "image_set", "train", "image_set"),
            ("train", "clip", "pos", "clip"),
            ("train", "clip", "neg", "clip"),
            ("train", "loss_curve", "loss", "images"),
            ("ckpt", "MODEL", "sampler", "model"),
            ("pos", "CONDITIONING", "sampler", "positive"),
            ("neg", "CONDITIONING", "sampler", "negative"),
            ("latent", "LATENT", "sampler", "latent_image"),
            ("sampler", "LATENT", "decode", "samples"),
            ("ckpt", "VAE", "decode", "vae"),
            ("decode", "IMAGE", "save", "images"),
        ],
    }


def apply_embedding() -> dict:
    return {
        "columns": [["note", "ckpt"], ["subject"], ["pos", "neg", "latent"], ["sampler"], ["decode", "save"]],
        "nodes": {
            "note": _note(APPLY_EMBEDDING_NOTE, 480),
            "ckpt": {"type": "CheckpointLoaderSimple", "widgets": {"ckpt_name": CHECKPOINT}, "size": [440, 100]},
            "subject": {
                "type": "PersonalizeApplyEmbedding",
                "widgets": {"embedding_file": "my-subject.safetensors", "trigger_word": "<my-subject>", "strength": 1.0},
                "size": [360, 130],
            },
            **_render("apply_embedding/my-subject", "a photo of <my-subject> in a snowy forest, detailed, sharp focus"),
        },
        "links": [
            ("ckpt", "CLIP", "subject", "clip"),
            ("subject", "clip", "pos", "clip"),
            ("subject", "clip", "neg", "clip"),
            ("ckpt", "MODEL", "sampler", "model"),
            ("pos", "CONDITIONING", "sampler", "positive"),
            ("neg", "CONDITIONING", "sampler", "negative"),
            ("latent", "LATENT", "sampler", "latent_image"),
            ("sampler", "LATENT", "decode", "samples"),
            ("ckpt", "VAE", "decode", "vae"),
            ("decode", "IMAGE", "save", "images"),
        ],
    }


def _dreambooth(note: str, note_height: int, settings: dict, prompt: str, prefix: str) -> dict:
    return {
        "columns": [["note", "ckpt", "images"], ["train"], ["pos", "neg", "latent"], ["sampler", "loss"], ["decode", "save", "status"]],
        "nodes": {
            "note": _note(note, note_height),
            "ckpt": {"type": "CheckpointLoaderSimple", "widgets": {"ckpt_name": CHECKPOINT}, "size": [440, 100]},
            "images": {"type": "PersonalizeImageFolder", "widgets": {"path": IMAGES_FOLDER}, "size": [440, 200]},
            "train": {
                "type": "PersonalizeDreamBoothFinetune",
                "size": [400, 0],
                "widgets": {
                    "instance_prompt": "a photo of sks dog",
                    "class_prompt": "a photo of dog",
                    "identifier": "",
                    "seed": 0,
                    "control_after_generate": "fixed",
                    **settings,
                },
            },
            **_render(prefix, prompt),
            "loss": {"type": "PreviewImage", "title": "Loss curve", "size": [400, 330]},
            "status": {"type": "PreviewAny", "title": "Training notes", "size": [420, 200]},
        },
        "links": [
            ("ckpt", "MODEL", "train", "model"),
            ("ckpt", "CLIP", "train", "clip"),
            ("ckpt", "VAE", "train", "vae"),
            ("images", "image_set", "train", "image_set"),
            ("train", "clip", "pos", "clip"),
            ("train", "clip", "neg", "clip"),
            ("train", "model", "sampler", "model"),
            ("train", "loss_curve", "loss", "images"),
            ("train", "status", "status", "source"),
            ("pos", "CONDITIONING", "sampler", "positive"),
            ("neg", "CONDITIONING", "sampler", "negative"),
            ("latent", "LATENT", "sampler", "latent_image"),
            ("sampler", "LATENT", "decode", "samples"),
            ("ckpt", "VAE", "decode", "vae"),
            ("decode", "IMAGE", "save", "images"),
        ],
    }


def dreambooth_prior_preservation() -> dict:
    return _dreambooth(
        DREAMBOOTH_PRIOR_NOTE,
        600,
        {
            "mode": "full",
            "prior_preservation": True,
            "num_class_images": 100,
            "prior_loss_weight": 1.0,
            "steps": 800,
            "learning_rate": "auto",
            "train_text_encoder": False,
            "pivotal_tuning": False,
            "resolution": 512,
            "class_steps": 30,
            "preview_every": 100,
            "preview_prompt": "",
        },
        "a photo of sks dog in a bucket",
        "dreambooth/sks-dog",
    )


def dreambooth_lora_pivotal() -> dict:
    return _dreambooth(
        DREAMBOOTH_LORA_NOTE,
        600,
        {
            "mode": "lora",
            "prior_preservation": True,
            "num_class_images": 100,
            "steps": 800,
            "learning_rate": "auto",
            "lora_rank": 16,
            "lora_alpha": 16.0,
            "lora_targets": "attention",
            "train_text_encoder": False,
            "pivotal_tuning": True,
            "embedding_learning_rate": "auto",
            "resolution": 512,
            "preview_every": 100,
            "preview_prompt": "",
        },
        "a watercolor painting of sks dog",
        "dreambooth/sks-dog-lora",
    )


def _trainer_outputs() -> dict:
    """The training node's loss curve and notes (keys loss, status)."""
    return {
        "loss": {"type": "PreviewImage", "title": "Loss curve", "size": [400, 330]},
        "status": {"type": "PreviewAny", "title": "Training notes", "size": [420, 200]},
    }


def _dreambooth_node(settings: dict) -> dict:
    return {
        "type": "PersonalizeDreamBoothFinetune",
        "size": [400, 0],
        "widgets": {
            "instance_prompt": "a photo of sks dog",
            "class_prompt": "a photo of dog",
            "identifier": "",
            "seed": 0,
            "control_after_generate": "fixed",
            **settings,
        },
    }


def dreambooth_flux_lora() -> dict:
    """Flux.1-dev from its three files, a LoRA with prior preservation, a render as Flux samples."""
    render = _render(
        "dreambooth/sks-dog-flux",
        "a photo of sks dog sitting in a bucket in a sunny garden, detailed fur, soft light",
        negative="",
        sampling={"steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
        latent="EmptySD3LatentImage",
        size=1024,
        negative_title="Negative prompt (unused at cfg 1)",
    )
    return {
        "columns": [
            ["note", "unet", "clip", "vae", "images"],
            ["train"],
            ["pos", "neg", "latent"],
            ["guidance", "sampler", "loss"],
            ["decode", "save", "status"],
        ],
        "nodes": {
            "note": _note(DREAMBOOTH_FLUX_NOTE, 700),
            "unet": {"type": "UNETLoader", "widgets": {"unet_name": FLUX_MODEL, "weight_dtype": "default"}, "size": [440, 110]},
            "clip": {
                "type": "DualCLIPLoader",
                "widgets": {"clip_name1": CLIP_L, "clip_name2": T5XXL, "type": "flux"},
                "size": [440, 160],
            },
            "vae": {"type": "VAELoader", "widgets": {"vae_name": FLUX_VAE}, "size": [440, 80]},
            "images": {"type": "PersonalizeImageFolder", "widgets": {"path": IMAGES_FOLDER}, "size": [440, 200]},
            "train": _dreambooth_node(
                {
                    "mode": "lora",
                    "prior_preservation": True,
                    "num_class_images": 100,
                    "prior_loss_weight": 1.0,
                    "steps": 1000,
                    "learning_rate": "auto",
                    "lora_rank": 16,
                    "lora_alpha": 16.0,
                    "lora_targets": "attention",
                    "train_text_encoder": False,
                    "pivotal_tuning": False,
                    "resolution": 512,
                    "save_every": 250,
                    "preview_every": 250,
                    "preview_prompt": "",
                    "file_name": "dreambooth-sks-flux",
                }
            ),
            **render,
            "guidance": {"type": "FluxGuidance", "widgets": {"guidance": 3.5}, "size": [320, 80], **GREEN},
            **_trainer_outputs(),
        },
        "links": [
            ("unet", "MODEL", "train", "model"),
            ("clip", "CLIP", "train", "clip"),
            ("vae", "VAE", "train", "vae"),
            ("images", "image_set", "train", "image_set"),
            ("train", "clip", "pos", "clip"),
            ("train", "clip", "neg", "clip"),
            ("pos", "CONDITIONING", "guidance", "conditioning"),
            ("guidance", "CONDITIONING", "sampler", "positive"),
            ("neg", "CONDITIONING", "sampler", "negative"),
            ("train", "model", "sampler", "model"),
            ("latent", "LATENT", "sampler", "latent_image"),
            ("train", "loss_curve", "loss", "images"),
            ("train", "status", "status", "source"),
            ("sampler", "LATENT", "decode", "samples"),
            ("vae", "VAE", "decode", "vae"),
            ("decode", "IMAGE", "save", "images"),
        ],
    }


def dreambooth_sd35_lora() -> dict:
    """SD3.5 from its checkpoint (MODEL, VAE) and TripleCLIPLoader, a LoRA, a render as SD3.5 samples."""
    render = _render(
        "dreambooth/sks-dog-sd35",
        "a photo of sks dog wearing a red scarf in the snow, detailed, sharp focus",
        sampling={"steps": 28, "cfg": 4.5, "sampler_name": "euler", "scheduler": "sgm_uniform"},
        latent="EmptySD3LatentImage",
        size=1024,
    )
    return {
        "columns": [
            ["note", "ckpt", "clip", "images"],
            ["train"],
            ["pos", "neg", "latent"],
            ["sampler", "loss"],
            ["decode", "save", "status"],
        ],
        "nodes": {
            "note": _note(DREAMBOOTH_SD35_NOTE, 640),
            "ckpt": {"type": "CheckpointLoaderSimple", "widgets": {"ckpt_name": SD35_CHECKPOINT}, "size": [440, 100]},
            "clip": {
                "type": "TripleCLIPLoader",
                "widgets": {"clip_name1": CLIP_L, "clip_name2": CLIP_G, "clip_name3": T5XXL},
                "size": [440, 130],
            },
            "images": {"type": "PersonalizeImageFolder", "widgets": {"path": IMAGES_FOLDER}, "size": [440, 200]},
            "train": _dreambooth_node(
                {
                    "mode": "lora",
                    "prior_preservation": True,
                    "num_class_images": 100,
                    "prior_loss_weight": 1.0,
                    "steps": 800,
                    "learning_rate": "auto",
                    "lora_rank": 16,
                    "lora_alpha": 16.0,
                    "lora_targets": "attention",
                    "train_text_encoder": False,
                    "pivotal_tuning": False,
                    "resolution": 1024,
                    "preview_every": 200,
                    "preview_prompt": "",
                    "file_name": "dreambooth-sks-sd35",
                }
            ),
            **render,
            **_trainer_outputs(),
        },
        "links": [
            ("ckpt", "MODEL", "train", "model"),
            ("clip", "CLIP", "train", "clip"),
            ("ckpt", "VAE", "train", "vae"),
            ("images", "image_set", "train", "image_set"),
            ("train", "clip", "pos", "clip"),
            ("train", "clip", "neg", "clip"),
            ("train", "model", "sampler", "model"),
            ("train", "loss_curve", "loss", "images"),
            ("train", "status", "status", "source"),
            ("pos", "CONDITIONING", "sampler", "positive"),
            ("neg", "CONDITIONING", "sampler", "negative"),
            ("latent", "LATENT", "sampler", "latent_image"),
            ("sampler", "LATENT", "decode", "samples"),
            ("ckpt", "VAE", "decode", "vae"),
            ("decode", "IMAGE", "save", "images"),
        ],
    }


WORKFLOWS = {
    "textual_inversion": textual_inversion,
    "apply_embedding": apply_embedding,
    "dreambooth_prior_preservation": dreambooth_prior_preservation,
    "dreambooth_lora_pivotal": dreambooth_lora_pivotal,
    "dreambooth_flux_lora": dreambooth_flux_lora,
    "dreambooth_sd35_lora": dreambooth_sd35_lora,
}

# Runs in the page: build one workflow, return app.graph.serialize() and the problems found.
BUILD_JS = r"""
const GAP_X = 60, GAP_Y = 40, LEFT = 0, TOP = 0;
const TITLE = LiteGraph.NODE_TITLE_HEIGHT ?? 30;
app.graph.clear();
const byKey = {}, problems = [], unlisted = [];
for (const spec of arg.nodes) {
  const node = LiteGraph.createNode(spec.type);
  if (!node) { problems.push(`unknown node type ${spec.type}`); continue; }
  if (spec.title) node.title = spec.title;
  if (spec.color) node.color = spec.color;
  if (spec.bgcolor) node.bgcolor = spec.bgcolor;
  app.graph.add(node);
  byKey[spec.key] = node;
  for (const [name, value] of Object.entries(spec.widgets ?? {})) {
    const w = node.widgets?.find((w) => w.name === name);
    if (!w) {
      const names = (node.widgets ?? []).map((w) => w.name).join(", ");
      problems.push(`${spec.key} (${spec.type}) has no widget '${name}'; it has ${names}`);
      continue;
    }
    const values = w.options?.values;
    if (Array.isArray(values) && !values.includes(value)) {
      // A file the user supplies (checkpoint, embedding): not on this server, fine in the file.
      unlisted.push({ node: spec.key, widget: name, value, values: values.slice(0, 20) });
    }
    w.value = value;
    if (w.value !== value) {
      problems.push(`${spec.key}.${name}: set ${JSON.stringify(value)}, got ${JSON.stringify(w.value)}`);
    }
  }
}
for (const [from, output, to, input] of arg.links) {
  const a = byKey[from], b = byKey[to];
  if (!a || !b) { problems.push(`link ${from}.${output} -> ${to}.${input}: no such node`); continue; }
  const o = a.findOutputSlot(output), i = b.findInputSlot(input);
  if (o < 0 || i < 0) {
    problems.push(`link ${from}.${output} (${o}) -> ${to}.${input} (${i}): no such slot; outputs ` +
      `${a.outputs.map((s) => s.name)}, inputs ${b.inputs.map((s) => s.name)}`);
    continue;
  }
  if (!a.connect(o, b, i)) problems.push(`link ${from}.${output} -> ${to}.${input} refused`);
}
// Sizes: at least what the node needs, at least what the spec asks.
for (const spec of arg.nodes) {
  const node = byKey[spec.key];
  if (!node) continue;
  const need = node.computeSize();
  const width = Math.max(need[0], node.size[0], spec.size?.[0] ?? 0), height = Math.max(need[1], spec.size?.[1] ?? 0);
  node.setSize([Math.ceil(width), Math.ceil(height)]);
}
// Columns left to right; nodes stacked top to bottom; the title bar sits above node.pos.
let x = LEFT;
for (const column of arg.columns) {
  let y = TOP + TITLE, width = 0;
  for (const key of column) {
    const node = byKey[key];
    if (!node) continue;
    node.pos = [x, y];
    y += node.size[1] + TITLE + GAP_Y;
    width = Math.max(width, node.size[0]);
  }
  x += width + GAP_X;
}
// No two nodes may overlap (the box of a node includes its title bar).
const nodes = app.graph.nodes;
const box = (n) => [n.pos[0], n.pos[1] - TITLE, n.size[0], n.size[1] + TITLE];
for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
  const [ax, ay, aw, ah] = box(nodes[i]), [bx, by, bw, bh] = box(nodes[j]);
  if (ax < bx + bw && bx < ax + aw && ay < by + bh && by < ay + ah) {
    problems.push(`nodes ${nodes[i].title} and ${nodes[j].title} overlap`);
  }
}
// Open the workflow showing all of it in a 1600x900 window (below the menu and tab bars).
const boxes = nodes.map(box);
const minX = Math.min(...boxes.map((r) => r[0])), minY = Math.min(...boxes.map((r) => r[1]));
const maxX = Math.max(...boxes.map((r) => r[0] + r[2])), maxY = Math.max(...boxes.map((r) => r[1] + r[3]));
// At least 0.65: below about 0.6 the front end draws nodes without their text.
const fit = Math.floor(Math.min(1500 / (maxX - minX), 760 / (maxY - minY)) * 100) / 100;
const scale = Math.max(0.65, Math.min(1, fit));
const workflow = app.graph.serialize();
const offset = [Math.round(70 / scale - minX), Math.round(90 / scale - minY)];
workflow.extra = { ...workflow.extra, ds: { scale, offset } };
return { workflow: JSON.parse(JSON.stringify(workflow)), problems, unlisted,
         keys: Object.fromEntries(Object.entries(byKey).map(([k, n]) => [k, n.id])) };
"""


def build(browser, name: str) -> tuple[dict, list[dict]]:
    spec = WORKFLOWS[name]()
    arg = {
        "nodes": [{"key": key, **node} for key, node in spec["nodes"].items()],
        "columns": spec["columns"],
        "links": [list(link) for link in spec["links"]],
    }
    placed = {key for column in spec["columns"] for key in column}
    missing = set(spec["nodes"]) - placed
    if missing:
        raise SystemExit(f"{name}: nodes in no column: {sorted(missing)}")
    result = browser.exec(BUILD_JS, arg=arg)
    if result["problems"]:
        raise SystemExit(f"{name}: " + "\n  ".join(result["problems"]))
    workflow = result["workflow"]
    workflow["id"] = str(uuid.uuid5(ID_NAMESPACE, name))
    return workflow, result["unlisted"]


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    parser.add_argument("--only", action="append", choices=sorted(WORKFLOWS), help="just this workflow (repeatable)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder to write (default: example_workflows/)")
    parser.add_argument(
        "--screenshots",
        type=Path,
        default=None,
        help="also save a picture of each workflow as it opens, as DIR/workflow-<name>.png (web/docs/ for the README)",
    )
    args = parser.parse_args(argv)

    from browser_driver import Browser, check_prerequisites
    from comfy_process import ComfyServer
    from comfyui_runtime import find_comfyui

    ok, reason = check_prerequisites()
    if not ok:
        print(f"cannot run the front end: {reason}", file=sys.stderr)
        return 2
    names = args.only or list(WORKFLOWS)
    stale = []
    with tempfile.TemporaryDirectory(prefix="personalize-examples-") as tmp:
        server = ComfyServer(find_comfyui(), base_dir=Path(tmp) / "base", python=sys.executable)
        with server:
            browser = Browser(server.url, log_path=Path(tmp) / "drive.log")
            try:
                info = browser.open()
                print(f"front end {info['frontendVersion']}, ComfyUI at {server.url}")
                for name in names:
                    workflow, unlisted = build(browser, name)
                    text = dumps(workflow)
                    target = args.out / f"{name}.json"
                    files = ", ".join(f"{u['widget']}={u['value']}" for u in unlisted) or "none"
                    if args.check:
                        current = target.read_text(encoding="utf-8") if target.is_file() else ""
                        if current != text:
                            stale.append(name)
                        print(f"{name}: {'up to date' if current == text else 'OUT OF DATE'}")
                    else:
                        args.out.mkdir(parents=True, exist_ok=True)
                        target.write_text(text, encoding="utf-8")
                        print(
                            f"{name}: wrote {target} ({len(workflow['nodes'])} nodes, {len(workflow['links'])} links; user files: {files})"
                        )
                if args.screenshots is not None:
                    args.screenshots = args.screenshots.resolve()  # the driver runs in another folder
                    args.screenshots.mkdir(parents=True, exist_ok=True)
                    browser.cmd("viewport", width=1920, height=1280)  # each example whole, at the zoom it opens with
                    for name in names:
                        browser.close_dialogs()
                        browser.load(json.loads((args.out / f"{name}.json").read_text(encoding="utf-8")), name=f"{name}.json")
                        browser.screenshot(args.screenshots / f"workflow-{name}.png")
                        print(f"{name}: picture {args.screenshots / f'workflow-{name}.png'}")
                errors = browser.errors()["pageErrors"]
                if errors:
                    print(f"page errors: {errors}", file=sys.stderr)
                    return 1
            finally:
                browser.close()
    if stale:
        print(f"out of date: {', '.join(stale)} (run {Path(__file__).name} to regenerate)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
