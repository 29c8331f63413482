"""Tests for nodes/core/training_images.py (the pure core: no ComfyUI needed)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from core_package import core
from PIL import Image

ti = core("training_images")

RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)


def solid(path: Path, size=(32, 24), color=GREY, mode="RGB", **save_args) -> Path:
    Image.new(mode, size, color).save(path, **save_args)
    return path


def noise_image(size=(96, 96), seed=0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(data.numpy(), "RGB")


def close(pixel: torch.Tensor, rgb, tol=0.06) -> bool:
    return bool((pixel - torch.tensor(rgb, dtype=torch.float32) / 255).abs().max() <= tol)


# ---- load_image_folder --------------------------------------------------------


def test_captions_read_stripped_and_missing_is_none(tmp_path):
    solid(tmp_path / "a.png")
    solid(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("  a photo of sks dog\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("", encoding="utf-8")
    solid(tmp_path / "c.jpg")
    (tmp_path / "c.txt").write_text("\ufeffcafé, ünïcode", encoding="utf-8")
    solid(tmp_path / "d.webp")

    images = ti.load_image_folder(tmp_path).images
    assert [(i.source, i.caption) for i in images] == [
        ("a.png", "a photo of sks dog"),
        ("b.png", None),  # empty caption file means "no caption"
        ("c.jpg", "café, ünïcode"),  # BOM dropped
        ("d.webp", None),
    ]
    for image in images:
        assert image.pixels.dtype == torch.float32
        assert image.pixels.shape == (24, 32, 3)
        assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0


def test_has_captions(tmp_path):
    solid(tmp_path / "a.png")
    solid(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("x")
    assert not ti.load_image_folder(tmp_path).has_captions
    (tmp_path / "b.txt").write_text("y")
    assert ti.load_image_folder(tmp_path).has_captions


def test_sorted_order_and_case_insensitive_extensions(tmp_path):
    for name in ["c.PNG", "a.JPG", "b.jpeg", "e.WebP", "d.png"]:
        fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[name.split(".")[1].lower()]
        solid(tmp_path / name, format=fmt)
    sources = [i.source for i in ti.load_image_folder(tmp_path).images]
    assert sources == ["a.JPG", "b.jpeg", "c.PNG", "d.png", "e.WebP"]


def test_values_are_scaled_to_0_1(tmp_path):
    solid(tmp_path / "x.png", color=(255, 0, 51))
    pixels = ti.load_image_folder(tmp_path).images[0].pixels
    assert torch.allclose(pixels[0, 0], torch.tensor([1.0, 0.0, 0.2]))


@pytest.mark.parametrize("orientation, marker_corner", [(6, "top_right"), (8, "bottom_left")])
def test_exif_orientation_applied(tmp_path, orientation, marker_corner):
    # Stored 60 wide x 40 tall, red marker in the stored top-left corner.
    img = Image.new("RGB", (60, 40), GREY)
    img.paste(RED, (0, 0, 12, 12))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())

    pixels = ti.load_image_folder(tmp_path).images[0].pixels
    assert pixels.shape == (60, 40, 3)  # displayed upright: 40 wide x 60 tall
    corners = {
        "top_left": pixels[3, 3],
        "top_right": pixels[3, -4],
        "bottom_left": pixels[-4, 3],
        "bottom_right": pixels[-4, -4],
    }
    for name, pixel in corners.items():
        assert close(pixel, RED if name == marker_corner else GREY, tol=0.1), name


def test_alpha_flattened_onto_white(tmp_path):
    img = Image.new("RGBA", (20, 10), (0, 0, 255, 255))
    img.paste((255, 0, 0, 0), (0, 0, 10, 10))  # fully transparent red: must vanish
    img.save(tmp_path / "rgba.png")
    Image.new("LA", (8, 8), (0, 128)).save(tmp_path / "la.png")  # black at half alpha

    la, rgba = ti.load_image_folder(tmp_path).images
    assert la.source == "la.png" and rgba.source == "rgba.png"
    assert rgba.pixels.shape == (10, 20, 3)
    assert torch.allclose(rgba.pixels[5, 2], torch.ones(3))
    assert torch.allclose(rgba.pixels[5, 15], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(la.pixels[4, 4], torch.full((3,), 1 - 128 / 255), atol=1e-6)


def test_palette_images_with_and_without_transparency(tmp_path):
    base = Image.new("RGB", (16, 8), RED)
    base.paste(GREEN, (8, 0, 16, 8))
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.save(tmp_path / "a_opaque.png")
    green_index = pal.getpixel((12, 4))
    pal.save(tmp_path / "b_transparent.png", transparency=green_index)
    assert Image.open(tmp_path / "b_transparent.png").mode == "P"

    opaque, transparent = ti.load_image_folder(tmp_path).images
    assert opaque.pixels.shape == transparent.pixels.shape == (8, 16, 3)
    assert close(opaque.pixels[4, 2], RED) and close(opaque.pixels[4, 12], GREEN)
    assert close(transparent.pixels[4, 2], RED)
    assert close(transparent.pixels[4, 12], (255, 255, 255))  # transparent index -> white


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    Image.new("I;16", (4, 4), 32768).save(tmp_path / "deep.png")
    pixels = ti.load_image_folder(tmp_path).images[0].pixels
    assert torch.allclose(pixels, torch.full((4, 4, 3), 32768 / 65535), atol=1e-4)


def _write_truncated(path: Path, fmt: str) -> None:
    noise_image().save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, fmt", [("b_broken.png", "PNG"), ("b_broken.jpg", "JPEG")])
def test_truncated_image_skipped_with_warning(tmp_path, caplog, name, fmt):
    solid(tmp_path / "a.png")
    _write_truncated(tmp_path / name, fmt)
    solid(tmp_path / "c.png")
    with caplog.at_level(logging.WARNING):
        image_set = ti.load_image_folder(tmp_path, on_bad_file="skip")
    assert [i.source for i in image_set.images] == ["a.png", "c.png"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0].getMessage()


@pytest.mark.parametrize("name, fmt", [("b_broken.png", "PNG"), ("b_broken.jpg", "JPEG")])
def test_truncated_image_stops_naming_file(tmp_path, name, fmt):
    solid(tmp_path / "a.png")
    _write_truncated(tmp_path / name, fmt)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        ti.load_image_folder(tmp_path, on_bad_file="stop")


def test_not_an_image_with_image_extension(tmp_path, caplog):
    (tmp_path / "fake.png").write_text("not a png")
    solid(tmp_path / "real.png")
    with caplog.at_level(logging.WARNING):
        assert [i.source for i in ti.load_image_folder(tmp_path).images] == ["real.png"]
    assert "fake.png" in caplog.text


def test_all_images_bad_raises_even_when_skipping(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="None of the 2 images"):
        ti.load_image_folder(tmp_path, on_bad_file="skip")


def test_non_image_files_ignored_and_counted(tmp_path):
    (tmp_path / "notes.md").write_text("hello")
    (tmp_path / "photo.gif").write_bytes(b"GIF89a")
    (tmp_path / "photo.txt").write_text("caption without image")
    (tmp_path / ".DS_Store").write_bytes(b"\0")  # hidden: not counted
    with pytest.raises(ValueError) as err:
        ti.load_image_folder(tmp_path)
    message = str(err.value)
    assert "saw 3 other files" in message
    for ext in (".png", ".jpg", ".jpeg", ".webp"):
        assert ext in message

    solid(tmp_path / "ok.png")
    assert [i.source for i in ti.load_image_folder(tmp_path).images] == ["ok.png"]


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match=r"No training images.*saw 0 other files"):
        ti.load_image_folder(tmp_path)


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ti.load_image_folder(tmp_path / "nope")
    file = solid(tmp_path / "a.png")
    with pytest.raises(ValueError, match="not a folder"):
        ti.load_image_folder(file)


def test_recursive(tmp_path):
    solid(tmp_path / "top.png")
    (tmp_path / "sub").mkdir()
    solid(tmp_path / "sub" / "inner.png")
    (tmp_path / "sub" / "inner.txt").write_text("inner caption")
    assert [i.source for i in ti.load_image_folder(tmp_path).images] == ["top.png"]
    images = ti.load_image_folder(tmp_path, recursive=True).images
    assert [(i.source, i.caption) for i in images] == [("sub/inner.png", "inner caption"), ("top.png", None)]


def test_every_image_counts_once_and_bad_options_are_refused(tmp_path):
    for name in "abc":
        solid(tmp_path / f"{name}.png")
    assert len(ti.load_image_folder(tmp_path)) == 3
    with pytest.raises(ValueError, match="on_bad_file"):
        ti.load_image_folder(tmp_path, on_bad_file="ignore")


# ---- bucket_resolution ----------------------------------------------------------


@pytest.mark.parametrize("target", [512, 768, 1024])
@pytest.mark.parametrize("size", [(1000, 1000), (1920, 1080), (1080, 1920), (3000, 2000), (600, 800)])
def test_bucket_resolution_properties(target, size):
    width, height = size
    w, h = ti.bucket_resolution(width, height, target)
    assert w % 64 == 0 and h % 64 == 0 and w >= 64 and h >= 64
    assert abs(w * h - target * target) / (target * target) < 0.1
    # 64-px steps at 512 are coarse: 3:2 becomes 640x384 (5:3), about 0.105 off in log aspect.
    assert abs(math.log((w / h) / (width / height))) < 0.12
    assert (w > h) == (width > height) and (w < h) == (width < height)


def test_bucket_resolution_examples():
    assert ti.bucket_resolution(333, 333, 512) == (512, 512)
    assert ti.bucket_resolution(4000, 4000, 1024) == (1024, 1024)
    assert ti.bucket_resolution(1920, 1080, 1024) == (1344, 768)
    assert ti.bucket_resolution(1080, 1920, 1024) == (768, 1344)
    assert ti.bucket_resolution(1920, 1080, 512, multiple=8) == (680, 384)


def test_bucket_resolution_is_the_best_aspect_match_and_symmetric():
    # Brute force over every side length paired with the other side that keeps the area nearest target².
    target = 512
    for width, height in [(1920, 1080), (700, 500), (500, 1300), (2000, 300), (600, 400)]:
        w, h = ti.bucket_resolution(width, height, target)
        assert ti.bucket_resolution(height, width, target) == (h, w)
        err = abs(math.log(w / h) - math.log(width / height))
        for side in range(64, 4096 + 1, 64):
            other = max(64, round(target * target / side / 64) * 64)
            for cw, ch in ((side, other), (other, side)):
                assert err <= abs(math.log(cw / ch) - math.log(width / height)) + 1e-12


def test_bucket_resolution_rejects_bad_target():
    with pytest.raises(ValueError, match="multiple of 64"):
        ti.bucket_resolution(100, 100, 500)
    with pytest.raises(ValueError):
        ti.bucket_resolution(0, 100, 512)


# ---- prepare_image -----------------------------------------------------------------


def _striped(width=200, height=100) -> torch.Tensor:
    # Blue centre, red bands at the far left/right that a centre crop must remove.
    pixels = torch.zeros(height, width, 3)
    pixels[..., 2] = 1.0
    pixels[:, :40] = torch.tensor([1.0, 0.0, 0.0])
    pixels[:, -40:] = torch.tensor([1.0, 0.0, 0.0])
    return pixels


@pytest.mark.parametrize("mode", ["crop", "resize", "pad"])
@pytest.mark.parametrize("size", [(64, 64), (128, 64), (64, 192), (200, 100), (37, 51)])
def test_prepare_image_exact_size(mode, size):
    out = ti.prepare_image(_striped(), size, mode)
    assert out.shape == (size[1], size[0], 3) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_prepare_image_crop_keeps_centre():
    out = ti.prepare_image(_striped(), (64, 64), "crop")
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 1.0]).expand(64, 64, 3), atol=0.02)


def test_prepare_image_resize_stretches_everything_in():
    out = ti.prepare_image(_striped(), (64, 64), "resize")
    assert close(out[32, 2], RED) and close(out[32, 61], RED) and close(out[32, 32], BLUE)


def test_prepare_image_pad_fits_inside_on_white():
    out = ti.prepare_image(_striped(), (64, 64), "pad")  # content becomes 64x32, centred
    assert torch.allclose(out[:14], torch.ones(14, 64, 3))
    assert torch.allclose(out[-14:], torch.ones(14, 64, 3))
    assert close(out[32, 2], RED) and close(out[32, 32], BLUE)


def test_prepare_image_same_size_is_lossless_and_rejects_bad_mode():
    pixels = torch.rand(20, 30, 3)
    for mode in ("crop", "resize", "pad"):
        assert torch.equal(ti.prepare_image(pixels, (30, 20), mode), pixels)
    with pytest.raises(ValueError, match="mode"):
        ti.prepare_image(pixels, (30, 20), "squash")


# ---- group_into_buckets / from_image_batch -----------------------------------------


def _set(*sizes) -> object:
    images = [ti.TrainingImage(pixels=torch.full((h, w, 3), 0.5), caption=f"c{i}", source=f"i{i}") for i, (w, h) in enumerate(sizes)]
    return ti.TrainingImageSet(images=images)


def test_group_into_buckets_keeps_aspects_apart():
    image_set = _set((300, 300), (600, 400), (200, 200), (400, 600), (900, 600))
    buckets = ti.group_into_buckets(image_set, 512)
    assert [(size, pixels.shape, caps) for size, pixels, caps in buckets] == [
        ((512, 512), (2, 512, 512, 3), ["c0", "c2"]),
        ((640, 384), (2, 384, 640, 3), ["c1", "c4"]),
        ((384, 640), (1, 640, 384, 3), ["c3"]),
    ]


def test_group_into_buckets_without_bucketing_gives_one_square():
    image_set = _set((300, 300), (600, 400), (400, 600))
    buckets = ti.group_into_buckets(image_set, 512, mode="pad", bucketing=False)
    assert len(buckets) == 1
    size, pixels, captions = buckets[0]
    assert size == (512, 512) and pixels.shape == (3, 512, 512, 3) and captions == ["c0", "c1", "c2"]


def test_group_into_buckets_is_deterministic(tmp_path):
    noise_image((150, 90), seed=1).save(tmp_path / "a.png")
    noise_image((90, 150), seed=2).save(tmp_path / "b.png")
    first = ti.group_into_buckets(ti.load_image_folder(tmp_path), 256)
    second = ti.group_into_buckets(ti.load_image_folder(tmp_path), 256)
    assert [b[0] for b in first] == [b[0] for b in second] and len(first) == 2
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, second, strict=False))


def test_from_image_batch_flattens_rgba():
    batch = torch.zeros(2, 4, 6, 4)
    batch[..., 0] = 1.0  # red
    batch[0, ..., 3] = 1.0  # opaque
    batch[1, ..., 3] = 0.0  # fully transparent -> white
    image_set = ti.TrainingImageSet.from_image_batch(batch, ["first", "  "])
    assert len(image_set) == 2
    first, second = image_set.images
    assert first.pixels.shape == (4, 6, 3) and first.pixels.dtype == torch.float32
    assert torch.allclose(first.pixels, torch.tensor([1.0, 0.0, 0.0]).expand(4, 6, 3))
    assert torch.allclose(second.pixels, torch.ones(4, 6, 3))
    assert (first.caption, second.caption) == ("first", None)
    assert (first.source, second.source) == ("image 1 of batch", "image 2 of batch")
    assert not image_set.has_captions


def test_from_image_batch_rgb_without_captions_copies_input():
    batch = torch.rand(3, 8, 8, 3)
    image_set = ti.TrainingImageSet.from_image_batch(batch)
    assert [i.caption for i in image_set.images] == [None, None, None]
    batch.zero_()  # the set must not alias the graph's tensor
    assert image_set.images[0].pixels.sum() > 0


@pytest.mark.parametrize(
    "bad",
    [torch.rand(8, 8, 3), torch.rand(0, 8, 8, 3), torch.rand(1, 8, 8), torch.rand(1, 8, 8, 2), "image"],
)
def test_from_image_batch_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match=r"[Cc]onnect"):
        ti.TrainingImageSet.from_image_batch(bad)


def test_from_image_batch_caption_count_mismatch():
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        ti.TrainingImageSet.from_image_batch(torch.rand(3, 8, 8, 3), ["a", "b"])
