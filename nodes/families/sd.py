"""Stable Diffusion 1.x, 2.x and XL: UNets on a discrete 1000-step schedule (eps or v)."""

from __future__ import annotations

from . import Family, SamplingDefaults

# Module paths of ComfyUI's UNet (its SpatialTransformer blocks).
UNET_LORA_TARGETS = {
    "attention": (r"\.attn\d\.(to_q|to_k|to_v|to_out\.0)$",),
    "attention+mlp": (r"\.attn\d\.(to_q|to_k|to_v|to_out\.0)$", r"\.ff\.net\.(0\.proj|2)$", r"\.(proj_in|proj_out)$"),
    "all": (r".",),
}
# What the pack has always sampled class images with (the DreamBooth examples' choice).
CLASS_SAMPLING = SamplingDefaults("euler_ancestral", "normal", 30, 7.0)
PREVIEW_SAMPLING = SamplingDefaults("euler", "normal", 20, 7.0)
# The paper's Stable Diffusion rate for full fine-tuning; the usual one for LoRA.
LEARNING_RATES = {"full": 5e-6, "lora": 1e-4}


def _unet_family(name: str, configs: tuple[str, ...], resolution: int, kohya_base: str, pooled: bool = False) -> Family:
    return Family(
        name=name,
        config_classes=configs,
        noise_levels="timesteps",
        lora_targets=UNET_LORA_TARGETS,
        class_sampling=CLASS_SAMPLING,
        preview_sampling=PREVIEW_SAMPLING,
        learning_rates=LEARNING_RATES,
        resolution=resolution,
        kohya_base=kohya_base,
        pooled_text=pooled,
    )


SD1 = _unet_family("SD1.x", ("SD15",), 512, "sd_v1")
SD2 = _unet_family("SD2.x", ("SD20",), 768, "sd_v2")
SDXL = _unet_family("SDXL", ("SDXL", "SDXLRefiner"), 1024, "sdxl_base_v1-0", pooled=True)

FAMILIES = (SD1, SD2, SDXL)
