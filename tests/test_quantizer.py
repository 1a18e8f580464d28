"""Multi-scale residual quantiser: Phi, the encoding loop, f_hat, the transformer's inputs, nearest code."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nextscale.kernels.quantize import available_backends, nearest_code, nearest_code_torch
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.schedule import SCHEDULE_256, SCHEDULE_512, phi_index
from nextscale.models.var.quantizer import MultiScaleQuantizer, Phi, PhiNonShared, PhiPartiallyShared, PhiShared

V, C = 64, 8
# The official code's Phi index tables for 4 shared Phis (upstream ``PhiPartiallyShared``).
PHI_TABLE = {10: [0, 0, 1, 1, 1, 2, 2, 3, 3, 3], 14: [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: one thread avoids inter-thread overhead on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_quantizer(patch_nums=SCHEDULE_256, seed=0, **kw) -> MultiScaleQuantizer:
    torch.manual_seed(seed)
    q = MultiScaleQuantizer(V, C, patch_nums, **kw).eval().requires_grad_(False)
    for phi in q.modules():  # O(1) Phi convs so that every Phi visibly changes f_hat
        if isinstance(phi, Phi):
            phi.weight.normal_(0, 0.2)
            phi.bias.normal_(0, 0.1)
    return q


def manual_fhat(q, indices, patch_nums, k=None):
    """f_hat from first principles: sum over scales of (1-r) x + r conv3x3(x), x = bicubic_up(code map)."""
    side, K = patch_nums[-1], len(patch_nums)
    total = 0
    for si in range(len(indices) if k is None else k):
        pn = patch_nums[si]
        x = q.embedding.weight[indices[si]].view(-1, pn, pn, C).permute(0, 3, 1, 2)  # row-major token order
        if si < K - 1:
            x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
        conv = q.quant_resi.qresi_ls[PHI_TABLE[K][si]]
        total = total + 0.5 * x + 0.5 * F.conv2d(x, conv.weight, conv.bias, padding=1)
    return total


# -- Phi ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [10, 14])
def test_phi_index_table_matches_numpy(K):
    ticks = np.linspace(1 / 12, 11 / 12, 4)  # upstream's float64 computation for 4 shared Phis
    numpy_table = [int(np.argmin(np.abs(ticks - si / (K - 1)))) for si in range(K)]
    assert [phi_index(si, K, 4) for si in range(K)] == numpy_table == PHI_TABLE[K]


def test_phi_formula():
    phi = Phi(C, 0.5)
    x = torch.randn(2, C, 5, 5)
    with torch.no_grad():
        assert torch.allclose(phi(x), 0.5 * x + 0.5 * F.conv2d(x, phi.weight, phi.bias, padding=1), atol=1e-6)


@pytest.mark.parametrize(
    "share, quant_resi, bank, keys",
    [
        (4, 0.5, PhiPartiallyShared, {f"quant_resi.qresi_ls.{i}.{p}" for i in range(4) for p in ("weight", "bias")}),
        (1, 0.5, PhiShared, {"quant_resi.qresi.weight", "quant_resi.qresi.bias"}),
        (0, 0.5, PhiNonShared, {f"quant_resi.{i}.{p}" for i in range(10) for p in ("weight", "bias")}),
        (4, 0.0, PhiPartiallyShared, set()),  # a zero ratio makes every Phi the identity, without weights
    ],
)
def test_phi_key_layouts(share, quant_resi, bank, keys):
    q = MultiScaleQuantizer(V, C, SCHEDULE_256, quant_resi=quant_resi, share_quant_resi=share)
    assert isinstance(q.quant_resi, bank)
    assert set(q.state_dict()) == keys | {"embedding.weight", "ema_vocab_hit_SV"}
    assert q.state_dict()["ema_vocab_hit_SV"].shape == (10, V)
    if share == 4:
        assert [q.phi(si, 10) is q.quant_resi.qresi_ls[PHI_TABLE[10][si]] for si in range(10)] == [True] * 10
    if share == 0:
        assert [q.phi(si, 10) is q.quant_resi[phi_index(si, 10, 10)] for si in range(10)] == [True] * 10


# -- encoding and f_hat ------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_nums", [SCHEDULE_256, SCHEDULE_512])
def test_fhat_is_the_sum_of_scale_contributions(patch_nums):
    q = make_quantizer(patch_nums)
    f = torch.randn(3, C, patch_nums[-1], patch_nums[-1])
    indices, f_hat = q.f_to_indices_and_fhat(f, patch_nums)
    assert [tuple(i.shape) for i in indices] == [(3, pn * pn) for pn in patch_nums]
    assert all(i.dtype == torch.long and 0 <= i.min() and i.max() < V for i in indices)
    assert f_hat.dtype == torch.float32 and f_hat.shape == f.shape
    assert torch.allclose(f_hat, manual_fhat(q, indices, patch_nums), atol=1e-5)
    assert torch.equal(q.indices_to_fhat(indices, patch_nums), f_hat)
    assert all(torch.equal(a, b) for a, b in zip(q.f_to_indices(f, patch_nums), indices))  # deterministic


def test_upto_uses_only_the_first_scales():
    q = make_quantizer()
    indices = q.f_to_indices(torch.randn(2, C, 16, 16), SCHEDULE_256)
    for k in (0, 1, 4, 10):
        expected = manual_fhat(q, indices, SCHEDULE_256, k) if k else torch.zeros(2, C, 16, 16)
        assert torch.allclose(q.indices_to_fhat(indices, SCHEDULE_256, upto=k), expected, atol=1e-5)
        # a generation in progress holds only k token maps: same partial f_hat
        assert (
            torch.equal(q.indices_to_fhat(indices[:k], SCHEDULE_256), q.indices_to_fhat(indices, SCHEDULE_256, upto=k))
            if k
            else True
        )
    with pytest.raises(NextScaleError):
        q.indices_to_fhat(indices, SCHEDULE_256, upto=11)
    with pytest.raises(NextScaleError):
        q.indices_to_fhat(indices, SCHEDULE_256, latent_hw=(16, 24))


def test_reencoding_an_exact_fhat_returns_its_indices_full_schedule():
    """Phi = identity, one code per scale, code norms halving per scale (2**-si), orthogonal directions.
    Bicubic up and area down preserve constant maps, so at scale si the residual is exactly
    e_si + sum_{t>si} e_t: its distance to e_si is sum_{t>si} 4**-t < 4**-si / 3, to any other code >= 4**-si."""
    K, Cq = len(SCHEDULE_256), 16
    q = MultiScaleQuantizer(2 * K, Cq, SCHEDULE_256, quant_resi=0.0)
    with torch.no_grad():
        q.embedding.weight.copy_(
            torch.cat([torch.eye(Cq)[:K], -torch.eye(Cq)[:K]]) * (0.5 ** torch.arange(K).repeat(2))[:, None]
        )
    chosen = torch.tensor(
        [[si + K * (si % 3 == 1) for si in range(K)], [si + K * (si % 2) for si in range(K)]]
    )  # (B, K)
    indices = [chosen[:, si, None].expand(2, pn * pn) for si, pn in enumerate(SCHEDULE_256)]
    f = q.indices_to_fhat(indices, SCHEDULE_256)
    assert all(torch.equal(a, b) for a, b in zip(q.f_to_indices(f, SCHEDULE_256), indices))


def cell_mixing(pn_from: int, pn_to: int, side: int) -> torch.Tensor:
    """``W (pn_to**2, pn_from**2)``: how a code map on ``pn_from`` lands on the cells of ``pn_to`` after the
    quantiser's bicubic up to ``side`` and area down (either is skipped at full size)."""
    n = pn_from * pn_from
    x = torch.eye(n).view(n, 1, pn_from, pn_from)
    if pn_from != side:
        x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
    if pn_to != side:
        x = F.interpolate(x, size=(pn_to, pn_to), mode="area")
    return x.reshape(n, -1).T


