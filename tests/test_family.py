"""The family protocol and registry (torch only): identifying files, registering a family, the KV geometry and
working memory against the caches runs really allocate, and the node layer's rules read from its source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.family import BUILTIN_FAMILIES, FAMILIES, Registry, Workload, describe, expect_kind, identify
from nextscale.models.core.hooks import SamplerHooks
from nextscale.models.core.kv_cache import KVCache, LayerKV
from nextscale.models.core.schedule import SCHEDULE_512
from nextscale.models.dd.model import DistilledVAR
from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer
from nextscale.models.infinity.sampler import InfinityOptions, TextCondition
from nextscale.models.kv.policies import KVPolicySpec
from nextscale.models.switti.model import Switti
from nextscale.models.var.model import VAR, VARConfig
from nextscale.models.var.sampler import SamplingOptions
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from test_control import adapter_for, make_car, make_var4
from test_dd import official_state_dict as dd_state_dict
from test_flexvar import models as flexvar_models
from test_flexvar import random_state_dict as flexvae_state_dict
from test_flexvar import tokenizer_keys
from test_infinity import SCHEDULE, prompts, tiny_model
from test_kv_policies import make_pair
from test_switti import official_state_dict

NODES_DIR = Path(__file__).resolve().parents[1] / "nodes"
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
VAR_FAMILY, INFINITY_FAMILY = FAMILIES.get("var"), FAMILIES.get("infinity")


def tiny_bsq() -> BSQTokenizer:
    torch.manual_seed(3)
    return BSQTokenizer(BSQConfig(codebook_dim=4, base_ch=32, ch_mult=(1, 2), num_res_blocks=1)).eval()


def test_every_file_is_identified_by_its_family_and_role():
    var, vae = make_pair()
    cases = {
        "var-generator": var, "var-tokenizer": vae, "var-control": make_car(),
        "infinity-generator": tiny_model(), "infinity-tokenizer": tiny_bsq(),
        "switti-generator": Switti.from_state_dict(official_state_dict()),
        "dd-generator": DistilledVAR.from_state_dict(dd_state_dict()),  # every VAR key too: "dd" is listed first
        "flexvar-generator": flexvar_models()[0],  # VAR's keys without lvl_embed: "flexvar" is listed before "var"
    }
    for name, module in cases.items():
        assert str(identify(module.state_dict())) == name, name
    assert str(identify(flexvae_state_dict(tokenizer_keys()))) == "flexvar-tokenizer"  # LlamaGen's VQ layout
    adapter = identify(adapter_for(make_var4(), "add").state_dict())
    assert str(adapter) == "var-control" and adapter.role.description == "a NextScale control adapter"
    car_with_its_generator = {**make_var4().state_dict(), **make_car().state_dict()}
    assert identify(car_with_its_generator).describe() == "a CAR control adapter, loaded by 'NextScale Load Control'"
    assert identify({"model.diffusion_model.x": torch.zeros(1)}) is None
    assert describe(None) == "not a checkpoint NextScale recognises"
    assert identify(vae.state_dict()).describe() == (
        "a VAR tokenizer (multi-scale VQ-VAE), loaded by 'NextScale Load Tokenizer'"
    )


def test_a_file_of_another_kind_names_what_it_is_and_which_node_loads_it():
    with pytest.raises(NextScaleError, match=r"generator file 'x.pth' is an Infinity BSQ tokenizer, loaded by "
                                             r"'NextScale Load Infinity'; expected a VAR generator"):
        expect_kind(tiny_bsq().state_dict(), "x.pth", "var-generator", "generator")
    expect_kind({"unknown.key": torch.zeros(1)}, "x.pth", "var-generator", "generator")  # left to the strict check


def test_a_registered_family_identifies_its_files_and_joins_its_loaders():
    from toy_family import FAMILY as TOY
    from toy_family import ToyGenerator

    registry = Registry(BUILTIN_FAMILIES)
    assert [f.name for f in registry.families] == ["dd", "flexvar", "var", "nsarm", "infinity", "switti", "hmar"]
    assert identify(ToyGenerator().state_dict()) is None  # not in the pack's registry
    registry.register(TOY)
    assert str(registry.identify(ToyGenerator().state_dict())) == "toy-generator"
    generators = registry.kinds("NextScale Load Generator", "generator")
    assert [str(k) for k in generators] == ["var-generator", "toy-generator"]
    with pytest.raises(NextScaleError, match="already registered"):
        registry.register(TOY)
    with pytest.raises(NextScaleError, match="no model family named 'sd15'"):
        registry.get("sd15")


class LiveKV:
    """The most KV-cache bytes held at once during a run (every cache made, freed ones holding nothing)."""

    def __init__(self, monkeypatch):
        self.caches, self.peak = [], 0
        init, extend = KVCache.__init__, LayerKV.extend

        def track_init(cache, *a, **k):
            init(cache, *a, **k)
            self.caches.append(cache)

        def track_extend(kv, *a, **k):
            out = extend(kv, *a, **k)
            self.peak = max(self.peak, sum(c.nbytes() for c in self.caches))
            return out

        monkeypatch.setattr(KVCache, "__init__", track_init)
        monkeypatch.setattr(LayerKV, "extend", track_extend)


@pytest.mark.parametrize("policy", [None, "recent", "scalekv", "hack"])
@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_var_working_memory_covers_the_cache_a_run_allocates(monkeypatch, policy, cfg):
    var, vae = make_pair()
    geometry = VAR_FAMILY.kv_geometry(var)
    bound = None if policy is None else KVPolicySpec(policy, 0.2).bind_scales(
        geometry.layers, geometry.heads, geometry.scales
    )
    live = LiveKV(monkeypatch)
    VAR_FAMILY.sample(var, vae, torch.tensor([1, 4]), seed=0, options=SamplingOptions(cfg=cfg),
                      hooks=SamplerHooks(kv_policy=bound))
    rows = 4 if cfg else 2
    declared = geometry.cache_bytes(rows, 4, bound)
    assert declared >= live.peak > 0
    if policy is None:  # the full cache is allocated exactly as declared
        assert declared == live.peak == 2 * var.depth * var.num_tokens * rows * var.config.embed_dim * 4
    workload = Workload(batch_size=2, guided=cfg != 0, kv_policy=bound)
    assert VAR_FAMILY.working_memory(var, vae, workload) > declared


def test_var_working_memory_counts_a_car_branch(monkeypatch):
    var, car = make_var4(), make_car()
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(TokenizerConfig(vocab_size=var.config.vocab_size, z_channels=var.config.cvae, ch=32,
                                          ch_mult=(1, 1), num_res_blocks=1, patch_nums=var.patch_nums)).eval()
    live = LiveKV(monkeypatch)
    control = car.bind(var, torch.zeros(1, 3, 16, 16), batch_size=2)
    VAR_FAMILY.sample(var, vae, torch.tensor([1, 4]), seed=0, hooks=SamplerHooks(control=control))
    plain = VAR_FAMILY.working_memory(var, vae, Workload(batch_size=2))
    with_car = VAR_FAMILY.working_memory(var, vae, Workload(batch_size=2, controls=(car,)))
    assert with_car - plain == VAR_FAMILY.kv_geometry(var).cache_bytes(4, 4) * len(car.car_blocks) // var.depth
    assert with_car >= live.peak > VAR_FAMILY.kv_geometry(var).cache_bytes(4, 4)


def test_infinity_working_memory_covers_the_cache_a_run_allocates(monkeypatch):
    model, tok = tiny_model(), tiny_bsq()
    text, mask = prompts()
    live = LiveKV(monkeypatch)
    options = InfinityOptions(cfg=3.0, tau=1.0, schedule=SCHEDULE)
    INFINITY_FAMILY.sample(model, tok, TextCondition(text, mask), seed=0, options=options)
    declared = INFINITY_FAMILY.kv_geometry(model, SCHEDULE).cache_bytes(4, 4)
    assert declared == live.peak > 0
    assert INFINITY_FAMILY.working_memory(model, tok, Workload(batch_size=2, schedule=SCHEDULE)) > declared


def test_var_d36_at_batch_16_declares_its_full_cache_from_the_config_alone():
    with torch.device("meta"):  # official sizes cost no memory on the meta device
        var = VAR(VARConfig.official(36)).to(torch.bfloat16)
        vae = MultiScaleVQVAE(TokenizerConfig(patch_nums=SCHEDULE_512))
    geometry = VAR_FAMILY.kv_geometry(var)
    assert geometry.scales == SCHEDULE_512 and geometry.num_tokens == 2240
    full = geometry.cache_bytes(rows=32, itemsize=2)  # 16 images and their CFG rows, bf16 keys and values
    assert full == 2 * 36 * 32 * 2240 * 2304 * 2 and full / 2**30 == pytest.approx(22.15, abs=0.005)
    workload = Workload(batch_size=16, guided=True, dtype=torch.bfloat16)
    assert VAR_FAMILY.working_memory(var, vae, workload) > full


def _model_classes() -> set[str]:
    """Every class under models/ that is a torch module (its bases name ``nn.Module`` or another such class)."""
    bases = {}
    for path in MODELS_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = {ast.unparse(b) for b in node.bases}
    modules = {"nn.Module", "nn.ModuleList", "nn.Conv2d", "nn.Sequential"}
    found: set[str] = set()
    while True:
        more = {name for name, b in bases.items() if b & (modules | found)} - found
        if not more:
            return found
        found |= more


def test_nodes_dispatch_through_families_and_load_in_one_place():
    model_classes = _model_classes()
    assert {"VAR", "MultiScaleVQVAE", "Infinity", "BSQTokenizer", "CARControlNet", "ControlAdapter"} <= model_classes
    checks, loads = [], []
    for path in sorted(NODES_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name == "isinstance":
                classes = node.args[1]
                names = [ast.unparse(e) for e in (classes.elts if isinstance(classes, ast.Tuple) else [classes])]
                checks += [(path.name, n) for n in names if n.split(".")[-1] in model_classes]
            if name.endswith("load_models_gpu"):
                loads.append(path.name)
    assert checks == [], f"nodes branch on model classes: {checks}"
    assert loads == ["service.py"], loads
