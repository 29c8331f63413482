#!/usr/bin/env node
// Browser driver for the ComfyUI front end, used by the pytest browser tests.
//
// playwright-core (tests/package.json) drives the system Chromium (no browser download).
//
//   node drive.mjs --script steps.json          run a script, print ONE JSON line, exit
//   node drive.mjs --script -                   same, script on stdin
//   node drive.mjs --check                      prerequisites present? (one JSON line)
//   node drive.mjs --serve [--url URL]          read one JSON command per stdin line,
//                                               answer one JSON line per command
//
// A script is {"url": BASE_URL, "viewport": [w, h], "steps": [COMMAND, ...], "keep_going": false}.
// A COMMAND is {"op": NAME, ...}:
//   open        {url?, timeout_ms?}        load the app, wait for window.app, the graph and the
//                                          canvas; install the event recorder
//   load        {workflow | path, timeout_ms?}  app.loadGraphData(workflow) as drag and drop
//                                          does; returns nodes, missing node types, invalid
//                                          combo values and the dialogs/toasts that opened
//   queue       {timeout_ms?, batch?}      app.queuePrompt(0, batch) and wait for the run's
//                                          execution_success / execution_error /
//                                          execution_interrupted (or /history) -> status, outputs
//   eval        {expr, arg?}               value of a JS expression (may await); `app`, `api`
//                                          and `arg` are in scope
//   exec        {body, arg?}               run an async function body with app, api, arg
//   wait        {expr, arg?, timeout_ms?}  wait until the expression is truthy; its value
//   dispatch    {type, detail}             api.dispatchCustomEvent(type, detail): the path a
//                                          server message takes to extension listeners
//   screenshot  {path, node?, selector?, padding?, center?, full_page?}
//               node: a graph node id (clip to it; center: true centres it first)
//   viewport    {width, height}            resize the page (e.g. to screenshot a tall node)
//   press       {key}                      keyboard press (e.g. "Escape" closes a dialog)
//   click       {selector, timeout_ms?}
//   events      {types?, since?}           recorded api events (execution_*, executing, ...)
//   dialogs     {}                         open dialogs and toasts
//   errors      {}                         page errors and console errors so far
//   sleep       {ms}
//   close       {}                         (serve mode) close the browser and exit
// Every answer carries "ok"; failures have "error". The script result is
// {"ok", "results": [...], "pageErrors", "consoleErrors", "elapsed_ms"}.
//
// Environment: PERSONALIZE_CHROMIUM (default /usr/bin/chromium), PERSONALIZE_HEADFUL=1.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";

const CHROMIUM = process.env.PERSONALIZE_CHROMIUM || "/usr/bin/chromium";
const CHROMIUM_FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-dev-shm-usage",
];
const RECORDED_EVENTS = [
  "status",
  "execution_start",
  "execution_cached",
  "execution_success",
  "execution_error",
  "execution_interrupted",
  "executing",
  "executed",
  "progress",
  "promptQueued",
];

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function parseArgs(argv) {
  const args = { serve: false, script: null, url: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--serve") args.serve = true;
    else if (a === "--script") args.script = argv[++i];
    else if (a === "--url") args.url = argv[++i];
    else if (a === "--check") args.check = true;
    else if (a === "--help" || a === "-h") args.help = true;
    else throw new Error(`unknown argument ${a}`);
  }
  return args;
}

async function loadPlaywright() {
  try {
    return await import("playwright-core");
  } catch (err) {
    const e = new Error(`playwright-core is not installed (cd tests && npm ci): ${err.message}`);
    e.code = "NO_PLAYWRIGHT";
    throw e;
  }
}

class Driver {
  constructor() {
    this.context = null;
    this.page = null;
    this.profile = null;
    this.baseUrl = null;
    this.pageErrors = [];
    this.consoleErrors = [];
    this.viewport = { width: 1280, height: 800 };
  }

