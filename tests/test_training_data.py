"""The synthetic training set: a pure function of (seed, split, index), distinct classes, disjoint splits."""

import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


from training import common, data  # noqa: E402


def test_same_seed_same_images():
    a, la = data.render_many(3, "train", 0, 12)
    b, lb = data.render_many(3, "train", 0, 12)
    assert a.dtype == np.uint8 and a.shape == (12, 64, 64, 3)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    # one item alone equals the same item inside a batch (pure function of the index)
    one, lab = data.render(3, "train", 7)
    assert np.array_equal(one, a[7]) and lab == la[7]


def test_other_seed_other_images():
    a, _ = data.render_many(0, "train", 0, 10)
    b, _ = data.render_many(1, "train", 0, 10)
    assert all(not np.array_equal(x, y) for x, y in zip(a, b))


def test_labels_cycle_through_all_classes():
    _, labels = data.render_many(0, "train", 0, 2 * len(data.CLASS_NAMES))
    assert len(data.CLASS_NAMES) >= 10
    assert labels.tolist() == list(range(len(data.CLASS_NAMES))) * 2


def test_heldout_split_is_disjoint_from_train():
    tr, _ = data.render_many(0, "train", 0, 200)
    he, _ = data.render_many(0, "heldout", 0, 200)
    train_hashes = {x.tobytes() for x in tr}
    assert not any(x.tobytes() in train_hashes for x in he)
    # and nearly-identical images do not occur either (same index, different split differ everywhere)
    diff = np.abs(tr.astype(int) - he.astype(int)).mean(axis=(1, 2, 3))
    assert diff.min() > 5


def test_classes_are_distinct_shapes():
    """The canonical masks differ pairwise by a large share of their pixels (IoU < 0.85; circle vs square,
    the closest pair, is 0.82). The classifier's held-out accuracy (>= 98%) is the real check of distinctness."""
    masks = [np.asarray(data.canonical_mask(c)) > 127 for c in range(len(data.CLASS_NAMES))]
    for i in range(len(masks)):
        assert masks[i].mean() > 0.05, data.CLASS_NAMES[i]
        for j in range(i + 1, len(masks)):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.85, (data.CLASS_NAMES[i], data.CLASS_NAMES[j], iou)


def test_shape_stands_out_from_background():
    """Foreground/background contrast: each image spans a good range of luma."""
    imgs, _ = data.render_many(0, "train", 0, 50)
    luma = imgs.astype(float) @ np.array([0.299, 0.587, 0.114])
    spread = np.percentile(luma, 98, axis=(1, 2)) - np.percentile(luma, 2, axis=(1, 2))
    assert spread.min() > 40


