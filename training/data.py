"""Datasets for training the embedded model: a deterministic synthetic set and a folder set.

Synthetic set ("NextScale shapes"): each image is a pure function of ``(seed, split, index)``.
Class ``index % num_classes``; one filled shape or glyph in a random colour, position, scale and
rotation (kept within +-30 degrees so that a 7 stays a 7 and an arrow points right) over a smooth
background (a two-colour linear gradient plus low-frequency texture). Shapes are drawn at 4x and
box-filtered down, so edges are anti-aliased; that and the smooth backgrounds keep the images within
reach of a small tokenizer. Nothing is downloaded: glyphs use the DejaVu fonts of the system
(Debian ``fonts-dejavu-core``), with PIL's built-in font as a fallback.

The ``train`` and ``heldout`` splits draw from different random streams (the split is part of the
seed), so they share no image.

Folder set: ``root/<class name>/*.png|jpg|...``; class = subfolder (sorted by name), images are
centre-cropped to a square and resized to the training resolution.

Images cross the module boundary as uint8 ``(N, H, W, 3)`` arrays or, from the torch datasets, as
float ``(3, H, W)`` tensors in [-1, 1] (the tokenizer's range).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

CLASS_NAMES = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "crescent",
    "arrow",
    "letter A",
    "digit 7",
)
SPLITS = {"train": 0, "heldout": 1}
DEFAULT_RESOLUTION = 64
DATA_VERSION = "v1"  # bump when render() changes what it draws (invalidates cached arrays)
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu",)
GLYPH_FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_CANVAS = 256  # canonical drawing canvas (4x supersampling of 64 px)
_BOX = 200  # the canonical shape fills a centred box of this side
_OUTLINE = 12  # half the width of an outline, in canvas pixels (about 2 px of a 64 px image)
# How the shape is drawn: "filled" (the training set of the embedded model) or "outline" (a style the embedded model
# never saw; the example LoRA teaches it). The style draws from the same random stream, so image i of a split has
# the same shape, colours, pose and background in every style.
STYLES = ("filled", "outline")


# ---------------------------------------------------------------------------------------------
# canonical masks: each class drawn once, centred, filling a _BOX x _BOX box of a _CANVAS canvas


def _poly_mask(points: Sequence[tuple[float, float]]) -> Image.Image:
    """Polygon given in [-1, 1]^2 (y down), drawn to fill the canonical box."""
    img = Image.new("L", (_CANVAS, _CANVAS), 0)
    c, r = _CANVAS / 2, _BOX / 2
    ImageDraw.Draw(img).polygon([(c + x * r, c + y * r) for x, y in points], fill=255)
    return img


def _star(n: int = 5, inner: float = 0.45):
    pts = []
    for i in range(2 * n):
        rad = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + i * math.pi / n
        pts.append((rad * math.cos(a), rad * math.sin(a) + 0.05))
    return pts


def _heart(steps: int = 120):
    pts = []
    for i in range(steps):
        t = 2 * math.pi * i / steps
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -(y + 2.5) / 15.5))
    return pts


def _find_font(name: str):
    for d in FONT_DIRS:
        path = os.path.join(d, name)
        if os.path.exists(path):
            return path
    return None


def _glyph_mask(char: str, font_name: str) -> Image.Image:
    path = _find_font(font_name)
    font = ImageFont.truetype(path, 240) if path else ImageFont.load_default()
    tmp = Image.new("L", (400, 400), 0)
    ImageDraw.Draw(tmp).text((60, 20), char, fill=255, font=font)
    box = tmp.getbbox()
    if box is None:  # font without the glyph: fall back to PIL's default font
        return _glyph_mask(char, "__default__")
    glyph = tmp.crop(box)
    w, h = glyph.size
    k = _BOX / max(w, h)
    glyph = glyph.resize((max(1, round(w * k)), max(1, round(h * k))), Image.BICUBIC)
    out = Image.new("L", (_CANVAS, _CANVAS), 0)
    out.paste(glyph, ((_CANVAS - glyph.size[0]) // 2, (_CANVAS - glyph.size[1]) // 2))
    return out


@functools.cache
def canonical_mask(label: int, variant: int = 0) -> Image.Image:
    """The class drawn centred on a _CANVAS canvas ('L' image). ``variant`` picks the font of glyphs."""
    name = CLASS_NAMES[label]
    c, r = _CANVAS / 2, _BOX / 2
    if name == "circle":
        img = Image.new("L", (_CANVAS, _CANVAS), 0)
        ImageDraw.Draw(img).ellipse([c - r, c - r, c + r, c + r], fill=255)
        return img
    if name == "square":
        k = 0.85
        return _poly_mask([(-k, -k), (k, -k), (k, k), (-k, k)])
    if name == "triangle":
        return _poly_mask([(0.0, -0.95), (1.0, 0.8), (-1.0, 0.8)])
    if name == "star":
        return _poly_mask(_star())
    if name == "heart":
        return _poly_mask(_heart())
    if name == "cross":
        a, b = 0.3, 0.95
        return _poly_mask([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
                           (-b, -a), (-a, -a)])
    if name == "crescent":
        img = Image.new("L", (_CANVAS, _CANVAS), 0)
        d = ImageDraw.Draw(img)
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        r2, off = r * 0.82, r * 0.45
        d.ellipse([c - r2 + off, c - r2 - r * 0.1, c + r2 + off, c + r2 - r * 0.1], fill=0)
        return img
    if name == "arrow":
        return _poly_mask([(-1.0, -0.25), (0.15, -0.25), (0.15, -0.7), (1.0, 0.0), (0.15, 0.7), (0.15, 0.25),
                           (-1.0, 0.25)])
    if name == "letter A":
        return _glyph_mask("A", GLYPH_FONTS[variant % len(GLYPH_FONTS)])
    if name == "digit 7":
        return _glyph_mask("7", GLYPH_FONTS[variant % len(GLYPH_FONTS)])
    raise ValueError(f"unknown class {name!r}")


@functools.cache
def outline_mask(label: int, variant: int = 0) -> Image.Image:
    """The canonical mask's outline: the shape minus itself eroded by :data:`_OUTLINE` canvas pixels."""
    mask = canonical_mask(label, variant)
    return ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(2 * _OUTLINE + 1)))


