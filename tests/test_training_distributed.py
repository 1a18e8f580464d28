"""Training under torchrun: two CPU processes (gloo) follow one process's loss curve step for step, a run stopped at
one world size continues the same curve at another, and an FSDP checkpoint is the full state one process loads.

One ``torchrun --nproc-per-node 2`` launch runs every two-process training of this file (process start-up is most of
its cost); the one-process references run in the test process. Tiny models on 16 px images, a few steps each, one
thread per process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from training import common, data, distributed, train_control, train_generator, train_lora, train_tokenizer  # noqa: E402

common.import_pack()
from nextscale.models.var.model import VAR, VARConfig  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig  # noqa: E402

pytestmark = pytest.mark.slow

RES = 16
STEPS = 8
TRAINERS = {"tokenizer": train_tokenizer, "generator": train_generator, "control": train_control, "lora": train_lora}

# Runs in each of the two processes: join the group once, then every planned training in turn.
DRIVER = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo")
from training import train_control, train_generator, train_lora, train_tokenizer
modules = {"tokenizer": train_tokenizer, "generator": train_generator, "control": train_control, "lora": train_lora}
with open(sys.argv[2]) as f:
    plan = json.load(f)
for name, argv in plan:
    modules[name].main(argv)
dist.destroy_process_group()
# Every result is on disk: leave without the interpreter's teardown, where gloo's threads have aborted a rank
# ("terminate called without an active exception") after all its work was done, failing the launch.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def _train_losses(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def _quiet(run_dir):
    return ["--run-dir", run_dir, "--no-progress", "--threads", "1", "--log-every", "1", "--eval-every", "1000",
            "--save-every", "1000", "--steps", str(STEPS)]


def _data(cache):
    return ["--resolution", str(RES), "--train-count", "64", "--heldout-count", "16", "--cache-dir", cache]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random tiny tokenizer and generator (training needs no trained inputs to compare curves), and a folder of
    images with side-car class names for the LoRA trainer."""
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    tok = MultiScaleVQVAE(TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                          patch_nums=(1, 2, 4, 8)))
    train_tokenizer.init_weights(tok, 64)
    train_tokenizer.export(tok, str(root / "tok.safetensors"))
    var = VAR(VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10, vocab_size=64, cvae=8,
                        patch_nums=(1, 2, 4, 8), class_names=data.CLASS_NAMES))
    train_generator.export(var, str(root / "gen.safetensors"), "float32")
    images, labels = data.render_many(3, "train", 0, 24, RES)
    (root / "captioned").mkdir()
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(root / "captioned" / f"{i:02d}.png")
        (root / "captioned" / f"{i:02d}.txt").write_text(data.CLASS_NAMES[label])
    return root


def argv_for(kind, files, run_dir, extra=()):
    cache = str(files / "cache")
    if kind == "lora":  # rank 2 on the attention, MLP and head (a random VAR's blocks start near identity)
        return ["--base", str(files / "gen.safetensors"), "--tokenizer", str(files / "tok.safetensors"), "--data",
                str(files / "captioned"), "--rank", "2", "--layers", "attn,ffn,head", "--batch-size", "8", "--lr",
                "1e-2", "--warmup", "1", *_quiet(str(files / run_dir)), *extra]
    if kind == "tokenizer":
        opts = ["--vocab-size", "64", "--z-channels", "8", "--ch", "32", "--ch-mult", "1,1", "--num-res-blocks", "1",
                "--patch-nums", "1,2,4,8", "--batch-size", "8", "--lr", "2e-3", "--warmup", "2", "--eval-count", "16",
                "--restart-every", "2"]
    elif kind == "generator":
        opts = ["--tokenizer", str(files / "tok.safetensors"), "--depth", "2", "--embed-dim", "64", "--num-heads", "2",
                "--batch-size", "8", "--lr", "3e-3", "--warmup", "2", "--eval-count", "16", "--ema", "0.9"]
    else:
        opts = ["--generator", str(files / "gen.safetensors"), "--tokenizer", str(files / "tok.safetensors"),
                "--channels", "32,32", "--feat-dim", "32", "--batch-size", "8", "--lr", "1e-2", "--warmup", "1",
                "--eval-count", "8",
                "--control-drop", "0.3"]
    return [*_data(cache), *opts, *_quiet(str(files / run_dir)), *extra]


# (run folder, trainer, extra options) of the two-process launch
TWO_PROCESS_RUNS = [
    ("tok_ddp", "tokenizer", []),
    ("tok_fsdp", "tokenizer", ["--parallel", "fsdp"]),
    ("gen_ddp_stopped", "generator", ["--stop-after", "4"]),
    ("gen_fsdp_stopped", "generator", ["--parallel", "fsdp", "--stop-after", "4"]),
    ("gen_grown", "generator", ["--parallel", "fsdp", "--fsdp-sharding", "grad-op"]),  # resumes a 1-process run
    ("gen_hybrid", "generator", ["--parallel", "fsdp", "--fsdp-sharding", "hybrid"]),
    ("ctl_ddp", "control", []),
    ("lora_fsdp", "lora", ["--parallel", "fsdp"]),
]


