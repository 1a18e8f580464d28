"""No host syncs in the scale loop: a :class:`SyncAudit` (``TorchFunctionMode``) watches whole sampling runs of VAR
(every KV policy, HACK with per-head budgets), collaborative decoding and Infinity, and fails on any call that reads a
tensor back to the host (``.item()``, ``.cpu()``, ``.tolist()``, ``.numpy()``, ``bool()``, ``int()``, ``float()``) or
creates a tensor without saying on which device, outside :data:`ALLOWED`."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from nextscale.models.core.hooks import SamplerHooks
from nextscale.models.infinity.sampler import InfinityOptions, TextCondition, sample_infinity
from nextscale.models.kv.policies import POLICIES, KVPolicySpec
from nextscale.models.var.collaborative import sample_collaborative
from nextscale.models.var.sampler import SamplingOptions, sample
from test_infinity import SCHEDULE, TINY, prompts, tiny_model
from test_infinity_sampler import tiny_tokenizer
from test_kv_policies import make_pair, pair, profile  # noqa: F401 (fixtures)
from torch.overrides import TorchFunctionMode

PACK = Path(__file__).resolve().parents[1]
READS = {"item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "linspace", "eye", "rand", "randn",
             "randint"}
# (file, function) of the pack: the only places that may read back or create a tensor without a device
ALLOWED = {
    ("models/var/sampler.py", "check_labels"),  # the label range, one read per run before the loop
    ("models/infinity/model.py", "condition"),  # the prompt lengths, once per run before the loop
}


class SyncAudit(TorchFunctionMode):
    """Records ``(file, function, op)`` of every host read and device-less factory, the pack's innermost frame."""

    def __init__(self):
        super().__init__()
        self.found: set[tuple[str, str, str]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS or (name in FACTORIES and "device" not in kwargs and func.__module__ in ("torch", None)):
            self.found.add((*caller(), name))
        return func(*args, **kwargs)


def caller() -> tuple[str, str]:
    """``(file, function)`` of the innermost frame in the pack's code (tests and the test bed under ``.testbed/``,
    which lives inside the checkout, excluded) above the audited call."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        path = path.resolve() if path.is_absolute() else None  # None: "<frozen ...>", "<string>"
        if path is not None and path.is_relative_to(PACK) and not any(
            path.is_relative_to(PACK / outside) for outside in ("tests", ".testbed")
        ):
            return str(path.relative_to(PACK)), frame.f_code.co_name
        frame = frame.f_back
    return "outside the pack", ""


def violations(audit: SyncAudit) -> list[tuple[str, str, str]]:
    return sorted(f for f in audit.found if f[:2] not in ALLOWED and f[0] != "outside the pack")


def test_the_audit_sees_host_reads_and_device_less_factories():
    with SyncAudit() as audit:
        x = torch.ones(3, device="cpu")
        assert bool(x.any()) and int(x.sum()) == 3 and x.max().item() == 1.0
        x.cpu()
        torch.zeros(2)
    assert {op for _, _, op in audit.found} >= {"__bool__", "__int__", "item", "cpu", "zeros"}
    assert "ones" not in {op for _, _, op in audit.found}


@pytest.mark.parametrize("policy", POLICIES)
def test_a_var_run_with_each_kv_policy_never_waits_for_the_device(pair, profile, policy):  # noqa: F811
    var, vae = pair
    spec = KVPolicySpec(policy, 0.2, profile)
    bound = spec.bind(var, 2)
    with SyncAudit() as audit:
        sample(var, vae, torch.tensor([1, 4]), seed=3, options=SamplingOptions(cfg=2.0, more_smooth=True),
               hooks=SamplerHooks(kv_policy=bound))
    assert violations(audit) == []
    if policy == "hack":  # the profile makes heads of unequal budgets: the padded layout was used
        assert any(len(set(bound.head_budgets(layer, 0))) > 1 for layer in range(var.depth))


def test_collaborative_and_infinity_runs_never_wait_for_the_device(pair, profile):  # noqa: F811
    var, vae = pair
    drafter = make_pair(seed=1)[0]
    hooks = SamplerHooks(kv_policy=KVPolicySpec("hack", 0.2, profile).bind(var, 2))
    with SyncAudit() as collaborative:
        sample_collaborative(drafter, var, vae, torch.tensor([1, 4]), draft_scales=3, seed=3, hooks=hooks)
    assert violations(collaborative) == []

    model, tok = tiny_model(), tiny_tokenizer()
    text, mask = prompts()
    options = dataclasses.replace(InfinityOptions(cfg=3.0, tau=1.0), schedule=SCHEDULE)
    policy = KVPolicySpec("scalekv", 0.3).bind_scales(model.depth, TINY.num_heads, SCHEDULE.scales)
    with SyncAudit() as infinity:
        sample_infinity(model, tok, TextCondition(text, mask), seed=3, options=options,
                        hooks=SamplerHooks(kv_policy=policy))
    assert violations(infinity) == []
