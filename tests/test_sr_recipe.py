"""The embedded super-resolution recipe on a tiny clip-art tree: degradations are a function of (seed, image,
variant), the trainer resumes to the weights of an uninterrupted run, its export loads strictly through NextScale
Load NSARM and upscales in NextScale Upscale, the evaluation compares with bicubic, and the one command chains it."""

import json
import os
import textwrap

import numpy as np
import pytest
import test_t2i_training as t2i_tests
import torch
from harness.testbed import run_in_comfyui_python
from nextscale.models.core.family import FAMILIES
from nextscale.models.infinity.bsq import BSQTokenizer
from nextscale.models.nsarm.model import NSARM
from nextscale.models.nsarm.sampler import check_pair, input_size, output_size
from test_text_encoder import PREAMBLE

from training import common, sr, sr_data, sr_evaluate, train_sr

MODEL = ["--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--text-dim", "16", "--map-width", "16",
         "--map-layers", "1", "--map-heads", "2", "--map-stem", "8", "--batch-size", "2", "--eval-count", "3"]

# the text-to-image trainer's tests' fixtures: one thread, the tiny clip-art set and a BSQ tokenizer trained on it
_single_thread, data_args, tokenizer_file = t2i_tests._single_thread, t2i_tests.data_args, t2i_tests.tokenizer_file


def _train(data_args, tokenizer_file, run_dir, *extra):
    return train_sr.train(train_sr.build_parser().parse_args(
        [*data_args, *MODEL, "--tokenizer", tokenizer_file, "--run-dir", str(run_dir), "--no-progress", "--threads",
         "1", *extra]))


@pytest.fixture(scope="module")
def sr_run(data_args, tokenizer_file, tmp_path_factory):
    """A three-step run with its evaluation and export."""
    run = tmp_path_factory.mktemp("sr")
    out = str(run / "sr.safetensors")
    result = _train(data_args, tokenizer_file, run / "whole", "--steps", "3", "--eval-every", "3", "--out", out)
    return run, out, result


def test_degradations_are_a_function_of_seed_image_and_variant():
    rng = np.random.default_rng(0)
    images = (rng.random((4, 64, 64, 3)) * 255).astype(np.uint8)
    a = sr_data.degrade_batch(images, [0, 3], seed=1, variant=5)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, sr_data.degrade_batch(images, [0, 3], seed=1, variant=5))
    assert np.array_equal(a[1], sr_data.degrade_batch(images, [3], seed=1, variant=5)[0])  # independent of the batch
    others = ({"seed": 2, "variant": 5}, {"seed": 1, "variant": 6}, {"seed": 1, "variant": sr_data.HELDOUT_VARIANT})
    for other in others:
        assert not np.array_equal(a, sr_data.degrade_batch(images, [0, 3], **other)), other


def test_degradation_blurs_and_halves():
    """A sharp edge comes out softer than its plain area-halving, and a flat image stays near its colour."""
    edge = np.zeros((64, 64, 3), np.uint8)
    edge[:, 32:] = 255
    plain = edge[::2, ::2].astype(float)
    worse = [np.abs(sr_data.degrade(edge, sr_data.pair_rng(0, 0, v)).astype(float) - plain).mean() for v in range(8)]
    assert min(worse) > 0 and np.mean(worse) > 2
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert abs(sr_data.degrade(flat, sr_data.pair_rng(0, 0, 0)).astype(float).mean() - 128) < 12


def test_config_maps_every_scale_the_input_grid_holds(tokenizer_file):
    args = train_sr.build_parser().parse_args(["--data-dir", "unused", "--tokenizer", tokenizer_file, *MODEL])
    tok = BSQTokenizer.from_file(tokenizer_file)
    cfg = train_sr.config_from_args(args, tok)
    assert cfg.mapper.grid == 8 and cfg.mapper.sides == (1, 2, 4, 6, 8) and cfg.mapper.channels == 4
    model = NSARM(cfg)
    check_pair(model, tok)
    assert (input_size(model, tok), output_size(model, tok)) == (32, 64)


@pytest.mark.parametrize("reading", ["tokens", "reshape"])
def test_the_network_is_trained_to_the_bits_the_sampler_reads(tokenizer_file, reading):
    args = train_sr.build_parser().parse_args(["--data-dir", "unused", "--tokenizer", tokenizer_file, *MODEL,
                                               "--map-reading", reading])
    tok = BSQTokenizer.from_file(tokenizer_file)
    mapper = NSARM(train_sr.config_from_args(args, tok)).map_transformer
    assert mapper.config.reading == reading
    g = torch.Generator().manual_seed(0)
    bits_BLd = torch.rand(2, sum(h * w for h, w in train_sr.SCHEDULE.scales), tok.codebook_dim, generator=g) > 0.5
    # outputs whose reading is those bits: the loss is at its floor and every bit is right, whatever the reading
    codes = []
    for (side, _), sl in zip(train_sr.SCHEDULE.scales[:mapper.config.num_scales], train_sr.scale_slices(),
                             strict=False):
        map_Bdss = (bits_BLd[:, sl].float() * 20 - 10).reshape(2, side, side, -1).permute(0, 3, 1, 2)
        codes.append(map_Bdss.flatten(2).transpose(1, 2) if reading == "tokens"
                     else map_Bdss.reshape(2, side * side, -1))
        assert torch.equal(mapper.code_map(codes[-1]), map_Bdss)
    loss, accuracy = train_sr.mapper_loss(mapper, codes, bits_BLd)
    assert float(accuracy) == 1.0 and float(loss) < 1e-3
    assert float(train_sr.mapper_loss(mapper, [-c for c in codes], bits_BLd)[1]) == 0.0


