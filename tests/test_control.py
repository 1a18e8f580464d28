"""Control injection: CAR's key layout and its run against a teacher-forced reference, adapters (zero init, strength,
scale range, files), ECM's late temperature, preprocessors, and the nodes inside ComfyUI's python."""

import math
import textwrap

import pytest
import torch
from harness.testbed import REPO_ROOT, run_in_comfyui_python
from nextscale.models.control.adapters import (
    AdapterConfig,
    CARConfig,
    CARControlNet,
    ControlAdapter,
    ControlStack,
    _resize,
    load_control,
    teacher_logits,
)
from nextscale.models.control.maps import canny_edges, soft_silhouette
from nextscale.models.core.checkpoint import save_safetensors
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.hooks import SamplerHooks
from nextscale.models.var.model import VAR, VARConfig
from nextscale.models.var.sampler import SamplingOptions, sample
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from test_sampler import CVAE, NUM_CLASSES, PN, VOCAB, RecordLogits, randomize_

K = len(PN)
TINY_CAR = dict(embed_dim=64, num_heads=4, depth=2, hidden_dim=256, encoder_channels=(8, 16))


def make_var4(seed: int = 0) -> VAR:
    cfg = VARConfig(depth=4, embed_dim=64, num_heads=4, num_classes=NUM_CLASSES, vocab_size=VOCAB, cvae=CVAE,
                    patch_nums=PN)
    return randomize_(VAR(cfg), seed)


@torch.no_grad()
def make_car(seed: int = 1) -> CARControlNet:
    car = CARControlNet(CARConfig(**TINY_CAR))
    g = torch.Generator().manual_seed(seed)
    for name, p in car.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if name.endswith("scale_mul_1H11"):
            r = math.log(4.0) + 0.3 * r
        elif p.dim() >= 2:
            r = r * (0.3 if "ada_lin" in name else 1.0) / math.sqrt(p[0].numel())
        else:
            r = 0.1 * r
        p.copy_(r)
    return CARControlNet.from_state_dict(car.state_dict())


