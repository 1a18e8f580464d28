"""Run one example workflow on a real ComfyUI with this pack, and print where its output went.

    python tests/harness/demo.py [WORKFLOW] [--out DIR]       (scripts/demo.sh sets up the test bed and calls this)

WORKFLOW is a file in workflows/ (with or without .json) or a path; default: $NEXTSCALE_DEMO_WORKFLOW, else
nextscale_generate.json. The server (CPU, headless, a free loopback port, base directory .testbed/base) is started,
the UI-format workflow is converted to API format with /object_info and queued, and the server is stopped.
Images are copied to DIR (default .testbed/demo-output) and their absolute paths printed, the PNG last; text shown by
nodes is printed and saved next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.comfy_server import ComfyServer, PromptRejected, ServerError
from harness.testbed import TESTBED_DIR, WORKFLOWS_DIR, find_testbed, load_json
from harness.workflow_api import WorkflowConversionError, ui_to_api

DEFAULT_WORKFLOW = "nextscale_generate.json"


def resolve_workflow(name: str) -> Path:
    for candidate in (Path(name), WORKFLOWS_DIR / name, WORKFLOWS_DIR / f"{name}.json"):
        if candidate.is_file():
            return candidate.resolve()
    available = ", ".join(p.name for p in sorted(WORKFLOWS_DIR.glob("*.json"))) or "none"
    raise SystemExit(f"demo: no workflow {name!r} (workflows/: {available})")


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", nargs="?", default=os.environ.get("NEXTSCALE_DEMO_WORKFLOW") or DEFAULT_WORKFLOW)
    parser.add_argument("--out", type=Path, default=TESTBED_DIR / "demo-output", help="where outputs are copied")
    parser.add_argument("--base", type=Path, default=TESTBED_DIR / "base", help="ComfyUI --base-directory")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the workflow")
    args = parser.parse_args(argv)

    testbed, why = find_testbed()
    if testbed is None:
        raise SystemExit(f"demo: {why}")
    path = resolve_workflow(args.workflow)
    workflow = load_json(path)
    args.out.mkdir(parents=True, exist_ok=True)
    server = ComfyServer(testbed, args.base, log_path=args.out / "comfyui.log")
    log(f"starting ComfyUI ({testbed.comfy_dir}) with this pack; log: {server.log_path}")
    try:
        server.start()
        log(f"server up on {server.url} in {server.startup_s:.1f} s; running {path.name}")
        prompt = ui_to_api(workflow, server.object_info())
        t0 = time.monotonic()
        entry = server.run_prompt(prompt, timeout=args.timeout, extra_data={"extra_pnginfo": {"workflow": workflow}})
        elapsed = time.monotonic() - t0
        if server.status_of(entry) != "success":
            log(f"{path.name} failed:\n{json.dumps(server.error_messages(entry), indent=1)}{server.log_report(40)}")
            return 1
        log(f"{path.name} finished in {elapsed:.1f} s")
        texts = server.output_texts(entry)
        copied: list[Path] = []
        for node_id, lines in texts.items():
            text = "\n".join(lines)
            print(f"--- text shown by node {node_id} ---\n{text}")
            target = args.out / f"{path.stem}_node{node_id}.txt"
            target.write_text(text + "\n")
            copied.append(target.resolve())
        images = server.output_images(entry)
        for i, image in enumerate(images):
            target = args.out / (
                f"{path.stem}{image.suffix}" if len(images) == 1 else f"{path.stem}_{i:02d}{image.suffix}"
            )
            shutil.copyfile(image, target)
            copied.append(target.resolve())
        if not copied:
            log(f"{path.name} produced no image or text output")
            return 1
        if not images:
            log(f"{path.name} has no image output (text only)")
        for p in sorted(copied, key=lambda p: p.suffix == ".png"):
            print(p)
        return 0
    except (ServerError, PromptRejected, WorkflowConversionError) as e:
        log(f"error: {e}")
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
