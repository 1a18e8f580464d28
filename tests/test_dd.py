"""Distilled Decoding without ComfyUI: strict loading of the official key layout (written out here from upstream's
``DD_Model``), the config from the shapes, nested and EMA files, the attention pattern, and the few-step sampler
(steps, greedy and continuous scales, seeds per item, refusals)."""

from __future__ import annotations

import re

import pytest
import torch
from nextscale.models.core.checkpoint import read_state_dict
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.family import FAMILIES, Workload
from nextscale.models.core.hooks import SamplerHooks
from nextscale.models.core.schedule import SCHEDULE_256, token_count
from nextscale.models.dd.model import DistilledVAR
from nextscale.models.dd.sampler import DDOptions, official_split, sample_dd
from nextscale.models.kv.policies import KVPolicySpec
from nextscale.models.var.model import VAR
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig

torch.set_num_threads(1)
SMALL = (1, 2, 3, 4)


def block_keys(b: str, C: int, heads: int) -> dict[str, tuple]:
    """The keys of one of upstream VAR's ``AdaLNSelfAttn`` blocks under the prefix ``b`` (width ``C``)."""
    return {
        b + "attn.scale_mul_1H11": (1, heads, 1, 1), b + "attn.q_bias": (C,), b + "attn.v_bias": (C,),
        b + "attn.zero_k_bias": (C,), b + "attn.mat_qkv.weight": (3 * C, C),
        b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
        b + "ffn.fc1.weight": (4 * C, C), b + "ffn.fc1.bias": (4 * C,),
        b + "ffn.fc2.weight": (C, 4 * C), b + "ffn.fc2.bias": (C,),
        b + "ada_lin.1.weight": (6 * C, C), b + "ada_lin.1.bias": (6 * C,),
    }


def official_keys(depth: int, width: int, vocab: int, cvae: int, patch_nums, layerwise: bool) -> dict[str, tuple]:
    """Every key of upstream's ``DD_Model`` (VAR's, one more level and position for the class token, DD's parts)."""
    C, L, K = width, token_count(patch_nums) + 1, len(patch_nums) + 1
    keys = {
        "pos_start": (1, 1, C), "pos_1LC": (1, L, C), "lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L),
        "word_embed.weight": (C, cvae), "word_embed.bias": (C,), "class_emb.weight": (11, C),
        "lvl_embed.weight": (K, C), "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
        "head.weight": (vocab, C), "head.bias": (vocab,), "n_d_embed.weight": (2, C),
        "final_layer_conti.scale_shift_table": (2, C), "final_layer_conti.linear.weight": (cvae, C),
        "final_layer_conti.linear.bias": (cvae,),
    }
    for i in range(depth):
        keys.update(block_keys(f"blocks.{i}.", C, heads=depth))
    if layerwise:
        for i in range(depth + 1):
            keys.update({f"layerwise_n_d_embed.{i}.weight": (C, C), f"layerwise_n_d_embed.{i}.bias": (C,)})
    return keys


