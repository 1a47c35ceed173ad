"""The web UI in a real headless Chromium (Debian's ``chromium`` driven by Playwright): upload, choose a region,
discover, move a slider, and see an edited image that differs from the original; two clients at once.

Skipped when Playwright or Chromium is missing (``.ci/run`` installs both). Screenshots go to
``$LOCALDIFF_SCREENSHOTS`` if set (the README's come from there), else to the test's temporary folder.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from localdiff.images import to_pil

from conftest import texture

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(small_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "localdiff.cli", "serve", "--model", str(small_dir),
                                 "--port", str(port), "--steps", "6"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"the server exited: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"the server did not answer in 120 s: {log.read_text()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = os.environ.get("LOCALDIFF_SCREENSHOTS")
    path = Path(d) if d else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def face_file(folder: Path, seed: int) -> str:
    path = folder / f"face{seed}.png"
    to_pil(texture(16, seed=seed)[0]).save(path)
    return str(path)


def element_pixels(page, selector: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator(selector).screenshot())).convert("RGB"), dtype=float)


def start_session(page, url: str, image: str) -> None:
    page.goto(url)
    page.locator("#upload input[type=file]").set_input_files(image)
    page.locator("#regions img").wait_for(timeout=60_000)
    page.locator("#templates").get_by_label("eyes").check()
    page.wait_for_timeout(1500)  # the template change is queued like any request
    page.locator("#discover").click()
    page.locator("#dir0").wait_for(state="visible", timeout=180_000)
    page.locator("#original img").wait_for(timeout=60_000)


def drag_slider(page, elem: str, fraction: float) -> None:
    box = page.locator(f"{elem} input[type=range]").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * fraction, y, steps=5)
    page.mouse.up()


def wait_for_change(page, selector: str, before: np.ndarray, timeout_s: float = 120) -> np.ndarray:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if page.get_by_text("processing").count():  # a request is running: its overlay is no result
            page.wait_for_timeout(500)
            continue
        now = element_pixels(page, selector)
        if now.shape != before.shape or np.abs(now - before).mean() > 1.0:
            return now
        page.wait_for_timeout(500)
    return before


def test_upload_discover_slide(server, browser, shots, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    start_session(page, server, face_file(tmp_path, 1))
    original = element_pixels(page, "#original img")
    before = element_pixels(page, "#edited img")
    assert np.abs(before - original).mean() < 20  # at strength 0 the edit is the reconstruction
    status = page.get_by_text("local directions").first.inner_text()
    assert "with ratio" in status and "JIVE joint rank" not in status  # the default method, no JIVE-only line
    drag_slider(page, "#dir0", 0.95)
    after = wait_for_change(page, "#edited img", before)
    assert np.abs(after - before).mean() > 1.0, "the edited image did not change after moving the slider"
    assert np.abs(after - original).mean() > 1.0
    page.screenshot(path=str(shots / "webui.png"), full_page=True)
    page.close()


def test_two_clients_get_their_own_results(server, browser, shots, tmp_path):
    ctx_a, ctx_b = browser.new_context(), browser.new_context()  # separate cookies: separate sessions
    a, b = ctx_a.new_page(), ctx_b.new_page()
    for page, seed in ((a, 2), (b, 3)):
        page.goto(server)
        page.locator("#upload input[type=file]").set_input_files(face_file(tmp_path, seed))
    for page in (a, b):
        page.locator("#regions img").wait_for(timeout=60_000)
        page.locator("#templates").get_by_label("eyes").check()
    a.wait_for_timeout(1500)
    a.locator("#discover").click()  # both requests are queued at once
    b.locator("#discover").click()
    for page in (a, b):
        page.locator("#dir0").wait_for(state="visible", timeout=240_000)
        page.locator("#original img").wait_for(timeout=60_000)
    orig_a, orig_b = element_pixels(a, "#original img"), element_pixels(b, "#original img")
    assert np.abs(orig_a - orig_b).mean() > 5, "both clients show the same image"
    expected_a = np.asarray(Image.open(face_file(tmp_path, 2)).convert("RGB").resize(orig_a.shape[1::-1], Image.NEAREST), float)
    assert np.abs(orig_a - expected_a).mean() < np.abs(orig_b - expected_a).mean()  # a sees its own upload
    b.screenshot(path=str(shots / "webui_second_client.png"), full_page=True)
    ctx_a.close()
    ctx_b.close()


def test_bad_upload_gives_one_friendly_line_and_sliders_use_the_cli_range(server, browser, tmp_path):
    from localdiff.config import EDIT_RANGE

    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.goto(server)
    notes = tmp_path / "notes.png"
    notes.write_text("a text file named like an image")
    page.locator("#upload input[type=file]").set_input_files(str(notes))
    toast = page.get_by_text("not an image localdiff can read").first
    toast.wait_for(timeout=60_000)
    assert "/" not in toast.inner_text() and "notes" not in toast.inner_text()  # no temporary paths
    body = page.locator("body").inner_text()
    assert "Could not preprocess" not in body and "UnidentifiedImageError" not in body and "Traceback" not in body
    # the page recovers: a real upload afterwards works, and no component keeps an error badge
    start_session(page, server, face_file(tmp_path, 4))
    assert page.locator(".error").count() == 0 or not page.locator(".error").first.is_visible()
    slider = page.locator("#dir0 input[type=range]")
    assert float(slider.get_attribute("max")) == EDIT_RANGE and float(slider.get_attribute("min")) == -EDIT_RANGE
    page.close()
