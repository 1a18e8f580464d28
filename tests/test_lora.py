"""LoRA: the file format and its checks (models/core/lora.py), the trainer (training/train_lora.py) on the embedded
VAR and on a tiny Infinity, and NextScale Load LoRA inside ComfyUI's python, patching through its ModelPatcher."""

import json
import os
import shutil
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness.testbed import run_in_comfyui_python  # noqa: E402

from training import common, data, evaluate_lora, train_lora  # noqa: E402

common.import_pack()
from nextscale.models.core import lora  # noqa: E402
from nextscale.models.core.errors import NextScaleError  # noqa: E402
from nextscale.models.infinity.model import Infinity, InfinityConfig  # noqa: E402
from nextscale.models.var.model import VAR, VARConfig  # noqa: E402

WEIGHTS = os.path.join(ROOT, "weights")
GENERATOR = os.path.join(WEIGHTS, "nextscale_generator.safetensors")
TOKENIZER = os.path.join(WEIGHTS, "nextscale_tokenizer.safetensors")
TINY_VAR = VARConfig(depth=3, embed_dim=64, num_heads=2, num_classes=10, vocab_size=64, cvae=8, patch_nums=(1, 2, 4))
TINY_INFINITY = InfinityConfig(depth=4, embed_dim=64, num_heads=4, hidden_dim=128, token_dim=4, text_dim=64,
                               text_maxlen=32, block_chunks=2, pool_heads=2)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def random_lora(model, groups=("attn", "ffn"), rank=2, seed=0) -> dict[str, lora.LoRAWeight]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in lora.target_keys(shapes(model), groups):
        o, i = model.get_parameter(key).shape
        out[key] = lora.LoRAWeight(torch.randn(o, rank, generator=g) * 0.1, torch.randn(rank, i, generator=g), 3.0)
    return out


# -- models/core/lora.py ------------------------------------------------------------------------------------------


def test_layer_groups_pick_the_official_keys_of_either_family():
    var = VAR(TINY_VAR)
    assert lora.target_keys(shapes(var), ["attn", "cross"], lora.parse_blocks("1-2")) == [
        "blocks.1.attn.mat_qkv.weight", "blocks.1.attn.proj.weight",
        "blocks.2.attn.mat_qkv.weight", "blocks.2.attn.proj.weight"]
    assert lora.target_keys(shapes(var), ["class", "head"]) == ["class_emb.weight", "head.weight"]
    infinity = Infinity(TINY_INFINITY)  # two chunks of two blocks: block 3 is block_chunks.1.module.1
    assert lora.target_keys(shapes(infinity), ["ffn", "cross"], (3,)) == [
        f"block_chunks.1.module.1.{name}.weight" for name in ("ca.mat_q", "ca.mat_kv", "ca.proj", "ffn.fc1", "ffn.fc2")]
    assert lora.parse_blocks("0-2, 5,1") == (0, 1, 2, 5)
    with pytest.raises(NextScaleError, match="name no weight"):
        lora.target_keys(shapes(var), ["cross"])
    with pytest.raises(NextScaleError, match="choose from attn, cross"):
        lora.target_keys(shapes(var), ["mlp"])
    with pytest.raises(NextScaleError, match="'0-x'"):
        lora.parse_blocks("0-x")


