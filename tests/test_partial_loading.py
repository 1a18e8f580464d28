"""Partial loading: every model built with ComfyUI's manual-cast op set computes on the device it is loaded to.

ComfyUI loads a model that does not fit (its default VRAM mode, ``--lowvram``, ``--novram``) in part: it moves the
weights of leaf layers that fit and leaves the rest on the offload device, where layers with ``comfy_cast_weights``
are cast per call. Here a ``ModelPatcher`` loads VAR, Infinity, NSARM, the VAR tokenizer, the BSQ tokenizer and both
control kinds (NextScale adapters, CAR) onto ``meta`` (a stand-in GPU) at 0x, 0.5x and 1x of their size, as
``load_models_gpu`` does (``partially_load(device, extra_memory)``); then one step runs (generators: scales 0 and 1
through the KV cache; tokenizers: encode and decode; controls: their per-scale injection) under :class:`DeviceAudit`,
which records every torch call that touches a tensor off ``meta`` or computes in fp8. VAR and Infinity run once more
with fp8 storage computed in bf16. The same audit flags the plain torch op set, and a manual-cast model computes
exactly what the torch one does with the same weights.

The ComfyUI side runs in the test bed's python (it needs ``comfy``): :func:`audit_report` below, called by a short
script, reports every case as JSON; the tests read that report. :func:`audit_report` and its helpers import ComfyUI
only when called.
"""

from __future__ import annotations

import json
import textwrap
import traceback
from collections.abc import Sequence

import pytest
import torch
from harness.testbed import run_in_comfyui_python
from nextscale.models.control.adapters import AdapterConfig, CARConfig, CARControlNet, ControlAdapter
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.kv_cache import KVCache
from nextscale.models.core.ops import ComputeDtype
from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer
from nextscale.models.infinity.model import Infinity, InfinityConfig
from nextscale.models.infinity.schedule import InfinitySchedule
from nextscale.models.nsarm.mapper import MapperConfig
from nextscale.models.nsarm.model import NSARM, NSARMConfig
from nextscale.models.var.model import VAR, VARConfig
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

META, CPU = torch.device("meta"), torch.device("cpu")
FRACTIONS = (0.0, 0.5, 1.0)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)

VAR_CFG = VARConfig(depth=2, embed_dim=64, num_heads=4, num_classes=10, vocab_size=32, cvae=8, patch_nums=(1, 2, 3))
VAR_SHARED_CFG = VARConfig(
    depth=2, embed_dim=64, num_heads=4, num_classes=10, vocab_size=32, cvae=8, patch_nums=(1, 2, 3), shared_aln=True
)
INFINITY_CFG = InfinityConfig(
    depth=2, embed_dim=64, num_heads=4, hidden_dim=128, token_dim=4, text_dim=32, text_maxlen=8, block_chunks=2,
    pool_heads=2,
)
SCHEDULE = InfinitySchedule.custom([(1, 1), (2, 2), (3, 3)])
NSARM_CFG = NSARMConfig(
    INFINITY_CFG,
    MapperConfig(channels=4, grid=4, sides=(1, 2, 4), widths=(8, 16, 16), layers=(1, 1, 1), heads=(1, 2, 2),
                 stem=(8, 8), resolution="0.06M"),
)
TOKENIZER_CFG = TokenizerConfig(
    vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4)
)
BSQ_CFG = BSQConfig(codebook_dim=4, base_ch=32, ch_mult=(1, 2), num_res_blocks=1)
BSQ_SCALES = [(1, 1), (2, 2), (4, 4)]
CAR_CFG = CARConfig(embed_dim=64, num_heads=4, depth=1, hidden_dim=256, encoder_channels=(8, 16))
ADAPTER_SIZES = dict(channels=(8, 16), feat_dim=16, image_size=16, num_heads=2)

MODELS = ("var", "var-shared", "infinity", "nsarm", "tokenizer", "bsq", "adapter-add", "adapter-reference", "car")
CONTROLS = ("adapter-add", "adapter-reference", "car")  # they drive a generator, loaded beside them
FP8_MODELS = ("var", "var-shared", "infinity")
# What one step returns: (shape, dtype) of the logits, the decoded images or the controlled hidden state.
OUTPUTS = {
    "var": ((4, 4, 32), "float32"),
    "var-shared": ((4, 4, 32), "float32"),
    "infinity": ((4, 4, 8), "float32"),
    "nsarm": ((4, 4, 8), "float32"),
    "tokenizer": ((2, 3, 8, 8), "float32"),
    "bsq": ((2, 3, 8, 8), "float32"),
    "adapter-add": ((4, 4, 64), "float32"),
    "adapter-reference": ((4, 4, 64), "float32"),
    "car": ((4, 4, 32), "float32"),
}