  async launch() {
    if (!fs.existsSync(CHROMIUM)) {
      const e = new Error(`no Chromium at ${CHROMIUM} (apt-get install chromium, or set PERSONALIZE_CHROMIUM)`);
      e.code = "NO_CHROMIUM";
      throw e;
    }
    const { chromium } = await loadPlaywright();
    this.profile = fs.mkdtempSync(path.join(os.tmpdir(), "personalize-chromium-"));
    this.context = await chromium.launchPersistentContext(this.profile, {
      executablePath: CHROMIUM,
      headless: process.env.PERSONALIZE_HEADFUL !== "1",
      args: CHROMIUM_FLAGS,
      viewport: this.viewport,
      deviceScaleFactor: 1,
      timeout: 60000,
    });
    this.page = this.context.pages()[0] ?? (await this.context.newPage());
    this.page.on("pageerror", (err) => {
      this.pageErrors.push({ message: String(err?.message ?? err), stack: String(err?.stack ?? "").slice(0, 2000) });
    });
    this.page.on("console", (msg) => {
      if (msg.type() === "error" && this.consoleErrors.length < 500) {
        this.consoleErrors.push({ text: msg.text().slice(0, 2000), location: msg.location()?.url ?? "" });
      }
    });
  }

  async close() {
    try {
      await this.context?.close();
    } finally {
      if (this.profile) fs.rmSync(this.profile, { recursive: true, force: true });
    }
  }

  // Evaluate `fnSource` (an async function of (app, api, arg)) in the page.
  async inPage(fnSource, arg) {
    return this.page.evaluate(
      async ([src, a]) => {
        const api = window.comfyAPI?.api?.api;
        const AsyncFunction = Object.getPrototypeOf(async function () {}).constructor;
        const fn = new AsyncFunction("app", "api", "arg", src);
        return await fn(window.app, api, a);
      },
      [fnSource, arg === undefined ? null : arg]
    );
  }

  async run(cmd) {
    const op = cmd?.op;
    const fn = this[`op_${op}`];
    if (typeof fn !== "function") throw new Error(`unknown op ${JSON.stringify(op)}`);
    if (op !== "open" && op !== "close" && op !== "sleep" && !this.page) throw new Error("no page: run 'open' first");
    return fn.call(this, cmd);
  }

  // -- ops ---------------------------------------------------------------------------------
  async op_open(cmd) {
    const url = cmd.url ?? this.baseUrl;
    if (!url) throw new Error("open: no url");
    if (!this.context) await this.launch();
    const timeout = cmd.timeout_ms ?? 90000;
    await this.page.goto(url, { waitUntil: "load", timeout });
    await this.page.waitForFunction(
      // window.app is assigned once app.setup() (extensions included) has finished.
      () => window.app?.graph && window.app?.canvas && window.comfyAPI?.api?.api,
      null,
      { timeout, polling: 100 }
    );
    // Record api events from now on (listeners must exist before a prompt is queued).
    return this.inPage(
      `
      const d = (window.__drive = window.__drive || { events: [], seq: 0 });
      if (!d.installed) {
        d.installed = true;
        for (const type of arg.types) {
          api.addEventListener(type, (e) => {
            let detail = e.detail;
            try { detail = JSON.parse(JSON.stringify(detail ?? null)); } catch { detail = String(detail); }
            d.events.push({ seq: ++d.seq, type, detail, t: Date.now() });
            if (d.events.length > 5000) d.events.splice(0, 1000);
          });
        }
      }
      await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
      return {
        frontendVersion: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
        nodeTypes: Object.keys(window.LiteGraph?.registered_node_types ?? {}).length,
        extensions: (app.extensions ?? []).map((e) => e.name),
        nodes: app.graph.nodes.length,
      };
      `,
      { types: RECORDED_EVENTS }
    );
  }