@pytest.fixture(scope="module")
def vae() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    cfg = TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN)
    return MultiScaleVQVAE(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def var4() -> VAR:
    return make_var4()


def control_image(batch: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run(var, vae, control=None, cfg=2.0, labels=(1, 4), seed=7, record=False):
    rec = RecordLogits()
    ctrl = control if not record else ControlStack([c for c in (control, rec) if c is not None])
    opts = SamplingOptions(cfg=cfg, top_k=0, top_p=0.0)
    tokens = sample(var, vae, torch.tensor(labels), seed=seed, options=opts, hooks=SamplerHooks(control=ctrl))
    return tokens, rec.seen


# -- CAR: key layout and errors ------------------------------------------------------------------------------------


def official_car_d16_meta() -> dict:
    """Every key of a released ``car_*_d16.pth`` with its shape (meta tensors: no memory)."""
    shapes = CARControlNet.expected_shapes(CARConfig(embed_dim=1024, num_heads=16, depth=8, hidden_dim=4096))
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_car_d16_layout_loads_strictly():
    sd = official_car_d16_meta()
    assert ("car_control_convs.blocks.7.weight" in sd
            and tuple(sd["car_control_convs.blocks.7.weight"].shape) == (1024, 512, 3, 3))
    assert (tuple(sd["car_skip_linear.7.weight"].shape) == (1024, 2048)
            and tuple(sd["car_skip_norm.0.weight"].shape) == (2048,))
    assert tuple(sd["car_blocks.7.attn.scale_mul_1H11"].shape) == (1, 16, 1, 1)
    assert tuple(sd["car_control_convs.conv_out.weight"].shape) == (1024, 1024, 3, 3)
    car = CARControlNet.from_state_dict(sd)
    assert car.config == CARConfig(embed_dim=1024, num_heads=16, depth=8, hidden_dim=4096)
    without_buffers = {k: v for k, v in sd.items() if not k.endswith("zero_k_bias")}
    CARControlNet.from_state_dict(without_buffers)  # the rebuilt buffers are optional
    with torch.device("meta"):
        d16, d20 = VAR(VARConfig.official(16)), VAR(VARConfig.official(20))
    car.check_base(d16)
    with pytest.raises(NextScaleError, match="VAR-d16"):
        car.check_base(d20)
    merged = {**sd, **d16.state_dict()}  # CAR keys inside a full checkpoint
    assert CARControlNet.from_state_dict(merged).config == car.config


def test_car_errors_name_the_keys():
    sd = official_car_d16_meta()
    missing = {k: v for k, v in sd.items() if k != "car_skip_linear.3.bias"}
    with pytest.raises(NextScaleError, match=r"1 missing key\(s\): car_skip_linear.3.bias"):
        CARControlNet.from_state_dict(missing)
    extra = {**sd, "car_extra.weight": torch.empty(3, device="meta")}
    with pytest.raises(NextScaleError, match=r"1 unexpected key\(s\): car_extra.weight"):
        CARControlNet.from_state_dict(extra)
    bad = {**sd, "car_skip_norm.2.weight": torch.empty(1000, device="meta")}
    with pytest.raises(NextScaleError, match=r"car_skip_norm.2.weight is \[1000\], expected \[2048\]"):
        CARControlNet.from_state_dict(bad)
    with pytest.raises(NextScaleError, match=r"has no key 'car_var_conv.weight'"):
        CARControlNet.from_state_dict({"car_blocks.0.attn.q_bias": torch.zeros(4)})


def test_load_control_files(tmp_path, var4):
    car = make_car()
    p = tmp_path / "car.safetensors"
    save_safetensors(car.state_dict(), str(p))
    assert isinstance(load_control(str(p)), CARControlNet)
    pth = tmp_path / "car.pth"
    torch.save(dict(car.state_dict()), pth)
    assert load_control(str(pth)).config == car.config
    gen = tmp_path / "gen.safetensors"
    save_safetensors(var4.state_dict(), str(gen))
    with pytest.raises(NextScaleError, match=r"is a VAR generator.*not a control file"):
        load_control(str(gen))
    adapter = ControlAdapter(AdapterConfig.for_generator(var4.config, channels=(8, 16), feat_dim=16, image_size=16))
    ap = tmp_path / "adapter.safetensors"
    adapter.save(str(ap))
    loaded = load_control(str(ap))
    assert isinstance(loaded, ControlAdapter) and loaded.config == adapter.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in adapter.state_dict().items())
    save_safetensors(adapter.state_dict(), str(tmp_path / "bare.safetensors"))
    with pytest.raises(NextScaleError, match="no 'nextscale_config' metadata"):
        load_control(str(tmp_path / "bare.safetensors"))


# -- CAR: the run ------------------------------------------------------------------------------------------------


def car_teacher(var, car, labels, x_BLCv, control_B3HW):
    """CAR's teacher-forced forward (whole sequence, block-causal mask), written from the paper's description."""
    B, C, half = labels.shape[0], var.config.embed_dim, var.depth // 2
    cond = var.condition(labels)
    sos_B1C = cond.cond_BD[:, None] + var.pos_start
    words_BLC = var.word_embed(x_BLCv)
    L = words_BLC.shape[1] + 1
    x = torch.cat((sos_B1C, words_BLC), 1) + cond.lvl_pos_1LC[:, :L]
    pieces, begin = [], 0
    for si, pn in enumerate(PN):
        tok = sos_B1C if si == 0 else words_BLC[:, begin - 1 : begin - 1 + pn * pn]
        ctrl = car.car_control_convs(_resize(control_B3HW, 2 * pn)).expand(B, -1, -1, -1)
        pieces.append((car.car_var_conv(tok.transpose(1, 2).reshape(B, C, pn, pn)) + ctrl).flatten(2).transpose(1, 2))
        begin += pn * pn
    h = torch.cat(pieces, 1) + cond.lvl_pos_1LC[:, :L]
    mask = var.attn_bias_for_masking[0, 0, :L, :L]
    outs = []
    for block in car.car_blocks:
        h = block(h, block.modulation(cond.cond_BD), attn_mask=mask)
        outs.append(h)
    for i, (block, ada) in enumerate(zip(var.blocks, cond.ada_B16C)):
        if i >= half:
            x = car.fuse(i - half, x, outs.pop())
        x = block(x, ada, attn_mask=mask)
    return var.logits(x, cond)


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_car_run_matches_teacher_forcing(var4, vae, cfg):
    car, img = make_car(), control_image()
    labels = torch.tensor([1, 4])
    tokens, seen = run(var4, vae, car.bind(var4, img, batch_size=2), cfg=cfg, record=True)
    x_BLCv = vae.quantize.teacher_forcing_input(tokens.flat(), PN)
    with torch.no_grad():
        cond = car_teacher(var4, car, labels, x_BLCv, img)
        null = car_teacher(var4, car, torch.full_like(labels, NUM_CLASSES), x_BLCv, img)
    begin = 0
    for si, pn in enumerate(PN):
        t = cfg * si / (K - 1)
        sl = slice(begin, begin + pn * pn)
        expected = cond[:, sl] if cfg == 0 else (1 + t) * cond[:, sl] - t * null[:, sl]
        torch.testing.assert_close(seen[si], expected, rtol=1e-4, atol=1e-4)
        begin += pn * pn


def test_car_strength_and_range(var4, vae):
    car, img = make_car(), control_image()
    plain, plain_logits = run(var4, vae, record=True)
    zero, _ = run(var4, vae, car.bind(var4, img, batch_size=2, strength=0.0))
    assert all(torch.equal(a, b) for a, b in zip(plain.indices, zero.indices))
    full, _ = run(var4, vae, car.bind(var4, img, batch_size=2))
    assert any(not torch.equal(a, b) for a, b in zip(plain.indices, full.indices))
    _, late = run(var4, vae, car.bind(var4, img, batch_size=2, start_scale=2), record=True)
    for si in (0, 1):  # before the range the generator is untouched
        assert torch.equal(late[si], plain_logits[si])
    assert not torch.allclose(late[2], plain_logits[2])
    with pytest.raises(NextScaleError, match="one control image, or one per sampled image"):
        car.bind(var4, control_image(3), batch_size=2)
    with pytest.raises(NextScaleError, match="scale range"):
        car.bind(var4, img, start_scale=4)


# -- adapters ----------------------------------------------------------------------------------------------------


def adapter_for(var, kind, randomize=False):
    adapter = ControlAdapter(AdapterConfig.for_generator(var.config, kind=kind, channels=(8, 16), feat_dim=16,
                                                         image_size=16))
    if randomize:
        with torch.no_grad():
            g = torch.Generator().manual_seed(5)
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return adapter.eval()


@pytest.mark.parametrize("kind", ["add", "reference"])
def test_zero_init_adapter_is_no_control(var4, vae, kind):
    adapter = adapter_for(var4, kind)
    assert adapter.config.layers == (0, 1, 2)
    plain, plain_logits = run(var4, vae, record=True)
    same, same_logits = run(var4, vae, adapter.bind(var4, control_image(), batch_size=2), record=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.indices, same.indices))
    assert all(torch.equal(plain_logits[si], same_logits[si]) for si in range(K))
    x_BLCv = vae.quantize.teacher_forcing_input(plain.flat(), PN)
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        assert torch.equal(teacher_logits(var4, adapter, labels, x_BLCv, control_image()),
                           var4.forward_teacher(labels, x_BLCv))


