"""Infinity's nodes inside ComfyUI's python: load a tiny random Infinity + BSQ tokenizer from models/nextscale and a
tiny T5 from models/text_encoders, encode a prompt, sample (with a KV policy, calibrated by NextScale KV Calibrate
(Text), image to image, and inpainting with a prompt: Encode -> Inpaint Guide -> the sampler's guide -> Decode's
composite, also for a patchifying model), decode."""

from __future__ import annotations

import textwrap

from harness.testbed import run_in_comfyui_python
from test_text_encoder import PREAMBLE

NODE_CHECK = textwrap.dedent(PREAMBLE) + textwrap.dedent(
    """
    from comfy_api.latest import io
    from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer
    from nextscale.models.infinity.model import Infinity, InfinityConfig
    from nextscale.models.kv.policies import KVPolicySpec
    from nextscale.models.kv.profile import KVProfile
    from nextscale.models.core.imageops import image_to_model
    from nextscale.models.core.tokens import NextScaleBitTokens, NextScaleTokens
    from nextscale.models.infinity.sampler import latent_scales
    from nextscale.nodes import NODE_MODULES, infinity as inf, kv
    from nextscale.nodes.tokenizer import NextScaleDecode, NextScaleDecodeScales, NextScaleEncode
    from nextscale.nodes.generator import NextScaleSampler
    from nextscale.nodes.editing import NextScaleImageToImageGuide, NextScaleInpaintGuide

    assert any(inf.NextScaleTextSampler in m.NODES for m in NODE_MODULES)
    assert any(kv.NextScaleKVCalibrateText in m.NODES for m in NODE_MODULES)
    assert any(te.NextScaleTextEncodeT5 in m.NODES for m in NODE_MODULES)
    tmp = tempfile.mkdtemp()
    models, encoders = os.path.join(tmp, "nextscale"), os.path.join(tmp, "text_encoders")
    os.makedirs(models), os.makedirs(encoders)
    folder_paths.add_model_folder_path("nextscale", models, is_default=True)
    folder_paths.add_model_folder_path("text_encoders", encoders, is_default=True)

    # files absent: the loader's validation says what to put where
    msg = inf.NextScaleLoadInfinity.validate_inputs("infinity_2b_reg.pth", "infinity_vae_d32reg.pth")
    assert "model not found" in msg and models in msg and "infinity_2b_reg.pth" in msg and "flan-t5-xl" in msg, msg

    torch.manual_seed(0)
    cfg = InfinityConfig(depth=2, embed_dim=64, num_heads=4, hidden_dim=128, token_dim=4, text_dim=64, text_maxlen=32,
                         block_chunks=2, pool_heads=2)
    model = Infinity(cfg)
    model.save(os.path.join(models, "infinity_tiny.safetensors"))
    tok = BSQTokenizer(BSQConfig(codebook_dim=4, base_ch=32, ch_mult=(1, 2), num_res_blocks=1))
    tok.save(os.path.join(models, "bsq_tiny.safetensors"))
    _, _, encoder = tiny_t5()
    save_file(encoder, os.path.join(encoders, "flan_tiny.safetensors"))

    assert inf.NextScaleLoadInfinity.validate_inputs("infinity_tiny.safetensors", "bsq_tiny.safetensors") is True
    loaded_model, loaded_tok = inf.NextScaleLoadInfinity.execute("infinity_tiny.safetensors", "bsq_tiny.safetensors", "auto").result
    raises(lambda: inf.NextScaleLoadInfinity.execute("bsq_tiny.safetensors", "bsq_tiny.safetensors", "auto"),
           "Infinity BSQ tokenizer", "expects an Infinity transformer")
    positive = te.NextScaleTextEncodeT5.execute("flan_tiny.safetensors", "a red (circle:1.2)").result[0]
    negative = te.NextScaleTextEncodeT5.execute("flan_tiny.safetensors", "blurry").result[0]

    inf.NextScaleTextSampler.hidden = io.HiddenHolder.from_dict({})
    def sample(**kw):
        args = dict(model=loaded_model, tokenizer=loaded_tok, positive=positive, seed=5, cfg=3.0, tau=0.5, top_k=900,
                    top_p=0.97, aspect_ratio="2:1 landscape", resolution="0.06M", batch_size=2)
        args.update(kw)
        return inf.NextScaleTextSampler.execute(**args).result[0]

    tokens = sample()
    assert isinstance(tokens, NextScaleBitTokens) and tokens.batch_size == 2 and tokens.scales[-1] == (11, 22)
    image = NextScaleDecode.execute(loaded_tok, tokens, 0).result[0]
    assert tuple(image.shape) == (2, 22, 44, 3) and 0 <= float(image.min()) and float(image.max()) <= 1
    stages, K = NextScaleDecodeScales.execute(loaded_tok, tokens).result
    assert K == 7 and tuple(stages.shape) == (14, 22, 44, 3) and torch.allclose(stages[6], image[0], atol=1e-5)
    with_neg = sample(negative=negative)
    assert not all(torch.equal(a, b) for a, b in zip(tokens.bits, with_neg.bits))
    policy = KVPolicySpec("scalekv", budget=0.3)
    assert len(sample(kv_policy=policy).bits) == 7
    # calibrated KV policies: a profile of this model at the sampler's resolution and aspect ratio, saved and reused
    folder_paths.set_output_directory(tmp)
    kv.NextScaleKVCalibrateText.hidden = io.HiddenHolder.from_dict({})
    profile, path = kv.NextScaleKVCalibrateText.execute(loaded_model, loaded_tok, positive, 2, 0, 3.0, 0.5,
                                                       "2:1 landscape", "0.06M", "tiny infinity").result
    assert path == os.path.join(tmp, "nextscale_kv", "tiny_infinity.json") and KVProfile.load(path) == profile
    assert profile.patch_nums == inf.InfinitySchedule.from_template(0.5, "0.06M").scales
    assert profile.meta["resolution"] == "0.06M" and profile.meta["aspect_ratio"] == "2:1 landscape"
    hack = KVPolicySpec("hack", 0.3, KVProfile.load(path))
    assert sample(kv_policy=hack).extra["kv_policy"] == "hack"
    raises(lambda: sample(kv_policy=hack, aspect_ratio="1:1"), "calibrated on a generator", "at this resolution")
    report, shown = kv.NextScaleKVReportText.execute(loaded_model, loaded_tok, hack, positive, 5, 3.0, 0.5,
                                                     "2:1 landscape", "0.06M", 2).result
    assert "peak KV bytes" in report and "bit agreement with the full cache per scale" in report, report
    assert tuple(shown.shape) == (2, 22, 88, 3)
    full_report = kv.NextScaleKVReportText.execute(loaded_model, loaded_tok, KVPolicySpec("full"), positive, 5, 3.0,
                                                   0.5, "2:1 landscape", "0.06M", 1).result[0]
    assert "PSNR identical" in full_report and "1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00" in full_report, full_report
    assert "not one of the choices" in kv.NextScaleKVCalibrateText.validate_inputs("1:1", "3M")
    kept = sample(image=image[:1], keep_scales=3)
    latent = latent_scales(loaded_model.module, loaded_tok.module, inf.InfinitySchedule.from_template(0.5, "0.06M"))
    encoded = loaded_tok.family.encode(loaded_tok.module, image_to_model(image[:1]), latent, "stretch").bits
    assert all(torch.equal(kept.bits[si][0], encoded[si][0]) for si in range(3))

    # mis-wiring and bad input give clear errors
    raises(lambda: NextScaleEncode.execute(loaded_tok, image, "center crop", "512"), "'0.06M' (the embedded model)")
    raises(lambda: NextScaleSampler.execute(loaded_model, loaded_tok, "3", 0, 4.0, 900, 0.95, False, 1),
           "NextScale Sampler (Text)")
    wide = [[torch.zeros(1, 4, 4096), {"pooled_output": None}]]
    raises(lambda: sample(positive=wide), "4096-wide", "expects 64-wide", "Text Encode (T5)")
    raises(lambda: sample(positive=[]), "conditioning is empty")
    nan = inf.NextScaleTextSampler.validate_inputs("1:1", inf.RESOLUTION_CHOICES[0], cfg=float("nan"))
    assert nan.startswith("cfg = nan is not a number"), nan
    assert "not one of the choices" in inf.NextScaleTextSampler.validate_inputs("16:9", "1M")

    # inpaint with a prompt: Encode (Infinity schedule) -> Inpaint Guide -> the Text Sampler's guide -> Decode's composite
    picture = torch.rand(2, 40, 40, 3)
    encoded = NextScaleEncode.execute(loaded_tok, picture, "center crop", "0.06M").result[0]
    assert isinstance(encoded, NextScaleBitTokens) and encoded.scales[-1] == (16, 16) and encoded.extra["fit"].side == 32
    paint = torch.zeros(2, 40, 40)
    paint[0, 10:30, 20:] = 1
    paint[1, :20] = 1
    spec = NextScaleInpaintGuide.execute(encoded, paint, False, "latent blend", 0, 0).result[0]
    edited = sample(aspect_ratio="1:1", guide=spec)
    keep = spec.keep_masks(encoded.scales, 32)
    for si, kept in enumerate(keep):
        for i in range(2):
            assert torch.equal(edited.bits[si][i][kept[i]], encoded.bits[si][i][kept[i]]), (si, i)
    assert not torch.equal(edited.bits[-1], encoded.bits[-1]) and edited.extra["fit"] == encoded.extra["fit"]
    pasted = NextScaleDecode.execute(loaded_tok, edited, 0, picture, paint, 0).result[0]
    assert tuple(pasted.shape) == (2, 40, 40, 3) and torch.equal(pasted[paint == 0], picture[paint == 0])
    assert not torch.equal(pasted[paint == 1], picture[paint == 1])
    whole = sample(aspect_ratio="1:1", guide=NextScaleImageToImageGuide.execute(encoded, 7).result[0])
    assert all(torch.equal(a, b) for a, b in zip(whole.bits, encoded.bits))
    var_tokens = NextScaleTokens([torch.zeros(1, pn, pn, dtype=torch.long) for pn in (1, 2, 4)], (1, 2, 4))
    var_guide = NextScaleInpaintGuide.execute(var_tokens, paint[:1, :32, :32], False, "tokens", 0, 0).result[0]
    raises(lambda: sample(aspect_ratio="1:1", guide=var_guide), "encoded by a VAR tokenizer")
    wide = NextScaleEncode.execute(loaded_tok, picture, "stretch", "0.06M 2:1").result[0]
    wide_guide = NextScaleImageToImageGuide.execute(wide, 3).result[0]
    raises(lambda: sample(aspect_ratio="1:1", guide=wide_guide), "encoded on the latent grids", "schedule")
    one = NextScaleInpaintGuide.execute(encoded.select([0]), paint, False, "tokens", 0, 0).result[0]
    raises(lambda: sample(aspect_ratio="1:1", guide=one, batch_size=3), "the mask holds 2 images but the sampler makes 3")
    raises(lambda: sample(aspect_ratio="1:1", guide=spec, image=image[:1], keep_scales=2), "both 'guide' and image")

    # a patchifying model (Infinity-8B's layout, 2 x 2 latent cells a token): Encode with the model, on its latent grids
    Infinity(InfinityConfig(**{**cfg.to_dict(), "token_dim": 16})).save(os.path.join(models, "infinity_tiny_8b.safetensors"))
    patched, _ = inf.NextScaleLoadInfinity.execute("infinity_tiny_8b.safetensors", "bsq_tiny.safetensors", "auto").result
    encoded8 = NextScaleEncode.execute(loaded_tok, picture, "center crop", "0.06M", patched).result[0]
    assert encoded8.scales == tuple((2 * h, 2 * w) for h, w in encoded.scales) and encoded8.extra["fit"].side == 64
    assert NextScaleEncode.execute(loaded_tok, picture, "center crop", "0.06M", loaded_model).result[0].scales == encoded.scales
    spec8 = NextScaleInpaintGuide.execute(encoded8, paint, False, "tokens", 0, 0).result[0]
    edited8 = sample(model=patched, aspect_ratio="1:1", guide=spec8)
    for si, kept in enumerate(spec8.keep_masks(encoded8.scales, 64)):
        for i in range(2):
            assert torch.equal(edited8.bits[si][i][kept[i]], encoded8.bits[si][i][kept[i]]), (si, i)
    raises(lambda: sample(model=patched, aspect_ratio="1:1", guide=spec), "connect it to NextScale Encode's 'model' input")
    print("infinity nodes ok")
    """  # noqa: E501 (lines of the script above; wrapping them would change the string)
)


def test_infinity_nodes_in_comfyui(tmp_path):
    result = run_in_comfyui_python(NODE_CHECK, cwd=tmp_path, timeout=300)
    assert result.returncode == 0 and "infinity nodes ok" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-3000:]
    )