def test_reencoding_an_exact_fhat_returns_its_indices_spatial():
    """Spatially varying codes; Phi = identity through Dirac convs (share 4, ratio 0.5).

    Scale s owns the channel pair (2s, 2s+1); its codes are +-a_s along those axes, a_s = 0.5**s.
    Re-encoding f = f_hat, the residual at scale s holds scales >= s only. Per cell, relative to ||z||^2,
    the own code scores <= a_s^2 (1 - 2 m_s), where m_s = min over cells of (own weight - sum of |other
    weights|) in W = cell_mixing(pn_s, pn_s); every other code of scale s scores at least 2 a_s^2 m_s more;
    a code of a coarser scale scores ~ +a_t^2; a code of a finer scale t scores >= a_t^2 (1 - 2 R_st), R_st
    the largest row sum of |cell_mixing(pn_t, pn_s)|. So the own code wins wherever
    a_s^2 (2 m_s - 1) > a_t^2 (2 R_st - 1) for all t > s, which is checked first."""
    pns, side = (1, 2, 8), 8
    a = [0.5**s for s in range(len(pns))]
    for s, pn in enumerate(pns):
        W = cell_mixing(pn, pn, side)
        m = (2 * W.diag() - W.abs().sum(1)).min()
        for t in range(s + 1, len(pns)):
            R = cell_mixing(pns[t], pn, side).abs().sum(1).max()
            assert a[s] ** 2 * (2 * m - 1) > a[t] ** 2 * (2 * R - 1) + 1e-3

    K = len(pns)
    q = MultiScaleQuantizer(4 * K, 2 * K, pns, quant_resi=0.5, share_quant_resi=4)
    with torch.no_grad():
        for phi in q.quant_resi.qresi_ls:
            torch.nn.init.dirac_(phi.weight)
            phi.bias.zero_()
        pair = torch.cat([torch.eye(2), -torch.eye(2)])  # 4 codes in a channel pair
        q.embedding.weight.copy_(torch.block_diag(*[pair * a[s] for s in range(K)]))
    g = torch.Generator().manual_seed(0)
    indices = [4 * s + torch.randint(0, 4, (3, pn * pn), generator=g) for s, pn in enumerate(pns)]
    f = q.indices_to_fhat(indices, pns)
    assert all(torch.equal(a, b) for a, b in zip(q.f_to_indices(f, pns), indices))


