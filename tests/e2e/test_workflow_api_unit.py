"""The harness's UI -> API workflow converter on small hand-made graphs (no server needed).

Its agreement with the real frontend is checked in test_frontend.py; these pin the rules one by one.
"""

from __future__ import annotations

import pytest
from harness.workflow_api import WorkflowConversionError, ui_to_api

OBJECT_INFO = {
    "Sampler": {
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "seed": ["INT", {"default": 0}],
                "steps": ["INT", {"default": 20}],
                "mode": [["a", "b"], {}],
                "image": ["IMAGE", {}],
            },
            "optional": {"strength": ["FLOAT", {"default": 1.0}], "label": ["STRING", {"forceInput": True}]},
        },
        "input_order": {"required": ["model", "seed", "steps", "mode", "image"], "optional": ["strength", "label"]},
        "display_name": "The Sampler",
    },
    "Loader": {"input": {"required": {"name": [["x.safetensors"], {}]}}, "display_name": "Loader"},
    "Filter": {"input": {"required": {"image": ["IMAGE", {}], "amount": ["FLOAT", {}]}}, "display_name": "Filter"},
    "Source": {"input": {"required": {"n": ["INT", {"control_after_generate": True}]}}, "display_name": "Source"},
    "ListNode": {"input": {"required": {"values": ["STRING", {}]}}, "display_name": "List"},
}


def node(id, type, widgets=None, inputs=(), mode=0, outputs=(), title=None):
    n = {"id": id, "type": type, "mode": mode, "inputs": [dict(i) for i in inputs], "outputs": list(outputs)}
    if widgets is not None:
        n["widgets_values"] = widgets
    if title:
        n["title"] = title
    return n


def inp(name, type, link=None, widget=False):
    d = {"name": name, "type": type, "link": link}
    if widget:
        d["widget"] = {"name": name}
    return d


def wf(nodes, links=()):
    return {"nodes": nodes, "links": [list(l) for l in links], "version": 0.4}


def test_widgets_map_in_order_and_seed_control_is_skipped():
    w = wf(
        [
            node(1, "Loader", ["x.safetensors"]),
            node(2, "Sampler", [42, "randomize", 5, "b", 0.5], [inp("model", "MODEL", 1), inp("image", "IMAGE")]),
        ],
        [(1, 1, 0, 2, 0, "MODEL")],
    )
    api = ui_to_api(w, OBJECT_INFO)
    assert api["2"] == {
        "class_type": "Sampler",
        "inputs": {"model": ["1", 0], "seed": 42, "steps": 5, "mode": "b", "strength": 0.5},
        "_meta": {"title": "The Sampler"},
    }
    assert api["1"]["inputs"] == {"name": "x.safetensors"}


def test_seed_without_stored_control_value_is_not_skipped():
    # An older save without the control value: do not eat the next widget's value.
    # The optional widget the save lacks (added to the node later) takes its default, as in the frontend.
    api = ui_to_api(wf([node(2, "Sampler", [42, 5, "a"])]), OBJECT_INFO)
    assert api["2"]["inputs"] == {"seed": 42, "steps": 5, "mode": "a", "strength": 1.0}


def test_control_after_generate_option_adds_a_value():
    api = ui_to_api(wf([node(1, "Source", [3, "fixed"])]), OBJECT_INFO)
    assert api["1"]["inputs"] == {"n": 3}


def test_linked_widget_takes_the_link_and_consumes_its_value():
    w = wf(
        [
            node(1, "Source", [9, "fixed"], outputs=[{"name": "INT", "type": "INT", "links": [2]}]),
            node(2, "Sampler", [42, "fixed", 5, "a", 1.0], [inp("steps", "INT", 2, widget=True)]),
        ],
        [(2, 1, 0, 2, 2, "INT")],
    )
    assert ui_to_api(w, OBJECT_INFO)["2"]["inputs"] == {"seed": 42, "steps": ["1", 0], "mode": "a", "strength": 1.0}


def test_force_input_takes_no_widget_value():
    api = ui_to_api(wf([node(2, "Sampler", [1, "fixed", 2, "a", 0.1])]), OBJECT_INFO)
    assert "label" not in api["2"]["inputs"]