def _is_glyph(label: int) -> bool:
    return CLASS_NAMES[label] in ("letter A", "digit 7")


# ---------------------------------------------------------------------------------------------
# colours and backgrounds


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float64)


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _background(rng: np.random.Generator, res: int) -> np.ndarray:
    """Smooth background (res, res, 3) in [0, 1]: a linear two-colour gradient plus low-frequency texture."""
    c0 = _hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.7), rng.uniform(0.15, 0.95))
    c1 = np.clip(c0 + rng.normal(0, 0.18, 3), 0, 1)
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float64) / (res - 1) - 0.5
    t = np.clip(0.5 + (xx * math.cos(ang) + yy * math.sin(ang)), 0, 1)[..., None]
    bg = c0 * (1 - t) + c1 * t
    # low-frequency texture: a 4x4 grid of random values, bicubic-upsampled
    grid = rng.normal(0, 1, (4, 4, 3)).astype(np.float32)
    tex = np.stack(
        [np.asarray(Image.fromarray(grid[..., k], mode="F").resize((res, res), Image.BICUBIC)) for k in range(3)], -1
    )
    amp = rng.uniform(0.0, 0.06)
    return np.clip(bg + amp * tex, 0, 1)


def _foreground_colour(rng: np.random.Generator, bg_luma: float) -> np.ndarray:
    """A saturated-ish colour whose luma differs from the background's by at least 0.3."""
    for _ in range(64):
        col = _hsv_to_rgb(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.2, 1.0))
        if abs(_luma(col) - bg_luma) >= 0.3:
            return col
    return np.full(3, 1.0 if bg_luma < 0.5 else 0.0)


