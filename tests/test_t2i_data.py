"""The text-to-image data recipe (training/t2i_data.py) on a small clip-art tree built here: captions, categories,
excluded folders, near-duplicates, the held-out split, rendering determinism and the cache."""

import os
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from training import t2i_data as T

AUTHOR = "jane_doe"


def _drawing(shape: str, colour=(200, 30, 30), opaque_on_white: bool = False) -> Image.Image:
    bg = (255, 255, 255, 255) if opaque_on_white else (0, 0, 0, 0)
    img = Image.new("RGBA", (48, 48), bg)
    d = ImageDraw.Draw(img)
    fill = (*colour, 255)
    if shape == "circle":
        d.ellipse([6, 6, 42, 42], fill=fill)
    elif shape == "square":
        d.rectangle([8, 8, 40, 40], fill=fill)
    elif shape == "triangle":
        d.polygon([(24, 4), (44, 44), (4, 44)], fill=fill)
    elif shape == "cross":
        d.rectangle([20, 4, 28, 44], fill=fill)
        d.rectangle([4, 20, 44, 28], fill=fill)
    elif shape == "bar":
        d.rectangle([4, 30, 44, 40], fill=fill)
    return img


def _names(prefix: str, stem: str, held_out: bool, count: int) -> list[str]:
    """The first ``count`` file names ``<prefix>/<stem>_xx.png`` whose keys fall in (or out of) the held-out split."""
    out = []
    for i in range(26 * 26):
        name = f"{prefix}/{stem}_{chr(97 + i % 26)}{chr(97 + i // 26)}.png"
        if (zlib.crc32(f"clipart/{name}".encode()) % 100 < T.HELDOUT_PERCENT) == held_out:
            out.append(name)
            if len(out) == count:
                return out
    raise AssertionError("not enough names found")


HELD_OUT = [*_names("science/astronomy", "moon", True, 1), *_names("animals/mammals", "mole", True, 2)]


def make_tree(root) -> str:
    """A small clip-art tree under ``root``: an author on three titles, a cut title, a duplicate, a colour variant,
    a UI glyph, a colour ramp and the three held-out drawings :data:`HELD_OUT`."""
    files = {
        f"animals/mammals/red_fox_{AUTHOR}_01.png": _drawing("circle", (220, 90, 20)),
        f"animals/mammals/gray_wolf_{AUTHOR}_01.png": _drawing("triangle", (120, 120, 120)),
        "animals/mammals/brown_bear_sleeping_jane_01.png": _drawing("square", (120, 70, 20)),  # cut to 24 chars
        f"food/ripe_apple_{AUTHOR}_02.png": _drawing("cross", (200, 0, 0), opaque_on_white=True),
        "food/RipeApple-copy.png": _drawing("cross", (200, 0, 0), opaque_on_white=True),  # a duplicate
        "food/green_apple.png": _drawing("cross", (0, 170, 0), opaque_on_white=True),  # a colour variant
        "shapes/star_05pt02step.png": _drawing("bar", (30, 30, 200)),
        "computer/icons/flat-theme/action/help.png": _drawing("circle"),  # a UI glyph
        "special/gradients/gradient-apple-green.png": _drawing("square"),  # a colour ramp
        _names("science/astronomy", "sun", False, 1)[0]: _drawing("triangle", (250, 200, 0)),
        HELD_OUT[0]: _drawing("circle", (240, 230, 120)),
        HELD_OUT[1]: _drawing("bar", (90, 60, 30)),
        HELD_OUT[2]: _drawing("square", (60, 60, 60)),
    }
    for rel, img in files.items():
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        img.save(os.path.join(root, rel))
    return str(root)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("openclipart"))


def test_name_words():
    assert T.name_words("full_moon_dan_gerhards_01") == ["full", "moon", "dan", "gerhards"]
    assert T.name_words("BasseTemperature") == ["basse", "temperature"]
    assert T.name_words("star_05pt02step") == ["star"]
    assert T.name_words("bluewhale-md") == ["bluewhale", "md"]


def test_captions_drop_authors_and_name_folders(tree):
    by_key = {s.key: s for s in T.clipart_sources(tree)}
    assert by_key[f"clipart/animals/mammals/red_fox_{AUTHOR}_01.png"].caption == "red fox, mammals, animals"
    # a title cut at 24 characters ends in the beginning of a known author's name
    assert by_key["clipart/animals/mammals/brown_bear_sleeping_jane_01.png"].caption == (
        "brown bear sleeping, mammals, animals")
    assert by_key["clipart/food/RipeApple-copy.png"].caption == "ripe apple copy, food"
    assert by_key["clipart/shapes/star_05pt02step.png"].caption == "star, shapes"


def test_categories_and_excluded_folders(tree):
    sources = T.clipart_sources(tree)
    keys = {s.key for s in sources}
    assert not any("flat-theme" in k or "gradients" in k for k in keys)
    cats = {s.key: s.category for s in sources}
    assert cats[f"clipart/animals/mammals/red_fox_{AUTHOR}_01.png"] == "animals/mammals"
    assert cats["clipart/food/green_apple.png"] == "food"