def test_file_round_trip_and_comfyui_layout(tmp_path):
    var = VAR(TINY_VAR)
    weights = random_lora(var)
    path = str(tmp_path / "a.safetensors")
    lora.save_lora(path, weights, {"family": "var", "rank": 2, "base": var.config.to_dict()})
    sd = common.read_safetensors(path)[0]
    # ComfyUI's "regular" LoRA names: <module>.lora_up.weight, <module>.lora_down.weight, <module>.alpha
    assert "blocks.0.attn.mat_qkv.lora_up.weight" in sd and float(sd["blocks.0.attn.mat_qkv.alpha"]) == 3.0
    back = lora.read_lora(path)
    assert back.config["kind"] == lora.LORA_KIND and back.config["family"] == "var"
    assert set(back.weights) == set(weights)
    for key, w in weights.items():
        assert torch.equal(back.weights[key].up, w.up) and torch.equal(back.weights[key].down, w.down)
        assert back.weights[key].alpha == 3.0
    lora.check_fits(back, shapes(var))
    deeper = VAR(VARConfig(**{**TINY_VAR.to_dict(), "depth": 2}))
    with pytest.raises(NextScaleError, match=r"'a' is a rank-2 LoRA of a VAR transformer \(depth 3, embed_dim 64\) "
                                             r"and does not fit the model: it adapts .*blocks\.2\."):
        lora.check_fits(back, shapes(deeper), "'a'")
    wider = VAR(VARConfig(**{**TINY_VAR.to_dict(), "embed_dim": 128}))
    with pytest.raises(NextScaleError, match="weights of other shapes"):
        lora.check_fits(back, shapes(wider))


def test_files_of_another_kind_are_refused_with_the_reason(tmp_path):
    var = VAR(TINY_VAR)
    gen = str(tmp_path / "gen.safetensors")
    var.save(gen)
    with pytest.raises(NextScaleError, match=r"is a VAR generator .* NextScale Load LoRA takes LoRA files"):
        lora.read_lora(gen)
    sd = lora.lora_state_dict(random_lora(var))
    for name, broken, needle in [
        ("stray", {**sd, "blocks.0.attn.proj.weight": torch.zeros(64, 64)}, "belong to no"),
        ("no_down", {k: v for k, v in sd.items() if k != "blocks.0.ffn.fc1.lora_down.weight"}, "without"),
        ("ranks", {**sd, "blocks.0.ffn.fc1.lora_down.weight": torch.zeros(3, 64)}, "expected up .out, rank."),
        ("alpha", {**sd, "blocks.0.ffn.fc1.alpha": torch.tensor([1.0, 2.0])}, "one finite number"),
    ]:
        path = str(tmp_path / f"{name}.safetensors")
        common.export_safetensors(path, broken, {})
        with pytest.raises(NextScaleError, match=needle):
            lora.read_lora(path)


