"""The embedded text-to-image model in the nodes, apart from the shipped weights: its three files are built at a tiny
size by the training code's own export path (training/train_bsq.py's tokenizer save, training/train_t2i.py's
``export``) and its card by training/t2i_evaluate.py's ``write_card``, into a folder that NEXTSCALE_EMBEDDED_DIR
points the pack at. Inside ComfyUI's python: ``nextscale-embedded-t2i`` is no choice while the files are absent (and
a saved workflow naming it gets a message naming the missing file); once they are there it is the first choice of
Load Infinity (both inputs), Load NSARM's tokenizer and Text Encode (T5), and a prompt encoded by Text Encode (T5),
sampled by the Text Sampler at 0.06M and decoded gives 64 px images. ComfyUI's T5 gives the trainer's features from
the exported file. The VAR embedded choice still resolves to the VAR files, and neither loader reaches the other's
files."""

from __future__ import annotations

import json
import textwrap

import torch
from harness.testbed import run_in_comfyui_python
from nextscale.models.infinity.bsq import BSQTokenizer

from training import t2i_evaluate, train_bsq, train_t2i

# tiny versions of the recipe's models (4 px cells: a 16 x 16 latent at 64 px, as the recipe's tokenizer)
TOKENIZER = ["--codebook-dim", "4", "--base-ch", "24", "--ch-mult", "1,1,1"]
GENERATOR = ["--t5-width", "32", "--t5-layers", "1", "--t5-heads", "2", "--t5-ff", "32", "--depth", "1",
             "--embed-dim", "32", "--num-heads", "2", "--text-maxlen", "32"]
FILES = {"tokenizer": "nextscale_t2i_tokenizer.safetensors", "generator": "nextscale_t2i_generator.safetensors",
         "text_encoder": "nextscale_t2i_text_encoder.safetensors"}
CARD = "nextscale_t2i.json"


def build_embedded_files(folder) -> dict[str, str]:
    """The three files of the embedded model (random weights) and its card in ``folder``, written as the recipe
    writes them."""
    torch.manual_seed(0)
    paths = {role: str(folder / name) for role, name in FILES.items()}
    bsq_args = train_bsq.build_parser().parse_args(["--data-dir", "unused", *TOKENIZER])
    tokenizer = BSQTokenizer(train_bsq.config_from_args(bsq_args))
    tokenizer.save(paths["tokenizer"])
    t2i_args = train_t2i.build_parser().parse_args(["--data-dir", "unused", "--tokenizer", "unused", *GENERATOR])
    model = train_t2i.TextToImage(*train_t2i.configs_from_args(t2i_args, tokenizer.codebook_dim))
    train_t2i.export(model, paths["generator"], paths["text_encoder"])
    chance = 1 / 24
    result = {
        "tokenizer": {"psnr": 0.0},
        "classifier": {"categories": ["c"] * 24, "heldout_accuracy": 0.0},
        "generator": {"chance": chance, "at_cfg": [
            {"cfg": cfg, "category_accuracy": chance, "frechet_ratio": 1.0} for cfg in (3.0, 1.5)]},
        "timing_4_images": {"median_s": 1.0},
        "sampling": {"cfg": 3.0, "tau": 1.0, "schedule": [list(s) for s in train_bsq.SCHEDULE.scales]},
    }
    t2i_evaluate.write_card(str(folder / CARD), result, paths, ["python -m training.t2i"], {})
    return paths


