"""Build a UI-format workflow in the real frontend from an API-format prompt, and save it as the frontend does.

    .testbed/venv/bin/python tests/harness/build_workflow.py PROMPT_API.json workflows/NAME.json

The prompt is loaded with ``app.loadApiJson`` (nodes, links and widget values, laid out by the frontend), and the
file written is ``app.graph.serialize()`` (format 0.4 as frontend 1.32.9 saves it), with a fresh workflow id. A
server from the test bed is started for it (``scripts/setup.sh --browser`` first).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.browser import AppPage, launch
from harness.comfy_server import ComfyServer
from harness.testbed import find_testbed, load_json
from harness.workflow_api import ui_to_api


def build(prompt: dict, server: ComfyServer) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            app = AppPage(page, server.url).open()
            app.load_api_prompt(prompt)
            workflow = app.serialize()
        finally:
            browser.close()
    if workflow.get("id", "").strip("0-") == "":
        workflow["id"] = str(uuid.uuid4())  # loadApiJson leaves the nil uuid
    return workflow


def _nodes(prompt: dict) -> dict:
    """What a prompt computes: each node's class and inputs (no titles or other metadata)."""
    return {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", type=Path, help="API-format prompt (JSON)")
    parser.add_argument("out", type=Path, help="UI-format workflow to write")
    args = parser.parse_args(argv)
    testbed, why = find_testbed()
    if testbed is None:
        parser.error(why)
    prompt = load_json(args.prompt)
    with tempfile.TemporaryDirectory(prefix="nextscale-build-") as base, ComfyServer(testbed, Path(base)) as server:
        workflow = build(prompt, server)
        # The saved workflow must convert back to the same prompt.
        back = ui_to_api(workflow, server.object_info())
        if _nodes(back) != _nodes(prompt):
            print(f"warning: the workflow converts back to a different prompt:\n{json.dumps(back, indent=1)}")
    args.out.write_text(json.dumps(workflow, indent=2) + "\n")
    print(args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
