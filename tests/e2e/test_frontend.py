"""The real frontend (1.32.9, served by the server) as the client, in headless Chromium via Playwright.

Every example workflow loads without missing node types and runs when queued through the UI; and the harness's
UI -> API converter agrees with the frontend's own ``graphToPrompt`` (on the examples and on a graph with the hard
cases: seed control values, primitive and reroute nodes, bypassed and muted nodes, a widget fed by a link).
"""

from __future__ import annotations

import json

import pytest
from harness.testbed import example_workflows, load_json
from harness.workflow_api import ui_to_api

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

WORKFLOWS = example_workflows()


def comparable(prompt: dict, object_info: dict) -> dict:
    """``{id: (class_type, inputs)}`` keeping only inputs the node declares (graphToPrompt also sends the values of
    frontend-only widgets such as ``control_after_generate``)."""
    out = {}
    for node_id, node in prompt.items():
        info = object_info.get(node["class_type"], {}).get("input", {})
        declared = set(info.get("required", {})) | set(info.get("optional", {}))
        out[node_id] = (node["class_type"], {k: v for k, v in node["inputs"].items() if k in declared})
    return out


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_and_runs_in_the_frontend(app_page, comfy_server, path):
    workflow = load_json(path)
    app_page.load_workflow(workflow)
    assert app_page.missing_node_types(workflow) == [], "node types unknown to the frontend"
    app_page.page.wait_for_timeout(500)  # let a missing-nodes dialog open, if there is one
    dialog = app_page.missing_nodes_dialog()
    assert dialog is None, f"missing-nodes dialog shown:\n{dialog}"
    prompt_id = app_page.queue_prompt()
    entry = comfy_server.wait_history(prompt_id, timeout=300)
    assert comfy_server.status_of(entry) == "success", json.dumps(comfy_server.error_messages(entry), indent=1)[:4000]
    assert entry["outputs"], f"{path.name} produced no output"
    images = comfy_server.output_images(entry)
    for image in images:
        assert image.is_file() and image.read_bytes()[:4] == b"\x89PNG", image
    # The saved workflow is embedded in every PNG through extra_pnginfo: check the UI sent it.
    extra = entry["prompt"][3]
    assert extra.get("extra_pnginfo", {}).get("workflow", {}).get("nodes"), "the UI did not send the workflow"


def test_missing_node_types_are_detected(app_page):
    """The check above is not vacuous: an unknown node type is reported, and the frontend shows its dialog."""
    workflow = load_json(WORKFLOWS[0]) if WORKFLOWS else {"nodes": [], "links": [], "version": 0.4}
    workflow["nodes"] = workflow["nodes"][:1] or [{"id": 1, "type": "", "pos": [0, 0], "size": [200, 80]}]
    workflow["nodes"][0]["type"] = "NextScaleNoSuchNode"
    app_page.load_workflow(workflow)
    assert app_page.missing_node_types(workflow) == ["NextScaleNoSuchNode"]
    app_page.page.wait_for_timeout(500)
    dialog = app_page.missing_nodes_dialog()
    assert dialog is not None and "NextScaleNoSuchNode" in dialog


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_converter_matches_the_frontend_on_examples(app_page, object_info, path):
    app_page.load_workflow(load_json(path))
    ours = ui_to_api(app_page.serialize(), object_info)
    theirs = app_page.graph_to_prompt()
    assert comparable(ours, object_info) == comparable(theirs, object_info)
    # And on the file as stored (before the frontend's load-time migrations).
    assert comparable(ui_to_api(load_json(path), object_info), object_info) == comparable(theirs, object_info)


HARD_GRAPH_JS = """
async () => {
  await app.loadGraphData();  // the frontend's default graph: checkpoint, 2 prompts, latent, KSampler, decode, save
  const g = app.graph;
  const byType = (t) => g._nodes.find((n) => n.type === t);
  const add = (type, pos, mode) => { const n = LiteGraph.createNode(type); n.pos = pos; g.add(n); if (mode) n.mode = mode; return n; };
  const slot = (node, name) => node.inputs.findIndex((i) => i.name === name);
  const ks = byType('KSampler'), latent = byType('EmptyLatentImage'), decode = byType('VAEDecode'),
        save = byType('SaveImage');
  ks.widgets.find((w) => w.name === 'seed').value = 1234;
  // a PrimitiveNode feeding the KSampler's steps widget (converted widget, value inlined)
  const prim = add('PrimitiveNode', [500, 700]);
  prim.connect(0, ks, slot(ks, 'steps'));
  prim.widgets[0].value = 7;
  // a real node feeding a widget input: PrimitiveInt -> EmptyLatentImage.width
  const pint = add('PrimitiveInt', [100, 700]);
  pint.widgets[0].value = 320;
  pint.connect(0, latent, slot(latent, 'width'));
  // a legacy Reroute and a bypassed ImageInvert between decode and save
  const reroute = add('Reroute', [1300, 500]);
  decode.connect(0, reroute, 0);
  const invert = add('ImageInvert', [1400, 500]);
  reroute.connect(0, invert, 0);
  invert.connect(0, save, 0);
  invert.mode = 4;
  // a muted second SaveImage, and a node fed only by it (its input is dropped)
  const muted = add('ImageInvert', [1400, 700], 2);
  decode.connect(0, muted, 0);
  const save2 = add('SaveImage', [1600, 700]);
  muted.connect(0, save2, 0);
  // a node with an upload widget (saved after the required widgets)
  const mask = add('LoadImageMask', [100, 900]);
  mask.widgets.find((w) => w.name === 'channel').value = 'red';
  g.setDirtyCanvas(true, true);
}
"""  # noqa: E501 (a line of the JavaScript above; wrapping it would change the string)


def test_converter_matches_the_frontend_on_hard_cases(app_page, object_info):
    app_page.evaluate(HARD_GRAPH_JS)
    workflow = app_page.serialize()
    theirs = app_page.graph_to_prompt()
    ours = ui_to_api(workflow, object_info)
    assert comparable(ours, object_info) == comparable(theirs, object_info)
    by_type = {n["class_type"]: n for n in ours.values() if n["class_type"] != "SaveImage"}
    assert by_type["KSampler"]["inputs"]["seed"] == 1234
    assert by_type["KSampler"]["inputs"]["steps"] == 7
    assert by_type["EmptyLatentImage"]["inputs"]["width"][1] == 0
    assert "ImageInvert" not in by_type
    assert by_type["LoadImageMask"]["inputs"]["channel"] == "red"
    # The same workflow after a save/load round trip in the frontend (legacy reroutes become native ones).
    app_page.load_workflow(workflow)
    assert comparable(ui_to_api(app_page.serialize(), object_info), object_info) == comparable(
        app_page.graph_to_prompt(), object_info
    )
