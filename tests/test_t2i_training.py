"""The text-to-image trainers on a tiny clip-art tree: the BSQ tokenizer trainer and the joint T5 + Infinity trainer
resume to the weights of an uninterrupted run, teacher forcing feeds what the tokenizer sums, and the exported T5
encoder runs in ComfyUI's own T5 with ComfyUI's tokenizer to the trainer's features."""

import json
import os
import random
import textwrap

import numpy as np
import pytest
import torch
from harness.testbed import run_in_comfyui_python
from nextscale.models.core.family import FAMILIES
from nextscale.models.infinity.bsq import BSQTokenizer
from nextscale.models.infinity.model import Infinity
from test_t2i_data import make_tree

from training import common, t2i_data, t2i_evaluate, t2i_text, train_bsq, train_t2i

TOKENIZER = ["--codebook-dim", "4", "--base-ch", "24", "--ch-mult", "1,1,1", "--batch-size", "2"]
GENERATOR = ["--t5-width", "32", "--t5-layers", "1", "--t5-heads", "2", "--t5-ff", "32", "--depth", "1",
             "--embed-dim", "32", "--num-heads", "2", "--batch-size", "2", "--text-maxlen", "16", "--eval-count", "4"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_args(tmp_path_factory):
    root = make_tree(tmp_path_factory.mktemp("openclipart"))
    cache = str(tmp_path_factory.mktemp("cache"))
    return ["--data-dir", cache, "--clipart-root", root, "--emoji-font", "", "--variants", "2"]


def _bsq(data_args, run_dir, *extra):
    return train_bsq.train(train_bsq.build_parser().parse_args(
        [*data_args, *TOKENIZER, "--run-dir", str(run_dir), "--no-progress", "--threads", "1", "--eval-count", "4",
         *extra]))


@pytest.fixture(scope="module")
def tokenizer_file(data_args, tmp_path_factory):
    run = tmp_path_factory.mktemp("bsq")
    out = run / "tok.safetensors"
    _bsq(data_args, run, "--steps", "3", "--eval-every", "3", "--out", str(out))
    return str(out)


def test_bsq_trainer_resumes_to_the_uninterrupted_weights(data_args, tmp_path, tokenizer_file):
    assert _bsq(data_args, tmp_path, "--steps", "3", "--stop-after", "2")["stopped"]
    result = _bsq(data_args, tmp_path, "--steps", "3", "--eval-every", "3")
    assert result["step"] == 3 and result["psnr"] > 0
    resumed = common.load_checkpoint(str(tmp_path / "last.pt"))["model"]
    whole = BSQTokenizer.from_file(tokenizer_file).state_dict()
    for k, v in whole.items():
        torch.testing.assert_close(resumed[k], v, msg=k)
    assert str(FAMILIES.identify(whole)) == "infinity-tokenizer"


def test_bsq_trainer_refuses_a_cell_size_off_the_schedule(data_args, tmp_path):
    with pytest.raises(SystemExit, match="4 px cells"):
        _bsq(data_args, tmp_path, "--ch-mult", "1,1", "--steps", "1")


def test_teacher_inputs_are_the_tokenizer_sums(tokenizer_file):
    tok = BSQTokenizer.from_file(tokenizer_file)
    torch.manual_seed(0)
    bits = torch.rand(2, train_t2i.SCHEDULE.num_tokens, tok.codebook_dim) > 0.5
    inputs = train_t2i.teacher_inputs(tok, bits)
    per_scale = [bits[:, sl].reshape(2, h, w, -1)
                 for sl, (h, w) in zip(train_t2i.scale_slices(), train_t2i.SCHEDULE.scales, strict=True)]
    full = train_t2i.SCHEDULE.scales[-1]
    start = 0
    for k, (h, w) in enumerate(train_t2i.SCHEDULE.scales[1:], 1):
        want = tok.downsample_codes(tok.bits_to_summed_codes(per_scale[:k], full), (h, w)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(inputs[:, start:start + h * w], want)
        start += h * w
    assert start == inputs.shape[1]


def test_a_step_from_the_token_cache_is_a_step_from_the_images(data_args, tokenizer_file, tmp_path):
    """The cached bits give the loss the images give; a changed tokenizer file replaces the cache."""
    args = train_t2i.build_parser().parse_args([*data_args, *GENERATOR, "--tokenizer", tokenizer_file])
    ds = t2i_data.load_from_args(args)
    tok = BSQTokenizer.from_file(tokenizer_file)
    log = common.RunLog(str(tmp_path), quiet=True)
    train_t2i.cached_tokens(str(tmp_path), tokenizer_file, tok, ds, log)
    (cache,) = tmp_path.glob("tokens_*.npz")
    packed = train_t2i.cached_tokens(str(tmp_path), tokenizer_file, tok, ds, log)  # read back from the file
    idx = ds.split_indices("train")[:2]
    captions, drop = train_t2i.step_captions(ds.captions(idx), seed=0, step=3, text_drop=0.5)
    t5_cfg, gen_cfg = train_t2i.configs_from_args(args, tok.codebook_dim)
    torch.manual_seed(0)
    model = train_t2i.TextToImage(t5_cfg, gen_cfg)
    ptok = t2i_text.PromptTokenizer(None)
    losses = []
    for rows in (packed[idx], train_t2i.encode_images(tok, ds.images[idx])):
        ids, mask, drop, x, bits = train_t2i.step_batch(tok, ptok, rows, captions, drop, gen_cfg.text_maxlen)
        losses.append(train_t2i.bit_loss(train_t2i.teacher_logits(model, ids, mask, drop, x), bits)[0])
    assert losses[0] > 0 and torch.equal(losses[0], losses[1])

    changed = BSQTokenizer.from_file(tokenizer_file)
    with torch.no_grad():
        next(changed.encoder.parameters()).mul_(-1)
    changed_file = str(tmp_path / "changed.safetensors")
    changed.save(changed_file)
    repacked = train_t2i.cached_tokens(str(tmp_path), changed_file, changed, ds, log)
    (new_cache,) = tmp_path.glob("tokens_*.npz")
    assert new_cache != cache and not np.array_equal(repacked, packed)
    assert np.array_equal(repacked, train_t2i.encode_images(changed, ds.images))


def test_caption_augmentation_is_a_function_of_seed_and_step():
    caption = "full moon, astronomy, science"
    a = train_t2i.step_captions([caption] * 32, seed=1, step=5, text_drop=0.25)
    b = train_t2i.step_captions([caption] * 32, seed=1, step=5, text_drop=0.25)
    c = train_t2i.step_captions([caption] * 32, seed=1, step=6, text_drop=0.25)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and (a[0], a[1].tolist()) != (c[0], c[1].tolist())
    assert all(s.startswith("full moon") for s in a[0]) and caption in a[0] and "full moon" in a[0]
    assert 0 < int(a[1].sum()) < 32
    assert train_t2i.augment_caption("red apple", random.Random(0)) == "red apple"


def _t2i(data_args, tokenizer_file, run_dir, *extra):
    return train_t2i.train(train_t2i.build_parser().parse_args(
        [*data_args, *GENERATOR, "--tokenizer", tokenizer_file, "--run-dir", str(run_dir), "--no-progress",
         "--threads", "1", *extra]))


@pytest.fixture(scope="module")
def t2i_run(data_args, tokenizer_file, tmp_path_factory):
    """A two-step run with its evaluation, exports and result."""
    run = tmp_path_factory.mktemp("t2i")
    files = {"generator": str(run / "gen.safetensors"), "text_encoder": str(run / "t5.safetensors")}
    result = _t2i(data_args, tokenizer_file, run / "whole", "--steps", "2", "--eval-every", "2", "--out",
                  files["generator"], "--text-encoder-out", files["text_encoder"])
    return run, files, result


def test_t2i_trainer_resumes_evaluates_and_exports(data_args, tokenizer_file, t2i_run, tmp_path):
    run, files, result = t2i_run
    assert result["step"] == 2 and 0 < result["heldout_bit_accuracy"] <= 1 and result["heldout_loss"] > 0
    assert os.path.exists(run / "whole" / "samples_000002.png")
    assert _t2i(data_args, tokenizer_file, tmp_path, "--steps", "2", "--stop-after", "1")["stopped"]
    _t2i(data_args, tokenizer_file, tmp_path, "--steps", "2", "--eval-every", "2")
    a, b = (common.load_checkpoint(str(p / "last.pt")) for p in (run / "whole", tmp_path))
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, msg=k)

    model = Infinity.from_file(files["generator"])
    assert str(FAMILIES.identify(model.state_dict())) == "infinity-generator"
    assert model.config.text_dim == 32 and model.config.token_dim == 4
    sd, cfg = common.read_safetensors(files["text_encoder"])
    assert sd["shared.weight"].shape == (t2i_text.VOCAB_ROWS, 32) and sd["shared.weight"].dtype == torch.float16
    assert cfg["is_gated_act"] and cfg["dense_act_fn"] == "gelu_pytorch_tanh"


def test_evaluation_and_card(data_args, tokenizer_file, t2i_run, tmp_path):
    _, files, _ = t2i_run
    args = t2i_evaluate.build_parser().parse_args(
        [*data_args, "--tokenizer", tokenizer_file, "--generator", files["generator"], "--text-encoder",
         files["text_encoder"], "--categories", "4", "--classifier-steps", "3", "--also-cfg", "1", "--run-dir",
         str(tmp_path), "--grid", str(tmp_path / "grid.png"), "--no-progress"])
    result = t2i_evaluate.evaluate(args)
    assert result["tokenizer"]["images"] == 3 and result["tokenizer"]["psnr"] > 0
    assert len(result["classifier"]["categories"]) == 4
    assert [r["cfg"] for r in result["generator"]["at_cfg"]] == [3.0, 1.0]
    assert result["generator"]["chance"] == pytest.approx(1 / 4)
    assert os.path.exists(tmp_path / "grid.png") and len(result["timing_4_images"]["runs_s"]) == 3
    card = t2i_evaluate.write_card(str(tmp_path / "card.json"), result,
                                   {"tokenizer": tokenizer_file, **files}, ["python -m training.t2i"], {"sources": 7})
    metrics = card["metrics"]
    assert set(metrics["bars_met"]) == set(t2i_evaluate.BARS)
    assert metrics["bars_met"]["category_accuracy_over_chance"] is False  # 4 categories: under the 20 the bar needs
    assert card["generator_config"]["text_dim"] == 32 and card["text_encoder_config"]["d_model"] == 32
    assert [r["cfg"] for r in metrics["frechet_ratio"]] == [3.0, 1.0]


def test_measuring_stick_is_kept_and_reused_only_for_the_same_settings(data_args, tmp_path):
    def stick(*extra):
        args = t2i_evaluate.build_parser().parse_args(
            [*data_args, "--tokenizer", "unused", "--categories", "4", "--run-dir", str(tmp_path), "--no-progress",
             *extra])
        log = common.RunLog(args.run_dir)
        model, acc, (names, _, _) = t2i_evaluate.measuring_stick(t2i_data.load_from_args(args), args, log)
        return model, acc, names, [json.loads(line)["kind"] for line in open(log.path, encoding="utf-8")]

    trained, acc, names, kinds = stick("--classifier-steps", "3")
    assert "classifier_reused" not in kinds and os.path.exists(tmp_path / t2i_evaluate.STICK_FILE)
    reused, acc2, names2, kinds = stick("--classifier-steps", "3")
    assert kinds[-1] == "classifier_reused" and (acc2, names2) == (acc, names)
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(reused.state_dict()[k], v.to(reused.state_dict()[k].dtype), msg=k)
    _, _, _, kinds = stick("--classifier-steps", "4")  # other settings: trained again
    assert "classifier_stale" in kinds and kinds[-1] != "classifier_reused"


def test_auto_precision_is_bf16_only_with_amx_or_avx512_bf16(tmp_path):
    cpu = torch.device("cpu")
    infos = {"avx2": "flags\t\t: fpu sse avx avx2 fma\n", "amx": "flags\t\t: avx2 avx512f amx_bf16 amx_tile\n",
             "avx512_bf16": "flags\t\t: avx2 avx512f avx512_bf16\n"}
    for name, text in infos.items():
        (tmp_path / name).write_text("processor\t: 0\n" + text)
    assert not common.fast_bf16(cpu, str(tmp_path / "avx2"))
    assert common.fast_bf16(cpu, str(tmp_path / "amx")) and common.fast_bf16(cpu, str(tmp_path / "avx512_bf16"))
    assert not common.fast_bf16(cpu, str(tmp_path / "missing"))
    assert common.resolve_precision("auto", cpu) == ("bf16" if common.fast_bf16(cpu) else "fp32")
    assert common.resolve_precision("fp32", cpu) == "fp32" and common.resolve_precision("bf16", cpu) == "bf16"
    assert train_t2i.build_parser().parse_args(["--data-dir", "d", "--tokenizer", "t"]).precision == "auto"


def test_data_args_reach_the_cache(data_args):
    args = train_t2i.build_parser().parse_args([*data_args, "--tokenizer", "x"])
    ds = t2i_data.load_from_args(args)
    assert ds.meta["variants"] == 2 and ds.meta["candidates"] == 11


COMFY_T5_CHECK = textwrap.dedent(
    """
    import os, json, tempfile
    cfg_json = script_args[0]
    sys.path.append(root)  # training/ as ``training``
    import torch
    from nextscale.nodes import text_encoder as te
    from training import t2i_text

    torch.manual_seed(0)
    cfg = t2i_text.T5Config(**json.loads(cfg_json))
    enc = t2i_text.T5Encoder(cfg).eval()
    path = os.path.join(tempfile.mkdtemp(), "t5.safetensors")
    enc.export(path)
    enc.load_state_dict({k: v.half().float() for k, v in enc.state_dict().items()})  # the stored fp16 values
    clip = te.load_flan_t5(path, dtype=torch.float32)
    ptok = t2i_text.PromptTokenizer(os.path.join(te.TOKENIZER_DIR, "tokenizer.json"))
    prompts = ["red apple, emoji", "a full moon over a sleeping fox", ""]
    for prompt in prompts:
        ids = [t for t, _ in clip.tokenize(prompt)[te.NAME][0]]
        assert ids == ptok.ids(prompt), (prompt, ids, ptok.ids(prompt))
        feats = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0][0]
        with torch.no_grad():
            ours = enc(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))
        assert torch.allclose(feats, ours, atol=1e-4), (prompt, (feats - ours).abs().max())
    ids, mask = ptok.batch(prompts, 64)  # padded and masked: the same features on the real tokens
    with torch.no_grad():
        batch = enc(ids, mask)
    for i, prompt in enumerate(prompts):
        n = int(mask[i].sum())
        single = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0][0][0]
        assert torch.allclose(batch[i, :n], single, atol=1e-4)
    print("t5 ok")
    """
)


def test_exported_t5_runs_in_comfyui_with_its_tokenizer(tmp_path):
    """The trainer's T5 is ComfyUI's T5: same token ids, same features (single prompts and padded batches)."""
    cfg = {"d_model": 32, "num_layers": 2, "num_heads": 2, "d_kv": 16, "d_ff": 48}
    result = run_in_comfyui_python(COMFY_T5_CHECK, json.dumps(cfg), cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "t5 ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
