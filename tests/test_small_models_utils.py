"""Class lists, token containers and pixel conversions (identifying checkpoints: test_family.py)."""

import pytest
import torch
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.imageops import fit_square, image_to_model, model_to_image
from nextscale.models.core.tokens import NextScaleTokens
from nextscale.models.var.classes import class_index, default_class_names, imagenet_class_names, parse_class_list


def test_imagenet_names():
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[207] == "golden retriever"
    assert default_class_names(1000) is names
    assert default_class_names(3) == ("0", "1", "2")


def test_class_lists():
    names = ("circle", "square", "Star")
    assert parse_class_list("circle, star ,1", names) == [0, 2, 1]
    assert parse_class_list("  ", names) == []
    assert class_index("STAR", names) == 2
    with pytest.raises(NextScaleError, match=r"'hexagon' is not a class.*circle, square, Star"):
        parse_class_list("circle, hexagon", names)
    with pytest.raises(NextScaleError, match=r"outside 0..2"):
        parse_class_list("7", names)
    shapes = [f"shape {i}" for i in range(10)]
    goldfish = (r"'goldfish' is not a class of this generator \('goldfish' is an ImageNet-1k class, for the official "
                r"VAR checkpoints\); its classes are: shape 0, .*, shape 9$")
    with pytest.raises(NextScaleError, match=goldfish):
        class_index("goldfish", shapes)
    with pytest.raises(NextScaleError, match=r"its classes are: tench, goldfish, .*, \.\.\. \(1000 classes\)$"):
        class_index("circle", imagenet_class_names())
    with pytest.raises(NextScaleError, match="has an empty entry"):
        parse_class_list("circle,,star", names)
    with pytest.raises(NextScaleError, match=r"no class given: name one of this generator's classes \(circle, "):
        class_index(" ", names)


def test_tokens_container():
    idx = [torch.zeros(3, pn, pn, dtype=torch.long) + pn for pn in (1, 2, 4)]
    tok = NextScaleTokens(indices=idx, patch_nums=(1, 2, 4), labels=torch.tensor([0, 1, 2]))
    assert tok.batch_size == 3 and tok.num_scales == 3
    assert [f.shape for f in tok.flat()] == [(3, 1), (3, 4), (3, 16)]
    sub = tok.select([2, 0])
    assert sub.batch_size == 2 and sub.labels.tolist() == [2, 0]
    with pytest.raises(NextScaleError, match="scale 1 has shape"):
        NextScaleTokens(indices=[idx[0], idx[2], idx[2]], patch_nums=(1, 2, 4))
    with pytest.raises(NextScaleError, match="2 scales do not match"):
        NextScaleTokens(indices=idx[:2], patch_nums=(1, 2, 4))


def test_pixel_conversions_round_trip():
    image = torch.rand(2, 12, 20, 3)
    x = image_to_model(image)
    assert x.shape == (2, 3, 12, 20) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(model_to_image(x), image, atol=1e-6)
    assert image_to_model(torch.rand(1, 4, 4, 4)).shape == (1, 3, 4, 4)  # alpha dropped
    assert image_to_model(torch.rand(1, 4, 4, 1)).shape == (1, 3, 4, 4)  # grey expanded
    with pytest.raises(NextScaleError, match="channels"):
        image_to_model(torch.rand(1, 4, 4, 2))


@pytest.mark.parametrize("mode", ["center crop", "stretch", "pad"])
def test_fit_square(mode):
    x = torch.rand(2, 3, 30, 50) * 2 - 1
    y = fit_square(x, 16, mode)
    assert y.shape == (2, 3, 16, 16) and y.min() >= -1 and y.max() <= 1
    if mode == "pad":  # letterbox: top and bottom rows are black (-1)
        assert torch.all(y[:, :, 0] == -1) and torch.all(y[:, :, -1] == -1)
    assert fit_square(y, 16, mode) is y
    with pytest.raises(NextScaleError, match="resize mode"):
        fit_square(x, 16, "zoom")
