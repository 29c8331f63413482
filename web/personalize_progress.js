// Live training progress for comfyui-personalize (Textual Inversion / DreamBooth).
//
// The Python side sends `personalize.training` messages (PromptServer.send_sync) with
//   { node, kind, status, step, total, loss, loss_smoothed, losses, elapsed_s, eta_s, points }
// where `points` holds only the [step, loss_smoothed] pairs that are new since the previous
// message. This extension accumulates them per node and shows, on the node, a DOM widget with
// "step N / total", the current and smoothed loss, elapsed time and ETA, the status, and a
// small chart of the smoothed loss (plus one line per named loss when `losses` has several).
//
// The widget is never serialized (no widgets_values entry, no prompt input). Every handler is
// guarded: malformed or unexpected messages are ignored and logged once, never thrown.
//
// It also migrates the widget values of workflows saved before a node lost an input
// (WIDGET_MIGRATIONS), so they load with every value where it belongs.
//
// Served by ComfyUI at /extensions/<pack folder>/personalize_progress.js, so the front end's
// module shims are two levels up (/scripts/app.js, /scripts/api.js).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "personalize.training";
const WIDGET_NAME = "personalize_progress";
const WIDGET_TYPE = "personalize_progress";
const TRAINING_NODE_TYPES = new Set(["PersonalizeTrainTextualInversion", "PersonalizeDreamBoothFinetune"]);
const MAX_POINTS = 2000; // per series; older points are merged pairwise beyond this
const MIN_HEIGHT = 170; // widget height (graph units) once data arrived; 0 before
const MAX_HEIGHT = 320;
const MIN_NODE_WIDTH = 320;
const KNOWN_STATUS = new Set(["running", "done", "cancelled", "error"]);
const FINISHED = new Set(["done", "cancelled", "error"]);
const MAIN_COLOR = "#4da3ff";
const NAME_COLORS = ["#f5a623", "#5cd38c", "#ef5da8", "#b68cff", "#f2e86d", "#6ee7e7"];

// ------------------------------------------------------------------------------------------
// Error handling: never throw into the app; report the first problem of each kind once.
const reported = new Set();
function logOnce(where, err) {
  if (reported.has(where)) return;
  reported.add(where);
  try {
    console.warn(`[personalize] progress extension: ${where} failed (further ones are not logged)`, err);
  } catch {
    /* console unavailable */
  }
}
function guard(where, fn) {
  return function guarded(...args) {
    try {
      return fn.apply(this, args);
    } catch (err) {
      logOnce(where, err);
      return undefined;
    }
  };
}

