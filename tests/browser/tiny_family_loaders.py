"""Test-only ComfyUI custom node: the tiny Flux.1 / Chroma / SD3 families through ComfyUI's own loader nodes.

tests/tiny_families.py builds small random models of these families, and loads them in-process
with two adjustments ComfyUI needs for their sizes: detection overrides (``tiny_detection``:
Flux/Chroma hidden size, heads and context width are hard-coded in v0.3.64's detection) and the
text encoders' sizes in ``model_options`` (``FamilySpec.te_model_options``: the tiny T5, SD3's
narrow CLIP-L/G). A ComfyUI *server* runs its loader nodes in its own process, so these
adjustments must be made there: this file is that, as a custom node package.

test_example_workflows.py copies it to ``BASE/custom_nodes/personalize_tiny_families/__init__.py``
of a throw-away base directory (never into the ComfyUI checkout), next to ``config.json``::

    {"tests_dir": ".../tests", "model_cache": ".../tiny-models", "families": ["flux-dev", "sd35"]}

At import (ComfyUI's start) it builds or finds the families' files with
``tiny_families.family_files``, writes ``files.json`` next to itself (per family: the diffusion
model, the text encoders and the VAE, each with its path, and the sha256 of the first two), and
wraps ``comfy.sd.load_diffusion_model`` (UNETLoader) and ``comfy.sd.load_clip`` (CLIPLoader,
DualCLIPLoader, TripleCLIPLoader). The wrappers act ONLY on those files, recognised by content
(size, then sha256), whatever name they are linked under:

* a diffusion model whose digest is a family's loads under ``tiny_families.tiny_detection``;
* a text-encoder load whose files are exactly a family's encoders gets the family's
  ``te_model_options`` (the caller's own options kept on top), under ``tiny_detection`` too;

every other call goes to ComfyUI's function untouched. The loader nodes' own arguments (the
CLIP type, weight dtype, device) are passed through as given. Each wrapped load is logged
(``personalize tests: tiny ...``), so a test can check that the adjustment was used.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import sys
from pathlib import Path

NODE_CLASS_MAPPINGS: dict = {}  # no nodes: ComfyUI loads the package for its import side effect
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

HERE = Path(__file__).resolve().parent
log = logging.getLogger("personalize_tiny_families")
_digests: dict[tuple[str, int, int], str] = {}


def _sha256(path: str | os.PathLike) -> str:
    """The file's sha256, cached by its real path, size and mtime."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()
    return _digests[key]


class TinyFiles:
    """The families' files by content: which family a diffusion model or a set of encoders is."""

    def __init__(self, files: dict[str, dict]):
        self.diffusion_models = {entry["diffusion_model"]["sha256"]: family for family, entry in files.items()}
        self.encoder_sets = {frozenset(e["sha256"] for e in entry["text_encoders"]): family for family, entry in files.items()}
        self.sizes = {os.path.getsize(entry["diffusion_model"]["path"]) for entry in files.values()}
        self.sizes |= {os.path.getsize(e["path"]) for entry in files.values() for e in entry["text_encoders"]}

    def _digest(self, path) -> str | None:
        """sha256 of a file whose size is one of ours (others are not read); None otherwise."""
        try:
            if os.path.getsize(path) not in self.sizes:
                return None
            return _sha256(path)
        except OSError:
            return None

    def diffusion_model_family(self, path) -> str | None:
        return self.diffusion_models.get(self._digest(path))

    def encoders_family(self, paths) -> str | None:
        digests = [self._digest(p) for p in paths]
        if not digests or None in digests:
            return None
        return self.encoder_sets.get(frozenset(digests))


def _family_files(tiny_families, families: list[str], cache_dir: str) -> dict[str, dict]:
    out = {}
    for name in families:
        files = tiny_families.family_files(name, cache_dir)
        spec = tiny_families.family_spec(name)
        out[name] = {
            "diffusion_model": {"path": str(files.diffusion_model), "sha256": _sha256(files.diffusion_model)},
            "text_encoders": [
                {"key": key, "path": str(path), "sha256": _sha256(path)}
                for key, path in zip(spec.encoders, files.text_encoders, strict=True)
            ],
            "vae": {"path": str(files.vae)},
        }
    return out


def install(config_path: Path) -> dict[str, dict]:
    """Build or find the files, write files.json, wrap ComfyUI's two loader functions."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config["tests_dir"] not in sys.path:
        sys.path.append(config["tests_dir"])  # appended: nothing of ComfyUI's is shadowed
    import comfy.sd
    import tiny_families

    files = _family_files(tiny_families, list(config["families"]), config["model_cache"])
    (config_path.parent / "files.json").write_text(json.dumps(files, indent=1), encoding="utf-8")
    tiny = TinyFiles(files)
    original_load_diffusion_model = comfy.sd.load_diffusion_model
    original_load_clip = comfy.sd.load_clip
    clip_signature = inspect.signature(original_load_clip)

    def load_diffusion_model(unet_path, *args, **kwargs):
        family = tiny.diffusion_model_family(unet_path)
        if family is None:
            return original_load_diffusion_model(unet_path, *args, **kwargs)
        with tiny_families.tiny_detection(family) as restored:
            model = original_load_diffusion_model(unet_path, *args, **kwargs)
        log.info("personalize tests: tiny %s diffusion model %s (detection restored: %s)", family, unet_path, restored or "nothing")
        return model

    def load_clip(*args, **kwargs):
        bound = clip_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        family = tiny.encoders_family(bound.arguments["ckpt_paths"])
        if family is None:
            return original_load_clip(*args, **kwargs)
        options = tiny_families.family_spec(family).te_model_options
        bound.arguments["model_options"] = {**options, **(bound.arguments["model_options"] or {})}
        with tiny_families.tiny_detection(family):
            clip = original_load_clip(*bound.args, **bound.kwargs)
        log.info("personalize tests: tiny %s text encoders %s (model_options %s)", family, list(bound.arguments["ckpt_paths"]), options)
        return clip

    # Module attributes: the loader nodes call comfy.sd.<name>(...), and v0.28's reload hooks
    # (cached_patcher_init) name these functions through comfy.sd's globals, i.e. these too.
    comfy.sd.load_diffusion_model = load_diffusion_model
    comfy.sd.load_clip = load_clip
    log.info("personalize tests: tiny families %s loadable by ComfyUI's loader nodes", ", ".join(files))
    return files


if (HERE / "config.json").is_file():  # installed as a custom node; a plain import does nothing
    install(HERE / "config.json")
