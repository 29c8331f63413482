"""Model families: everything that differs between the kinds of model the pack trains, one module a family.

A ``Family`` is plain data (no ComfyUI import): which ComfyUI model configs it covers, the name it
goes by in every file the pack writes (``base_model``), how its noise levels are drawn by
default, the guidance value it trains with, which layers each LoRA preset adapts and how its LoRA
files are named, the sampling its class images and previews use, default learning rates and the
traps of its forward (in-place residuals). The objective (eps / v / flow / x0) is not here: it
follows from the model's own sampling, as a user may have patched it. Adding a family is one
module here plus its tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

LoraFormat = Literal["kohya", "diffusers"]
NoiseLevels = Literal["timesteps", "schedule", "logit-normal", "flux-shift"]


@dataclass(frozen=True)
class SamplingDefaults:
    """How the frozen model draws class images (and previews) for this family, as its users sample it."""

    sampler: str
    scheduler: str
    steps: int
    cfg: float
    guidance: float | None = None  # guidance-distilled models: the value in the conditioning (Flux's FluxGuidance)
    negative: str = ""

    def describe(self) -> str:
        guidance = f", guidance {self.guidance:g}" if self.guidance is not None else ""
        return f"{self.sampler}/{self.scheduler}, {self.steps} steps, cfg {self.cfg:g}{guidance}"


@dataclass(frozen=True)
class Family:
    name: str  # base_model in every file the pack writes
    config_classes: tuple[str, ...]  # ComfyUI model configs (comfy.supported_models) it covers
    noise_levels: NoiseLevels  # what 'auto' draws
    lora_targets: Mapping[str, tuple[str, ...]]  # preset -> regexes on diffusion-model module paths
    class_sampling: SamplingDefaults
    preview_sampling: SamplingDefaults
    learning_rates: Mapping[str, float]  # 'lora' / 'full'
    resolution: int
    kohya_base: str  # ss_base_model_version, as kohya's tools read it
    lora_format: LoraFormat = "kohya"
    training_guidance: float | None = None  # guidance-distilled: the guidance embedded while training
    pooled_text: bool = False  # the model reads the pooled text embedding (its `y`)
    activation_copies: bool = False  # in-place residuals: autograd keeps copies of what it saves
    step_distilled: bool = False  # few-step base: training may cost its few-step sampling
    diffusion_model_wrappers: bool = True  # its forward runs ComfyUI's DIFFUSION_MODEL wrappers
    notes: Sequence[str] = field(default_factory=tuple)

    @property
    def flow(self) -> bool:
        return self.noise_levels != "timesteps"


class UnsupportedModel(ValueError):
    pass


def _registry() -> list[Family]:
    from . import flux, sd, sd3

    return [*sd.FAMILIES, *flux.FAMILIES, *sd3.FAMILIES]


FAMILIES: tuple[Family, ...] = tuple(_registry())


def family_for(config_classes: Sequence[str]) -> Family:
    """The family of a model whose ComfyUI config class (then its bases, in order) is ``config_classes``."""
    for name in config_classes:
        for family in FAMILIES:
            if name in family.config_classes:
                return family
    supported = ", ".join(f.name for f in FAMILIES)
    raise UnsupportedModel(
        f"this {config_classes[0] if config_classes else 'unknown'} model is not one the trainers support yet (supported: {supported})"
    )


def by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)
