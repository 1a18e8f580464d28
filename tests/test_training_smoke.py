"""A few optimisation steps of each trainer on tiny configs: they run, the loss falls, and resuming an
interrupted run gives exactly the weights of an uninterrupted one."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from training import classifier, common, data  # noqa: E402

pytestmark = pytest.mark.slow

RES = 16  # 16 px images; tokenizer downsampling 2 -> 8x8 latent


def _losses(run_dir, kind="train"):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if json.loads(line)["kind"] == kind]


def _tok_args(run_dir, cache, steps, extra=()):
    return [
        "--resolution", str(RES), "--train-count", "64", "--heldout-count", "16", "--cache-dir", cache,
        "--vocab-size", "64", "--z-channels", "8", "--ch", "32", "--ch-mult", "1,1", "--num-res-blocks", "1",
        "--patch-nums", "1,2,4,8", "--steps", str(steps), "--batch-size", "8", "--lr", "2e-3", "--warmup", "2",
        "--eval-every", "1000", "--eval-count", "16", "--save-every", "1000", "--restart-every", "4",
        "--run-dir", run_dir, "--no-progress", "--threads", "1", *extra,
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def tokenizer_file(workdir):
    from training import train_tokenizer

    run = str(workdir / "tok")
    out = str(workdir / "tok.safetensors")
    train_tokenizer.main(_tok_args(run, str(workdir / "cache"), 30, ["--out", out, "--edge-weight", "0"]))
    return out, run


def test_tokenizer_trains_and_exports(tokenizer_file):
    out, run = tokenizer_file
    recs = _losses(run)
    assert recs and recs[-1]["step"] == 30
    assert _losses(run, "eval")[-1]["psnr"] > 12  # an untrained tokenizer gives ~8 dB on these images
    common.import_pack()
    from nextscale.models.var.tokenizer import MultiScaleVQVAE

    tok = MultiScaleVQVAE.from_file(out)
    assert tok.config.patch_nums == (1, 2, 4, 8) and tok.config.vocab_size == 64
    x = data.to_tensor(data.render_many(0, "heldout", 0, 2, RES)[0])
    idx = tok.img_to_indices(x)
    assert [t.shape for t in idx] == [(2, 1), (2, 4), (2, 16), (2, 64)]


def test_tokenizer_loss_decreases(workdir):
    from training import train_tokenizer

    run = str(workdir / "tok_loss")
    train_tokenizer.main(_tok_args(run, str(workdir / "cache"), 24, ["--edge-weight", "0"]))
    recs = _losses(run)
    assert [r["step"] for r in recs] == [1, 24]
    # reconstruction error of the batch falls (the VQ term is excluded: dead-code restarts move it)
    assert recs[-1]["mse"] < 0.7 * recs[0]["mse"], recs
    assert common.load_checkpoint(os.path.join(run, "last.pt"))["step"] == 24


def test_tokenizer_resume_is_exact(workdir):
    from training import train_tokenizer

    cache = str(workdir / "cache")
    straight = str(workdir / "tok_straight")
    broken = str(workdir / "tok_broken")
    train_tokenizer.main(_tok_args(straight, cache, 8))
    train_tokenizer.main(_tok_args(broken, cache, 8, ["--stop-after", "4"]))
    assert common.load_checkpoint(os.path.join(broken, "last.pt"))["step"] == 4
    train_tokenizer.main(_tok_args(broken, cache, 8))
    a = common.load_checkpoint(os.path.join(straight, "last.pt"))["model"]
    b = common.load_checkpoint(os.path.join(broken, "last.pt"))["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _gen_args(tok, run_dir, cache, steps, extra=()):
    return [
        "--tokenizer", tok, "--resolution", str(RES), "--train-count", "64", "--heldout-count", "16",
        "--cache-dir", cache, "--depth", "2", "--embed-dim", "64", "--num-heads", "2", "--steps", str(steps),
        "--batch-size", "16", "--lr", "3e-3", "--warmup", "2", "--eval-every", "1000", "--eval-count", "16",
        "--save-every", "1000", "--run-dir", run_dir, "--no-progress", "--threads", "1", "--ema", "0.9", *extra,
    ]


def test_generator_loss_decreases_and_exports(tokenizer_file, workdir):
    from training import train_generator

    tok, _ = tokenizer_file
    run = str(workdir / "gen")
    out = str(workdir / "gen.safetensors")
    # label drop 0 so that the loss curve is not noisy; a fixed small set is learnt quickly
    res = train_generator.main(_gen_args(tok, run, str(workdir / "cache"), 60,
                                         ["--out", out, "--label-drop", "0", "--min-lr-ratio", "0.5"]))
    assert res is None
    recs = _losses(run)
    assert recs[0]["loss"] > recs[-1]["loss"] + 0.3, [r["loss"] for r in recs]
    common.import_pack()
    from nextscale.models.var.model import VAR
    from nextscale.models.var.sampler import SamplingOptions, sample
    from nextscale.models.var.tokenizer import MultiScaleVQVAE

    var = VAR.from_file(out)
    assert var.class_names == list(data.CLASS_NAMES)
    tokenizer = MultiScaleVQVAE.from_file(tok)
    toks = sample(var, tokenizer, torch.tensor([0, 3]), seed=1, options=SamplingOptions(cfg=2.0, top_k=0, top_p=0))
    img = tokenizer.indices_to_img(toks.flat())
    assert img.shape == (2, 3, RES, RES)


def test_bf16_autocast_training(tokenizer_file, workdir):
    """``--precision bf16``: the tokenizer and the generator still learn, and the weights they save stay fp32."""
    from training import train_generator, train_tokenizer

    tok, _ = tokenizer_file
    cache = str(workdir / "cache")
    run_tok, run_gen = str(workdir / "tok_bf16"), str(workdir / "gen_bf16")
    train_tokenizer.main(_tok_args(run_tok, cache, 24, ["--edge-weight", "0", "--precision", "bf16"]))
    recs = _losses(run_tok)
    assert recs[-1]["mse"] < 0.7 * recs[0]["mse"], recs
    train_generator.main(_gen_args(tok, run_gen, cache, 40, ["--label-drop", "0", "--min-lr-ratio", "0.5",
                                                              "--precision", "bf16"]))
    recs = _losses(run_gen)
    assert recs[0]["loss"] > recs[-1]["loss"] + 0.3, [r["loss"] for r in recs]
    for run in (run_tok, run_gen):
        weights = common.load_checkpoint(os.path.join(run, "last.pt"))["model"]
        assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}, run
    with pytest.raises(ValueError, match="--precision"):
        common.autocast(torch.device("cpu"), "int8")


def test_generator_shared_aln_trains_and_exports(tokenizer_file, workdir):
    """``--shared-aln``: one modulation linear for all blocks (the d36 layout) is what gets trained and exported."""
    from training import train_generator

    tok, _ = tokenizer_file
    run, out = str(workdir / "gen_shared_aln"), str(workdir / "gen_shared_aln.safetensors")
    train_generator.main(_gen_args(tok, run, str(workdir / "cache"), 40,
                                   ["--shared-aln", "--out", out, "--label-drop", "0", "--min-lr-ratio", "0.5"]))
    recs = _losses(run)
    assert recs[0]["loss"] > recs[-1]["loss"] + 0.3, [r["loss"] for r in recs]
    common.import_pack()
    from nextscale.models.var.model import VAR

    var = VAR.from_file(out)
    keys = set(var.state_dict())
    assert var.config.shared_aln and "shared_ada_lin.1.weight" in keys and "blocks.0.ada_gss" in keys
    assert not any(k.startswith("blocks.") and ".ada_lin." in k for k in keys)


def test_generator_init_fine_tunes_from_a_file(tokenizer_file, workdir):
    """``--init``: a new run starts at the file's weights (its first loss is the trained one, and with lr 0 it exports
    them unchanged); a file of another architecture is refused with the options to fix."""
    from training import train_generator

    tok, _ = tokenizer_file
    cache = str(workdir / "cache")
    base, base_out = str(workdir / "gen_base"), str(workdir / "gen_base.safetensors")
    quiet = ["--label-drop", "0", "--min-lr-ratio", "0.5", "--export-dtype", "float32"]
    train_generator.main(_gen_args(tok, base, cache, 40, ["--out", base_out, *quiet]))
    first_scratch = _losses(base)[0]["loss"]
    tuned, tuned_out = str(workdir / "gen_tuned"), str(workdir / "gen_tuned.safetensors")
    train_generator.main(_gen_args(tok, tuned, cache, 3, ["--init", base_out, "--out", tuned_out, *quiet,
                                                          "--lr", "0"]))
    assert _losses(tuned, "init")[0]["path"] == os.path.abspath(base_out)
    assert _losses(tuned)[0]["loss"] < first_scratch - 0.3
    common.import_pack()
    from nextscale.models.var.model import VAR

    a, b = VAR.from_file(base_out).state_dict(), VAR.from_file(tuned_out).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(SystemExit, match=r"--init .*depth: file 2 vs run 3.*--depth"):
        train_generator.main(_gen_args(tok, str(workdir / "gen_wrong"), cache, 1, ["--init", base_out, "--depth", "3"]))
    with pytest.raises(SystemExit, match=r"--init .*shared_aln: file False vs run True.*--shared-aln"):
        train_generator.main(_gen_args(tok, str(workdir / "gen_shared"), cache, 1,
                                       ["--init", base_out, "--shared-aln"]))
    with pytest.raises(SystemExit, match="no such file"):
        train_generator.main(_gen_args(tok, str(workdir / "gen_none"), cache, 1, ["--init", base_out + ".x"]))
    with pytest.raises(SystemExit, match=r"--class-weight 'dragon=2'.*circle, square"):
        train_generator.main(_gen_args(tok, str(workdir / "gen_cw"), cache, 1, ["--class-weight", "dragon=2"]))


@pytest.mark.parametrize("weights", [[], ["--class-weight", "star=3", "--class-weight", "circle=0"]],
                         ids=["epochs", "class-weighted"])
def test_generator_resume_is_exact(tokenizer_file, workdir, weights):
    from training import train_generator

    tok, _ = tokenizer_file
    cache = str(workdir / "cache")
    tag = "w" if weights else ""
    straight, broken = str(workdir / f"gen_straight{tag}"), str(workdir / f"gen_broken{tag}")
    train_generator.main(_gen_args(tok, straight, cache, 6, weights))
    train_generator.main(_gen_args(tok, broken, cache, 6, ["--stop-after", "3", *weights]))
    train_generator.main(_gen_args(tok, broken, cache, 6, weights))
    a = common.load_checkpoint(os.path.join(straight, "last.pt"))
    b = common.load_checkpoint(os.path.join(broken, "last.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k


def test_classifier_and_metrics():
    imgs, labels = data.render_many(0, "train", 0, 120, 32)
    held, held_labels = data.render_many(0, "heldout", 0, 40, 32)
    train = data.ArrayDataset(imgs, labels, data.CLASS_NAMES)
    heldout = data.ArrayDataset(held, held_labels, data.CLASS_NAMES)
    model, acc = classifier.train_classifier(train, heldout, steps=30, batch_size=32, lr=3e-3, progress=False)
    assert 0.0 <= acc <= 1.0
    xh, yh = heldout.tensors()
    _, feat = classifier.predict(model, xh)
    assert feat.shape == (40, classifier.FEATURE_DIM)
    # Frechet distance: zero for identical sets, positive and symmetric otherwise
    assert abs(classifier.frechet_distance(feat, feat)) < 1e-4  # rank-deficient covariances: round-off only
    x, _ = train.tensors()
    _, feat_tr = classifier.predict(model, x[:40])
    d1, d2 = classifier.frechet_distance(feat, feat_tr), classifier.frechet_distance(feat_tr, feat)
    assert d1 > 0 and abs(d1 - d2) < 1e-6 * max(1.0, d1)
    div = classifier.diversity(feat, yh, len(data.CLASS_NAMES))
    assert len(div) == 10 and all(v > 0 for v in div)
    m = classifier.compare(model, xh, yh, xh[:20], yh[:20], xh[20:], len(data.CLASS_NAMES))
    assert set(m) >= {"class_accuracy", "frechet_distance", "frechet_floor_real_vs_real", "diversity_ratio_mean"}
    assert "frechet_share_per_class" not in m
    m = classifier.compare(model, xh, yh, xh[:20], yh[:20], xh[20:], len(data.CLASS_NAMES), real_b_labels=yh[20:])
    assert len(m["frechet_share_per_class"]) == len(data.CLASS_NAMES)


def test_frechet_share_names_the_class_that_leaves_the_gap():
    g = torch.Generator().manual_seed(0)
    K, per, D = 4, 60, 8
    labels = torch.arange(K * per) % K
    centres = 3 * torch.randn(K, D, generator=g)
    draw = lambda: centres[labels] + torch.randn(K * per, D, generator=g)  # noqa: E731
    real, other, gen = draw(), draw(), draw()
    gen[labels == 2] += 4.0  # class 2 generated off-target; the other classes as real as the real sets
    share = classifier.frechet_share_per_class(real, gen, labels, other, labels, K)
    fd = classifier.frechet_distance(real, gen)
    assert max(range(K), key=lambda c: share[c]) == 2
    assert share[2] > 0.5 * fd  # fixing class 2 takes most of the distance away
    assert all(abs(share[c]) < 0.25 * share[2] for c in (0, 1, 3))
    # a class the other set lacks cannot be swapped: nan, not a crash
    assert torch.isnan(torch.tensor(classifier.frechet_share_per_class(real, gen, labels, other[labels != 1],
                                                                       labels[labels != 1], K)[1]))


def test_classifier_export_round_trip(tmp_path):
    model = classifier.ShapeClassifier()
    path = str(tmp_path / "c.safetensors")
    common.export_safetensors(path, model.state_dict(), {**model.config(), "class_names": list(data.CLASS_NAMES)})
    loaded, cfg = classifier.load_classifier(path)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert cfg["class_names"] == list(data.CLASS_NAMES)


def test_evaluate_repeats_draw_disjoint_sets(tokenizer_file, workdir):
    """``evaluate(..., repeats=2)``: the first draw is the plain evaluation's, the second another generated set
    (seeds ``REPEAT_SEED_STRIDE`` apart) against the same real sets, and the mean is theirs."""
    from training import evaluate, train_generator

    tok, _ = tokenizer_file
    cache = str(workdir / "cache")
    gen_out = str(workdir / "gen_eval.safetensors")
    train_generator.main(_gen_args(tok, str(workdir / "gen_eval"), cache, 3, ["--out", gen_out]))
    clf_path = str(workdir / "clf.safetensors")
    model = classifier.ShapeClassifier()
    common.export_safetensors(clf_path, model.state_dict(), {**model.config(), "class_names": list(data.CLASS_NAMES)})
    kw = dict(per_class=2, heldout_count=40, cache_dir=cache, timing=False, tokenizer_count=20)
    one = evaluate.evaluate(tok, gen_out, clf_path, **kw)["generator"]
    two = evaluate.evaluate(tok, gen_out, clf_path, repeats=2, **kw)["generator"]
    assert "repeats" not in one
    rep = two["repeats"]
    assert rep["seeds"] == [0, evaluate.REPEAT_SEED_STRIDE]
    assert rep["frechet_ratio"][0] == pytest.approx(one["frechet_ratio"]) == pytest.approx(two["frechet_ratio"])
    assert rep["frechet_ratio"][1] != pytest.approx(rep["frechet_ratio"][0])
    assert rep["frechet_ratio_mean"] == pytest.approx(sum(rep["frechet_ratio"]) / 2)
    # --also-cfg: the same seeds at another guidance; at the evaluation's own cfg it repeats the draws exactly
    also = evaluate.evaluate(tok, gen_out, clf_path, repeats=2, also_cfg=[4.0, 0.0], **kw)["generator"]["at_cfg"]
    assert [a["cfg"] for a in also] == [4.0, 0.0] and also[0]["seeds"] == rep["seeds"]
    assert also[0]["frechet_ratio"] == pytest.approx(rep["frechet_ratio"])
    assert also[0]["class_accuracy"] == pytest.approx(rep["class_accuracy"])
    assert also[1]["frechet_ratio"] != pytest.approx(rep["frechet_ratio"])
    with pytest.raises(SystemExit, match="--repeats 0"):
        evaluate.main(["--tokenizer", tok, "--repeats", "0"])
