"""Apply Embedding and the file format, proven through ComfyUI's own loaders and CLIP Text Encode."""

from __future__ import annotations

import uuid

import nodes
import pytest
import torch
from harness import PACK_DIR, pack_module, run_node

ef = pack_module("nodes.core.embedding_file")
graph_types = pack_module("nodes.graph_types")
APPLY = graph_types.APPLY_EMBEDDING
NO_FILE = pack_module("nodes.apply_embedding_node").NO_FILE


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _encode(clip, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    (conditioning,) = run_node("CLIPTextEncode", clip=clip, text=text)
    return conditioning[0][0], conditioning[0][1].get("pooled_output")


def _spliced_tensors(tokens) -> dict[str, list[torch.Tensor]]:
    return {key: [t for section in sections for t, *_ in section if torch.is_tensor(t)] for key, sections in tokens.items()}


def _write(vectors: dict[str, torch.Tensor], embeddings_dir, name: str | None = None, trigger: str | None = None) -> str:
    name = name or _unique("emb")
    ef.write_embedding(ef.EmbeddingFile(vectors=vectors, name=trigger or f"<{name}>"), embeddings_dir, name)
    return name


def _random(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_pack_is_registered_by_comfyui():
    assert nodes.NODE_CLASS_MAPPINGS[APPLY] is pack_module().NODE_CLASS_MAPPINGS[APPLY]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS[APPLY] == "Apply Embedding"
    ours = pack_module().NODE_CLASS_MAPPINGS
    assert {cls.CATEGORY for cls in ours.values()} == {graph_types.CATEGORY}
    assert all(key.startswith("Personalize") for key in ours)
    assert any(str(PACK_DIR / "web") == d for d in nodes.EXTENSION_WEB_DIRS.values())
    # Every input has a tooltip: it is what users read on hover.
    for cls in ours.values():
        for kind, section in cls.INPUT_TYPES().items():
            if kind == "hidden":
                continue
            for name, spec in section.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"


def test_written_file_gives_the_conditioning_of_its_vectors(sd15, embeddings_dir):
    clip = sd15["clip"]
    vectors = _random(2, 768, 1)
    name = _write({"clip_l": vectors}, embeddings_dir)
    through_file, _ = _encode(clip, f"a photo of embedding:{name} on a beach")

    # The same prompt with the vectors spliced by hand into ComfyUI's token list.
    tokens = clip.tokenize("a photo of on a beach")
    section = tokens["l"][0]
    after_of = 4  # start token, "a", "photo", "of"
    section[after_of:after_of] = [(vectors[0], 1.0), (vectors[1], 1.0)]
    del section[-2:]  # keep 77 tokens: drop two pads
    with torch.inference_mode():
        by_hand = clip.encode_from_tokens(tokens)
    assert torch.equal(through_file, by_hand)


def test_strength_one_equals_embedding_syntax(sd15, embeddings_dir):
    name = _write({"clip_l": _random(3, 768, 2)}, embeddings_dir)
    clip, word = run_node(APPLY, clip=sd15["clip"], embedding_file=f"{name}.safetensors", trigger_word="", strength=1.0)
    assert word == f"<{name}>"  # default: the name stored in the file
    for template in ("a photo of {}", "{} at the beach", "a painting of {}, 4k", "({}:1.2) in the rain", "{}"):
        ours, _ = _encode(clip, template.format(word))
        comfy, _ = _encode(sd15["clip"], template.format(f"embedding:{name}"))
        assert torch.equal(ours, comfy), template


def test_strength_scales_the_spliced_vectors(sd15, embeddings_dir):
    stored = _random(2, 768, 3)
    name = _write({"clip_l": stored}, embeddings_dir)
    clip, _word = run_node(APPLY, clip=sd15["clip"], embedding_file=f"{name}.safetensors", trigger_word="<w>", strength=0.4)
    spliced = _spliced_tensors(clip.tokenize("a photo of <w>"))["l"]
    assert len(spliced) == 2
    for got, want in zip(spliced, stored, strict=False):
        assert torch.allclose(got, want * 0.4, rtol=0, atol=1e-7)
    full, _ = run_node(APPLY, clip=sd15["clip"], embedding_file=f"{name}.safetensors", trigger_word="<w>", strength=1.0)
    assert not torch.equal(_encode(clip, "a photo of <w>")[0], _encode(full, "a photo of <w>")[0])


def test_original_clip_is_untouched(sd15):
    clip = sd15["clip"]
    before, _ = _encode(clip, "a photo of <untouched>")
    emb = ef.EmbeddingFile({"clip_l": _random(1, 768, 4)}, "<untouched>")
    bound, _ = run_node(APPLY, clip=clip, embedding_file=NO_FILE, trigger_word="", strength=1.0, embedding=emb)
    assert bound is not clip and bound.tokenizer is not clip.tokenizer
    assert _spliced_tensors(clip.tokenize("a photo of <untouched>"))["l"] == []
    assert torch.equal(_encode(clip, "a photo of <untouched>")[0], before)
    assert not torch.equal(_encode(bound, "a photo of <untouched>")[0], before)


def test_trigger_word_anywhere_a_word_stands(sd15):
    emb = ef.EmbeddingFile({"clip_l": _random(1, 768, 5)}, "<cat>")
    clip, _ = run_node(APPLY, clip=sd15["clip"], embedding_file=NO_FILE, trigger_word="", strength=1.0, embedding=emb)
    count = lambda text: len(_spliced_tensors(clip.tokenize(text))["l"])  # noqa: E731
    assert count("<cat>") == 1
    assert count("a <cat>, sitting") == 1
    assert count("<cat> and <cat>.") == 2
    assert count("(<cat>:1.3) in a hat") == 1
    assert count("photo\n<cat>") == 1
    assert count("x<cat>y") == 0  # inside another word: not the trigger
    long_prompt = ", ".join(["a very detailed photograph"] * 20) + ", <cat>"
    tokens = clip.tokenize(long_prompt)
    assert len(tokens["l"]) > 1 and count(long_prompt) == 1  # a prompt past 77 tokens keeps it


def test_apply_nodes_chain(sd15):
    a = ef.EmbeddingFile({"clip_l": _random(1, 768, 6)}, "<a>")
    b = ef.EmbeddingFile({"clip_l": _random(2, 768, 7)}, "<b>")
    first, _ = run_node(APPLY, clip=sd15["clip"], embedding_file=NO_FILE, trigger_word="", strength=1.0, embedding=a)
    second, _ = run_node(APPLY, clip=first, embedding_file=NO_FILE, trigger_word="", strength=0.5, embedding=b)
    spliced = _spliced_tensors(second.tokenize("<a> with <b>"))["l"]
    assert len(spliced) == 3
    assert torch.equal(spliced[0], a.vectors["clip_l"][0])
    assert torch.allclose(spliced[1], b.vectors["clip_l"][0] * 0.5)
    assert len(_spliced_tensors(first.tokenize("<a> with <b>"))["l"]) == 1  # the first stays as it was


def test_width_mismatch_is_a_clear_error(sd15):
    sd2_emb = ef.EmbeddingFile({"clip_h": _random(1, 1024, 8)}, "<x>")
    with pytest.raises(ValueError, match=r"1024.*768"):
        run_node(APPLY, clip=sd15["clip"], embedding_file=NO_FILE, trigger_word="", strength=1.0, embedding=sd2_emb)


@pytest.mark.parametrize("word", ["two words", " ", "embedding:x"])
def test_bad_trigger_words(sd15, word):
    emb = ef.EmbeddingFile({"clip_l": _random(1, 768, 9)}, "<x>")
    with pytest.raises(ValueError, match="trigger word"):
        run_node(APPLY, clip=sd15["clip"], embedding_file=NO_FILE, trigger_word=word, strength=1.0, embedding=emb)


def test_no_embedding_given_is_a_clear_error(sd15):
    with pytest.raises(ValueError, match="choose a file"):
        run_node(APPLY, clip=sd15["clip"], embedding_file=NO_FILE, trigger_word="", strength=1.0)


def test_is_changed_follows_the_file(sd15, embeddings_dir):
    name = _write({"clip_l": _random(1, 768, 10)}, embeddings_dir)
    cls = nodes.NODE_CLASS_MAPPINGS[APPLY]
    before = cls.IS_CHANGED(embedding_file=f"{name}.safetensors")
    ef.write_embedding(ef.EmbeddingFile({"clip_l": _random(1, 768, 11)}, "x"), embeddings_dir, name, overwrite=True)
    assert cls.IS_CHANGED(embedding_file=f"{name}.safetensors") != before


def test_file_is_in_the_dropdown(sd15, embeddings_dir):
    name = _write({"clip_l": _random(1, 768, 12)}, embeddings_dir)
    choices = nodes.NODE_CLASS_MAPPINGS[APPLY].INPUT_TYPES()["required"]["embedding_file"][0]
    assert f"{name}.safetensors" in choices


def test_sd2_embedding_round_trip(sd2, embeddings_dir):
    name = _write({"clip_h": _random(2, 1024, 13)}, embeddings_dir)
    clip, word = run_node(APPLY, clip=sd2["clip"], embedding_file=f"{name}.safetensors", trigger_word="", strength=1.0)
    assert torch.equal(_encode(clip, f"a {word} photo")[0], _encode(sd2["clip"], f"a embedding:{name} photo")[0])


def test_sdxl_applies_each_encoder_its_own_vectors(sdxl_clip, embeddings_dir):
    vectors_l, vectors_g = _random(2, 768, 14), _random(2, 1280, 15)
    name = _write({"clip_l": vectors_l, "clip_g": vectors_g}, embeddings_dir)
    clip, word = run_node(APPLY, clip=sdxl_clip, embedding_file=f"{name}.safetensors", trigger_word="", strength=1.0)
    spliced = _spliced_tensors(clip.tokenize(f"a photo of {word}"))
    assert [t.shape[-1] for t in spliced["l"]] == [768, 768] and torch.equal(torch.stack(spliced["l"]), vectors_l)
    assert [t.shape[-1] for t in spliced["g"]] == [1280, 1280] and torch.equal(torch.stack(spliced["g"]), vectors_g)
    ours, ours_pooled = _encode(clip, f"a photo of {word}")
    comfy, comfy_pooled = _encode(sdxl_clip, f"a photo of embedding:{name}")
    assert torch.equal(ours, comfy) and torch.equal(ours_pooled, comfy_pooled)


def test_sd15_embedding_on_sdxl_clip_names_both_widths(sdxl_clip):
    emb = ef.EmbeddingFile({"clip_l": _random(1, 768, 16)}, "<x>")
    with pytest.raises(ValueError, match=r"clip_l 768.*clip_l 768, clip_g 1280"):
        run_node(APPLY, clip=sdxl_clip, embedding_file=NO_FILE, trigger_word="", strength=1.0, embedding=emb)
