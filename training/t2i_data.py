"""The text-to-image data set of the embedded text-to-image model: clip art and colour emoji with captions.

Sources (Debian packages, installed by ``bash scripts/setup.sh --t2i-data``; this module installs nothing):

- ``openclipart-png``: the Open Clip Art Library (public domain), ``/usr/share/openclipart/png/<category>/.../
  <name>.png``, about 8,100 drawings. File names are mostly ``<title>_<author>_NN`` with the title and author cut
  to 24 characters.
- ``fonts-noto-color-emoji``: ``NotoColorEmoji.ttf`` (OFL), a bitmap font that PIL renders at size 109. Emoji of
  one code point are used; their Unicode names are the captions.

Each source becomes a :class:`Source`: a stable key, a caption and a category.

- Captions: the cleaned file-name words, then the folder names deepest first (``"full moon, astronomy,
  science"``); emoji: their Unicode name and the word emoji (``"red apple, emoji"``). File-name cleaning splits
  camel case, hyphens and underscores, drops the ``_NN`` suffix, words mixing letters and digits, and the author:
  a trailing word pair that ends at least :data:`AUTHOR_MIN_FILES` titles (``dan gerhards``), or, in a title cut at
  24 characters, trailing words that begin such a pair (``archite`` of ``architetto franc``).
- Categories (the measuring-stick classifier's labels): the first two folder levels (``animals/mammals``), the
  first alone for files directly in it; ``emoji`` for the emoji.
- Excluded: icon themes (folders named ``*-theme``: application, action and file-type glyphs of desktop themes,
  whose names describe no drawing) and :data:`EXCLUDED_FOLDERS` (colour ramps).
- Near-duplicates: the 16 px thumbnail of each source on white gives a 256-bit hash (pixels brighter than the mean)
  and a mean colour; a source within :data:`DUPLICATE_BITS` bits and :data:`DUPLICATE_COLOUR` colour levels of an
  earlier one (in key order) is dropped. Colour variants of one drawing stay: their captions differ.
- Split: a source is held out when ``crc32(key) % 100 < HELDOUT_PERCENT``, so the split of a source never depends
  on which other sources exist, and no held-out drawing is ever rendered into the training set.

Rendering (:func:`render`): the drawing, cropped to its visible pixels, fills 70 to 90 % of the 64 px side, off
centre by up to 6 px, over one of :data:`BACKGROUNDS` (plain, two-colour gradient, low-frequency clouds, soft
stripes). Opaque drawings on white have the white connected to their corners made transparent first. Every render
is a pure function of ``(seed, key, variant)``. :func:`build` renders ``variants`` images of every training source
and ``heldout_variants`` of every held-out one; :func:`load` caches the result in one ``.npz`` under the run folder.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import re
import sys
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLIPART_ROOT = "/usr/share/openclipart/png"
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
PACKAGES = ("openclipart-png", "fonts-noto-color-emoji")
RESOLUTION = 64
DATA_VERSION = "t2i-v1"  # bump when scanning, captions or render() change what they produce (invalidates caches)
HELDOUT_PERCENT = 10
EXCLUDED_FOLDERS = ("special/gradients",)
AUTHOR_MIN_FILES = 3
TITLE_CHARS = 24  # openclipart-png cuts "<title>_<author>" to this many characters
DUPLICATE_BITS = 12
DUPLICATE_COLOUR = 20.0
BACKGROUNDS = ("plain", "gradient", "clouds", "stripes")
EMOJI_SIZE = 109  # the one size of the font's bitmaps
EMOJI_RANGES = ((0x2600, 0x27BF), (0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF),
                (0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF))
EMOJI_SKIPPED = ((0x1F3FB, 0x1F3FF),)  # skin-tone modifiers: swatches, not drawings
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Source:
    """One drawing: ``key`` (``clipart/<relative path>`` or ``emoji/<code point hex>``), its caption and category."""

    key: str
    caption: str
    category: str

    @property
    def split(self) -> str:
        return "heldout" if zlib.crc32(self.key.encode()) % 100 < HELDOUT_PERCENT else "train"


# ---------------------------------------------------------------------------------------------
# captions


def folder_words(folder: str) -> str:
    """``"signs_and_symbols"`` -> ``"signs and symbols"``."""
    return " ".join(w for w in re.split(r"[_\-\s]+", folder.lower()) if w)


def name_words(stem: str) -> list[str]:
    """Lower-case words of a file stem: camel case, ``_``, ``-`` and ``.`` split; the ``_NN`` suffix and words
    mixing letters and digits dropped."""
    stem = re.sub(r"[_\-]+\d+[a-z]?$", "", stem)
    stem = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", stem)
    words = [w.lower() for w in re.split(r"[_\-.\s]+", stem) if w]
    return [w for w in words if not (re.search(r"\d", w) and re.search(r"[a-z]", w))]


def _title_part(stem: str) -> tuple[str, bool]:
    """``(stem without the _NN suffix, whether it carried one)``."""
    m = re.fullmatch(r"(.*?)_\d+[a-z]?", stem)
    return (m.group(1), True) if m else (stem, False)


def find_authors(stems: Iterable[str]) -> set[tuple[str, str]]:
    """Word pairs that end at least :data:`AUTHOR_MIN_FILES` numbered titles of three or more words."""
    pairs = collections.Counter()
    for stem in stems:
        title, numbered = _title_part(stem)
        words = name_words(title)
        if numbered and len(words) >= 3:
            pairs[tuple(words[-2:])] += 1
    return {p for p, n in pairs.items() if n >= AUTHOR_MIN_FILES}


def title_words(stem: str, authors: set[tuple[str, str]]) -> list[str]:
    """The words of a file's title: :func:`name_words` with a trailing author removed (see the module docstring)."""
    title, numbered = _title_part(stem)
    words = name_words(title)
    if len(words) >= 3 and tuple(words[-2:]) in authors:
        return words[:-2]
    if numbered and len(title.rstrip("_")) >= TITLE_CHARS - 1 and len(words) >= 2:
        author_texts = [" ".join(a) for a in authors]
        for k in (2, 1):  # the cut-off author: the last k words begin a known author's name
            tail = " ".join(words[-k:])
            if len(words) > k and len(tail) >= 3 and any(a.startswith(tail) for a in author_texts):
                return words[:-k]
    return words