# ---------------------------------------------------------------------------------------------
# one image


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def render(seed: int, split: str, index: int, resolution: int = DEFAULT_RESOLUTION,
           num_classes: int = len(CLASS_NAMES), style: str = "filled") -> tuple[np.ndarray, int]:
    """Image ``index`` of ``split`` drawn in ``style`` (:data:`STYLES`): uint8 (resolution, resolution, 3) and its
    class label."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    label = int(index) % num_classes
    rng = _rng(seed, split, index)
    bg = _background(rng, resolution)
    variant = int(rng.integers(0, len(GLYPH_FONTS))) if _is_glyph(label) else 0
    base = canonical_mask(label, variant) if style == "filled" else outline_mask(label, variant)

    # random similarity transform of the canonical mask, applied at the supersampled size
    frac = rng.uniform(0.5, 0.82)  # side of the shape's box / image side
    theta = math.radians(rng.uniform(-30, 30))
    slack = (1 - frac) / 2 * 0.9
    cx, cy = (0.5 + rng.uniform(-slack, slack)) * _CANVAS, (0.5 + rng.uniform(-slack, slack)) * _CANVAS
    k = frac * _CANVAS / _BOX
    cos, sin = math.cos(theta) / k, math.sin(theta) / k
    # output (x, y) -> input: R(-theta)(p - c_out)/k + c_in
    a, b = cos, sin
    d, e = -sin, cos
    c_in = _CANVAS / 2
    coeffs = (a, b, c_in - a * cx - b * cy, d, e, c_in - d * cx - e * cy)
    mask = base.transform((_CANVAS, _CANVAS), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    mask = mask.resize((resolution, resolution), Image.BOX)
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255.0

    col = _foreground_colour(rng, _luma(bg.mean(axis=(0, 1))))
    # gentle linear shading across the shape
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float64) / (resolution - 1) - 0.5
    sang = rng.uniform(0, 2 * math.pi)
    shade = 1 + rng.uniform(0, 0.25) * (xx * math.cos(sang) + yy * math.sin(sang))
    fg = np.clip(col * shade[..., None], 0, 1)
    img = bg * (1 - alpha) + fg * alpha
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


def render_many(seed: int, split: str, start: int, count: int, resolution: int = DEFAULT_RESOLUTION,
                num_classes: int = len(CLASS_NAMES), style: str = "filled") -> tuple[np.ndarray, np.ndarray]:
    imgs = np.empty((count, resolution, resolution, 3), np.uint8)
    labels = np.empty((count,), np.int64)
    for i in range(count):
        imgs[i], labels[i] = render(seed, split, start + i, resolution, num_classes, style)
    return imgs, labels


def write_folder(folder: str, images_uint8: np.ndarray, labels: np.ndarray) -> None:
    """``<folder>/<i>.png`` with its class name in ``<folder>/<i>.txt`` (what training/train_lora.py reads)."""
    os.makedirs(folder, exist_ok=True)
    width = len(str(len(images_uint8) - 1))
    for i, (img, label) in enumerate(zip(images_uint8, labels)):
        Image.fromarray(img).save(os.path.join(folder, f"{i:0{width}d}.png"))
        with open(os.path.join(folder, f"{i:0{width}d}.txt"), "w", encoding="utf-8") as f:
            f.write(CLASS_NAMES[int(label)] + "\n")


def synthetic_arrays(seed: int, split: str, count: int, resolution: int = DEFAULT_RESOLUTION,
                     cache_dir: str | None = None, num_classes: int = len(CLASS_NAMES),
                     verbose: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images ``0..count-1`` of a split, cached as ``<cache_dir>/shapes_<...>.npz`` when ``cache_dir`` is given."""
    path = None
    if cache_dir:
        tag = f"{seed}_{split}_{count}_{resolution}_{num_classes}_{_code_version()}"
        path = os.path.join(cache_dir, f"shapes_{tag}.npz")
        if os.path.exists(path):
            with np.load(path) as z:
                return z["images"], z["labels"]
    imgs = np.empty((count, resolution, resolution, 3), np.uint8)
    labels = np.empty((count,), np.int64)
    step = max(1, count // 20)
    for i in range(0, count, step):
        n = min(step, count - i)
        imgs[i:i + n], labels[i:i + n] = render_many(seed, split, i, n, resolution, num_classes)
        if verbose and sys.stderr.isatty():
            print(f"\rrendering {split}: {i + n}/{count}", end="", file=sys.stderr, flush=True)
    if verbose:
        print(f"\rrendered {count} {split} images ({resolution} px, seed {seed})", file=sys.stderr, flush=True)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, images=imgs, labels=labels)
        os.replace(tmp, path)
    return imgs, labels


