"""The pack inside a real ComfyUI 0.3.75 server, driven over HTTP and websocket like any client would."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest
from harness.comfy_server import PromptRejected
from harness.testbed import example_workflows, load_json
from harness.workflow_api import ui_to_api

pytestmark = pytest.mark.e2e

PACK_MODULE = "custom_nodes.comfyui-nextscale"


def schedule_prompt(depth: int = 16, preset: str = "256", custom: str = "1,2,3,4,6,8") -> dict:
    return {
        "1": {
            "class_type": "NextScaleSchedule",
            "inputs": {"preset": preset, "custom_schedule": custom, "depth": depth},
        }
    }


def pack_nodes(object_info: dict) -> dict:
    return {name: info for name, info in object_info.items() if info.get("python_module") == PACK_MODULE}


def test_server_runs_comfyui_0_3_75(comfy_server):
    stats = comfy_server.get("/system_stats")
    assert stats["system"]["comfyui_version"] == "0.3.75" or comfy_server.testbed.origin != ".testbed"
    assert stats["devices"][0]["type"] == "cpu"


def test_pack_loads_without_import_errors(comfy_server, object_info):
    log = comfy_server.log_text()
    assert f"{comfy_server.pack_name}" in log, "the pack is not in ComfyUI's custom-node import list"
    bad = [
        line
        for line in log.splitlines()
        if comfy_server.pack_name in line and ("IMPORT FAILED" in line or "Cannot import" in line)
    ]
    assert not bad, bad
    assert pack_nodes(object_info), f"no node of module {PACK_MODULE} in /object_info"


def test_pack_nodes_are_named_and_documented(object_info):
    """Node ids start with NextScale; every node has a description and every visible input a tooltip."""
    nodes = pack_nodes(object_info)
    problems = []
    for name, info in nodes.items():
        if not name.startswith("NextScale"):
            problems.append(f"{name}: node id does not start with NextScale")
        if not info.get("description"):
            problems.append(f"{name}: no description")
        for section in ("required", "optional"):
            for inp, spec in (info["input"].get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not opts.get("tooltip"):
                    problems.append(f"{name}.{inp}: no tooltip")
    assert not problems, "\n".join(problems)


def test_schedule_node_definition(comfy_server):
    info = comfy_server.object_info("NextScaleSchedule")
    assert info["display_name"] == "NextScale Schedule"
    assert info["output_node"] is True
    assert "STRING" in info["output"]
    preset = info["input"]["required"]["preset"]
    options = preset[0] if isinstance(preset[0], list) else preset[1]["options"]
    assert {"256", "512", "1024"} <= set(options)


def test_schedule_prompt_shows_text_in_history(comfy_server):
    entry = comfy_server.run_prompt(schedule_prompt(depth=17))
    assert comfy_server.status_of(entry) == "success", comfy_server.error_messages(entry)
    texts = comfy_server.output_texts(entry)
    assert list(texts) == ["1"], entry["outputs"]
    report = "\n".join(texts["1"])
    assert "10 scales" in report and "680 tokens" in report, report
    assert "VAR-d17" in report, report


def test_custom_schedule_prompt(comfy_server):
    entry = comfy_server.run_prompt(schedule_prompt(preset="custom", custom="1,2,4", depth=18))
    assert comfy_server.status_of(entry) == "success", comfy_server.error_messages(entry)
    report = "\n".join(comfy_server.output_texts(entry)["1"])
    assert "3 scales" in report and "21 tokens" in report, report


def test_invalid_prompt_is_rejected_with_node_errors(comfy_server):
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.post_prompt(schedule_prompt(depth=0))
    assert rejected.value.status == 400
    assert rejected.value.error.get("type") == "prompt_outputs_failed_validation"
    errors = rejected.value.node_errors["1"]["errors"]
    assert any(e["type"] == "value_smaller_than_min" for e in errors), errors


def test_unknown_combo_value_is_rejected(comfy_server):
    """ComfyUI 0.3.75 checks only V1 list combos; the pack's validate_inputs rejects unknown V3 combo values."""
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.post_prompt(schedule_prompt(preset="333"))
    assert "1" in rejected.value.node_errors
    assert "preset = '333' is not one of the choices: 256, 512, 1024, custom" in json.dumps(rejected.value.node_errors)


