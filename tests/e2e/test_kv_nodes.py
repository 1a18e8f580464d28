"""KV-cache nodes inside a real ComfyUI server: calibrate -> policy -> sampler -> decode -> save, and the report.

Tiny random-weight models are written into the server's ``models/nextscale`` folder under their own names.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from harness.random_weights import randomise as _randomise
from nextscale.models.var.model import VAR, VARConfig
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from PIL import Image

pytestmark = pytest.mark.e2e

PN = (1, 2, 3, 4, 5, 6)
TOK, GEN = "kv_tiny_tokenizer.safetensors", "kv_tiny_generator.safetensors"


@pytest.fixture(scope="module")
def kv_models(comfy_server):
    folder = comfy_server.base_dir / "models" / "nextscale"
    folder.mkdir(parents=True, exist_ok=True)
    tok_cfg = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), patch_nums=PN)
    _randomise(MultiScaleVQVAE(tok_cfg), 1, 0.1).save(str(folder / TOK))
    var_cfg = VARConfig(depth=3, embed_dim=64, num_heads=4, num_classes=3, vocab_size=64, cvae=8, patch_nums=PN,
                        class_names=("alpha", "beta", "gamma"))
    _randomise(VAR(var_cfg), 2, 0.3).save(str(folder / GEN))
    return folder


def prompt(policy: str, budget: float, prefix: str) -> dict:
    return {
        "1": {"class_type": "NextScaleLoadTokenizer", "inputs": {"tokenizer_name": TOK, "dtype": "auto"}},
        "2": {"class_type": "NextScaleLoadGenerator", "inputs": {"generator_name": GEN, "dtype": "auto"}},
        "3": {"class_type": "NextScaleKVCalibrate", "inputs": {"generator": ["2", 0], "tokenizer": ["1", 0],
              "samples": 2, "seed": 0, "cfg": 2.0, "class_list": "", "filename": "kv_e2e"}},
        "4": {"class_type": "NextScaleKVPolicy", "inputs": {"policy": policy, "budget": budget, "profile": ["3", 0]}},
        "5": {"class_type": "NextScaleSampler", "inputs": {
            "generator": ["2", 0], "tokenizer": ["1", 0], "class_name": "alpha", "seed": 3, "cfg": 2.0,
            "top_k": 0, "top_p": 0.0, "more_smooth": False, "batch_size": 2, "class_list": "beta",
            "kv_policy": ["4", 0]}},
        "6": {"class_type": "NextScaleDecode", "inputs": {"tokenizer": ["1", 0], "tokens": ["5", 0], "scales": 0}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
        "8": {"class_type": "NextScaleKVReport", "inputs": {"generator": ["2", 0], "tokenizer": ["1", 0],
              "kv_policy": ["4", 0], "class_name": "beta", "seed": 3, "cfg": 2.0, "batch_size": 1}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 1], "filename_prefix": prefix + "-report"}},
    }


def test_kv_policy_workflow_runs_and_budget_one_is_exact(comfy_server, kv_models):
    images = {}
    for policy, budget in (("hack", 0.25), ("scalekv", 1.0), ("full", 1.0)):
        entry = comfy_server.run_prompt(prompt(policy, budget, f"kv-{uuid.uuid4().hex[:6]}"), timeout=240)
        assert comfy_server.status_of(entry) == "success", comfy_server.error_messages(entry)
        files = comfy_server.output_images(entry, node="7")
        assert len(files) == 2
        images[policy] = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        report = comfy_server.output_images(entry, node="9")
        assert len(report) == 1 and Image.open(report[0]).size == (2 * 12, 12)
        text = " ".join(comfy_server.output_texts(entry).get("8", []))
        assert "peak KV bytes" in text and "PSNR" in text, entry.get("outputs")
        if policy == "full":
            assert "identical" in text
    assert all(np.array_equal(a, b) for a, b in zip(images["scalekv"], images["full"]))
    assert (comfy_server.base_dir / "output" / "nextscale_kv" / "kv_e2e.json").is_file()
