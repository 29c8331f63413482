"""The browser harness itself: load, missing node types, queue and wait, validation errors.

Core nodes only (no model files), so these run anywhere the browser tests run.
"""

from __future__ import annotations

import copy
from pathlib import Path


def _image_workflow(width=64, prefix="personalize_driver_test"):
    return {
        "last_node_id": 2,
        "last_link_id": 1,
        "nodes": [
            {
                "id": 1,
                "type": "EmptyImage",
                "pos": [50, 50],
                "size": [315, 130],
                "flags": {},
                "order": 0,
                "mode": 0,
                "inputs": [],
                "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1], "slot_index": 0}],
                "properties": {},
                "widgets_values": [width, 64, 1, 0],
            },
            {
                "id": 2,
                "type": "SaveImage",
                "pos": [420, 50],
                "size": [315, 270],
                "flags": {},
                "order": 1,
                "mode": 0,
                "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
                "outputs": [],
                "properties": {},
                "widgets_values": [prefix],
            },
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]],
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def test_load_and_queue_a_cpu_workflow(browser, comfy_server):
    browser.close_dialogs()
    loaded = browser.load(_image_workflow())
    assert loaded["ok"], loaded
    assert loaded["missingNodeTypes"] == [] and loaded["invalidWidgets"] == []
    result = browser.queue(timeout=120)
    assert result["status"] == "success", result
    images = result["outputs"]["2"]["images"]
    assert len(images) == 1 and images[0]["filename"].startswith("personalize_driver_test")
    assert (Path(comfy_server.base_dir) / "output" / images[0]["filename"]).is_file()
    types = [e["type"] for e in result["events"]]
    assert "execution_start" in types and "execution_success" in types


def test_missing_node_types_are_reported(browser):
    browser.close_dialogs()
    wf = _image_workflow()
    wf["nodes"].append(copy.deepcopy(wf["nodes"][0]) | {"id": 3, "type": "DefinitelyNotARealNodeType"})
    loaded = browser.load(wf)
    assert not loaded["ok"]
    assert loaded["missingNodeTypes"] == ["DefinitelyNotARealNodeType"]
    version = tuple(int(p) for p in browser.eval("window.__COMFYUI_FRONTEND_VERSION__").split(".")[:2])
    if version < (1, 30):  # later front ends list missing nodes in a panel of their own, not a dialog
        assert loaded["missingNodesDialog"] is not None
        assert "DefinitelyNotARealNodeType" in loaded["missingNodesDialog"]["types"]
    browser.close_dialogs()
    assert browser.dialogs()["dialogs"] == []


def test_invalid_inputs_are_rejected_at_queue_time(browser):
    browser.close_dialogs()
    assert browser.load(_image_workflow(width=-5))["ok"]
    result = browser.queue(timeout=60)
    assert result["status"] == "rejected", result
    assert "1" in (result["node_errors"] or {}), result
    browser.close_dialogs()
