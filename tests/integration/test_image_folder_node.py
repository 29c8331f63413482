"""The Image Folder node through ComfyUI's registry, and its images reaching a trainer."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import folder_paths
import nodes
import pytest
from harness import pack_module, run_node, textual_inversion_inputs
from PIL import Image

graph_types = pack_module("nodes.graph_types")
FOLDER = graph_types.IMAGE_FOLDER
NO_FOLDER = pack_module("nodes.image_folder_node").NO_FOLDER


def _make_folder(root: Path, captions: bool = True) -> Path:
    root.mkdir(parents=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    sizes = [(96, 64), (64, 96), (64, 64)]
    for i, (colour, size) in enumerate(zip(colours, sizes, strict=False)):
        Image.new("RGB", size, colour).save(root / f"img{i}.png")
        if captions:
            (root / f"img{i}.txt").write_text(f"a {['red', 'green', 'blue'][i]} square")
    return root


def _inputs(**overrides):
    values = {"folder": NO_FOLDER, "path": "", "on_bad_file": "skip", "recursive": False, "allow_any_path": False}
    values.update(overrides)
    return values


def test_folder_under_input_is_listed_and_loaded():
    name = f"set-{uuid.uuid4().hex[:6]}"
    _make_folder(Path(folder_paths.get_input_directory()) / name)
    choices = nodes.NODE_CLASS_MAPPINGS[FOLDER].INPUT_TYPES()["required"]["folder"][0]
    assert name in choices
    image_set, count = run_node(FOLDER, **_inputs(folder=name))
    assert count == 3 and image_set.has_captions
    assert [img.caption for img in image_set.images] == ["a red square", "a green square", "a blue square"]
    assert [tuple(img.pixels.shape[:2]) for img in image_set.images] == [(64, 96), (96, 64), (64, 64)]


def test_path_outside_input_needs_permission(tmp_path):
    folder = _make_folder(tmp_path / "outside")
    with pytest.raises(ValueError, match="outside ComfyUI's input folder"):
        run_node(FOLDER, **_inputs(path=str(folder)))
    with pytest.raises(ValueError, match="outside"):
        run_node(FOLDER, **_inputs(path=os.path.join("..", "..", str(folder))))
    _, count = run_node(FOLDER, **_inputs(path=str(folder), allow_any_path=True))
    assert count == 3


def test_no_folder_chosen_is_a_clear_error():
    with pytest.raises(ValueError, match="no folder chosen"):
        run_node(FOLDER, **_inputs())


def test_is_changed_follows_the_folder_contents():
    name = f"set-{uuid.uuid4().hex[:6]}"
    root = _make_folder(Path(folder_paths.get_input_directory()) / name)
    cls = nodes.NODE_CLASS_MAPPINGS[FOLDER]
    before = cls.IS_CHANGED(**_inputs(folder=name))
    assert cls.IS_CHANGED(**_inputs(folder=name)) == before
    (root / "img0.txt").write_text("a changed caption, longer")
    assert cls.IS_CHANGED(**_inputs(folder=name)) != before


def test_captions_feed_textual_inversion(sd15, embeddings_dir):
    name = f"set-{uuid.uuid4().hex[:6]}"
    _make_folder(Path(folder_paths.get_input_directory()) / name)
    image_set, _ = run_node(FOLDER, **_inputs(folder=name))
    word = f"<c{uuid.uuid4().hex[:6]}>"
    embedding, _, _, file_name = run_node(
        graph_types.TRAIN_TEXTUAL_INVERSION,
        model=sd15["model"],
        clip=sd15["clip"],
        vae=sd15["vae"],
        image_set=image_set,
        **textual_inversion_inputs(
            trigger_word=word, init_text="square", steps=2, templates="captions", custom_templates="", file_format="pt"
        ),
    )
    assert file_name.endswith(".pt") and (embeddings_dir / file_name).is_file()
    assert embedding.name == word