// ------------------------------------------------------------------------------------------
// Value helpers
function toNumber(v) {
  // number (NaN/Infinity kept), numeric string, else null
  if (typeof v === "number") return v;
  if (typeof v === "string" && v.trim() !== "") {
    const n = Number(v);
    return Number.isNaN(n) && !/^\s*[+-]?nan\s*$/i.test(v) ? null : n;
  }
  return null;
}
function toCount(v) {
  const n = toNumber(v);
  return n !== null && Number.isFinite(n) ? Math.max(0, Math.round(n)) : null;
}
function sig3(v) {
  if (v === null || v === undefined) return "–";
  if (!Number.isFinite(v)) return String(v);
  if (v === 0) return "0";
  return String(parseFloat(v.toPrecision(3)));
}
// Tick labels with as many significant digits as it takes to tell them apart (3 to 7):
// a loss that moves in its fourth digit must not label every grid line "0.1".
function tickLabels(values) {
  let labels = values.map(sig3);
  for (let digits = 4; digits <= 7 && new Set(labels).size < labels.length; digits++) {
    labels = values.map((v) => (v === 0 ? "0" : String(parseFloat(v.toPrecision(digits)))));
  }
  return labels;
}
function clock(seconds) {
  if (seconds === null || !Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}
function shortText(v, max = 40) {
  const s = String(v);
  return s.length > max ? s.slice(0, max - 1) + "…" : s;
}

// ------------------------------------------------------------------------------------------
// Styles (once)
function injectStyle() {
  if (document.getElementById("personalize-progress-style")) return;
  const style = document.createElement("style");
  style.id = "personalize-progress-style";
  style.textContent = `
.personalize-progress { box-sizing: border-box; width: 100%; height: 100%; display: flex;
  flex-direction: column; gap: 3px; padding: 4px 6px; overflow: hidden; border-radius: 6px;
  background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd);
  font: 11px/1.35 Inter, Arial, system-ui, sans-serif; font-variant-numeric: tabular-nums;
  pointer-events: none; }
.personalize-progress.pp-empty { display: none; }
.personalize-progress .pp-header { display: flex; flex-direction: column; gap: 2px; flex: none; }
.personalize-progress .pp-row { display: flex; gap: 8px; justify-content: space-between; white-space: nowrap; }
.personalize-progress .pp-row > span { overflow: hidden; text-overflow: ellipsis; min-width: 0; }
.personalize-progress .pp-row > span:last-child { flex: none; }
.personalize-progress .pp-names { display: block; color: var(--descrip-text, #999); overflow: hidden; text-overflow: ellipsis; }
.personalize-progress .pp-names:empty { display: none; }
.personalize-progress .pp-status { font-weight: 600; }
.personalize-progress .pp-status::before { content: "●"; margin-right: 4px; }
.personalize-progress[data-status="running"] .pp-status { color: #4da3ff; }
.personalize-progress[data-status="done"] .pp-status { color: #5cd38c; }
.personalize-progress[data-status="cancelled"] .pp-status { color: #aaa; }
.personalize-progress[data-status="error"] .pp-status { color: #ff6b6b; }
.personalize-progress .pp-bar { height: 3px; border-radius: 2px; background: rgba(128,128,128,.3); flex: none; }
.personalize-progress .pp-fill { height: 100%; width: 0; border-radius: 2px; background: #4da3ff; }
.personalize-progress[data-status="done"] .pp-fill { background: #5cd38c; }
.personalize-progress[data-status="cancelled"] .pp-fill { background: #888; }
.personalize-progress[data-status="error"] .pp-fill { background: #ff6b6b; }
.personalize-progress canvas.pp-chart { display: block; width: 100%; flex: 1 1 0; min-height: 0; }
`;
  document.head.appendChild(style);
}

// ------------------------------------------------------------------------------------------
// Per-node state, keyed by node object (a reloaded graph starts clean).
const states = new WeakMap();
const canvasToState = new WeakMap();
const dirty = new Set();
let frameRequested = false;
let resizeObserver = null;

function newSeries() {
  return { pts: [] };
}
function resetRun(state) {
  state.main = newSeries();
  state.names = new Map();
  state.received = 0;
  state.step = null;
  state.total = null;
  state.status = null;
  state.kind = null;
  state.loss = null;
  state.lossSmoothed = null;
  state.losses = null;
  state.elapsed = null;
  state.eta = null;
}

function pushPoint(series, step, value) {
  const pts = series.pts;
  pts.push([step, value]);
  if (pts.length > MAX_POINTS) {
    // Merge neighbours pairwise: keeps the shape, halves the count; the newest point stays as is.
    const merged = [];
    const last = pts.length % 2 === 1 ? pts.pop() : null;
    for (let i = 0; i + 1 < pts.length; i += 2) {
      merged.push([pts[i + 1][0], (pts[i][1] + pts[i + 1][1]) / 2]);
    }
    if (last) merged.push(last);
    series.pts = merged;
  }
}

function buildElement() {
  injectStyle();
  const root = document.createElement("div");
  root.className = "personalize-progress pp-empty";
  for (const k of ["step", "total", "status", "loss"]) root.dataset[k] = "";
  const row = (...cls) => {
    const el = document.createElement("div");
    el.className = ["pp-row", ...cls].join(" ");
    return el;
  };
  const span = (cls) => {
    const el = document.createElement("span");
    el.className = cls;
    return el;
  };
  const status = span("pp-status");
  const stepEl = span("pp-step");
  const row1 = row();
  row1.append(status, stepEl);
  const bar = document.createElement("div");
  bar.className = "pp-bar";
  const fill = document.createElement("div");
  fill.className = "pp-fill";
  bar.append(fill);
  const lossEl = span("pp-loss");
  const time = span("pp-time");
  const row2 = row();
  row2.append(lossEl, time);
  const namesEl = row("pp-names");
  const header = document.createElement("div");
  header.className = "pp-header";
  header.append(row1, bar, row2, namesEl);
  const canvas = document.createElement("canvas");
  canvas.className = "pp-chart";
  canvas.dataset.points = "0";
  canvas.width = 1;
  canvas.height = 1;
  root.append(header, canvas);
  return { root, header, status, stepEl, time, fill, lossEl, namesEl, canvas };
}

function chain(original, extra) {
  return function chained(...args) {
    const r = original?.apply(this, args);
    try {
      extra.apply(this, args);
    } catch (err) {
      logOnce("node callback", err);
    }
    return r;
  };
}

/** The progress widget state of `node`, creating the widget if needed (null if impossible). */
function ensureWidget(node) {
  let state = states.get(node);
  if (state) return state;
  if (typeof node?.addDOMWidget !== "function") {
    logOnce("addDOMWidget", new Error("this front end has no LGraphNode.addDOMWidget"));
    return null;
  }
  const els = buildElement();
  state = { node, els, hasData: false, sized: false, lastId: null };
  resetRun(state);
  const widget = node.addDOMWidget(WIDGET_NAME, WIDGET_TYPE, els.root, {
    serialize: false, // not a prompt input (graphToPrompt)
    hideOnZoom: true,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => (state.hasData ? MIN_HEIGHT : 0),
    getMaxHeight: () => (state.hasData ? MAX_HEIGHT : 0),
    margin: 6,
  });
  widget.serialize = false; // not in the workflow's widgets_values (LGraphNode.serialize)
  state.widget = widget;
  states.set(node, state);
  canvasToState.set(els.canvas, state);
  resizeObserver?.observe(els.canvas);

  // Front ends up to 1.48 write one widgets_values entry per widget, a hole (null) for ours,
  // which would shift the values of any widget after it on reload: drop that hole. Newer ones
  // (1.53+) write no entry for it at all: then there is nothing to drop, and dropping by index
  // would cut a real value. So only a hole of the one-entry-per-widget layout is removed.
  node.onSerialize = chainFirst(node.onSerialize, function (o) {
    const values = o?.widgets_values;
    const i = this.widgets?.indexOf(widget) ?? -1;
    if (i < 0 || !Array.isArray(values) || values.length !== this.widgets.length) return;
    if (values[i] === null || values[i] === undefined || values[i] === "") values.splice(i, 1);
  });
  node.onRemoved = chain(node.onRemoved, () => {
    dirty.delete(state);
    resizeObserver?.unobserve(els.canvas);
  });
  return state;
}

function chainFirst(original, first) {
  return function chained(...args) {
    try {
      first.apply(this, args);
    } catch (err) {
      logOnce("node callback", err);
    }
    return original?.apply(this, args);
  };
}

// ------------------------------------------------------------------------------------------
// Messages
function findNode(id) {
  if (typeof id === "number" && Number.isFinite(id)) id = String(id);
  if (typeof id !== "string" || id.length > 200) return null;
  const graph = app.graph ?? app.rootGraph;
  if (!graph || typeof graph.getNodeById !== "function") return null;
  // "12:5" = node 5 inside the subgraph of node 12 (execution ids of subgraph contents).
  let node = null;
  let scope = graph;
  for (const part of id.split(":")) {
    if (!/^[\w.-]+$/.test(part) || !scope || typeof scope.getNodeById !== "function") return null;
    node = scope.getNodeById(part);
    // getNodeById looks the id up in a plain object: make sure this is the node with that id.
    if (!node || typeof node !== "object" || String(node.id) !== part) return null;
    scope = node.subgraph;
  }
  return node && typeof node.addDOMWidget === "function" ? node : null;
}

function onTraining(event) {
  const d = event?.detail;
  if (!d || typeof d !== "object" || Array.isArray(d)) return;
  const node = findNode(d.node);
  if (!node) return;
  const state = ensureWidget(node);
  if (!state) return;
  applyMessage(state, d);
  state.lastId = String(d.node);
  markDirty(state);
}

function applyMessage(state, d) {
  const step = toCount(d.step);
  const status = typeof d.status === "string" ? d.status : d.status == null ? null : String(d.status);
  const kind = typeof d.kind === "string" ? d.kind : null;
  // A new run: the step went back, the kind changed, or it runs again after it had finished.
  if (
    state.received > 0 &&
    ((step !== null && state.step !== null && step < state.step) ||
      (status === "running" && FINISHED.has(state.status)) ||
      (kind !== null && state.kind !== null && kind !== state.kind))
  ) {
    resetRun(state);
  }
  state.received++;
  state.hasData = true;
  if (step !== null) state.step = step;
  const total = toCount(d.total);
  if (total !== null) state.total = total;
  if (status !== null) state.status = status;
  if (kind !== null) state.kind = kind;
  // A final message may come without losses (e.g. on cancel): keep the last known ones then.
  const keep = FINISHED.has(state.status);
  if ("loss" in d && !(keep && d.loss == null)) state.loss = toNumber(d.loss);
  if ("loss_smoothed" in d && !(keep && d.loss_smoothed == null)) state.lossSmoothed = toNumber(d.loss_smoothed);
  if ("elapsed_s" in d) state.elapsed = toNumber(d.elapsed_s);
  if ("eta_s" in d) state.eta = toNumber(d.eta_s);

  if (Array.isArray(d.points)) {
    for (const p of d.points) {
      if (!Array.isArray(p) || p.length < 2) continue;
      const s = toNumber(p[0]);
      const v = toNumber(p[1]);
      if (s === null || v === null || !Number.isFinite(s) || !Number.isFinite(v)) continue;
      pushPoint(state.main, s, v);
    }
  }

  if (d.losses && typeof d.losses === "object" && !Array.isArray(d.losses)) {
    // Named losses besides the main one (e.g. DreamBooth's instance and prior terms):
    // one more line each when there are several. "loss" itself is the main line already.
    const named = [];
    for (const [name, raw] of Object.entries(d.losses)) {
      if (name === "loss" || named.length >= NAME_COLORS.length) continue;
      const v = toNumber(raw);
      if (v !== null) named.push([shortText(name, 24), v]);
    }
    if (named.length || !keep) state.losses = named.length ? named : null;
    if (named.length >= 2 && state.step !== null) {
      for (const [name, v] of named) {
        if (!Number.isFinite(v)) continue;
        let series = state.names.get(name);
        if (!series) state.names.set(name, (series = newSeries()));
        const last = series.pts[series.pts.length - 1];
        if (last && last[0] >= state.step) continue; // one point per step
        pushPoint(series, state.step, v);
      }
    }
  } else if ("losses" in d && !keep) {
    state.losses = null;
  }
}

function onInterrupted(status) {
  // The run stopped without a final message from the node (interrupt, crash): say so.
  return () => {
    const graph = app.graph;
    for (const node of graph?.nodes ?? []) {
      const state = states.get(node);
      if (state && state.status === "running") {
        state.status = status;
        markDirty(state);
      }
    }
  };
}

// ------------------------------------------------------------------------------------------
// Rendering, coalesced into one animation frame for all nodes.
function markDirty(state) {
  dirty.add(state);
  if (frameRequested) return;
  frameRequested = true;
  const raf = typeof requestAnimationFrame === "function" ? requestAnimationFrame : (f) => setTimeout(f, 16);
  raf(flush);
}

const flush = guard("render", function flush() {
  frameRequested = false;
  const todo = [...dirty];
  dirty.clear();
  // Read layout first, then write.
  const sizes = todo.map((s) => (s.hasData ? [s.els.canvas.clientWidth, s.els.canvas.clientHeight] : [0, 0]));
  let resized = false;
  todo.forEach((state, i) => {
    try {
      resized = renderState(state, sizes[i]) || resized;
    } catch (err) {
      logOnce("render", err);
    }
  });
  if (resized) {
    try {
      app.graph?.setDirtyCanvas?.(true, true);
    } catch (err) {
      logOnce("setDirtyCanvas", err);
    }
  }
});

function renderState(state, [w, h]) {
  const { els, node } = state;
  const root = els.root;
  let resized = false;
  if (!state.hasData) {
    root.classList.add("pp-empty");
    return false;
  }
  if (root.classList.contains("pp-empty")) {
    root.classList.remove("pp-empty");
    resized = true;
  }
  if (!state.sized) {
    // First data for this node: make room for the widget (never shrink the node).
    state.sized = true;
    try {
      const want = node.computeSize?.() ?? [0, 0];
      node.setSize?.([Math.max(node.size[0], MIN_NODE_WIDTH), Math.max(node.size[1], want[1])]);
    } catch (err) {
      logOnce("resize node", err);
    }
    resized = true;
  }

  const status = state.status ?? "";
  const stepText = state.step === null ? "–" : String(state.step);
  const totalText = state.total === null ? "?" : String(state.total);
  root.dataset.step = state.step === null ? "" : String(state.step);
  root.dataset.total = state.total === null ? "" : String(state.total);
  root.dataset.status = status;
  root.dataset.loss = state.loss === null ? "" : String(state.loss);
  root.dataset.lossSmoothed = state.lossSmoothed === null ? "" : String(state.lossSmoothed);
  root.dataset.kind = state.kind ?? "";
  root.dataset.node = state.lastId ?? "";

  const kindLabel =
    state.kind === "textual_inversion" ? "Textual Inversion" : state.kind === "dreambooth" ? "DreamBooth" : state.kind ? shortText(state.kind, 16) : "";
  const statusLabel = KNOWN_STATUS.has(status) ? status : status ? shortText(status, 16) : "…";
  els.status.textContent = kindLabel ? `${kindLabel} · ${statusLabel}` : statusLabel;
  els.stepEl.textContent = `step ${stepText} / ${totalText}`;
  els.time.textContent = `${clock(state.elapsed)} · ETA ${FINISHED.has(status) ? "–" : clock(state.eta)}`;
  els.time.title = "elapsed · estimated time left";
  const frac = state.total ? Math.min(1, Math.max(0, (state.step ?? 0) / state.total)) : 0;
  els.fill.style.width = `${(frac * 100).toFixed(1)}%`;
  const lossText = `loss ${sig3(state.loss)} · smoothed ${sig3(state.lossSmoothed)}`;
  els.lossEl.textContent = lossText;
  els.lossEl.title = lossText;
  const namesText = state.losses && state.losses.length >= 2 ? state.losses.map(([n, v]) => `${n} ${sig3(v)}`).join(" · ") : "";
  if (els.namesEl.textContent !== namesText) els.namesEl.textContent = namesText;
  els.namesEl.title = namesText;

  drawChart(state, w, h);
  return resized;
}

function drawChart(state, cssW, cssH) {
  const canvas = state.els.canvas;
  const series = [{ name: "smoothed", color: MAIN_COLOR, width: 1.6, pts: state.main.pts }];
  let ci = 0;
  for (const [name, s] of state.names) series.push({ name, color: NAME_COLORS[ci++ % NAME_COLORS.length], width: 1, pts: s.pts });
  canvas.dataset.points = String(state.main.pts.length);
  canvas.dataset.series = String(series.filter((s) => s.pts.length).length);
  if (!(cssW > 4 && cssH > 4)) return; // not laid out (hidden, collapsed): drawn on resize

  const ratio = Math.min(3, Math.max(1, window.devicePixelRatio || 1) * 2);
  const pw = Math.round(cssW * ratio);
  const ph = Math.round(cssH * ratio);
  if (canvas.width !== pw || canvas.height !== ph) {
    canvas.width = pw;
    canvas.height = ph;
  }
  const ctx = canvas.getContext("2d");
  if (!ctx) return;
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  ctx.font = "10px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace";
  ctx.textBaseline = "middle";

  let xMin = Infinity;
  let xMax = -Infinity;
  let yMin = Infinity;
  let yMax = -Infinity;
  for (const s of series) {
    for (const [x, y] of s.pts) {
      if (x < xMin) xMin = x;
      if (x > xMax) xMax = x;
      if (y < yMin) yMin = y;
      if (y > yMax) yMax = y;
    }
  }
  const axisColor = "rgba(160,160,160,0.9)";
  const gridColor = "rgba(128,128,128,0.22)";
  if (!Number.isFinite(xMin)) {
    ctx.fillStyle = axisColor;
    ctx.textAlign = "center";
    ctx.fillText("loss chart: waiting for data", cssW / 2, cssH / 2);
    return;
  }
  if (state.total && state.total > xMax) xMax = state.total; // x axis spans the whole run
  xMin = Math.min(xMin, 0);
  if (xMax <= xMin) xMax = xMin + 1;
  const useLog = yMin > 0 && yMax / yMin > 30;
  const fy = useLog ? Math.log10 : (v) => v;
  let lo = fy(yMin);
  let hi = fy(yMax);
  if (hi - lo < 1e-12) {
    const pad = Math.abs(hi) * 0.05 || 0.05;
    lo -= pad;
    hi += pad;
  } else {
    const pad = (hi - lo) * 0.06;
    lo -= pad;
    hi += pad;
  }
  const left = 40;
  const right = 6;
  const top = 4;
  const bottom = 13;
  const plotW = Math.max(1, cssW - left - right);
  const plotH = Math.max(1, cssH - top - bottom);
  const X = (x) => left + ((x - xMin) / (xMax - xMin)) * plotW;
  const Y = (y) => top + (1 - (fy(y) - lo) / (hi - lo)) * plotH;
  const unY = (t) => (useLog ? 10 ** t : t);

  // grid and labels
  ctx.lineWidth = 1;
  ctx.strokeStyle = gridColor;
  ctx.fillStyle = axisColor;
  ctx.textAlign = "right";
  const ticks = plotH > 60 ? 3 : 2;
  const tickAt = Array.from({ length: ticks }, (_, i) => hi - ((hi - lo) * (i + 0.5)) / ticks);
  const labels = tickLabels(tickAt.map(unY));
  canvas.dataset.yLabels = labels.join("|");
  tickAt.forEach((t, i) => {
    const py = Math.round(top + (1 - (t - lo) / (hi - lo)) * plotH) + 0.5;
    ctx.beginPath();
    ctx.moveTo(left, py);
    ctx.lineTo(left + plotW, py);
    ctx.stroke();
    ctx.fillText(labels[i], left - 4, py);
  });
  ctx.beginPath();
  ctx.moveTo(left + 0.5, top);
  ctx.lineTo(left + 0.5, top + plotH + 0.5);
  ctx.lineTo(left + plotW, top + plotH + 0.5);
  ctx.strokeStyle = axisColor;
  ctx.stroke();
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  ctx.fillText(String(Math.round(xMin)), left, top + plotH + 2);
  ctx.textAlign = "right";
  ctx.fillText(`${Math.round(xMax)} steps${useLog ? " · log y" : ""}`, left + plotW, top + plotH + 2);

  // lines (names first, the main smoothed loss on top)
  ctx.save();
  ctx.beginPath();
  ctx.rect(left, top, plotW, plotH);
  ctx.clip();
  ctx.lineJoin = "round";
  for (const s of [...series.slice(1), series[0]]) {
    if (!s.pts.length) continue;
    ctx.strokeStyle = s.color;
    ctx.lineWidth = s.width;
    ctx.beginPath();
    s.pts.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    if (s.pts.length === 1) {
      ctx.arc(X(s.pts[0][0]), Y(s.pts[0][1]), 1.5, 0, Math.PI * 2);
    }
    ctx.stroke();
  }
  ctx.restore();

  // legend when there are named lines
  if (series.length > 1) {
    ctx.textBaseline = "top";
    ctx.textAlign = "right";
    let y = top + 2;
    for (const s of series) {
      if (!s.pts.length) continue;
      ctx.fillStyle = s.color;
      ctx.fillText(s.name, left + plotW - 3, y);
      y += 11;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Saved workflows store widget values by position: when a node loses an input, the values of
// workflows saved before are fixed here before the node reads them.
const WIDGET_MIGRATIONS = {
  // 'repeats' (third widget: folder, path, repeats, on_bad_file, recursive, allow_any_path) was
  // removed: both trainers draw images uniformly, so it never changed what was trained.
  PersonalizeImageFolder(info) {
    const v = info?.widgets_values;
    if (Array.isArray(v) && v.length === 6 && typeof v[2] === "number") v.splice(2, 1);
  },
};

app.registerExtension({
  name: "personalize.trainingProgress",

  setup: guard("setup", function setup() {
    if (typeof ResizeObserver === "function") {
      resizeObserver = new ResizeObserver(
        guard("resize", (entries) => {
          for (const e of entries) {
            const state = canvasToState.get(e.target);
            if (state?.hasData) markDirty(state);
          }
        })
      );
    }
    api.addEventListener(EVENT, guard("message", onTraining));
    api.addEventListener("execution_interrupted", guard("interrupt", onInterrupted("cancelled")));
    api.addEventListener("execution_error", guard("execution error", onInterrupted("error")));
  }),

  beforeRegisterNodeDef: guard("beforeRegisterNodeDef", function beforeRegisterNodeDef(nodeType, nodeData) {
    const migrate = WIDGET_MIGRATIONS[nodeData?.name];
    if (migrate) {
      const configure = nodeType.prototype.configure;
      nodeType.prototype.configure = function configureMigrated(info, ...rest) {
        try {
          migrate(info);
        } catch (err) {
          logOnce("widget migration", err);
        }
        return configure.call(this, info, ...rest);
      };
    }
    if (!TRAINING_NODE_TYPES.has(nodeData?.name)) return;
    const original = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function onNodeCreated(...args) {
      const r = original?.apply(this, args);
      try {
        ensureWidget(this); // hidden until the first message arrives
      } catch (err) {
        logOnce("onNodeCreated", err);
      }
      return r;
    };
  }),
});
