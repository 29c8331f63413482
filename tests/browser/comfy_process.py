"""Run a real ComfyUI server (subprocess) with this pack installed, for browser tests.

(Not named server.py: ComfyUI's own top-level `server` module is already imported by
tests/conftest.py in the same process.)

The server gets a throw-away base directory (``--base-directory``)::

    BASE/custom_nodes/comfyui-personalize -> this pack (symlink)
    BASE/models/{checkpoints,embeddings,loras,...}
    BASE/input, BASE/output, BASE/temp, BASE/user/default/comfy.settings.json

so nothing is written into the ComfyUI checkout. The pack's front-end files are then
served by ComfyUI under ``/extensions/comfyui-personalize/``.

Usable without pytest::

    with ComfyServer(comfyui_dir) as server:
        print(server.url, server.base_dir)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui-personalize"
ARTIFACTS_DIR = PACK_DIR / "tests" / "artifacts"

# Front-end settings for a fresh user. TutorialCompleted: no first-run template browser.
# The canvas pair: with no stored value, front end 1.27's Comfy.Canvas.NavigationMode
# onChange sets them while they are not yet registered and throws a TypeError into the page
# at start-up; stored values equal to what it sets make those set() calls no-ops.
DEFAULT_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Canvas.NavigationMode": "legacy",
    "Comfy.Canvas.LeftMouseClickBehavior": "panning",
    "Comfy.Canvas.MouseWheelScroll": "zoom",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base_dir(base: Path, settings: dict | None = None) -> Path:
    """Lay out a ComfyUI base directory with this pack linked into custom_nodes."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(PACK_DIR, target_is_directory=True)
    for sub in ("checkpoints", "embeddings", "loras", "vae", "personalize_cache"):
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("input", "output", "temp"):
        (base / sub).mkdir(exist_ok=True)
    user = base / "user" / "default"
    user.mkdir(parents=True, exist_ok=True)
    settings_file = user / "comfy.settings.json"
    if not settings_file.exists():
        settings_file.write_text(json.dumps({**DEFAULT_SETTINGS, **(settings or {})}, indent=1))
    return base


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: have the kernel SIGKILL the server if the test process dies without cleaning up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class ServerError(RuntimeError):
    pass


class ComfyServer:
    """A ComfyUI ``main.py`` subprocess on 127.0.0.1:<free port>, on the CPU unless ``cpu=False``.

    ``url``: base URL (no trailing slash); ``base_dir``: its base directory;
    ``log_path``: its stdout+stderr. ``extra_args`` go to main.py as they are.
    """

    def __init__(
        self,
        comfyui_dir: Path | str,
        base_dir: Path | str | None = None,
        python: str | None = None,
        extra_args: list[str] | None = None,
        settings: dict | None = None,
        startup_timeout: float = 180.0,
        cpu: bool = True,
    ):
        self.comfyui_dir = Path(comfyui_dir)
        self.cpu = cpu
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="personalize-comfy-"))
        self.python = python or sys.executable
        self.extra_args = list(extra_args or [])
        self.settings = settings
        self.startup_timeout = startup_timeout
        self.port = 0
        self.url = ""
        self.log_path = self.base_dir / "comfyui-server.log"
        self.proc: subprocess.Popen | None = None
        self._log = None

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> ComfyServer:
        make_base_dir(self.base_dir, self.settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            self.python,
            "main.py",
            *(["--cpu"] if self.cpu else []),
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            "--dont-print-server",
            "--base-directory",
            str(self.base_dir),
            *self.extra_args,
        ]
        if not any(a.startswith("--database-url") for a in self.extra_args):
            # The default database lives inside the ComfyUI checkout: keep it in the base dir.
            cmd += ["--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}"]
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("TQDM_DISABLE", "1")
        self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115 (open while the server runs)
        self._log.write(f"(cwd {self.comfyui_dir})\n$ " + " ".join(cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.comfyui_dir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} while starting; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=5) as r:
                    if r.status == 200:
                        json.load(r)
                        return
            except (urllib.error.URLError, OSError, ValueError) as e:
                last_error = str(e)
            time.sleep(0.25)
        raise ServerError(
            f"ComfyUI did not answer /system_stats within {self.startup_timeout:.0f}s ({last_error}); log tail:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 15.0) -> int | None:
        """Terminate (SIGTERM to its process group), then kill after ``timeout``."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            code = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def cleanup(self) -> None:
        """Remove the base directory if this object made it."""
        if self._own_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers ----------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def save_log(self, name: str) -> Path:
        """Copy the server log to tests/artifacts/<name> and return that path."""
        ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
        dest = ARTIFACTS_DIR / name
        if self._log is not None:
            self._log.flush()
        shutil.copyfile(self.log_path, dest)
        return dest

    def get_json(self, route: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.load(r)

    def post_json(self, route: str, payload, timeout: float = 30.0):
        req = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)

    def node_types(self) -> set[str]:
        return set(self.get_json("/object_info", timeout=60))