def test_cache_round_trip(tmp_path):
    a, la = data.synthetic_arrays(0, "heldout", 15, cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 1
    b, lb = data.synthetic_arrays(0, "heldout", 15, cache_dir=str(tmp_path))
    assert np.array_equal(a, b) and np.array_equal(la, lb)


def test_tensor_conversion_round_trip():
    imgs, _ = data.render_many(0, "train", 0, 4)
    t = data.to_tensor(imgs)
    assert t.shape == (4, 3, 64, 64) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(data.to_uint8(t), imgs)


def test_folder_dataset(tmp_path):
    from PIL import Image

    for ci, name in enumerate(["cats", "dogs"]):
        (tmp_path / name).mkdir()
        for k in range(5):
            Image.fromarray(np.full((40, 50, 3), 40 * ci + k, np.uint8)).save(tmp_path / name / f"{k}.png")
    ds = data.folder_dataset(str(tmp_path), resolution=32)
    assert ds.class_names == ("cats", "dogs") and len(ds) == 10
    x, y = ds[7]
    assert x.shape == (3, 32, 32) and y == 1
    tr, he = data.split_dataset(ds, 0.2)
    assert len(tr) + len(he) == 10 and len(he) == 2


def test_step_batches_are_a_function_of_the_step():
    t = torch.arange(10)
    a = common.StepBatches((t,), 4, seed=1)
    b = common.StepBatches((t,), 4, seed=1)
    seq = [a.batch(s)[0].tolist() for s in range(5)]
    assert [b.batch(s)[0].tolist() for s in reversed(range(5))] == list(reversed(seq))
    # every epoch visits every item once
    flat = [i for batch in seq for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_weighted_step_batches_follow_the_class_weights():
    labels = torch.tensor([0] * 50 + [1] * 50)
    w = common.class_item_weights(labels, ("a", "b"), ["b=4"])
    assert w[:50].eq(1).all() and w[50:].eq(4).all()
    a = common.StepBatches((torch.arange(100), labels), 64, seed=3, weights=w)
    b = common.StepBatches((torch.arange(100), labels), 64, seed=3, weights=w)
    assert torch.equal(a.batch(7)[0], b.batch(7)[0]) and not torch.equal(a.batch(7)[0], a.batch(8)[0])
    share_b = torch.cat([a.batch(s)[1] for s in range(100)]).float().mean()
    assert abs(float(share_b) - 0.8) < 0.03  # 4 : 1
    assert common.class_item_weights(labels, ("a", "b"), []) is None
    # the null class keeps the data's 50/50 mix and the overall 10 % drop rate: a 0.2 x 0.25, b 0.8 x 0.0625
    q = common.label_drop_per_class(0.1, labels, w, 2)
    assert torch.allclose(q, torch.tensor([0.25, 0.0625]))
    assert torch.equal(common.label_drop_per_class(0.1, labels, None, 3), torch.full((3,), 0.1))
    lab = torch.cat([a.batch(s)[1] for s in range(400)])
    drop = torch.rand(lab.shape, generator=torch.Generator().manual_seed(0)) < q[lab]
    assert abs(float(drop.float().mean()) - 0.1) < 0.01
    assert abs(float(lab[drop].float().mean()) - 0.5) < 0.05
    with pytest.raises(SystemExit, match="one of a, b"):
        common.class_item_weights(labels, ("a", "b"), ["c=2"])
    with pytest.raises(SystemExit, match="number >= 0"):
        common.class_item_weights(labels, ("a", "b"), ["a=-1"])
    with pytest.raises(SystemExit, match="weight 0"):
        common.class_item_weights(labels, ("a", "b"), ["a=0", "b=0"])


@pytest.mark.parametrize("step,total", [(0, 100), (5, 100), (50, 100), (99, 100)])
def test_lr_schedule_bounds(step, total):
    lr = common.lr_at(step, total, 1.0, warmup=10, min_ratio=0.1)
    assert 0.0 < lr <= 1.0


def test_outline_style_draws_the_same_scene_otherwise():
    """Image i in the outline style: same class, background and colours as the filled image i, only the inside of
    the shape shows the background."""
    filled, labels = data.render_many(0, "heldout", 0, 10)
    outline, outline_labels = data.render_many(0, "heldout", 0, 10, style="outline")
    assert np.array_equal(labels, outline_labels)
    for f, o in zip(filled, outline):
        assert np.array_equal(f[:3, :3], o[:3, :3])  # the corner: background in both
        differs = np.abs(f.astype(int) - o.astype(int)).sum(-1) > 30
        assert 0.03 < differs.mean() < 0.6  # the shape's inside, not the whole image
    with pytest.raises(ValueError, match="style must be one of"):
        data.render(0, "train", 0, style="dotted")


def test_captioned_folder_reads_side_cars_and_class_folders(tmp_path):
    from PIL import Image

    images, labels = data.render_many(0, "train", 0, 3, 16)
    data.write_folder(str(tmp_path / "flat"), images, labels)
    Image.fromarray(images[0]).save(tmp_path / "flat" / "sub.png")  # no side-car, not in a class folder
    with pytest.raises(SystemExit, match=r"sub\.png has no text"):
        data.captioned_folder(str(tmp_path / "flat"), (16, 16))
    (tmp_path / "flat" / "sub.png").unlink()
    (tmp_path / "flat" / "star").mkdir()
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "flat" / "star" / "wide.png")
    imgs, texts, paths = data.captioned_folder(str(tmp_path / "flat"), (16, 8))
    assert imgs.shape == (4, 16, 8, 3) and paths[-1] == os.path.join("star", "wide.png")
    assert texts == ["circle", "square", "triangle", "star"]
