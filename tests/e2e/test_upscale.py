"""NSARM in a real ComfyUI server: a tiny random NSARM and BSQ tokenizer written into ``models/nextscale`` ->
Load Image -> NextScale Load NSARM -> NextScale Upscale (tiles) -> Save Image, with one progress step per scale of
every tile; the same upscale computed in this process gives the same pixels."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from harness.comfy_server import PromptRejected
from harness.random_weights import randomise
from nextscale.models.core.imageops import image_to_model, model_to_image
from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer
from nextscale.models.infinity.model import InfinityConfig
from nextscale.models.nsarm.mapper import MapperConfig
from nextscale.models.nsarm.model import NSARM, NSARMConfig
from nextscale.models.nsarm.sampler import UpscaleCondition, UpscaleOptions, sample_nsarm
from nextscale.models.nsarm.tiles import color_fix, tile_count, upscale_tiled
from PIL import Image

pytestmark = pytest.mark.e2e

CONFIG = NSARMConfig(
    InfinityConfig(depth=2, embed_dim=32, num_heads=2, hidden_dim=64, token_dim=4, text_dim=32, text_maxlen=8,
                   block_chunks=2, pool_heads=2),
    MapperConfig(channels=4, grid=4, sides=(1, 2, 4), widths=(8, 16, 16), layers=(1, 1, 2), heads=(1, 2, 4),
                 stem=(8, 8), resolution="0.06M"),
)


@pytest.fixture(scope="module")
def model_files(comfy_server):
    folder = comfy_server.base_dir / "models" / "nextscale"
    folder.mkdir(parents=True, exist_ok=True)
    randomise(NSARM(CONFIG), 0).save(str(folder / "tiny_nsarm.safetensors"))
    torch.manual_seed(3)
    BSQTokenizer(BSQConfig(codebook_dim=4, base_ch=32, ch_mult=(1, 2), num_res_blocks=1)).save(
        str(folder / "tiny_bsq.safetensors"))
    return NSARM.from_file(str(folder / "tiny_nsarm.safetensors")), BSQTokenizer.from_file(
        str(folder / "tiny_bsq.safetensors"))


def upscale_prompt(image: str, model_name: str = "tiny_nsarm.safetensors") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "NextScaleLoadNSARM", "inputs": {
            "model_name": model_name, "tokenizer_name": "tiny_bsq.safetensors", "dtype": "float32"}},
        "3": {"class_type": "NextScaleUpscale", "inputs": {
            "model": ["2", 0], "tokenizer": ["2", 1], "image": ["1", 0], "seed": 1, "scale_by": 4.0, "cfg": 1.0,
            "tau": 0.5, "input_scales": 3, "tiling": "tiles", "tile_overlap": 0.25, "blend": "seamless",
            "color_fix": "adain + wavelet"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "ns-upscaled"}},
    }


def input_image(comfy_server, src: np.ndarray) -> str:
    name = f"ns-lq-{uuid.uuid4().hex[:6]}.png"
    Image.fromarray(src).save(comfy_server.base_dir / "input" / name)
    return name


def test_upscale_end_to_end_with_progress(comfy_server, model_files, events):
    src = (np.random.default_rng(0).random((10, 14, 3)) * 255).astype(np.uint8)
    prompt_id = comfy_server.post_prompt(upscale_prompt(input_image(comfy_server, src)), client_id=events.client_id)
    final = events.wait_finished(prompt_id, timeout=300)
    assert final["type"] == "execution_success", final
    entry = comfy_server.wait_history(prompt_id)
    got = np.asarray(Image.open(comfy_server.output_images(entry)[0]).convert("RGB"), dtype=np.int16)
    assert got.shape == (40, 56, 3)
    tiles, K = tile_count((40, 56), 8, 32, 0.25), 7
    assert tiles == 4 and events.progress(prompt_id, node="3") == [(i + 1, tiles * K) for i in range(tiles * K)]

    model, tok = model_files
    image = image_to_model(torch.from_numpy(src).float().div(255)[None])

    def run(tile, _):
        tokens = sample_nsarm(model, tok, UpscaleCondition(tile), seed=1, options=UpscaleOptions(input_scales=3))
        return tok.decode(tokens.summed_codes)

    with torch.inference_mode():
        out = color_fix(upscale_tiled(run, image, (40, 56), 8, 32, 0.25, "seamless"), image, "adain + wavelet")
    want = np.clip(model_to_image(out)[0].numpy() * 255 + 0.5, 0, 255).astype(np.int16)
    assert np.mean(np.abs(got - want) <= 1) > 0.99


def test_a_missing_model_file_names_the_folder_and_the_download(comfy_server, model_files):
    name = input_image(comfy_server, np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.post_prompt(upscale_prompt(name, model_name="NSARM.pth"))
    text = str(rejected.value.body)
    assert "NSARM.pth" in text and "NSARM_part_*" in text and "nextscale" in text, text
