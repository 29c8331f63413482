"""Live training progress from a real run: the Textual Inversion example queued in the
browser, its `personalize.training` messages (nodes/comfy_adapter.py ProgressReporter, over
ComfyUI's websocket) watched on the node's progress widget (web/personalize_progress.js)
while it trains, then the end of the run; and Cancel (ComfyUI's interrupt) mid-run.

Leaves tests/artifacts/training-progress.png: the training node mid-run (web/docs/ holds a
copy picked for the README).
"""

from __future__ import annotations

import math
import os
import time

import pytest
from comfy_process import ARTIFACTS_DIR
from test_example_workflows import (
    example,
    install_test_files,
    load_workflow,
    node_ids,
    read_safetensors,
    refresh_combos,
    set_widgets,
    tiny_settings,
)

EVENT = "personalize.training"
TRAIN = "PersonalizeTrainTextualInversion"
# Steps of the live run, and the step at which the screenshot is taken (while it runs). At
# ~5 s a step on a busy 2-core CPU the defaults take about a minute; for a picture with more
# of a curve (web/docs/training-progress.png): PERSONALIZE_LIVE_STEPS=40 PERSONALIZE_LIVE_SHOT_STEP=30.
LIVE_STEPS = int(os.environ.get("PERSONALIZE_LIVE_STEPS", "8"))
SHOT_STEP = int(os.environ.get("PERSONALIZE_LIVE_SHOT_STEP", "2"))

# The progress widget of node `arg`: its data attributes, text, chart and box on screen.
WIDGET_STATE = """
(() => {
  const node = app.graph.getNodeById(arg);
  const w = node?.widgets?.find((w) => w.name === "personalize_progress");
  if (!w) return null;
  const el = w.element, canvas = el.querySelector("canvas");
  let inked = 0;
  if (canvas && canvas.width > 1) {
    const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 3; i < px.length; i += 4) if (px[i] > 0) inked++;
  }
  const r = el.getBoundingClientRect();
  return { data: { ...el.dataset }, text: el.innerText, points: Number(canvas?.dataset.points ?? -1),
           inked, shown: el.isConnected && getComputedStyle(el).display !== "none" && r.width > 0 && r.height > 0 };
})()
"""

# Queue the loaded graph without waiting; also record every personalize.training message.
QUEUE_JS = """
const d = window.__drive;
if (!window.__liveMessages) {
  window.__liveMessages = [];
  api.addEventListener(arg.event, (e) =>
    window.__liveMessages.push({ t: Date.now(), ...JSON.parse(JSON.stringify(e.detail)) }));
}
window.__liveMessages.length = 0;
const since = d.seq, original = api.queuePrompt;
let response = null;
api.queuePrompt = async function (...a) { response = await original.apply(this, a); return response; };
try { await app.queuePrompt(0, 1); } finally { api.queuePrompt = original; }
return { since, prompt_id: response?.prompt_id ?? null, node_errors: response?.node_errors ?? null };
"""

TERMINAL = """
(() => {
  const ev = window.__drive.events.find((e) => e.seq > arg.since && e.detail?.prompt_id === arg.id &&
    ["execution_success", "execution_error", "execution_interrupted"].includes(e.type));
  return ev ? { type: ev.type, detail: ev.detail } : false;
})()
"""


def widget_state(browser, node_id):
    return browser.eval(WIDGET_STATE, arg=node_id)


def wait_widget(browser, node_id, condition: str, timeout: float):
    """Wait until the widget's dataset `d` satisfies the JS `condition`; return its dataset."""
    return browser.wait(
        "(() => { const w = app.graph.getNodeById(arg)?.widgets?.find((w) => w.name === 'personalize_progress');"
        f" const d = w?.element.dataset; return d && ({condition}) ? {{ ...d }} : false; }})()",
        arg=node_id,
        timeout=timeout,
    )


def queue_nowait(browser) -> dict:
    queued = browser.exec(QUEUE_JS, arg={"event": EVENT})
    assert queued["prompt_id"] and not queued["node_errors"], queued
    return queued


def wait_end(browser, queued: dict, timeout: float) -> dict:
    return browser.wait(TERMINAL, arg={"since": queued["since"], "id": queued["prompt_id"]}, timeout=timeout)


def messages(browser) -> list[dict]:
    return browser.eval("window.__liveMessages")


@pytest.fixture(scope="module")
def ti_loaded(comfy_server, browser):
    """A function loading the Textual Inversion example with tiny settings plus `overrides`."""
    files = install_test_files(comfy_server.base_dir)
    refresh_combos(browser)
    base = tiny_settings(files["checkpoint"])

    def load(**overrides) -> int:
        load_workflow(browser, example("textual_inversion"), "textual_inversion")
        settings = {k: dict(v) for k, v in base.items()}
        settings[TRAIN].update(overrides)
        set_widgets(browser, settings)
        [node] = node_ids(browser, TRAIN)
        return node

    return load


