"""Saved workflows keep working: the nodes' schema may only grow compatibly from ``tests/schema_snapshot.json``.

The rules are in :func:`harness.schema_snapshot.compare` (tested here on small hand-made schemas); the current
schema comes from the real node classes inside ComfyUI's python. Regenerate the snapshot after an intended,
compatible change with ``.testbed/venv/bin/python tests/harness/schema_snapshot.py --write``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess

import pytest
from harness.schema_snapshot import REPO_ROOT, SNAPSHOT, compare, reduce_info
from harness.testbed import e2e_required, find_testbed

BASE = {
    "NextScaleThing": {
        "inputs": [
            {"name": "model", "type": "NEXTSCALE_GENERATOR", "optional": False, "widget": False},
            {"name": "file_name", "type": "COMBO", "optional": False, "widget": True, "dynamic": True},
            {"name": "mode", "type": "COMBO", "optional": False, "widget": True, "default": "a", "options": ["a", "b"]},
            {"name": "seed", "type": "INT", "optional": False, "widget": True, "default": 0, "min": 0, "max": 99,
             "control_after_generate": True},
            {"name": "strength", "type": "FLOAT", "optional": True, "widget": True, "default": 1.0, "min": 0.0,
             "max": 2.0},
        ],
        "outputs": [{"name": "tokens", "type": "NEXTSCALE_TOKENS"}],
        "deprecated": False,
    }
}


def changed(edit) -> dict:
    new = copy.deepcopy(BASE)
    edit(new["NextScaleThing"])
    return new


def inp(node: dict, name: str) -> dict:
    return next(i for i in node["inputs"] if i["name"] == name)


COMPATIBLE = {
    "identical": lambda n: None,
    "new-optional-input-appended": lambda n: n["inputs"].append(
        {"name": "extra", "type": "FLOAT", "optional": True, "widget": True, "default": 0.5}
    ),
    "new-optional-link-input-anywhere": lambda n: n["inputs"].insert(
        1, {"name": "guide", "type": "NEXTSCALE_GUIDE", "optional": True, "widget": False}
    ),
    "new-combo-option": lambda n: inp(n, "mode")["options"].append("c"),
    "dynamic-combo-options-change": lambda n: inp(n, "file_name").update(dynamic=True),
    "default-changed": lambda n: inp(n, "strength").update(default=1.5),
    "range-widened": lambda n: inp(n, "seed").update(min=-5, max=1000),
    "new-output-appended": lambda n: n["outputs"].append({"name": "image", "type": "IMAGE"}),
    "required-became-optional": lambda n: inp(n, "mode").update(optional=True),
}
BREAKING = {
    "input-removed": (lambda n: n["inputs"].pop(2), "mode: input removed or renamed"),
    "input-renamed": (lambda n: inp(n, "strength").update(name="weight"), "strength: input removed or renamed"),
    "new-required-input": (
        lambda n: n["inputs"].append({"name": "extra", "type": "INT", "optional": False, "widget": True}),
        "extra: new required input",
    ),
    "combo-option-removed": (lambda n: inp(n, "mode")["options"].remove("b"), "combo option(s) removed: ['b']"),
    "static-combo-became-other-list": (lambda n: inp(n, "mode").update(options=["x"]), "removed: ['a', 'b']"),
    "type-changed": (lambda n: inp(n, "seed").update(type="FLOAT"), "seed: type changed INT -> FLOAT"),
    "link-type-changed": (lambda n: inp(n, "model").update(type="MODEL"), "type changed NEXTSCALE_GENERATOR -> MODEL"),
    "min-raised": (lambda n: inp(n, "seed").update(min=1), "seed: min raised 0 -> 1"),
    "max-lowered": (lambda n: inp(n, "strength").update(max=1.0), "strength: max lowered 2.0 -> 1.0"),
    "optional-became-required": (lambda n: inp(n, "strength").update(optional=False), "optional input became required"),
    "control-after-generate-dropped": (
        lambda n: inp(n, "seed").pop("control_after_generate"),
        "control_after_generate",
    ),
    "widgets-reordered": (lambda n: n["inputs"].insert(1, n["inputs"].pop(3)), "widget order changed"),
    "optional-widget-inserted-in-the-middle": (
        lambda n: n["inputs"].insert(2, {"name": "extra", "type": "INT", "optional": True, "widget": True}),
        "extra: new widget inserted before an existing one",
    ),
    "output-type-changed": (lambda n: n["outputs"][0].update(type="IMAGE"), "output 0 type changed"),
    "output-removed": (lambda n: n["outputs"].clear(), "output 0 (tokens) removed"),
}


@pytest.mark.parametrize("name", list(COMPATIBLE))
def test_compatible_changes_pass(name):
    assert compare(BASE, changed(COMPATIBLE[name])) == []


def test_new_node_passes_and_removed_node_fails():
    grown = {**copy.deepcopy(BASE), "NextScaleOther": copy.deepcopy(BASE["NextScaleThing"])}
    assert compare(BASE, grown) == []
    assert compare(grown, BASE) == ["NextScaleOther: node removed (keep it, mark it deprecated, add a ...V2 id)"]


@pytest.mark.parametrize("name", list(BREAKING))
def test_breaking_changes_fail(name):
    edit, message = BREAKING[name]
    problems = compare(BASE, changed(edit))
    assert any(message in p for p in problems), problems


def test_reduce_info_marks_file_combos_dynamic():
    info = {
        "name": "NextScaleThing",
        "input": {"required": {"file_name": [["a.safetensors"], {"tooltip": "t"}],
                               "mode": ["COMBO", {"options": ["a", "b"], "default": "a"}],
                               "n": ["INT", {"default": 1, "min": 0, "max": 4}]},
                  "optional": {"model": ["NEXTSCALE_GENERATOR", {}]}},
        "input_order": {"required": ["file_name", "mode", "n"], "optional": ["model"]},
        "output": ["NEXTSCALE_TOKENS"], "output_name": ["tokens"],
    }
    probe = copy.deepcopy(info)
    probe["input"]["required"]["file_name"] = [["a.safetensors", "probe.safetensors"], {}]
    schema = reduce_info(info, probe)
    assert [i["name"] for i in schema["inputs"]] == ["file_name", "mode", "n", "model"]
    assert schema["inputs"][0] == {"name": "file_name", "type": "COMBO", "optional": False, "widget": True,
                                   "dynamic": True}
    assert schema["inputs"][1]["options"] == ["a", "b"] and schema["inputs"][2]["max"] == 4
    assert schema["inputs"][3] == {"name": "model", "type": "NEXTSCALE_GENERATOR", "optional": True, "widget": False}


def test_current_nodes_keep_saved_workflows_working():
    """The real nodes (inside ComfyUI's python) against the committed snapshot."""
    tb, why = find_testbed()
    if tb is None:
        if e2e_required():
            pytest.fail(f"{why} (NEXTSCALE_REQUIRE_E2E is set)", pytrace=False)
        pytest.skip(why)
    proc = subprocess.run(
        [str(tb.python), str(REPO_ROOT / "tests" / "harness" / "schema_snapshot.py"), "--print"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    current = json.loads(proc.stdout)
    snapshot = json.loads(SNAPSHOT.read_text())
    assert len(snapshot) >= 9 and "NextScaleSampler" in snapshot
    problems = compare(snapshot, current)
    assert not problems, (
        "these changes break saved workflows:\n" + "\n".join(problems) + "\n(an intended breaking change needs a new "
        "...V2 node id, the old node kept and marked deprecated; after a compatible change regenerate the snapshot: "
        ".testbed/venv/bin/python tests/harness/schema_snapshot.py --write)"
    )
    for node_id, schema in current.items():
        assert node_id.startswith("NextScale"), node_id
        for i in schema["inputs"]:
            assert i["type"] != "COMBO" or i.get("dynamic") or i.get("options"), f"{node_id}.{i['name']}: empty combo"
