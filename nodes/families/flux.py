"""Flux.1 (dev and schnell) and Chroma: flow-matching double/single-stream transformers.

Recipes from the projects people train them with (shared notes, table C): kohya's ``flux_shift``
noise levels (logit-normal, shifted by μ from the image size), guidance 1.0 embedded while
training Flux.1-dev (kohya, ai-toolkit, SimpleTuner) and 0 for Chroma, LoRA files in kohya's
``lora_unet_double_blocks_…`` names, which both ComfyUI and diffusers read. Their blocks add
residuals in place (``img +=``), so autograd keeps copies of what it saves.
"""

from __future__ import annotations

from dataclasses import replace

from . import Family, SamplingDefaults

# Module paths of ComfyUI's Flux (double_blocks.N.img_attn.qkv, single_blocks.N.linear1, ...).
FLUX_LORA_TARGETS = {
    "attention": (r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$", r"^single_blocks\.\d+\.(linear1|linear2)$"),
    "attention+mlp": (
        r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$",
        r"^double_blocks\.\d+\.(img|txt)_mlp\.(0|2)$",
        r"^single_blocks\.\d+\.(linear1|linear2)$",
    ),
    # kohya's default: every Linear of the double and single blocks, modulation included.
    "all": (r"^(double|single)_blocks\.",),
}
LEARNING_RATES = {"lora": 1e-4, "full": 1e-5}

FLUX_DEV = Family(
    name="Flux.1-dev",
    config_classes=("Flux",),
    noise_levels="flux-shift",
    lora_targets=FLUX_LORA_TARGETS,
    class_sampling=SamplingDefaults("euler", "simple", 20, 1.0, guidance=3.5),
    preview_sampling=SamplingDefaults("euler", "simple", 20, 1.0, guidance=3.5),
    learning_rates=LEARNING_RATES,
    resolution=1024,
    kohya_base="flux1",
    training_guidance=1.0,
    pooled_text=True,
    activation_copies=True,
)
FLUX_SCHNELL = replace(
    FLUX_DEV,
    name="Flux.1-schnell",
    config_classes=("FluxSchnell",),
    class_sampling=SamplingDefaults("euler", "simple", 4, 1.0),
    preview_sampling=SamplingDefaults("euler", "simple", 4, 1.0),
    training_guidance=None,
    step_distilled=True,
    notes=(
        "Flux.1-schnell is step-distilled: training without a training adapter may cost its few-step sampling "
        "(sample the result with more steps if 4 look soft)",
    ),
)
CHROMA = replace(
    FLUX_DEV,
    name="Chroma",
    config_classes=("Chroma",),
    class_sampling=SamplingDefaults("euler", "simple", 26, 4.0),
    preview_sampling=SamplingDefaults("euler", "simple", 20, 4.0),
    kohya_base="chroma",
    training_guidance=0.0,
    pooled_text=False,  # T5 only
)

FAMILIES = (FLUX_DEV, FLUX_SCHNELL, CHROMA)
