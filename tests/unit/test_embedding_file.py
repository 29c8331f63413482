"""Embedding files: every format read, ours written, nothing unsafe executed or overwritten."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from core_package import core

ef = core("embedding_file")
files = core("files")


def _vectors(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def test_reads_a1111_pt(tmp_path):
    vec = _vectors(3, 768).requires_grad_()  # A1111 saves the trained tensor as it is
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vec},
            "name": "my-style",
            "step": 1500,
            "sd_checkpoint": "abc",
            "sd_checkpoint_name": "v1-5-pruned",
        },
        tmp_path / "x.pt",
    )
    emb = ef.read_embedding(tmp_path / "x.pt")
    assert emb.name == "my-style"
    assert torch.equal(emb.vectors["clip_l"], vec.detach())
    assert emb.metadata["steps"] == "1500" and emb.metadata["base_model"] == "v1-5-pruned"
    assert emb.model_family == "SD1.x"


def test_reads_a1111_safetensors(tmp_path):
    vec = _vectors(2, 1024)
    safetensors.torch.save_file({"emb_params": vec}, str(tmp_path / "sd2-thing.safetensors"))
    emb = ef.read_embedding(tmp_path / "sd2-thing.safetensors")
    assert emb.name == "sd2-thing" and emb.model_family == "SD2.x"
    assert torch.equal(emb.vectors["clip_h"], vec)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_reads_diffusers_learned_embeds(tmp_path, suffix):
    vec = _vectors(1, 768)[0]  # diffusers stores a single vector as [768]
    path = tmp_path / f"learned_embeds{suffix}"
    if suffix == ".bin":
        torch.save({"<cat-toy>": vec}, path)
    else:
        safetensors.torch.save_file({"<cat-toy>": vec}, str(path))
    emb = ef.read_embedding(path)
    assert emb.name == "<cat-toy>"
    assert emb.num_vectors == 1 and torch.equal(emb.vectors["clip_l"][0], vec)


def test_reads_sdxl(tmp_path):
    vectors_l, vectors_g = _vectors(4, 768, 1), _vectors(4, 1280, 2)
    safetensors.torch.save_file({"clip_l": vectors_l, "clip_g": vectors_g}, str(tmp_path / "xl.safetensors"))
    emb = ef.read_embedding(tmp_path / "xl.safetensors")
    assert emb.model_family == "SDXL" and emb.widths == {"clip_l": 768, "clip_g": 1280}
    assert torch.equal(emb.vectors["clip_l"], vectors_l) and torch.equal(emb.vectors["clip_g"], vectors_g)


def test_reads_bare_multi_vector_tensor(tmp_path):
    vec = _vectors(5, 768)
    torch.save(vec, tmp_path / "bare.pt")
    emb = ef.read_embedding(tmp_path / "bare.pt")
    assert emb.num_vectors == 5 and torch.equal(emb.vectors["clip_l"], vec)


def test_sdxl_with_unequal_vector_counts_is_refused(tmp_path):
    safetensors.torch.save_file({"clip_l": _vectors(2, 768), "clip_g": _vectors(3, 1280)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ef.EmbeddingFormatError, match="same number of vectors"):
        ef.read_embedding(tmp_path / "bad.safetensors")


def test_lora_like_file_is_refused_with_reason(tmp_path):
    safetensors.torch.save_file({"a.lora_up.weight": _vectors(4, 4), "a.lora_down.weight": _vectors(4, 4)}, str(tmp_path / "l.safetensors"))
    with pytest.raises(ef.EmbeddingFormatError, match="LoRA or a checkpoint"):
        ef.read_embedding(tmp_path / "l.safetensors")


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"string_to_param": {"*": _Exploit(marker)}}, path)
    with pytest.raises(ef.EmbeddingFormatError, match="never executed"):
        ef.read_embedding(path)
    assert not marker.exists()


def test_safetensors_round_trip_with_metadata(tmp_path):
    emb = ef.EmbeddingFile(vectors={"clip_l": _vectors(2, 768)}, name="<my-cat>")
    settings = {"learning_rate": 0.005, "templates": "object"}
    path = ef.write_embedding(emb, tmp_path, "my-cat", base_model="tiny-sd15", steps=300, training_settings=settings)
    assert path == tmp_path / "my-cat.safetensors"
    raw = safetensors.torch.load_file(str(path))
    assert list(raw) == ["emb_params"]  # A1111's key: readable by A1111, ComfyUI and us
    back = ef.read_embedding(path)
    assert back.name == "<my-cat>"
    assert torch.equal(back.vectors["clip_l"], emb.vectors["clip_l"])
    md = back.metadata
    assert md["trigger_word"] == "<my-cat>" and md["num_vectors"] == "2" and md["steps"] == "300"
    assert md["base_model"] == "tiny-sd15" and json.loads(md["training_settings"]) == settings
    assert md["vectors_sha256"] == emb.vectors_sha256() != ef.EmbeddingFile({"clip_l": _vectors(2, 768, 9)}, "x").vectors_sha256()


def test_sdxl_written_under_encoder_keys(tmp_path):
    emb = ef.EmbeddingFile(vectors={"clip_l": _vectors(1, 768), "clip_g": _vectors(1, 1280)}, name="xl")
    path = ef.write_embedding(emb, tmp_path, "xl")
    assert sorted(safetensors.torch.load_file(str(path))) == ["clip_g", "clip_l"]


def test_pt_is_a1111_compatible(tmp_path):
    emb = ef.EmbeddingFile(vectors={"clip_l": _vectors(3, 768)}, name="<thing>")
    path = ef.write_embedding(emb, tmp_path, "thing", file_format="pt", steps=42)
    raw = torch.load(path, weights_only=True)
    assert raw["name"] == "<thing>" and raw["step"] == 42
    assert torch.equal(raw["string_to_param"]["*"], emb.vectors["clip_l"])
    assert torch.equal(ef.read_embedding(path).vectors["clip_l"], emb.vectors["clip_l"])


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/tmp/absolute", "..", ""])
def test_names_that_leave_the_folder_are_refused(tmp_path, name):
    inner = tmp_path / "embeddings"
    inner.mkdir()
    emb = ef.EmbeddingFile(vectors={"clip_l": _vectors(1, 768)}, name="x")
    with pytest.raises(ValueError):
        ef.write_embedding(emb, inner, name)
    assert [p.name for p in tmp_path.iterdir()] == ["embeddings"]
    assert list(inner.iterdir()) == []


def test_subfolder_inside_is_allowed(tmp_path):
    emb = ef.EmbeddingFile(vectors={"clip_l": _vectors(1, 768)}, name="x")
    assert ef.write_embedding(emb, tmp_path, "styles/x").parent == tmp_path / "styles"


def test_no_overwrite_unless_asked(tmp_path):
    first = ef.EmbeddingFile(vectors={"clip_l": _vectors(1, 768, 1)}, name="x")
    second = ef.EmbeddingFile(vectors={"clip_l": _vectors(1, 768, 2)}, name="x")
    path = ef.write_embedding(first, tmp_path, "x")
    with pytest.raises(FileExistsError, match="already exists"):
        ef.write_embedding(second, tmp_path, "x")
    assert torch.equal(ef.read_embedding(path).vectors["clip_l"], first.vectors["clip_l"])
    ef.write_embedding(second, tmp_path, "x", overwrite=True)
    assert torch.equal(ef.read_embedding(path).vectors["clip_l"], second.vectors["clip_l"])


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")

    def failing(temp: Path) -> None:
        temp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(target, failing, overwrite=True)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_width_mismatch_names_both_widths():
    sd15 = ef.EmbeddingFile(vectors={"clip_l": _vectors(1, 768)}, name="x")
    with pytest.raises(ef.EmbeddingMismatchError, match=r"clip_l 768.*clip_l 768, clip_g 1280"):
        ef.vectors_for_encoders(sd15, {"clip_l": 768, "clip_g": 1280})
    sd2 = ef.EmbeddingFile(vectors={"clip_h": _vectors(1, 1024)}, name="y")
    with pytest.raises(ef.EmbeddingMismatchError, match=r"clip_h 1024.*clip_l 768"):
        ef.vectors_for_encoders(sd2, {"clip_l": 768})
    xl = ef.EmbeddingFile(vectors={"clip_l": _vectors(1, 768), "clip_g": _vectors(1, 1280)}, name="z")
    assert set(ef.vectors_for_encoders(xl, {"clip_g": 1280})) == {"clip_g"}  # the SDXL refiner has clip_g only


# --------------------------------------------------------------------------- bad vectors, and the paper's own files


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_vectors_are_refused_when_read_and_never_written(tmp_path, bad):
    vectors = _vectors(2, 768)
    vectors[1, 5] = bad
    safetensors.torch.save_file({"emb_params": vectors}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ef.EmbeddingFormatError, match=r"broken\.safetensors refused.*NaN or infinite"):
        ef.read_embedding(tmp_path / "broken.safetensors")
    torch.save({"string_to_param": {"*": vectors}}, tmp_path / "broken.pt")
    with pytest.raises(ef.EmbeddingFormatError, match="NaN or infinite"):
        ef.read_embedding(tmp_path / "broken.pt")
    with pytest.raises(ef.EmbeddingFormatError, match="NaN or infinite"):
        ef.EmbeddingFile({"clip_l": vectors}, "x")  # so no writer can be handed one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt", "broken.safetensors"]


def test_reads_the_textual_inversion_papers_parameterdict_without_running_code(tmp_path):
    # The paper's code (rinongal/textual_inversion) saves string_to_param as a torch.nn.ParameterDict.
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(_vectors(2, 768))})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "paper.pt")
    emb = ef.read_embedding(tmp_path / "paper.pt")
    assert torch.equal(emb.vectors["clip_l"], params["*"].detach()) and emb.num_vectors == 2