@pytest.mark.parametrize("kind", ["add", "reference"])
def test_fp32_adapter_drives_a_bf16_generator(vae, kind):
    """Mixed dtypes, as the loaders allow: a bf16 generator (fp32 residual stream) with an fp32 adapter. The
    adapter injects in its own dtype, the sampled logits equal its teacher forcing up to bf16 rounding, and
    strength 0 is still exactly no control."""
    var16 = make_var4().to(torch.bfloat16)
    adapter, img = adapter_for(var16, kind, randomize=True), control_image()
    assert next(adapter.parameters()).dtype == torch.float32
    plain, _ = run(var16, vae)
    zero, _ = run(var16, vae, adapter.bind(var16, img, batch_size=2, strength=0.0))
    assert all(torch.equal(a, b) for a, b in zip(plain.indices, zero.indices))
    tokens, seen = run(var16, vae, adapter.bind(var16, img, batch_size=2), cfg=0.0, record=True)
    x_BLCv = vae.quantize.teacher_forcing_input(tokens.flat(), PN)
    with torch.no_grad():
        teacher = teacher_logits(var16, adapter, torch.tensor([1, 4]), x_BLCv, img)
    assert teacher.dtype == torch.float32
    begin = 0
    for si, pn in enumerate(PN):
        torch.testing.assert_close(seen[si], teacher[:, begin : begin + pn * pn], rtol=0.02, atol=0.1)
        begin += pn * pn


@pytest.mark.parametrize("kind", ["add", "reference"])
def test_trained_adapter_changes_output_and_matches_teacher(var4, vae, kind):
    adapter, img = adapter_for(var4, kind, randomize=True), control_image()
    plain, _ = run(var4, vae)
    zero, _ = run(var4, vae, adapter.bind(var4, img, batch_size=2, strength=0.0))
    assert all(torch.equal(a, b) for a, b in zip(plain.indices, zero.indices))
    tokens, seen = run(var4, vae, adapter.bind(var4, img, batch_size=2), cfg=0.0, record=True)
    assert any(not torch.equal(a, b) for a, b in zip(plain.indices, tokens.indices))
    x_BLCv = vae.quantize.teacher_forcing_input(tokens.flat(), PN)
    with torch.no_grad():
        teacher = teacher_logits(var4, adapter, torch.tensor([1, 4]), x_BLCv, img)
    begin = 0
    for si, pn in enumerate(PN):
        torch.testing.assert_close(seen[si], teacher[:, begin : begin + pn * pn], rtol=1e-4, atol=1e-4)
        begin += pn * pn


