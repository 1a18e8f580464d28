"""The example workflows of ``workflows/``: their definitions, and the script that builds the shipped files.

Each example is defined here as an API-format prompt. ``build`` turns it into the UI-format workflow the real frontend
saves (``tests/harness/build_workflow.py``), records the pack version, a title and a description in the workflow's
``extra.nextscale`` (the template browser shows them, through ``web/js/nextscale.js``), runs it on a real ComfyUI and
writes the template thumbnail ``workflows/<name>.jpg`` from its first output image; a workflow that needs the user's
files (a Stable Diffusion checkpoint, Infinity's) gets a picture of its graph instead.

    .testbed/venv/bin/python tests/harness/examples.py                 # build every example
    .testbed/venv/bin/python tests/harness/examples.py nextscale_inpaint

``tests/e2e/test_examples.py`` checks that the shipped files still convert to exactly these prompts with the current
node schemas (so they never drift), carry the current pack version and have a thumbnail; ``tests/e2e/test_frontend.py``
and ``tests/e2e/test_server_api.py`` run every one of them.

Inputs a workflow loads from ComfyUI's ``input`` folder ship in ``workflows/input/``; the test bed copies them there.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.testbed import REPO_ROOT, WORKFLOWS_DIR

EMBEDDED = "nextscale-embedded"
EMBEDDED_T2I = "nextscale-embedded-t2i"
CLASSES = "circle, square, triangle, star, heart, cross, crescent, arrow, letter A, digit 7"
EXAMPLE_IMAGE = "nextscale_example.png"
INPUT_DIR = WORKFLOWS_DIR / "input"
SD_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
INFINITY_MODEL, INFINITY_TOKENIZER, FLAN_T5 = "infinity_2b_reg.pth", "infinity_vae_d32reg.pth", "flan-t5-xl"
SWITTI_MODEL, SWITTI_VQVAE = "Switti-1024", "VQVAE-Switti"
DD_MODEL, VAR_VQVAE = "dd-var-d16.pth", "vae_ch160v4096z32.pth"
HMAR_MODEL = "hmar-d16.pth"
FLEXVAR_MODEL, FLEXVAE = "FlexVARd24-epo349.pth", "FlexVAE.pth"
CLIP_L, CLIP_G = "clip_l.safetensors", "clip_g.safetensors"
NSARM_MODEL, NSARM_TOKENIZER = "NSARM.pth", "infinity_vae_d56_f8_14_patchify.pth"
NSARM_FILES = (
    f"Needs your own files: {NSARM_MODEL} (joined from its parts, linked from github.com/Xiangtaokong/NSARM) and "
    f"{NSARM_TOKENIZER} (Hugging Face FoundationVision/Infinity) in models/nextscale; see docs/upscale.md."
)


def pack_version() -> str:
    import tomllib

    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


@dataclass
class Example:
    name: str
    title: str
    description: str
    prompt: dict
    # Node types whose inputs need files the user brings (e.g. a Stable Diffusion checkpoint): the workflow is
    # validated up to those choices instead of run.
    needs_user_files: list[str] = field(default_factory=list)
    # Nodes whose seed is saved "fixed" (the rest "randomize"): those making the reference picture an edit starts
    # from, a calibration, or a report measured against a reference, which must not change (or rerun) on every queue.
    fixed_seeds: list[str] = field(default_factory=list)


class Graph:
    """A tiny builder of API-format prompts: ``g.add(type, **inputs)`` returns the node id; ``g.out(id, i)`` a link."""

    def __init__(self):
        self.prompt: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self.prompt) + 1)
        self.prompt[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    @staticmethod
    def out(node_id: str, index: int = 0) -> list:
        return [node_id, index]


def _models(g: Graph) -> tuple[list, list]:
    tok = g.add("NextScaleLoadTokenizer", tokenizer_name=EMBEDDED, dtype="auto")
    gen = g.add("NextScaleLoadGenerator", generator_name=EMBEDDED, dtype="auto")
    return g.out(tok), g.out(gen)


def _sampler(g: Graph, tok, gen, class_name: str, seed: int, batch_size: int = 1, class_list: str = "", **extra):
    return g.out(
        g.add(
            "NextScaleSampler", generator=gen, tokenizer=tok, class_name=class_name, seed=seed, cfg=4.0, top_k=900,
            top_p=0.95, more_smooth=False, batch_size=batch_size, class_list=class_list, **extra,
        )
    )


def _save(g: Graph, image, prefix: str, scale: float = 4.0) -> None:
    """Save ``image`` nearest-upscaled (64 px samples are small on screen)."""
    big = g.add("ImageScaleBy", image=image, upscale_method="nearest-exact", scale_by=scale)
    g.add("SaveImage", images=g.out(big), filename_prefix=f"NextScale/{prefix}")


def _side_by_side(g: Graph, *images, columns: int = 0) -> list:
    """Images of one size as a sheet (``columns`` 0: one row): a core Image Batch chain into NextScale Image Grid."""
    batch = images[0]
    for image in images[1:]:
        batch = g.out(g.add("ImageBatch", image1=batch, image2=image))
    return g.out(g.add("NextScaleImageGrid", images=batch, columns=columns, padding=2, pad_value=1.0))


def _two_rows(g: Graph, tok, first, second, prefix: str) -> None:
    """Save the images of two sampler runs of four pictures each, decoded, as a sheet: ``first`` above ``second``."""
    images = [g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=t, scales=0)) for t in (first, second)]
    both = g.out(g.add("ImageBatch", image1=images[0], image2=images[1]))
    _save(g, g.out(g.add("NextScaleImageGrid", images=both, columns=4, padding=2, pad_value=1.0)), prefix)


def _inpainted(g: Graph, tok, reference, mask, source, sample: Callable[[list], list], prefix: str) -> None:
    """The tail every inpainting example shares: Inpaint Guide of ``reference`` (tokens) and ``mask`` (1 = redraw),
    ``sample(guide)`` for the tokens, Decode composited onto ``source`` under the mask, saved beside ``source``."""
    guide = g.add("NextScaleInpaintGuide", tokens=reference, mask=mask, invert=False, mode="tokens", start_scale=0,
                  end_scale=0)
    tokens = sample(g.out(guide))
    result = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=tokens, scales=0, composite_image=source,
                         composite_mask=mask))
    _save(g, _side_by_side(g, source, result), prefix)


def _rect_mask(g: Graph, x: int, y: int, w: int, h: int, size: int = 64) -> list:
    """A MASK that is 1 inside the rectangle: core Solid Mask + Mask Composite."""
    canvas = g.add("SolidMask", value=0.0, width=size, height=size)
    box = g.add("SolidMask", value=1.0, width=w, height=h)
    return g.out(g.add("MaskComposite", destination=g.out(canvas), source=g.out(box), x=x, y=y, operation="add"))


def generate() -> Example:
    g = Graph()
    tok, gen = _models(g)
    tokens = _sampler(g, tok, gen, "circle", seed=0, batch_size=4, class_list=CLASSES)
    image = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=tokens, scales=0))
    sheet = g.out(g.add("NextScaleImageGrid", images=image, columns=4, padding=2, pad_value=1.0))
    _save(g, sheet, "generate", scale=2.0)
    return Example(
        "nextscale_generate", "NextScale: class-conditional generation",
        "Four samples of each of the embedded model's ten classes (one row per class), as one sheet.", g.prompt,
    )


def per_scale() -> Example:
    g = Graph()
    tok, gen = _models(g)
    tokens = _sampler(g, tok, gen, "star", seed=3, batch_size=2)
    stages = g.add("NextScaleDecodeScales", tokenizer=tok, tokens=tokens)
    grid = g.add("NextScaleImageGrid", images=g.out(stages, 0), columns=g.out(stages, 1), padding=2, pad_value=1.0)
    _save(g, g.out(grid), "per_scale")
    return Example(
        "nextscale_per_scale", "NextScale: per-scale inspection",
        "How two images form coarse to fine: each row shows one image after scale 1, 2, ... to the last.", g.prompt,
    )


def inpaint() -> Example:
    g = Graph()
    tok, gen = _models(g)
    source_tokens = _sampler(g, tok, gen, "heart", seed=5)
    source = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=source_tokens, scales=0))
    mask = _rect_mask(g, 32, 0, 32, 64)
    _inpainted(g, tok, source_tokens, mask, source,
               lambda guide: _sampler(g, tok, gen, "heart", seed=6, batch_size=3, guide=guide), "inpaint")
    return Example(
        "nextscale_inpaint", "NextScale: inpaint",
        "Regenerates the right half of a heart three times; the left half is kept (token forcing at every scale, "
        "pixel composite on decode). First image: the source.", g.prompt, fixed_seeds=[source_tokens[0]]
    )


def outpaint() -> Example:
    g = Graph()
    tok, gen = _models(g)
    source_tokens = _sampler(g, tok, gen, "arrow", seed=2)
    source = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=source_tokens, scales=0))
    shrunk = g.out(g.add("ImageScale", image=source, upscale_method="area", width=32, height=32, crop="disabled"))
    # the frontend rounds these widgets to multiples of 8
    padded = g.add("ImagePadForOutpaint", image=shrunk, left=16, top=16, right=16, bottom=16, feathering=0)
    encoded = g.add("NextScaleEncode", tokenizer=tok, image=g.out(padded, 0), resize="stretch", schedule="")
    _inpainted(g, tok, g.out(encoded), g.out(padded, 1), g.out(padded, 0),
               lambda guide: _sampler(g, tok, gen, "arrow", seed=9, batch_size=3, guide=guide), "outpaint")
    return Example(
        "nextscale_outpaint", "NextScale: outpaint",
        "Shrinks an image, pads it with core Pad Image for Outpainting and lets the model fill the border "
        "(three seeds). First image: the padded input.", g.prompt, fixed_seeds=[source_tokens[0]]
    )


def class_edit() -> Example:
    g = Graph()
    tok, gen = _models(g)
    source_tokens = _sampler(g, tok, gen, "square", seed=4)
    source = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=source_tokens, scales=0))
    mask = _rect_mask(g, 8, 8, 48, 48)
    _inpainted(g, tok, source_tokens, mask, source, lambda guide: _sampler(
        g, tok, gen, "square", seed=7, batch_size=1, class_list="circle, star, heart", guide=guide), "class_edit")
    return Example(
        "nextscale_class_edit", "NextScale: class edit",
        "Keeps the border of a square's image and regenerates its middle as a circle, a star and a heart "
        "(inpainting with another class label). First image: the source.", g.prompt, fixed_seeds=[source_tokens[0]]
    )


def img2img() -> Example:
    g = Graph()
    tok, gen = _models(g)
    source_tokens = _sampler(g, tok, gen, "crescent", seed=8)
    source = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=source_tokens, scales=0))
    guide = g.add("NextScaleImageToImageGuide", tokens=source_tokens, strength=3)
    tokens = _sampler(g, tok, gen, "crescent", seed=20, batch_size=3, guide=g.out(guide))
    result = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=tokens, scales=0))
    _save(g, _side_by_side(g, source, result), "img2img")
    return Example(
        "nextscale_img2img", "NextScale: image to image",
        "Variations that keep the first three scales (layout and colours) of a source image and sample the rest. "
        "First image: the source.", g.prompt, fixed_seeds=[source_tokens[0]]
    )


def image_inpaint() -> Example:
    g = Graph()
    tok, gen = _models(g)
    loaded = g.add("LoadImage", image=EXAMPLE_IMAGE)
    encoded = g.add("NextScaleEncode", tokenizer=tok, image=g.out(loaded, 0), resize="center crop", schedule="")
    _inpainted(g, tok, g.out(encoded), g.out(loaded, 1), g.out(loaded, 0),
               lambda guide: _sampler(g, tok, gen, "star", seed=11, batch_size=3, guide=guide), "image_inpaint")
    return Example(
        "nextscale_image_inpaint", "NextScale: inpaint an image from any source",
        f"Loads an image whose transparent area is the mask (here {EXAMPLE_IMAGE} from workflows/input; any image "
        "works, e.g. one from a diffusion workflow, with a mask painted in the mask editor) and inpaints it.",
        g.prompt,
    )


def sd_refine() -> Example:
    g = Graph()
    tok, gen = _models(g)
    tokens = _sampler(g, tok, gen, "heart", seed=1)
    image = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=tokens, scales=0))
    up = g.add("ImageScale", image=image, upscale_method="bicubic", width=512, height=512, crop="disabled")
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD_CHECKPOINT)
    pos = g.add("CLIPTextEncode", text="a glossy red heart sticker, studio light, detailed", clip=g.out(ckpt, 1))
    neg = g.add("CLIPTextEncode", text="blurry, low quality", clip=g.out(ckpt, 1))
    latent = g.add("VAEEncode", pixels=g.out(up), vae=g.out(ckpt, 2))
    refined = g.add(
        "KSampler", model=g.out(ckpt, 0), seed=0, steps=20, cfg=6.0, sampler_name="euler", scheduler="normal",
        positive=g.out(pos), negative=g.out(neg), latent_image=g.out(latent), denoise=0.3,
    )
    decoded = g.add("VAEDecode", samples=g.out(refined), vae=g.out(ckpt, 2))
    g.add("SaveImage", images=g.out(decoded), filename_prefix="NextScale/sd_refine")
    return Example(
        "nextscale_sd_refine", "NextScale: refine with Stable Diffusion",
        f"A NextScale image upscaled to 512 px and refined by a diffusion model at low denoise (0.3). Needs your own "
        f"SD 1.5 checkpoint in models/checkpoints (the workflow names {SD_CHECKPOINT}).",
        g.prompt, needs_user_files=["CheckpointLoaderSimple"],
    )


def infinity_t2i() -> Example:
    g = Graph()
    loader = g.add("NextScaleLoadInfinity", model_name=INFINITY_MODEL, tokenizer_name=INFINITY_TOKENIZER, dtype="auto")
    prompt = g.add("NextScaleTextEncodeT5", text_encoder=FLAN_T5, text="a watercolor painting of a lighthouse on a "
                   "cliff at dawn, soft light")
    tokens = g.add(
        "NextScaleTextSampler", model=g.out(loader, 0), tokenizer=g.out(loader, 1), positive=g.out(prompt), seed=0,
        cfg=3.0, tau=0.5, top_k=900, top_p=0.97, aspect_ratio="1:1", resolution="1M", batch_size=1, keep_scales=0,
    )
    image = g.add("NextScaleDecode", tokenizer=g.out(loader, 1), tokens=g.out(tokens), scales=0)
    g.add("SaveImage", images=g.out(image), filename_prefix="NextScale/infinity")
    return Example(
        "nextscale_infinity_t2i", "NextScale: Infinity text to image",
        f"Infinity-2B from a text prompt at 1024 px (13 scales). Needs your own files: {INFINITY_MODEL} and "
        f"{INFINITY_TOKENIZER} in models/nextscale and flan-t5-xl in models/text_encoders (Hugging Face "
        "FoundationVision/Infinity and google/flan-t5-xl). Connect a second NextScale Text Encode (T5) to 'negative' "
        "for a negative prompt.",
        g.prompt, needs_user_files=["NextScaleLoadInfinity", "NextScaleTextEncodeT5"],
    )


def _t2i_models(g: Graph) -> tuple[list, list]:
    """The embedded text-to-image model: ``(model, tokenizer)`` of NextScale Load Infinity."""
    loader = g.add("NextScaleLoadInfinity", model_name=EMBEDDED_T2I, tokenizer_name=EMBEDDED_T2I, dtype="auto")
    return g.out(loader, 0), g.out(loader, 1)


def _t2i_sample(g: Graph, model, tok, text: str, seed: int, batch_size: int = 1, **extra) -> list:
    """Tokens of the embedded text-to-image model for ``text`` at its recommended settings (docs/text-to-image.md):
    64 px (0.06M, 1:1), cfg 3, tau 1."""
    prompt = g.add("NextScaleTextEncodeT5", text_encoder=EMBEDDED_T2I, text=text)
    return g.out(g.add(
        "NextScaleTextSampler", model=model, tokenizer=tok, positive=g.out(prompt), seed=seed, cfg=3.0, tau=1.0,
        top_k=900, top_p=0.97, aspect_ratio="1:1", resolution="0.06M", batch_size=batch_size, **extra,
    ))


def t2i() -> Example:
    g = Graph()
    model, tok = _t2i_models(g)
    prompts = ("red star", "yellow car", "black cat", "blue fish")
    images = [g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=_t2i_sample(g, model, tok, text, seed=i),
                          scales=0)) for i, text in enumerate(prompts)]
    _save(g, _side_by_side(g, *images, columns=2), "t2i")
    return Example(
        "nextscale_t2i", "NextScale: text to image with the embedded model",
        f"Four prompts ({', '.join(prompts)}), one 64 px drawing each, as a 2 x 2 sheet: the pack's own small "
        "text-to-image model (nextscale-embedded-t2i) with its T5 encoder, at its recommended settings (resolution "
        "0.06M, cfg 3, tau 1).", g.prompt,
    )


def t2i_inpaint() -> Example:
    g = Graph()
    model, tok = _t2i_models(g)
    source_tokens = _t2i_sample(g, model, tok, "red apple, emoji", seed=5)
    source = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=source_tokens, scales=0))
    mask = _rect_mask(g, 32, 0, 32, 64)
    encoded = g.add("NextScaleEncode", tokenizer=tok, image=source, resize="center crop", schedule="0.06M")
    _inpainted(g, tok, g.out(encoded), mask, source, lambda guide: _t2i_sample(
        g, model, tok, "green apple, emoji", seed=6, batch_size=3, guide=guide), "t2i_inpaint")
    return Example(
        "nextscale_t2i_inpaint", "NextScale: inpaint with a prompt",
        "Redraws the right half of a drawing from a new prompt, three times: NextScale Encode turns the source (here "
        "a red apple the model drew; any image works, with a mask from the mask editor) into bits on the 0.06M "
        "schedule, Inpaint Guide keeps them outside the mask at every scale, the Text Sampler draws the masked half "
        "from 'green apple, emoji' to fit, and Decode pastes it into the source. First image: the source.",
        g.prompt, fixed_seeds=[source_tokens[0]],
    )


def t2i_kv() -> Example:
    g = Graph()
    model, tok = _t2i_models(g)
    calib_prompt = g.add("NextScaleTextEncodeT5", text_encoder=EMBEDDED_T2I, text="green tree")
    calib = g.add("NextScaleKVCalibrateText", model=model, tokenizer=tok, positive=g.out(calib_prompt), samples=2,
                  seed=0, cfg=3.0, tau=1.0, aspect_ratio="1:1", resolution="0.06M",
                  filename="nextscale_kv_profile_t2i")
    policy = g.add("NextScaleKVPolicy", policy="scalekv", budget=0.25, profile=g.out(calib, 0), profile_file="",
                   drafters=1, decay=0.4, contextual_fraction=0.5, contextual_ratio=0.25)
    full = _t2i_sample(g, model, tok, "yellow car", seed=3, batch_size=4)
    compressed = _t2i_sample(g, model, tok, "yellow car", seed=3, batch_size=4, kv_policy=g.out(policy))
    _two_rows(g, tok, full, compressed, "t2i_kv")
    prompt = g.prompt[full[0]]["inputs"]["positive"]
    report = g.add("NextScaleKVReportText", model=model, tokenizer=tok, kv_policy=g.out(policy), positive=prompt,
                   seed=3, cfg=3.0, tau=1.0, aspect_ratio="1:1", resolution="0.06M", batch_size=4)
    g.add("PreviewImage", images=g.out(report, 1))
    return Example(
        "nextscale_t2i_kv", "NextScale: KV-cache compression for text to image",
        "Calibrates ScaleKV on the embedded text-to-image model (NextScale KV Calibrate (Text): two drawings of "
        "another prompt at the sampler's resolution and aspect ratio), then draws 'yellow car' four times with the "
        "full KV cache (top row) and with a quarter of it (bottom row), same seeds. NextScale KV Report (Text) shows "
        "the memory kept and the fidelity on its node.", g.prompt,
        fixed_seeds=[calib, full[0], compressed[0], report],
    )


def t2i_upscale() -> Example:
    g = Graph()
    model, tok = _t2i_models(g)
    tokens = _t2i_sample(g, model, tok, "purple butterfly", seed=2)
    image = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=tokens, scales=0))
    g.add("SaveImage", images=_upscale(g, image), filename_prefix="NextScale/t2i_upscale")
    return Example(
        "nextscale_t2i_upscale", "NextScale: text to image, then upscale with NSARM",
        f"A 64 px drawing of the embedded text-to-image model upscaled 4x by NextScale Upscale. {NSARM_FILES}",
        g.prompt, needs_user_files=["NextScaleLoadNSARM"],
    )


def switti_t2i() -> Example:
    g = Graph()
    loader = g.add("NextScaleLoadSwitti", model_name=SWITTI_MODEL, vqvae_name=SWITTI_VQVAE, dtype="auto")
    clip = g.add("DualCLIPLoader", clip_name1=CLIP_L, clip_name2=CLIP_G, type="sdxl", device="default")
    positive = g.add("NextScaleSwittiTextEncode", clip=g.out(clip), text="a cloud dragon flying over snowy "
                     "mountains, its body swirling with the wind, golden hour")
    negative = g.add("NextScaleSwittiTextEncode", clip=g.out(clip), text="")
    tokens = g.add(
        "NextScaleSwittiSampler", model=g.out(loader, 0), vqvae=g.out(loader, 1), positive=g.out(positive),
        negative=g.out(negative), seed=59, cfg=6.0, top_k=400, top_p=0.95, more_smooth=True, batch_size=1,
        smooth_start_scale=2, cfg_start_scale=0, cfg_stop_scale=11, temperature=0.1, resolution="model's own",
    )
    image = g.add("NextScaleDecode", tokenizer=g.out(loader, 1), tokens=g.out(tokens), scales=0)
    g.add("SaveImage", images=g.out(image), filename_prefix="NextScale/switti")
    return Example(
        "nextscale_switti_t2i", "NextScale: Switti text to image",
        f"Switti-1024 from a text prompt at 1024 px (14 scales) with the settings of Switti's README. Needs your own "
        f"files: the Hugging Face folders {SWITTI_MODEL} and {SWITTI_VQVAE} (yresearch/Switti-1024 and "
        f"yresearch/VQVAE-Switti) in models/nextscale, and SDXL's {CLIP_L} and {CLIP_G} in models/text_encoders.",
        g.prompt, needs_user_files=["NextScaleLoadSwitti", "DualCLIPLoader"],
    )


def _upscale(g: Graph, image) -> list:
    loader = g.add("NextScaleLoadNSARM", model_name=NSARM_MODEL, tokenizer_name=NSARM_TOKENIZER, dtype="auto")
    return g.out(g.add(
        "NextScaleUpscale", model=g.out(loader, 0), tokenizer=g.out(loader, 1), image=image, seed=1, scale_by=4.0,
        cfg=1.0, tau=0.5, input_scales=7, tiling="tiles", tile_overlap=0.125, blend="seamless",
        color_fix="adain + wavelet",
    ))


def upscale() -> Example:
    g = Graph()
    tok, gen = _models(g)
    tokens = _sampler(g, tok, gen, "heart", seed=1)
    image = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=tokens, scales=0))
    g.add("SaveImage", images=_upscale(g, image), filename_prefix="NextScale/upscale")
    return Example(
        "nextscale_upscale", "NextScale: upscale with NSARM",
        f"An image of the embedded generator upscaled 4x by NextScale Upscale (NSARM: the first scales mapped from "
        f"the image, the finer ones predicted). {NSARM_FILES}",
        g.prompt, needs_user_files=["NextScaleLoadNSARM"],
    )


def sd_upscale() -> Example:
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD_CHECKPOINT)
    text = "a cosy reading corner by a window, afternoon light, detailed"
    pos = g.add("CLIPTextEncode", text=text, clip=g.out(ckpt, 1))
    neg = g.add("CLIPTextEncode", text="blurry, low quality", clip=g.out(ckpt, 1))
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    sampled = g.add(
        "KSampler", model=g.out(ckpt, 0), seed=0, steps=20, cfg=7.0, sampler_name="euler", scheduler="normal",
        positive=g.out(pos), negative=g.out(neg), latent_image=g.out(latent), denoise=1.0,
    )
    decoded = g.add("VAEDecode", samples=g.out(sampled), vae=g.out(ckpt, 2))
    g.add("SaveImage", images=_upscale(g, g.out(decoded)), filename_prefix="NextScale/sd_upscale")
    return Example(
        "nextscale_sd_upscale", "NextScale: upscale a Stable Diffusion image with NSARM",
        f"A 512 px SD 1.5 image upscaled 4x to 2048 px by NextScale Upscale in overlapping tiles blended without "
        f"seams. Needs your own SD 1.5 checkpoint in models/checkpoints (the workflow names {SD_CHECKPOINT}). "
        f"{NSARM_FILES}",
        g.prompt, needs_user_files=["CheckpointLoaderSimple", "NextScaleLoadNSARM"],
    )


def distilled_decoding() -> Example:
    g = Graph()
    loader = g.add("NextScaleLoadDD", model_name=DD_MODEL, vqvae_name=VAR_VQVAE, dtype="auto")
    tokens = g.add("NextScaleDDSampler", model=g.out(loader, 0), vqvae=g.out(loader, 1), class_name="golden retriever",
                   seed=7, steps=2, refine_from_scale=0, batch_size=4, class_list="")
    image = g.add("NextScaleDecode", tokenizer=g.out(loader, 1), tokens=g.out(tokens), scales=0)
    grid = g.add("NextScaleImageGrid", images=g.out(image), columns=4, padding=2, pad_value=1.0)
    g.add("SaveImage", images=g.out(grid), filename_prefix="NextScale/distilled_decoding")
    return Example(
        "nextscale_distilled_decoding", "NextScale: Distilled Decoding, VAR in two steps",
        f"Four ImageNet pictures from VAR-d16 distilled to two transformer passes (Distilled Decoding). Needs your own "
        f"files in models/nextscale: {DD_MODEL} (VAR-DD/var-d16.pth of microsoft/distilled_decoding, renamed) and "
        f"{VAR_VQVAE} (FoundationVision/var).",
        g.prompt, needs_user_files=["NextScaleLoadDD"],
    )


def hmar() -> Example:
    g = Graph()
    loader = g.add("NextScaleLoadHMAR", model_name=HMAR_MODEL, vqvae_name=VAR_VQVAE, dtype="auto")
    tokens = g.add("NextScaleHMARSampler", model=g.out(loader, 0), vqvae=g.out(loader, 1),
                   class_name="golden retriever", seed=7, cfg=1.7, top_k=1000, top_p=0.99,
                   refinement="1 | 1,3 | 1,1,2,5", batch_size=4, class_list="")
    image = g.add("NextScaleDecode", tokenizer=g.out(loader, 1), tokens=g.out(tokens), scales=0)
    grid = g.add("NextScaleImageGrid", images=g.out(image), columns=4, padding=2, pad_value=1.0)
    g.add("SaveImage", images=g.out(grid), filename_prefix="NextScale/hmar")
    return Example(
        "nextscale_hmar", "NextScale: HMAR, Markovian VAR with masked refinement",
        f"Four ImageNet pictures from HMAR-d16: each scale drawn from the previous ones' picture alone, then its least "
        f"confident tokens redrawn (HMAR's refinement schedule). Needs your own files in models/nextscale: "
        f"{HMAR_MODEL} (Hugging Face nvidia/HMAR; NVIDIA's non-commercial licence) and {VAR_VQVAE} "
        f"(FoundationVision/var).",
        g.prompt, needs_user_files=["NextScaleLoadHMAR"],
    )


def flexvar() -> Example:
    g = Graph()
    loader = g.add("NextScaleLoadFlexVAR", model_name=FLEXVAR_MODEL, vae_name=FLEXVAE, dtype="auto")
    tokens = g.add("NextScaleFlexVARSampler", model=g.out(loader, 0), vae=g.out(loader, 1),
                   class_name="golden retriever", seed=11, resolution=256, steps=13, cfg=2.5, top_k=900, top_p=0.95,
                   batch_size=4, schedule="", cfg_schedule="linear", max_pn=16, class_list="")
    image = g.add("NextScaleDecode", tokenizer=g.out(loader, 1), tokens=g.out(tokens), scales=0)
    grid = g.add("NextScaleImageGrid", images=g.out(image), columns=4, padding=2, pad_value=1.0)
    g.add("SaveImage", images=g.out(grid), filename_prefix="NextScale/flexvar")
    return Example(
        "nextscale_flexvar", "NextScale: FlexVAR in 13 steps",
        f"Four ImageNet pictures from FlexVAR-d24 at 256 px in 13 steps (change the resolution and steps: 512 px "
        f"works zero-shot; NextScale FlexVAR Schedule shows the sides a choice implies). Needs your own files in "
        f"models/nextscale: "
        f"{FLEXVAR_MODEL} and {FLEXVAE} (jiaosiyu1999/FlexVAR on Hugging Face).",
        g.prompt, needs_user_files=["NextScaleLoadFlexVAR"],
    )


def control() -> Example:
    g = Graph()
    tok, gen = _models(g)
    source_tokens = _sampler(g, tok, gen, "star", seed=30)
    source = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=source_tokens, scales=0))
    edges = g.out(g.add("NextScaleEdgePreprocessor", image=source, low_threshold=0.1, high_threshold=0.2, blur=1.0))
    model = g.add("NextScaleLoadControl", control_name="nextscale-embedded-edges", dtype="auto")
    applied = g.add("NextScaleApplyControl", control_model=g.out(model), image=edges, strength=1.0, start_scale=0,
                    end_scale=0, late_temperature=1.0)
    tokens = _sampler(g, tok, gen, "star", seed=31, batch_size=3, control=g.out(applied))
    result = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=tokens, scales=0))
    _save(g, _side_by_side(g, source, edges, result), "control")
    return Example(
        "nextscale_control", "NextScale: control with an edge map",
        "Edges of a source image (NextScale Edge Preprocessor; any edge image works) steer three new samples through "
        "the embedded edge adapter. First the source, then its edges.", g.prompt, fixed_seeds=[source_tokens[0]]
    )


def kv_policy() -> Example:
    g = Graph()
    tok, gen = _models(g)
    calib = g.add("NextScaleKVCalibrate", generator=gen, tokenizer=tok, samples=4, seed=0, cfg=4.0, class_list="",
                  filename="nextscale_kv_profile")
    policy = g.add("NextScaleKVPolicy", policy="scalekv", budget=0.25, profile=g.out(calib, 0), profile_file="",
                   drafters=1, decay=0.4, contextual_fraction=0.5, contextual_ratio=0.25)
    report = g.add("NextScaleKVReport", generator=gen, tokenizer=tok, kv_policy=g.out(policy), class_name="star",
                   seed=12, cfg=4.0, batch_size=1)
    g.add("PreviewImage", images=g.out(report, 1))
    tokens = _sampler(g, tok, gen, "star", seed=12, batch_size=4, kv_policy=g.out(policy))
    image = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=tokens, scales=0))
    _save(g, g.out(g.add("NextScaleImageGrid", images=image, columns=4, padding=2, pad_value=1.0)), "kv_policy")
    return Example(
        "nextscale_kv_policy", "NextScale: KV-cache compression with its report",
        "Calibrates a ScaleKV profile on four samples, samples with a quarter of the KV cache, and reports the memory "
        "kept and the fidelity against the full cache: the report's text on its node, full | compressed side by side "
        "in the Preview Image beside it.", g.prompt,
        fixed_seeds=[calib, report],
    )


def collaborative() -> Example:
    g = Graph()
    tok, gen = _models(g)
    tokens = g.out(
        g.add(
            "NextScaleCollaborativeSampler", drafter=gen, refiner=gen, tokenizer=tok, draft_scales=4,
            class_name="heart", seed=0, cfg=4.0, top_k=900, top_p=0.95, more_smooth=False, batch_size=4,
            class_list="heart, cross",
        )
    )
    image = g.out(g.add("NextScaleDecode", tokenizer=tok, tokens=tokens, scales=0))
    _save(g, g.out(g.add("NextScaleImageGrid", images=image, columns=4, padding=2, pad_value=1.0)), "collaborative")
    return Example(
        "nextscale_collaborative", "NextScale: collaborative decoding (CoDe)",
        "A drafter generates the first scales, a refiner the rest. Wired here with the embedded generator in both "
        "places (which gives exactly the plain sampler's images); load var_d30.pth as drafter and var_d16.pth as "
        "refiner (draft_scales 8) for CoDe's speed-up.", g.prompt,
    )


def lora() -> Example:
    g = Graph()
    tok, gen = _models(g)
    shapes = "circle, square, triangle, crescent"
    plain = _sampler(g, tok, gen, "circle", seed=40, class_list=shapes)
    styled_gen = g.out(g.add("NextScaleLoadLoRA", model=gen, lora_name="nextscale-embedded-outline", strength=1.0))
    styled = _sampler(g, tok, styled_gen, "circle", seed=40, class_list=shapes)
    _two_rows(g, tok, plain, styled, "lora")
    return Example(
        "nextscale_lora", "NextScale: a LoRA on the embedded generator",
        "The same seeds without and with the pack's example LoRA (outlines instead of filled shapes, trained with "
        "python -m training.train_lora): the first row plain, the second with the LoRA at strength 1.", g.prompt,
    )


def acceleration() -> Example:
    g = Graph()
    tok, gen = _models(g)
    shapes = "star, heart, arrow, crescent"
    accel = g.add("NextScaleAcceleration", prune_scales=0, keep_ratio=0.5, prune_from_layer=3, restore="cached",
                  unguided_scales=2, shortcut_scales=0)
    plain = _sampler(g, tok, gen, "star", seed=21, class_list=shapes)
    fast = _sampler(g, tok, gen, "star", seed=21, class_list=shapes, accel=g.out(accel))
    _two_rows(g, tok, plain, fast, "accel")
    return Example(
        "nextscale_accel", "NextScale: training-free acceleration",
        "The same seeds without and with NextScale Acceleration at its recommended setting (the last two scales "
        "sampled without guidance, which halves their work): the first row plain, the second accelerated. The "
        "coarse scales are the same, the last two may differ in detail. docs/performance.md has the speed and cost "
        "of every setting.", g.prompt,
    )


EXAMPLES = {e.name: e for e in (generate(), per_scale(), inpaint(), outpaint(), class_edit(), img2img(),
                                 image_inpaint(), control(), kv_policy(), collaborative(), sd_refine(),
                                 infinity_t2i(), lora(), switti_t2i(), upscale(), sd_upscale(),
                                 distilled_decoding(), hmar(), flexvar(), acceleration(), t2i(), t2i_inpaint(),
                                 t2i_upscale(), t2i_kv())}


def example_image_bytes() -> bytes:
    """``workflows/input/nextscale_example.png``: a held-out image of the embedded model's data (a star) whose
    right third is transparent (LoadImage's MASK = 1 there)."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO_ROOT))
    from training import data

    index = next(i for i in range(100) if data.render(0, "heldout", i)[1] == data.CLASS_NAMES.index("star"))
    rgb, _ = data.render(0, "heldout", index)
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, 40:] = 0
    buf = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def thumbnail_bytes(png: Path | bytes, side: int = 256) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def annotate(workflow: dict, example: Example) -> dict:
    meta = {"pack": "comfyui-nextscale", "version": pack_version(), "title": example.title,
            "description": example.description}
    if example.needs_user_files:
        meta["needs_user_files"] = example.needs_user_files
    workflow.setdefault("extra", {})["nextscale"] = meta
    return fix_seeds(workflow, example)