def test_latent_must_match_the_schedule():
    q = make_quantizer()
    with pytest.raises(NextScaleError, match="16x16"):
        q.f_to_indices(torch.randn(1, C, 16, 12), SCHEDULE_256)


# -- the transformer's inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("patch_nums", [SCHEDULE_256, SCHEDULE_512])
def test_teacher_forcing_input_matches_the_inference_steps(patch_nums):
    q = make_quantizer(patch_nums)
    B, K, side = 2, len(patch_nums), patch_nums[-1]
    indices = q.f_to_indices(torch.randn(B, C, side, side), patch_nums)
    x_BLCv = q.teacher_forcing_input(indices, patch_nums)
    L = sum(pn * pn for pn in patch_nums)
    assert x_BLCv.shape == (B, L - 1, C) and x_BLCv.dtype == torch.float32

    f_hat, begin = torch.zeros(B, C, side, side), 0
    for si in range(K):
        f_hat_in = f_hat
        f_hat, next_BChw = q.next_input(si, patch_nums, f_hat, q.embed(indices[si], patch_nums[si]))
        assert f_hat is f_hat_in  # updated in place
        if si == K - 1:
            assert next_BChw is f_hat
            break
        pn = patch_nums[si + 1]
        piece = x_BLCv[:, begin : begin + pn * pn]
        begin += pn * pn
        assert torch.equal(piece, next_BChw.flatten(2).transpose(1, 2))
        # independently: area of the cumulative f_hat, tokens in row-major order
        cumulative = q.indices_to_fhat(indices, patch_nums, upto=si + 1)
        assert torch.allclose(
            piece.transpose(1, 2).reshape(B, C, pn, pn),
            F.interpolate(cumulative, size=(pn, pn), mode="area"),
            atol=1e-6,
        )
    assert begin == L - 1
    assert torch.allclose(f_hat, q.indices_to_fhat(indices, patch_nums), atol=1e-6)


