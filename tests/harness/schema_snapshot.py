"""Schema snapshot of every NextScale node, and the rules that keep saved workflows working.

    .testbed/venv/bin/python tests/harness/schema_snapshot.py --write   # regenerate tests/schema_snapshot.json
    .testbed/venv/bin/python tests/harness/schema_snapshot.py --print   # current schema as JSON on stdout
    .testbed/venv/bin/python tests/harness/schema_snapshot.py --check   # compare with the snapshot, exit 1 if broken

The schema is what ComfyUI serves on ``/object_info`` (``GET_NODE_INFO_V1``), reduced to what a saved workflow
depends on: node ids, inputs (name, section, type, widget or link, default, numeric range, static combo options,
``control_after_generate``), and outputs (type by index). Combos whose options come from files (model file lists, class
names read from model files) are recorded as ``"dynamic": true`` without options.

:func:`compare` is in the spirit of ComfyUI's own node-input-compat check: a change is breaking when it removes a node,
an input or an output, renames one (= remove + add), adds a required input, changes a type, removes a static combo
option, narrows a numeric range, toggles ``control_after_generate`` or inserts a widget before an existing one (UI
workflows store widget values by position). Appending optional inputs, adding nodes, outputs or combo options, and
changing defaults, tooltips or display names are fine. ``collect`` needs ComfyUI's python; ``compare`` only the
standard library.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = REPO_ROOT / "tests" / "schema_snapshot.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
PROBE_FILE = "__nextscale_schema_probe__.safetensors"
# Combos whose options depend on files but not through the folder's file list (class names read from the embedded
# model card and from generator files' metadata).
ALSO_DYNAMIC = {
    ("NextScaleSampler", "class_name"),
    ("NextScaleCollaborativeSampler", "class_name"),
    ("NextScaleTextEncodeT5", "text_encoder"),  # files in models/text_encoders
    ("NextScaleLoadLoRA", "lora_name"),  # files in models/loras
}


def _node_infos(file_list: list[str]) -> dict[str, dict]:
    import folder_paths
    from nextscale.nodes import NODE_MODULES

    original = folder_paths.get_filename_list
    folder_paths.get_filename_list = lambda folder: list(file_list) if folder == "nextscale" else original(folder)
    try:
        return {node.GET_NODE_INFO_V1()["name"]: node.GET_NODE_INFO_V1() for m in NODE_MODULES for node in m.NODES}
    finally:
        folder_paths.get_filename_list = original


def _options(spec: list) -> list | None:
    if isinstance(spec[0], list):
        return list(spec[0])
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return list(spec[1].get("options", []))
    return None


def reduce_info(info: dict, probe: dict | None = None) -> dict:
    """The compatibility-relevant part of one node's ``/object_info`` entry. ``probe`` is the same node's entry
    with a probe file in the model folder: combos that change with it are dynamic."""
    inputs = []
    for section in ("required", "optional"):
        specs = info["input"].get(section) or {}
        order = (info.get("input_order") or {}).get(section) or list(specs)
        for name in order:
            spec = specs[name]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            options = _options(spec)
            io_type = "COMBO" if options is not None else spec[0]
            entry = {"name": name, "type": io_type, "optional": section == "optional",
                     "widget": io_type in WIDGET_TYPES}
            if "default" in opts:
                entry["default"] = opts["default"]
            for key in ("min", "max"):
                if key in opts:
                    entry[key] = opts[key]
            if opts.get("control_after_generate"):
                entry["control_after_generate"] = True
            if options is not None:
                probe_specs = ((probe or {}).get("input", {}).get(section) or {}).get(name)
                dynamic = (info["name"], name) in ALSO_DYNAMIC or (
                    probe_specs is not None and _options(probe_specs) != options
                )
                if dynamic:
                    entry["dynamic"] = True
                else:
                    entry["options"] = options
            inputs.append(entry)
    outputs = [{"name": n, "type": t} for n, t in zip(info.get("output_name") or info["output"], info["output"])]
    return {"inputs": inputs, "outputs": outputs, "deprecated": bool(info.get("deprecated"))}


def collect() -> dict[str, dict]:
    """``{node_id: schema}`` of every node of the pack (run inside ComfyUI's python)."""
    plain, probed = _node_infos([]), _node_infos([PROBE_FILE])
    return {name: reduce_info(info, probed.get(name)) for name, info in sorted(plain.items())}


def _widgets(node: dict) -> list[str]:
    return [i["name"] for i in node["inputs"] if i["widget"]]


def compare(old: dict[str, dict], new: dict[str, dict]) -> list[str]:
    """Every change from ``old`` to ``new`` that would break a saved workflow (empty: compatible)."""
    problems = []
    for node_id, before in old.items():
        after = new.get(node_id)
        if after is None:
            problems.append(f"{node_id}: node removed (keep it, mark it deprecated, add a ...V2 id)")
            continue
        now = {i["name"]: i for i in after["inputs"]}
        was = {i["name"] for i in before["inputs"]}
        for inp in before["inputs"]:
            name, cur = inp["name"], now.get(inp["name"])
            where = f"{node_id}.{name}"
            if cur is None:
                problems.append(f"{where}: input removed or renamed")
                continue
            if cur["type"] != inp["type"]:
                problems.append(f"{where}: type changed {inp['type']} -> {cur['type']}")
            if inp["optional"] and not cur["optional"]:
                problems.append(f"{where}: optional input became required")
            if "min" in inp and cur.get("min", float("-inf")) > inp["min"]:
                problems.append(f"{where}: min raised {inp['min']} -> {cur.get('min')} (narrowed)")
            if "max" in inp and cur.get("max", float("inf")) < inp["max"]:
                problems.append(f"{where}: max lowered {inp['max']} -> {cur.get('max')} (narrowed)")
            if bool(inp.get("control_after_generate")) != bool(cur.get("control_after_generate")):
                problems.append(f"{where}: control_after_generate changed (shifts the saved widget values)")
            if "options" in inp and not cur.get("dynamic"):
                gone = [o for o in inp["options"] if o not in cur.get("options", [])]
                if gone:
                    problems.append(f"{where}: combo option(s) removed: {gone}")
        for cur in after["inputs"]:
            if cur["name"] not in was and not cur["optional"]:
                problems.append(f"{node_id}.{cur['name']}: new required input (add it as optional with a default)")
        old_widgets, new_widgets = _widgets(before), _widgets(after)
        kept = [w for w in new_widgets if w in old_widgets]
        if kept != [w for w in old_widgets if w in new_widgets]:
            problems.append(f"{node_id}: widget order changed {old_widgets} -> {new_widgets}")
        last_old = max((new_widgets.index(w) for w in kept), default=-1)
        for pos, w in enumerate(new_widgets):
            if w not in was and pos < last_old:
                problems.append(f"{node_id}.{w}: new widget inserted before an existing one (append it at the end)")
        for k, out in enumerate(before["outputs"]):
            if k >= len(after["outputs"]):
                problems.append(f"{node_id}: output {k} ({out['name']}) removed")
            elif after["outputs"][k]["type"] != out["type"]:
                problems.append(f"{node_id}: output {k} type changed {out['type']} -> {after['outputs'][k]['type']}")
    return problems


def _bootstrap() -> None:
    """Make ComfyUI and the pack importable (this file is run with ComfyUI's python)."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from harness.testbed import boot_comfyui, find_testbed

    tb, why = find_testbed()
    if tb is None:
        raise SystemExit(why)
    boot_comfyui(str(tb.comfy_dir), str(REPO_ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help=f"write {SNAPSHOT.relative_to(REPO_ROOT)}")
    ap.add_argument("--print", action="store_true", help="print the current schema as JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 when the current nodes break the snapshot")
    args = ap.parse_args()
    _bootstrap()
    current = collect()
    if args.print:
        print(json.dumps(current, indent=1))
    if args.write:
        SNAPSHOT.write_text(json.dumps(current, indent=1) + "\n")
        print(f"wrote {len(current)} nodes to {SNAPSHOT}", file=sys.stderr)
    if args.check:
        problems = compare(json.loads(SNAPSHOT.read_text()), current)
        print("\n".join(problems) or "compatible", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
