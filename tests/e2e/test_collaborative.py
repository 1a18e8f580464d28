"""NextScale Collaborative Sampler inside a real ComfyUI server: two generator files (a larger drafter and a smaller
refiner with random weights) in the server's ``models/nextscale`` -> collaborative sampling -> decode -> save,
checked against the same computation in this process."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from harness.random_weights import randomise as _randomise
from nextscale.models.core.imageops import model_to_image
from nextscale.models.var.collaborative import sample_collaborative
from nextscale.models.var.model import VAR, VARConfig
from nextscale.models.var.sampler import SamplingOptions
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from PIL import Image

pytestmark = pytest.mark.e2e

SCHEDULE = (1, 2, 3, 4)
CLASSES = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def code_files(comfy_server):
    folder = comfy_server.base_dir / "models" / "nextscale"
    folder.mkdir(parents=True, exist_ok=True)
    tok_cfg = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), patch_nums=SCHEDULE)
    _randomise(MultiScaleVQVAE(tok_cfg), 11, gain=0.1).save(str(folder / "code_tokenizer.safetensors"))
    common = dict(num_classes=3, vocab_size=64, cvae=8, patch_nums=SCHEDULE, class_names=tuple(CLASSES))
    drafter = _randomise(VAR(VARConfig(depth=3, embed_dim=64, num_heads=4, **common)), 12)
    drafter.save(str(folder / "code_drafter.safetensors"))
    refiner = _randomise(VAR(VARConfig(depth=2, embed_dim=32, num_heads=2, **common)), 13)
    refiner.save(str(folder / "code_refiner.safetensors"))
    return {name: folder / f"code_{name}.safetensors" for name in ("tokenizer", "drafter", "refiner")}


def prompt(draft_scales: int, seed: int, prefix: str) -> dict:
    return {
        "1": {"class_type": "NextScaleLoadTokenizer", "inputs": {
            "tokenizer_name": "code_tokenizer.safetensors", "dtype": "auto"}},
        "2": {"class_type": "NextScaleLoadGenerator", "inputs": {
            "generator_name": "code_drafter.safetensors", "dtype": "auto"}},
        "3": {"class_type": "NextScaleLoadGenerator", "inputs": {
            "generator_name": "code_refiner.safetensors", "dtype": "auto"}},
        "4": {
            "class_type": "NextScaleCollaborativeSampler",
            "inputs": {
                "drafter": ["2", 0], "refiner": ["3", 0], "tokenizer": ["1", 0], "draft_scales": draft_scales,
                "class_name": "alpha", "seed": seed, "cfg": 3.0, "top_k": 0, "top_p": 0.0, "more_smooth": False,
                "batch_size": 2, "class_list": "beta, gamma",
            },
        },
        "5": {"class_type": "NextScaleDecode", "inputs": {"tokenizer": ["1", 0], "tokens": ["4", 0], "scales": 0}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}},
    }


def test_collaborative_sampler_end_to_end(comfy_server, code_files, events):
    prompt_id = comfy_server.post_prompt(prompt(2, 21, f"ns-code-{uuid.uuid4().hex[:6]}"), client_id=events.client_id)
    final = events.wait_finished(prompt_id, timeout=120)
    assert final["type"] == "execution_success", final
    images = sorted(comfy_server.output_images(comfy_server.wait_history(prompt_id)))
    assert len(images) == 4  # 2 classes x batch size 2
    assert events.progress(prompt_id, node="4") == [(i + 1, len(SCHEDULE)) for i in range(len(SCHEDULE))]

    vae = MultiScaleVQVAE.from_file(str(code_files["tokenizer"]))
    drafter, refiner = (VAR.from_file(str(code_files[name])) for name in ("drafter", "refiner"))
    tokens = sample_collaborative(drafter, refiner, vae, torch.tensor([1, 1, 2, 2]), draft_scales=2, seed=21,
                                  options=SamplingOptions(cfg=3.0, top_k=0, top_p=0.0))
    with torch.inference_mode():
        expected = model_to_image(vae.indices_to_img(tokens.flat())).numpy()
    for path, want in zip(images, expected):
        got = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        want = np.clip(want * 255 + 0.5, 0, 255).astype(np.int16)
        assert np.mean(np.abs(got - want) <= 1) > 0.99


def test_mismatched_pair_is_a_clear_error(comfy_server, code_files):
    bad = prompt(9, 1, "ns-code-bad")  # draft_scales above the 4 scales of the schedule
    entry = comfy_server.run_prompt(bad, timeout=120)
    assert comfy_server.status_of(entry) == "error"
    assert "draft_scales must lie in 0..4" in str(comfy_server.error_messages(entry))