  async op_load(cmd) {
    let workflow = cmd.workflow;
    if (!workflow && cmd.path) workflow = JSON.parse(fs.readFileSync(cmd.path, "utf8"));
    if (!workflow || typeof workflow !== "object") throw new Error("load: give workflow (object) or path");
    return this.inPage(
      `
      const wf = arg.workflow;
      const types = new Set();
      const collect = (nodes) => { for (const n of nodes ?? []) if (n?.type) types.add(n.type); };
      collect(wf.nodes);
      for (const sg of wf.definitions?.subgraphs ?? []) collect(sg.nodes);
      const subgraphIds = new Set((wf.definitions?.subgraphs ?? []).map((s) => s.id));
      const registered = window.LiteGraph?.registered_node_types ?? {};
      const missingNodeTypes = [...types].filter((t) => !(t in registered) && !subgraphIds.has(t));
      let loadError = null;
      try {
        await app.loadGraphData(wf, true, true, arg.name ?? null);
      } catch (e) {
        loadError = String(e?.stack ?? e);
      }
      await new Promise((r) => setTimeout(r, arg.settle_ms));
      const invalidWidgets = [];
      for (const node of app.graph.nodes) {
        for (const w of node.widgets ?? []) {
          const values = w?.options?.values;
          if (w.type === "combo" && Array.isArray(values) && values.length && !values.includes(w.value)) {
            invalidWidgets.push({ node: node.id, type: node.type, widget: w.name, value: w.value });
          }
        }
      }
      return {
        loadError,
        missingNodeTypes,
        invalidWidgets,
        nodes: app.graph.nodes.map((n) => ({ id: n.id, type: n.type, title: n.title, mode: n.mode,
          widgets: (n.widgets ?? []).map((w) => w.name) })),
      };
      `,
      { workflow, name: cmd.name ?? null, settle_ms: cmd.settle_ms ?? 300 }
    ).then(async (r) => {
      const ui = await this.op_dialogs();
      const missingDialog = ui.dialogs.find((d) => d.key === "global-load-workflow-warning");
      return {
        ...r,
        missingNodesDialog: missingDialog ? { types: missingDialog.missingNodeTypes, text: missingDialog.text } : null,
        dialogs: ui.dialogs,
        toasts: ui.toasts,
        ok: !r.loadError && !r.missingNodeTypes.length && !missingDialog,
      };
    });
  }

  async op_dialogs() {
    return this.page.evaluate(() => {
      const text = (el) => (el?.innerText ?? "").replace(/\s+\n/g, "\n").trim().slice(0, 4000);
      const dialogs = [...document.querySelectorAll(".p-dialog")].map((el) => ({
        key: el.getAttribute("aria-labelledby") ?? "",
        title: text(el.querySelector(".p-dialog-header")),
        text: text(el),
        missingNodeTypes: [...el.querySelectorAll(".comfy-missing-nodes .node-type")].map((n) => n.textContent.trim()),
      }));
      const toasts = [...document.querySelectorAll(".p-toast-message")].map((el) => ({
        severity: [...el.classList].find((c) => c.startsWith("p-toast-message-") && c !== "p-toast-message-content") ?? "",
        text: text(el),
      }));
      return { dialogs, toasts };
    });
  }

  async op_queue(cmd) {
    const timeout = cmd.timeout_ms ?? 300000;
    const queued = await this.inPage(
      `
      const d = window.__drive;
      const since = d.seq;
      const original = api.queuePrompt;
      let response = null, error = null;
      api.queuePrompt = async function (...a) {
        try { response = await original.apply(this, a); return response; }
        catch (e) { error = { message: String(e?.message ?? e), response: e?.response ?? null }; throw e; }
      };
      let accepted;
      try { accepted = await app.queuePrompt(0, arg.batch); } finally { api.queuePrompt = original; }
      return { since, accepted, response: response && JSON.parse(JSON.stringify(response)), error };
      `,
      { batch: cmd.batch ?? 1 }
    );
    const result = { accepted: queued.accepted, prompt_id: queued.response?.prompt_id ?? null };
    if (queued.error || !result.prompt_id) {
      const ui = await this.op_dialogs();
      return {
        ...result,
        status: "rejected",
        error: queued.error,
        node_errors: queued.error?.response?.node_errors ?? queued.response?.node_errors ?? null,
        dialogs: ui.dialogs,
      };
    }
    const t0 = Date.now();
    const done = await this.inPage(
      `
      const d = window.__drive;
      const end = Date.now() + arg.timeout;
      const terminal = { execution_success: "success", execution_error: "error", execution_interrupted: "interrupted" };
      let lastHistoryCheck = 0;
      while (Date.now() < end) {
        const ev = d.events.find((e) => e.seq > arg.since && terminal[e.type] && e.detail?.prompt_id === arg.id);
        if (ev) return { status: terminal[ev.type], detail: ev.detail };
        if (Date.now() - lastHistoryCheck > 2000) {
          lastHistoryCheck = Date.now();
          try {
            const h = await (await api.fetchApi("/history/" + arg.id)).json();
            const st = h?.[arg.id]?.status;
            if (st?.completed || st?.status_str === "error") {
              return { status: st.status_str === "success" || (st.completed && st.status_str !== "error") ? "success" : "error", detail: st };
            }
          } catch {}
        }
        await new Promise((r) => setTimeout(r, 100));
      }
      return { status: "timeout", detail: null };
      `,
      { id: result.prompt_id, since: queued.since, timeout }
    );
    const history = await this.inPage(
      `try { return (await (await api.fetchApi("/history/" + arg.id)).json())?.[arg.id] ?? null } catch { return null }`,
      { id: result.prompt_id }
    );
    const events = await this.inPage(
      `return window.__drive.events.filter((e) => e.seq > arg.since).map((e) => ({ type: e.type, detail: e.detail }))`,
      { since: queued.since }
    );
    return {
      ...result,
      status: done.status,
      detail: done.detail,
      duration_ms: Date.now() - t0,
      outputs: history?.outputs ?? null,
      history_status: history?.status ?? null,
      events: events.slice(-200),
    };
  }