def test_next_input_accepts_soft_mixtures():
    q = make_quantizer()
    B, K = 2, len(SCHEDULE_256)
    g = torch.Generator().manual_seed(0)
    f_soft, f_hard = torch.zeros(B, C, 16, 16), torch.zeros(B, C, 16, 16)
    for si, pn in enumerate(SCHEDULE_256):
        probs_BlV = torch.softmax(3 * torch.randn(B, pn * pn, V, generator=g), dim=-1)
        h_BChw = (probs_BlV @ q.embedding.weight).transpose(1, 2).reshape(B, C, pn, pn)
        _, nxt = q.next_input(si, SCHEDULE_256, f_soft, h_BChw)
        assert nxt.shape == ((B, C, SCHEDULE_256[si + 1], SCHEDULE_256[si + 1]) if si < K - 1 else (B, C, 16, 16))
        # a one-hot mixture is the hard code
        idx_Bl = probs_BlV.argmax(-1)
        one_hot = F.one_hot(idx_Bl, V).float() @ q.embedding.weight
        q.next_input(si, SCHEDULE_256, f_hard, one_hot.transpose(1, 2).reshape(B, C, pn, pn))
    assert torch.isfinite(f_soft).all() and not torch.equal(f_soft, f_hard)


def test_training_forward_passes_gradients_straight_through():
    q = MultiScaleQuantizer(V, C, (1, 2, 4))
    f = torch.randn(2, C, 4, 4, requires_grad=True)
    f_hat, loss, indices = q(f)
    assert torch.allclose(f_hat, q.indices_to_fhat(indices, (1, 2, 4)), atol=1e-6)
    (f_hat.sum() + loss).backward()
    assert f.grad is not None and q.embedding.weight.grad.abs().sum() > 0
    assert q.quant_resi.qresi_ls[0].weight.grad is not None


# -- nearest code ------------------------------------------------------------------------------------


def brute_force_check(z, e, idx):
    """``idx`` is the float64 argmin wherever the best code wins by a visible margin, and a minimiser elsewhere."""
    d = torch.cdist(z.double(), e.double()).square()
    best, second = d.topk(2, dim=1, largest=False).values.unbind(1)
    clear = (second - best) > 1e-4
    assert torch.equal(idx[clear], d.argmin(1)[clear]) and clear.float().mean() > 0.99
    assert (d.gather(1, idx[:, None])[:, 0] - best).max() <= 1e-4


@pytest.mark.parametrize(
    "N, V_, chunk_rows", [(1000, 300, 7), (1000, 300, 64), (999, 77, None), (1, 5, 1), (65, 4096, 64)]
)
def test_nearest_code_matches_brute_force(N, V_, chunk_rows):
    g = torch.Generator().manual_seed(N + V_)
    z, e = torch.randn(N, 16, generator=g), torch.randn(V_, 16, generator=g)
    idx = nearest_code_torch(z, e, chunk_rows=chunk_rows)
    assert idx.dtype == torch.long and idx.shape == (N,)
    brute_force_check(z, e, idx)
    assert torch.equal(idx, nearest_code(z, e)) and torch.equal(idx, nearest_code(z, e, backend="torch"))


def test_nearest_code_default_chunking(monkeypatch):
    import nextscale.kernels.quantize as kq

    monkeypatch.setattr(kq, "MAX_CHUNK_ELEMENTS", 1000)  # 10 rows of 100 codes per chunk
    g = torch.Generator().manual_seed(1)
    z, e = torch.randn(105, 8, generator=g), torch.randn(100, 8, generator=g)
    brute_force_check(z, e, kq.nearest_code(z, e))


def test_nearest_code_rejects_bad_input():
    assert "torch" in available_backends()
    with pytest.raises(ValueError, match="backend"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 4), backend="cuda-magic")
    with pytest.raises(ValueError):
        nearest_code(torch.randn(3, 4), torch.randn(5, 3))
