"""Screenshot an example workflow in the real frontend (headless Chromium), after running it, for the README; and
``graph_picture``: a picture of a workflow's graph alone (the template thumbnail of a workflow that needs the user's
files, built by ``tests/harness/examples.py``).

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

# Frame every node in the part of the canvas that the frontend's bars leave free: the side bar on the left; the tabs,
# the run toolbar and its queue notice on top; the zoom controls at the bottom. LiteGraph draws graph point p at
# (p + offset) * scale.
FIT_JS = """() => {
    const el = app.canvas.canvas, title = LiteGraph.NODE_TITLE_HEIGHT;
    const free = {left: 80, top: 150, right: 24, bottom: 64};
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of app.graph._nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const w = el.clientWidth - free.left - free.right, h = el.clientHeight - free.top - free.bottom;
    const scale = Math.min(w / (x1 - x0), h / (y1 - y0), 1);
    app.canvas.low_quality_zoom_threshold = 0;  // draw the widgets at any zoom
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [free.left / scale - x0, free.top / scale - y0];
    app.graph.setDirtyCanvas(true, true);
}"""


# Draw node text at every zoom (the frontend's level-of-detail switch off).
FULL_DETAIL_JS = "async () => { await app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 0); }"


def _tidy(page) -> None:
    """Close what the frontend lays over the canvas (the release banner, the minimap), where it is present."""
    page.evaluate("() => { for (const b of document.querySelectorAll('button')) {"
                  " const bar = b.closest('div'); if (bar && bar.textContent.includes('Introducing Nodes 2.0')"
                  " && !b.textContent.includes('Try')) { b.click(); return; } } }")
    page.evaluate("async () => { try { await app.extensionManager.setting.set('Comfy.Minimap.Visible', false); }"
                  " catch (e) {} }")
    page.wait_for_timeout(300)


def graph_picture(server: ComfyServer, workflow: dict, width: int = 1200, height: int = 600) -> bytes:
    """PNG of ``workflow``'s graph as the frontend draws it (every node's text, at any zoom), framed in a
    ``width`` x ``height`` part of the canvas."""
    from playwright.sync_api import sync_playwright

    free = {"left": 80, "top": 150, "right": 24, "bottom": 64}  # as in FIT_JS
    viewport = {"width": width + free["left"] + free["right"], "height": height + free["top"] + free["bottom"]}
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_context(viewport=viewport).new_page()
            app = AppPage(page, server.url).open()
            app.evaluate(FULL_DETAIL_JS)
            app.load_workflow(workflow)
            _tidy(page)
            app.evaluate(FIT_JS)
            page.wait_for_timeout(500)
            return page.screenshot(clip={"x": free["left"], "y": free["top"], "width": width, "height": height})
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", help="a workflow name in workflows/")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--size", default="2400x900", help="viewport WIDTHxHEIGHT")
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
                    _tidy(page)
                    app.evaluate(FIT_JS)
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