def test_websocket_events_of_a_prompt(comfy_server, events):
    prompt_id = comfy_server.post_prompt(schedule_prompt(depth=19), client_id=events.client_id)
    final = events.wait_finished(prompt_id, timeout=60)
    assert final["type"] == "execution_success", events.for_prompt(prompt_id)
    types = events.types(prompt_id)
    assert types[0] == "execution_start", types
    assert "1" in events.executing_nodes(prompt_id), types
    executed = events.of_type("executed", prompt_id)
    assert [e["data"]["node"] for e in executed] == ["1"], executed
    assert "VAR-d19" in "\n".join(executed[0]["data"]["output"]["text"])
    # The same prompt again is served from the cache: no execution of node 1.
    again = comfy_server.post_prompt(schedule_prompt(depth=19), client_id=events.client_id)
    assert events.wait_finished(again, timeout=60)["type"] == "execution_success"
    cached = events.of_type("execution_cached", again)
    assert cached and "1" in cached[0]["data"]["nodes"], events.for_prompt(again)
    assert "1" not in events.executing_nodes(again), events.for_prompt(again)


def test_interrupt_when_idle_is_harmless(comfy_server):
    comfy_server.interrupt()
    entry = comfy_server.run_prompt(schedule_prompt(depth=20))
    assert comfy_server.status_of(entry) == "success", comfy_server.error_messages(entry)


@pytest.mark.parametrize("path", example_workflows(), ids=lambda p: p.stem)
def test_example_workflow_runs_through_the_api(comfy_server, object_info, path):
    """Every example workflow, converted from UI format, runs and produces its outputs."""
    workflow = load_json(path)
    prompt = ui_to_api(workflow, object_info)
    assert prompt, f"{path.name}: nothing to run"
    entry = comfy_server.run_prompt(prompt, timeout=300, extra_data={"extra_pnginfo": {"workflow": workflow}})
    assert comfy_server.status_of(entry) == "success", json.dumps(comfy_server.error_messages(entry), indent=1)[:4000]
    assert entry["outputs"], f"{path.name} produced no output"
    for image in comfy_server.output_images(entry):
        assert image.is_file(), image
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image


