"""Fixtures for end-to-end tests in a real browser against a real ComfyUI server.

- ``comfy_server`` (session): ComfyUI's main.py in a subprocess (same Python as pytest) on a
  free port, with a temporary base directory in which custom_nodes/comfyui-personalize links
  to this pack. Yields a ``comfy_process.ComfyServer`` (``.url``, ``.base_dir``, ``.log_path``).
  If any test of the session failed, its log is kept as tests/artifacts/comfyui-server.log
  (and the driver's stderr as tests/artifacts/drive.log).
- ``browser`` (session): ``browser_driver.Browser`` (drive.mjs: playwright-core + system Chromium),
  already opened on the app. Failing tests leave a screenshot and the page errors in
  tests/artifacts/<test name>.png / .errors.json.

Browser tests skip when Node.js, tests/node_modules/playwright-core or Chromium is missing,
unless PERSONALIZE_REQUIRE_BROWSER=1 (CI), which makes them fail instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

BROWSER_DIR = Path(__file__).resolve().parent
TESTS_DIR = BROWSER_DIR.parent
sys.path.insert(0, str(BROWSER_DIR))

from browser_driver import Browser, check_prerequisites  # noqa: E402
from comfy_process import ARTIFACTS_DIR, ComfyServer  # noqa: E402


def browser_required() -> bool:
    return os.environ.get("PERSONALIZE_REQUIRE_BROWSER", "") not in ("", "0")


def _comfyui_dir(config) -> Path:
    """The ComfyUI checkout the tests run against (comfyui_runtime's search order)."""
    import comfyui_runtime

    try:
        return comfyui_runtime.find_comfyui()
    except comfyui_runtime.ComfyUINotFound as error:
        pytest.fail(str(error))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def browser_prerequisites() -> str:
    ok, reason = check_prerequisites()
    if not ok:
        message = f"browser tests need Node.js, playwright-core (cd tests && npm ci) and Chromium: {reason}"
        if browser_required():
            pytest.fail(message + " [PERSONALIZE_REQUIRE_BROWSER=1]", pytrace=False)
        pytest.skip(message)
    return reason


@pytest.fixture(scope="session")
def comfy_server(request, browser_prerequisites):
    server = ComfyServer(_comfyui_dir(request.config), python=sys.executable)
    failed_before = request.session.testsfailed
    try:
        server.start()
    except Exception:
        if server.log_path.exists():
            server.save_log("comfyui-server.log")
        server.cleanup()
        raise
    try:
        yield server
    finally:
        server.stop()
        if request.session.testsfailed > failed_before:
            server.save_log("comfyui-server.log")
            drive_log = server.base_dir / "drive.log"
            if drive_log.is_file() and drive_log.stat().st_size:
                shutil.copyfile(drive_log, ARTIFACTS_DIR / "drive.log")
        server.cleanup()


@pytest.fixture(scope="session")
def browser(comfy_server):
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    b = Browser(comfy_server.url, log_path=comfy_server.base_dir / "drive.log")
    try:
        b.open()
        yield b
    finally:
        b.close()


@pytest.fixture(autouse=True)
def _browser_failure_artifacts(request):
    """On failure of a test that used the browser: screenshot + page/console errors."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed or "browser" not in request.fixturenames:
        return
    b = request.getfixturevalue("browser")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    try:
        b.screenshot(ARTIFACTS_DIR / f"{name}.png")
        (ARTIFACTS_DIR / f"{name}.errors.json").write_text(json.dumps(b.errors(), indent=1))
    except Exception as e:  # the browser may be what broke
        (ARTIFACTS_DIR / f"{name}.errors.json").write_text(json.dumps({"artifact_error": str(e)}))
