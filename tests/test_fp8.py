"""fp8 storage with ComfyUI's per-tensor scales (nodes/service.py, ``store_scaled_fp8``), in ComfyUI's python on
the CPU: a VAR and an Infinity transformer loaded with ``dtype = fp8_e4m3fn`` hold half of bf16's bytes in their
matrices, compute through ComfyUI's scaled-fp8 layers and ``ops.weight_and_bias``, and give the logits of the same
file loaded in float32 within fp8's rounding, where the plain cast without scales (``.to(fp8)``) loses the small
weights of a trained-scale model. The loaders of Switti, Distilled Decoding, NSARM and HMAR offer the same storage
for their transformer (their tokenizer keeps its precision) and give the fp32 model's tokens; FlexVAR's offers the
same choices."""

from __future__ import annotations

from test_service import PREAMBLE, _run

FP8 = PREAMBLE + """
from nextscale.models.core.checkpoint import save_safetensors
from nextscale.models.core.family import FAMILIES
from nextscale.models.core.memory import weight_bytes
from nextscale.models.infinity.sampler import InfinityOptions, TextCondition
from nextscale.nodes.service import load
from test_infinity import SCHEDULE, prompts, tiny_model
from test_infinity_sampler import tiny_tokenizer
from test_sampler import make_var

def relative_error(got, ref):
    return ((got - ref).norm() / ref.norm()).item()

torch.manual_seed(0)
var = make_var()
for p in var.parameters():
    p.data.mul_(0.02)  # a trained model's magnitudes: most weights below fp8's smallest normal (2**-6)
save_safetensors(var.state_dict(), os.path.join(folder, "gen.safetensors"))
full = load("gen.safetensors", "NextScale Load Generator", "generator", "float32")
fp8 = load("gen.safetensors", "NextScale Load Generator", "generator", "fp8_e4m3fn")
assert fp8.dtype == torch.float8_e4m3fn and fp8.compute_dtype == torch.float32  # on the CPU it computes in fp32
matrices = lambda m: sum(p.numel() * p.element_size() for p in m.parameters() if p.dim() == 2)
assert matrices(fp8.module) < 0.27 * matrices(full.module)
labels, inputs = torch.tensor([1, 2]), torch.randn(2, var.num_tokens - 1, var.config.cvae)
with torch.inference_mode():
    ref = full.module.forward_teacher(labels, inputs)
    got = fp8.module.forward_teacher(labels, inputs)
    unscaled = var.to(torch.float8_e4m3fn).float().forward_teacher(labels, inputs)  # a plain .to(fp8), no scales
error, plain_error = relative_error(got, ref), relative_error(unscaled, ref)
agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
print(f"VAR: scaled fp8 logit error {error:.4f}, greedy agreement {agree:.3f}; unscaled fp8 error {plain_error:.4f}")
assert error < 0.05 and agree > 0.85 and plain_error > 2 * error

save_safetensors(tiny_model().state_dict(), os.path.join(folder, "inf.safetensors"))
full = load("inf.safetensors", "NextScale Load Infinity", "generator", "float32")
fp8 = load("inf.safetensors", "NextScale Load Infinity", "generator", "fp8_e4m3fn")
assert weight_bytes(fp8.module) < 0.5 * weight_bytes(full.module)
text, mask = prompts()
greedy = InfinityOptions(cfg=3.0, schedule=SCHEDULE, top_k=1)
family, tok = FAMILIES.get("infinity"), tiny_tokenizer()
ref = family.sample(full.module, tok, TextCondition(text, mask), seed=0, options=greedy)
got = family.sample(fp8.module, tok, TextCondition(text, mask), seed=0, options=greedy)
agree = torch.cat([(a == b).flatten() for a, b in zip(ref.bits, got.bits)]).float().mean().item()
print(f"Infinity: greedy bit agreement {agree:.3f}")
assert agree > 0.8
print("fp8 ok")
"""


def test_fp8_storage_with_scales_keeps_the_logits(tmp_path):
    _run(FP8, tmp_path, "fp8 ok")


