"""The live training progress widget (web/personalize_progress.js) in the real front end.

Synthetic `personalize.training` messages go through the front end's api object (the
listener path the server's websocket messages take), and through a fake websocket frame.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
from comfy_process import ARTIFACTS_DIR, PACK_NAME

EVENT = "personalize.training"
WIDGET = "personalize_progress"
TRAINING_TYPES = ("PersonalizeTrainTextualInversion", "PersonalizeDreamBoothFinetune")

WORKFLOW = {
    "last_node_id": 7,
    "last_link_id": 0,
    "nodes": [
        {
            "id": 5,
            "type": "EmptyLatentImage",
            "pos": [80, 80],
            "size": [315, 106],
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": [],
            "outputs": [{"name": "LATENT", "type": "LATENT", "links": None}],
            "properties": {"Node name for S&R": "EmptyLatentImage"},
            "widgets_values": [512, 512, 1],
        },
        {
            "id": 7,
            "type": "Note",
            "pos": [480, 80],
            "size": [320, 120],
            "flags": {},
            "order": 1,
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {"text": ""},
            "widgets_values": ["a note"],
        },
    ],
    "links": [],
    "groups": [],
    "config": {},
    "extra": {},
    "version": 0.4,
}

# The widget of node `arg` (id), as the tests see it.
WIDGET_STATE = f"""
(() => {{
  const node = app.graph.getNodeById(arg);
  const w = node?.widgets?.find((w) => w.name === "{WIDGET}");
  if (!w) return null;
  const el = w.element, canvas = el.querySelector("canvas");
  const r = el.getBoundingClientRect();
  const [x, y, width, height] = node.boundingRect;
  const c = app.canvas.canvas.getBoundingClientRect();
  const [nx, ny] = app.canvas.ds.convertOffsetToCanvas([x, y]);
  const s = app.canvas.ds.scale;
  let inked = 0;
  if (canvas && canvas.width > 1) {{
    const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 3; i < px.length; i += 4) if (px[i] > 0) inked++;
  }}
  return {{
    className: el.className, data: {{ ...el.dataset }}, text: el.innerText,
    points: canvas?.dataset.points ?? null, series: canvas?.dataset.series ?? null,
    yLabels: canvas?.dataset.yLabels ?? null,
    displayed: el.isConnected && getComputedStyle(el).display !== "none" && r.width > 0,
    inked, serializeFlag: w.serialize, optionsSerialize: w.options?.serialize,
    elRect: [r.left, r.top, r.right, r.bottom],
    nodeRect: [c.left + nx, c.top + ny, c.left + nx + width * s, c.top + ny + height * s],
  }};
}})()
"""


def widget_state(browser, node_id):
    return browser.eval(WIDGET_STATE, arg=node_id)


def wait_step(browser, node_id, step, timeout=15):
    browser.wait(
        f"(() => {{ const w = app.graph.getNodeById(arg)?.widgets?.find((w) => w.name === '{WIDGET}');"
        f" return w && w.element.dataset.step === '{step}'; }})()",
        arg=node_id,
        timeout=timeout,
    )


def messages(node, total=300, count=12, per=10, kind="dreambooth", names=True):
    """`count` running messages, `per` new points each; loss curves that go down."""
    out = []
    for i in range(1, count + 1):
        step = i * per
        pts = [[s, round(1.2 / (1 + s / 25) + 0.04 * math.sin(s / 2), 5)] for s in range(step - per + 1, step + 1)]
        m = {
            "node": node,
            "kind": kind,
            "status": "running",
            "step": step,
            "total": total,
            "loss": round(0.5 / i, 6),
            "loss_smoothed": pts[-1][1],
            "elapsed_s": i * 10.4,
            "eta_s": (total - step) * 1.04,
            "points": pts,
        }
        if names:  # as nodes/comfy_adapter.py sends them: the main "loss" and the named terms
            m["losses"] = {"loss": pts[-1][1], "instance": round(0.45 / i, 5), "prior": round(0.08 + 0.004 * i, 5)}
        out.append(m)
    return out


def page_errors(browser):
    return browser.errors()["pageErrors"]


@pytest.fixture
def workflow_loaded(browser):
    browser.close_dialogs()
    result = browser.load(copy.deepcopy(WORKFLOW))
    assert result["ok"], result
    assert [n["type"] for n in result["nodes"]] == ["EmptyLatentImage", "Note"]
    return result


def test_extension_is_served_and_registered(browser, comfy_server):
    listed = comfy_server.get_json("/extensions")
    assert f"/extensions/{PACK_NAME}/personalize_progress.js" in listed
    assert "personalize.trainingProgress" in browser.eval("app.extensions.map((e) => e.name)")


def test_progress_widget_follows_messages(browser, workflow_loaded):
    errors_before = len(page_errors(browser))
    node_before = browser.eval("app.graph.getNodeById(5).serialize()")
    prompt_before = browser.eval("app.graphToPrompt().then((p) => p.output)")
    assert widget_state(browser, 5) is None  # created lazily, on the first message

    msgs = messages("5")
    for m in msgs:
        assert browser.dispatch(EVENT, m) is True
    last = msgs[-1]
    wait_step(browser, 5, last["step"])
    st = widget_state(browser, 5)

    assert "personalize-progress" in st["className"].split()
    assert st["displayed"]
    assert st["data"]["step"] == "120"
    assert st["data"]["total"] == "300"
    assert st["data"]["status"] == "running"
    assert float(st["data"]["loss"]) == pytest.approx(last["loss"])
    assert st["data"]["kind"] == "dreambooth"
    assert st["points"] == str(sum(len(m["points"]) for m in msgs)) == "120"
    assert st["series"] == "3"  # smoothed + instance + prior
    assert "step 120 / 300" in st["text"]
    assert "loss 0.0417" in st["text"]  # 3 significant digits
    assert f"smoothed {float('{:.3g}'.format(last['loss_smoothed'])):g}" in st["text"]
    assert "2:05" in st["text"]  # elapsed 124.8 s
    assert "ETA 3:07" in st["text"]  # 187.2 s
    assert "instance 0.0375" in st["text"] and "prior 0.128" in st["text"]
    assert st["inked"] > 500, "the chart canvas has nothing drawn"
    # the widget lies inside its node on screen
    el, node = st["elRect"], st["nodeRect"]
    assert node[0] - 1 <= el[0] and el[2] <= node[2] + 1 and node[1] - 1 <= el[1] and el[3] <= node[3] + 1, st

    # not serialized: workflow widgets_values and prompt inputs are what they were
    assert st["serializeFlag"] is False and st["optionsSerialize"] is False
    node_after = browser.eval("app.graph.getNodeById(5).serialize()")
    assert node_after["widgets_values"] == node_before["widgets_values"] == [512, 512, 1]
    without = browser.exec(
        """
        const node = app.graph.getNodeById(5);
        const all = node.widgets;
        node.widgets = all.filter((w) => w.name !== arg);
        try { return node.serialize().widgets_values; } finally { node.widgets = all; }
        """,
        arg=WIDGET,
    )
    assert node_after["widgets_values"] == without
    assert WIDGET not in json.dumps(browser.eval("app.graph.serialize()"))
    assert browser.eval("app.graphToPrompt().then((p) => p.output)") == prompt_before

    # a node id sent as a number works too (here: the Note node)
    for m in messages(7, total=50, count=3, per=5, kind="textual_inversion", names=False):
        browser.dispatch(EVENT, m)
    wait_step(browser, 7, 15)
    note = widget_state(browser, 7)
    assert note["points"] == "15" and note["series"] == "1" and "step 15 / 50" in note["text"]
    assert browser.eval("app.graph.getNodeById(7).serialize().widgets_values") == ["a note"]

    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    shot = browser.screenshot(ARTIFACTS_DIR / "progress-extension.png", node=5, center=True)
    assert (ARTIFACTS_DIR / "progress-extension.png").stat().st_size > 5000, shot
    assert page_errors(browser)[errors_before:] == []


def test_status_changes_and_new_runs_reset(browser, workflow_loaded):
    msgs = messages("5", total=100, count=5)
    for m in msgs:
        browser.dispatch(EVENT, m)
    wait_step(browser, 5, 50)
    assert widget_state(browser, 5)["points"] == "50"

    browser.dispatch(EVENT, {**msgs[-1], "status": "done", "step": 100, "eta_s": 0, "points": [[100, 0.3]]})
    browser.wait("app.graph.getNodeById(5).widgets.find((w) => w.name === arg).element.dataset.status === 'done'", arg=WIDGET)
    st = widget_state(browser, 5)
    assert st["points"] == "51" and st["data"]["step"] == "100" and "step 100 / 100" in st["text"]

    # running after done: a new run, the chart starts again
    browser.dispatch(EVENT, {**msgs[0], "step": 3, "points": [[1, 0.9], [2, 0.8], [3, 0.7]]})
    wait_step(browser, 5, 3)
    st = widget_state(browser, 5)
    assert st["points"] == "3" and st["data"]["status"] == "running"

    # step going back: a new run too
    browser.dispatch(EVENT, {**msgs[0], "step": 1, "points": [[1, 0.95]]})
    wait_step(browser, 5, 1)
    assert widget_state(browser, 5)["points"] == "1"

    # an unknown status is shown as it is
    browser.dispatch(EVENT, {**msgs[0], "step": 2, "status": "paused", "points": []})
    wait_step(browser, 5, 2)
    st = widget_state(browser, 5)
    assert st["data"]["status"] == "paused" and "paused" in st["text"] and st["points"] == "1"

    # a cancel message without losses (as ProgressReporter.finish sends it) keeps the last ones
    browser.dispatch(EVENT, {**msgs[1], "step": 4, "points": [[4, 0.6]]})
    wait_step(browser, 5, 4)
    browser.dispatch(
        EVENT,
        {
            "node": "5",
            "kind": "dreambooth",
            "status": "cancelled",
            "step": 4,
            "total": 100,
            "loss": None,
            "loss_smoothed": None,
            "losses": {},
            "elapsed_s": 30,
            "eta_s": None,
            "points": [],
        },
    )
    browser.wait(
        "app.graph.getNodeById(5).widgets.find((w) => w.name === arg).element.dataset.status === 'cancelled'",
        arg=WIDGET,
    )
    st = widget_state(browser, 5)
    assert st["data"]["loss"] == str(msgs[1]["loss"]) and st["points"] == "2" and "ETA –" in st["text"]

    # a run that stops without a final message (interrupt) does not stay "running"
    browser.dispatch(EVENT, {**msgs[0], "step": 1, "points": [[1, 0.9]]})
    wait_step(browser, 5, 1)
    browser.dispatch("execution_interrupted", {"prompt_id": "x", "node_id": "5", "node_type": "", "executed": []})
    browser.wait(
        "app.graph.getNodeById(5).widgets.find((w) => w.name === arg).element.dataset.status === 'cancelled'",
        arg=WIDGET,
    )


def test_nodes_inside_subgraphs(browser, workflow_loaded):
    """Execution ids of nodes in a subgraph look like "<subgraph node id>:<inner id>"."""
    ids = browser.exec(
        """
        const node = app.graph.getNodeById(5);
        const { node: sub } = app.graph.convertToSubgraph(new Set([node]));
        const inner = sub.subgraph.nodes.find((n) => n.type === "EmptyLatentImage");
        return [sub.id, inner.id];
        """
    )
    outer, inner = ids
    for m in messages(f"{outer}:{inner}", total=20, count=2, per=5, names=False):
        browser.dispatch(EVENT, m)
    browser.wait(
        "(() => { const n = app.graph.getNodeById(arg[0]).subgraph.getNodeById(arg[1]);"
        " return n.widgets?.find((w) => w.name === 'personalize_progress')?.element.dataset.step === '10'; })()",
        arg=ids,
    )
    points = browser.eval(
        "app.graph.getNodeById(arg[0]).subgraph.getNodeById(arg[1]).widgets"
        ".find((w) => w.name === 'personalize_progress').element.querySelector('canvas').dataset.points",
        arg=ids,
    )
    assert points == "10"
    assert widget_state(browser, outer) is None  # the subgraph node itself got nothing


def test_many_points_are_downsampled(browser, workflow_loaded):
    pts = [[s, 1.0 / (1 + s / 100)] for s in range(1, 5001)]
    for i in range(0, 5000, 500):
        browser.dispatch(
            EVENT,
            {
                "node": "5",
                "kind": "textual_inversion",
                "status": "running",
                "step": i + 500,
                "total": 5000,
                "loss": 0.2,
                "loss_smoothed": pts[i + 499][1],
                "elapsed_s": 1,
                "eta_s": 1,
                "points": pts[i : i + 500],
            },
        )
    wait_step(browser, 5, 5000)
    n = int(widget_state(browser, 5)["points"])
    assert 1000 <= n <= 2000


def test_websocket_frames_reach_the_widget(browser, workflow_loaded):
    """A frame on the app's websocket, parsed by the front end's own message handler."""
    errors_before = len(page_errors(browser))
    frame = {"type": EVENT, "data": {**messages("5", total=40, count=1, per=4)[0]}}
    browser.exec("api.socket.dispatchEvent(new MessageEvent('message', { data: arg }));", arg=json.dumps(frame))
    wait_step(browser, 5, 4)
    assert widget_state(browser, 5)["points"] == "4"
    # Python's json.dumps writes NaN for float('nan'): not JSON, the front end drops the frame
    browser.exec(
        "api.socket.dispatchEvent(new MessageEvent('message', { data: arg }));",
        arg=f'{{"type": "{EVENT}", "data": {{"node": "5", "step": 8, "total": 40, "loss": NaN}}}}',
    )
    browser.cmd("sleep", ms=300)
    assert widget_state(browser, 5)["data"]["step"] == "4"
    assert page_errors(browser)[errors_before:] == []


def test_malformed_messages_never_break_the_app(browser, workflow_loaded):
    errors_before = len(page_errors(browser))
    bad = [
        None,
        "a string",
        42,
        [],
        {},
        {"node": None},
        {"node": "999"},
        {"node": "12:5"},
        {"node": "5:1"},
        {"node": "__proto__"},
        {"node": "constructor"},
        {"node": {"id": 5}},
        {"node": [5]},
        {"node": "5"},  # nothing but the id
        {
            "node": "5",
            "step": "abc",
            "total": None,
            "status": 7,
            "kind": ["x"],
            "losses": "nope",
            "points": "nope",
            "elapsed_s": "soon",
            "eta_s": {},
        },
        {
            "node": "5",
            "step": 3,
            "total": 9,
            "points": [None, "x", [1], [None, 2], ["2", "0.5"], [3, None], {}],
            "losses": {"a": "x", "b": None, "c": [1]},
        },
    ]
    for detail in bad:
        assert browser.dispatch(EVENT, detail) is True
    # values JSON cannot carry: NaN, Infinity, undefined, a throwing getter
    browser.exec(
        """
        const ev = (d) => api.dispatchCustomEvent(arg, d);
        ev({ node: "5", status: "running", step: 4, total: 10, loss: NaN, loss_smoothed: Infinity,
             elapsed_s: NaN, eta_s: -Infinity, points: [[4, NaN], [4, Infinity], [NaN, 1], [4, 0.25]],
             losses: { instance: NaN, prior: Infinity } });
        ev({ node: 5, step: undefined, points: undefined });
        ev({ node: "5", get step() { throw new Error("boom"); } });
        ev(Object.create(null));
        """,
        arg=EVENT,
    )
    browser.cmd("sleep", ms=300)
    assert page_errors(browser)[errors_before:] == []
    st = widget_state(browser, 5)
    assert st["data"]["step"] == "4" and st["data"]["total"] == "10"
    assert st["data"]["loss"] == "NaN" and "loss NaN" in st["text"]
    assert st["points"] == "2"  # ["2", "0.5"] and [4, 0.25]; non-finite points are skipped
    assert widget_state(browser, 999) is None

    # the app still works: serialize, prompt, a fresh load, and a good message afterwards
    assert browser.eval("app.graph.getNodeById(5).serialize().widgets_values") == [512, 512, 1]
    assert set(browser.eval("app.graphToPrompt().then((p) => Object.keys(p.output))")) == {"5"}
    assert browser.load(copy.deepcopy(WORKFLOW))["ok"]
    browser.dispatch(EVENT, messages("5", count=1)[0])
    wait_step(browser, 5, 10)
    assert widget_state(browser, 5)["points"] == "10"
    assert page_errors(browser)[errors_before:] == []


def test_training_nodes_have_a_hidden_widget_from_creation(browser, comfy_server):
    registered = [t for t in TRAINING_TYPES if t in comfy_server.node_types()]
    if not registered:
        pytest.skip(f"none of {TRAINING_TYPES} is registered by the pack yet")
    browser.close_dialogs()
    browser.load(copy.deepcopy(WORKFLOW))
    for node_type in registered:
        node_id = browser.exec("const n = LiteGraph.createNode(arg); n.pos = [100, 300]; app.graph.add(n); return n.id;", arg=node_type)
        st = widget_state(browser, node_id)
        assert st is not None, f"{node_type} has no progress widget at creation"
        assert "pp-empty" in st["className"] and not st["displayed"]
        assert st["data"]["step"] == "" and st["points"] == "0"
        without = browser.exec(
            """
            const node = app.graph.getNodeById(arg.id);
            const all = node.widgets;
            const with_ = node.serialize().widgets_values;
            node.widgets = all.filter((w) => w.name !== arg.name);
            try { return [with_, node.serialize().widgets_values]; } finally { node.widgets = all; }
            """,
            arg={"id": node_id, "name": WIDGET},
        )
        assert without[0] == without[1]
        kind = "textual_inversion" if "Textual" in node_type else "dreambooth"
        for m in messages(str(node_id), total=30, count=3, per=10, kind=kind, names=kind == "dreambooth"):
            browser.dispatch(EVENT, m)
        wait_step(browser, node_id, 30)
        st = widget_state(browser, node_id)
        assert st["displayed"] and st["points"] == "30" and "step 30 / 30" in st["text"]


def test_message_bursts_are_cheap_and_removed_nodes_ignored(browser, workflow_loaded):
    errors_before = len(page_errors(browser))
    # 2000 messages of one point each, dispatched back to back: state is updated per message,
    # the DOM and chart once per animation frame.
    took = browser.exec(
        """
        const t0 = performance.now();
        for (let i = 1; i <= 2000; i++) {
          api.dispatchCustomEvent(arg, { node: "5", kind: "textual_inversion", status: "running", step: i,
            total: 2000, loss: 1 / i, loss_smoothed: 1 / Math.sqrt(i), elapsed_s: i / 10, eta_s: (2000 - i) / 10,
            points: [[i, 1 / Math.sqrt(i)]] });
        }
        return performance.now() - t0;
        """,
        arg=EVENT,
    )
    wait_step(browser, 5, 2000)
    assert widget_state(browser, 5)["points"] == "2000"
    assert took < 2000, f"2000 messages took {took:.0f} ms"

    # a removed node: its widget leaves the page, later messages for its id are ignored
    browser.exec("app.graph.remove(app.graph.getNodeById(5)); app.graph.setDirtyCanvas(true, true);")
    browser.wait("document.querySelectorAll('.personalize-progress').length === 0")
    browser.dispatch(EVENT, messages("5", count=1)[0])
    browser.cmd("sleep", ms=200)
    assert browser.eval("document.querySelectorAll('.personalize-progress').length") == 0
    assert page_errors(browser)[errors_before:] == []


def test_widgets_added_after_ours_keep_their_saved_values(browser, workflow_loaded):
    """Our widget in the middle of a node's widgets must not leave a hole in widgets_values."""
    browser.dispatch(EVENT, messages("5", count=1)[0])
    wait_step(browser, 5, 10)
    values = browser.exec(
        """
        const node = app.graph.getNodeById(5);
        node.addWidget("number", "extra", 3, () => {}, { min: 0, max: 10, step: 10, precision: 0 });
        const saved = node.serialize();
        const all = node.widgets;
        node.widgets = all.filter((w) => w.name !== arg);
        const without = node.serialize().widgets_values;
        node.widgets = all;
        // and it loads back into the right widgets
        const copy = LiteGraph.createNode("EmptyLatentImage");
        copy.addWidget("number", "extra", 0, () => {}, {});
        copy.configure({ ...saved, id: 99 });
        return [saved.widgets_values, without, copy.widgets.map((w) => w.value)];
        """,
        arg=WIDGET,
    )
    saved, without, reloaded = values
    assert saved == without == [512, 512, 1, 3]
    assert reloaded == [512, 512, 1, 3]