def official_state_dict(depth=2, width=64, vocab=32, cvae=8, patch_nums=SMALL, layerwise=True, seed=0):
    """Random weights under the official keys; the buffers as upstream registers them."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.3 for k, s in official_keys(depth, width, vocab, cvae, patch_nums,
                                                                          layerwise).items()}
    level = torch.tensor([0] + [si + 1 for si, pn in enumerate(patch_nums) for _ in range(pn * pn)])
    sd["lvl_1L"] = level[None]
    allowed = (level[None, :] < level[:, None]) | torch.eye(len(level), dtype=torch.bool)
    sd["attn_bias_for_masking"] = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]
    for i in range(depth):
        sd[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(width)
    return sd


def tokenizer(patch_nums=SMALL, vocab=32, cvae=8) -> MultiScaleVQVAE:
    torch.manual_seed(0)
    return MultiScaleVQVAE(TokenizerConfig(vocab_size=vocab, z_channels=cvae, ch=32, ch_mult=(1, 1),
                                           patch_nums=patch_nums)).eval()


def test_the_official_layout_loads_strictly_and_the_config_comes_from_the_shapes():
    sd = official_state_dict()
    assert str(FAMILIES.identify(sd)) == "dd-generator"  # not var-generator, though every VAR key is there
    model = DistilledVAR.from_state_dict(sd)
    cfg = model.config
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.num_classes, cfg.vocab_size, cfg.cvae) == (2, 64, 2, 10, 32, 8)
    assert cfg.patch_nums == SMALL and cfg.layerwise
    assert set(model.state_dict()) == set(sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    # the buffers are optional (rebuilt); without lvl_1L the schedule is the known one of (L + 1, K + 1)
    buffers = ("lvl_1L", "attn_bias_for_masking")
    bare = {k: v for k, v in official_state_dict(layerwise=False).items() if k not in buffers}
    with pytest.raises(NextScaleError, match="no known schedule"):  # (1, 2, 3, 4) is no published schedule
        DistilledVAR.from_state_dict(bare)
    sd256 = {k: v for k, v in official_state_dict(width=32, patch_nums=SCHEDULE_256, layerwise=False).items()
             if k != "lvl_1L"}
    cfg256 = DistilledVAR.from_state_dict(sd256).config
    assert cfg256.patch_nums == SCHEDULE_256 and not cfg256.layerwise


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda sd: sd.pop("layerwise_n_d_embed.2.bias"), "missing key(s): layerwise_n_d_embed.2.bias"),
        (lambda sd: sd.update({"layerwise_n_d_embed.3.bias": torch.zeros(64)}), "unexpected key(s): layerwise"),
        (lambda sd: sd.update({"final_layer_conti.linear.bias": torch.zeros(7)}), "is [7], expected [8]"),
        (lambda sd: sd.update({"shared_ada_lin.1.weight": torch.zeros(384, 64)}), "shared AdaLN"),
        (lambda sd: sd.pop("pos_1LC"), "has no key 'pos_1LC'"),
    ],
)
def test_a_file_off_the_layout_is_refused_by_key(change, needle):
    sd = official_state_dict()
    change(sd)
    with pytest.raises(NextScaleError, match="Distilled Decoding generator") as e:
        DistilledVAR.from_state_dict(sd, "var-d16.pth")
    assert needle in str(e.value)


def test_released_files_load_their_ema_weights_and_vars_loader_names_the_kind(tmp_path):
    sd = official_state_dict()
    ema = {k: v + 1 for k, v in sd.items()}
    path = tmp_path / "var-d16.pth"
    torch.save({"trainer": {"var_wo_ddp": sd, "ema_parameters": ema}, "args": {"depth": 2}}, path)
    read = read_state_dict(str(path))
    assert all(torch.equal(read[k], ema[k]) for k in sd)  # upstream's sample.py samples with the EMA weights
    with pytest.raises(NextScaleError, match=r"is a Distilled Decoding generator.*expected a VAR generator"):
        VAR.from_file(str(path))


def test_a_token_sees_earlier_levels_and_itself_only():
    model = DistilledVAR.from_state_dict(official_state_dict())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 30, 8, generator=g)
    labels = torch.tensor([3])
    codes, logits = model(labels, x, 0)
    changed = x.clone()
    changed[0, 6] += 1.0  # position 6: the second code of scale 2 (positions 5..13)
    codes2, logits2 = model(labels, changed, 0)
    moved = (codes2 - codes).abs().amax(-1)[0] > 1e-6
    assert moved[6] and moved[14:].all()  # itself and every later scale
    assert not moved[:6].any() and not moved[7:14].any()  # earlier scales, and the rest of its own scale
    assert torch.equal(logits2[0, :6], logits[0, :6])
    # the noise/data mark: the same inputs marked as data from scale 2 on give other outputs there
    codes3, _ = model(labels, x, model.config.scale_start(2))
    assert not torch.allclose(codes3[0, 5:], codes[0, 5:])


def sample(model, tok, labels=(3, 7), seed=5, **options):
    return sample_dd(model, tok, torch.tensor(labels), seed=seed, options=DDOptions(**options))


def test_one_and_two_steps_greedy_and_continuous_scales():
    model, tok = DistilledVAR.from_state_dict(official_state_dict()), tokenizer()
    one = sample(model, tok, steps=(0,), split=2)
    two = sample(model, tok, steps=(0, 2), split=2)
    assert one.patch_nums == SMALL and one.batch_size == 2 and one.f_hat.shape == (2, 8, 4, 4)
    # the second step keeps the first step's scales before it and redoes the others
    assert all(torch.equal(one.indices[si], two.indices[si]) for si in range(2))
    assert not torch.allclose(one.f_hat, two.f_hat)
    # every scale greedy: the codes are codebook rows, so the latent is the indices' own
    greedy = sample(model, tok, steps=(0,), split=len(SMALL))
    assert torch.allclose(greedy.f_hat, tok.quantize.indices_to_fhat(greedy.indices, SMALL), atol=1e-5)
    assert torch.equal(greedy.indices[0], one.indices[0])
    # continuous scales are not codebook rows: their latent differs from their nearest codes'
    assert not torch.allclose(one.f_hat, tok.quantize.indices_to_fhat(one.indices, SMALL), atol=1e-3)
    # the decoded image
    image = FAMILIES.get("dd").decode(tok, two)
    assert image.shape == (2, 3, 8, 8) and bool(image.isfinite().all())


def test_batch_item_i_is_the_single_image_of_seed_plus_i():
    model, tok = DistilledVAR.from_state_dict(official_state_dict()), tokenizer()
    batch = sample(model, tok, labels=(3, 7), seed=5, steps=(0, 2), split=2)
    alone = sample(model, tok, labels=(7,), seed=6, steps=(0, 2), split=2)
    assert all(torch.equal(b[1:], a) for b, a in zip(batch.indices, alone.indices))
    assert torch.allclose(batch.f_hat[1:], alone.f_hat, atol=1e-5)
    other = sample(model, tok, labels=(3, 7), seed=9, steps=(0, 2), split=2)
    assert not torch.allclose(other.f_hat, batch.f_hat)


def test_callback_per_step_and_refusals():
    model, tok = DistilledVAR.from_state_dict(official_state_dict()), tokenizer()
    seen = []
    hooks = SamplerHooks(callback=lambda step, n, f_hat: seen.append((step, n, tuple(f_hat.shape))))
    sample_dd(model, tok, torch.tensor([1]), seed=0, options=DDOptions(steps=(0, 2), split=2), hooks=hooks)
    assert seen == [(0, 2, (1, 8, 4, 4)), (1, 2, (1, 8, 4, 4))]
    policy = KVPolicySpec("full").bind_scales(2, 2, SMALL)
    with pytest.raises(NextScaleError, match="keeps no KV cache"):
        sample_dd(model, tok, torch.tensor([1]), seed=0, hooks=SamplerHooks(kv_policy=policy))
    for options, needle in [
        (DDOptions(steps=(1,), split=2), "must start at scale 0"),
        (DDOptions(steps=(0, 2, 2), split=2), "must start at scale 0 and increase"),
        (DDOptions(steps=(0, 4), split=2), "each below 4"),
        (DDOptions(steps=(0,), split=5), "split scale 5 must be in 0..4"),
    ]:
        with pytest.raises(NextScaleError, match=re.escape(needle)):
            sample_dd(model, tok, torch.tensor([1]), seed=0, options=options)
    with pytest.raises(NextScaleError, match=r"labels must lie in 0\.\.10"):
        sample_dd(model, tok, torch.tensor([11]), seed=0, options=DDOptions(split=2))
    with pytest.raises(NextScaleError, match="DD uses VAR's VQ-VAE"):
        FAMILIES.get("dd").check_pair(model, tokenizer(vocab=16))
    assert (official_split(16), official_split(20), official_split(24)) == (5, 4, 4)


def test_working_memory_counts_one_pass_without_guidance_rows():
    family = FAMILIES.get("dd")
    model, tok = DistilledVAR.from_state_dict(official_state_dict()), tokenizer()
    one = family.working_memory(model, tok, Workload(batch_size=1))
    four = family.working_memory(model, tok, Workload(batch_size=4))
    assert 0 < one < four
    assert family.working_memory(model, tok, Workload(batch_size=1, guided=True)) == one