def test_progress_widget_follows_a_real_run(browser, comfy_server, ti_loaded):
    train = ti_loaded(steps=LIVE_STEPS, file_name="e2e-live", seed=7)
    errors_before = len(browser.errors()["pageErrors"])
    t0 = time.monotonic()
    queued = queue_nowait(browser)

    # mid-run: step >= 2 while still running
    running = f"d.status === 'running' && Number(d.step) >= {SHOT_STEP}"
    wait_widget(browser, train, running, timeout=300 + 20 * SHOT_STEP)
    mid = widget_state(browser, train)
    # The node at 100 % in a window tall enough for all of it, for the screenshot.
    browser.cmd("viewport", width=1100, height=1150)
    browser.exec("app.canvas.ds.scale = 1; app.canvas.setDirty(true, true);")
    shot = ARTIFACTS_DIR / "training-progress.png"
    browser.screenshot(shot, node=train, center=True, padding=16)
    shot_state = widget_state(browser, train)
    browser.cmd("viewport", width=1280, height=800)

    step, total = int(mid["data"]["step"]), int(mid["data"]["total"])
    assert mid["shown"] and mid["data"]["status"] == "running"
    assert 2 <= SHOT_STEP <= step <= total == LIVE_STEPS, mid
    assert mid["data"]["kind"] == "textual_inversion"
    loss = float(mid["data"]["loss"])
    assert math.isfinite(loss) and loss >= 0, mid
    assert mid["points"] >= 1 and mid["inked"] > 200, mid
    assert f"step {step} / {total}" in mid["text"] and "loss" in mid["text"]
    assert shot.stat().st_size > 10_000
    # still running when the screenshot was taken (else it shows a finished run)
    assert shot_state["data"]["status"] == "running", "the run ended before the screenshot: raise LIVE_STEPS"

    end = wait_end(browser, queued, timeout=300 + 20 * LIVE_STEPS)
    assert end["type"] == "execution_success", end
    done = wait_widget(browser, train, "d.status === 'done'", timeout=30)
    final = widget_state(browser, train)
    assert done["step"] == done["total"] == str(LIVE_STEPS), done
    assert math.isfinite(float(done["loss"]))
    assert final["points"] == LIVE_STEPS, final  # every step's smoothed loss reached the chart
    assert f"step {LIVE_STEPS} / {LIVE_STEPS}" in final["text"]

    # the messages as sent: ordered steps, first and last, throttled to about 4 per second
    sent = [m for m in messages(browser) if str(m.get("node")) == str(train)]
    assert sent[0]["status"] == "running" and sent[-1]["status"] == "done"
    assert [m["step"] for m in sent] == sorted(m["step"] for m in sent)
    assert sum(len(m["points"]) for m in sent) == LIVE_STEPS
    running = [m for m in sent if m["status"] == "running"]
    span = (running[-1]["t"] - running[0]["t"]) / 1000 if len(running) > 1 else 0
    assert len(running) <= 4 * span + 3, (len(running), span)
    assert browser.errors()["pageErrors"][errors_before:] == []
    assert (comfy_server.base_dir / "models" / "embeddings" / "e2e-live.safetensors").is_file()
    print(f"live run: {time.monotonic() - t0:.1f} s, {len(sent)} messages, screenshot at step {step}")


def test_cancel_keeps_the_last_periodic_save(browser, comfy_server, ti_loaded):
    train = ti_loaded(steps=1000, save_every=1, file_name="e2e-cancel", seed=8)
    saved = comfy_server.base_dir / "models" / "embeddings" / "e2e-cancel.safetensors"
    assert not saved.exists()
    queued = queue_nowait(browser)
    running = wait_widget(browser, train, "d.status === 'running' && Number(d.step) >= 1", timeout=300)
    assert running["total"] == "1000"
    browser.exec("await api.interrupt(arg);", arg=queued["prompt_id"])  # the Cancel button's call

    end = wait_end(browser, queued, timeout=120)
    assert end["type"] == "execution_interrupted", end
    assert str(end["detail"].get("node_id")) == str(train)
    cancelled = wait_widget(browser, train, "d.status === 'cancelled'", timeout=30)
    last = int(cancelled["step"])
    assert 1 <= last < 1000, cancelled
    assert "cancelled" in widget_state(browser, train)["text"]
    sent = [m for m in messages(browser) if str(m.get("node")) == str(train)]
    assert sent[-1]["status"] == "cancelled" and sent[-1]["step"] == last

    # the last periodic save: a complete file of the last finished step
    assert saved.is_file()
    tensors, metadata = read_safetensors(saved)
    assert tuple(tensors["emb_params"].shape) == (1, 768)
    assert metadata.get("trigger_word") == "<my-subject>"
    assert 1 <= int(metadata["steps"]) <= last, (metadata.get("steps"), last)
    history = comfy_server.get_json(f"/history/{queued['prompt_id']}")[queued["prompt_id"]]
    assert history["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in history["status"]["messages"])