  async op_eval(cmd) {
    if (typeof cmd.expr !== "string") throw new Error("eval: expr must be a string");
    return this.inPage(`return (${cmd.expr}\n);`, cmd.arg);
  }

  async op_exec(cmd) {
    if (typeof cmd.body !== "string") throw new Error("exec: body must be a string");
    return this.inPage(cmd.body, cmd.arg);
  }

  async op_wait(cmd) {
    if (typeof cmd.expr !== "string") throw new Error("wait: expr must be a string");
    const timeout = cmd.timeout_ms ?? 30000;
    const handle = await this.page.waitForFunction(
      ([src, a]) => {
        const api = window.comfyAPI?.api?.api;
        return new Function("app", "api", "arg", `return (${src}\n);`)(window.app, api, a);
      },
      [cmd.expr, cmd.arg ?? null],
      { timeout, polling: "raf" }
    );
    const value = await handle.jsonValue().catch(() => true);
    await handle.dispose();
    return value;
  }

  async op_dispatch(cmd) {
    return this.inPage(`return api.dispatchCustomEvent(arg.type, arg.detail);`, { type: cmd.type, detail: cmd.detail });
  }

  async op_screenshot(cmd) {
    if (!cmd.path) throw new Error("screenshot: path is required");
    fs.mkdirSync(path.dirname(path.resolve(cmd.path)), { recursive: true });
    const options = { path: cmd.path };
    if (cmd.node !== undefined && cmd.node !== null) {
      const box = await this.inPage(
        `
        const node = app.graph.getNodeById(arg.node);
        if (!node) throw new Error("screenshot: no node " + arg.node);
        if (arg.center) {
          app.canvas.centerOnNode(node);
          app.canvas.setDirty(true, true);
        }
        await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => requestAnimationFrame(r))));
        const [x, y, w, h] = node.boundingRect;
        const rect = app.canvas.canvas.getBoundingClientRect();
        const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([x, y]);
        const s = app.canvas.ds.scale;
        return { x: rect.left + cx, y: rect.top + cy, width: w * s, height: h * s };
        `,
        { node: cmd.node, center: cmd.center ?? true }
      );
      const pad = cmd.padding ?? 12;
      const vp = this.page.viewportSize() ?? this.viewport;
      const x = Math.max(0, box.x - pad);
      const y = Math.max(0, box.y - pad);
      options.clip = {
        x,
        y,
        width: Math.max(1, Math.min(vp.width - x, box.width + 2 * pad)),
        height: Math.max(1, Math.min(vp.height - y, box.height + 2 * pad)),
      };
      await this.page.screenshot(options);
      return { path: cmd.path, clip: options.clip };
    }
    if (cmd.selector) {
      await this.page.locator(cmd.selector).first().screenshot({ path: cmd.path });
      return { path: cmd.path, selector: cmd.selector };
    }
    options.fullPage = !!cmd.full_page;
    await this.page.screenshot(options);
    return { path: cmd.path };
  }

  async op_viewport(cmd) {
    this.viewport = { width: cmd.width ?? this.viewport.width, height: cmd.height ?? this.viewport.height };
    await this.page.setViewportSize(this.viewport);
    return this.viewport;
  }

  async op_press(cmd) {
    await this.page.keyboard.press(cmd.key ?? "Escape");
    return null;
  }

  async op_click(cmd) {
    await this.page.locator(cmd.selector).first().click({ timeout: cmd.timeout_ms ?? 10000 });
    return null;
  }

