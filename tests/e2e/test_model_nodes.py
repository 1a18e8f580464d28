"""Tokenizer and generator nodes inside a real ComfyUI server: load -> encode/sample -> decode -> save.

Tiny random-weight models are written into the server's ``models/nextscale`` folder, exactly where a user puts
official files; the same files are loaded in this process to check what the server computed.
"""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest
import torch
from harness.comfy_server import PromptRejected
from harness.random_weights import randomise as _randomise
from nextscale.models.core.imageops import model_to_image
from nextscale.models.var.model import VAR, VARConfig
from nextscale.models.var.sampler import SamplingOptions, sample
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from PIL import Image

pytestmark = pytest.mark.e2e

SMALL = (1, 2, 3, 4)
CLASSES = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def model_files(comfy_server):
    folder = comfy_server.base_dir / "models" / "nextscale"
    folder.mkdir(parents=True, exist_ok=True)
    tok_cfg = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), patch_nums=SMALL)
    tokenizer = _randomise(MultiScaleVQVAE(tok_cfg), 1, gain=0.1)
    tokenizer.save(str(folder / "tiny_tokenizer.safetensors"))
    var_cfg = VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=3, vocab_size=64, cvae=8,
                        patch_nums=SMALL, class_names=tuple(CLASSES))
    generator = _randomise(VAR(var_cfg), 2)
    generator.save(str(folder / "tiny_generator.safetensors"))
    big_cfg = VARConfig(depth=8, embed_dim=256, num_heads=4, num_classes=3, vocab_size=64, cvae=8,
                        patch_nums=(1, 2, 3, 4, 6, 8, 12, 16), class_names=tuple(CLASSES))
    _randomise(VAR(big_cfg), 3, gain=0.05).save(str(folder / "slow_generator.safetensors"))
    return {
        "tokenizer": MultiScaleVQVAE.from_file(str(folder / "tiny_tokenizer.safetensors")),
        "generator": VAR.from_file(str(folder / "tiny_generator.safetensors")),
    }


def sampler_prompt(generator="tiny_generator.safetensors", seed=7, batch_size=2, class_list="beta, gamma", prefix=None):
    return {
        "1": {"class_type": "NextScaleLoadTokenizer", "inputs": {
            "tokenizer_name": "tiny_tokenizer.safetensors", "dtype": "auto"}},
        "2": {"class_type": "NextScaleLoadGenerator", "inputs": {"generator_name": generator, "dtype": "auto"}},
        "3": {
            "class_type": "NextScaleSampler",
            "inputs": {
                "generator": ["2", 0], "tokenizer": ["1", 0], "class_name": "alpha", "seed": seed, "cfg": 3.0,
                "top_k": 0, "top_p": 0.0, "more_smooth": False, "batch_size": batch_size, "class_list": class_list,
            },
        },
        "4": {"class_type": "NextScaleDecode", "inputs": {"tokenizer": ["1", 0], "tokens": ["3", 0], "scales": 0}},
        "5": {"class_type": "SaveImage", "inputs": {
            "images": ["4", 0], "filename_prefix": prefix or f"ns-{uuid.uuid4().hex[:6]}"}},
    }


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_encode_decode_round_trip(comfy_server, model_files):
    rng = np.random.default_rng(0)
    src = (rng.random((24, 40, 3)) * 255).astype(np.uint8)  # not square: centre-cropped to 16x16
    name = f"ns-input-{uuid.uuid4().hex[:6]}.png"
    Image.fromarray(src).save(comfy_server.base_dir / "input" / name)
    prompt = {
        "1": {"class_type": "NextScaleLoadTokenizer", "inputs": {
            "tokenizer_name": "tiny_tokenizer.safetensors", "dtype": "auto"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": name}},
        "3": {"class_type": "NextScaleEncode", "inputs": {
            "tokenizer": ["1", 0], "image": ["2", 0], "resize": "center crop"}},
        "4": {"class_type": "NextScaleDecode", "inputs": {"tokenizer": ["1", 0], "tokens": ["3", 0], "scales": 0}},
        "5": {"class_type": "NextScaleDecode", "inputs": {"tokenizer": ["1", 0], "tokens": ["3", 0], "scales": 1}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "ns-roundtrip"}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "ns-first-scale"}},
    }
    entry = comfy_server.run_prompt(prompt, timeout=120)
    assert comfy_server.status_of(entry) == "success", comfy_server.error_messages(entry)
    full = read_png(comfy_server.output_images({"outputs": {"6": entry["outputs"]["6"]}})[0])
    coarse = read_png(comfy_server.output_images({"outputs": {"7": entry["outputs"]["7"]}})[0])
    assert full.shape == coarse.shape == (16, 16, 3)
    assert np.abs(full - coarse).mean() > 1  # the first scale alone is another image

    # the same computation in this process
    from nextscale.models.core.imageops import fit_square, image_to_model

    vae = model_files["tokenizer"]
    img = fit_square(image_to_model(torch.from_numpy(src).float().div(255)[None]), 16, "center crop")
    with torch.inference_mode():
        indices = vae.img_to_indices(img)
        for got, upto in ((full, None), (coarse, 1)):
            want = model_to_image(vae.indices_to_img(indices, upto=upto))[0].numpy()
            want = np.clip(want * 255 + 0.5, 0, 255).astype(np.int16)  # SaveImage rounds like this
            assert np.abs(got - want).max() <= 1


