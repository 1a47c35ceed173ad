#!/usr/bin/env python
"""Remake the README's web UI screenshot (docs/images/webui.png): serve the embedded default model, upload a
shipped example face in headless Chromium, tick the eyes and mouth templates, discover, move the first slider
to the top of its range, and screenshot the page.

Needs ``pip install -e ".[webui,test]"`` and Debian's ``chromium``.

    python scripts/screenshot_webui.py --out docs/images/webui.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from localdiff.demo import DemoSettings

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "webui.png")
    p.add_argument("--face", type=Path, default=ROOT / "src" / "localdiff" / "examples" / "face_0.png")
    p.add_argument("--steps", type=int, default=DemoSettings.num_steps, help="DDIM steps of the server")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    server = subprocess.Popen([sys.executable, "-m", "localdiff", "serve", "--port", str(port), "--steps",
                               str(args.steps)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(url)
            page.locator("#upload input[type=file]").set_input_files(str(args.face))
            page.locator("#regions img").wait_for(timeout=60_000)
            for name in ("eyes", "mouth"):
                page.locator("#templates").get_by_label(name).check()
                page.wait_for_timeout(1500)
            page.locator("#discover").click()
            page.locator("#dir0").wait_for(state="visible", timeout=300_000)
            page.locator("#original img").wait_for(timeout=60_000)
            box = page.locator("#dir0 input[type=range]").bounding_box()
            y = box["y"] + box["height"] / 2
            page.mouse.move(box["x"] + box["width"] / 2, y)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.99, y, steps=5)
            page.mouse.up()
            page.wait_for_timeout(1000)
            while page.get_by_text("processing").count():
                page.wait_for_timeout(500)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
