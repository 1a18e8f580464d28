"""Screenshot an example workflow in the real frontend (headless Chromium), after running it, for the README.

    .testbed/venv/bin/python tests/harness/screenshot.py nextscale_inpaint docs/images/frontend_inpaint.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.browser import AppPage, launch
from harness.comfy_server import ComfyServer
from harness.testbed import WORKFLOWS_DIR, find_testbed, load_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", help="a workflow name in workflows/")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--size", default="1600x900", help="viewport WIDTHxHEIGHT")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    testbed, why = find_testbed()
    if testbed is None:
        raise SystemExit(why)
    width, height = (int(v) for v in args.size.split("x"))
    workflow = load_json(WORKFLOWS_DIR / f"{args.workflow}.json")
    with tempfile.TemporaryDirectory() as base:
        server = ComfyServer(testbed, Path(base)).start()
        try:
            with sync_playwright() as pw:
                browser = launch(pw)
                try:
                    page = browser.new_context(viewport={"width": width, "height": height}).new_page()
                    app = AppPage(page, server.url).open()
                    app.load_workflow(workflow)
                    prompt_id = app.queue_prompt()
                    entry = server.wait_history(prompt_id, timeout=300)
                    if server.status_of(entry) != "success":
                        raise SystemExit(f"{args.workflow} failed: {server.error_messages(entry)}")
                    page.wait_for_timeout(1500)  # let the image previews render
                    app.evaluate("() => { app.canvas.ds.scale = 0.8; app.canvas.ds.offset = [20, 10]; "
                                 "app.graph.setDirtyCanvas(true, true); }")
                    page.wait_for_timeout(500)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(args.out))
                finally:
                    browser.close()
        finally:
            server.stop()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