CHECK = textwrap.dedent(
    """
    import os, shutil
    built, embedded = script_args
    os.environ["NEXTSCALE_EMBEDDED_DIR"] = embedded  # read when nextscale.nodes.model_files is imported
    sys.path.append(root)  # training/ as ``training``
    import torch
    from comfy_api.latest import io
    from nextscale.models.core.tokens import NextScaleBitTokens
    from nextscale.nodes import model_files as mf, service, text_encoder as te
    from nextscale.nodes.control import NextScaleLoadControl
    from nextscale.nodes.generator import NextScaleLoadGenerator
    from nextscale.nodes.infinity import NextScaleLoadInfinity, NextScaleTextSampler
    from nextscale.nodes.tokenizer import NextScaleDecode, NextScaleLoadTokenizer
    from nextscale.nodes.upscale import NextScaleLoadNSARM
    from training import t2i_evaluate, t2i_text

    T2I = "nextscale-embedded-t2i"
    INFINITY, T5_NODE = "NextScale Load Infinity", "NextScale Text Encode (T5)"
    VAR_LOADERS = (("NextScale Load Generator", "generator"), ("NextScale Load Tokenizer", "tokenizer"))
    assert mf.WEIGHTS_DIR == embedded and mf.EMBEDDED_T2I == T2I

    def combos(node):
        return {i.id: i.options for i in node.define_schema().inputs if isinstance(i, io.Combo.Input)}

    def combo_choices():
        return {
            "infinity model": combos(NextScaleLoadInfinity)["model_name"],
            "infinity tokenizer": combos(NextScaleLoadInfinity)["tokenizer_name"],
            "nsarm tokenizer": combos(NextScaleLoadNSARM)["tokenizer_name"],
            "text encoder": combos(te.NextScaleTextEncodeT5)["text_encoder"],
        }

    from harness.checks import raises

    # files absent: no choice anywhere, and a saved workflow naming it is told which file is missing
    assert all(T2I not in options for options in combo_choices().values()), combo_choices()
    missing = os.path.join(embedded, "nextscale_t2i_generator.safetensors")
    msg = NextScaleLoadInfinity.validate_inputs(T2I, T2I)
    assert "is not installed" in msg and missing in msg and "NEXTSCALE_EMBEDDED_DIR" in msg, msg
    msg = te.NextScaleTextEncodeT5.validate_inputs(T2I)
    assert "is not installed" in msg and "nextscale_t2i_text_encoder.safetensors" in msg, msg
    raises(lambda: te.resolve_text_encoder(T2I), "is not installed")

    # the files land (with the VAR embedded model's beside them, as in the pack's weights/)
    for name in os.listdir(built):
        shutil.copy(os.path.join(built, name), embedded)
    for name in ("nextscale_generator.safetensors", "nextscale_tokenizer.safetensors"):
        os.symlink(os.path.join(root, "weights", name), os.path.join(embedded, name))
    for what, options in combo_choices().items():
        assert options[0] == T2I, (what, options)
    assert NextScaleLoadInfinity.validate_inputs(T2I, T2I) is True
    assert te.NextScaleTextEncodeT5.validate_inputs(T2I) is True
    assert mf.read_embedded_card(T2I)["name"] == T2I

    # VAR's embedded choice is VAR's files; the t2i choice is no VAR file and VAR's no Infinity file
    for (loader, role), name in zip(VAR_LOADERS, ("nextscale_generator", "nextscale_tokenizer"), strict=True):
        assert service.resolve("nextscale-embedded", loader, role) == os.path.join(embedded, name + ".safetensors")
        raises(lambda: service.resolve(T2I, loader, role), "model not found", T2I)
    for role in ("generator", "tokenizer"):
        raises(lambda: service.resolve("nextscale-embedded", INFINITY, role), "model not found")
    for node in (NextScaleLoadGenerator, NextScaleLoadTokenizer, NextScaleLoadControl):
        assert all(T2I not in options for options in combos(node).values()), node
    assert "nextscale-embedded" not in combo_choices()["infinity model"]

    # loaded through the service, identified by their families
    model, tokenizer = NextScaleLoadInfinity.execute(T2I, T2I, "auto").result
    assert (str(model.kind), str(tokenizer.kind)) == ("infinity-generator", "infinity-tokenizer")
    assert model.path == os.path.join(embedded, "nextscale_t2i_generator.safetensors")

    # ComfyUI's T5 from the exported file gives the trainer's features (stored fp16, ComfyUI's default dtype)
    prompts = ["red apple, emoji", "a full moon over a sleeping fox", ""]
    trained = t2i_evaluate.load_model(
        os.path.join(embedded, "nextscale_t2i_generator.safetensors"),
        os.path.join(embedded, "nextscale_t2i_text_encoder.safetensors"),
    )
    ptok = t2i_text.PromptTokenizer(os.path.join(te.TOKENIZER_DIR, "tokenizer.json"))
    for prompt in prompts:
        cond = te.NextScaleTextEncodeT5.execute(T2I, prompt).result[0]
        feats = cond[0][0]
        ids, mask = ptok.batch([prompt], 64)
        with torch.no_grad():
            ours = trained.text(ids, mask)
        assert feats.shape == ours.shape == (1, ids.shape[1], 32), (feats.shape, ours.shape)
        err = (feats.float() - ours).abs().max().item()
        assert err < 1e-3, (prompt, err)  # the same fp16 weights, both computing in float32

    # a prompt, sampled at the model's 0.06M and decoded: four 64 px images
    positive = te.NextScaleTextEncodeT5.execute(T2I, "red apple, emoji").result[0]
    NextScaleTextSampler.hidden = io.HiddenHolder.from_dict({})
    def sample(resolution):
        return NextScaleTextSampler.execute(
            model=model, tokenizer=tokenizer, positive=positive, seed=3, cfg=3.0, tau=1.0, top_k=900, top_p=0.97,
            aspect_ratio="1:1", resolution=resolution, batch_size=4,
        ).result[0]
    tokens = sample("0.06M")
    assert isinstance(tokens, NextScaleBitTokens) and len(tokens.bits) == 7 and tokens.scales[-1] == (16, 16)
    image = NextScaleDecode.execute(tokenizer, tokens, 0).result[0]
    assert tuple(image.shape) == (4, 64, 64, 3) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert not torch.equal(image[0], image[1])  # item i uses seed + i
    raises(lambda: sample("1M"), "resolution 1M samples 13 scales", "at most 7", "choose resolution 0.06M")
    print("embedded t2i ok")
    """
)


def test_embedded_t2i_model_in_the_nodes(tmp_path):
    built, embedded = tmp_path / "built", tmp_path / "embedded"
    built.mkdir()
    embedded.mkdir()
    paths = build_embedded_files(built)
    card = json.loads((built / CARD).read_text())
    assert card["name"] == "nextscale-embedded-t2i" and card["default_sampling"]["schedule"][-1] == [16, 16]
    assert sorted(p.name for p in built.iterdir()) == sorted([*FILES.values(), CARD]) and len(paths) == 3
    result = run_in_comfyui_python(CHECK, str(built), str(embedded), cwd=tmp_path, timeout=600)
    assert result.returncode == 0 and "embedded t2i ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
