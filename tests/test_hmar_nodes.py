"""HMAR's nodes inside ComfyUI's python: the chain on tiny models in the model folder (an HMAR file with upstream's
keys, VAR's VQ-VAE layout): Load HMAR, HMAR Sampler (refinement, class list, seeds, an inpaint guide), Decode; the
messages for a missing file, a file of another kind, a bad refinement and the refused inputs; and one pass of a model
partially loaded with ComfyUI's op set."""

from __future__ import annotations

import textwrap

from harness.testbed import run_in_comfyui_python
from test_service import PREAMBLE

CHAIN = PREAMBLE + """
from safetensors.torch import save_file
from nextscale.models.core.schedule import SCHEDULE_256
from nextscale.models.kv.policies import KVPolicySpec
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from nextscale.nodes import NODE_MODULES
from nextscale.nodes import hmar
from nextscale.nodes.editing import NextScaleInpaintGuide
from nextscale.nodes.tokenizer import NextScaleDecode, NextScaleEncode
from test_hmar import official_state_dict

assert any(hmar.NextScaleHMARSampler in m.NODES for m in NODE_MODULES)
msg = hmar.NextScaleLoadHMAR.validate_inputs("hmar-d16.pth", "vae_ch160v4096z32.pth")
assert "model not found" in msg and folder in msg and "NVlabs/HMAR" in msg and "non-commercial" in msg, msg

torch.save(official_state_dict(width=32, patch_nums=SCHEDULE_256), os.path.join(folder, "hmar-tiny.pth"))
msg = hmar.NextScaleLoadHMAR.validate_inputs("hmar-tiny.pth", "vae.pth")
assert "VAR's VQ-VAE 'vae.pth'" in msg and "Put vae_ch160v4096z32.pth there" in msg and "NVlabs/HMAR" in msg, msg
torch.manual_seed(0)
vq = MultiScaleVQVAE(TokenizerConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1)))
save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, os.path.join(folder, "vqvae.safetensors"))

model, vqvae = hmar.NextScaleLoadHMAR.execute("hmar-tiny.pth", "vqvae.safetensors", "auto").result
assert str(model.kind) == "hmar-generator" and str(vqvae.kind) == "var-tokenizer"
raises(lambda: hmar.NextScaleLoadHMAR.execute("vqvae.safetensors", "vqvae.safetensors", "auto"),
       "'vqvae.safetensors' is a VAR tokenizer", "this node expects an HMAR generator")

hmar.NextScaleHMARSampler.hidden = io.HiddenHolder.from_dict({})
def sample(**kw):
    args = dict(model=model, vqvae=vqvae, class_name="tench", seed=3, cfg=1.7, top_k=1000, top_p=0.99,
                refinement=hmar.OFFICIAL_REFINEMENT, batch_size=2, class_list="3")
    return hmar.NextScaleHMARSampler.execute(**{**args, **kw}).result[0]

tokens = sample()
assert tokens.batch_size == 2 and tokens.patch_nums == SCHEDULE_256
assert tokens.extra["refinement"][:3] == [[1], [1, 3], [1, 1, 2, 5]] and tokens.extra["refinement"][3] == [16]
plain = sample(refinement="")
assert plain.extra["refinement"][1] == [4] and torch.equal(plain.indices[0], tokens.indices[0])
assert all(torch.equal(a, b) for a, b in zip(sample().indices, tokens.indices))
mixed = sample(class_list="1, 2", batch_size=1)
assert mixed.labels.tolist() == [1, 2]
images = NextScaleDecode.execute(vqvae, tokens, 0).result[0]
assert tuple(images.shape) == (2, 32, 32, 3) and float(images.std()) > 0

# an inpaint guide on the first image: the kept tokens stay at every scale it acts on
reference = NextScaleEncode.execute(vqvae, images[:1], "center crop").result[0]
mask = torch.zeros(1, 32, 32)
mask[:, :, 16:] = 1.0
guide = NextScaleInpaintGuide.execute(reference, mask, False, "tokens", 0, 0).result[0]
edited = sample(guide=guide, batch_size=1, seed=9)
kept = edited.indices[-1][0][:, :8] == reference.indices[-1][0][:, :8]
assert bool(kept.all())

raises(lambda: sample(refinement="1 | 2,3"), "refinement of scale 1 (2x2) is [2, 3]", "sum to 4")
raises(lambda: sample(kv_policy=KVPolicySpec("full")), "HMAR takes no kv_policy", "keeps no KV cache")
raises(lambda: sample(control=object()), "HMAR takes no control", "no control adapter was trained")
raises(lambda: sample(class_list=""), "'tench' is not a class of this generator")
print("hmar chain ok")
"""

PARTIAL = PREAMBLE + """
import comfy.ops
from nextscale.models.hmar.model import HMAR
from test_hmar import official_state_dict
from test_partial_loading import FRACTIONS, META, DeviceAudit, partial_load

weights = official_state_dict()
g = torch.Generator().manual_seed(1)
labels, x = torch.tensor([3, 10]), torch.randn(2, 4, 64, generator=g)
plain_model = HMAR.from_state_dict(dict(weights))
plain = plain_model.refine_logits(x, plain_model.condition(labels))
for storage in (None, torch.float8_e4m3fn):
    for fraction in FRACTIONS:
        compute = None if storage is None else torch.bfloat16
        model = HMAR.from_state_dict(dict(weights), operations=comfy.ops.manual_cast, compute_dtype=compute)
        if storage is not None:
            model = model.to(storage)
        if fraction == 1.0 and storage is None:  # manual cast computes exactly what torch layers compute
            assert torch.equal(model.refine_logits(x, model.condition(labels)), plain)
        partial_load([model], fraction)
        placed = [t.device.type for t in (*model.parameters(), *model.buffers())]
        assert "cpu" in placed and (("meta" in placed) == (fraction > 0)), (storage, fraction)
        audit = DeviceAudit()
        with torch.no_grad(), audit:
            cond = model.condition(labels.to(META))
            masked = torch.zeros(2, 4, dtype=torch.bool, device=META)
            h = torch.zeros(2, 4, 8, device=META)
            logits = model.refine_logits(model.refine_input(1, h, h, masked, cond), cond)
            logits = logits + model.next_scale_logits(model.scale_input(1, h, cond), cond)
        assert not audit.violations, (storage, fraction, audit.violations[:8])
        assert logits.device == META and logits.dtype == torch.float32 and tuple(logits.shape) == (2, 4, 32)
print("hmar partial loading ok")
"""


def _run(script: str, tmp_path, needle: str) -> None:
    result = run_in_comfyui_python(textwrap.dedent(script), cwd=tmp_path, timeout=600)
    assert result.returncode == 0 and needle in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_hmar_node_chain_runs_in_comfyui(tmp_path):
    _run(CHAIN, tmp_path, "hmar chain ok")


def test_hmar_computes_on_the_load_device_when_partially_loaded(tmp_path):
    """ComfyUI's manual-cast op set, the model loaded onto ``meta`` (a stand-in GPU) at 0x, 0.5x and 1x of its size,
    fp32 and fp8 storage: the next-scale and refinement passes touch no tensor off the load device, and the fully
    loaded fp32 build computes exactly what the torch build does."""
    _run(PARTIAL, tmp_path, "hmar partial loading ok")
