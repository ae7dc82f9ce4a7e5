"""The notebook suite as a researcher meets it: this checkout's JupyterLab in a real (headless) Chromium.

Starts JupyterLab as `make lab` does (gvr_lab.lab.lab_command), double-clicks the quickstart in the
file browser, switches its preset line to smoke, runs all cells and checks what a researcher sees:
a notebook (not a text editor) on the project's kernel, no error output, figures inline, a compact
training cell, and nothing written under notebooks/ or into the committed figures/. Screenshots go
to runs/browser/. Chromium is Debian's (`.ci/run` installs it where apt-get and root are available),
driven by playwright with executable_path: playwright's own browser download is not used.
"""

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gvr_lab.lab import lab_command
from gvr_lab.study import NOTEBOOKS, REPO

CHROMIUM = next(filter(None, (shutil.which(name) for name in ("chromium", "chromium-browser"))), None)
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO / "runs" / "browser"
NOTEBOOK = "00_quickstart.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def api(base: str, token: str, path: str):
    with urllib.request.urlopen(f"{base}/api/{path}?token={token}", timeout=10) as response:
        return json.load(response)


@pytest.fixture
def lab(tmp_path):
    """This checkout's JupyterLab, its user settings in tmp_path (autosave off: the edited notebook
    must never be saved back; no news pop-up); yields (base url, token)."""
    settings = tmp_path / "settings"
    for plugin, values in {
        "docmanager-extension/plugin": {"autosave": False},
        "apputils-extension/notification": {"fetchNews": "false"},
    }.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = free_port(), "browser-test"
    command, env = lab_command(
        ["--no-browser", f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}"]
    )
    env.update(
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        GVR_LAB_WORKERS="2",  # the notebook's grid in the pool, as a user's runs (conftest sets 1)
    )
    log = (tmp_path / "lab.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                api(base, token, "status")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start: {(tmp_path / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed: .ci/run installs Debian's chromium where "
    "apt-get and root are available (apt-get install chromium)",
)
def test_quickstart_in_jupyterlab_at_smoke(lab, tmp_path):
    from playwright.sync_api import sync_playwright  # the dev extra; a missing package is a setup error

    base, token = lab
    started = time.time()
    before = {"notebooks": snapshot(NOTEBOOKS), "figures": snapshot(REPO / "figures")}
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1500, "height": 1000},
        )
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(f"{base}/lab?token={token}")
        page.dblclick(f".jp-DirListing-item[title^='Name: {NOTEBOOK}']")
        notebook = page.locator(".jp-NotebookPanel:visible")
        notebook.wait_for()  # a text editor would be a .jp-FileEditor
        status = page.get_by_text(re.compile(r"^.+ \| Idle$"))  # the status bar's "<kernel> | Idle"
        status.wait_for(timeout=120_000)
        kernel_status = status.inner_text()
        first_line = notebook.locator(".jp-CodeCell .cm-line").first  # the parameters cell's
        first_line.wait_for()
        page.screenshot(path=str(SCREENSHOTS / "opened.png"))
        assert first_line.inner_text().startswith('preset: str = "cpu"')
        first_line.click()
        page.keyboard.press("Home")
        page.keyboard.press("Shift+End")
        page.keyboard.type('preset: str = "smoke"  # smoke | cpu | gpu | paper')
        page.keyboard.press("Escape")
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").click()
        page.get_by_text("Run All Cells", exact=True).click()

        prompts = notebook.locator(".jp-CodeCell .jp-InputArea-prompt")
        deadline = time.monotonic() + 240
        time.sleep(2)  # the queued cells show "[*]" once the run has begun
        while "[*]:" in prompts.all_inner_texts() or not status.is_visible():  # stops early at an error
            assert time.monotonic() < deadline, f"cells still running: {prompts.all_inner_texts()}"
            time.sleep(1)
        executed = prompts.all_inner_texts()
        outputs = notebook.locator(".jp-OutputArea-output").all_inner_texts()
        stderr = notebook.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count()
        images = notebook.locator(".jp-OutputArea-output img").count()
        training = notebook.locator(".jp-CodeCell", has_text="train_grid").locator(".jp-OutputArea-output")
        training_text = "\n".join(training.all_inner_texts())
        training_images = training.locator("img").count()
        notebook.locator(".jp-CodeCell", has_text="train_grid").scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / "training.png"))
        notebook.locator(".jp-CodeCell").last.scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / "ran_all.png"))
        sessions = api(base, token, "sessions")
        specs = api(base, token, "kernelspecs")["kernelspecs"]
        browser.close()

    assert kernel_status == "Python (gvr_lab) | Idle"
    assert [s["kernel"]["name"] for s in sessions] == ["gvr_lab"]
    assert specs["gvr_lab"]["spec"]["argv"][0] == sys.executable  # this environment's Python, not another clone's
    assert stderr == 0 and not [o for o in outputs if "Traceback" in o], outputs
    assert "[ ]:" not in executed, executed
    assert images >= 2  # the live learning curve and the figure
    lines = [line for line in training_text.splitlines() if line.strip()]
    # the grid's status (its runs train in worker processes) above its live learning curve, then its repr
    assert [line.split(" ")[0] for line in lines] == ["grid", "[1/3]", "[2/3]", "[3/3]", "<3"], training_text
    assert lines[0].startswith("grid of 3 runs on 2 worker processes on this machine: 3 done"), training_text
    assert "Run(" not in training_text and training_images == 1
    study_line = next(o for o in outputs if o.startswith("quickstart · preset smoke")).strip()
    # this checkout's package, in the root's runs/, whatever the kernel's working directory (notebooks/)
    assert "runs: runs/smoke/quickstart/" in study_line and study_line.endswith(
        "figures: runs/smoke/figures/quickstart"
    )
    assert (REPO / "runs/smoke/figures/quickstart/accuracy.png").stat().st_mtime > started
    after = {"notebooks": snapshot(NOTEBOOKS), "figures": snapshot(REPO / "figures")}
    assert after == before, "JupyterLab or the notebook wrote under notebooks/ or figures/"
