"""FlexVAR's nodes inside ComfyUI's python: the chain on tiny models in the model folder (upstream's key layouts, the
transformer nested as upstream's training checkpoints are): Load FlexVAR (fp8 too), FlexVAR Schedule, FlexVAR Sampler
(a resolution and a step count, a typed schedule, a KV policy, an edit guide, class list, seeds, sub-batches),
Decode, Decode Scales and Encode; the messages for a missing file, a file of another kind, a VAR tokenizer, VAR's
tokens where FlexVAR's belong and back, a latent-blend guide and a bad resolution; and a partially loaded model on
a stand-in device."""

from __future__ import annotations

import textwrap

from harness.testbed import run_in_comfyui_python
from test_service import PREAMBLE

CHAIN = PREAMBLE + """
from safetensors.torch import save_file
from nextscale.models.core.family import Workload
from nextscale.models.kv.policies import KVPolicySpec
from nextscale.models.var.editing import image_to_image, inpaint
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from nextscale.nodes import NODE_MODULES
from nextscale.nodes import flexvar
from nextscale.nodes.tokenizer import NextScaleDecode, NextScaleDecodeScales, NextScaleEncode, NextScaleLoadTokenizer
from test_flexvar import generator_keys, random_state_dict, tokenizer_keys

assert any(flexvar.NextScaleFlexVARSampler in m.NODES for m in NODE_MODULES)
msg = flexvar.NextScaleLoadFlexVAR.validate_inputs("FlexVARd16-epo179.pth", "FlexVAE.pth", "auto")
assert "model not found" in msg and folder in msg and "jiaosiyu1999/FlexVAR" in msg, msg

torch.save({"trainer": {"var_wo_ddp": random_state_dict(generator_keys(depth=1))}},
           os.path.join(folder, "flexvar-tiny.pth"))
torch.save({"model": random_state_dict(tokenizer_keys())}, os.path.join(folder, "flexvae-tiny.pth"))
vq = MultiScaleVQVAE(TokenizerConfig(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 1)))
save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, os.path.join(folder, "var-vqvae.safetensors"))
msg = flexvar.NextScaleLoadFlexVAR.validate_inputs("flexvar-tiny.pth", "vae.pth", "auto")
assert "FlexVAE 'vae.pth'" in msg and "FlexVAE.pth" in msg, msg

model, vae = flexvar.NextScaleLoadFlexVAR.execute("flexvar-tiny.pth", "flexvae-tiny.pth", "auto").result
assert str(model.kind) == "flexvar-generator" and str(vae.kind) == "flexvar-tokenizer"
raises(lambda: flexvar.NextScaleLoadFlexVAR.execute("flexvae-tiny.pth", "flexvae-tiny.pth", "auto"),
       "'flexvae-tiny.pth' is a FlexVAE tokenizer", "this node expects a FlexVAR generator")
raises(lambda: flexvar.NextScaleLoadFlexVAR.execute("flexvar-tiny.pth", "var-vqvae.safetensors", "auto"),
       "is a VAR tokenizer")

fp8, _ = flexvar.NextScaleLoadFlexVAR.execute("flexvar-tiny.pth", "flexvae-tiny.pth", "fp8_e4m3fn").result
assert fp8.module.blocks[0].attn.mat_qkv.weight.dtype == torch.float8_e4m3fn

schedule, report, tokens = flexvar.NextScaleFlexVARSchedule.execute(256, 13).result
assert schedule == "1,2,3,4,5,6,7,8,9,10,12,14,16" and tokens == 981 and "greedy" in report, report
assert flexvar.NextScaleFlexVARSchedule.execute(96, 4).result[0] == "1,2,3,6"
raises(lambda: flexvar.NextScaleFlexVARSchedule.execute(250, 10), "not a multiple of FlexVAE's 16 px")

flexvar.NextScaleFlexVARSampler.hidden = io.HiddenHolder.from_dict({})
def sample(**kw):
    args = dict(model=model, vae=vae, class_name="tench", seed=3, resolution=64, steps=3, cfg=1.5, top_k=4,
                top_p=0.9, batch_size=2, class_list="3")
    return flexvar.NextScaleFlexVARSampler.execute(**{**args, **kw}).result[0]

one = sample()
assert sample(model=fp8).patch_nums == (1, 2, 4)
assert one.batch_size == 2 and one.patch_nums == (1, 2, 4) and one.labels.tolist() == [3, 3]
assert all(torch.equal(a, b) for a, b in zip(sample().indices, one.indices))
assert not all(torch.equal(a, b) for a, b in zip(sample(seed=4).indices, one.indices))
typed = sample(schedule="1,3,5", batch_size=1, class_list="1, 2", kv_policy=KVPolicySpec("recent", budget=0.5))
assert typed.patch_nums == (1, 3, 5) and typed.labels.tolist() == [1, 2] and typed.extra["kv_policy"] != "full"
images = NextScaleDecode.execute(vae, one, 0).result[0]
assert tuple(images.shape) == (2, 8, 8, 3) and float(images.std()) > 0
scales, K = NextScaleDecodeScales.execute(vae, typed).result
assert K == 3 and tuple(scales.shape) == (6, 10, 10, 3)
encoded = NextScaleEncode.execute(vae, images, "center crop", "1,2,4").result[0]
assert encoded.patch_nums == (1, 2, 4) and encoded.batch_size == 2
raises(lambda: NextScaleEncode.execute(vae, images, "center crop", ""), "FlexVAR has no fixed schedule")
varied = sample(guide=image_to_image(encoded, 2))  # the encoded images' first two scales, the rest sampled
assert all(torch.equal(varied.indices[si], encoded.indices[si]) for si in (0, 1))
assert varied.extra["fit"] == encoded.extra["fit"]
raises(lambda: sample(guide=inpaint(encoded, torch.ones(1, 8, 8), mode="latent blend")),
       "FlexVAR keeps no running latent", "'tokens'")
raises(lambda: sample(resolution=64, steps=5), "5 steps do not fit a 4x4 token grid")
# VAR's tokens and FlexVAR's index different codebooks (both of 16 codes here): refused both ways, and as a reference
var_vq = NextScaleLoadTokenizer.execute("var-vqvae.safetensors", "auto").result[0]
var_tokens = NextScaleEncode.execute(var_vq, images, "center crop", "1,2,4").result[0]
raises(lambda: NextScaleDecode.execute(vae, var_tokens, 0), "index VAR's multi-scale VQ-VAE's codebook",
       "this tokenizer is FlexVAE")
raises(lambda: NextScaleDecode.execute(var_vq, one, 0), "index FlexVAE's codebook",
       "this tokenizer is VAR's multi-scale VQ-VAE")
raises(lambda: sample(guide=image_to_image(var_tokens, 2)), "the guide's reference tokens index VAR's")
raises(lambda: sample(class_list=""), "'tench' is not a class of this generator")

free = mm.get_free_memory
one_image = model.family.memory(model.module, vae.module, Workload(batch_size=1, schedule=(1, 2, 4)))
mm.get_free_memory = lambda dev=None, torch_free_too=False: (one_image.working,) * 2 if torch_free_too else \
    one_image.working
calls, real_sample = [], model.family.sample
model.family.sample = lambda *a, **k: calls.append(len(a[2])) or real_sample(*a, **k)
split = sample()  # one image at a time: the unsplit batch's images
mm.get_free_memory, model.family.sample = free, real_sample
assert calls == [1, 1], calls
assert all(torch.equal(a, b) for a, b in zip(split.indices, one.indices)) and torch.equal(split.labels, one.labels)
print("flexvar chain ok")
"""

