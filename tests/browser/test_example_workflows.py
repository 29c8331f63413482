"""The example workflows (example_workflows/*.json) in the real front end, end to end.

For each example: fetch it the way ComfyUI's template browser does (/api/workflow_templates),
load it as drag-and-drop does (app.loadGraphData), check that nothing is missing or invalid,
then switch it to tiny settings through the page (widgets set BY NAME: the tiny random-weight
SD1.5 checkpoint, a folder of three 64×64 images, resolution 64, 2 steps, ...), queue it, wait
for the run and check the files it wrote and the outputs ComfyUI reports.

The Flux.1-dev and SD3.5 examples run the same way on a second fresh server (fixture
``family_comfy``) whose base directory also holds tiny_family_loaders.py as a custom node: the
tiny random families of tests/tiny_families.py, linked under the examples' placeholder names
(flux1-dev.safetensors, clip_l.safetensors, ...), load through ComfyUI's own loader nodes there.

Regenerate the examples with tests/browser/make_example_workflows.py when inputs change.
The helpers here are reused by test_training_progress_live.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from comfy_process import ARTIFACTS_DIR, PACK_DIR, PACK_NAME, ComfyServer, make_base_dir

EXAMPLES_DIR = PACK_DIR / "example_workflows"
EXAMPLES = [
    "textual_inversion",
    "apply_embedding",
    "dreambooth_prior_preservation",
    "dreambooth_lora_pivotal",
    "dreambooth_flux_lora",
    "dreambooth_sd35_lora",
]
PLACEHOLDER_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # the name the examples carry
# The model files each example's loaders name, as saved (node type -> its first widgets_values),
# and what the note calls each loader.
_SD15 = {"CheckpointLoaderSimple": [PLACEHOLDER_CHECKPOINT]}
PLACEHOLDERS = {
    "textual_inversion": _SD15,
    "apply_embedding": _SD15,
    "dreambooth_prior_preservation": _SD15,
    "dreambooth_lora_pivotal": _SD15,
    "dreambooth_flux_lora": {
        "UNETLoader": ["flux1-dev.safetensors", "default"],
        "DualCLIPLoader": ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux"],
        "VAELoader": ["ae.safetensors"],
    },
    "dreambooth_sd35_lora": {
        "CheckpointLoaderSimple": ["sd3.5_medium.safetensors"],
        "TripleCLIPLoader": ["clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"],
    },
}
LOADER_NAMES = {
    "CheckpointLoaderSimple": "Load Checkpoint",
    "UNETLoader": "Load Diffusion Model",
    "DualCLIPLoader": "DualCLIPLoader",
    "TripleCLIPLoader": "TripleCLIPLoader",
    "VAELoader": "Load VAE",
}
IMAGES_FOLDER = "e2e-subject"  # under the test server's input/
FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
TITLE_HEIGHT = 30


# Tiny settings, by node type and widget name, applied to every node of that type.
def tiny_settings(checkpoint: str) -> dict[str, dict]:
    return {
        "CheckpointLoaderSimple": {"ckpt_name": checkpoint},
        "PersonalizeImageFolder": {"folder": IMAGES_FOLDER, "path": ""},
        # preview_every 0: a preview is a 20-step sampling run, too slow on a CPU for this test
        "PersonalizeTrainTextualInversion": {"resolution": 64, "steps": 2, "preview_every": 0, "save_every": 0},
        "PersonalizeDreamBoothFinetune": {
            "resolution": 64,
            "steps": 2,
            "num_class_images": 2,
            "class_steps": 2,
            "lora_rank": 2,
            "lora_alpha": 2.0,
            "save_every": 0,
            "preview_every": 0,
        },
        "KSampler": {"steps": 2},
        "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
    }


# --------------------------------------------------------------------------------- helpers
def tiny_checkpoint() -> Path:
    sys.path.insert(0, str(PACK_DIR / "tests"))
    import comfyui_runtime

    return comfyui_runtime.tiny_checkpoint("sd15")


def _link(target: Path, source: Path) -> None:
    if not target.exists() and not target.is_symlink():
        target.symlink_to(source)


def install_test_files(base_dir: Path | str) -> dict:
    """Into the server's base dir: the tiny checkpoint (under its own name and under the
    examples' placeholder name), and input/e2e-subject with 3 small images and captions.
    Idempotent: both test files call it on the shared server."""
    base = Path(base_dir)
    tiny = tiny_checkpoint()
    checkpoints = base / "models" / "checkpoints"
    _link(checkpoints / tiny.name, tiny)
    _link(checkpoints / PLACEHOLDER_CHECKPOINT, tiny)
    return {"checkpoint": tiny.name, "images": install_images(base)}


def install_images(base_dir: Path | str) -> Path:
    """input/e2e-subject in the server's base dir: 3 small images with captions (idempotent)."""
    folder = Path(base_dir) / "input" / IMAGES_FOLDER
    if not folder.is_dir():
        from PIL import Image, ImageDraw

        folder.mkdir(parents=True)
        for i, (color, shape) in enumerate([("#c0392b", "square"), ("#2980b9", "circle"), ("#27ae60", "triangle")]):
            image = Image.new("RGB", (64, 64), (235, 230, 220))
            draw = ImageDraw.Draw(image)
            if shape == "square":
                draw.rectangle([14, 14, 50, 50], fill=color)
            elif shape == "circle":
                draw.ellipse([12, 12, 52, 52], fill=color)
            else:
                draw.polygon([(32, 8), (56, 54), (8, 54)], fill=color)
            image.save(folder / f"{i:02d}.png")
            (folder / f"{i:02d}.txt").write_text(f"a {shape} toy on a plain background")
    return folder