def clipart_caption(rel_path: str, authors: set[tuple[str, str]]) -> str:
    """``"science/astronomy/full_moon_dan_gerhards_01.png"`` -> ``"full moon, astronomy, science"``."""
    *folders, name = rel_path.split("/")
    parts = [" ".join(title_words(os.path.splitext(name)[0], authors))]
    parts += [folder_words(f) for f in reversed(folders)]
    return ", ".join(p for p in parts if p)


def clipart_category(rel_path: str) -> str:
    """The first two folder levels of a file, or the first alone for files directly in it."""
    folders = rel_path.split("/")[:-1]
    return "/".join(folders[:2]) if folders else "unsorted"


def emoji_caption(char: str) -> str:
    """``"\\U0001F34E"`` -> ``"red apple, emoji"``."""
    return f"{unicodedata.name(char).lower()}, emoji"


# ---------------------------------------------------------------------------------------------
# sources


def _excluded(rel_path: str) -> bool:
    folders = rel_path.split("/")[:-1]
    return any(f.endswith("-theme") for f in folders) or any(
        rel_path.startswith(prefix + "/") for prefix in EXCLUDED_FOLDERS)


def clipart_sources(root: str = CLIPART_ROOT) -> list[Source]:
    """Every PNG under ``root`` outside the excluded folders, in key order."""
    paths = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.lower().endswith(".png"):
                paths.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    paths = sorted(p for p in paths if not _excluded(p))
    authors = find_authors(os.path.splitext(os.path.basename(p))[0] for p in paths)
    return [Source("clipart/" + p, clipart_caption(p, authors), clipart_category(p)) for p in paths]


