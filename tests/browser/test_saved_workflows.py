"""Workflows as users keep them: saved and reopened, saved by an older version of the pack, and
the smallest graph that trains (a trainer with nothing after it). In the real front end of the
ComfyUI the suite runs against (1.27 with v0.3.64, 1.45 with v0.28.0)."""

from __future__ import annotations

from pathlib import Path

from test_example_workflows import (
    IMAGES_FOLDER,
    assert_success,
    example,
    install_test_files,
    load_workflow,
    node_ids,
    refresh_combos,
    set_widgets,
    tiny_settings,
)

TRAINERS = ("PersonalizeTrainTextualInversion", "PersonalizeDreamBoothFinetune")

# Every widget of every node by name (widgets_values are positional: a shift shows up here).
WIDGETS_BY_NAME = """
Object.fromEntries(app.graph.nodes.map((n) => [n.id, Object.fromEntries((n.widgets ?? [])
  .filter((w) => w.name !== "personalize_progress").map((w) => [w.name, w.value]))]))
"""


def test_a_saved_training_workflow_reopens_with_every_widget_value(browser, comfy_server):
    install_test_files(comfy_server.base_dir)
    refresh_combos(browser)
    for name in ("textual_inversion", "dreambooth_lora_pivotal"):
        load_workflow(browser, example(name), name)
        # Values unlike the defaults, in widgets on both sides of the progress widget's slot.
        changed = {
            "PersonalizeTrainTextualInversion": {"trigger_word": "<saved>", "steps": 7, "preview_every": 3, "precision": "bf16"},
            "PersonalizeDreamBoothFinetune": {"instance_prompt": "a photo of zwx cat", "steps": 9, "overwrite": True, "precision": "fp16"},
        }
        set_widgets(browser, {k: v for k, v in changed.items() if k in {n["type"] for n in example(name)["nodes"]}})
        # A progress message gives the training node its progress widget data, as a run does.
        train = next(i for t in TRAINERS for i in node_ids(browser, t))
        browser.dispatch(
            "personalize.training",
            {
                "node": str(train),
                "kind": "test",
                "status": "done",
                "step": 2,
                "total": 2,
                "loss": 0.5,
                "loss_smoothed": 0.5,
                "points": [[1, 0.6], [2, 0.5]],
            },
        )
        before = browser.eval(WIDGETS_BY_NAME)
        saved = browser.eval("JSON.parse(JSON.stringify(app.graph.serialize()))")
        load_workflow(browser, saved, f"{name}-saved")
        after = browser.eval(WIDGETS_BY_NAME)
        assert after == before, name
        assert "personalize_progress" not in str(saved)


def test_an_image_folder_saved_with_repeats_loads_into_the_right_widgets(browser, comfy_server):
    """Workflows saved before 'repeats' went carry six values; the web extension drops that one."""
    install_test_files(comfy_server.base_dir)
    refresh_combos(browser)
    workflow = example("textual_inversion")
    folder = next(n for n in workflow["nodes"] if n["type"] == "PersonalizeImageFolder")
    folder["widgets_values"] = ["(none: use the path)", IMAGES_FOLDER, 4, "stop", True, False]
    load_workflow(browser, workflow, "old-image-folder")
    values = browser.eval(WIDGETS_BY_NAME)[str(folder["id"])]
    assert values == {
        "folder": "(none: use the path)",
        "path": IMAGES_FOLDER,
        "on_bad_file": "stop",
        "recursive": True,
        "allow_any_path": False,
    }


# A graph with nothing but Load Checkpoint, an image source and a trainer (no output node after it).
BUILD_MINIMAL_JS = r"""
app.graph.clear();
const ckpt = LiteGraph.createNode("CheckpointLoaderSimple"), images = LiteGraph.createNode("PersonalizeImageFolder"),
      train = LiteGraph.createNode("PersonalizeTrainTextualInversion");
for (const n of [ckpt, images, train]) app.graph.add(n);
const set = (node, name, value) => { node.widgets.find((w) => w.name === name).value = value; };
set(ckpt, "ckpt_name", arg.checkpoint);
set(images, "path", arg.folder);
for (const [k, v] of Object.entries(arg.train)) set(train, k, v);
ckpt.connect(0, train, train.findInputSlot("model"));
ckpt.connect(1, train, train.findInputSlot("clip"));
ckpt.connect(2, train, train.findInputSlot("vae"));
images.connect(0, train, train.findInputSlot("image_set"));
return train.id;
"""


def test_a_graph_with_only_a_trainer_queues_and_writes_its_file(browser, comfy_server):
    files = install_test_files(comfy_server.base_dir)
    refresh_combos(browser)
    browser.close_dialogs()
    train = {
        **tiny_settings(files["checkpoint"])["PersonalizeTrainTextualInversion"],
        "trigger_word": "<lonely>",
        "file_name": "lonely-trainer",
    }
    browser.exec(BUILD_MINIMAL_JS, arg={"checkpoint": files["checkpoint"], "folder": IMAGES_FOLDER, "train": train})
    result = browser.queue(timeout=300)
    assert_success(result)
    assert (Path(comfy_server.base_dir) / "models" / "embeddings" / "lonely-trainer.safetensors").is_file()
