"""NSARM's nodes inside ComfyUI's python: load a tiny random NSARM and its BSQ tokenizer from models/nextscale,
upscale with and without a T5 prompt, in tiles and as one tile, and refuse mis-wired or wrong files clearly."""

from __future__ import annotations

import textwrap

from harness.testbed import run_in_comfyui_python
from test_text_encoder import PREAMBLE

NODE_CHECK = textwrap.dedent(PREAMBLE) + textwrap.dedent(
    """
    from comfy_api.latest import io
    from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer
    from nextscale.models.infinity.model import InfinityConfig
    from nextscale.models.nsarm.mapper import MapperConfig
    from nextscale.models.nsarm.model import NSARM, NSARMConfig
    from nextscale.models.kv.policies import KVPolicySpec
    from nextscale.nodes import NODE_MODULES, infinity as inf, upscale as up
    from test_nsarm import randomised

    assert any(up.NextScaleUpscale in m.NODES for m in NODE_MODULES)
    tmp = tempfile.mkdtemp()
    models, encoders = os.path.join(tmp, "nextscale"), os.path.join(tmp, "text_encoders")
    os.makedirs(models), os.makedirs(encoders)
    folder_paths.add_model_folder_path("nextscale", models, is_default=True)
    folder_paths.add_model_folder_path("text_encoders", encoders, is_default=True)

    msg = up.NextScaleLoadNSARM.validate_inputs("NSARM.pth", "infinity_vae_d56_f8_14_patchify.pth")
    assert "model not found" in msg and models in msg and "NSARM_part_*" in msg, msg

    config = NSARMConfig(
        InfinityConfig(depth=2, embed_dim=32, num_heads=2, hidden_dim=64, token_dim=4, text_dim=64, text_maxlen=8,
                       block_chunks=2, pool_heads=2),
        MapperConfig(channels=4, grid=4, sides=(1, 2, 4), widths=(8, 16, 16), layers=(1, 1, 2), heads=(1, 2, 4),
                     stem=(8, 8), resolution="0.06M"),
    )
    randomised(NSARM(config), 0).save(os.path.join(models, "nsarm_tiny.safetensors"))
    torch.manual_seed(3)
    BSQTokenizer(BSQConfig(codebook_dim=4, base_ch=32, ch_mult=(1, 2), num_res_blocks=1)).save(
        os.path.join(models, "bsq_tiny.safetensors"))
    _, _, encoder = tiny_t5()
    save_file(encoder, os.path.join(encoders, "flan_tiny.safetensors"))

    assert up.NextScaleLoadNSARM.validate_inputs("nsarm_tiny.safetensors", "bsq_tiny.safetensors") is True
    model, tok = up.NextScaleLoadNSARM.execute("nsarm_tiny.safetensors", "bsq_tiny.safetensors", "auto").result
    assert str(model.kind) == "nsarm-upscaler" and str(tok.kind) == "infinity-tokenizer"
    raises(lambda: inf.NextScaleLoadInfinity.execute("nsarm_tiny.safetensors", "bsq_tiny.safetensors", "auto"),
           "NSARM super-resolution model", "NextScale Load NSARM", "expects an Infinity transformer")
    raises(lambda: up.NextScaleLoadNSARM.execute("bsq_tiny.safetensors", "bsq_tiny.safetensors", "auto"),
           "Infinity BSQ tokenizer", "expects an NSARM super-resolution model")
    positive = te.NextScaleTextEncodeT5.execute("flan_tiny.safetensors", "a photo of a red brick wall").result[0]

    up.NextScaleUpscale.hidden = io.HiddenHolder.from_dict({})
    image = torch.rand(2, 10, 19, 3)
    def upscale(**kw):
        args = dict(model=model, tokenizer=tok, image=image, seed=1, scale_by=4.0, cfg=1.0, tau=0.5, input_scales=3,
                    tiling="tiles", tile_overlap=0.125, blend="seamless", color_fix="adain + wavelet")
        args.update(kw)
        return up.NextScaleUpscale.execute(**args).result[0]

    out = upscale()
    assert tuple(out.shape) == (2, 40, 76, 3) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(out, upscale())
    assert tuple(upscale(scale_by=2.5, positive=positive, kv_policy=KVPolicySpec("scalekv", 0.5)).shape) == (2, 25, 48, 3)
    assert not torch.equal(out, upscale(positive=positive))
    assert tuple(upscale(tiling="whole image", color_fix="none").shape) == (2, 40, 76, 3)
    assert torch.equal(upscale(input_scales=7), out)  # more than the 3 mapped scales: every mapped one
    assert not torch.equal(upscale(input_scales=1), out)
    raises(lambda: upscale(tokenizer=model), "connect the model and tokenizer outputs of NextScale Load NSARM")
    wide = [[torch.zeros(1, 4, 4096), {"pooled_output": None}]]
    raises(lambda: upscale(positive=wide), "4096-wide", "expects 64-wide")
    bad = up.NextScaleUpscale.validate_inputs("mosaic", "seamless", "none")
    assert "tiling = 'mosaic' is not one of the choices" in bad, bad
    nan = up.NextScaleUpscale.validate_inputs("tiles", "seamless", "none", tau=float("nan"))
    assert nan.startswith("tau = nan is not a number"), nan
    print("nsarm nodes ok")
    """  # noqa: E501 (lines of the script above; wrapping them would change the string)
)


def test_nsarm_nodes_in_comfyui(tmp_path):
    result = run_in_comfyui_python(NODE_CHECK, cwd=tmp_path, timeout=600)
    assert result.returncode == 0 and "nsarm nodes ok" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-3000:]
    )
