"""Training prompts: template sets and where the trigger word goes. Plain Python."""

from __future__ import annotations

import random
from collections.abc import Sequence

# Short neutral captions in the spirit of the Textual Inversion paper's CLIP-ImageNet
# templates: varied wording, so the new word absorbs the subject and not the phrasing.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a photo of the {}",
    "a close-up photo of a {}",
    "a cropped photo of the {}",
    "a bright photo of a {}",
    "a dark photo of the {}",
    "a good photo of a {}",
    "a photo of one {}",
    "a photo of a nice {}",
    "a photo of a small {}",
    "a photo of the large {}",
    "a rendition of a {}",
    "a picture of a {}",
    "an image of the {}",
    "a clean photo of a {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a picture in the style of {}",
    "an artwork in the style of {}",
    "a cropped painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a dark painting in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a large painting in the style of {}",
    "an illustration in the style of {}",
    "a drawing in the style of {}",
)
TEMPLATE_SETS = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
TEMPLATE_CHOICES = ("object", "style", "captions", "custom")

# AUTOMATIC1111's template words, accepted so its template files work as they are.
_A1111_NAME = "[name]"
_A1111_CAPTION = "[filewords]"


def parse_custom_templates(text: str) -> tuple[str, ...]:
    """One template per line; each must say where the trigger goes ({} or [name])."""
    templates = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
    if not templates:
        raise ValueError("custom templates are empty: write one prompt per line, with {} where the new word goes")
    for template in templates:
        if "{}" not in template and _A1111_NAME not in template:
            raise ValueError(f"custom template '{template}' has no {{}} (or [name]) to mark where the new word goes")
    return templates


def fill_template(template: str, trigger: str, caption: str | None = None) -> str:
    text = template.replace(_A1111_NAME, trigger).replace("{}", trigger)
    if _A1111_CAPTION in text:
        text = text.replace(_A1111_CAPTION, caption or "").strip().strip(",").strip()
    return text


def caption_prompt(caption: str, trigger: str) -> str:
    """A caption with the trigger where it says ({} or [name]), else in front of it."""
    if "{}" in caption or _A1111_NAME in caption:
        return fill_template(caption, trigger)
    return f"{trigger}, {caption}" if caption else trigger


def choose_prompts(
    templates: Sequence[str] | None,
    captions: Sequence[str | None],
    trigger: str,
    rng: random.Random,
) -> list[str]:
    """One prompt per image of a batch: captions when ``templates`` is None, else a random template."""
    if templates is None:
        return [caption_prompt(c or "", trigger) for c in captions]
    return [fill_template(rng.choice(templates), trigger, c) for c in captions]