def test_axis_labels_stay_distinct_on_a_narrow_loss_range(browser, workflow_loaded):
    """A loss that only moves in its fourth digit still gets one label per grid line."""
    errors_before = len(page_errors(browser))
    points = [[s, round(0.10012 + 0.00004 * math.sin(s), 6)] for s in range(1, 41)]
    message = {
        "node": "5",
        "kind": "textual_inversion",
        "status": "running",
        "step": 40,
        "total": 40,
        "loss": points[-1][1],
        "loss_smoothed": points[-1][1],
        "elapsed_s": 4.0,
        "eta_s": 0.0,
        "points": points,
    }
    assert browser.dispatch(EVENT, message) is True
    wait_step(browser, 5, 40)
    browser.wait(
        f"(() => !!app.graph.getNodeById(arg)?.widgets?.find((w) => w.name === '{WIDGET}')?.element.querySelector('canvas')?.dataset.yLabels)()",
        arg=5,
    )
    labels = widget_state(browser, 5)["yLabels"].split("|")
    assert len(labels) >= 2 and len(set(labels)) == len(labels), labels
    values = [float(v) for v in labels]
    assert values == sorted(values, reverse=True), "top to bottom"
    assert all(0.1 < v < 0.1003 for v in values), labels
    assert page_errors(browser)[errors_before:] == []
