"""Training images for Textual Inversion / DreamBooth: loading, captions and buckets.

Pure Python + PIL + torch on purpose: no ComfyUI import, so the module can be
tested (and reused) without a ComfyUI install, and no relative imports, so it
loads the same whatever package name the node pack is installed under.

Pixels follow ComfyUI's IMAGE convention (float32, channels last, 0..1) so a
loaded set and an IMAGE batch from the graph look the same to the trainers.
Resampling uses torch ``interpolate(mode="bicubic", antialias=True)`` clamped to
0..1: it is high quality when shrinking, needs no uint8 round trip through PIL,
and is deterministic on CPU.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp")

# PIL reports broken files through several exception types depending on the
# plugin; all of them mean "this file cannot be used", nothing more.
_BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass
class TrainingImage:
    pixels: torch.Tensor  # float32 [H, W, 3], 0..1
    caption: str | None
    source: str


@dataclass
class TrainingImageSet:
    """The value passed between the image node and both training nodes."""

    images: list[TrainingImage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_captions(self) -> bool:
        return bool(self.images) and all(img.caption is not None for img in self.images)

    @classmethod
    def from_image_batch(cls, images: torch.Tensor, captions: list[str] | None = None) -> TrainingImageSet:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"Expected an IMAGE batch shaped [batch, height, width, channels], got {shape}. "
                "Connect the IMAGE output of a Load Image (or similar) node."
            )
        if images.shape[-1] not in (3, 4):
            raise ValueError(
                f"Expected 3 (RGB) or 4 (RGBA) channels in the last dimension, got shape "
                f"{tuple(images.shape)}. Connect an IMAGE output, not a MASK or LATENT."
            )
        if captions is not None and len(captions) != images.shape[0]:
            raise ValueError(f"Got {len(captions)} captions for {images.shape[0]} images; give exactly one caption per image (or none).")
        batch = _to_rgb(images.detach().to("cpu", torch.float32))
        items = [
            TrainingImage(
                pixels=batch[i].clone(),
                caption=_clean_caption(captions[i]) if captions is not None else None,
                source=f"image {i + 1} of batch",
            )
            for i in range(batch.shape[0])
        ]
        return cls(images=items)


def load_image_folder(
    folder: str | os.PathLike,
    *,
    on_bad_file: Literal["skip", "stop"] = "skip",
    recursive: bool = False,
) -> TrainingImageSet:
    if on_bad_file not in ("skip", "stop"):
        raise ValueError(f"on_bad_file must be 'skip' or 'stop', got {on_bad_file!r}.")
    root = Path(folder).expanduser()
    if not root.exists():
        raise ValueError(f"Image folder {str(root)!r} does not exist; check the path.")
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is a file, not a folder; give the folder that holds the images.")

    image_paths, other_files = _list_images(root, recursive)
    if not image_paths:
        raise ValueError(
            f"No training images in {str(root)!r}: only {', '.join(IMAGE_EXTENSIONS)} files are read "
            f"(saw {other_files} other file{'s' if other_files != 1 else ''}"
            f"{'' if recursive else ', subfolders not searched'}). Point to the folder holding the images."
        )

    images: list[TrainingImage] = []
    bad: list[str] = []
    for path in image_paths:
        name = path.relative_to(root).as_posix()
        try:
            pixels = _read_image(path)
            caption = _read_caption(path)
        except _BAD_IMAGE_ERRORS as exc:
            if on_bad_file == "stop":
                raise ValueError(
                    f"Could not load training image {name!r} in {str(root)!r}: {exc}. "
                    "Fix or remove that file, or set on_bad_file to 'skip'."
                ) from exc
            logger.warning("Skipping unreadable training image %r in %r: %s", name, str(root), exc)
            bad.append(name)
            continue
        images.append(TrainingImage(pixels=pixels, caption=caption, source=name))

    if not images:
        listed = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ValueError(f"None of the {len(bad)} images in {str(root)!r} could be read ({listed}); re-export them as PNG or JPEG.")
    return TrainingImageSet(images=images)


def bucket_resolution(width: int, height: int, target: int, multiple: int = 64) -> tuple[int, int]:
    if width < 1 or height < 1:
        raise ValueError(f"Image size must be positive, got {width}x{height}.")
    if multiple < 1 or target < multiple or target % multiple:
        raise ValueError(
            f"Resolution {target} must be a positive multiple of {multiple}; "
            f"try {max(multiple, round(target / max(multiple, 1)) * multiple)}."
        )
    area = target * target
    want = math.log(width / height)
    # Candidates: each width with the height nearest target²/width, and each
    # height with its nearest width; using both keeps portrait and landscape
    # buckets mirror images of each other.
    options = _nearest_sides(want, area, multiple)
    options += [(w, h) for h, w in _nearest_sides(-want, area, multiple)]
    # Ties go to the area nearest target², then the shorter long side: both are
    # mirror-invariant and independent of float noise.
    return min(
        options,
        key=lambda wh: (round(abs(math.log(wh[0] / wh[1]) - want), 12), abs(wh[0] * wh[1] - area), max(wh)),
    )


def _nearest_sides(want: float, area: int, multiple: int) -> list[tuple[int, int]]:
    """The two (w, h) on the "w steps, h = nearest to area/w" grid around log(w/h) = want."""

    def candidate(k: int) -> tuple[int, int]:
        w = k * multiple
        return w, max(multiple, round(area / w / multiple) * multiple)

    # w/h strictly grows with k (w grows, h never does): bisect for the crossing.
    lo, hi = 1, max(1, area // (multiple * multiple))
    while lo < hi:
        mid = (lo + hi) // 2
        w, h = candidate(mid)
        if math.log(w / h) < want:
            lo = mid + 1
        else:
            hi = mid
    return [candidate(k) for k in sorted({max(1, lo - 1), lo})]


def prepare_image(pixels: torch.Tensor, size: tuple[int, int], mode: Literal["crop", "resize", "pad"] = "crop") -> torch.Tensor:
    """Return ``pixels`` ([H, W, 3]) at exactly ``size`` = (width, height)."""
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ValueError(f"Target size must be positive, got {width}x{height}.")
    if pixels.ndim != 3 or pixels.shape[-1] not in (3, 4):
        raise ValueError(f"Expected one image shaped [height, width, 3], got {tuple(pixels.shape)}.")
    image = _to_rgb(pixels.to(torch.float32))
    src_h, src_w = image.shape[0], image.shape[1]

    if mode == "resize":
        return _resample(image, width, height)
    if mode == "crop":
        scale = max(width / src_w, height / src_h)
        new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
        scaled = _resample(image, new_w, new_h)
        left, top = (new_w - width) // 2, (new_h - height) // 2
        return scaled[top : top + height, left : left + width].contiguous()
    if mode == "pad":
        scale = min(width / src_w, height / src_h)
        new_w = min(width, max(1, round(src_w * scale)))
        new_h = min(height, max(1, round(src_h * scale)))
        canvas = torch.ones((height, width, 3), dtype=torch.float32)
        left, top = (width - new_w) // 2, (height - new_h) // 2
        canvas[top : top + new_h, left : left + new_w] = _resample(image, new_w, new_h)
        return canvas
    raise ValueError(f"mode must be 'crop', 'resize' or 'pad', got {mode!r}.")


def group_into_buckets(
    image_set: TrainingImageSet,
    target: int,
    mode: Literal["crop", "resize", "pad"] = "crop",
    bucketing: bool = True,
    *,
    multiple: int = 64,
) -> list[tuple[tuple[int, int], torch.Tensor, list[str | None]]]:
    """Group images by bucket size: ((width, height), [N, H, W, 3], captions).

    Buckets come in order of first appearance; each image appears once.
    """
    if target < 1:
        raise ValueError(f"Resolution must be positive, got {target}.")
    buckets: dict[tuple[int, int], tuple[list[torch.Tensor], list[str | None]]] = {}
    for item in image_set.images:
        h, w = item.pixels.shape[0], item.pixels.shape[1]
        size = bucket_resolution(w, h, target, multiple) if bucketing else (target, target)
        pixels, captions = buckets.setdefault(size, ([], []))
        pixels.append(prepare_image(item.pixels, size, mode))
        captions.append(item.caption)
    return [(size, torch.stack(pixels), captions) for size, (pixels, captions) in buckets.items()]


def _list_images(root: Path, recursive: bool) -> tuple[list[Path], int]:
    candidates = root.rglob("*") if recursive else root.iterdir()
    images: list[Path] = []
    others = 0
    for path in candidates:
        rel = path.relative_to(root)
        # Hidden files (.DS_Store, macOS "._x.png" resource forks) are never
        # training data and would otherwise show up as broken images.
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            others += 1
    images.sort(key=lambda p: p.relative_to(root).as_posix())
    return images, others


def _read_image(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        # Full decode now: Image.open only reads the header, so a truncated
        # file would otherwise fail later, in the middle of training.
        img.load()
        upright = ImageOps.exif_transpose(img)
    return _pil_to_rgb_tensor(upright)


def _pil_to_rgb_tensor(img: Image.Image) -> torch.Tensor:
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit greyscale PNGs: PIL's convert("RGB") would clip, not scale.
        grey = np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
        return torch.from_numpy(np.repeat(grey[..., None], 3, axis=-1).copy())
    has_alpha = "A" in img.mode or "a" in img.mode or "transparency" in img.info
    img = img.convert("RGBA" if has_alpha else "RGB")
    return _to_rgb(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))


def _to_rgb(pixels: torch.Tensor) -> torch.Tensor:
    """Drop alpha by compositing onto white, the usual background for subjects."""
    if pixels.shape[-1] == 3:
        return pixels.contiguous()
    alpha = pixels[..., 3:4].clamp(0.0, 1.0)
    return (pixels[..., :3] * alpha + (1.0 - alpha)).contiguous()


def _resample(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    if image.shape[0] == height and image.shape[1] == width:
        return image.clone()
    batch = image.permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(batch, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0)[0].permute(1, 2, 0).contiguous()


def _read_caption(image_path: Path) -> str | None:
    for suffix in (".txt", ".TXT"):
        caption_path = image_path.with_suffix(suffix)
        if caption_path.is_file():
            try:
                # utf-8-sig: Windows editors often prepend a BOM.
                return _clean_caption(caption_path.read_text(encoding="utf-8-sig"))
            except UnicodeDecodeError as exc:
                raise ValueError(f"caption file {caption_path.name!r} is not UTF-8 text ({exc.reason})") from exc
    return None


def _clean_caption(text: str | None) -> str | None:
    text = (text or "").strip()
    return text or None
