"""Distilled Decoding's nodes inside ComfyUI's python: the chain on tiny models in the model folder (a DD file nested
as upstream's are, VAR's VQ-VAE layout): Load Distilled Decoding, Distilled Decoding Sampler (one and two steps,
class list, seeds), Decode; the messages for a missing file, a file of another kind and a bad scale; and one pass of
a model partially loaded with ComfyUI's op set."""

from __future__ import annotations

import textwrap

from harness.testbed import run_in_comfyui_python
from test_service import PREAMBLE

CHAIN = PREAMBLE + """
from safetensors.torch import save_file
from nextscale.models.core.schedule import SCHEDULE_256
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from nextscale.nodes import NODE_MODULES
from nextscale.nodes import dd
from nextscale.nodes.tokenizer import NextScaleDecode
from test_dd import official_state_dict

assert any(dd.NextScaleDDSampler in m.NODES for m in NODE_MODULES)
msg = dd.NextScaleLoadDD.validate_inputs("var-d16.pth", "vae_ch160v4096z32.pth")
assert "model not found" in msg and folder in msg and "microsoft/distilled_decoding" in msg, msg

weights = official_state_dict(depth=1, width=32, patch_nums=SCHEDULE_256)
torch.save({"trainer": {"ema_parameters": weights}}, os.path.join(folder, "dd-tiny.pth"))
torch.manual_seed(0)
vq = MultiScaleVQVAE(TokenizerConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1)))
save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, os.path.join(folder, "vqvae.safetensors"))
msg = dd.NextScaleLoadDD.validate_inputs("dd-tiny.pth", "vae.pth")
assert "VAR's VQ-VAE 'vae.pth'" in msg and "vae_ch160v4096z32.pth" in msg, msg

model, vqvae = dd.NextScaleLoadDD.execute("dd-tiny.pth", "vqvae.safetensors", "auto").result
assert str(model.kind) == "dd-generator" and str(vqvae.kind) == "var-tokenizer"
raises(lambda: dd.NextScaleLoadDD.execute("vqvae.safetensors", "vqvae.safetensors", "auto"),
       "'vqvae.safetensors' is a VAR tokenizer", "this node expects a Distilled Decoding generator")

dd.NextScaleDDSampler.hidden = io.HiddenHolder.from_dict({})
def sample(**kw):
    args = dict(model=model, vqvae=vqvae, class_name="tench", seed=3, steps=1, refine_from_scale=0, batch_size=2,
                class_list="3")
    return dd.NextScaleDDSampler.execute(**{**args, **kw}).result[0]

one = sample()
assert one.batch_size == 2 and one.patch_nums == SCHEDULE_256 and one.extra["steps"] == [0]
assert one.extra["split"] == 5  # the released d16 setting for a model this shallow
two = sample(steps=2)
assert two.extra["steps"] == [0, 5]
assert all(torch.equal(one.indices[si], two.indices[si]) for si in range(5))
assert torch.equal(sample().f_hat, one.f_hat) and not torch.equal(sample(seed=4).f_hat, one.f_hat)
mixed = sample(class_list="1, 2", batch_size=1, steps=2, refine_from_scale=3)
assert mixed.labels.tolist() == [1, 2] and mixed.extra["split"] == 3
images = NextScaleDecode.execute(vqvae, two, 0).result[0]
assert tuple(images.shape) == (2, 32, 32, 3) and float(images.std()) > 0
raises(lambda: sample(steps=2, refine_from_scale=12), "DD steps (0, 12) must start at scale 0", "below 10")
raises(lambda: sample(class_list=""), "'tench' is not a class of this generator")
print("dd chain ok")
"""

PARTIAL = PREAMBLE + """
import comfy.ops
from nextscale.models.dd.model import DistilledVAR
from test_dd import official_state_dict
from test_partial_loading import FRACTIONS, META, DeviceAudit, partial_load

weights = official_state_dict()
g = torch.Generator().manual_seed(1)
labels, x = torch.tensor([3, 10]), torch.randn(2, 30, 8, generator=g)
plain = DistilledVAR.from_state_dict(dict(weights))(labels, x, 5)
for storage in (None, torch.float8_e4m3fn):
    for fraction in FRACTIONS:
        compute = None if storage is None else torch.bfloat16
        model = DistilledVAR.from_state_dict(dict(weights), operations=comfy.ops.manual_cast, compute_dtype=compute)
        if storage is not None:
            model = model.to(storage)
        if fraction == 1.0 and storage is None:  # manual cast computes exactly what torch layers compute
            assert all(torch.equal(a, b) for a, b in zip(model(labels, x, 5), plain))
        partial_load([model], fraction)
        placed = [t.device.type for t in (*model.parameters(), *model.buffers())]
        assert "cpu" in placed and (("meta" in placed) == (fraction > 0)), (storage, fraction)
        audit = DeviceAudit()
        with torch.no_grad(), audit:
            codes, logits = model(labels.to(META), x.to(META), 5)
        assert not audit.violations, (storage, fraction, audit.violations[:8])
        assert codes.device == META and codes.dtype == logits.dtype == torch.float32
        assert tuple(codes.shape) == (2, 30, 8) and tuple(logits.shape) == (2, 30, 32)
print("dd partial loading ok")
"""


def _run(script: str, tmp_path, needle: str) -> None:
    result = run_in_comfyui_python(textwrap.dedent(script), cwd=tmp_path, timeout=600)
    assert result.returncode == 0 and needle in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_dd_node_chain_runs_in_comfyui(tmp_path):
    _run(CHAIN, tmp_path, "dd chain ok")


def test_dd_computes_on_the_load_device_when_partially_loaded(tmp_path):
    """ComfyUI's manual-cast op set, the model loaded onto ``meta`` (a stand-in GPU) at 0x, 0.5x and 1x of its size,
    fp32 and fp8 storage: one pass touches no tensor off the load device (tests/test_partial_loading.py's audit), and
    the fully loaded fp32 build computes exactly what the torch build does."""
    _run(PARTIAL, tmp_path, "dd partial loading ok")