def test_trainer_resumes_evaluates_and_exports_strictly(data_args, tokenizer_file, sr_run, tmp_path):
    run, out, result = sr_run
    assert result["step"] == 3 and 0 < result["heldout_bit_accuracy"] <= 1 and 0 < result["heldout_map_bit_accuracy"]
    assert result["psnr"] > 0 and result["bicubic_psnr"] > 0
    assert _train(data_args, tokenizer_file, tmp_path, "--steps", "3", "--stop-after", "2")["stopped"]
    _train(data_args, tokenizer_file, tmp_path, "--steps", "3", "--eval-every", "3")
    a, b = (common.load_checkpoint(str(p / "last.pt")) for p in (run / "whole", tmp_path))
    assert a["step"] == b["step"] == 3
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, msg=k)

    model = NSARM.from_file(out)
    assert str(FAMILIES.identify(model.state_dict())) == "nsarm-upscaler"
    assert model.mapper_config.sides == (1, 2, 4, 6, 8) and model.config.text_maxlen == 1
    exported = common.read_safetensors(out)[0]
    assert set(exported) == set(model.state_dict()) and {v.dtype for v in exported.values()} == {torch.float16}


NODE_CHECK = "model_file, tokenizer_file = script_args\n" + textwrap.dedent(PREAMBLE) + textwrap.dedent(
    """
    import shutil
    from comfy_api.latest import io
    from nextscale.nodes import upscale as up

    models = os.path.join(tempfile.mkdtemp(), "nextscale")
    os.makedirs(models)
    folder_paths.add_model_folder_path("nextscale", models, is_default=True)
    shutil.copy(model_file, os.path.join(models, "nextscale_sr.safetensors"))
    shutil.copy(tokenizer_file, os.path.join(models, "nextscale_t2i_tokenizer.safetensors"))
    names = ("nextscale_sr.safetensors", "nextscale_t2i_tokenizer.safetensors")
    assert up.NextScaleLoadNSARM.validate_inputs(*names) is True
    model, tok = up.NextScaleLoadNSARM.execute(*names, "auto").result
    assert str(model.kind) == "nsarm-upscaler", model.kind
    up.NextScaleUpscale.hidden = io.HiddenHolder.from_dict({})
    image = torch.rand(1, 48, 40, 3)
    out = up.NextScaleUpscale.execute(model=model, tokenizer=tok, image=image, seed=1, scale_by=2.0, cfg=1.0,
                                      tau=0.5, input_scales=5, tiling="tiles", tile_overlap=0.25,
                                      blend="seamless", color_fix="adain + wavelet").result[0]
    assert tuple(out.shape) == (1, 96, 80, 3) and 0 <= float(out.min()) and float(out.max()) <= 1, out.shape
    print("sr export ok")
    """
)


def test_export_loads_and_upscales_through_the_nsarm_nodes(sr_run, tokenizer_file, tmp_path):
    _, out, _ = sr_run
    result = run_in_comfyui_python(NODE_CHECK, out, tokenizer_file, cwd=tmp_path, timeout=600)
    assert result.returncode == 0 and "sr export ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_evaluation_and_card(data_args, tokenizer_file, sr_run, tmp_path):
    _, out, _ = sr_run
    argv = [*data_args, "--tokenizer", tokenizer_file, "--model", out, "--count", "3", "--categories", "2",
            "--classifier-steps", "2", "--run-dir", str(tmp_path), "--out", str(tmp_path / "eval.json"),
            "--no-progress"]
    result = sr_evaluate.main(argv)
    assert result["images"] == 3 and set(result["psnr"]) == {*sr_evaluate.METHODS, "tokenizer_ceiling"}
    assert all(v > 0 for v in result["psnr"].values())
    assert set(result["feature_distance"]) == set(sr_evaluate.METHODS)
    assert all(d["mean_l2"] > 0 for d in result["feature_distance"].values())
    assert os.path.exists(tmp_path / "heldout.png")
    card = sr_evaluate.write_card(str(tmp_path / "card.json"), result, {"model": out, "tokenizer": tokenizer_file},
                                  ["python -m training.sr"])
    m = card["metrics"]
    assert m["psnr_gain_over_bicubic_db"] == round(m["psnr_model_color_fix_db"] - m["psnr_bicubic_db"], 2)
    assert set(m["bars_met"]) == set(sr_evaluate.BARS) and card["model_config"]["mapper"]["grid"] == 8
    assert json.loads((tmp_path / "card.json").read_text())["name"] == "nextscale-embedded-sr"


def test_recipe_chains_the_steps(tmp_path):
    run, t2i_dir = str(tmp_path / "sr"), str(tmp_path / "t2i")
    with pytest.raises(SystemExit, match="run the text-to-image recipe first"):
        sr.run(run, t2i_dir)
    argv = {name: a for name, _, a in sr.commands(run, t2i_dir, threads=1)}
    model = train_sr.build_parser().parse_args(argv["model"])
    ev = sr_evaluate.build_parser().parse_args(argv["evaluate"])
    assert model.out == ev.model == sr.outputs(run)["model"] and model.threads == ev.threads == 1
    assert model.tokenizer == ev.tokenizer == sr.inputs(t2i_dir)["tokenizer"]
    assert model.data_dir == ev.data_dir == sr.inputs(t2i_dir)["data"] and ev.out == sr.outputs(run)["eval"]
    assert all(line.startswith("python -m training.") for line in sr.shell_lines(run, t2i_dir))
