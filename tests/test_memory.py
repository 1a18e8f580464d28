"""The memory model (models/core/memory.py and the families' ``memory``) against what runs allocate.

On the CPU, :class:`PeakMeter` measures the peak of tensor bytes a sampling or decoding run allocates; the families'
prediction must be within 10% of it, on the embedded VAR and on small Infinity configs (the larger rows are in
bench/bench_memory.py). Official sizes are built on the ``meta`` device: their weights and KV caches are predicted
from the configs alone (the figures of docs/memory.md)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from nextscale.models.core.family import FAMILIES, KVGeometry, Workload
from nextscale.models.core.memory import GiB, MemoryNeed, PeakMeter, kv_cache_bytes, largest_batch, weight_bytes
from nextscale.models.core.tokens import NextScaleBitTokens
from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer
from nextscale.models.infinity.model import Infinity, InfinityConfig
from nextscale.models.infinity.sampler import InfinityOptions, TextCondition
from nextscale.models.infinity.schedule import InfinitySchedule
from nextscale.models.var.model import VAR, VARConfig
from nextscale.models.var.sampler import SamplingOptions
from nextscale.models.var.tokenizer import MultiScaleVQVAE
from test_infinity import TINY, prompts, tiny_model
from test_kv_policies import GEN_FILE, TOK_FILE

VAR_FAMILY, INFINITY_FAMILY = FAMILIES.get("var"), FAMILIES.get("infinity")
SMALL_INFINITY = dataclasses.replace(TINY, embed_dim=256, hidden_dim=1024)
SCHEDULE = InfinitySchedule.custom([(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)])


def within_10_percent(predicted: int, measured: int) -> bool:
    return measured > 0 and abs(predicted - measured) <= 0.1 * measured


def test_the_meter_counts_new_storages_until_they_are_freed():
    weights = torch.randn(256, 256)
    with PeakMeter() as meter:
        view = weights.t()  # a view of a tensor made before: nothing new
        weights.mul_(1.0)  # in place: nothing new
        assert meter.live == 0
        a = torch.randn(1000)
        b = a.view(10, 100)
        del a
        assert meter.live == 4000  # held by the view
        del b
        product = torch.randn(10, 10) @ torch.randn(10, 10)  # the operands are freed, the product held
        assert meter.live == product.nbytes == 400 and meter.peak == 4000
    assert view.shape == (256, 256)


@pytest.fixture(scope="module")
def embedded():
    return VAR.from_file(GEN_FILE), MultiScaleVQVAE.from_file(TOK_FILE)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_var_sampling_is_predicted_within_10_percent(embedded, batch, cfg):
    var, vae = embedded
    with PeakMeter() as meter:
        VAR_FAMILY.sample(var, vae, torch.arange(batch), seed=0, options=SamplingOptions(cfg=cfg, top_p=0.95))
    need = VAR_FAMILY.memory(var, None, Workload(batch_size=batch, guided=cfg != 0))
    assert within_10_percent(need.sampling, meter.peak), (need, meter.peak)


@pytest.mark.parametrize("batch", [1, 4])
def test_var_decoding_is_predicted_within_10_percent(embedded, batch):
    var, vae = embedded
    tokens = VAR_FAMILY.sample(var, vae, torch.arange(batch), seed=0)
    with PeakMeter() as meter:
        VAR_FAMILY.decode(vae, tokens)
    predicted = VAR_FAMILY.memory(None, vae, Workload(decode_batch=batch)).decode
    assert within_10_percent(predicted, meter.peak), (predicted, meter.peak)


@pytest.mark.parametrize("batch", [1, 4])
def test_infinity_sampling_is_predicted_within_10_percent(batch):
    model, tok = tiny_model(SMALL_INFINITY), small_bsq(4, (1, 2))
    text, mask = prompts(batch)
    options = InfinityOptions(cfg=3.0, tau=1.0, top_p=0.9, schedule=SCHEDULE)
    with PeakMeter() as meter:
        INFINITY_FAMILY.sample(model, tok, TextCondition(text, mask), seed=0, options=options)
    need = INFINITY_FAMILY.memory(model, None, Workload(batch_size=batch, schedule=SCHEDULE, text_tokens=text.shape[1]))
    assert within_10_percent(need.sampling, meter.peak), (need, meter.peak)


def test_bsq_decoding_is_predicted_within_10_percent():
    tok = small_bsq(8, (1, 2, 2))
    g = torch.Generator().manual_seed(0)
    bits = [torch.rand(2, h, w, 8, generator=g) > 0.5 for h, w in SCHEDULE.scales]
    with PeakMeter() as meter:
        INFINITY_FAMILY.decode(tok, NextScaleBitTokens(bits=bits, scales=SCHEDULE.scales))
    predicted = INFINITY_FAMILY.memory(None, tok, Workload(decode_batch=2, schedule=SCHEDULE.scales)).decode
    assert within_10_percent(predicted, meter.peak), (predicted, meter.peak)


@pytest.mark.parametrize("bands", [2, 4, 8])
def test_bsq_decoding_in_bands_is_predicted_within_10_percent_and_needs_less(bands):
    tok = small_bsq(8, (1, 2, 2))
    g = torch.Generator().manual_seed(0)
    bits = [torch.rand(1, h, w, 8, generator=g) > 0.5 for h, w in SCHEDULE.scales]
    tokens = NextScaleBitTokens(bits=bits, scales=SCHEDULE.scales)
    with PeakMeter() as meter:
        INFINITY_FAMILY.decode(tok, tokens, bands=bands)
    need = lambda n: INFINITY_FAMILY.memory(  # noqa: E731
        None, tok, Workload(decode_batch=1, schedule=SCHEDULE.scales, decode_bands=n)
    ).decode
    assert within_10_percent(need(bands), meter.peak), (need(bands), meter.peak)
    assert need(bands) < need(1)


def small_bsq(codebook_dim: int, ch_mult: tuple[int, ...]) -> BSQTokenizer:
    torch.manual_seed(3)
    return BSQTokenizer(BSQConfig(codebook_dim=codebook_dim, base_ch=32, ch_mult=ch_mult, num_res_blocks=1)).eval()


def test_official_sizes_from_their_configs_on_meta():
    """The issue's figures: bf16 weights, and the KV cache of one image with its CFG row."""
    with torch.device("meta"):
        d30 = VAR(VARConfig.official(30)).to(torch.bfloat16)
        d36 = VAR(VARConfig.official(36)).to(torch.bfloat16)
        i2b = Infinity(InfinityConfig.official("2b")).to(torch.bfloat16)
    bf16 = Workload(batch_size=1, dtype=torch.bfloat16)
    need = VAR_FAMILY.memory(d30, None, bf16)
    assert need.weights / GiB == pytest.approx(3.74, abs=0.01) and need.kv_cache / GiB == pytest.approx(0.29, abs=0.01)
    sixteen = VAR_FAMILY.memory(d36, None, dataclasses.replace(bf16, batch_size=16))
    assert sixteen.kv_cache / GiB == pytest.approx(22.15, abs=0.01)
    need = INFINITY_FAMILY.memory(i2b, None, bf16)
    geometry = INFINITY_FAMILY.kv_geometry(i2b)
    assert geometry.cache_bytes(2, 2) / GiB == pytest.approx(5.14, abs=0.01)  # the self-attention cache
    assert need.kv_cache - geometry.cache_bytes(2, 2) == 2 * 32 * 2 * 512 * 2048 * 2  # cross-attention keys, values
    assert need.weights / GiB == pytest.approx(4.11, abs=0.01)
    fp8 = weight_bytes(i2b, torch.bfloat16, torch.float8_e4m3fn)  # matrices in fp8 with their scales, the rest bf16
    assert 0.5 * need.weights < fp8 < 0.51 * need.weights