# -- the models and one step of each --------------------------------------------------------------------------------


def reference_models() -> dict[str, torch.nn.Module]:
    """One randomly initialised model per name (plain torch layers, fp32): the weights every build copies."""
    torch.manual_seed(0)
    models = {
        "var": VAR(VAR_CFG),
        "var-shared": VAR(VAR_SHARED_CFG),
        "infinity": Infinity(INFINITY_CFG),
        "nsarm": NSARM(NSARM_CFG),
        "tokenizer": MultiScaleVQVAE(TOKENIZER_CFG),
        "bsq": BSQTokenizer(BSQ_CFG),
        "adapter-add": ControlAdapter(AdapterConfig.for_generator(VAR_CFG, **ADAPTER_SIZES)),
        "adapter-reference": ControlAdapter(AdapterConfig.for_generator(VAR_CFG, kind="reference", **ADAPTER_SIZES)),
        "car": CARControlNet(CAR_CFG),
    }
    with torch.no_grad():  # no zero-initialised gate, gain or projection: every path changes the output
        for model in models.values():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return models


def build(reference: dict, name: str, operations=None, compute_dtype=None) -> torch.nn.Module:
    """``name``'s reference weights (copied) in a model built with ``operations``, computing in ``compute_dtype``."""
    state_dict = {k: v.clone() for k, v in reference[name].state_dict().items()}
    config, kw = reference[name].config, dict(operations=operations, compute_dtype=compute_dtype)
    if name == "car":
        return CARControlNet.from_state_dict(state_dict, **kw)
    if name in CONTROLS:
        return ControlAdapter.from_state_dict(state_dict, config, **kw)
    if name == "nsarm":
        return NSARM.from_state_dict(state_dict, config=reference[name].setup, **kw)
    cls = {"var": VAR, "var-shared": VAR, "infinity": Infinity, "tokenizer": MultiScaleVQVAE, "bsq": BSQTokenizer}
    return cls[name].from_state_dict(state_dict, config=config, **kw)