LOADERS = PREAMBLE + """
from safetensors.torch import save_file
from nextscale.models.core.schedule import SCHEDULE_256
from nextscale.models.hmar.sampler import HMAROptions
from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer
from nextscale.models.nsarm.model import NSARM
from nextscale.models.nsarm.sampler import UpscaleCondition, UpscaleOptions
from nextscale.models.switti.sampler import SwittiCondition, SwittiOptions
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from nextscale.nodes import dd, flexvar, hmar, switti, upscale
from nextscale.nodes.service import TRANSFORMER_DTYPES
from test_dd import official_state_dict as dd_state_dict
from test_hmar import official_state_dict as hmar_state_dict
from test_nsarm import TINY, images, randomised
from test_switti import official_state_dict as switti_state_dict, text

def agreement(a, b):
    return torch.cat([(x == y).flatten() for x, y in zip(a, b)]).float().mean().item()

def gain(state_dict, factor=0.1):  # a trained model's magnitudes, below fp8's smallest normal for most weights
    return {k: v * factor if v.is_floating_point() and v.dim() == 2 else v for k, v in state_dict.items()}

torch.manual_seed(0)
vq = MultiScaleVQVAE(TokenizerConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1)))
save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, os.path.join(folder, "vqvae.safetensors"))
save_file(gain(switti_state_dict(depth=1, width=32, patch_nums=SCHEDULE_256)), os.path.join(folder, "sw.safetensors"))
torch.save({"trainer": {"ema_parameters": gain(dd_state_dict(depth=1, width=32, patch_nums=SCHEDULE_256))}},
           os.path.join(folder, "dd.pth"))
torch.save(gain(hmar_state_dict(width=32, patch_nums=SCHEDULE_256)), os.path.join(folder, "hmar.pth"))
randomised(NSARM(TINY), 0).save(os.path.join(folder, "nsarm.safetensors"))
BSQTokenizer(BSQConfig(codebook_dim=4, base_ch=32, ch_mult=(1, 2), num_res_blocks=1)).save(
    os.path.join(folder, "bsq.safetensors"))

loaders = {
    "switti": lambda dtype: switti.NextScaleLoadSwitti.execute("sw.safetensors", "vqvae.safetensors", dtype).result,
    "dd": lambda dtype: dd.NextScaleLoadDD.execute("dd.pth", "vqvae.safetensors", dtype).result,
    "nsarm": lambda dtype: upscale.NextScaleLoadNSARM.execute("nsarm.safetensors", "bsq.safetensors", dtype).result,
    "hmar": lambda dtype: hmar.NextScaleLoadHMAR.execute("hmar.pth", "vqvae.safetensors", dtype).result,
}
conditions = {
    "switti": (SwittiCondition(text(2, [5, 9]), text(1, [1], seed=2)), SwittiOptions(cfg=4.0, top_k=1)),
    "dd": (torch.tensor([1, 2]), None),
    "nsarm": (UpscaleCondition(images(2)), UpscaleOptions(cfg=3.0, input_scales=2)),
    "hmar": (torch.tensor([1, 2]), HMAROptions(cfg=1.7, top_k=1)),
}
for node in (switti.NextScaleLoadSwitti, dd.NextScaleLoadDD, upscale.NextScaleLoadNSARM, hmar.NextScaleLoadHMAR,
             flexvar.NextScaleLoadFlexVAR):
    dtype = next(i for i in node.define_schema().inputs if i.id == "dtype")
    assert dtype.options == TRANSFORMER_DTYPES and dtype.default == "auto", (node, dtype.options)
for name, loader in loaders.items():
    full, full_tok = loader("float32")
    fp8, fp8_tok = loader("fp8_e4m3fn")
    assert fp8.dtype == torch.float8_e4m3fn and fp8.compute_dtype == torch.float32, name
    assert fp8_tok.dtype == full_tok.dtype == torch.float32, name
    condition, options = conditions[name]
    ref = full.family.sample(full.module, full_tok.module, condition, seed=0, options=options)
    got = fp8.family.sample(fp8.module, fp8_tok.module, condition, seed=0, options=options)
    codes = (lambda t: t.bits) if name == "nsarm" else (lambda t: t.indices)
    agree = agreement(codes(ref), codes(got))
    print(f"{name}: fp8 storage, token agreement with float32 {agree:.3f}")
    assert agree > 0.8, (name, agree)
print("fp8 loaders ok")
"""


def test_the_switti_dd_nsarm_and_hmar_loaders_store_their_transformer_in_fp8(tmp_path):
    _run(LOADERS, tmp_path, "fp8 loaders ok")
