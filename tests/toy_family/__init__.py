"""A toy third model family, for the test that a family is added in its own folder plus one registry line.

It implements the whole :class:`~nextscale.models.core.family.Family` protocol with two tiny modules:

- ``ToyGenerator``: class-conditional; per class and scale, logits over a palette of ``V`` colours. Scale ``si``
  draws its ``pn x pn`` colour indices (item ``i`` from a CPU generator seeded ``seed + i``), independent of the
  earlier scales; the schedule is stored in the file (``toy_scales``).
- ``ToyTokenizer``: the palette, ``(V, 3)`` colours in -1..1; an image of a token map paints each token as a
  ``PIXELS x PIXELS`` square of its colour. Encoding picks, per scale, the nearest colour of each area-averaged cell.

Its sampler honours the ``callback`` hook only and refuses the others; it has no KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.family import Family, KVGeometry, Role, Workload
from nextscale.models.core.hooks import SamplerHooks, refuse_unsupported
from nextscale.models.core.imageops import fit_square
from nextscale.models.core.memory import MemoryNeed
from nextscale.models.core.sampling import categorical, item_generators
from nextscale.models.core.schedule import parse_schedule
from nextscale.models.core.tokens import NextScaleTokens
from nextscale.models.var.sampler import SamplingOptions
from torch import nn

PIXELS = 2  # image pixels per token side at the last scale
CLASSES = ("red", "blue")


class ToyGenerator(nn.Module):
    def __init__(self, vocab: int = 4, scales: tuple[int, ...] = (1, 2, 4)):
        super().__init__()
        self.toy_logits = nn.Parameter(torch.randn(len(CLASSES), len(scales), vocab))
        self.register_buffer("toy_scales", torch.tensor(scales))

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.toy_scales)


class ToyTokenizer(nn.Module):
    def __init__(self, vocab: int = 4):
        super().__init__()
        self.toy_palette = nn.Parameter(torch.rand(vocab, 3) * 2 - 1)

    def paint(self, idx_Bhw: torch.Tensor, side: int) -> torch.Tensor:
        """Images ``(B, 3, side, side)`` of a token map (nearest-neighbour upsampled colours)."""
        img = self.toy_palette[idx_Bhw].permute(0, 3, 1, 2)
        return F.interpolate(img.float(), size=(side, side), mode="nearest")


GENERATOR = Role("generator", "toy generator", "a toy generator", "NextScale Load Generator")
TOKENIZER = Role(
    "tokenizer", "toy tokenizer", "a toy tokenizer", "NextScale Load Tokenizer", dtypes=(torch.float32,), auto="vae"
)


class ToyFamily(Family):
    name = "toy"
    title = "Toy"
    roles = (GENERATOR, TOKENIZER)
    hooks = frozenset({"callback"})
    files_hint = "Toy files are written by tests/toy_family"
    decode_chunk = 2

    def detect(self, keys):
        if "toy_logits" in keys:
            return GENERATOR
        if "toy_palette" in keys:
            return TOKENIZER
        return None

    def build(self, role, state_dict, path, *, dtype, operations=None, compute_dtype=None):
        if role is GENERATOR:
            logits = state_dict["toy_logits"]
            module = ToyGenerator(logits.shape[-1], tuple(int(s) for s in state_dict["toy_scales"]))
        else:
            module = ToyTokenizer(state_dict["toy_palette"].shape[0])
        module.load_state_dict(state_dict, strict=True)
        return module.to(dtype=dtype).eval().requires_grad_(False)

    def check_pair(self, generator, tokenizer):
        if generator.toy_logits.shape[-1] != tokenizer.toy_palette.shape[0]:
            raise NextScaleError("the toy generator and tokenizer do not belong together (palette sizes differ)")

    def class_names(self, generator):
        return CLASSES

    def sample(self, generator, tokenizer, condition, *, seed, options=None, hooks=None, device=None):
        hooks, options = hooks or SamplerHooks(), options or SamplingOptions()
        refuse_unsupported(hooks, self.hooks, self.title)
        labels_B = torch.as_tensor(condition, device=device)
        scales, side = generator.scales, generator.scales[-1] * PIXELS
        generators = item_generators(seed, len(labels_B))
        indices = []
        for si, pn in enumerate(scales):
            temperature = options.temperature_at(si, len(scales))
            probs_BV = (generator.toy_logits[labels_B, si].float() / temperature).softmax(-1)
            probs_BlV = probs_BV[:, None].expand(-1, pn * pn, -1)
            indices.append(categorical(probs_BlV, generators).view(-1, pn, pn))
            if hooks.callback is not None:
                hooks.callback(si, len(scales), tokenizer.paint(indices[-1], side))
        return NextScaleTokens(indices=indices, patch_nums=scales, labels=labels_B, source="sampled")

    def parse_schedule(self, text):
        return parse_schedule(text)

    def encode(self, tokenizer, images_B3HW, schedule=None, resize="center crop"):
        if schedule is None:
            raise NextScaleError("the toy tokenizer has no schedule of its own: give one")
        img = fit_square(images_B3HW, schedule[-1] * PIXELS, resize)
        palette = tokenizer.toy_palette.float()
        indices = []
        for pn in schedule:
            cells_BlC = F.adaptive_avg_pool2d(img, pn).flatten(2).transpose(1, 2)
            indices.append(torch.cdist(cells_BlC, palette[None]).argmin(-1).view(-1, pn, pn))
        return NextScaleTokens(indices=indices, patch_nums=tuple(schedule), source="encoded")

    def check_tokens(self, tokenizer, tokens):
        if not isinstance(tokens, NextScaleTokens) or max(int(i.max()) for i in tokens.indices) >= len(
            tokenizer.toy_palette
        ):
            raise NextScaleError("these are not toy tokens of this palette")

    def decode(self, tokenizer, tokens, upto=None):
        self.check_tokens(tokenizer, tokens)
        return tokenizer.paint(tokens.indices[(upto or tokens.num_scales) - 1], tokens.patch_nums[-1] * PIXELS)

    def preview(self, tokenizer, latent):
        return latent[:1]

    def kv_geometry(self, generator, schedule=None):
        return KVGeometry(0, 1, 1, tuple(schedule or generator.scales))

    def memory(self, generator, tokenizer, workload: Workload):
        scales = workload.schedule or (generator.scales if generator is not None else (1,))
        if generator is None:
            return MemoryNeed(decode=workload.decode_batch * 3 * (scales[-1] * PIXELS) ** 2 * 4)
        return MemoryNeed(activations=workload.batch_size * 3 * (scales[-1] * PIXELS) ** 2 * 4)


FAMILY = ToyFamily()