PARTIAL = PREAMBLE + """
import comfy.ops
from nextscale.models.flexvar.model import FlexVAR
from nextscale.models.flexvar.tokenizer import FlexVAE
from test_flexvar import generator_keys, random_state_dict, tokenizer_keys
from test_partial_loading import FRACTIONS, META, DeviceAudit, partial_load

gen_sd, tok_sd = random_state_dict(generator_keys()), random_state_dict(tokenizer_keys())
g = torch.Generator().manual_seed(1)
pn, labels = (1, 2, 4), torch.tensor([3, 10])
indices = [torch.randint(16, (2, p, p), generator=g) for p in pn]
plain_tok = FlexVAE.from_state_dict(dict(tok_sd))
x = plain_tok.teacher_input(indices, pn)
plain = FlexVAR.from_state_dict(dict(gen_sd))(labels, x, pn)
for storage in (None, torch.float8_e4m3fn):
    for fraction in FRACTIONS:
        compute = None if storage is None else torch.bfloat16
        model = FlexVAR.from_state_dict(dict(gen_sd), operations=comfy.ops.manual_cast, compute_dtype=compute)
        tok = FlexVAE.from_state_dict(dict(tok_sd), operations=comfy.ops.manual_cast)
        if storage is not None:
            model = model.to(storage)
        if fraction == 1.0 and storage is None:  # manual cast computes exactly what torch layers compute
            assert torch.equal(model(labels, x, pn), plain)
        partial_load([model, tok], fraction)
        audit = DeviceAudit()
        with torch.no_grad(), audit:
            logits = model(labels.to(META), tok.teacher_input([i.to(META) for i in indices], pn), pn)
            image = tok.indices_to_img(indices[-1].to(META))
        assert not audit.violations, (storage, fraction, audit.violations[:8])
        assert logits.device == META and logits.dtype == torch.float32 and tuple(logits.shape) == (2, 21, 16)
        assert tuple(image.shape) == (2, 3, 8, 8)
print("flexvar partial loading ok")
"""


def _run(script: str, tmp_path, needle: str) -> None:
    result = run_in_comfyui_python(textwrap.dedent(script), cwd=tmp_path, timeout=600)
    assert result.returncode == 0 and needle in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_flexvar_node_chain_runs_in_comfyui(tmp_path):
    """The chain, and a batch that does not fit at once sampled in sub-batches giving the same images."""
    _run(CHAIN, tmp_path, "flexvar chain ok")


def test_flexvar_computes_on_the_load_device_when_partially_loaded(tmp_path):
    """ComfyUI's manual-cast op set, both models loaded onto ``meta`` (a stand-in GPU) at 0x, 0.5x and 1x of their
    size, the transformer in fp32 and fp8: a teacher-forced pass and a decode touch no tensor off the load device."""
    _run(PARTIAL, tmp_path, "flexvar partial loading ok")
