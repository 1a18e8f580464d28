"""The loading service in ComfyUI's python: precision under ComfyUI's flags on mocked cards, one load_models_gpu
call per node execution declaring at least the KV cache the run allocates (VAR-d36 at batch 16 on the meta device
too), and a toy third family registered with one line and run Load -> Sample -> Decode through the real nodes."""

from __future__ import annotations

import textwrap

from harness.testbed import run_in_comfyui_python

PREAMBLE = """
import os, tempfile
import torch
import folder_paths
import comfy.model_management as mm
from comfy_api.latest import io

from harness.checks import raises

folder = tempfile.mkdtemp()
folder_paths.add_model_folder_path("nextscale", folder, is_default=True)
"""

PRECISION = PREAMBLE + """
import comfy.ops
from comfy.cli_args import args
from nextscale.models.core.checkpoint import save_safetensors
from nextscale.models.infinity.family import GENERATOR as INFINITY
from nextscale.models.var.family import CAR, GENERATOR, TOKENIZER
from nextscale.nodes.service import load, precision
from test_sampler import make_var

class Card:  # what should_use_fp16 / should_use_bf16 read from torch.cuda.get_device_properties
    def __init__(self, name, major, minor):
        self.name, self.major, self.minor = name, major, minor

CARDS = {
    "gtx16": Card("NVIDIA GeForce GTX 1660 SUPER", 7, 5),  # ComfyUI: fp16 is broken on these
    "pascal": Card("NVIDIA GeForce GTX 1080", 6, 1),
    "ampere": Card("NVIDIA GeForce RTX 3090", 8, 6),
}
cuda = torch.device("cuda", 0)
card = None
mm.cpu_state = mm.CPUState.GPU  # as if ComfyUI had started on an NVIDIA card (this process ran with --cpu)
mm.get_torch_device = lambda: cuda
mm.get_total_memory = lambda dev=None, torch_total_too=False: (24 * 2**30,) * 2 if torch_total_too else 24 * 2**30
torch.cuda.get_device_properties = lambda device=None: card
torch.cuda.is_bf16_supported = lambda including_emulation=True: card.major >= 8
FLAGS = ("fp32_unet", "bf16_unet", "fp16_unet", "fp8_e4m3fn_unet", "bf16_vae", "fp16_vae")

def under(flag):
    for f in FLAGS:
        setattr(args, f, False)
    mm.FORCE_FP32 = flag == "force_fp32"
    if flag in FLAGS:
        setattr(args, flag, True)

bf16, fp16, fp32, fp8 = torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn
manual, plain = comfy.ops.manual_cast, comfy.ops.disable_weight_init
# a transformer's auto precision, (storage, compute, op set), under each flag on each card
EXPECTED = {
    None: {"gtx16": (fp32, fp32, plain), "pascal": (fp16, fp32, manual), "ampere": (bf16, bf16, plain)},
    "force_fp32": {"gtx16": (fp32, fp32, plain), "pascal": (fp32, fp32, plain), "ampere": (fp32, fp32, plain)},
    "fp32_unet": {"gtx16": (fp32, fp32, plain), "pascal": (fp32, fp32, plain), "ampere": (fp32, fp32, plain)},
    "bf16_unet": {"gtx16": (bf16, fp32, manual), "pascal": (bf16, fp32, manual), "ampere": (bf16, bf16, plain)},
    "fp16_unet": {"gtx16": (fp16, fp32, manual), "pascal": (fp16, fp32, manual), "ampere": (fp16, fp16, plain)},
    "fp8_e4m3fn_unet": {"gtx16": (fp8, fp32, manual), "pascal": (fp8, fp32, manual), "ampere": (fp8, bf16, manual)},
}
params = 10**6
for flag, per_card in EXPECTED.items():
    under(flag)
    for name, want in per_card.items():
        card = CARDS[name]
        for role in (GENERATOR, INFINITY, CAR):
            got = precision(role, "auto", cuda, params)
            supported = list(role.dtypes)
            assert got.weight_dtype == mm.unet_dtype(cuda, params, supported), (flag, name, role.what)
            compute = mm.unet_manual_cast(got.weight_dtype, cuda, supported) or got.weight_dtype
            assert got.compute_dtype == compute, (flag, name, role.what)
            assert got.operations is comfy.ops.pick_operations(got.weight_dtype, compute, load_device=cuda)
            assert (got.weight_dtype, got.compute_dtype, got.operations) == want, (flag, name, role.what, got)
        tokenizer = precision(TOKENIZER, "auto", cuda, params).weight_dtype
        assert tokenizer == mm.vae_dtype(cuda, list(TOKENIZER.dtypes)) == fp32, (flag, name, tokenizer)
for flag, want in (("bf16_vae", bf16), ("fp16_vae", fp16)):  # tokenizers follow ComfyUI's VAE flags
    under(flag)
    card = CARDS["ampere"]
    assert precision(TOKENIZER, "auto", cuda, params).weight_dtype == want, flag
    assert precision(GENERATOR, "auto", cuda, params).weight_dtype == bf16, flag

# an explicit choice is stored as chosen; computed as ComfyUI's manual cast says, or as chosen on the CPU
dtypes = lambda choice, device=cuda: (lambda p: (p.weight_dtype, p.compute_dtype))(
    precision(GENERATOR, choice, device, params))
under(None)
card = CARDS["gtx16"]
assert dtypes("float16") == (fp16, fp32)
card = CARDS["ampere"]
assert dtypes("float16") == (fp16, fp16)
assert dtypes("bfloat16", torch.device("cpu")) == (bf16, bf16) and dtypes("auto", torch.device("cpu")) == (fp32, fp32)
raises(lambda: precision(GENERATOR, "float8", cuda, params), "dtype 'float8' is not one of auto, float32")

# a file loaded on the mocked Ampere card: bf16 weights, left on the CPU until ready(); the compute device is the
# patcher's load device, not where a parameter happens to be
save_safetensors(make_var().state_dict(), os.path.join(folder, "gen.safetensors"))
model = load("gen.safetensors", "NextScale Load Generator", "generator")
assert model.dtype == bf16 and model.compute_dtype == bf16 and str(model.kind) == "var-generator"
assert model.device == cuda == model.patcher.load_device and model.patcher.offload_device == torch.device("cpu")
assert next(model.module.parameters()).device == torch.device("cpu")
assert all(p.dtype == bf16 for p in model.module.parameters())
# built from the chosen op set, so that a partial load can leave any layer's weights off the device
linears = [m for m in model.module.modules() if isinstance(m, torch.nn.Linear)]
assert linears and all(type(m) is plain.Linear for m in linears), {type(m) for m in linears}
# fp8 storage (--fp8_e4m3fn-unet, or the loaders' fp8_e4m3fn): every matrix in fp8 with ComfyUI's per-tensor scale,
# cast per call, and the model computes in bf16; the weights are the file's within fp8's rounding (of the bf16 build)
reference = make_var().state_dict()
for how in ("flag", "choice"):
    under("fp8_e4m3fn_unet" if how == "flag" else None)
    model = load("gen.safetensors", "NextScale Load Generator", "generator", "auto" if how == "flag" else "fp8_e4m3fn")
    assert model.module.compute_dtype == bf16 == model.compute_dtype and model.dtype == fp8, how
    linears = {n: m for n, m in model.module.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(isinstance(m, manual.Linear) and m.weight.dtype == fp8 and m.scale_weight.dtype == fp32
               for m in linears.values())
    for name, m in linears.items():
        w = reference[name + ".weight"]
        largest = w.abs().max()  # maps to 448, e4m3fn's largest value; 3 mantissa bits below it
        assert torch.isclose(m.scale_weight * 448, largest, rtol=1e-2), name
        assert (m.weight.float() * m.scale_weight - w).abs().max() <= largest / 16, name
raises(lambda: precision(TOKENIZER, "fp8_e4m3fn", cuda, params), "are not stored in fp8")
print("precision ok")
"""