def step_inputs(name: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The inputs of one step, made on the CPU from a fixed seed and moved to ``device`` (before the audit)."""
    g = torch.Generator().manual_seed(1)
    shapes = {
        "var": {"next_1": (2, 4, 8)},
        "var-shared": {"next_1": (2, 4, 8)},
        "infinity": {"text": (2, 5, 32), "next_1": (2, 4, 4)},
        "nsarm": {"text": (2, 5, 32), "next_1": (2, 4, 4), "latent": (2, 4, 4, 4)},
        "tokenizer": {"image": (2, 3, 8, 8)},
        "bsq": {"image": (2, 3, 8, 8)},
        "adapter-add": {"image": (2, 3, 16, 16), "x": (4, 4, 64)},
        "adapter-reference": {"image": (2, 3, 16, 16), "x": (4, 4, 64)},
        "car": {"image": (2, 3, 16, 16), "next_1": (2, 4, 8)},
    }[name]
    out = {k: torch.randn(*s, generator=g).clamp(-1, 1) for k, s in shapes.items()}
    out["labels"] = torch.tensor([1, 2, 10, 10])  # two images and their null-class rows (guidance)
    out["mask"] = torch.ones(2, 5, dtype=torch.bool)
    return {k: v.to(device) for k, v in out.items()}


def var_step(var: VAR, x: dict, control=None) -> torch.Tensor:
    """Scales 0 and 1 through the KV cache, as the sampler runs them."""
    cond = var.condition(x["labels"])
    cache = KVCache(var.depth, var.num_tokens)
    try:
        var.forward_scale(0, var.first_token_map(cond), cond, cache, control)
        return var.forward_scale(1, var.scale_input(1, x["next_1"], cond).repeat(2, 1, 1), cond, cache, control)
    finally:
        cache.free()


def infinity_step(model: Infinity, x: dict) -> torch.Tensor:
    ctx = model.condition(x["text"], x["mask"])
    cache = KVCache(model.depth, SCHEDULE.num_tokens)
    try:
        model.forward_scale(0, model.first_token_map(ctx), ctx, cache, SCHEDULE)
        return model.forward_scale(1, model.scale_input(1, x["next_1"]).repeat(2, 1, 1), ctx, cache, SCHEDULE)
    finally:
        cache.free()


def step(name: str, models: list[torch.nn.Module], x: dict) -> torch.Tensor:
    """One step of ``name``; ``models`` is its model, then (controls) the generator it drives."""
    model = models[0]
    if name.startswith("var"):
        return var_step(model, x)
    if name == "infinity":
        return infinity_step(model, x)
    if name == "nsarm":  # the transformation network, then the transformer
        model.map_transformer.bits(x["latent"])
        return infinity_step(model, x)
    if name == "tokenizer":
        return model.indices_to_img(model.img_to_indices(x["image"]))
    if name == "bsq":
        return model.decode(model.bits_to_summed_codes(model.encode_bits(x["image"], BSQ_SCALES)))
    control = model.bind(models[1], x["image"], batch_size=2)
    if name == "car":
        return var_step(models[1], x, control)
    hidden = x["x"]
    for layer in model.slot:
        hidden = control.block_input(1, layer, hidden)
    return hidden


# -- the audit, and the cases it runs in ComfyUI's python -------------------------------------------------------------


MOVES = (torch.Tensor.to, torch.Tensor.copy_, torch.empty_like)
SCALAR_READS = ("__int__", "__bool__", "__float__", "__index__", "item", "tolist")


def on_meta(t: torch.Tensor) -> bool:
    return t.is_meta and t.dtype not in FP8


class DeviceAudit(TorchFunctionMode):
    """Records every torch call that touches a tensor off ``meta`` (the compute device) or computes in fp8.

    Allowed: calls whose tensor arguments and results are all on ``meta`` and none in fp8; moves (``.to``, and
    ``empty_like`` + ``copy_`` as ComfyUI's per-call cast makes them) whose results are on ``meta``; reads of a
    tensor's metadata (attribute getters that return no tensor: ``.device``, ``.dtype``, ``.shape``). Meta tensors
    hold no values: a Python scalar read of one (``int()``, ``.item()``) answers 1, as the input checks it feeds
    expect."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if name in SCALAR_READS and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return 1
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        reads_anywhere = func in MOVES or name == "__get__"  # a move's source; a getter's tensor
        if not reads_anywhere and not all(on_meta(t) for t in inputs):
            self.record(func, name, inputs)  # before the call, which may fail on the mixed devices
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if func in MOVES:
            ok = all(t.is_meta for t in outputs) and (func is not torch.Tensor.copy_ or args[0].is_meta)
        else:
            ok = all(on_meta(t) for t in outputs)
        if not ok:
            self.record(func, name, inputs, outputs)
        return out

    def record(self, func, name: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor] = ()) -> None:
        owner = getattr(getattr(func, "__self__", None), "__name__", "")
        where = [f"{t.device.type}:{str(t.dtype)[6:]}" for t in inputs]
        where += ["->"] + [f"{t.device.type}:{str(t.dtype)[6:]}" for t in outputs]
        self.violations.append(f"{owner + '.' if owner else ''}{name}({', '.join(where)})")


def partial_load(models: list[torch.nn.Module], fraction: float) -> None:
    """Each model in a ``ModelPatcher`` on ``meta``, loaded as ``load_models_gpu`` loads it when ``fraction`` of its
    size is free (``LoadedModel.model_load`` -> ``partially_load(device, extra_memory)``)."""
    import comfy.model_patcher

    for model in models:
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=META, offload_device=CPU)
        patcher.partially_load(META, extra_memory=int(fraction * patcher.model_size()))


def audited_step(reference: dict, name: str, fraction: float, operations, storage=None) -> dict:
    """``name`` (and the generator a control drives) built with ``operations`` (with fp8 ``storage``: computing in
    bf16), partially loaded at ``fraction`` of its size, then one step under the audit."""
    compute_dtype = None if storage is None else torch.bfloat16
    models = [build(reference, name, operations, compute_dtype)]
    if name in CONTROLS:
        models.append(build(reference, "var", operations, compute_dtype))
    if storage is not None:
        models = [m.to(storage) for m in models]
    partial_load(models, fraction)
    placed = [t.device.type for t in (*models[0].parameters(), *models[0].buffers())]
    x = step_inputs(name, META)
    if name in ("infinity", "nsarm"):
        models[0].rope(SCHEDULE, META)  # the run's RoPE table: made on the CPU from the schedule alone, then moved
    result = {"on_meta": placed.count("meta"), "on_cpu": placed.count("cpu"), "error": None}
    audit = DeviceAudit()
    try:
        with torch.no_grad(), audit:
            out = step(name, models, x)
        result.update(shape=list(out.shape), dtype=str(out.dtype)[6:], device=out.device.type)
    except Exception as e:  # reported: the tests show it
        result["error"] = "".join(traceback.format_exception_only(e)).strip()[-600:]
    result.update(violations=audit.violations[:8], num_violations=len(audit.violations))
    return result