class EmojiFont:
    """The colour-emoji font and the picture of its missing glyph (to tell which code points it has)."""

    def __init__(self, path: str):
        self.path = path
        self.font = ImageFont.truetype(path, EMOJI_SIZE)
        self._missing = np.asarray(self.draw(chr(0xE000)))

    def draw(self, char: str) -> Image.Image:
        """The glyph as an RGBA image cropped to its visible pixels."""
        canvas = Image.new("RGBA", (EMOJI_SIZE * 3 // 2, EMOJI_SIZE * 3 // 2), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((0, 0), char, font=self.font, embedded_color=True)
        box = canvas.getchannel("A").getbbox()
        return canvas.crop(box) if box else canvas

    def has(self, char: str) -> bool:
        img = np.asarray(self.draw(char))
        return img.shape != self._missing.shape or not np.array_equal(img, self._missing)


def emoji_sources(font: EmojiFont) -> list[Source]:
    """The font's single-code-point emoji that have a Unicode name."""
    out = []
    for lo, hi in EMOJI_RANGES:
        for cp in range(lo, hi + 1):
            char = chr(cp)
            if any(a <= cp <= b for a, b in EMOJI_SKIPPED) or not unicodedata.name(char, "") or not font.has(char):
                continue
            out.append(Source(f"emoji/{cp:05X}", emoji_caption(char), "emoji"))
    return out


def load_drawing(source: Source, clipart_root: str, font: EmojiFont | None) -> Image.Image:
    """The source as an RGBA image cropped to its visible pixels, at most 256 px on a side."""
    kind, _, rest = source.key.partition("/")
    if kind == "emoji":
        if font is None:
            raise ValueError(f"{source.key}: no emoji font given")
        img = font.draw(chr(int(rest, 16)))
    else:
        with Image.open(os.path.join(clipart_root, rest)) as f:
            img = f.convert("RGBA")
        img.thumbnail((256, 256), Image.LANCZOS)
        img = _white_to_transparent(img)
    box = img.getchannel("A").getbbox()
    return img.crop(box) if box else img


def _white_to_transparent(img: Image.Image, thresh: int = 24) -> Image.Image:
    """An opaque drawing on white: the near-white region connected to its corners becomes transparent."""
    alpha = np.asarray(img.getchannel("A"))
    if alpha.min() < 255:
        return img
    rgb = img.convert("RGB")
    w, h = rgb.size
    marker = (255, 0, 254)
    for xy in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)):
        if min(rgb.getpixel(xy)) >= 255 - thresh and rgb.getpixel(xy) != marker:
            ImageDraw.floodfill(rgb, xy, marker, thresh=thresh)
    filled = np.all(np.asarray(rgb) == marker, axis=-1)
    out = np.asarray(img).copy()
    out[filled, 3] = 0
    return Image.fromarray(out, "RGBA")


# ---------------------------------------------------------------------------------------------
# near-duplicates


def thumbnail_hash(drawing: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """``(256 bools, mean RGB)`` of the drawing centred on white at 16 x 16 px."""
    small = _on_background(drawing, Image.new("RGB", (16, 16), (255, 255, 255)), 1.0, (0.0, 0.0))
    rgb = np.asarray(small, dtype=np.float32)
    grey = rgb.mean(-1).flatten()
    return grey > grey.mean(), rgb.reshape(-1, 3).mean(0)


def near_duplicates(hashes: Sequence[np.ndarray], colours: Sequence[np.ndarray],
                    max_bits: int = DUPLICATE_BITS, max_colour: float = DUPLICATE_COLOUR) -> list[int]:
    """Indices of the items within ``max_bits`` and ``max_colour`` of an earlier item that is kept."""
    if not hashes:
        return []
    import torch

    bits = torch.from_numpy(np.stack(hashes).astype(np.float32) * 2 - 1)  # +-1: hamming = (n - dot) / 2
    rgb = torch.from_numpy(np.stack(colours).astype(np.float32))
    n_bits = bits.shape[1]
    dropped, kept = set(), []
    for start in range(0, len(bits), 1024):
        block = slice(start, start + 1024)
        ham = (n_bits - bits[block] @ bits.T) / 2
        close = (ham <= max_bits) & (torch.cdist(rgb[block], rgb) <= max_colour)
        for i, row in enumerate(close, start):
            earlier = torch.nonzero(row[:i]).flatten().tolist()
            if any(j not in dropped for j in earlier):
                dropped.add(i)
            else:
                kept.append(i)
    return sorted(dropped)


# ---------------------------------------------------------------------------------------------
# rendering


def _rng(seed: int, key: str, variant: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode()), variant])


def _colour(rng: np.random.Generator, light: bool) -> tuple[int, int, int]:
    if light and rng.random() < 0.5:
        return (255, 255, 255)
    lo = 150 if light else 0
    return tuple(int(v) for v in rng.integers(lo, 256, 3))