def refresh_combos(browser) -> None:
    """What pressing R does: fetch /object_info again (new files in the combo lists)."""
    browser.exec("await app.refreshComboInNodes();")


def example(name: str) -> dict:
    return json.loads((EXAMPLES_DIR / f"{name}.json").read_text(encoding="utf-8"))


def load_workflow(browser, workflow: dict, name: str) -> dict:
    """app.loadGraphData as drag-and-drop does; the graph must load with nothing missing or invalid."""
    browser.close_dialogs()
    loaded = browser.load(workflow, name=f"{name}.json")
    assert loaded["loadError"] is None, loaded["loadError"]
    assert loaded["missingNodeTypes"] == [], loaded
    assert loaded["missingNodesDialog"] is None, loaded
    assert loaded["invalidWidgets"] == [], loaded["invalidWidgets"]
    assert loaded["dialogs"] == [], loaded["dialogs"]
    assert [t for t in loaded["toasts"] if "error" in t["severity"] or "warn" in t["severity"]] == [], loaded["toasts"]
    assert loaded["ok"], loaded
    return loaded


# Runs in the page: set widgets by node type and widget name; returns what was set per node id.
SET_WIDGETS_JS = r"""
const changed = {}, problems = [];
for (const node of app.graph.nodes) {
  const settings = arg[node.type];
  if (!settings) continue;
  for (const [name, value] of Object.entries(settings)) {
    const w = node.widgets?.find((w) => w.name === name);
    if (!w) { problems.push(`${node.type} #${node.id} has no widget '${name}'`); continue; }
    const values = w.options?.values;
    if (Array.isArray(values) && !values.includes(value)) {
      problems.push(`${node.type} #${node.id}: '${value}' is not a choice of ${name} (${values.slice(0, 10)})`);
      continue;
    }
    w.value = value;
    w.callback?.(w.value, app.canvas, node);
    (changed[node.id] ??= {})[name] = w.value;
  }
}
if (problems.length) throw new Error(problems.join("\n"));
app.graph.setDirtyCanvas(true, true);
return changed;
"""


def set_widgets(browser, settings: dict[str, dict]) -> dict:
    """Set widget values by node type and widget name, in the page; check that the prompt
    ComfyUI will queue carries them (the widget -> input mapping is by name)."""
    changed = browser.exec(SET_WIDGETS_JS, arg=settings)
    prompt = browser.eval("app.graphToPrompt().then((p) => p.output)")
    for node_id, values in changed.items():
        inputs = prompt[str(node_id)]["inputs"]
        for name, value in values.items():
            assert inputs[name] == value, (node_id, name, inputs)
    return changed


def node_ids(browser, node_type: str) -> list[int]:
    return browser.eval("app.graph.nodes.filter((n) => n.type === arg).map((n) => n.id)", arg=node_type)