def _code_version() -> str:
    """Part of the cache key: bump ``DATA_VERSION`` whenever what :func:`render` draws changes."""
    return DATA_VERSION


# ---------------------------------------------------------------------------------------------
# torch datasets


def to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory uint8 images and labels; items are ``(float (3,H,W) in [-1,1], label)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]):
        assert images.ndim == 4 and images.shape[-1] == 3 and len(images) == len(labels)
        self.images, self.labels = images, np.asarray(labels, np.int64)
        self.class_names = tuple(class_names)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return to_tensor(self.images[i:i + 1])[0], int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All of it as ``(float (N,3,H,W) in [-1,1], int64 (N,))`` (small sets only)."""
        return to_tensor(self.images), torch.from_numpy(self.labels)


def synthetic_dataset(seed: int = 0, split: str = "train", count: int = 10000,
                      resolution: int = DEFAULT_RESOLUTION, cache_dir: str | None = None,
                      verbose: bool = False) -> ArrayDataset:
    imgs, labels = synthetic_arrays(seed, split, count, resolution, cache_dir, verbose=verbose)
    return ArrayDataset(imgs, labels, CLASS_NAMES)


def folder_arrays(root: str, resolution: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Load ``root/<class>/<image>`` into memory: centre-crop to a square, resize; class = sorted subfolder."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ValueError(f"'{root}' has no class subfolders; expected {root}/<class name>/<images>")
    imgs, labels = [], []
    for ci, name in enumerate(classes):
        folder = os.path.join(root, name)
        for fn in sorted(os.listdir(folder)):
            if not fn.lower().endswith(IMAGE_EXTS):
                continue
            with Image.open(os.path.join(folder, fn)) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                im = im.resize((resolution, resolution), Image.LANCZOS)
                imgs.append(np.asarray(im, np.uint8))
                labels.append(ci)
    if not imgs:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) under '{root}'")
    return np.stack(imgs), np.asarray(labels, np.int64), tuple(classes)


def folder_dataset(root: str, resolution: int = DEFAULT_RESOLUTION) -> ArrayDataset:
    imgs, labels, names = folder_arrays(root, resolution)
    return ArrayDataset(imgs, labels, names)


def captioned_folder(root: str, size_hw: tuple[int, int]) -> tuple[np.ndarray, list[str], list[str]]:
    """Every image under ``root`` (recursively, sorted by path) with its text: the side-car file of the same name
    (``cat.png`` + ``cat.txt``: a class name or a caption), else the name of its subfolder (``root/<class>/...``).
    Images are centre-cropped to the aspect of ``size_hw = (height, width)`` and resized to it. Returns
    ``(uint8 (N, H, W, 3), texts, paths relative to root)``."""
    if not os.path.isdir(root):
        raise SystemExit(f"--data {root}: no such folder")
    paths = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
                   if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))
    if not paths:
        raise SystemExit(f"--data {root}: no images ({', '.join(IMAGE_EXTS)}) in it or below it")
    h, w = size_hw
    imgs, texts = [], []
    for rel in paths:
        side_car = os.path.join(root, os.path.splitext(rel)[0] + ".txt")
        if os.path.isfile(side_car):
            with open(side_car, encoding="utf-8") as f:
                text = " ".join(f.read().split())
        else:
            text = os.path.dirname(rel).replace(os.sep, "/")
        if not text:
            raise SystemExit(f"{os.path.join(root, rel)} has no text: put its class name or caption into "
                             f"{side_car}, or the image into a folder named after its class")
        with Image.open(os.path.join(root, rel)) as im:
            im = im.convert("RGB")
            iw, ih = im.size
            scale = min(iw / w, ih / h)
            cw, ch = round(w * scale), round(h * scale)
            im = im.crop(((iw - cw) // 2, (ih - ch) // 2, (iw - cw) // 2 + cw, (ih - ch) // 2 + ch))
            imgs.append(np.asarray(im.resize((w, h), Image.LANCZOS), np.uint8))
        texts.append(text)
    return np.stack(imgs), texts, paths


def split_dataset(ds: ArrayDataset, heldout_fraction: float = 0.1, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Deterministic train/held-out split of a folder dataset (stratified by class)."""
    rng = np.random.default_rng(seed)
    train_idx, held_idx = [], []
    for c in np.unique(ds.labels):
        idx = np.flatnonzero(ds.labels == c)
        rng.shuffle(idx)
        n_held = round(len(idx) * heldout_fraction) if len(idx) > 1 else 0
        held_idx.extend(idx[:n_held])
        train_idx.extend(idx[n_held:])
    tr, he = np.sort(np.asarray(train_idx, int)), np.sort(np.asarray(held_idx, int))
    return (ArrayDataset(ds.images[tr], ds.labels[tr], ds.class_names),
            ArrayDataset(ds.images[he], ds.labels[he], ds.class_names))