def test_emoji_caption():
    assert T.emoji_caption("\U0001F34E") == "red apple, emoji"


@pytest.fixture(scope="module")
def built(tree):
    return T.build(seed=3, variants=2, heldout_variants=1, clipart_root=tree, emoji_font=None, size=32,
                   verbose=False)


def test_near_duplicates_dropped_colour_variants_kept(built):
    keys = [s.key for s in built.sources]
    apples = [k for k in keys if "apple" in k.lower()]
    assert "clipart/food/green_apple.png" in apples
    assert len([k for k in apples if "ripe" in k.lower()]) == 1
    assert built.meta["near_duplicates"] == 1


def test_split_by_source(built):
    train, held = built.split_indices("train"), built.split_indices("heldout")
    assert len(train) and len(held)
    assert not set(train) & set(held) and len(train) + len(held) == len(built.images)
    held_sources = {int(built.source[i]) for i in held}
    assert {built.sources[i].key for i in held_sources} == {f"clipart/{n}" for n in HELD_OUT}
    assert sorted(built.captions(held)) == sorted(f"{os.path.basename(n)[:-4].replace('_', ' ')}, {c}"
                                                  for n, c in zip(HELD_OUT, ("astronomy, science", "mammals, animals",
                                                                             "mammals, animals"), strict=True))


def test_renders_are_deterministic(tree, built):
    again = T.build(seed=3, variants=2, heldout_variants=1, clipart_root=tree, emoji_font=None, size=32,
                    verbose=False)
    other = T.build(seed=4, variants=2, heldout_variants=1, clipart_root=tree, emoji_font=None, size=32,
                    verbose=False)
    assert built.images.shape == (len(built.source), 32, 32, 3) and built.images.dtype == np.uint8
    np.testing.assert_array_equal(again.images, built.images)
    assert not np.array_equal(other.images, built.images)
    # the two renders of one drawing differ (background, size, placement)
    first = np.nonzero(built.source == 0)[0]
    assert not np.array_equal(built.images[first[0]], built.images[first[1]])


def test_opaque_white_becomes_background(tree):
    src = next(s for s in T.clipart_sources(tree) if s.key.endswith("green_apple.png"))
    drawing = T.load_drawing(src, tree, None)
    alpha = np.asarray(drawing.getchannel("A"))
    rgb = np.asarray(drawing.convert("RGB"))
    green = (rgb[..., 1] > 150) & (rgb[..., 0] < 100)
    assert alpha.min() == 0 and green.any() and (alpha[green] == 255).all()  # the white went, the green stayed


def test_backgrounds_differ_and_stay_in_range():
    rng = np.random.default_rng(0)
    images = [np.asarray(T.background(rng, 32, kind)) for kind in T.BACKGROUNDS]
    assert all(im.shape == (32, 32, 3) for im in images)
    assert images[0].std(axis=(0, 1)).max() == 0  # plain
    assert all(im.std() > 0 for im in images[1:])


def test_cache_round_trip(tree, tmp_path):
    first = T.load(str(tmp_path), seed=1, variants=1, size=32, clipart_root=tree, emoji_font=None, verbose=False)
    path = T.cache_path(str(tmp_path), 1, 1, 1, 32)
    assert os.path.exists(path)
    second = T.load(str(tmp_path), seed=1, variants=1, size=32, clipart_root=None, emoji_font=None, verbose=False)
    np.testing.assert_array_equal(first.images, second.images)
    assert first.sources == second.sources and first.meta == second.meta


def test_missing_packages_named(tmp_path):
    with pytest.raises(SystemExit, match=r"setup\.sh --t2i-data"):
        T.scan(str(tmp_path / "nowhere"), None)


def test_near_duplicates_need_both_shape_and_colour():
    rng = np.random.default_rng(0)
    base = rng.random(256) > 0.5
    flipped = base.copy()
    flipped[: T.DUPLICATE_BITS + 1] ^= True  # one bit too many
    close = base.copy()
    close[: T.DUPLICATE_BITS] ^= True
    red, dark_red, blue = np.array([200.0, 0, 0]), np.array([190.0, 5, 0]), np.array([0.0, 0, 200])
    hashes = [base, close, flipped, base, base]
    colours = [red, dark_red, red, blue, red]
    # 1: within the bits and the colour of 0; 2: too many bits; 3: another colour; 4: a copy of 0
    assert T.near_duplicates(hashes, colours) == [1, 4]
    # a drawing close only to a dropped one is kept
    further = close.copy()
    further[T.DUPLICATE_BITS: 2 * T.DUPLICATE_BITS] ^= True  # 12 bits from `close`, 24 from `base`
    assert T.near_duplicates([base, close, further], [red, red, red]) == [1]


def test_author_needs_three_titles():
    stems = [f"{t}_ann_lee_01" for t in ("red_cup", "blue_cup")] + ["tall_tree_bob_ray_01"] * 3
    assert T.find_authors(stems) == {("bob", "ray")}
    assert T.title_words("red_cup_ann_lee_01", T.find_authors(stems)) == ["red", "cup", "ann", "lee"]
