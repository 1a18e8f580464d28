"""The sampler nodes' memory planner (nodes/service.py, ``ready_batch``) in ComfyUI's python, on a mocked amount of
free memory: the whole batch's need is declared to ComfyUI, a batch that does not fit runs in sub-batches that give
exactly the unsplit batch's images, and when one image does not fit one error says what it needs, what is free and
which KV setting would fit, before anything is sampled. And the text encoder leaves the device when a run needs
its room: ComfyUI's own management of the ``CLIP`` NextScale Text Encode returns, on a stand-in device (``meta``)."""

from __future__ import annotations

from test_service import PREAMBLE, _run

PLANNER = PREAMBLE + """
import dataclasses
from nextscale.models.core.family import FAMILIES, Workload
from nextscale.models.kv.policies import KVPolicySpec
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from nextscale.nodes.generator import NextScaleSampler
from nextscale.nodes.infinity import NextScaleTextSampler
from nextscale.nodes.service import adopt
from test_infinity import tiny_model
from test_infinity_sampler import tiny_tokenizer
from test_sampler import CVAE, PN, VOCAB, make_var

declared, sampled, free = [], [], [0]
real_load = mm.load_models_gpu
def recording(models, memory_required=0, **kw):
    declared.append(memory_required)
    return real_load(models, memory_required=memory_required, **kw)
mm.load_models_gpu = recording
mm.get_free_memory = lambda dev=None, torch_free_too=False: (free[0], free[0]) if torch_free_too else free[0]
for family in FAMILIES.families:
    def counting(*a, _sample=family.sample, **k):
        sampled.append(len(a[2]) if not hasattr(a[2], "text_BTC") else a[2].text_BTC.shape[0])
        return _sample(*a, **k)
    family.sample = counting
NextScaleSampler.hidden = NextScaleTextSampler.hidden = io.HiddenHolder.from_dict({})

def run(node, free_bytes, **kw):
    declared.clear(), sampled.clear()
    free[0] = free_bytes
    return node(**kw)

torch.manual_seed(0)
var = make_var()
vae = MultiScaleVQVAE(TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                      patch_nums=PN)).eval()
gen, tok = adopt(var), adopt(vae)
var_family = gen.family
sampler = lambda **kw: NextScaleSampler.execute(**{**dict(generator=gen, tokenizer=tok, class_name="3", seed=5,
    cfg=2.0, top_k=0, top_p=0.9, more_smooth=False, batch_size=1, class_list="1, 2, 3, 4, 0"), **kw}).result[0]
need = lambda images, policy=None: var_family.memory(var, vae, Workload(batch_size=images, kv_policy=policy))

whole = run(sampler, 2**40)
assert sampled == [5] and declared == [need(5).working], (sampled, declared, need(5))
split = run(sampler, need(2).working)
assert sampled == [2, 2, 1] and declared == [need(5).working], (sampled, declared)
assert all(torch.equal(a, b) for a, b in zip(whole.indices, split.indices)) and torch.equal(whole.labels, split.labels)
assert split.extra["seed"] == 5
print("VAR sub-batches ok")

geometry = var_family.kv_geometry(var)
scalekv = lambda budget: KVPolicySpec("scalekv", budget).bind_scales(geometry.layers, geometry.heads, geometry.scales)
tight = need(1, scalekv(0.5)).working
message = raises(lambda: run(sampler, tight), "NextScale Sampler: one image needs", "are free on cpu",
                 f"ScaleKV at 50% needs", "NextScale KV Policy")
assert sampled == [], sampled  # refused before sampling
print(message)
raises(lambda: run(sampler, 1000), "no KV budget down to 10% fits")
print("VAR refusal ok")

# a control image per image cannot be cut into sub-batches: the error names the sub-batch and the batch that fits
from nextscale.nodes.control import NextScaleApplyControl
from test_control import make_car, make_var4
gen4 = adopt(make_var4())
car = NextScaleApplyControl.execute(adopt(make_car()), torch.rand(5, 16, 16, 3), 1.0, 0, 0, 1.0).result[0]
car_need = lambda images: var_family.memory(gen4.module, vae, Workload(batch_size=images, controls=(car.model.module,)))
raises(lambda: run(sampler, car_need(2).working, generator=gen4, control=car),
       "the batch of 5 images does not fit the free memory at once and is sampled in sub-batches of 2 (images 1 to 2",
       "the control image batch has 5 images", "sample at most 2 images per run")

model, bsq = tiny_model(), tiny_tokenizer()
infinity, itok = adopt(model), adopt(bsq)
text = [[torch.randn(1, 5, model.config.text_dim), {}]]
text_sampler = lambda: NextScaleTextSampler.execute(infinity, itok, text, 1, 3.0, 1.0, 0, 0.9, "1:1", "0.06M",
                                                    3).result[0]
whole = run(text_sampler, 2**40)
one = declared[0]
from nextscale.models.infinity.schedule import InfinitySchedule
schedule = InfinitySchedule.from_template(1.0, "0.06M")
inf_need = lambda images: infinity.family.memory(model, bsq, Workload(batch_size=images, schedule=schedule,
                                                                       text_tokens=5))
assert one == inf_need(3).working, (one, inf_need(3))
split = run(text_sampler, inf_need(1).working)
assert sampled == [1, 1, 1] and all(torch.equal(a, b) for a, b in zip(whole.bits, split.bits))
print("Infinity sub-batches ok")
print("planner ok")
"""