def edit_prompt(width: int = 48, height: int = 40, cfg: float = 4.0, generator: str = "nextscale-embedded") -> dict:
    """Outpaint a ``width x height`` picture (core Empty Image + Pad Image for Outpainting, 16 px left and right)
    with the embedded model, Encode in 'pad' mode, and composite at the padded picture's size."""
    return {
        "1": {"class_type": "NextScaleLoadTokenizer",
              "inputs": {"tokenizer_name": "nextscale-embedded", "dtype": "auto"}},
        "2": {"class_type": "NextScaleLoadGenerator", "inputs": {"generator_name": generator, "dtype": "auto"}},
        "3": {"class_type": "EmptyImage",
              "inputs": {"width": width, "height": height, "batch_size": 1, "color": 0x3060A0}},
        "4": {"class_type": "ImagePadForOutpaint",
              "inputs": {"image": ["3", 0], "left": 16, "top": 0, "right": 16, "bottom": 0, "feathering": 0}},
        "5": {"class_type": "NextScaleEncode", "inputs": {"tokenizer": ["1", 0], "image": ["4", 0], "resize": "pad"}},
        "6": {"class_type": "NextScaleInpaintGuide",
              "inputs": {"tokens": ["5", 0], "mask": ["4", 1], "invert": False, "mode": "tokens", "start_scale": 0,
                         "end_scale": 0}},
        "7": {"class_type": "NextScaleSampler",
              "inputs": {"generator": ["2", 0], "tokenizer": ["1", 0], "class_name": "circle", "seed": 3, "cfg": cfg,
                         "top_k": 900, "top_p": 0.95, "more_smooth": False, "batch_size": 1, "guide": ["6", 0]}},
        "8": {"class_type": "NextScaleDecode",
              "inputs": {"tokenizer": ["1", 0], "tokens": ["7", 0], "scales": 0, "composite_image": ["4", 0],
                         "composite_mask": ["4", 1], "feather": 4}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def test_non_square_outpaint_runs_at_the_pictures_size(comfy_server):
    from PIL import Image

    entry = comfy_server.run_prompt(edit_prompt())
    assert comfy_server.status_of(entry) == "success", comfy_server.error_messages(entry)
    (image,) = comfy_server.output_images(entry, "9")
    with Image.open(image) as im:
        assert im.size == (80, 40)  # 48 + 2 x 16 wide: the padded picture, not the model's 64 px square


def test_nan_is_rejected_at_validation_naming_the_input(comfy_server):
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.post_prompt(edit_prompt(cfg=float("nan")))
    text = json.dumps(rejected.value.node_errors["7"])
    assert "cfg = nan is not a number: give a value from 0.0 to 30.0" in text, text


def test_a_missing_file_gives_one_message_under_its_input(comfy_server):
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.post_prompt(edit_prompt(generator="var_d16.pth"))
    errors = rejected.value.node_errors["2"]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == ["generator_name"], errors
    details = errors[0]["details"]
    assert "model not found: " in details and "'var_d16.pth'" in details and "FoundationVision/var" in details, details
    assert "models/nextscale" in details or "models\\nextscale" in details, details


def test_errors_name_their_type_without_a_module_path(comfy_server):
    prompt = edit_prompt()
    prompt["7"]["inputs"]["class_list"] = "goldfish"
    entry = comfy_server.run_prompt(prompt)
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["exception_type"] == "NextScaleError", error["exception_type"]
    assert "'goldfish' is an ImageNet-1k class" in error["exception_message"], error["exception_message"]


def test_frontend_extension_is_served(comfy_server):
    """WEB_DIRECTORY: the extension is listed for the frontend to import, and served from the pack's folder."""
    path = f"/extensions/{comfy_server.pack_name}/js/nextscale.js"
    assert path in comfy_server.get("/extensions")
    with urllib.request.urlopen(comfy_server.url + path, timeout=30) as response:
        assert b"app.registerExtension" in response.read()


def test_loader_file_inputs_carry_display_names(object_info):
    """The labels the extension gives the loaders' file widgets; the input ids stay those of saved workflows."""
    labels = {
        ("NextScaleLoadGenerator", "generator_name"): "generator",
        ("NextScaleLoadTokenizer", "tokenizer_name"): "tokenizer",
        ("NextScaleLoadControl", "control_name"): "control",
        ("NextScaleLoadInfinity", "model_name"): "model",
        ("NextScaleLoadInfinity", "tokenizer_name"): "tokenizer",
    }
    for (node, name), label in labels.items():
        assert object_info[node]["input"]["required"][name][1]["display_name"] == label, (node, name)


def test_class_names_of_a_generator_choice(comfy_server):
    """The route behind the samplers' class menu: the embedded generator's classes; null where the classes are not
    known without loading the file, and for a name that is no file of the model folder."""
    embedded = comfy_server.get("/api/nextscale/class_names?generator=nextscale-embedded")["class_names"]
    assert embedded[:3] == ["circle", "square", "triangle"] and len(embedded) == 10
    for name in ("var_d16.pth", "../../user/x.safetensors", ""):
        query = urllib.parse.urlencode({"generator": name})
        assert comfy_server.get(f"/nextscale/class_names?{query}") == {"class_names": None}