def background(rng: np.random.Generator, size: int, kind: str) -> Image.Image:
    """A ``size`` px RGB background of ``kind`` (one of :data:`BACKGROUNDS`), light three times in four."""
    light = rng.random() < 0.75
    a = np.array(_colour(rng, light), np.float32)
    if kind == "plain":
        return Image.new("RGB", (size, size), tuple(int(v) for v in a))
    b = np.clip(a + rng.normal(0, 40, 3), 0, 255).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "gradient":
        t = rng.uniform(0, 2 * math.pi)
        mix = (xx * math.cos(t) + yy * math.sin(t))
        mix = (mix - mix.min()) / max(float(np.ptp(mix)), 1e-6)
    elif kind == "clouds":
        cells = int(rng.integers(3, 7))
        grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8), "L")
        mix = np.asarray(grid.resize((size, size), Image.BICUBIC), np.float32) / 255
    elif kind == "stripes":
        t = rng.uniform(0, math.pi)
        period = rng.uniform(6, 16) / size
        mix = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(t) + yy * math.sin(t)) / period)
    else:
        raise ValueError(f"unknown background {kind!r}: one of {BACKGROUNDS}")
    img = a * (1 - mix[..., None]) + b * mix[..., None]
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")


def _on_background(drawing: Image.Image, bg: Image.Image, fill: float, offset: tuple[float, float]) -> Image.Image:
    """The drawing scaled so its longer side is ``fill`` of the background's, centred plus ``offset`` px."""
    size = bg.size[0]
    w, h = drawing.size
    k = fill * size / max(w, h)
    dw, dh = max(1, round(w * k)), max(1, round(h * k))
    small = drawing.convert("RGBa").resize((dw, dh), Image.LANCZOS).convert("RGBA")
    x = round((size - dw) / 2 + offset[0])
    y = round((size - dh) / 2 + offset[1])
    out = bg.convert("RGBA")
    out.alpha_composite(small, (min(max(x, 0), size - dw), min(max(y, 0), size - dh)))
    return out.convert("RGB")


def render(drawing: Image.Image, key: str, seed: int, variant: int, size: int = RESOLUTION) -> np.ndarray:
    """uint8 ``(size, size, 3)``: the drawing on a background, placed as in the module docstring."""
    rng = _rng(seed, key, variant)
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))] if rng.random() < 0.6 else "plain"
    bg = background(rng, size, kind)
    fill = rng.uniform(0.7, 0.9)
    free = (1 - fill) * size / 2
    shift = min(free, 6 * size / 64)
    offset = (rng.uniform(-shift, shift), rng.uniform(-shift, shift))
    return np.asarray(_on_background(drawing, bg, fill, offset))


# ---------------------------------------------------------------------------------------------
# the data set


