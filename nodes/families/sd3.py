"""Stable Diffusion 3 and 3.5 (medium, large): MMDiT flow-matching transformers.

Logit-normal noise levels (the SD3 paper's and diffusers' default), CLIP-L + CLIP-G pooled `y`,
real CFG with the empty negative for class images. LoRA files in diffusers' PEFT names
(``transformer.transformer_blocks.N.attn.to_q.lora_A.weight``, the scale in B, no ``.alpha``
keys: diffusers' SD3 loader takes no others), which ComfyUI maps back onto its fused qkv.
ComfyUI's MMDiT forward runs no
diffusion-model wrappers, so the training view is put in place around each training call.
"""

from __future__ import annotations

from . import Family, SamplingDefaults

# Module paths of ComfyUI's MMDiT (joint_blocks.N.x_block.attn.qkv, ...; attn2 is SD3.5's x-block self-attention).
MMDIT_LORA_TARGETS = {
    "attention": (r"^joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.(qkv|proj)$",),
    "attention+mlp": (
        r"^joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.(qkv|proj)$",
        r"^joint_blocks\.\d+\.(x_block|context_block)\.mlp\.(fc1|fc2)$",
    ),
    "all": (r"^joint_blocks\.",),
}

SD3 = Family(
    name="SD3",
    config_classes=("SD3",),
    noise_levels="logit-normal",
    lora_targets=MMDIT_LORA_TARGETS,
    class_sampling=SamplingDefaults("euler", "sgm_uniform", 28, 4.5),
    preview_sampling=SamplingDefaults("euler", "sgm_uniform", 20, 4.5),
    learning_rates={"lora": 1e-4, "full": 1e-5},
    resolution=1024,
    kohya_base="sd3",
    pooled_text=True,
    lora_format="diffusers",
    diffusion_model_wrappers=False,
)

FAMILIES = (SD3,)