def test_apply_matches_the_formula_and_removing_restores_the_weights_exactly():
    torch.manual_seed(0)
    var = VAR(TINY_VAR).eval()
    before = {k: v.clone() for k, v in var.state_dict().items()}
    weight_objects = {k: var.get_parameter(k) for k in random_lora(var)}
    x, lab = torch.randn(2, 4, 8), torch.tensor([1, 3])
    plain = var(lab, x)
    file_lora = lora.LoRA(random_lora(var), {"family": "var"})
    lora.apply_lora(var, file_lora, strength=0.0)
    assert torch.equal(var(lab, x), plain)  # strength 0: bit-identical
    lora.remove_lora(var)
    lora.apply_lora(var, file_lora, strength=0.7)
    for key, w in file_lora.weights.items():
        module = var.get_submodule(key[: -len(".weight")])
        expected = before[key] + 0.7 * (3.0 / 2) * (w.up @ w.down)
        torch.testing.assert_close(module.weight, expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(module.weight, w.apply_to(before[key], 0.7))
    assert not torch.allclose(var(lab, x), plain)
    with pytest.raises(NextScaleError, match="already carries a LoRA"):
        lora.apply_lora(var, file_lora)
    lora.remove_lora(var)
    after = var.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(var.get_parameter(k) is p for k, p in weight_objects.items())  # the very same tensors
    assert torch.equal(var(lab, x), plain)


def test_new_lora_starts_at_the_base_model_and_trains_only_itself():
    torch.manual_seed(0)
    var = VAR(TINY_VAR)
    x, lab = torch.randn(2, 4, 8), torch.tensor([1, 3])
    plain = var(lab, x).detach()
    keys = lora.target_keys(shapes(var), ["attn", "ffn", "head"])  # a fresh VAR's blocks are near identity
    lora.add_lora(var, keys, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(var(lab, x), plain)  # up starts at zero
    trained = {n for n, p in var.named_parameters() if p.requires_grad}
    assert trained and all(lora.is_lora_parameter(n) for n in trained) and len(trained) == 2 * len(keys)
    opt = torch.optim.SGD([p for p in var.parameters() if p.requires_grad], lr=0.1)
    var(lab, x).square().mean().backward()
    opt.step()
    assert not torch.equal(var(lab, x), plain)
    weights = lora.lora_weights(var.state_dict(), alpha=8.0)
    assert set(weights) == set(keys) and all(w.rank == 4 and w.alpha == 8.0 for w in weights.values())
    lora.remove_lora(var)
    assert torch.equal(var(lab, x), plain)


# -- training/train_lora.py ---------------------------------------------------------------------------------------


def style_folder(root, count=30):
    """The synthetic shapes in negative colours (a style the embedded model never saw), side-car class names."""
    os.makedirs(root, exist_ok=True)
    images, labels = data.render_many(11, "train", 0, count, 64)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(255 - img).save(os.path.join(root, f"{i:03d}.png"))
        with open(os.path.join(root, f"{i:03d}.txt"), "w") as f:
            f.write(data.CLASS_NAMES[label] + "\n")
    return root


def lora_args(run_dir, data_dir, steps, extra=()):
    return ["--base", GENERATOR, "--tokenizer", TOKENIZER, "--data", data_dir, "--rank", "4", "--steps", str(steps),
            "--batch-size", "4", "--lr", "1e-2", "--warmup", "1", "--eval-every", "1000", "--run-dir", run_dir,
            "--no-progress", "--threads", "1", "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA of the embedded generator trained for 12 steps on negative-colour shapes."""
    root = tmp_path_factory.mktemp("lora")
    folder = style_folder(str(root / "negative"))
    out = str(root / "negative.safetensors")
    train_lora.main(lora_args(str(root / "run"), folder, 12, ["--out", out]))
    return root, folder, out


def _log(run_dir, kind):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_var_lora_trains_evaluates_and_exports(trained):
    root, _, out = trained
    losses = [r["loss"] for r in _log(str(root / "run"), "train")]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    final = _log(str(root / "run"), "eval")[-1]  # on the 2 held-out images, with the LoRA and without
    assert final["step"] == 12 and final["heldout_ce"] != final["base_ce"], final
    trained_lora = lora.read_lora(out)
    cfg = trained_lora.config
    assert (cfg["family"], cfg["rank"], cfg["alpha"], cfg["groups"]) == ("var", 4, 4.0, ["attn", "cross", "ffn"])
    assert cfg["base"]["depth"] == 8 and cfg["trained_on"]["images"] == 28
    assert cfg["trained_on"]["classes"] == sorted(data.CLASS_NAMES)
    assert len(trained_lora.weights) == 8 * 4 and all(w.up.abs().max() > 0 for w in trained_lora.weights.values())
    assert os.path.getsize(out) < 1_000_000


def test_evaluate_lora_measures_every_strength_on_the_same_seeds(trained, tmp_path):
    _, _, out = trained
    grid = str(tmp_path / "grid.png")
    res = evaluate_lora.evaluate_lora(out, "outline", [0.0, 1.0], GENERATOR, TOKENIZER,
                                      os.path.join(WEIGHTS, "classifier.safetensors"), per_class=2, grid=grid)
    assert res["strength_0_bit_identical"] is True and res["images_per_set"] == 20
    sets = res["sets"]
    assert list(sets) == ["none", "strength 0", "strength 1"] and sets["strength 0"] == sets["none"]
    assert sets["strength 1"] != sets["none"]
    assert set(sets["none"]) == {"class_accuracy", "frechet_to_filled", "frechet_to_outline"}
    assert set(res["frechet_floor"]) == {"filled", "outline"}
    assert Image.open(grid).size == (20 * 64, 3 * 64)  # a row per set, two images of each class


def test_var_lora_resume_is_exact(trained, tmp_path):
    _, folder, _ = trained
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    train_lora.main(lora_args(straight, folder, 4))
    train_lora.main(lora_args(broken, folder, 4, ["--stop-after", "2"]))
    train_lora.main(lora_args(broken, folder, 4))
    a, b = (common.load_checkpoint(os.path.join(r, "last.pt"))["lora"] for r in (straight, broken))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="trains another LoRA"):
        train_lora.main(lora_args(broken, folder, 4, ["--layers", "attn"]))


def test_trainer_names_bad_data(tmp_path):
    folder = str(tmp_path / "bad")
    os.makedirs(folder)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(folder, "a.png"))
    with pytest.raises(SystemExit, match=r"a.png has no text: put its class name or caption into .*a.txt"):
        train_lora.main(lora_args(str(tmp_path / "r1"), folder, 1))
    with open(os.path.join(folder, "a.txt"), "w") as f:
        f.write("dragon")
    with pytest.raises(NextScaleError, match="'dragon' is not a class of this generator; its classes are: circle"):
        train_lora.main(lora_args(str(tmp_path / "r2"), folder, 1))
    args = lora_args(str(tmp_path / "r3"), folder, 1)
    args[args.index("--base") + 1] = TOKENIZER
    with pytest.raises(SystemExit, match=r"is a VAR tokenizer .* give a VAR generator or an Infinity transformer"):
        train_lora.main(args)


def test_infinity_lora_trains_on_captions(tmp_path):
    """A tiny Infinity, BSQ tokenizer and T5 (Hugging Face folder with ComfyUI's T5 tokenizer files)."""
    from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    Infinity(TINY_INFINITY).save(str(tmp_path / "inf.safetensors"))
    BSQTokenizer(BSQConfig(codebook_dim=4, base_ch=32, ch_mult=(1, 2), num_res_blocks=1)).save(
        str(tmp_path / "bsq.safetensors"))
    t5 = tmp_path / "t5"
    T5EncoderModel(T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                            feed_forward_proj="gated-gelu")).save_pretrained(str(t5))
    tokenizer_files = ROOT + "/.testbed/comfyui/comfy/text_encoders/t5_tokenizer"
    for name in os.listdir(tokenizer_files):
        shutil.copy(os.path.join(tokenizer_files, name), t5)
    folder = tmp_path / "captioned"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((20, 20)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["a red square", "a blue circle on white"][i % 2])
    out = str(tmp_path / "inf_lora.safetensors")
    run = str(tmp_path / "run")
    train_lora.main(["--base", str(tmp_path / "inf.safetensors"), "--tokenizer", str(tmp_path / "bsq.safetensors"),
                     "--text-encoder", str(t5), "--schedule", "1,2,4", "--data", str(folder), "--rank", "2",
                     "--steps", "6", "--batch-size", "3", "--lr", "2e-2", "--warmup", "1", "--run-dir", run,
                     "--no-progress", "--threads", "1", "--log-every", "1", "--out", out])
    losses = [r["loss"] for r in _log(run, "train")]
    assert losses[-1] < losses[0], losses
    trained_lora = lora.read_lora(out)
    assert trained_lora.config["family"] == "infinity"
    assert "block_chunks.1.module.1.ca.mat_kv.weight" in trained_lora.weights  # cross-attention adapted too
    lora.check_fits(trained_lora, shapes(Infinity(TINY_INFINITY)))