def load_datasets(data: str = "synthetic", resolution: int = DEFAULT_RESOLUTION, seed: int = 0,
                  train_count: int = 20000, heldout_count: int = 2000, cache_dir: str | None = "data",
                  verbose: bool = True) -> tuple[ArrayDataset, ArrayDataset]:
    """``data="synthetic"`` or a folder path (class = subfolder) -> (train, held-out)."""
    if data == "synthetic":
        return (synthetic_dataset(seed, "train", train_count, resolution, cache_dir, verbose),
                synthetic_dataset(seed, "heldout", heldout_count, resolution, cache_dir, verbose))
    ds = folder_dataset(data, resolution)
    return split_dataset(ds, heldout_fraction=0.1, seed=seed)


def save_grid(images_uint8: np.ndarray, path: str, cols: int = 10) -> None:
    """Write a grid of uint8 (N, H, W, 3) images to ``path`` (PNG)."""
    n, h, w, _ = images_uint8.shape
    rows = (n + cols - 1) // cols
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = images_uint8[i]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)


if __name__ == "__main__":  # python3 -m training.data -> a preview grid, or a folder of images with class names
    import argparse

    ap = argparse.ArgumentParser(description="Preview the synthetic dataset, or write it as a folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="train", choices=tuple(SPLITS))
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    ap.add_argument("--style", default="filled", choices=STYLES)
    ap.add_argument("--out", default="runs/data_preview.png")
    ap.add_argument("--folder", default=None, help="write the images with side-car class names into this folder")
    args = ap.parse_args()
    imgs, labels = render_many(args.seed, args.split, 0, args.count, args.resolution, style=args.style)
    if args.folder:
        write_folder(args.folder, imgs, labels)
        print(f"wrote {args.count} images to {args.folder}")
    else:
        save_grid(imgs, args.out)
        print(f"wrote {args.out}")