def test_sampler_end_to_end_with_progress_and_previews(comfy_server, model_files, events):
    prompt_id = comfy_server.post_prompt(sampler_prompt(seed=11), client_id=events.client_id)
    final = events.wait_finished(prompt_id, timeout=120)
    assert final["type"] == "execution_success", final
    entry = comfy_server.wait_history(prompt_id)
    images = comfy_server.output_images(entry)
    assert len(images) == 4  # class list of 2 x batch size 2
    # one progress event per scale, in order, from the sampler node
    assert events.progress(prompt_id, node="3") == [(i + 1, len(SMALL)) for i in range(len(SMALL))]
    assert events.preview_frames >= len(SMALL)

    # batch item i of seed s == the in-process sample with the same seed and labels
    vae, var = model_files["tokenizer"], model_files["generator"]
    labels = torch.tensor([1, 1, 2, 2])
    tokens = sample(var, vae, labels, seed=11, options=SamplingOptions(cfg=3.0, top_k=0, top_p=0.0))
    with torch.inference_mode():
        expected = model_to_image(vae.indices_to_img(tokens.flat())).numpy()
    for got_path, want in zip(sorted(images), expected):
        got = read_png(got_path)
        want = np.clip(want * 255 + 0.5, 0, 255).astype(np.int16)
        assert np.mean(np.abs(got - want) <= 1) > 0.99


@pytest.mark.parametrize(
    ("node", "name", "value", "message"),
    [
        ("3", "batch_size", 0, "smaller than min"),
        ("3", "class_name", "no such class", "class_name = 'no such class' is not one of the choices"),
        ("2", "generator_name", "missing.safetensors",
         "model not found: VAR generator 'missing.safetensors' is not in"),
    ],
)
def test_validation_rejects_bad_values(comfy_server, model_files, node, name, value, message):
    bad = sampler_prompt()
    bad[node]["inputs"][name] = value
    with pytest.raises(PromptRejected) as err:
        comfy_server.post_prompt(bad)
    assert node in err.value.node_errors
    assert message in json.dumps(err.value.node_errors)


def test_unknown_dtype_is_a_clear_execution_error(comfy_server, model_files):
    """A loader validates only its file input (one message there); a dtype the UI cannot choose, sent through the
    API, stops the loader before it reads the file."""
    bad = sampler_prompt()
    bad["2"]["inputs"]["dtype"] = "float8"
    entry = comfy_server.run_prompt(bad, timeout=120)
    assert comfy_server.status_of(entry) == "error"
    assert "dtype = 'float8' is not one of the choices: auto, float32" in str(comfy_server.error_messages(entry))


def test_unknown_class_is_a_clear_execution_error(comfy_server, model_files):
    entry = comfy_server.run_prompt(sampler_prompt(class_list="beta, hexagon", seed=99), timeout=120)
    assert comfy_server.status_of(entry) == "error"
    text = str(comfy_server.error_messages(entry))
    assert "'hexagon' is not a class of this generator" in text and "alpha, beta, gamma" in text
    # the server keeps working
    entry = comfy_server.run_prompt(sampler_prompt(seed=100), timeout=120)
    assert comfy_server.status_of(entry) == "success", comfy_server.error_messages(entry)


def test_wrong_file_kind_is_a_clear_execution_error(comfy_server, model_files):
    prompt = {
        "1": {"class_type": "NextScaleLoadTokenizer", "inputs": {
            "tokenizer_name": "tiny_generator.safetensors", "dtype": "auto"}},
        "2": {"class_type": "NextScaleLoadGenerator", "inputs": {
            "generator_name": "tiny_generator.safetensors", "dtype": "auto"}},
        "3": {"class_type": "NextScaleSampler", "inputs": {
            "generator": ["2", 0], "tokenizer": ["1", 0], "class_name": "alpha", "seed": 1, "cfg": 1.0,
            "top_k": 0, "top_p": 0.0, "more_smooth": False, "batch_size": 1}},
        "4": {"class_type": "NextScaleDecode", "inputs": {"tokenizer": ["1", 0], "tokens": ["3", 0], "scales": 0}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    entry = comfy_server.run_prompt(prompt, timeout=120)
    assert comfy_server.status_of(entry) == "error"
    text = str(comfy_server.error_messages(entry))
    assert "tiny_generator.safetensors" in text and "NextScale Load Generator" in text


def test_interrupt_stops_sampling_within_a_scale(comfy_server, model_files, events):
    prompt = sampler_prompt(generator="slow_generator.safetensors", batch_size=16, class_list="alpha, beta", seed=5)
    prompt_id = comfy_server.post_prompt(prompt, client_id=events.client_id)
    events.wait_for(lambda e: e["type"] == "progress" and e["data"].get("prompt_id") == prompt_id, timeout=120)
    t0 = time.monotonic()
    comfy_server.interrupt()
    final = events.wait_finished(prompt_id, timeout=120)
    assert final["type"] == "execution_interrupted", final
    assert len(events.progress(prompt_id, node="3")) < 8, "sampling ran to the end despite the interrupt"
    assert time.monotonic() - t0 < 60
    entry = comfy_server.run_prompt(sampler_prompt(seed=12), timeout=120)
    assert comfy_server.status_of(entry) == "success", comfy_server.error_messages(entry)
