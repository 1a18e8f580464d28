"""HMAR without ComfyUI: strict loading of the official key layout (written out here from upstream's ``HMAR``), the
config from the shapes, the Markovian attention pattern, the sampler's masked refinement passes, seeds per item, the
guide, the refusals and the memory against VAR's full cache."""

from __future__ import annotations

import pytest
import torch
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.family import FAMILIES, KVGeometry, Workload
from nextscale.models.core.hooks import Guide, SamplerHooks
from nextscale.models.core.schedule import SCHEDULE_256, token_count
from nextscale.models.hmar.family import markovian_kv_bytes
from nextscale.models.hmar.model import HMAR, HMARConfig
from nextscale.models.hmar.sampler import HMAROptions, parse_refinement, refinement_for, sample_hmar
from nextscale.models.kv.policies import KVPolicySpec
from nextscale.models.var.model import VAR
from test_dd import block_keys, tokenizer

torch.set_num_threads(1)
SMALL = (1, 2, 3, 4)


def official_keys(base: int, branch: int, width: int, vocab: int, cvae: int, patch_nums) -> dict[str, tuple]:
    """Every key of upstream's ``HMAR`` module: VAR's embeddings, three block lists, two heads, the mask embedding."""
    C, L, K, heads = width, token_count(patch_nums), len(patch_nums), 2
    keys = {
        "pos_start": (1, 1, C), "pos_1LC": (1, L, C), "lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L),
        "class_emb.weight": (11, C), "lvl_embed.weight": (K, C), "word_embed.weight": (C, cvae),
        "word_embed_bias": (C,), "mask_embed.weight": (1, C),
    }
    for head in ("ns", "mask"):
        keys.update({f"{head}_head_nm.ada_lin.1.weight": (2 * C, C), f"{head}_head_nm.ada_lin.1.bias": (2 * C,),
                     f"{head}_head.weight": (vocab, C), f"{head}_head.bias": (vocab,)})
    for name, count in (("base_blocks", base), ("ns_blocks", branch), ("mask_blocks", branch)):
        for i in range(count):
            keys.update(block_keys(f"{name}.{i}.", C, heads))
    return keys