EXECUTIONS = PREAMBLE + """
from nextscale.models.core.kv_cache import KVCache, LayerKV
from nextscale.models.core.schedule import SCHEDULE_512
from nextscale.models.kv.policies import KVPolicySpec
from nextscale.models.var.model import VAR, VARConfig
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from nextscale.nodes.accel import NextScaleAcceleration
from nextscale.nodes.collaborative import NextScaleCollaborativeSampler
from nextscale.nodes.control import NextScaleApplyControl
from nextscale.nodes.generator import NextScaleSampler
from nextscale.nodes.infinity import NextScaleTextSampler
from nextscale.nodes.kv import NextScaleKVCalibrate, NextScaleKVReport
from nextscale.nodes.service import adopt
from nextscale.nodes.tokenizer import NextScaleDecode, NextScaleEncode
from nextscale.nodes.upscale import NextScaleUpscale
from nextscale.models.nsarm.model import NSARM
from test_control import adapter_for, make_car, make_var4
from test_infinity import tiny_model
from test_infinity_sampler import tiny_tokenizer
from test_sampler import CVAE, PN, VOCAB, make_var
from test_nsarm import TINY as NSARM_TINY, randomised

calls, caches = [], []
real_load = mm.load_models_gpu
def counting(models, memory_required=0, **kw):
    calls.append((len(models), memory_required))
    return real_load(models, memory_required=memory_required, **kw)
mm.load_models_gpu = counting

peak = [0]
init, extend = KVCache.__init__, LayerKV.extend
def track_init(cache, *a, **k):
    init(cache, *a, **k)
    caches.append(cache)
def track_extend(kv, *a, **k):
    out = extend(kv, *a, **k)
    peak[0] = max(peak[0], sum(c.nbytes() for c in caches))  # every cache held at once (freed ones hold 0)
    return out
KVCache.__init__, LayerKV.extend = track_init, track_extend

def one_call(name, run, models, kv=True):
    calls.clear(), caches.clear()
    peak[0] = 0
    out = run()
    assert len(calls) == 1, (name, calls)
    count, memory = calls[0]
    assert count == models, (name, count, models)
    assert memory >= peak[0] and (peak[0] > 0) == kv and memory > 0, (name, memory, peak[0])
    print(f"{name}: declared {memory:,} bytes, KV cache peak {peak[0]:,}")
    return out

for node in (NextScaleSampler, NextScaleTextSampler, NextScaleCollaborativeSampler, NextScaleKVCalibrate,
             NextScaleUpscale):
    node.hidden = io.HiddenHolder.from_dict({})
torch.manual_seed(0)
var4, var = make_var4(), make_var()
vae = MultiScaleVQVAE(TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                      patch_nums=PN)).eval()
gen4, gen, tok = adopt(var4), adopt(var), adopt(vae)
edges = torch.zeros(1, 16, 16, 3)
edges[:, 4:12, 4:12] = 1
car = NextScaleApplyControl.execute(adopt(make_car()), edges, 1.0, 0, 0, 1.0).result[0]
adapter = adopt(adapter_for(var4, "add", randomize=True))
chain = NextScaleApplyControl.execute(adapter, edges, 1.0, 1, 3, 1.0, car).result[0]
policy = KVPolicySpec("scalekv", 0.3)

sampler = lambda **kw: NextScaleSampler.execute(**{**dict(generator=gen4, tokenizer=tok, class_name="3", seed=5,
    cfg=2.0, top_k=0, top_p=0.0, more_smooth=False, batch_size=2, class_list="1, 2"), **kw}).result[0]
tokens = one_call("sampler", sampler, 2)
one_call("sampler + CAR + adapter + KV policy", lambda: sampler(control=chain, kv_policy=policy), 4)
accel = NextScaleAcceleration.execute(1, 0.5, 1, "cached", 2, 1).result[0]
fast = one_call("sampler + acceleration", lambda: sampler(accel=accel), 2)
assert fast.extra["accel"] == "prune 1@0.5 from layer 1 (cached), unguided 2, shortcut 1" and fast.f_hat is not None
one_call("collaborative", lambda: NextScaleCollaborativeSampler.execute(gen, adopt(make_var(seed=1)), tok, 2, "3", 5,
         2.0, 0, 0.0, False, 2).result[0], 3)
one_call("KV calibrate", lambda: NextScaleKVCalibrate.execute(gen, tok, 2, 0, 2.0, "", "").result, 2)
one_call("KV report", lambda: NextScaleKVReport.execute(gen, tok, policy, "3", 5, 2.0, 2).result, 2)
image = one_call("decode", lambda: NextScaleDecode.execute(tok, tokens, 0).result[0], 1, kv=False)
one_call("encode", lambda: NextScaleEncode.execute(tok, image, "center crop").result[0], 1, kv=False)

infinity, bsq = adopt(tiny_model()), adopt(tiny_tokenizer())
text = [[torch.randn(1, 5, infinity.module.config.text_dim), {}]]
one_call("text sampler", lambda: NextScaleTextSampler.execute(infinity, bsq, text, 1, 3.0, 1.0, 0, 0.0, "2:1 landscape",
         "0.06M", 2, None, policy, torch.rand(1, 40, 80, 3), 2).result[0], 2)
nsarm = adopt(randomised(NSARM(NSARM_TINY), 0))
one_call("upscale, 6 tiles", lambda: NextScaleUpscale.execute(nsarm, adopt(tiny_tokenizer()), torch.rand(2, 12, 20, 3),
         1, 4.0, 1.0, 0.5, 3, "tiles", 0.25, "seamless", "adain + wavelet", None, policy).result[0], 2)
one_call("text sampler + acceleration", lambda: NextScaleTextSampler.execute(infinity, bsq, text, 1, 3.0, 1.0, 0, 0.0,
         "1:1", "0.06M", 1, accel=accel).result[0], 2)

# VAR-d36 at batch 16 with its CFG rows in bf16, on the meta device: the declaration alone (no memory is used)
class Declared(Exception):
    pass

def declare(models, memory_required=0, **kw):
    calls.append((len(models), memory_required))
    raise Declared

mm.load_models_gpu = declare
calls.clear()
with torch.device("meta"):
    d36 = VAR(VARConfig.official(36)).to(torch.bfloat16)
    official_tok = MultiScaleVQVAE(TokenizerConfig(patch_nums=SCHEDULE_512))
try:
    NextScaleSampler.execute(adopt(d36), adopt(official_tok), "0", 0, 4.0, 900, 0.95, False, 16)
    raise AssertionError("the sampler ran without declaring its memory")
except Declared:
    pass
full = 2 * 36 * 32 * 2240 * 2304 * 2  # K and V, 36 layers, 32 rows, 2240 tokens, width 2304, bf16
assert calls == [(2, calls[0][1])] and calls[0][1] >= full and round(full / 2**30, 2) == 22.15, calls
print(f"VAR-d36 at batch 16 declares {calls[0][1] / 2**30:.2f} GiB (full cache {full / 2**30:.2f} GiB)")
print("executions ok")
"""

