"""The embedded model in a real ComfyUI: listed first, and its samples are what they were asked to be.

The measuring stick is the classifier trained on the real data (weights/classifier.safetensors, held-out accuracy
1.0): images generated through the sampler node, saved as PNG by the core Save Image node, must be recognised as
the requested classes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from harness.testbed import REPO_ROOT
from PIL import Image

pytestmark = pytest.mark.e2e

CARD = json.loads((REPO_ROOT / "weights" / "nextscale_embedded.json").read_text())
PER_CLASS = 2


def test_embedded_model_is_the_default_choice(object_info):
    for node, name in (("NextScaleLoadTokenizer", "tokenizer_name"), ("NextScaleLoadGenerator", "generator_name")):
        spec = object_info[node]["input"]["required"][name]
        options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
        assert options[0] == "nextscale-embedded", (node, options[:3])
    classes = object_info["NextScaleSampler"]["input"]["required"]["class_name"]
    options = classes[1]["options"] if classes[0] == "COMBO" else classes[0]
    assert options[: len(CARD["class_names"])] == CARD["class_names"]


def test_sampler_node_samples_are_recognised_by_the_classifier(comfy_server):
    from training.classifier import load_classifier, predict

    names = CARD["class_names"]
    prompt = {
        "1": {"class_type": "NextScaleLoadTokenizer", "inputs": {
            "tokenizer_name": "nextscale-embedded", "dtype": "auto"}},
        "2": {"class_type": "NextScaleLoadGenerator", "inputs": {
            "generator_name": "nextscale-embedded", "dtype": "auto"}},
        "3": {"class_type": "NextScaleSampler", "inputs": {
            "generator": ["2", 0], "tokenizer": ["1", 0], "class_name": names[0], "seed": 1000, "cfg": 4.0,
            "top_k": 900, "top_p": 0.95, "more_smooth": False, "batch_size": PER_CLASS,
            "class_list": ", ".join(names)}},
        "4": {"class_type": "NextScaleDecode", "inputs": {"tokenizer": ["1", 0], "tokens": ["3", 0], "scales": 0}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "embedded_check"}},
    }
    entry = comfy_server.run_prompt(prompt, timeout=300)
    assert comfy_server.status_of(entry) == "success", comfy_server.error_messages(entry)
    paths = comfy_server.output_images(entry)
    assert len(paths) == PER_CLASS * len(names)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    labels = torch.arange(len(names)).repeat_interleave(PER_CLASS)
    model, _ = load_classifier(str(REPO_ROOT / "weights" / "classifier.safetensors"))
    pred, _ = predict(model, images)
    accuracy = float((pred == labels).float().mean())
    wrong = [(names[int(t)], names[int(p)]) for t, p in zip(labels, pred) if t != p]
    assert accuracy >= 0.85, f"class accuracy {accuracy:.2f}; (asked, seen): {wrong}"
