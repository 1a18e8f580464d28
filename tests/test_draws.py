"""The draws: CPU generators for every random number of every sampler, applied on the sampling device, with the
distribution of ``torch.multinomial``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from nextscale.models.core import sampling
from nextscale.models.core.sampling import categorical, filter_top_k_top_p_, item_generators
from nextscale.models.infinity.sampler import InfinityOptions, TextCondition, sample_infinity
from nextscale.models.var.collaborative import sample_collaborative
from nextscale.models.var.sampler import SamplingOptions, sample
from scipy.stats import chi2_contingency, chisquare
from test_infinity import SCHEDULE, prompts, tiny_model
from test_infinity_sampler import tiny_tokenizer
from test_sampler import make_var, vae  # noqa: F401 (vae: a fixture)
from torch.overrides import TorchFunctionMode

RANDOM_OPS = {
    *("rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "multinomial", "bernoulli"),
    *("exponential_", "uniform_", "normal_", "bernoulli_", "random_", "geometric_", "cauchy_", "log_normal_"),
}


class RecordDraws(TorchFunctionMode):
    """Records the device of the generator of every random torch call (``None``: the global generator)."""

    def __init__(self):
        super().__init__()
        self.devices: list[torch.device | None] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in RANDOM_OPS:
            given = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Generator)]
            self.devices.append(given[0].device if given else None)
        return func(*args, **kwargs)


def test_every_draw_of_every_sampler_comes_from_a_cpu_generator(vae):  # noqa: F811 (the fixture)
    var, drafter, labels, cpu = make_var(), make_var(seed=1), torch.tensor([1, 2]), torch.device("cpu")
    K = len(var.patch_nums)
    with RecordDraws() as plain:
        sample(var, vae, labels, seed=3, options=SamplingOptions(cfg=2.0, more_smooth=True))
    assert plain.devices == [cpu] * (2 * 2 * K)  # per scale and item: the uniforms, then the Gumbel noise

    with RecordDraws() as collaborative:
        sample_collaborative(drafter, var, vae, labels, draft_scales=2, seed=3, options=SamplingOptions())
    assert collaborative.devices == [cpu] * (2 * K)

    model, tok = tiny_model(), tiny_tokenizer()
    text, mask = prompts()
    options = dataclasses.replace(InfinityOptions(cfg=3.0, tau=1.0), schedule=SCHEDULE)
    with RecordDraws() as infinity:
        sample_infinity(model, tok, TextCondition(text, mask), seed=3, options=options)
    assert infinity.devices == [cpu] * (2 * SCHEDULE.num_scales)


def draws_and_multinomial(probs_V: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of ``n`` draws from ``probs_V`` by :func:`categorical` and by ``torch.multinomial``."""
    V = probs_V.numel()
    drawn = categorical(probs_V.expand(1, n, V), item_generators(7, 1))[0]
    reference = torch.multinomial(probs_V, n, replacement=True, generator=torch.Generator().manual_seed(8))
    return drawn.bincount(minlength=V), reference.bincount(minlength=V)


@pytest.mark.parametrize(
    "logits",
    [
        torch.tensor([0.3, 0.2, 0.0, 0.15, 0.1, 0.05, 0.2]).log(),  # one impossible token
        filter_top_k_top_p_(torch.randn(64, generator=torch.Generator().manual_seed(0)) * 2, top_k=20, top_p=0.9),
        torch.tensor([0.4, -1.1]),  # one Infinity bit
    ],
    ids=["fixed", "filtered", "bit"],
)
def test_the_draw_has_the_distribution_of_torch_multinomial(logits):
    probs_V = logits.softmax(dim=-1)
    n = 200_000
    drawn, reference = draws_and_multinomial(probs_V, n)
    possible = probs_V > 0
    assert drawn.sum() == n and torch.equal(drawn[~possible], torch.zeros_like(drawn[~possible]))
    expected = probs_V[possible].double() * n
    expected *= n / expected.sum()
    assert chisquare(drawn[possible].double(), expected).pvalue > 1e-3
    assert chisquare(reference[possible].double(), expected).pvalue > 1e-3
    assert chi2_contingency(torch.stack((drawn[possible], reference[possible])).numpy()).pvalue > 1e-3


def test_a_uniform_rounded_to_the_total_draws_the_last_possible_token(monkeypatch):
    probs_BlV = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    monkeypatch.setattr(sampling, "uniform", lambda generators, shape, device: torch.ones(len(generators), *shape))
    assert categorical(probs_BlV, item_generators(0, 1)).tolist() == [[1, 3]]


def test_item_b_draws_from_its_own_generator():
    probs_BlV = torch.rand(3, 50, 10, generator=torch.Generator().manual_seed(0))
    batch = categorical(probs_BlV, item_generators(2**64 - 2, 3))
    for b in range(3):
        assert torch.equal(batch[b], categorical(probs_BlV[b : b + 1], item_generators((2**64 - 2 + b) % 2**64, 1))[0])


def test_uniforms_are_float32_whatever_the_default_dtype():
    """A float64 default (as the parity benches set) changes neither the uniforms' dtype nor their values."""
    drawn32 = sampling.uniform(item_generators(5, 2), (3,), torch.device("cpu"))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        drawn64 = sampling.uniform(item_generators(5, 2), (3,), torch.device("cpu"))
    finally:
        torch.set_default_dtype(default)
    assert drawn64.dtype == torch.float32 and torch.equal(drawn64, drawn32)


def test_draws_are_made_on_the_cpu_and_applied_on_the_sampling_device():
    """``meta`` stands in for a GPU: the results are on it, the generators stay on the CPU and advance as on a CPU."""
    probs_BlV = torch.full((2, 5, 4), 0.25)
    on_cpu, on_meta = item_generators(9, 2), item_generators(9, 2)
    assert categorical(probs_BlV.to("meta"), on_meta).device.type == "meta"
    assert sampling.gumbel(on_meta, probs_BlV.to("meta")).device.type == "meta"
    categorical(probs_BlV, on_cpu)
    sampling.gumbel(on_cpu, probs_BlV)
    assert all(g.device.type == "cpu" for g in on_meta)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(on_cpu, on_meta))