def test_a_policy_that_counts_its_own_bytes_is_asked():
    geometry = KVGeometry(layers=2, heads=2, head_dim=4, scales=(1, 2))

    class Packed:
        def cache_bytes(self, geometry, rows, itemsize):
            return 7 * rows * itemsize

    assert kv_cache_bytes(geometry, 2, 4, Packed()) == 56
    assert kv_cache_bytes(geometry, 2, 4) == geometry.cache_bytes(2, 4) == 2 * 2 * 5 * 2 * 2 * 4 * 4


def test_the_largest_batch_that_fits():
    need = lambda b: 100 + 10 * b  # noqa: E731
    assert largest_batch(need, 16, 10_000) == 16
    assert largest_batch(need, 16, 155) == 5
    assert largest_batch(need, 16, 109) == 0


def test_a_need_reads_by_part():
    need = MemoryNeed(weights=4 * GiB, kv_cache=8 * GiB, activations=GiB, preview=0, decode=2 * GiB)
    assert need.sampling == 9 * GiB and need.working == 9 * GiB and need.total == 13 * GiB
    assert need.describe() == "9.00 GiB (KV cache 8.00 GiB, activations 1.00 GiB)"
    decoding = MemoryNeed(decode=3 * GiB, kv_cache=GiB)
    assert decoding.working == 3 * GiB and decoding.describe() == "3.00 GiB (decoding)"
    assert MemoryNeed(kv_cache=300 * 2**20).describe() == "300 MiB (KV cache 300 MiB)"