@dataclass
class T2IData:
    """Rendered images and their sources.

    ``images``: uint8 ``(N, H, W, 3)``; ``source``: int ``(N,)``, the index into ``sources`` of each image.
    """

    images: np.ndarray
    source: np.ndarray
    sources: list[Source]
    meta: dict

    def split_indices(self, split: str) -> np.ndarray:
        """The images of ``split`` (``train`` or ``heldout``)."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: one of {SPLITS}")
        in_split = np.array([s.split == split for s in self.sources], dtype=bool)
        return np.nonzero(in_split[self.source])[0]

    def captions(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        return [self.sources[int(self.source[i])].caption for i in indices]

    def top_categories(self, count: int) -> list[str]:
        """The ``count`` categories with the most sources (ties: by name)."""
        n = collections.Counter(s.category for s in self.sources)
        return [c for c, _ in sorted(n.items(), key=lambda kv: (-kv[1], kv[0]))[:count]]

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, images=self.images, source=self.source,
                 sources=np.array(json.dumps([asdict(s) for s in self.sources])),
                 meta=np.array(json.dumps(self.meta)))
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: str) -> T2IData:
        with np.load(path, allow_pickle=False) as f:
            sources = [Source(**s) for s in json.loads(str(f["sources"]))]
            return cls(f["images"], f["source"], sources, json.loads(str(f["meta"])))


def scan(clipart_root: str | None = CLIPART_ROOT, emoji_font: str | None = EMOJI_FONT) -> list[Source]:
    """Every candidate source of the given packages (None: leave that package out), clip art first."""
    missing = [p for p in (clipart_root, emoji_font) if p is not None and not os.path.exists(p)]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not found: install the data packages with "
                         f"`bash scripts/setup.sh --t2i-data` (Debian: apt-get install {' '.join(PACKAGES)})")
    out = clipart_sources(clipart_root) if clipart_root else []
    if emoji_font:
        out += emoji_sources(EmojiFont(emoji_font))
    return out


def build(seed: int = 0, variants: int = 4, heldout_variants: int = 1, clipart_root: str | None = CLIPART_ROOT,
          emoji_font: str | None = EMOJI_FONT, size: int = RESOLUTION, verbose: bool = True) -> T2IData:
    """Scan, drop near-duplicates, render (see the module docstring)."""
    candidates = scan(clipart_root, emoji_font)
    font = EmojiFont(emoji_font) if emoji_font else None
    drawings, hashes, colours, usable = [], [], [], []
    for src in candidates:
        try:
            drawing = load_drawing(src, clipart_root or "", font)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # unreadable or huge: left out, named
            if verbose:
                print(f"[t2i-data] skipped {src.key}: {e}", flush=True)
            continue
        if drawing.getchannel("A").getbbox() is None:
            continue
        bits, rgb = thumbnail_hash(drawing)
        drawing.thumbnail((2 * size, 2 * size), Image.LANCZOS)  # enough for a render at most 90 % of size
        drawings.append(drawing)
        hashes.append(bits)
        colours.append(rgb)
        usable.append(src)
    duplicates = set(near_duplicates(hashes, colours))
    kept = [i for i in range(len(usable)) if i not in duplicates]
    sources = [usable[i] for i in kept]
    images, owner = [], []
    for si, (src, drawing) in enumerate(zip(sources, (drawings[i] for i in kept), strict=True)):
        for v in range(variants if src.split == "train" else heldout_variants):
            images.append(render(drawing, src.key, seed, v, size))
            owner.append(si)
        if verbose and si % 500 == 0:
            print(f"[t2i-data] rendered {si}/{len(sources)} sources", flush=True)
    meta = {"version": DATA_VERSION, "seed": seed, "variants": variants, "heldout_variants": heldout_variants,
            "size": size, "candidates": len(candidates), "unreadable_or_empty": len(candidates) - len(usable),
            "near_duplicates": len(duplicates), "sources": len(sources)}
    return T2IData(np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
                   np.asarray(owner, dtype=np.int32), sources, meta)


def cache_path(cache_dir: str, seed: int, variants: int, heldout_variants: int, size: int) -> str:
    tag = hashlib.sha1(f"{DATA_VERSION}-{seed}-{variants}-{heldout_variants}-{size}".encode()).hexdigest()[:10]
    return os.path.join(cache_dir, f"t2i_{size}px_{tag}.npz")


def load(cache_dir: str, seed: int = 0, variants: int = 4, heldout_variants: int = 1, size: int = RESOLUTION,
         clipart_root: str | None = CLIPART_ROOT, emoji_font: str | None = EMOJI_FONT, verbose: bool = True) -> T2IData:
    """The rendered set from its cache file in ``cache_dir``, built and cached first when missing."""
    path = cache_path(cache_dir, seed, variants, heldout_variants, size)
    if os.path.exists(path):
        return T2IData.read(path)
    ds = build(seed, variants, heldout_variants, clipart_root, emoji_font, size, verbose)
    ds.save(path)
    if verbose:
        print(f"[t2i-data] {len(ds.images)} images of {len(ds.sources)} sources -> {path} {ds.meta}", flush=True)
    return ds


def add_data_args(ap: argparse.ArgumentParser) -> None:
    """The data options every text-to-image trainer takes."""
    ap.add_argument("--data-dir", required=True, help="folder of the rendered set's cache file (the run folder's)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--variants", type=int, default=4, help="renders of each training drawing")
    ap.add_argument("--clipart-root", default=CLIPART_ROOT)
    ap.add_argument("--emoji-font", default=EMOJI_FONT)


def load_from_args(args) -> T2IData:
    return load(args.data_dir, args.data_seed, args.variants, 1, RESOLUTION, args.clipart_root or None,
                args.emoji_font or None)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Render the text-to-image set (clip art and emoji) into its cache")
    add_data_args(ap)
    ap.add_argument("--grid", default=None, help="also write a grid of 100 training images here (PNG)")
    args = ap.parse_args(argv)
    ds = load_from_args(args)
    train, held = ds.split_indices("train"), ds.split_indices("heldout")
    print(json.dumps({**ds.meta, "train_images": len(train), "heldout_images": len(held),
                      "top_categories": ds.top_categories(24)}, indent=1))
    if args.grid:
        from training import data

        data.save_grid(ds.images[train[:: max(1, len(train) // 100)][:100]], args.grid)


if __name__ == "__main__":
    main()