def fix_seeds(workflow: dict, example: Example) -> dict:
    """Save the seeds of ``example.fixed_seeds`` as "fixed": the control value after the seed widget, which the
    frontend sets to "randomize" when it loads a prompt."""
    for node in workflow["nodes"]:
        if str(node["id"]) in example.fixed_seeds:
            values = node["widgets_values"]
            values[values.index("randomize")] = "fixed"
    return workflow


def build(names: list[str]) -> int:
    from harness.build_workflow import build as build_ui
    from harness.comfy_server import ComfyServer
    from harness.screenshot import graph_picture
    from harness.testbed import find_testbed
    from harness.workflow_api import ui_to_api

    testbed, why = find_testbed()
    if testbed is None:
        raise SystemExit(why)
    INPUT_DIR.mkdir(parents=True, exist_ok=True)
    (INPUT_DIR / EXAMPLE_IMAGE).write_bytes(example_image_bytes())
    with tempfile.TemporaryDirectory() as base:
        server = ComfyServer(testbed, Path(base))
        server.start()
        try:
            for name in names:
                example = EXAMPLES[name]
                workflow = annotate(build_ui(example.prompt, server), example)
                path = WORKFLOWS_DIR / f"{name}.json"
                if path.is_file():  # a rebuild keeps the workflow's id, so that only real changes show in a diff
                    workflow["id"] = json.loads(path.read_text()).get("id") or workflow["id"]
                path.write_text(json.dumps(workflow, indent=1) + "\n")
                print(f"[examples] wrote {path}")
                if example.needs_user_files:
                    picture = graph_picture(server, workflow)
                    (WORKFLOWS_DIR / f"{name}.jpg").write_bytes(thumbnail_bytes(picture, side=512))
                    print(f"[examples] pictured the graph of {name}; thumbnail {name}.jpg")
                    continue
                entry = server.run_prompt(ui_to_api(workflow, server.object_info()), timeout=900)
                if server.status_of(entry) != "success":
                    raise SystemExit(f"{name} failed: {json.dumps(server.error_messages(entry), indent=1)}")
                # the first saved image (Preview Image writes to the temp folder)
                image = next(p for p in server.output_images(entry) if p.is_relative_to(server.base_dir / "output"))
                (WORKFLOWS_DIR / f"{name}.jpg").write_bytes(thumbnail_bytes(image))
                print(f"[examples] ran {name}; thumbnail {name}.jpg")
        finally:
            server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"examples to build (default: all): {', '.join(EXAMPLES)}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in EXAMPLES]
    if unknown:
        raise SystemExit(f"unknown example(s) {unknown}; known: {', '.join(EXAMPLES)}")
    return build(args.names or list(EXAMPLES))


if __name__ == "__main__":
    sys.exit(main())