TOY = PREAMBLE + """
from nextscale.models.core.accel import Acceleration
from nextscale.models.core.checkpoint import save_safetensors
from nextscale.models.core.family import FAMILIES
from nextscale.models.core.hooks import SamplerHooks
from nextscale.models.kv.policies import KVPolicySpec
from nextscale.nodes import NODE_MODULES
from nextscale.nodes.generator import NextScaleLoadGenerator, NextScaleSampler
from nextscale.nodes.service import adopt
from nextscale.nodes.tokenizer import NextScaleDecode, NextScaleDecodeScales, NextScaleEncode, NextScaleLoadTokenizer
from toy_family import FAMILY as TOY
from toy_family import ToyGenerator, ToyTokenizer
from test_sampler import make_var

FAMILIES.register(TOY)  # the one registry line; everything else is the toy's own folder

loaders = {node.define_schema().display_name for module in NODE_MODULES for node in module.NODES}
assert all(kind.role.loader in loaders for kind in FAMILIES.kinds()), [str(k) for k in FAMILIES.kinds()]
torch.manual_seed(0)
save_safetensors(ToyGenerator().state_dict(), os.path.join(folder, "toy_generator.safetensors"))
save_safetensors(ToyTokenizer().state_dict(), os.path.join(folder, "toy_tokenizer.safetensors"))
assert "toy_generator.safetensors" in NextScaleLoadGenerator.define_schema().inputs[0].options

gen = NextScaleLoadGenerator.execute("toy_generator.safetensors", "auto").result[0]
tok = NextScaleLoadTokenizer.execute("toy_tokenizer.safetensors", "auto").result[0]
assert gen.family is TOY is tok.family and str(gen.kind) == "toy-generator" and str(tok.kind) == "toy-tokenizer"
assert gen.device == mm.get_torch_device() and tok.dtype == torch.float32
raises(lambda: NextScaleLoadGenerator.execute("toy_tokenizer.safetensors", "auto"),
       "'toy_tokenizer.safetensors' is a toy tokenizer, loaded by 'NextScale Load Tokenizer'",
       "this node expects a VAR generator (transformer) or a toy generator")

NextScaleSampler.hidden = io.HiddenHolder.from_dict({})
sample = lambda **kw: NextScaleSampler.execute(**{**dict(generator=gen, tokenizer=tok, class_name="blue", seed=7,
    cfg=1.0, top_k=0, top_p=0.0, more_smooth=False, batch_size=3, class_list="red, blue"), **kw}).result[0]
tokens = sample()
assert tokens.batch_size == 6 and tokens.patch_nums == (1, 2, 4) and tokens.labels.tolist() == [0, 0, 0, 1, 1, 1]
assert all(torch.equal(a, b) for a, b in zip(tokens.indices, sample().indices))
assert not all(torch.equal(a, b) for a, b in zip(tokens.indices, sample(seed=8).indices))

image = NextScaleDecode.execute(tok, tokens, 0).result[0]
colours = (tok.module.toy_palette + 1) / 2
assert torch.allclose(image, colours[tokens.indices[-1]].repeat_interleave(2, 1).repeat_interleave(2, 2))
stages, K = NextScaleDecodeScales.execute(tok, tokens).result
assert K == 3 and tuple(stages.shape) == (18, 8, 8, 3) and torch.equal(stages[2], image[0])
encoded = NextScaleEncode.execute(tok, image, "center crop", "1,2,4").result[0]
assert torch.equal(encoded.indices[-1], tokens.indices[-1])  # each painted colour is found again

# a hook the toy's sampler cannot honour is refused by name before anything is bound or loaded, never ignored
raises(lambda: sample(kv_policy=KVPolicySpec("full")), "Toy sampling does not support the kv_policy hook")
raises(lambda: sample(accel=Acceleration(unguided_scales=1)), "Toy sampling does not support the accel hook")
raises(lambda: TOY.sample(gen.module, tok.module, torch.tensor([0]), seed=0, hooks=SamplerHooks(guide=object())),
       "Toy sampling does not support the guide hook")
raises(lambda: sample(generator=adopt(make_var())), "is a toy tokenizer", "connect a generator and the tokenizer")
print("toy family ok")
"""


def _run(script: str, tmp_path, needle: str, timeout: float = 600) -> str:
    result = run_in_comfyui_python(textwrap.dedent(script), cwd=tmp_path, timeout=timeout)
    assert result.returncode == 0 and needle in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_precision_follows_comfyui_flags_on_mocked_cards(tmp_path):
    _run(PRECISION, tmp_path, "precision ok")


def test_one_load_per_execution_declares_the_kv_cache(tmp_path):
    _run(EXECUTIONS, tmp_path, "executions ok", timeout=900)


def test_a_toy_family_runs_through_the_real_nodes(tmp_path):
    _run(TOY, tmp_path, "toy family ok")