def official_state_dict(base=1, branch=1, width=64, vocab=32, cvae=8, patch_nums=SMALL, seed=0):
    """Random weights under the official keys; the buffers as upstream registers them."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.3
          for k, s in official_keys(base, branch, width, vocab, cvae, patch_nums).items()}
    level = torch.tensor([si for si, pn in enumerate(patch_nums) for _ in range(pn * pn)])
    sd["lvl_1L"] = level[None]
    same = level[None, :] == level[:, None]
    sd["attn_bias_for_masking"] = torch.zeros(same.shape).masked_fill(~same, float("-inf"))[None, None]
    for k in sd:
        if k.endswith("zero_k_bias"):
            sd[k] = torch.zeros(width)
    return sd


def test_the_official_layout_loads_strictly_and_the_config_comes_from_the_shapes(tmp_path):
    sd = official_state_dict(base=2, branch=1)
    assert str(FAMILIES.identify(sd)) == "hmar-generator"
    model = HMAR.from_state_dict(sd)
    cfg = model.config
    assert (cfg.depth, cfg.base_depth, cfg.branch_depth, cfg.embed_dim, cfg.num_heads) == (3, 2, 1, 64, 2)
    assert (cfg.num_classes, cfg.vocab_size, cfg.cvae, cfg.patch_nums) == (10, 32, 8, SMALL)
    assert set(model.state_dict()) == set(sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    # the buffers are optional and rebuilt; without lvl_1L the schedule comes from (L, K) among the known ones
    bare = {k: v for k, v in official_state_dict(width=32, patch_nums=SCHEDULE_256).items()
            if k not in ("lvl_1L", "attn_bias_for_masking") and not k.endswith("zero_k_bias")}
    assert HMAR.from_state_dict(bare).config.patch_nums == SCHEDULE_256
    assert HMARConfig.official(16).base_depth == 8 and HMARConfig.official(30).embed_dim == 1920
    path = tmp_path / "hmar-d16.pth"
    torch.save(sd, path)
    with pytest.raises(NextScaleError, match=r"is an HMAR generator.*expected a VAR generator"):
        VAR.from_file(str(path))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda sd: sd.pop("mask_blocks.0.ffn.fc1.bias"), "missing key(s): mask_blocks.0.ffn.fc1.bias"),
        (lambda sd: sd.update({"word_embed.bias": torch.zeros(64)}), "unexpected key(s): word_embed.bias"),
        (lambda sd: sd.update({"mask_head.bias": torch.zeros(7)}), "is [7], expected [32]"),
        (lambda sd: sd.update({k.replace("mask_", "ns_", 1).replace("ns_blocks.0", "ns_blocks.1"): v
                               for k, v in list(sd.items()) if k.startswith("mask_blocks.0.")}),
         "has 2 ns_blocks and 1 mask_blocks"),
        (lambda sd: sd.update({"shared_ada_lin.1.weight": torch.zeros(384, 64)}), "shared AdaLN"),
        (lambda sd: sd.pop("ns_head.weight"), "has no key 'ns_head.weight'"),
    ],
)
def test_a_file_off_the_layout_is_refused_by_key(change, needle):
    sd = official_state_dict()
    change(sd)
    with pytest.raises(NextScaleError, match="HMAR generator") as e:
        HMAR.from_state_dict(sd, "hmar-d16.pth")
    assert needle in str(e.value)


def test_a_scale_attends_to_its_own_tokens_only():
    """The per-scale pass equals the whole pyramid run at once under the file's block-diagonal mask."""
    model = HMAR.from_state_dict(official_state_dict(base=1, branch=2))
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([2, 5])
    cond = model.condition(labels)
    x_BLC = torch.randn(2, token_count(SMALL), 64, generator=g)
    mask_LL = model.attn_bias_for_masking[0, 0]
    assert bool((mask_LL == 0).sum() == sum(pn**4 for pn in SMALL))
    whole_BLC = x_BLC
    for name in ("base_blocks", "ns_blocks"):
        for block, ada in zip(getattr(model, name), cond.ada_B16C[name]):
            whole_BLC = block(whole_BLC, ada, attn_mask=mask_LL)
    whole_BLV = model._head(whole_BLC, model.ns_head_nm, model.ns_head, cond.ns_head_B12C)
    begin = 0
    for pn in SMALL:
        scale_BlV = model.next_scale_logits(x_BLC[:, begin : begin + pn * pn], cond)
        torch.testing.assert_close(scale_BlV, whole_BLV[:, begin : begin + pn * pn], atol=1e-5, rtol=1e-5)
        begin += pn * pn
    # the mask branch reads other blocks and another head
    assert not torch.allclose(model.refine_logits(x_BLC[:, 1:5], cond), model.next_scale_logits(x_BLC[:, 1:5], cond))


def sample(model, tok, labels=(3, 7), seed=5, hooks=None, **options):
    return sample_hmar(model, tok, torch.tensor(labels), seed=seed, options=HMAROptions(**options), hooks=hooks)


def test_refinement_passes_mask_the_least_confident_tokens_by_the_schedule(monkeypatch):
    model, tok = HMAR.from_state_dict(official_state_dict()), tokenizer()
    masked_counts = []
    refine_input = model.refine_input

    def spy(si, coarse, h, masked_Bl, cond):
        masked_counts.append((si, masked_Bl.sum(1).tolist()))
        return refine_input(si, coarse, h, masked_Bl, cond)

    monkeypatch.setattr(model, "refine_input", spy)
    refinement = ((1,), (1, 3), (1, 1, 2, 5), (10, 6))
    tokens = sample(model, tok, refinement=refinement, top_k=0, top_p=0.0)
    assert masked_counts == [(1, [3, 3]), (2, [8, 8]), (2, [7, 7]), (2, [5, 5]), (3, [6, 6])]
    assert tokens.extra["refinement"] == [list(c) for c in refinement]
    # one pass per scale: no refinement pass, other draws from scale 1 on, the same first scale
    masked_counts.clear()
    single = sample(model, tok, refinement=((1,), (4,), (9,), (16,)), top_k=0, top_p=0.0)
    assert masked_counts == [] and torch.equal(single.indices[0], tokens.indices[0])
    assert not all(torch.equal(a, b) for a, b in zip(single.indices[1:], tokens.indices[1:]))


