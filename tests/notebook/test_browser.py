"""End to end in a real browser: JupyterLab runs 06-dashboard.ipynb in Chromium.

JupyterLab starts on loopback with a fresh configuration (no token, a temporary
root directory, no browser of its own); headless Chromium, driven by Playwright,
opens the notebook, runs it up to its last cell (which closes the session), checks
that the dashboard widget rendered with instance rows, runs one more cell that
invokes a function, and waits for the widget's numbers to change. Screenshots go
to ``test-output/browser/``.

Needs Debian's ``chromium`` (``apt-get install chromium``; ``scripts/test.sh``
installs it when run as root) and the ``jupyterlab`` and ``playwright`` packages
of the test extra; Playwright's own browser download is not used.
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
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "06-dashboard.ipynb"
OUTPUT = ROOT / "test-output" / "browser"
CHROMIUM = os.environ.get("SPEAR_NB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WIDGET_ROWS = ".spear-nb-dashboard.jupyter-widgets .spear-nb-instance-row"

pytestmark = pytest.mark.timeout(300)


def _require_tools() -> None:
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(
            f"Chromium at {CHROMIUM} (Debian: apt-get install chromium; "
            "scripts/test.sh installs it when run as root)"
        )
    for module in ("playwright", "jupyterlab"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the Python package {module} (pip install -e '.[test]')")
    if missing:
        pytest.fail("the browser test needs " + " and ".join(missing), pytrace=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server politely, then its whole process group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture
def jupyterlab(tmp_path: Path) -> Iterator[str]:
    """A JupyterLab server on loopback serving a copy of the notebook."""
    _require_tools()
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    env = dict(os.environ)
    for name in ("config", "data", "runtime", "ipython", "settings", "workspaces"):
        (tmp_path / name).mkdir()
    env.update(
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        JUPYTER_DATA_DIR=str(tmp_path / "data"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        IPYTHONDIR=str(tmp_path / "ipython"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
        PYTHONPATH=str(ROOT),
    )
    # No "would you like news" prompt over the screenshots.
    notification = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    port = _free_port()
    log = open(tmp_path / "jupyterlab.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.allow_root=True",
            "--IdentityProvider.token=",
            "--ServerApp.password=",
            f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        env=env,
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    "JupyterLab did not start:\n"
                    + (tmp_path / "jupyterlab.log").read_text()[-3000:]
                )
            time.sleep(0.1)  # a bounded poll of the server's status
        yield url
    finally:
        _stop(process)
        log.close()
        OUTPUT.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "jupyterlab.log", OUTPUT / "jupyterlab.log")


def _close_cell_index() -> int:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    for index, cell in enumerate(cells):
        if cell["cell_type"] == "code" and "s.close()" in "".join(cell["source"]):
            return index
    raise AssertionError("06-dashboard.ipynb has no cell that closes the session")


def _requests_of(page, instance: str) -> str:  # type: ignore[no-untyped-def]
    return str(
        page.locator(
            f'{WIDGET_ROWS}[data-instance="{instance}"] .spear-nb-requests'
        ).first.text_content()
        or "".strip()
    )


def test_dashboard_renders_and_updates_in_jupyterlab(jupyterlab: str) -> None:
    from playwright.sync_api import sync_playwright

    OUTPUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1900})
            page.goto(f"{jupyterlab}/lab/tree/{NOTEBOOK.name}")
            page.wait_for_function(
                "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                " && window.jupyterapp.shell.currentWidget.sessionContext",
                timeout=90_000,
            )
            page.evaluate(
                """async () => {
                    const panel = window.jupyterapp.shell.currentWidget;
                    await panel.context.ready;
                    await panel.sessionContext.ready;
                }"""
            )
            page.wait_for_function(
                "() => window.jupyterapp.shell.currentWidget.sessionContext"
                ".session?.kernel?.status === 'idle'",
                timeout=90_000,
            )

            # Run every cell above the one that closes the session.
            ok = page.evaluate(
                """async (index) => {
                    const app = window.jupyterapp;
                    const panel = app.shell.currentWidget;
                    panel.content.activeCellIndex = index;
                    return await app.commands.execute('notebook:run-all-above');
                }""",
                _close_cell_index(),
            )
            assert ok, "a cell of 06-dashboard.ipynb failed in JupyterLab"
            page.wait_for_selector(WIDGET_ROWS, timeout=60_000)
            instances = page.locator(WIDGET_ROWS).evaluate_all(
                "rows => rows.map(r => r.dataset.instance)"
            )
            assert "square-2" in instances
            assert any(name.startswith("work-") for name in instances)
            before = _requests_of(page, "square-2")
            assert before == "1"
            dashboard = page.locator(".spear-nb-dashboard.jupyter-widgets").first
            dashboard.scroll_into_view_if_needed()
            dashboard.screenshot(path=str(OUTPUT / "06-dashboard-widget.png"))

            # A further invoke, in a new cell: the widget refreshes by itself.
            page.evaluate(
                """async () => {
                    const app = window.jupyterapp;
                    const panel = app.shell.currentWidget;
                    await app.commands.execute('notebook:insert-cell-above');
                    panel.content.activeCell.model.sharedModel.setSource(
                        'for x in range(3):\\n    s.invoke("square", x)');
                    return await app.commands.execute('notebook:run-cell');
                }"""
            )
            page.wait_for_function(
                """(selector) => {
                    const cell = document.querySelector(selector);
                    return cell && cell.textContent.trim() === '4';
                }""",
                arg=f'{WIDGET_ROWS}[data-instance="square-2"] .spear-nb-requests',
                timeout=30_000,
            )
            after = _requests_of(page, "square-2")
            assert after == "4" != before
            count = page.locator(
                ".spear-nb-dashboard.jupyter-widgets .spear-nb-execution-count"
            ).first.text_content()
            assert int(count) >= 70
            dashboard.scroll_into_view_if_needed()
            dashboard.screenshot(path=str(OUTPUT / "06-dashboard-after-invoke.png"))
            page.screenshot(path=str(OUTPUT / "06-dashboard-page.png"))

            # The same widget in the dark theme (it uses JupyterLab's variables).
            page.evaluate(
                "() => window.jupyterapp.commands.execute("
                "'apputils:change-theme', {theme: 'JupyterLab Dark'})"
            )
            page.wait_for_function(
                "() => document.body.dataset.jpThemeLight === 'false'",
                timeout=30_000,
            )
            dashboard.screenshot(path=str(OUTPUT / "06-dashboard-dark.png"))

            # Close the session (the notebook's last cell), then the kernel.
            page.evaluate(
                """async (index) => {
                    const app = window.jupyterapp;
                    const panel = app.shell.currentWidget;
                    panel.content.activeCellIndex = index;
                    await app.commands.execute('notebook:run-cell');
                    await panel.sessionContext.shutdown();
                }""",
                _close_cell_index() + 1,  # the inserted cell moved it down
            )
        finally:
            browser.close()
    elapsed = time.perf_counter() - started
    (OUTPUT / "timing.txt").write_text(f"browser part: {elapsed:.1f} s\n")
    # The kernel and everything it started are gone with the server (fixture).
    assert not [
        p
        for p in psutil.Process().children(recursive=True)
        if "chromium" in p.name() and p.is_running()
    ]
