"""The shipped example workflows match their definitions (tests/harness/examples.py) under the current node schemas.

Running them is the job of test_server_api.py (API) and test_frontend.py (the real frontend); here: no drift, the
pack version recorded, a thumbnail for the template browser, and the workflows that need a user's files validate up to
exactly those files.
"""

from __future__ import annotations

import json

import pytest
from harness.comfy_server import PromptRejected
from harness.examples import EXAMPLE_IMAGE, EXAMPLES, INPUT_DIR, pack_version
from harness.testbed import WORKFLOWS_DIR, example_workflows, load_json
from harness.workflow_api import CONTROL_VALUES, ui_to_api, with_widget_defaults

pytestmark = pytest.mark.e2e


def canonical(prompt: dict) -> list:
    """A prompt as a sorted list of nodes, links replaced by the canonical form of their source (id-free)."""
    memo: dict[str, str] = {}

    def value(v):  # the frontend stores 4.0 as 4
        return int(v) if isinstance(v, float) and v.is_integer() else v

    def node_key(node_id: str) -> str:
        if node_id not in memo:
            node = prompt[node_id]
            inputs = {
                k: (f"<{node_key(str(v[0]))}>[{v[1]}]" if isinstance(v, list) and len(v) == 2 else value(v))
                for k, v in sorted(node["inputs"].items())
            }
            memo[node_id] = json.dumps([node["class_type"], inputs], sort_keys=True)
        return memo[node_id]

    return sorted(node_key(i) for i in prompt)


def test_every_workflow_file_is_a_defined_example():
    shipped = {p.stem for p in WORKFLOWS_DIR.glob("*.json")}
    assert shipped == set(EXAMPLES), "workflows/ and tests/harness/examples.py disagree; rebuild with examples.py"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_workflow_matches_its_definition(object_info, name):
    example = EXAMPLES[name]
    workflow = load_json(WORKFLOWS_DIR / f"{name}.json")
    # widgets the definition leaves out (inputs added later, e.g. Decode's feather) at their defaults, as sent
    expected = with_widget_defaults(example.prompt, object_info)
    assert canonical(ui_to_api(workflow, object_info)) == canonical(expected), (
        f"{name}.json drifted from its definition; rebuild: .testbed/venv/bin/python tests/harness/examples.py {name}"
    )
    meta = workflow["extra"]["nextscale"]
    assert meta["version"] == pack_version() and meta["title"] == example.title
    assert meta["description"] == example.description
    for node in workflow["nodes"]:  # a reference picture or a calibration is saved "fixed", the rest "randomize"
        controls = [v for v in node.get("widgets_values") or [] if v in CONTROL_VALUES]
        expected = "fixed" if str(node["id"]) in example.fixed_seeds else "randomize"
        assert all(v == expected for v in controls), (name, node["id"], node["type"], controls)
    thumb = WORKFLOWS_DIR / f"{name}.jpg"
    assert thumb.is_file() and thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb.name}: missing or not a JPEG"


def test_every_thumbnail_is_its_own():
    """No workflow borrows another's thumbnail (those that need the user's files show their own graph)."""
    thumbs = {name: (WORKFLOWS_DIR / f"{name}.jpg").read_bytes() for name in EXAMPLES}
    assert len(set(thumbs.values())) == len(thumbs), "two workflows share a thumbnail"


def test_input_images_ship_with_the_workflows():
    assert (INPUT_DIR / EXAMPLE_IMAGE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_examples_are_listed_as_templates(comfy_server):
    listed = comfy_server.get("/workflow_templates")
    names = next((v for k, v in listed.items() if "nextscale" in k.lower()), [])
    assert set(names) == set(EXAMPLES), listed


@pytest.mark.parametrize("name", sorted(n for n, e in EXAMPLES.items() if e.needs_user_files))
def test_workflow_needing_user_files_validates_up_to_them(comfy_server, object_info, name):
    example = EXAMPLES[name]
    assert WORKFLOWS_DIR / f"{name}.json" not in example_workflows()
    prompt = ui_to_api(load_json(WORKFLOWS_DIR / f"{name}.json"), object_info)
    missing = {nid for nid, node in prompt.items() if node["class_type"] in example.needs_user_files}
    with pytest.raises(PromptRejected) as info:
        comfy_server.post_prompt(prompt)
    errors = info.value.body.get("node_errors", {})
    assert errors and set(errors) == missing, json.dumps(info.value.body, indent=1)[:3000]
    if name == "nextscale_infinity_t2i":  # the pack's own loaders say what is missing and where it goes
        for nid in missing:
            text = json.dumps(errors[nid])
            assert "model not found" in text and "models" in text, text
        loader = json.dumps(errors[next(n for n in missing if prompt[n]["class_type"] == "NextScaleLoadInfinity")])
        assert "infinity_2b_reg.pth" in loader and "FoundationVision/Infinity" in loader, loader
        encoder = json.dumps(errors[next(n for n in missing if prompt[n]["class_type"] == "NextScaleTextEncodeT5")])
        assert "text_encoders" in encoder and "google/flan-t5-xl" in encoder, encoder
    if name == "nextscale_distilled_decoding":
        loader = json.dumps(errors[next(n for n in missing if prompt[n]["class_type"] == "NextScaleLoadDD")])
        assert "model not found" in loader and "dd-var-d16.pth" in loader, loader
        assert "microsoft/distilled_decoding" in loader, loader
    if name == "nextscale_flexvar":
        loader = json.dumps(errors[next(n for n in missing if prompt[n]["class_type"] == "NextScaleLoadFlexVAR")])
        assert "model not found" in loader and "FlexVARd24-epo349.pth" in loader, loader
        assert "jiaosiyu1999/FlexVAR" in loader, loader
    if name == "nextscale_switti_t2i":
        loader = json.dumps(errors[next(n for n in missing if prompt[n]["class_type"] == "NextScaleLoadSwitti")])
        assert "model not found" in loader and "Switti-1024" in loader and "yresearch/Switti" in loader, loader