def test_adapter_checks_generator_and_config(var4):
    adapter = adapter_for(var4, "add")
    with pytest.raises(NextScaleError, match="trained for a generator of width 64, 4 blocks"):
        adapter.bind(randomize_(VAR(VARConfig(depth=3, embed_dim=64, num_heads=4, num_classes=NUM_CLASSES,
                                               vocab_size=VOCAB, cvae=CVAE, patch_nums=PN))), control_image())
    with pytest.raises(NextScaleError, match="adapter kind"):
        AdapterConfig(embed_dim=64, base_depth=4, num_scales=4, kind="cross")
    with pytest.raises(NextScaleError, match="distinct blocks"):
        AdapterConfig(embed_dim=64, base_depth=4, num_scales=4, layers=(0, 4))


def test_late_temperature(var4, vae):
    adapter = adapter_for(var4, "add")
    _, plain = run(var4, vae, record=True)
    _, hot = run(var4, vae, adapter.bind(var4, control_image(), late_temperature=0.8, late_from_scale=3), record=True)
    assert all(torch.equal(hot[si], plain[si]) for si in range(3))
    # the recorder sits after the control in the stack: it sees the divided logits (of the same tokens: the last
    # scale is the first one divided, so the earlier draws are the same)
    torch.testing.assert_close(hot[3], plain[3] / 0.8)


# -- preprocessors -----------------------------------------------------------------------------------------------


def test_canny_edges_of_a_square():
    img = torch.zeros(2, 3, 32, 32)
    img[:, :, 8:24, 8:24] = 1
    edges = canny_edges(img)
    assert edges.shape == (2, 1, 32, 32) and set(edges.unique().tolist()) <= {0.0, 1.0}
    assert int(edges[0].sum()) == 60  # a one-pixel outline of the 16 x 16 square
    assert torch.equal(edges, canny_edges(img))
    assert canny_edges(torch.full((1, 3, 16, 16), 0.5)).sum() == 0
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert canny_edges(noisy, 0.05, 0.1).sum() >= canny_edges(noisy, 0.2, 0.4).sum()
    with pytest.raises(NextScaleError, match="low <= high"):
        canny_edges(img, 0.3, 0.1)


def test_soft_silhouette():
    img = torch.full((1, 3, 32, 32), 0.9)
    img[:, :, 10:22, 6:26] = torch.tensor([0.2, 0.4, 0.1]).view(1, 3, 1, 1)
    mask = soft_silhouette(img)
    assert mask.shape == (1, 1, 32, 32) and 0 <= float(mask.min()) and float(mask.max()) <= 1
    assert float(mask[0, 0, 16, 16]) > 0.99 and float(mask[0, 0, 2, 2]) < 0.01
    assert torch.equal(mask, soft_silhouette(img))


# -- nodes in ComfyUI --------------------------------------------------------------------------------------------