def test_refinement_schedules_are_checked_and_parsed():
    assert refinement_for(SCHEDULE_256)[:4] == ((1,), (1, 3), (1, 1, 2, 5), (16,))
    assert refinement_for(SMALL) == ((1,), (4,), (9,), (16,))
    assert parse_refinement("1 | 2,2", SMALL) == ((1,), (2, 2), (9,), (16,))
    assert parse_refinement("", SMALL) == refinement_for(SMALL)
    with pytest.raises(NextScaleError, match=r"scale 1 \(2x2\) is \[2, 3\].*sum to 4"):
        parse_refinement("1 | 2,3", SMALL)
    with pytest.raises(NextScaleError, match="comma-separated token counts"):
        parse_refinement("1 | a", SMALL)
    with pytest.raises(NextScaleError, match="lists 5 scales"):
        parse_refinement("1|4|9|16|1", SMALL)


def test_batch_item_i_is_the_single_image_of_seed_plus_i_and_the_image_decodes():
    model, tok = HMAR.from_state_dict(official_state_dict()), tokenizer()
    refinement = ((1,), (1, 3), (1, 1, 2, 5))
    batch = sample(model, tok, labels=(3, 7), seed=5, refinement=refinement)
    alone = sample(model, tok, labels=(7,), seed=6, refinement=refinement)
    assert all(torch.equal(b[1:], a) for b, a in zip(batch.indices, alone.indices))
    other = sample(model, tok, labels=(3, 7), seed=9, refinement=refinement)
    assert not all(torch.equal(a, b) for a, b in zip(other.indices, batch.indices))
    image = FAMILIES.get("hmar").decode(tok, batch)
    assert image.shape == (2, 3, 8, 8) and bool(image.isfinite().all())


class KeepFirstScales(Guide):
    def __init__(self, indices):
        self.indices = indices

    def apply(self, si, idx_Bl):
        return self.indices[si].reshape(idx_Bl.shape) if si < 2 else idx_Bl


def test_guide_callback_and_refusals():
    model, tok = HMAR.from_state_dict(official_state_dict()), tokenizer()
    reference = sample(model, tok, labels=(1,), seed=0)
    seen = []
    hooks = SamplerHooks(guide=KeepFirstScales(reference.indices),
                         callback=lambda si, k, f_hat: seen.append((si, k, tuple(f_hat.shape))))
    edited = sample(model, tok, labels=(1,), seed=11, hooks=hooks)
    assert all(torch.equal(edited.indices[si], reference.indices[si]) for si in range(2))
    assert seen == [(si, 4, (1, 8, 4, 4)) for si in range(4)]
    policy = KVPolicySpec("full").bind_scales(2, 2, SMALL)
    with pytest.raises(NextScaleError, match="HMAR takes no kv_policy: HMAR keeps no KV cache"):
        sample(model, tok, hooks=SamplerHooks(kv_policy=policy))
    with pytest.raises(NextScaleError, match="no control adapter was trained for HMAR"):
        sample(model, tok, hooks=SamplerHooks(control=object()))
    with pytest.raises(NextScaleError, match=r"labels must lie in 0\.\.10"):
        sample(model, tok, labels=(11,))
    with pytest.raises(NextScaleError, match="HMAR uses VAR's VQ-VAE"):
        FAMILIES.get("hmar").check_pair(model, tokenizer(vocab=16))


def test_the_markovian_keys_and_values_are_a_fraction_of_vars_full_cache():
    d16 = KVGeometry(16, 16, 64, SCHEDULE_256)
    full = d16.cache_bytes(rows=2, itemsize=2)
    markovian = markovian_kv_bytes(d16, rows=2, itemsize=2)
    assert full == 2 * 2 * 16 * 680 * 1024 * 2  # keys and values, CFG rows, layers, tokens, width, bf16
    assert markovian * 16 * 680 == full * 256  # one layer, the largest scale's 256 tokens
    family, model, tok = FAMILIES.get("hmar"), HMAR.from_state_dict(official_state_dict()), tokenizer()
    need = family.memory(model, tok, Workload(batch_size=2))
    assert need.kv_cache == markovian_kv_bytes(family.kv_geometry(model), 4, 4)
    assert family.working_memory(model, tok, Workload(batch_size=4)) > family.working_memory(model, tok, Workload())
