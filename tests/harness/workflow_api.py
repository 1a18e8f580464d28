"""Convert a UI-format workflow (what the frontend saves) into an API-format prompt (what ``POST /prompt`` takes).

Uses the server's ``/object_info`` for the order and kind of every node's inputs, the way the frontend builds widgets:

- ``widgets_values`` map onto the widget inputs (INT, FLOAT, STRING, BOOLEAN, COMBO; not ``forceInput``) in the
  order of ``input_order`` (required, then optional); socket-only inputs take no value. A widget with no saved value
  (an input added to the node after the workflow was saved) takes its default, as the frontend gives it.
- An INT named ``seed`` / ``noise_seed``, or any INT/COMBO with ``control_after_generate``, is followed by one
  extra value ("fixed", "increment", "decrement", "randomize") that is skipped (a COMBO's control also has a filter
  value after it).
- A widget input that is fed by a link (a "converted" widget) takes the link; its stale value is consumed.
- Nodes with mode 2 (muted) or 4 (bypassed) are left out; a link from a bypassed node is passed through to that node's
  input of the same type, a link from a muted node is dropped; Reroute nodes are followed; a PrimitiveNode's value is
  inlined; Note / MarkdownNote are ignored.
- Nodes with an upload combo (``image_upload`` ...) get the frontend's extra ``upload`` widget after their required
  inputs; its saved value is skipped.
- Subgraphs and legacy group nodes are not supported (a clear :class:`WorkflowConversionError`).

The result is checked against the frontend's own ``app.graphToPrompt()`` in ``tests/e2e/test_frontend.py``.
"""

from __future__ import annotations

import copy
from typing import Any