def audit_report() -> dict:
    """Every case of this module, run in ComfyUI's python: ``"<model>/<storage>/<fraction>"`` -> the audited step;
    ``"parity"``: model -> whether the manual-cast build computes exactly what the torch build does (on the CPU)."""
    import comfy.ops

    reference = reference_models()
    report = {}
    for name in MODELS:
        for fraction in FRACTIONS:
            report[f"{name}/fp32/{fraction}"] = audited_step(reference, name, fraction, comfy.ops.manual_cast)
    for name in FP8_MODELS:
        for fraction in FRACTIONS:
            report[f"{name}/fp8/{fraction}"] = audited_step(
                reference, name, fraction, comfy.ops.manual_cast, torch.float8_e4m3fn
            )
    report["var/torch/0.5"] = audited_step(reference, "var", 0.5, None)
    parity = {}
    for name in MODELS:
        x = step_inputs(name, CPU)
        drives = ["var"] if name in CONTROLS else []
        with torch.no_grad():
            plain = step(name, [build(reference, n) for n in [name, *drives]], x)
            cast = step(name, [build(reference, n, comfy.ops.manual_cast) for n in [name, *drives]], x)
        parity[name] = bool(torch.equal(plain, cast)) and bool(plain.abs().sum() > 0)
    report["parity"] = parity
    return report


SCRIPT = textwrap.dedent(
    """
    import importlib.util, json
    spec = importlib.util.spec_from_file_location("partial_loading", root + "/tests/test_partial_loading.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print("REPORT " + json.dumps(module.audit_report()))
    """
)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    result = run_in_comfyui_python(SCRIPT, cwd=tmp_path_factory.mktemp("partial_loading"), timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT ") :])


CASES = [f"{n}/fp32/{f}" for n in MODELS for f in FRACTIONS] + [f"{n}/fp8/{f}" for n in FP8_MODELS for f in FRACTIONS]


@pytest.mark.parametrize("case", CASES)
def test_a_partially_loaded_model_computes_on_the_load_device(report, case):
    name, _, fraction = case.split("/")
    r = report[case]
    assert r["error"] is None, r["error"]
    assert r["num_violations"] == 0, r["violations"]
    assert (tuple(r["shape"]), r["dtype"], r["device"]) == (*OUTPUTS[name], "meta")
    assert r["on_cpu"] > 0  # a partial load leaves tensors on the offload device, even when everything would fit
    if float(fraction) == 0.0:
        assert r["on_meta"] == 0
    else:
        assert r["on_meta"] > 0


def test_plain_torch_layers_fail_the_audit(report):
    """The audit catches what the op set fixes: a torch layer left on the CPU by the partial load."""
    r = report["var/torch/0.5"]
    assert r["num_violations"] > 0 and any("cpu" in v for v in r["violations"]), r


@pytest.mark.parametrize("name", MODELS)
def test_the_manual_cast_op_set_computes_what_torch_layers_compute(report, name):
    assert report["parity"][name] is True


# -- the compute dtype (no ComfyUI needed) --------------------------------------------------------------------------


def test_the_compute_dtype_reaches_every_module_that_casts():
    var = VAR(VAR_CFG, compute_dtype=torch.bfloat16)
    inner = [m for m in var.modules() if isinstance(m, ComputeDtype)]
    assert len(inner) == 1 + 2 * VAR_CFG.depth  # the model, each block and its attention
    assert {m.compute_dtype for m in inner} == {torch.bfloat16}
    var.compute_dtype = None  # back to the weights' dtype, which follows .to()
    var.to(torch.float16)
    assert {m.compute_dtype for m in inner} == {torch.float16}
    with pytest.raises(NextScaleError, match=r"compute dtype torch\.int64 is not one of"):
        var.compute_dtype = torch.int64


def test_fp8_weights_need_a_compute_dtype():
    var = VAR(VAR_CFG).to(torch.float8_e4m3fn)
    with pytest.raises(NextScaleError, match=r"weights in torch\.float8_e4m3fn.*\(compute_dtype=torch\.bfloat16"):
        var.condition(torch.tensor([0]))
