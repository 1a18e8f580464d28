"""training/t2i.py, the text-to-image recipe: every step's options parse with its module, the steps are wired to
each other's outputs, finished steps are skipped, and an output another recipe built stops the run by name."""

import importlib

import numpy as np
import pytest
from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer

from training import t2i, t2i_data, train_bsq


def test_steps_parse_and_chain(tmp_path):
    run = str(tmp_path)
    out = t2i.outputs(run)
    argv = {name: a for name, _, a in t2i.commands(run, threads=1)}
    args = {name: t2i._parse(name, a) for name, a in argv.items()}
    assert {a.data_dir for a in args.values()} == {out["data"]}
    assert args["tokenizer"].out == out["tokenizer"] and args["tokenizer"].threads == 1
    assert args["generator"].tokenizer == out["tokenizer"]
    assert (args["generator"].out, args["generator"].text_encoder_out) == (out["generator"], out["text_encoder"])
    ev = args["evaluate"]
    assert (ev.tokenizer, ev.generator, ev.text_encoder) == (out["tokenizer"], out["generator"], out["text_encoder"])
    assert (ev.out, ev.grid) == (out["eval"], out["grid"])
    assert len({ev.cfg, *ev.also_cfg}) == 2  # the Frechet ratio at two guidance values
    assert len({args[k].run_dir for k in ("tokenizer", "generator", "evaluate")}) == 3
    for name, module, _ in t2i.RECIPE:
        assert hasattr(importlib.import_module(module), "main"), name
    assert all(line.startswith("python -m training.") for line in t2i.shell_lines(run))


def _fake_data(run: str) -> None:
    args = t2i._parse("data", t2i.commands(run)[0][2])
    path = t2i_data.cache_path(args.data_dir, args.data_seed, args.variants, 1, t2i_data.RESOLUTION)
    t2i_data.T2IData(np.zeros((1, 64, 64, 3), np.uint8), np.zeros(1, np.int32),
                     [t2i_data.Source("clipart/a.png", "a", "a")], {}).save(path)


def test_done_steps_are_skipped_and_foreign_outputs_refused(tmp_path, capsys):
    run = str(tmp_path)
    _fake_data(run)
    BSQTokenizer(BSQConfig(codebook_dim=8, base_ch=24, ch_mult=(1, 1, 1))).save(t2i.outputs(run)["tokenizer"])
    with pytest.raises(SystemExit, match=r"tokenizer\.safetensors exists .*codebook_dim 8, the recipe's 16"):
        t2i.run(run)
    assert "[t2i] data: done, skipped" in capsys.readouterr().out

    argv = {name: a for name, _, a in t2i.commands(run)}
    recipe_config = train_bsq.config_from_args(t2i._parse("tokenizer", argv["tokenizer"]))
    BSQTokenizer(recipe_config).save(t2i.outputs(run)["tokenizer"])
    assert t2i.foreign_fields("tokenizer", run, argv["tokenizer"]) == []
    assert t2i.done("tokenizer", run, argv["tokenizer"]) and not t2i.done("generator", run, argv["generator"])


def test_only_names_a_step(tmp_path):
    with pytest.raises(SystemExit, match="--only 'nothing'"):
        t2i.run(str(tmp_path), only="nothing")