MODE_MUTED = 2
MODE_BYPASS = 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
SEED_NAMES = {"seed", "noise_seed"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
UPLOAD = "<upload widget>"  # frontend-only widget: takes a saved value, sends nothing


class WorkflowConversionError(ValueError):
    pass


def is_api_format(workflow: dict[str, Any]) -> bool:
    return (
        bool(workflow)
        and "nodes" not in workflow
        and all(isinstance(v, dict) and "class_type" in v for v in workflow.values())
    )


def _links(workflow: dict[str, Any]) -> dict[int, tuple[int, int, int, int, Any]]:
    """``{link_id: (origin_id, origin_slot, target_id, target_slot, type)}``; list (0.4) or dict (1.0) entries."""
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            out[link["id"]] = (
                link["origin_id"],
                link["origin_slot"],
                link["target_id"],
                link["target_slot"],
                link.get("type"),
            )
        else:
            out[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
    return out


def _input_specs(info: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``[(name, type, options)]`` in widget order: required then optional, as ``input_order`` says."""
    inputs = info.get("input", {})
    order = info.get("input_order") or {}
    specs = []
    for section in ("required", "optional"):
        section_inputs = inputs.get(section) or {}
        names = order.get(section) or list(section_inputs)
        for name in names:
            spec = section_inputs.get(name)
            if spec is None:
                continue
            kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
            opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, "COMBO" if isinstance(kind, list) else str(kind), opts))
        if section == "required" and any(
            opts.get(k)
            for _, kind, opts in specs
            for k in ("image_upload", "video_upload", "animated_image_upload", "audio_upload")
        ):
            # The frontend appends an upload button widget to the required inputs; its value is saved too.
            specs.append(("upload", UPLOAD, {}))
    return specs


def with_widget_defaults(prompt: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """A copy of the API prompt ``prompt`` in which every node's widget inputs it leaves out take their defaults:
    what the frontend sends for the same graph (it creates every widget with its default)."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        info = object_info.get(node["class_type"])
        for name, kind, opts in _input_specs(info) if info else []:
            if _is_widget(kind, opts) and kind != UPLOAD and name not in node["inputs"] and "default" in opts:
                node["inputs"][name] = opts["default"]
    return out


def _is_widget(kind: str, opts: dict[str, Any]) -> bool:
    return (kind in WIDGET_TYPES or kind == UPLOAD) and not opts.get("forceInput")


def _has_control(name: str, kind: str, opts: dict[str, Any]) -> bool:
    if kind == "INT":
        control = opts.get("control_after_generate")
        return bool(control) if control is not None else name in SEED_NAMES
    return kind == "COMBO" and bool(opts.get("control_after_generate"))


def _types_match(a: Any, b: Any) -> bool:
    if a in (None, "*", "") or b in (None, "*", ""):
        return True
    a_set, b_set = set(str(a).split(",")), set(str(b).split(","))
    return bool(a_set & b_set)


class _Converter:
    def __init__(self, workflow: dict[str, Any], object_info: dict[str, Any]):
        self.object_info = object_info
        self.nodes = {n["id"]: n for n in workflow.get("nodes", [])}
        self.links = _links(workflow)
        subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
        self.subgraph_ids = {sg.get("id") for sg in subgraphs}

    def resolve(self, link_id: int | None, seen: frozenset = frozenset()) -> tuple[str, Any] | None:
        """Where a link really comes from: ``("link", [node_id, slot])``, ``("value", literal)`` or None (dropped)."""
        if link_id is None or link_id not in self.links or link_id in seen:
            return None
        seen = seen | {link_id}
        origin_id, origin_slot, _, _, link_type = self.links[link_id]
        src = self.nodes.get(origin_id)
        if src is None:
            return None
        if src.get("type") == "Reroute":
            inputs = src.get("inputs") or []
            return self.resolve(inputs[0].get("link") if inputs else None, seen)
        if src.get("type") == "PrimitiveNode":
            values = src.get("widgets_values") or []
            return ("value", values[0]) if values else None
        mode = src.get("mode", 0)
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASS:
            slot = self._bypass_slot(src, origin_slot, link_type)
            inputs = src.get("inputs") or []
            if slot is None or slot >= len(inputs):
                return None
            return self.resolve(inputs[slot].get("link"), seen)
        return ("link", [str(origin_id), origin_slot])

    @staticmethod
    def _bypass_slot(node: dict[str, Any], slot: int, wanted: Any) -> int | None:
        """The input a bypassed node passes to its output ``slot`` (the frontend's rule, 1.32.9)."""
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else wanted
        if wanted in (None, "*", ""):
            return slot if len(inputs) > slot else (0 if inputs else None)
        if slot < len(inputs):
            t = inputs[slot].get("type")
            if _types_match(t, out_type) and _types_match(t, wanted):
                return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == wanted:
                return i
        for i, inp in enumerate(inputs):
            if _types_match(inp.get("type"), out_type) and _types_match(inp.get("type"), wanted):
                return i
        return None

    def convert_node(self, node: dict[str, Any]) -> dict[str, Any]:
        node_type = node.get("type")
        info = self.object_info.get(node_type)
        if info is None:
            if node_type in self.subgraph_ids:
                raise WorkflowConversionError(f"node {node['id']} is a subgraph; subgraphs are not supported")
            if isinstance(node_type, str) and node_type.startswith("workflow>"):
                raise WorkflowConversionError(f"node {node['id']} is a legacy group node ({node_type}); not supported")
            raise WorkflowConversionError(
                f"node {node['id']}: node type {node_type!r} is not known to the server (a missing custom node?)"
            )
        ui_inputs = {i.get("name"): i for i in node.get("inputs") or []}
        values = node.get("widgets_values")
        by_name = values if isinstance(values, dict) else None
        values = [] if by_name is not None or values is None else list(values)
        pos = 0
        inputs: dict[str, Any] = {}
        for name, kind, opts in _input_specs(info):
            value, has_value = None, False
            if _is_widget(kind, opts):
                if by_name is not None:
                    has_value = name in by_name
                    value = by_name.get(name)
                elif pos < len(values):
                    value, has_value = values[pos], True
                    pos += 1
                    if _has_control(name, kind, opts) and pos < len(values) and values[pos] in CONTROL_VALUES:
                        pos += 1
                        if kind == "COMBO" and pos < len(values) and isinstance(values[pos], str):
                            pos += 1  # the combo control's filter widget
                elif "default" in opts:  # a widget added after the workflow was saved keeps its default
                    value, has_value = opts["default"], True
            if kind == UPLOAD:
                continue
            ui_input = ui_inputs.get(name)
            if ui_input is not None and ui_input.get("link") is not None:
                source = self.resolve(ui_input["link"])
                if source is not None:
                    inputs[name] = source[1]
                continue  # linked: the widget's stale value is not used
            if has_value:
                # The frontend wraps list values so that the server does not read them as links.
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
        title = node.get("title") or info.get("display_name") or node_type
        return {"class_type": node_type, "inputs": inputs, "_meta": {"title": title}}

    def convert(self) -> dict[str, Any]:
        prompt = {}
        for node_id in sorted(self.nodes, key=lambda i: (str(type(i)), i)):
            node = self.nodes[node_id]
            if node.get("type") in FRONTEND_ONLY or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
                continue
            prompt[str(node_id)] = self.convert_node(node)
        return prompt


def ui_to_api(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """API-format prompt of a UI-format workflow (an API-format input is returned as a copy)."""
    if is_api_format(workflow):
        return copy.deepcopy(workflow)
    if "nodes" not in workflow:
        raise WorkflowConversionError("not a workflow: neither UI format (nodes/links) nor API format")
    return _Converter(workflow, object_info).convert()