def test_muted_and_bypassed_nodes_are_left_out_and_bypass_passes_through():
    w = wf(
        [
            node(1, "Filter", [0.1], [inp("image", "IMAGE")], outputs=[{"name": "IMAGE", "type": "IMAGE"}]),
            node(2, "Filter", [0.2], [inp("image", "IMAGE", 1)], mode=4, outputs=[{"name": "IMAGE", "type": "IMAGE"}]),
            node(3, "Sampler", [1, "fixed", 2, "a"], [inp("image", "IMAGE", 2)]),
            node(4, "Filter", [0.3], [inp("image", "IMAGE", 3)], mode=2, outputs=[{"name": "IMAGE", "type": "IMAGE"}]),
            node(5, "Filter", [0.4], [inp("image", "IMAGE", 4)]),
        ],
        [(1, 1, 0, 2, 0, "IMAGE"), (2, 2, 0, 3, 4, "IMAGE"), (3, 1, 0, 4, 0, "IMAGE"), (4, 4, 0, 5, 0, "IMAGE")],
    )
    api = ui_to_api(w, OBJECT_INFO)
    assert sorted(api) == ["1", "3", "5"]
    assert api["3"]["inputs"]["image"] == ["1", 0]  # through the bypassed node 2
    assert "image" not in api["5"]["inputs"]  # its source is muted


def test_reroute_and_primitive_nodes():
    w = wf(
        [
            node(1, "Filter", [0.1], [inp("image", "IMAGE")]),
            node(2, "Reroute", None, [inp("", "*", 1)]),
            node(3, "PrimitiveNode", [77, "fixed"]),
            node(4, "Sampler", [0, "fixed", 1, "a"], [inp("image", "IMAGE", 2), inp("seed", "INT", 3, widget=True)]),
            {"id": 5, "type": "Note", "mode": 0, "widgets_values": ["a note"]},
        ],
        [(1, 1, 0, 2, 0, "IMAGE"), (2, 2, 0, 4, 4, "IMAGE"), (3, 3, 0, 4, 1, "INT")],
    )
    api = ui_to_api(w, OBJECT_INFO)
    assert sorted(api) == ["1", "4"]
    assert api["4"]["inputs"]["image"] == ["1", 0]
    assert api["4"]["inputs"]["seed"] == 77


def test_links_in_dict_form_and_titles():
    w = {
        "nodes": [
            node(1, "Filter", [0.1], [inp("image", "IMAGE")]),
            node(2, "Filter", [0.2], [inp("image", "IMAGE", 7)], title="Mine"),
        ],
        "links": [{"id": 7, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "IMAGE"}],
    }
    api = ui_to_api(w, OBJECT_INFO)
    assert api["2"]["inputs"]["image"] == ["1", 0]
    assert api["2"]["_meta"]["title"] == "Mine"


def test_list_values_are_wrapped_and_dict_widgets_map_by_name():
    assert ui_to_api(wf([node(1, "ListNode", [["a", "b"]])]), OBJECT_INFO)["1"]["inputs"] == {
        "values": {"__value__": ["a", "b"]}
    }
    assert ui_to_api(wf([node(1, "Filter", {"amount": 0.7})]), OBJECT_INFO)["1"]["inputs"] == {"amount": 0.7}


def test_api_format_passes_through():
    api = {"1": {"class_type": "Filter", "inputs": {"amount": 1.0}}}
    assert ui_to_api(api, OBJECT_INFO) == api


def test_unknown_node_type_is_a_clear_error():
    with pytest.raises(WorkflowConversionError, match="NotANode"):
        ui_to_api(wf([node(1, "NotANode", [])]), OBJECT_INFO)


def test_subgraphs_are_reported():
    w = wf([node(1, "0b4e-subgraph", [])])
    w["definitions"] = {"subgraphs": [{"id": "0b4e-subgraph"}]}
    with pytest.raises(WorkflowConversionError, match="subgraph"):
        ui_to_api(w, OBJECT_INFO)


def test_upload_widget_value_is_skipped():
    info = {
        "LoadMasked": {
            "input": {
                "required": {"image": [["a.png"], {"image_upload": True}], "channel": [["alpha", "red"], {}]},
                "optional": {"gain": ["FLOAT", {}]},
            },
            "display_name": "Load",
        }
    }
    api = ui_to_api(wf([node(1, "LoadMasked", ["a.png", "red", "image", 2.0])]), info)
    assert api["1"]["inputs"] == {"image": "a.png", "channel": "red", "gain": 2.0}