def output_files(base_dir: Path, outputs: dict, node_id) -> list[Path]:
    """The image files a Save/Preview Image node reported in /history."""
    images = (outputs or {}).get(str(node_id), {}).get("images", [])
    folders = {"output": "output", "temp": "temp", "input": "input"}
    return [Path(base_dir) / folders[i["type"]] / i.get("subfolder", "") / i["filename"] for i in images]


def executing_node(event: dict) -> str | None:
    """The node id of an "executing" event (the front end passes the id, older ones a dict)."""
    detail = event.get("detail")
    if isinstance(detail, dict):
        detail = detail.get("node")
    return None if detail is None else str(detail)


def assert_progress_done(browser, node_id, kind: str, steps: int = 2) -> None:
    """The node's live progress widget (web/personalize_progress.js) shows the finished run."""
    widget = browser.wait(
        "(() => { const w = app.graph.getNodeById(arg).widgets.find((w) => w.name === 'personalize_progress');"
        " return w && w.element.dataset.status === 'done' && { ...w.element.dataset }; })()",
        arg=node_id,
        timeout=10,
    )
    assert widget["kind"] == kind and widget["step"] == widget["total"] == str(steps), widget


def read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (safe_open is no mapping)


def assert_success(result: dict) -> None:
    assert result["status"] == "success", json.dumps(
        {k: result.get(k) for k in ("status", "detail", "node_errors", "error", "history_status")}, indent=1
    )[:6000]


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def e2e(comfy_server, browser):
    files = install_test_files(comfy_server.base_dir)
    refresh_combos(browser)
    return {**files, "base": Path(comfy_server.base_dir), "settings": tiny_settings(files["checkpoint"])}