TEXT_ENCODER = PREAMBLE + """
from safetensors.torch import save_file
from nextscale.models.core.family import Workload
from nextscale.nodes import text_encoder as te
from nextscale.nodes.service import adopt, ready
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from test_sampler import CVAE, PN, VOCAB, make_var
from transformers import T5Config, T5EncoderModel

meta = torch.device("meta")  # a stand-in GPU: ComfyUI frees memory only on devices other than the CPU
CARD = 4 * 2**30  # ComfyUI keeps 1 GiB of inference memory and 0.4 GiB of reserve free on top of a run's need
mm.get_torch_device = mm.text_encoder_device = lambda: meta
mm.text_encoder_offload_device = lambda: meta  # meta tensors cannot move to the CPU: "offloaded" stays on meta
loaded = lambda: sum(m.model_loaded_memory() for m in mm.current_loaded_models if m.device == meta)
free = lambda: CARD - loaded()
mm.get_free_memory = lambda dev=None, torch_free_too=False: (free(), free()) if torch_free_too else free()

path = os.path.join(folder, "t5.safetensors")
t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                             feed_forward_proj="gated-gelu"))  # a tiny flan-T5 encoder (the real vocabulary)
save_file({k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}, path)
clip = te.load_flan_t5(path, dtype=torch.float32)
mm.load_models_gpu([clip.patcher])  # as after NextScale Text Encode: the text encoder on the device
def on_device(patcher):  # the share of its weights on the device
    return sum(m.model_loaded_memory() for m in mm.current_loaded_models if m.model is patcher) / patcher.model_size()

assert on_device(clip.patcher) == 1

torch.manual_seed(0)
var = make_var()
vae = MultiScaleVQVAE(TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                      patch_nums=PN)).eval()
gen, tok = adopt(var), adopt(vae)
ready(gen, tok, memory=2**20)  # room for both: nothing is unloaded
assert on_device(clip.patcher) == on_device(gen.patcher) == on_device(tok.patcher) == 1
ready(gen, tok, memory=CARD - mm.extra_reserved_memory() - 4 * 2**20)  # needs the text encoder's 8.5 MB
assert on_device(clip.patcher) < 0.01 and on_device(gen.patcher) == on_device(tok.patcher) == 1
print("text encoder offloaded")
"""


def test_the_text_encoder_leaves_the_device_when_a_run_needs_its_room(tmp_path):
    _run(TEXT_ENCODER, tmp_path, "text encoder offloaded")


def test_the_planner_splits_batches_exactly_and_refuses_with_a_setting_that_fits(tmp_path):
    _run(PLANNER, tmp_path, "planner ok")