  async op_events(cmd) {
    return this.inPage(
      `return window.__drive.events.filter((e) => e.seq > arg.since && (!arg.types || arg.types.includes(e.type)))`,
      { since: cmd.since ?? 0, types: cmd.types ?? null }
    );
  }

  async op_errors() {
    return { pageErrors: this.pageErrors, consoleErrors: this.consoleErrors };
  }

  async op_sleep(cmd) {
    await new Promise((r) => setTimeout(r, cmd.ms ?? 0));
    return null;
  }

  async op_close() {
    await this.close();
    this.context = null;
    this.page = null;
    return null;
  }
}

// --check: are the prerequisites there? (no browser is started)
async function check() {
  const result = { ok: true, node: process.version, chromium: CHROMIUM, problems: [] };
  if (!fs.existsSync(CHROMIUM)) result.problems.push(`no Chromium at ${CHROMIUM} (apt-get install chromium)`);
  try {
    const pw = await loadPlaywright();
    result.playwright = pw.chromium ? "ok" : "no chromium export";
    const here = path.dirname(new URL(import.meta.url).pathname);
    for (const dir of [path.join(here, "..", "node_modules", "playwright-core"), path.join(here, "node_modules", "playwright-core")]) {
      try {
        result.playwrightVersion = JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8")).version;
        break;
      } catch {}
    }
  } catch (err) {
    result.problems.push(err.message);
  }
  result.ok = result.problems.length === 0;
  out(result);
  return result.ok ? 0 : 1;
}

function describe(err) {
  return { message: String(err?.message ?? err), code: err?.code ?? null, stack: String(err?.stack ?? "").slice(0, 3000) };
}

async function runScript(driver, script) {
  const t0 = Date.now();
  driver.baseUrl = script.url ?? null;
  if (Array.isArray(script.viewport)) driver.viewport = { width: script.viewport[0], height: script.viewport[1] };
  const results = [];
  let ok = true;
  for (const step of script.steps ?? []) {
    const s0 = Date.now();
    try {
      const value = await driver.run(step);
      results.push({ op: step.op, ok: true, value, ms: Date.now() - s0 });
    } catch (err) {
      ok = false;
      results.push({ op: step.op, ok: false, error: describe(err), ms: Date.now() - s0 });
      if (!script.keep_going) break;
    }
  }
  return { ok, results, pageErrors: driver.pageErrors, consoleErrors: driver.consoleErrors, elapsed_ms: Date.now() - t0 };
}

async function serve(driver, url) {
  driver.baseUrl = url;
  const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  out({ ok: true, ready: true });
  for await (const line of rl) {
    if (!line.trim()) continue;
    let cmd;
    try {
      cmd = JSON.parse(line);
    } catch (err) {
      out({ ok: false, error: describe(err) });
      continue;
    }
    const s0 = Date.now();
    try {
      const value = await driver.run(cmd);
      out({ ok: true, op: cmd.op, value, ms: Date.now() - s0, pageErrorCount: driver.pageErrors.length });
    } catch (err) {
      out({ ok: false, op: cmd.op, error: describe(err), ms: Date.now() - s0, pageErrorCount: driver.pageErrors.length });
    }
    if (cmd.op === "close") break;
  }
  await driver.close();
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (err) {
    out({ ok: false, error: describe(err) });
    return 2;
  }
  if (args.check) return check();
  if (args.help || (!args.serve && !args.script)) {
    process.stderr.write("usage: drive.mjs --script FILE|- | --serve [--url URL] | --check\n");
    return 2;
  }
  const driver = new Driver();
  if (args.serve) {
    await serve(driver, args.url);
    return 0;
  }
  let result;
  try {
    const text = args.script === "-" ? fs.readFileSync(0, "utf8") : fs.readFileSync(args.script, "utf8");
    const script = JSON.parse(text);
    if (args.url) script.url = args.url;
    result = await runScript(driver, script);
  } catch (err) {
    result = { ok: false, error: describe(err), results: [], pageErrors: driver.pageErrors, consoleErrors: driver.consoleErrors };
  } finally {
    await driver.close().catch(() => {});
  }
  out(result);
  return result.ok ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    out({ ok: false, error: describe(err) });
    process.exit(1);
  }
);
