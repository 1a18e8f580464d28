import pytest
import torch
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.grid import image_grid


def test_grid_places_every_image_row_by_row():
    imgs = torch.rand(5, 4, 3, 3)
    g = image_grid(imgs, columns=2, padding=1, pad_value=0.5)
    assert g.shape == (1, 3 * 4 + 4, 2 * 3 + 3, 3)
    for i in range(5):
        r, c = divmod(i, 2)
        y, x = 1 + r * 5, 1 + c * 4
        assert torch.equal(g[0, y : y + 4, x : x + 3], imgs[i])
    assert torch.all(g[0, 11:15, 5:8] == 0.5)  # the empty last cell
    assert torch.all(g[0, 0] == 0.5) and torch.all(g[0, :, 0] == 0.5)


def test_grid_defaults_to_near_square_and_caps_columns():
    assert image_grid(torch.rand(10, 2, 2, 3), padding=0).shape == (1, 2 * 3, 2 * 4, 3)
    assert image_grid(torch.rand(3, 2, 2, 3), columns=8, padding=0).shape == (1, 2, 6, 3)


@pytest.mark.parametrize("bad", [torch.rand(0, 2, 2, 3), torch.rand(2, 2, 3)])
def test_grid_rejects_non_batches(bad):
    with pytest.raises(NextScaleError, match="batch of images"):
        image_grid(bad)