# -- NextScale Load LoRA in ComfyUI -------------------------------------------------------------------------------


NODE_CHECK = textwrap.dedent(
    """
    import os, shutil, tempfile
    lora_file, infinity_lora_file = script_args
    import torch
    import folder_paths
    from comfy_api.latest import io
    from nextscale.models.core import lora as core
    from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer
    from nextscale.models.infinity.model import Infinity, InfinityConfig
    from nextscale.nodes import infinity as inf
    from nextscale.nodes import lora as ln
    from nextscale.nodes.generator import NextScaleLoadGenerator, NextScaleSampler
    from nextscale.nodes.tokenizer import NextScaleDecode, NextScaleLoadTokenizer

    from harness.checks import raises

    tmp = tempfile.mkdtemp()
    loras, models = os.path.join(tmp, "loras"), os.path.join(tmp, "nextscale")
    os.makedirs(loras), os.makedirs(models)
    folder_paths.add_model_folder_path("loras", loras, is_default=True)
    folder_paths.add_model_folder_path("nextscale", models, is_default=True)
    shutil.copy(lora_file, os.path.join(loras, "negative.safetensors"))
    shutil.copy(infinity_lora_file, os.path.join(loras, "tiny_infinity.safetensors"))
    shutil.copy(os.path.join(root, "weights", "nextscale_generator.safetensors"), os.path.join(loras, "not_a_lora.safetensors"))
    assert ln.lora_choices()[:2] == ["nextscale-embedded-outline", "negative.safetensors"]
    message = ln.NextScaleLoadLoRA.validate_inputs("missing.safetensors")
    assert "LoRA 'missing.safetensors' was not found in ComfyUI's loras folder" in message, message
    assert "strength = nan is not a number" in ln.NextScaleLoadLoRA.validate_inputs("nextscale-embedded-outline", float("nan"))
    schema = ln.NextScaleLoadLoRA.define_schema()
    assert schema.inputs[0].get_io_type() == schema.outputs[0].get_io_type() == "NEXTSCALE_GENERATOR,NEXTSCALE_INFINITY"

    gen = NextScaleLoadGenerator.execute("nextscale-embedded", "float32").result[0]
    tok = NextScaleLoadTokenizer.execute("nextscale-embedded", "float32").result[0]
    original = {k: v.clone() for k, v in gen.module.state_dict().items()}
    NextScaleSampler.hidden = io.HiddenHolder.from_dict({})
    def sample(model):
        tokens = NextScaleSampler.execute(model, tok, "circle", 7, 4.0, 900, 0.95, False, 2, class_list="star, heart").result[0]
        return tokens, NextScaleDecode.execute(tok, tokens, 0).result[0]
    def weights_now():
        return gen.module.state_dict()

    base_tokens, base_image = sample(gen)
    zero = ln.NextScaleLoadLoRA.execute(gen, "negative.safetensors", 0.0).result[0]
    one = ln.NextScaleLoadLoRA.execute(gen, "negative.safetensors", 1.0).result[0]
    assert zero.patcher is not gen.patcher and zero.module is gen.module and len(gen.patcher.patches) == 0
    tokens, image = sample(zero)  # strength 0: bit-identical images
    assert torch.equal(image, base_image) and all(torch.equal(a, b) for a, b in zip(tokens.indices, base_tokens.indices))
    tokens, image = sample(one)  # a trained LoRA changes the images
    assert not torch.equal(image, base_image)
    trained = core.read_lora(lora_file)
    now = weights_now()  # ComfyUI has patched the loaded clone's weights: exactly the formula of models.core.lora
    for key, w in trained.weights.items():
        assert torch.equal(now[key], w.apply_to(original[key], 1.0)), key
    tokens, image = sample(gen)  # the base model again: ComfyUI unpatched, weights restored exactly
    assert torch.equal(image, base_image)
    now = weights_now()
    assert all(torch.equal(now[k], original[k]) for k in original)

    half = ln.NextScaleLoadLoRA.execute(gen, "negative.safetensors", 0.5).result[0]
    stacked = ln.NextScaleLoadLoRA.execute(half, "negative.safetensors", 0.5).result[0]
    key = next(iter(trained.weights))
    assert len(stacked.patcher.patches[key]) == 2 and len(half.patcher.patches[key]) == 1
    tokens, image = sample(stacked)
    for k, w in trained.weights.items():
        torch.testing.assert_close(weights_now()[k], w.apply_to(original[k], 1.0), rtol=1e-5, atol=1e-6)
    sample(gen)
    assert all(torch.equal(weights_now()[k], original[k]) for k in original)

    outline = ln.NextScaleLoadLoRA.execute(gen, "nextscale-embedded-outline", 1.0).result[0]  # the shipped example
    assert not torch.equal(sample(outline)[1], base_image)
    raises(lambda: ln.NextScaleLoadLoRA.execute(gen, "not_a_lora.safetensors", 1.0), "is a VAR generator", "LoRA files")
    raises(lambda: ln.NextScaleLoadLoRA.execute(gen, "tiny_infinity.safetensors", 1.0), "LoRA of an Infinity transformer", "VAR generator")
    raises(lambda: ln.NextScaleLoadLoRA.execute(gen, "gone.safetensors", 1.0), "was not found in ComfyUI's loras folder")

    # Infinity: the same contract on the text-to-image transformer
    torch.manual_seed(0)
    cfg = InfinityConfig(depth=4, embed_dim=64, num_heads=4, hidden_dim=128, token_dim=4, text_dim=64, text_maxlen=32, block_chunks=2, pool_heads=2)
    Infinity(cfg).save(os.path.join(models, "tiny.safetensors"))
    BSQTokenizer(BSQConfig(codebook_dim=4, base_ch=32, ch_mult=(1, 2), num_res_blocks=1)).save(os.path.join(models, "bsq.safetensors"))
    model, btok = inf.NextScaleLoadInfinity.execute("tiny.safetensors", "bsq.safetensors", "float32").result
    raises(lambda: ln.NextScaleLoadLoRA.execute(model, "negative.safetensors", 1.0), "LoRA of a VAR transformer", "Infinity transformer")
    inf.NextScaleTextSampler.hidden = io.HiddenHolder.from_dict({})
    positive = [[torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(3)), {"pooled_output": None}]]
    def sample_text(m):
        return inf.NextScaleTextSampler.execute(model=m, tokenizer=btok, positive=positive, seed=5, cfg=3.0, tau=0.5,
                                                top_k=0, top_p=1.0, aspect_ratio="1:1", resolution="0.06M", batch_size=1).result[0]
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    bits = sample_text(model).bits
    same = sample_text(ln.NextScaleLoadLoRA.execute(model, "tiny_infinity.safetensors", 0.0).result[0]).bits
    assert all(torch.equal(a, b) for a, b in zip(bits, same))
    other = sample_text(ln.NextScaleLoadLoRA.execute(model, "tiny_infinity.safetensors", 2.0).result[0]).bits
    assert not all(torch.equal(a, b) for a, b in zip(bits, other))
    sample_text(model)
    assert all(torch.equal(model.module.state_dict()[k], before[k]) for k in before)
    print("lora nodes ok")
    """  # noqa: E501 (lines of the script above; wrapping them would change the string)
)


def test_load_lora_node_patches_through_comfyui(trained, tmp_path):
    _, _, out = trained
    infinity = Infinity(TINY_INFINITY)
    inf_path = str(tmp_path / "tiny_infinity.safetensors")
    lora.save_lora(inf_path, random_lora(infinity, ("attn", "cross", "ffn"), seed=4),
                   {"family": "infinity", "rank": 2, "base": TINY_INFINITY.to_dict()})
    result = run_in_comfyui_python(NODE_CHECK, out, inf_path, cwd=tmp_path, timeout=600)
    assert result.returncode == 0 and "lora nodes ok" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