@pytest.fixture(scope="module")
def runs(files):
    """The one-process references, then one torchrun launch with every two-process run."""
    for kind in TRAINERS:
        TRAINERS[kind].main(argv_for(kind, files, f"{kind}_one"))
    train_generator.main(argv_for("generator", files, "gen_grown", ["--stop-after", "3"]))
    plan = [(kind, argv_for(kind, files, name, extra)) for name, kind, extra in TWO_PROCESS_RUNS]
    (files / "plan.json").write_text(json.dumps(plan))
    (files / "driver.py").write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(files / "driver.py"), ROOT, str(files / "plan.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return files


def _close(a, b):
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5), (step, a, b)


@pytest.mark.parametrize("name, reference", [("tok_ddp", "tokenizer_one"), ("tok_fsdp", "tokenizer_one"),
                                             ("ctl_ddp", "control_one"), ("lora_fsdp", "lora_one"),
                                             ("gen_hybrid", "generator_one")])
def test_two_processes_follow_the_one_process_curve(runs, name, reference):
    """Same global batch, half on each process: every step's loss is the one process's (the tokenizer's runs
    include dead-code restarts, which see the whole batch on both ranks), logged once, by rank 0."""
    two, one = _train_losses(runs / name), _train_losses(runs / reference)
    assert len(two) == STEPS and len(one) == STEPS
    _close(two, one)
    assert one[-1][1] < one[0][1]  # the curve moves: these runs learn


@pytest.mark.parametrize("name", ["gen_ddp_stopped", "gen_fsdp_stopped"])
def test_resume_on_one_process_continues_the_two_process_curve(runs, name):
    """A two-process run (DDP, FSDP) stopped at step 4 and resumed in one process ends on the uninterrupted
    one-process curve, EMA and all."""
    assert common.load_checkpoint(str(runs / name / "last.pt"))["world_size"] == 2
    resumed = name.replace("stopped", "resumed")
    shutil.copytree(runs / name, runs / resumed)
    train_generator.main(argv_for("generator", runs, resumed))
    _close(_train_losses(runs / resumed), _train_losses(runs / "generator_one"))
    a = common.load_checkpoint(str(runs / resumed / "last.pt"))
    b = common.load_checkpoint(str(runs / "generator_one" / "last.pt"))
    for key in b["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5)
        if key in b["ema"]["shadow"]:
            torch.testing.assert_close(a["ema"]["shadow"][key], b["ema"]["shadow"][key], rtol=1e-4, atol=1e-5)


def test_resume_on_two_processes_continues_the_one_process_curve(runs):
    """The other way round: 3 steps in one process, the rest under FSDP (grad-op sharding) on two."""
    log = [json.loads(line) for line in (runs / "gen_grown" / "log.jsonl").read_text().splitlines()]
    resume = next(r for r in log if r["kind"] == "resume")
    assert (resume["step"], resume["saved_by_processes"], resume["processes"]) == (3, 1, 2)
    _close(_train_losses(runs / "gen_grown"), _train_losses(runs / "generator_one"))


def test_fsdp_checkpoint_is_the_full_state_one_process_loads(runs):
    """The FSDP run's checkpoint holds whole tensors under the model's own keys and torch's one-process optimizer
    layout: a plain VAR and AdamW load it strictly."""
    ck = common.load_checkpoint(str(runs / "gen_fsdp_stopped" / "last.pt"))
    var = VAR(VARConfig.from_dict(ck["config"]))
    shapes = {k: tuple(v.shape) for k, v in var.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ck["model"].items()} == shapes
    var.load_state_dict(ck["model"], strict=True)
    opt = common.adamw(var, 1e-3)
    opt.load_state_dict(ck["optimizer"])
    params = [p for group in opt.param_groups for p in group["params"]]
    assert len(opt.state) == len(params)
    assert all(opt.state[p]["exp_avg"].shape == p.shape and int(opt.state[p]["step"]) == 4 for p in params)


def test_one_process_needs_no_process_group():
    d = distributed.setup("cpu")
    assert (d.rank, d.world_size, d.is_main, d.active, d.sharded) == (0, 1, True, False, False)
    x = torch.arange(6)
    assert torch.equal(d.rows(x)[0], x) and torch.equal(d.gather_rows(x), x)
    assert d.mean({"loss": 2.5}) == {"loss": 2.5}
    model = torch.nn.Linear(2, 2)
    assert d.whole(model, lambda: torch.nn.Linear(2, 2)) is model
    step = d.wrap(model, lambda t: model(t) * 2)
    assert torch.equal(step(torch.ones(1, 2)), model(torch.ones(1, 2)) * 2)


def test_global_batch_must_divide_among_processes():
    d = distributed.Distributed(torch.device("cpu"), rank=1, world_size=4)
    with pytest.raises(SystemExit, match=r"--batch-size 6 is the global batch .* multiple of 4"):
        d.check_batch(6)
    (rows,) = d.rows(torch.arange(8))
    assert rows.tolist() == [2, 3]  # rank 1 of 4: the second quarter