NODE_CHECK = textwrap.dedent(
    """
    tmp = script_args[0]
    import os, torch, folder_paths
    from comfy_api.latest import io
    from nextscale.models.core.errors import NextScaleError
    from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
    from nextscale.nodes import NODE_MODULES
    from nextscale.nodes.control import (NextScaleApplyControl, NextScaleEdgePreprocessor, NextScaleLoadControl,
                                         NextScaleSilhouettePreprocessor)
    from nextscale.nodes.generator import NextScaleSampler
    from test_sampler import CVAE, PN, VOCAB
    from test_control import adapter_for, make_car, make_var4

    for node in (NextScaleLoadControl, NextScaleApplyControl, NextScaleEdgePreprocessor, NextScaleSilhouettePreprocessor):
        assert any(node in m.NODES for m in NODE_MODULES), node
        schema = node.define_schema()
        assert schema.description and all(i.tooltip for i in schema.inputs), node
    assert NextScaleApplyControl.define_schema().outputs[0].io_type == "NEXTSCALE_CONTROL"

    folder = os.path.join(tmp, "nextscale")
    os.makedirs(folder)
    folder_paths.add_model_folder_path("nextscale", folder)
    var = make_var4()
    make_car().state_dict()
    from nextscale.models.core.checkpoint import save_safetensors
    save_safetensors(make_car().state_dict(), os.path.join(folder, "car_tiny.safetensors"))
    adapter_for(var, "add", randomize=True).save(os.path.join(folder, "adapter_tiny.safetensors"))
    assert "car_tiny.safetensors" in NextScaleLoadControl.define_schema().inputs[0].options
    car = NextScaleLoadControl.execute("car_tiny.safetensors").result[0]
    adapter = NextScaleLoadControl.execute("adapter_tiny.safetensors").result[0]

    image = torch.zeros(1, 16, 16, 3)
    image[:, 4:12, 4:12] = 1
    edges = NextScaleEdgePreprocessor.execute(image, 0.1, 0.2, 1.0).result[0]
    assert edges.shape == (1, 16, 16, 3) and float(edges.max()) == 1.0
    sil = NextScaleSilhouettePreprocessor.execute(image, 0.15, 0.05, 1.0).result
    assert sil[0].shape == (1, 16, 16, 3) and sil[1].shape == (1, 16, 16)

    from nextscale.nodes.service import adopt  # a module as the NextScaleModel a socket carries

    torch.manual_seed(0)
    cfg = TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN)
    vae = MultiScaleVQVAE(cfg).eval()
    NextScaleSampler.hidden = io.HiddenHolder.from_dict({})
    sampler = lambda control: NextScaleSampler.execute(adopt(var), adopt(vae), "3", 5, 2.0, 0, 0.0, False, 2, "",
                                                      {"preview": False}, None, control).result[0]
    plain = sampler(None)
    c0 = NextScaleApplyControl.execute(car, edges, 0.0, 0, 0, 1.0).result[0]
    assert all(torch.equal(a, b) for a, b in zip(plain.indices, sampler(c0).indices))
    c1 = NextScaleApplyControl.execute(car, edges, 1.0, 0, 0, 1.0).result[0]
    chained = NextScaleApplyControl.execute(adapter, edges, 1.0, 1, 3, 1.0, c1).result[0]
    out = sampler(chained)
    assert any(not torch.equal(a, b) for a, b in zip(plain.indices, out.indices))
    try:
        sampler(NextScaleApplyControl.execute(car, edges, 1.0, 5, 0, 1.0).result[0])
        raise AssertionError("range")
    except NextScaleError as e:
        assert "scale range" in str(e), e
    print("nodes ok")
    """  # noqa: E501 (lines of the script above; wrapping them would change the string)
)


def test_nodes_in_comfyui(tmp_path):
    result = run_in_comfyui_python(NODE_CHECK, str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0 and "nodes ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


# -- training ----------------------------------------------------------------------------------------------------


def test_train_control_smoke(tmp_path):
    """A few adapter steps on a tiny random generator: they run, the loss falls, the control explains tokens, and
    the exported file loads as a control."""
    import json
    import sys

    sys.path.insert(0, str(REPO_ROOT))
    pytest.importorskip("training.common", reason="the training package is not in this checkout")
    from training import data, train_control

    cache = str(tmp_path / "cache")
    train_ds, _ = data.load_datasets("synthetic", 16, 0, 64, 16, cache, verbose=False)
    tok_cfg = TokenizerConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                              patch_nums=(1, 2, 4, 8))
    torch.manual_seed(0)
    MultiScaleVQVAE(tok_cfg).save(str(tmp_path / "tok.safetensors"))
    var_cfg = VARConfig(depth=2, embed_dim=32, num_heads=2, num_classes=len(train_ds.class_names), vocab_size=32,
                        cvae=8, patch_nums=(1, 2, 4, 8))
    randomize_(VAR(var_cfg), 0).save(str(tmp_path / "gen.safetensors"))
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "adapter.safetensors")
    train_control.main([
        "--generator", str(tmp_path / "gen.safetensors"), "--tokenizer", str(tmp_path / "tok.safetensors"),
        "--resolution", "16", "--train-count", "64", "--heldout-count", "16", "--cache-dir", cache,
        "--channels", "8,16", "--feat-dim", "16", "--steps", "30", "--batch-size", "16", "--lr", "3e-3",
        "--warmup", "2", "--eval-every", "1000", "--eval-count", "16", "--run-dir", run_dir, "--no-progress",
        "--threads", "1", "--out", out,
    ])
    with open(f"{run_dir}/log.jsonl") as f:
        recs = [json.loads(line) for line in f]
    train = [r for r in recs if r["kind"] == "train"]
    ev = [r for r in recs if r["kind"] == "eval"][-1]
    assert train[0]["step"] == 1 and train[-1]["step"] == 30
    assert train[-1]["loss"] < train[0]["loss"] - 0.05, (train[0], train[-1])
    assert ev["ce_control"] < ev["ce_none"], ev
    adapter = load_control(out)
    assert isinstance(adapter, ControlAdapter) and adapter.config.control_type == "edges"
