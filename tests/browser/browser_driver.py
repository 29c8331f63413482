"""Python side of the browser driver: runs ``drive.mjs`` (Node.js + playwright-core + the system
Chromium) and talks to it in JSON lines.

    with Browser(server.url) as b:
        b.open()
        b.load(workflow)                 # dict: nodes, missingNodeTypes, dialogs, ok, ...
        b.queue(timeout=300)             # dict: status ("success"/"error"/...), outputs, ...
        b.eval("app.graph.nodes.length")
        b.screenshot("tests/artifacts/x.png", node=5)

``run_script(url, steps)`` runs a whole script in one ``drive.mjs --script`` call instead.
See drive.mjs for the commands.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

BROWSER_DIR = Path(__file__).resolve().parent
TESTS_DIR = BROWSER_DIR.parent
DRIVER = BROWSER_DIR / "drive.mjs"
DEFAULT_CHROMIUM = "/usr/bin/chromium"


class BrowserError(RuntimeError):
    def __init__(self, message: str, answer: dict | None = None):
        super().__init__(message)
        self.answer = answer or {}


def node_binary() -> str | None:
    return os.environ.get("PERSONALIZE_NODE") or shutil.which("node")


def check_prerequisites() -> tuple[bool, str]:
    """(ok, reason): node on PATH, playwright-core installed in tests/node_modules, Chromium present."""
    node = node_binary()
    if not node:
        return False, "Node.js (`node`) is not on PATH"
    try:
        r = subprocess.run([node, str(DRIVER), "--check"], capture_output=True, text=True, timeout=60, cwd=BROWSER_DIR)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"`node drive.mjs --check` failed: {e}"
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return False, f"`node drive.mjs --check` printed no JSON (rc {r.returncode}): {r.stderr.strip()[-500:]}"
    if not info.get("ok"):
        return False, "; ".join(info.get("problems") or ["drive.mjs --check failed"])
    return True, f"node {info.get('node')}, playwright-core {info.get('playwrightVersion')}, {info.get('chromium')}"


class Browser:
    """A ``drive.mjs --serve`` process: one Chromium, one page."""

    def __init__(self, url: str, log_path: Path | str | None = None, env: dict | None = None):
        self.url = url
        node = node_binary()
        if not node:
            raise BrowserError("Node.js is not on PATH")
        self._stderr_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="drive-", suffix=".log")[1])
        self._stderr = open(self._stderr_path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115 (open while the driver runs)
        self.proc = subprocess.Popen(
            [node, str(DRIVER), "--serve", "--url", url],
            cwd=BROWSER_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
        )
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        hello = self._next(60)
        if not hello.get("ready"):
            raise BrowserError(f"drive.mjs did not start: {hello}", hello)

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if line:
                self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise BrowserError(f"drive.mjs gave no answer within {timeout:.0f}s") from None
        if line is None:
            raise BrowserError(f"drive.mjs exited (rc {self.proc.poll()}); stderr: {self.stderr_tail()}")
        try:
            return json.loads(line)
        except ValueError:
            raise BrowserError(f"drive.mjs printed a non-JSON line: {line[:500]}") from None

    def stderr_tail(self, chars: int = 3000) -> str:
        self._stderr.flush()
        try:
            return self._stderr_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    # -- commands -------------------------------------------------------------------------
    def raw(self, op: str, timeout: float = 120.0, **args) -> dict:
        """Send one command; return the whole answer (ok, value | error, ms, pageErrorCount)."""
        if self.proc.poll() is not None:
            raise BrowserError(f"drive.mjs is not running (rc {self.proc.returncode}); stderr: {self.stderr_tail()}")
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._next(timeout)

    def cmd(self, op: str, timeout: float = 120.0, **args):
        """Send one command; return its value, raise BrowserError if it failed."""
        answer = self.raw(op, timeout=timeout, **args)
        if not answer.get("ok"):
            err = answer.get("error") or {}
            raise BrowserError(f"{op} failed: {err.get('message')}\n{err.get('stack', '')}", answer)
        return answer.get("value")

    def open(self, url: str | None = None, timeout: float = 120.0) -> dict:
        return self.cmd("open", timeout=timeout + 10, url=url or self.url, timeout_ms=int(timeout * 1000))

    def load(self, workflow: dict | None = None, path: str | Path | None = None, **kw) -> dict:
        args = {"workflow": workflow} if workflow is not None else {"path": str(path)}
        return self.cmd("load", **args, **kw)

    def queue(self, timeout: float = 300.0, batch: int = 1) -> dict:
        return self.cmd("queue", timeout=timeout + 30, timeout_ms=int(timeout * 1000), batch=batch)

    def eval(self, expr: str, arg=None, timeout: float = 60.0):
        return self.cmd("eval", timeout=timeout, expr=expr, arg=arg)

    def exec(self, body: str, arg=None, timeout: float = 60.0):
        return self.cmd("exec", timeout=timeout, body=body, arg=arg)

    def wait(self, expr: str, arg=None, timeout: float = 30.0):
        return self.cmd("wait", timeout=timeout + 10, expr=expr, arg=arg, timeout_ms=int(timeout * 1000))

    def dispatch(self, event_type: str, detail) -> bool:
        return self.cmd("dispatch", type=event_type, detail=detail)

    def screenshot(self, path: str | Path, **kw) -> dict:
        return self.cmd("screenshot", path=str(path), **kw)

    def close_dialogs(self, tries: int = 5) -> None:
        """Press Escape until no dialog is open."""
        for _ in range(tries):
            if not self.dialogs()["dialogs"]:
                return
            self.cmd("press", key="Escape")
            self.cmd("sleep", ms=200)

    def dialogs(self) -> dict:
        return self.cmd("dialogs")

    def errors(self) -> dict:
        """{"pageErrors": [...], "consoleErrors": [...]} since the browser started."""
        return self.cmd("errors")

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrowserError, OSError, ValueError):
                self.raw("close", timeout=30)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._stderr.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_script(url: str, steps: list[dict], timeout: float = 600.0, **script) -> dict:
    """Run ``steps`` in one ``drive.mjs --script -`` call; return its JSON result."""
    node = node_binary()
    if not node:
        raise BrowserError("Node.js is not on PATH")
    r = subprocess.run(
        [node, str(DRIVER), "--script", "-"],
        input=json.dumps({"url": url, "steps": steps, **script}),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BROWSER_DIR,
    )
    lines = r.stdout.strip().splitlines()
    if not lines:
        raise BrowserError(f"drive.mjs printed nothing (rc {r.returncode}); stderr: {r.stderr[-2000:]}")
    return json.loads(lines[-1])
