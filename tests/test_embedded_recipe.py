"""training/embedded.py, the one-command recipe of the shipped embedded model: every step's options parse with its
trainer, the steps are wired to each other's outputs, the shipped files match what the recipe builds, and
``--install`` (this recipe's and the text-to-image one's) copies the results under the names the loaders look for."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from training import common, embedded, t2i  # noqa: E402

common.import_pack()
from nextscale.models.core.checkpoint import CONFIG_METADATA_KEY, save_safetensors  # noqa: E402
from nextscale.models.var.model import VAR  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE  # noqa: E402

WEIGHTS = os.path.join(ROOT, "weights")


def _parsed(run_dir):
    import importlib

    return {name: importlib.import_module(module).build_parser().parse_args(argv)
            for name, module, argv in embedded.commands(run_dir) if name != "evaluate"}


def test_recipe_steps_parse_and_chain(tmp_path):
    args = _parsed(str(tmp_path))
    out = embedded.outputs(str(tmp_path))
    assert args["tokenizer"].out == out["tokenizer"]
    assert args["generator"].tokenizer == out["tokenizer"] and args["generator"].out == out["generator"]
    assert args["generator"].init is None  # one run from scratch
    assert args["control"].generator == out["generator"] and args["control"].tokenizer == out["tokenizer"]
    assert args["control"].out == out["control"]
    evaluate = {name: argv for name, _, argv in embedded.commands(str(tmp_path))}["evaluate"]
    assert evaluate[evaluate.index("--tokenizer") + 1] == out["tokenizer"]
    assert evaluate[evaluate.index("--generator") + 1] == out["generator"]
    assert evaluate[evaluate.index("--out") + 1] == out["eval"]
    run_dirs = {a.run_dir for a in args.values()}
    assert len(run_dirs) == 3 and all(d.startswith(str(tmp_path)) for d in run_dirs)
    # the shipped files are small: both models exported in float16
    assert {args[k].export_dtype for k in ("tokenizer", "generator")} == {"float16"}
    # the adapter goes before every block of the generator
    assert args["control"].layers == ",".join(str(i) for i in range(args["generator"].depth))


def test_shipped_weights_are_what_the_recipe_builds():
    argv = {name: a for name, _, a in embedded.commands("runs/embedded")}
    for key in ("tokenizer", "generator", "control"):
        assert embedded.foreign_fields(key, os.path.join(WEIGHTS, embedded.SHIPPED[key]), argv[key]) == [], key
    tok = MultiScaleVQVAE.from_file(os.path.join(WEIGHTS, embedded.SHIPPED["tokenizer"]))
    var = VAR.from_file(os.path.join(WEIGHTS, embedded.SHIPPED["generator"]))
    assert tuple(var.patch_nums) == tuple(tok.config.patch_nums)
    with open(os.path.join(WEIGHTS, embedded.SHIPPED["card"]), encoding="utf-8") as f:
        card = json.load(f)
    # the card records the recipe that made the files, and names the shipped files
    assert card["training_commands"][1:] == embedded.shell_lines(os.path.join(ROOT, "runs", "embedded"))
    for key in ("tokenizer", "generator", "control"):
        assert card["files"][key] == embedded.SHIPPED[key]
        assert os.path.isfile(os.path.join(WEIGHTS, card["files"][key]))
    assert card["metrics"]["evaluated_images"] == 500


@pytest.mark.parametrize("recipe", [embedded, t2i], ids=["embedded", "t2i"])
def test_install_copies_under_the_shipped_names(tmp_path, recipe):
    """Both embedded models' ``--install``: every output copied under the name the loaders read, the card's
    ``files`` renamed to them, a missing output named with the command that makes it."""
    run, weights = tmp_path / "run", tmp_path / "weights"
    run.mkdir()
    weights.mkdir()
    out = recipe.outputs(str(run))
    files = [key for key in recipe.SHIPPED if key != "card"]
    with pytest.raises(SystemExit, match=rf"{os.path.basename(out[files[0]])} is missing; run `python -m "
                                         rf"{recipe.__name__}`"):
        recipe.install(str(run), str(weights))
    for key in files:
        with open(out[key], "wb") as f:
            f.write(key.encode())
    with open(out["card"], "w", encoding="utf-8") as f:
        json.dump({"name": "x", "files": {files[0]: os.path.basename(out[files[0]])}}, f)
    written = recipe.install(str(run), str(weights))
    assert sorted(os.path.basename(p) for p in written) == sorted(recipe.SHIPPED.values())
    with open(weights / recipe.SHIPPED[files[1]], "rb") as f:
        assert f.read() == files[1].encode()
    with open(weights / recipe.SHIPPED["card"], encoding="utf-8") as f:
        assert json.load(f) == {"name": "x", "files": {k: recipe.SHIPPED[k] for k in files}}


def _model_file(path, config):
    save_safetensors({"w": torch.zeros(1)}, str(path), {CONFIG_METADATA_KEY: config})


def test_an_output_of_another_recipe_is_named(tmp_path):
    """A run folder of an earlier recipe (another depth, say) must not have its files evaluated and installed as
    if this recipe had built them: the step names the file and the fields that differ."""
    from training.train_tokenizer import config_from_args

    out, args = embedded.outputs(str(tmp_path)), _parsed(str(tmp_path))
    _model_file(out["tokenizer"], config_from_args(args["tokenizer"]).to_dict())
    gen = args["generator"]
    arch = {"depth": gen.depth, "embed_dim": gen.embed_dim, "num_heads": gen.num_heads, "mlp_ratio": gen.mlp_ratio,
            "shared_aln": gen.shared_aln}
    _model_file(out["generator"], {**arch, "depth": gen.depth - 2})
    with pytest.raises(SystemExit, match=rf"generator.safetensors exists but is not what this recipe's generator "
                                         rf"step builds \(depth {gen.depth - 2}, the recipe's {gen.depth}\)"):
        embedded.run(str(tmp_path))
    _model_file(out["generator"], arch)
    layers = list(range(gen.depth))  # the recipe's adapter goes before every block
    _model_file(out["control"], {"control_type": "edges", "kind": "add", "layers": layers[:-1]})
    with open(out["card"], "w", encoding="utf-8") as f:
        f.write("{}")
    with pytest.raises(SystemExit, match=r"control_edges.safetensors exists .*\(layers \["):
        embedded.run(str(tmp_path))
    _model_file(out["control"], {"control_type": "edges", "kind": "add", "layers": layers})
    assert embedded.run(str(tmp_path)) == out  # every step done and this recipe's: all skipped


def test_unknown_step_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"--only 'decoder'.*tokenizer.*generator.*evaluate.*control"):
        embedded.run(str(tmp_path), only="decoder")


def test_card_metrics_flatten_the_evaluation():
    res = {"tokenizer": {"psnr": 28.123, "psnr_of_mean_mse": 27.5, "classifier_accuracy_on_round_trips": 1.0,
                         "frechet_round_trips_vs_real": 0.5, "frechet_floor_real_vs_real": 0.15},
           "generator": {"class_accuracy": 0.95, "per_class_accuracy": [0.9, 1.0], "frechet_distance": 1.2,
                         "frechet_floor_real_vs_real": 0.3, "frechet_ratio": 4.0, "diversity_ratio_mean": 1.1,
                         "frechet_share_per_class": [0.0123, 0.6789],
                         "diversity_generated": [2.0, 3.0], "diversity_real": [2.0, 2.5], "num_generated": 20},
           "timing_4_images": {"median_s": 0.2}}
    m = embedded.card_metrics(res)
    assert m["tokenizer_psnr_db"] == 28.12 and m["frechet_ratio"] == 4.0
    assert m["diversity_ratio_min"] == 1.0 and m["evaluated_images"] == 20
    assert m["frechet_share_per_class"] == [0.01, 0.68]
    assert "frechet_ratio_mean_of_draws" not in m
    res["generator"]["repeats"] = {"seeds": [0, 100000], "class_accuracy": [0.95, 0.9], "frechet_ratio": [4.0, 3.0],
                                   "frechet_ratio_mean": 3.5, "frechet_ratio_sd": 0.7071}
    m = embedded.card_metrics(res)
    assert m["frechet_ratio_mean_of_draws"] == 3.5 and m["frechet_ratio_draws"] == [4.0, 3.0]
    assert m["class_accuracy_draws"] == [0.95, 0.9] and m["frechet_ratio"] == 4.0
    assert "at_other_cfg" not in m
    res["generator"]["at_cfg"] = [{"cfg": 2.0, "seeds": [0, 100000], "class_accuracy": [0.9612, 0.9],
                                   "frechet_ratio": [2.5049, 3.0], "frechet_ratio_mean": 2.75245,
                                   "frechet_ratio_sd": 0.35}]
    assert embedded.card_metrics(res)["at_other_cfg"] == [
        {"cfg": 2.0, "class_accuracy_draws": [0.961, 0.9], "frechet_ratio_draws": [2.5, 3.0],
         "frechet_ratio_mean_of_draws": 2.75}]