def _prepare(browser, comfy_server, e2e, name: str, extra: dict | None = None) -> dict:
    """Fetch the example as the template browser does, load it, check it, set tiny settings."""
    listed = comfy_server.get_json("/api/workflow_templates")
    assert name in listed.get(PACK_NAME, []), listed
    workflow = comfy_server.get_json(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
    assert workflow == example(name)
    errors_before = len(browser.errors()["pageErrors"])
    loaded = load_workflow(browser, workflow, name)
    assert sorted(n["id"] for n in loaded["nodes"]) == sorted(n["id"] for n in workflow["nodes"])
    # Loading kept every saved widget value where it was (no shifted or dropped widget).
    saved = browser.eval("app.graph.serialize().nodes.map((n) => [n.id, n.widgets_values ?? []])")
    assert dict(map(tuple, saved)) == {n["id"]: n.get("widgets_values") or [] for n in workflow["nodes"]}
    settings = {t: dict(v) for t, v in e2e["settings"].items()}
    for node_type, values in (extra or {}).items():
        settings.setdefault(node_type, {}).update(values)
    changed = set_widgets(browser, settings)
    assert browser.errors()["pageErrors"][errors_before:] == []
    return {"workflow": workflow, "changed": changed}


def _queue(browser, timeout: float) -> dict:
    t0 = time.monotonic()
    result = browser.queue(timeout=timeout)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    print(f"run took {result['wall_s']} s")
    assert_success(result)
    assert not result.get("node_errors")
    types = [e["type"] for e in result["events"]]
    assert "execution_error" not in types and "execution_interrupted" not in types
    return result


def _images(e2e, result, node_id, count=1, size=(64, 64)) -> list[Path]:
    from PIL import Image

    files = output_files(e2e["base"], result["outputs"], node_id)
    assert len(files) == count, result["outputs"].get(str(node_id))
    for f in files:
        assert f.is_file(), f
        with Image.open(f) as im:
            assert im.size == size if size else im.size[0] > 64, (f, im.size)
    return files


def _only(ids: list[int]) -> int:
    assert len(ids) == 1, ids
    return ids[0]


# ----------------------------------------------------------------------------------- static
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_file_is_a_tidy_ui_workflow(name, comfy_server):
    """UI format, core + pack nodes only, a note, left-to-right links, no overlapping nodes."""
    wf = example(name)
    assert wf.get("version") == 0.4 and isinstance(wf.get("links"), list) and isinstance(wf.get("nodes"), list)
    known = comfy_server.node_types()
    types = {n["type"] for n in wf["nodes"]}
    for t in types:
        assert t in FRONTEND_ONLY_TYPES or t in known, f"{t} is not a node type of ComfyUI or this pack"
    pack_types = {t for t in types if t.startswith("Personalize")}
    assert pack_types, "the example uses none of the pack's nodes"
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and len(notes[0]["widgets_values"][0]) > 300
    text = notes[0]["widgets_values"][0]
    assert "You get" in text
    for loader in PLACEHOLDERS[name]:
        assert LOADER_NAMES[loader] in text, f"the note does not say what to set in {LOADER_NAMES[loader]}"

    nodes = {n["id"]: n for n in wf["nodes"]}
    boxes = {i: (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["size"][0], n["size"][1] + TITLE_HEIGHT) for i, n in nodes.items()}
    ids = sorted(boxes)
    for a_i, a in enumerate(ids):
        for b in ids[a_i + 1 :]:
            ax, ay, aw, ah = boxes[a]
            bx, by, bw, bh = boxes[b]
            overlap = ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
            assert not overlap, (nodes[a]["type"], nodes[b]["type"])
    for link_id, src, _src_slot, dst, _dst_slot, _type in wf["links"]:
        a, b = nodes[src]["pos"], nodes[dst]["pos"]
        left_to_right = a[0] + nodes[src]["size"][0] < b[0]
        down_a_column = a[0] == b[0] and a[1] < b[1]
        assert left_to_right or down_a_column, f"link {link_id} goes backwards"
    # the model files and images are realistic placeholders the user replaces
    for loader, values in PLACEHOLDERS[name].items():
        [node] = [n for n in wf["nodes"] if n["type"] == loader]
        assert node["widgets_values"][: len(values)] == values, (loader, node["widgets_values"])
    for folder in (n for n in wf["nodes"] if n["type"] == "PersonalizeImageFolder"):
        assert folder["widgets_values"][:2] == ["(none: use the path)", "my-subject"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_file_is_what_the_generator_builds(name, browser):
    """The file equals a fresh build by make_example_workflows.py in this front end: when a
    node's inputs change, old widgets_values would land in the wrong widgets, so regenerate."""
    import make_example_workflows

    browser.close_dialogs()
    built, _unlisted = make_example_workflows.build(browser, name)
    assert _comparable(built) == _comparable(example(name)), (
        f"example_workflows/{name}.json is out of date: run python tests/browser/make_example_workflows.py"
    )


def _comparable(workflow: dict) -> dict:
    """A workflow as what it means: ComfyUI versions differ in the unconnected outputs their core
    nodes declare (SaveImage has an 'images' output since v0.2x) and in the type a link to a
    core node's "*" input records (PreviewAny's is STRING since v0.2x); loading ignores both."""
    out = json.loads(json.dumps(workflow))
    for node in out["nodes"]:
        node["outputs"] = [o for o in node.get("outputs", []) if o.get("links")]
    out["links"] = [link[:5] for link in out["links"]]
    return out


# ------------------------------------------------------------------------------- end to end
def test_textual_inversion_example(browser, comfy_server, e2e):
    _prepare(browser, comfy_server, e2e, "textual_inversion")
    train = _only(node_ids(browser, "PersonalizeTrainTextualInversion"))
    result = _queue(browser, timeout=480)
    base = e2e["base"]

    # the embedding, named after the trigger word (what apply_embedding.json expects)
    path = base / "models" / "embeddings" / "my-subject.safetensors"
    assert path.is_file()
    tensors, _metadata = read_safetensors(path)
    assert list(tensors) == ["emb_params"] and tuple(tensors["emb_params"].shape) == (1, 768)
    assert all(math.isfinite(float(v)) for v in tensors["emb_params"].flatten()[:50])
    # the render with the trained CLIP, and the loss curve
    save = _only(node_ids(browser, "SaveImage"))
    [image] = _images(e2e, result, save)
    assert image.parent == base / "output" / "textual_inversion" and image.name.startswith("my-subject")
    loss = _only(node_ids(browser, "PreviewImage"))
    [curve] = _images(e2e, result, loss, size=None)
    assert curve.parent.parent == base / "temp" or curve.parent == base / "temp"
    # the training node ran and showed its progress (steps 2 of 2, done)
    executed = {executing_node(e) for e in result["events"] if e["type"] == "executing"}
    assert str(train) in executed
    assert_progress_done(browser, train, "textual_inversion")
    previews = [e for e in result["events"] if e["type"] == "progress" and str(e["detail"].get("node")) == str(train)]
    assert previews and previews[-1]["detail"]["value"] == 2 and previews[-1]["detail"]["max"] == 2


def test_apply_embedding_example(browser, comfy_server, e2e):
    """Runs on a fresh install after README's steps: the textual_inversion example wrote the file."""
    base = e2e["base"]
    subject = base / "models" / "embeddings" / "my-subject.safetensors"
    if not subject.exists():  # this test alone: train the file the way README says, with the example
        test_textual_inversion_example(browser, comfy_server, e2e)
    refresh_combos(browser)  # the new file in the embedding_file lists
    _prepare(browser, comfy_server, e2e, "apply_embedding")
    applied = _only(node_ids(browser, "PersonalizeApplyEmbedding"))
    result = _queue(browser, timeout=300)
    save = _only(node_ids(browser, "SaveImage"))
    [image] = _images(e2e, result, save)
    assert image.parent == base / "output" / "apply_embedding" and image.name.startswith("my-subject")
    # both prompts were encoded with the CLIP that knows the word, and the positive one uses it
    prompt = browser.eval("app.graphToPrompt().then((p) => p.output)")
    assert prompt[str(applied)]["inputs"]["trigger_word"] == "<my-subject>"
    encoders = [i for i, n in prompt.items() if n["class_type"] == "CLIPTextEncode"]
    assert any("<my-subject>" in prompt[i]["inputs"]["text"] for i in encoders)
    assert all(prompt[i]["inputs"]["clip"][0] == str(applied) for i in encoders)


def _dreambooth_status(result, browser) -> str:
    node = _only(node_ids(browser, "PreviewAny"))
    text = result["outputs"][str(node)]["text"]
    return "\n".join(text if isinstance(text, list) else [text])


def test_dreambooth_prior_preservation_example(browser, comfy_server, e2e):
    _prepare(browser, comfy_server, e2e, "dreambooth_prior_preservation")
    result = _queue(browser, timeout=600)
    assert_progress_done(browser, _only(node_ids(browser, "PersonalizeDreamBoothFinetune")), "dreambooth")
    base = e2e["base"]
    checkpoint = base / "models" / "checkpoints" / "dreambooth-sks.safetensors"
    assert checkpoint.is_file() and checkpoint.stat().st_size > 1_000_000
    tensors, _ = read_safetensors(checkpoint)
    assert any(k.startswith("model.diffusion_model.") for k in tensors)
    status = _dreambooth_status(result, browser)
    assert "identifier 'sks'" in status and "prior preservation with 2 class images" in status, status
    assert "saved checkpoint" in status and "saved embedding" not in status, status
    [image] = _images(e2e, result, _only(node_ids(browser, "SaveImage")))
    assert image.parent == base / "output" / "dreambooth" and image.name.startswith("sks-dog")
    _images(e2e, result, _only(node_ids(browser, "PreviewImage")), size=None)


def test_dreambooth_lora_pivotal_example(browser, comfy_server, e2e):
    _prepare(browser, comfy_server, e2e, "dreambooth_lora_pivotal")
    result = _queue(browser, timeout=600)
    assert_progress_done(browser, _only(node_ids(browser, "PersonalizeDreamBoothFinetune")), "dreambooth")
    base = e2e["base"]
    lora = base / "models" / "loras" / "dreambooth-sks.safetensors"
    assert lora.is_file()
    tensors, metadata = read_safetensors(lora)
    downs = {k: t for k, t in tensors.items() if k.endswith(".lora_down.weight")}
    shapes = {k: tuple(t.shape) for k, t in list(tensors.items())[:6]}
    assert downs and all(t.shape[0] == 2 for t in downs.values()), shapes
    assert metadata.get("ss_network_dim") == "2"
    vector = base / "models" / "embeddings" / "dreambooth-sks.safetensors"
    tensors, metadata = read_safetensors(vector)
    assert tuple(tensors["emb_params"].shape) == (1, 768) and metadata.get("trigger_word") == "sks", metadata
    status = _dreambooth_status(result, browser)
    assert "identifier 'sks'" in status and "saved lora" in status and "saved embedding" in status, status
    [image] = _images(e2e, result, _only(node_ids(browser, "SaveImage")))
    assert image.parent == base / "output" / "dreambooth" and image.name.startswith("sks-dog-lora")
    _images(e2e, result, _only(node_ids(browser, "PreviewImage")), size=None)


# ------------------------------------------------------------ Flux.1-dev and SD3.5, end to end
TINY_FAMILIES_NODE = "personalize_tiny_families"  # tiny_family_loaders.py, as a custom node
FAMILIES = {"dreambooth_flux_lora": "flux-dev", "dreambooth_sd35_lora": "sd35"}


def family_tiny_settings() -> dict[str, dict]:
    """Tiny settings for the family examples: the class sampling stays at the node's values, so
    the family's own (Flux.1-dev 20 steps, SD3.5 28 at cfg 4.5: cheap at 64 px) is what runs."""
    return {
        "PersonalizeImageFolder": {"folder": IMAGES_FOLDER, "path": ""},
        "PersonalizeDreamBoothFinetune": {
            "resolution": 64,
            "steps": 2,
            "num_class_images": 1,
            "lora_rank": 2,
            "lora_alpha": 2.0,
            "save_every": 0,
            "preview_every": 0,
        },
        "KSampler": {"steps": 2},
        "EmptySD3LatentImage": {"width": 64, "height": 64, "batch_size": 1},
    }


def _relink(target: Path, source: Path) -> None:
    """target -> source, replacing what was there (clip_l.safetensors differs between families)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(source)


def _sd35_checkpoint(files: dict) -> Path:
    """An SD3.5 checkpoint as Stability ships it (MMDiT under model.diffusion_model., VAE under
    first_stage_model., no text encoders) from the tiny family's files; cached beside them."""
    from comfyui_runtime import MODEL_CACHE
    from safetensors.torch import load_file, save_file

    dit, vae = Path(files["diffusion_model"]["path"]), Path(files["vae"]["path"])
    tag = hashlib.sha256(f"{dit.name}+{vae.name}".encode()).hexdigest()[:8]
    path = Path(MODEL_CACHE) / f"tiny-family-checkpoint-sd35-{tag}.safetensors"
    if not path.is_file():
        state = {f"model.diffusion_model.{k}": v for k, v in load_file(str(dit)).items()}
        state.update({f"first_stage_model.{k}": v for k, v in load_file(str(vae)).items()})
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        save_file(state, str(partial))
        os.replace(partial, path)  # concurrent runs never see half a file
    return path


def place_family_files(base: Path, name: str, files: dict) -> dict[str, Path]:
    """The tiny family's files under the placeholder names the example's loaders carry."""
    models = base / "models"
    family = files[FAMILIES[name]]
    encoders = {e["key"]: Path(e["path"]) for e in family["text_encoders"]}
    if name == "dreambooth_flux_lora":
        placed = {
            models / "diffusion_models" / "flux1-dev.safetensors": Path(family["diffusion_model"]["path"]),
            models / "text_encoders" / "clip_l.safetensors": encoders["clip_l"],
            models / "text_encoders" / "t5xxl_fp16.safetensors": encoders["t5xxl"],
            models / "vae" / "ae.safetensors": Path(family["vae"]["path"]),
        }
    else:
        placed = {
            models / "checkpoints" / "sd3.5_medium.safetensors": _sd35_checkpoint(family),
            models / "text_encoders" / "clip_l.safetensors": encoders["clip_l"],
            models / "text_encoders" / "clip_g.safetensors": encoders["clip_g"],
            models / "text_encoders" / "t5xxl_fp16.safetensors": encoders["t5xxl"],
        }
    for target, source in placed.items():
        _relink(target, source)
    return placed


@pytest.fixture(scope="module")
def family_comfy(request, browser_prerequisites):
    """A fresh ComfyUI server (main.py, CPU) with this pack and the test-only custom node that
    makes the tiny Flux.1-dev and SD3.5 files loadable by ComfyUI's loader nodes, and its own
    browser. The shared server cannot serve here: a custom node must be there when it starts."""
    from browser_driver import Browser
    from comfyui_runtime import MODEL_CACHE, find_comfyui

    server = ComfyServer(find_comfyui(), python=sys.executable)
    make_base_dir(server.base_dir)
    node = server.base_dir / "custom_nodes" / TINY_FAMILIES_NODE
    node.mkdir()
    shutil.copyfile(Path(__file__).with_name("tiny_family_loaders.py"), node / "__init__.py")
    config = {"tests_dir": str(PACK_DIR / "tests"), "model_cache": str(MODEL_CACHE), "families": sorted(set(FAMILIES.values()))}
    (node / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    failed_before = request.session.testsfailed
    browser = None
    try:
        t0 = time.monotonic()
        server.start()
        browser = Browser(server.url, log_path=server.base_dir / "drive.log")
        browser.open()
        print(f"family server and browser ready in {time.monotonic() - t0:.1f} s")
        files = json.loads((node / "files.json").read_text(encoding="utf-8"))
        install_images(server.base_dir)
        yield {"server": server, "browser": browser, "files": files, "base": server.base_dir, "settings": family_tiny_settings()}
    finally:
        failed = request.session.testsfailed > failed_before
        if browser is not None:
            if failed:
                ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
                try:
                    browser.screenshot(ARTIFACTS_DIR / "family-examples.png")
                    (ARTIFACTS_DIR / "family-examples.errors.json").write_text(json.dumps(browser.errors(), indent=1))
                except Exception as e:  # the browser may be what broke
                    (ARTIFACTS_DIR / "family-examples.errors.json").write_text(json.dumps({"artifact_error": str(e)}))
            browser.close()
        server.stop()
        if failed and server.log_path.exists():
            server.save_log("comfyui-family-server.log")
        server.cleanup()


def _run_family_example(family_comfy, name: str) -> dict:
    """Place the family's files, load the example as drag-and-drop does, set tiny settings, run it."""
    server, browser, base = family_comfy["server"], family_comfy["browser"], family_comfy["base"]
    place_family_files(base, name, family_comfy["files"])
    refresh_combos(browser)
    log_start = len(server.log_text())
    _prepare(browser, server, family_comfy, name)
    seq = browser.eval("window.__drive.seq")
    result = _queue(browser, timeout=300)
    result["log"] = server.log_text()[log_start:]
    print(f"{name}: {_node_seconds(browser, seq)}")
    train = _only(node_ids(browser, "PersonalizeDreamBoothFinetune"))
    assert_progress_done(browser, train, "dreambooth")
    return result


def _node_seconds(browser, since: int) -> str:
    """Seconds per node of the run just finished (the "executing" events' page times), for the log."""
    events = browser.cmd("events", since=since, types=["executing", "execution_success"])
    times = [(executing_node(e) if e["type"] == "executing" else None, e["t"]) for e in events]
    types = {str(n["id"]): n["type"] for n in browser.eval("app.graph.serialize().nodes")}
    spans = [(types.get(node, node), (end - start) / 1000) for (node, start), (_, end) in itertools.pairwise(times) if node]
    return ", ".join(f"{node} {seconds:.1f} s" for node, seconds in spans if seconds >= 0.5)


def _family_lora(base: Path, file_name: str, base_model: str) -> dict:
    tensors, metadata = read_safetensors(base / "models" / "loras" / f"{file_name}.safetensors")
    assert metadata.get("base_model") == base_model, metadata
    assert all(_finite(t) for t in tensors.values())
    return tensors


def _finite(tensor) -> bool:
    import torch

    return bool(torch.isfinite(tensor.float()).all())


def test_dreambooth_flux_lora_example(family_comfy):
    """Flux.1-dev as its users load it (Load Diffusion Model, DualCLIPLoader type flux, Load VAE):
    the LoRA with prior preservation trains, class images drawn with Flux's own sampling, and the
    tuned model renders through FluxGuidance 3.5 at cfg 1."""
    browser, base = family_comfy["browser"], family_comfy["base"]
    result = _run_family_example(family_comfy, "dreambooth_flux_lora")
    log = result["log"]
    # ComfyUI's loader nodes loaded the tiny files (the test node's adjustment, for them only)
    for loaded in ("diffusion model", "text encoders"):
        assert f"personalize tests: tiny flux-dev {loaded}" in log, log[-3000:]
    # class images: the family's sampling, since the example leaves the node's values
    assert "generating 1 class images for 'a photo of dog' (euler/simple, 20 steps, cfg 1, guidance 3.5)" in log, log[-3000:]

    tensors = _family_lora(base, "dreambooth-sks-flux", "Flux.1-dev")
    downs = {k: t for k, t in tensors.items() if k.endswith(".lora_down.weight")}
    assert downs and all(k.startswith("lora_unet_") for k in tensors), sorted(tensors)[:4]
    assert any("double_blocks" in k for k in downs) and any("single_blocks" in k for k in downs), sorted(downs)
    assert all(t.shape[0] == 2 for t in downs.values())
    status = _dreambooth_status(result, browser)
    for line in (
        "identifier 'sks'",
        "prior preservation with 1 class images (generated) for 'a photo of dog'",
        "guidance 1 embedded while training (Flux.1-dev)",
        "saved lora: dreambooth-sks-flux.safetensors",
    ):
        assert line in status, status
    # the render: the tuned model, FluxGuidance 3.5 on the positive prompt, cfg 1, euler/simple
    prompt = browser.eval("app.graphToPrompt().then((p) => p.output)")
    [sampler] = [n for n in prompt.values() if n["class_type"] == "KSampler"]
    guidance = prompt[sampler["inputs"]["positive"][0]]
    assert guidance["class_type"] == "FluxGuidance" and guidance["inputs"]["guidance"] == 3.5
    assert prompt[sampler["inputs"]["model"][0]]["class_type"] == "PersonalizeDreamBoothFinetune"
    assert (sampler["inputs"]["cfg"], sampler["inputs"]["sampler_name"], sampler["inputs"]["scheduler"]) == (1.0, "euler", "simple")
    [image] = _images(family_comfy, result, _only(node_ids(browser, "SaveImage")))
    assert image.parent == base / "output" / "dreambooth" and image.name.startswith("sks-dog-flux")
    _images(family_comfy, result, _only(node_ids(browser, "PreviewImage")), size=None)


def test_dreambooth_sd35_lora_example(family_comfy):
    """SD3.5 as its users load it (Load Checkpoint for MODEL and VAE, TripleCLIPLoader): the LoRA
    trains, class images drawn with SD3's own sampling, the tuned model renders at cfg 4.5."""
    browser, base = family_comfy["browser"], family_comfy["base"]
    result = _run_family_example(family_comfy, "dreambooth_sd35_lora")
    log = result["log"]
    # TripleCLIPLoader got the tiny encoders' sizes; the checkpoint needed nothing (SD3's
    # detection reads every size from the weights), and the helper left it alone
    assert "personalize tests: tiny sd35 text encoders" in log, log[-3000:]
    assert "personalize tests: tiny sd35 diffusion model" not in log
    assert "generating 1 class images for 'a photo of dog' (euler/sgm_uniform, 28 steps, cfg 4.5)" in log, log[-3000:]

    tensors = _family_lora(base, "dreambooth-sks-sd35", "SD3")
    assert all(k.startswith("transformer.transformer_blocks.") and ".lora_" in k for k in tensors), sorted(tensors)[:4]
    assert any(".attn.to_q.lora_A" in k for k in tensors) and any(".attn2.to_q.lora_A" in k for k in tensors), sorted(tensors)
    assert all(t.shape[0] == 2 for k, t in tensors.items() if ".lora_A." in k)
    status = _dreambooth_status(result, browser)
    for line in (
        "identifier 'sks'",
        "prior preservation with 1 class images (generated) for 'a photo of dog'",
        "saved lora: dreambooth-sks-sd35.safetensors",
    ):
        assert line in status, status
    prompt = browser.eval("app.graphToPrompt().then((p) => p.output)")
    [sampler] = [n for n in prompt.values() if n["class_type"] == "KSampler"]
    assert prompt[sampler["inputs"]["model"][0]]["class_type"] == "PersonalizeDreamBoothFinetune"
    assert (sampler["inputs"]["cfg"], sampler["inputs"]["sampler_name"], sampler["inputs"]["scheduler"]) == (4.5, "euler", "sgm_uniform")
    [image] = _images(family_comfy, result, _only(node_ids(browser, "SaveImage")))
    assert image.parent == base / "output" / "dreambooth" and image.name.startswith("sks-dog-sd35")
    _images(family_comfy, result, _only(node_ids(browser, "PreviewImage")), size=None)
