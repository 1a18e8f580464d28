"""The sampler nodes' memory planner (nodes/service.py, ``ready_batch``) in ComfyUI's python, on a mocked amount of
free memory: the whole batch's need is declared to ComfyUI, a batch that does not fit runs in sub-batches that give
exactly the unsplit batch's images (per-image masks, control images and prompts cut per sub-batch), and when one
image does not fit one error says what it needs, what is free and which KV setting would fit, before anything is
sampled; in every sampler node (NextScale Sampler and Sampler (Text), Collaborative (with a CAR control too), KV
Report and Calibrate, Switti, Distilled Decoding, HMAR, FlexVAR, Upscale per tile; Sampler (Text) with an inpaint
mask per image too). And the text encoder leaves the
device when a run needs its room: ComfyUI's own management of the ``CLIP`` NextScale Text Encode returns, on a
stand-in device (``meta``)."""

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

from nextscale.models.var.editing import inpaint
from nextscale.nodes.tokenizer import NextScaleEncode
reference = NextScaleEncode.execute(itok, torch.rand(3, 32, 32, 3), "center crop", "0.06M").result[0]
masks = torch.zeros(3, 32, 32)
for i in range(3):
    masks[i, : 8 * (i + 1)] = 1
guide = inpaint(reference, masks, mode="latent blend")
inpainted = lambda: NextScaleTextSampler.execute(infinity, itok, text, 1, 3.0, 1.0, 0, 0.9, "1:1", "0.06M", 3,
                                                 guide=guide).result[0]
whole = run(inpainted, 2**40)
split = run(inpainted, inf_need(1).working)
assert sampled == [1, 1, 1] and all(torch.equal(a, b) for a, b in zip(whole.bits, split.bits))
keep = guide.keep_masks(reference.scales, 32)
for si, kept in enumerate(keep):
    assert all(torch.equal(split.bits[si][i][kept[i]], reference.bits[si][i][kept[i]]) for i in range(3)), si
print("Infinity inpaint sub-batches ok")
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


PLANNED = PREAMBLE + """
import nextscale.nodes.service as service
from nextscale.models.core.family import FAMILIES

fits, runs, free = [], [], [0]
real_largest = service.largest_batch
def recording(fit, batch, free_bytes):
    fits.append(fit)
    return real_largest(fit, batch, free_bytes)
service.largest_batch = recording
mm.get_free_memory = lambda dev=None, torch_free_too=False: (free[0], free[0]) if torch_free_too else free[0]
for family in FAMILIES.families:
    for name in ("sample", "sample_collaborative"):
        if hasattr(family, name):
            def counting(*a, _sample=getattr(family, name), **k):
                runs.append(k["seed"])
                return _sample(*a, **k)
            setattr(family, name, counting)

def planned(name, run, batch, images, same):
    # run() with room for everything, then with room for ``images`` images: the first runs the batch at once, the
    # second in sub-batches of ``images`` (seeds seed + start) with the same output; with room for less than one
    # image it refuses before sampling
    fits.clear(), runs.clear()
    free[0] = 2**40
    whole = run()
    whole_runs, fit = list(runs), fits[0]
    runs.clear()
    free[0] = fit(images)
    split = run()
    starts = list(range(0, batch, images))
    assert [r - runs[0] for r in dict.fromkeys(runs)] == starts, (name, runs)
    assert len(runs) == len(starts) * len(whole_runs), (name, runs, whole_runs)
    assert same(whole, split), name
    runs.clear()
    free[0] = fit(1) - 1
    message = raises(run, "one image needs", "are free on cpu")
    assert runs == [], (name, runs)
    print(f"{name}: {batch} images in sub-batches of {images} are the unsplit batch's; refused: {message}")
    return message

same_tokens = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
"""


NODES = PLANNED + """
from dataclasses import replace
from nextscale.models.core.schedule import SCHEDULE_256
from nextscale.models.dd.model import DistilledVAR
from nextscale.models.kv.policies import KVPolicySpec
from nextscale.models.nsarm.model import NSARM
from nextscale.models.switti.model import Switti
from nextscale.models.var.editing import inpaint
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from nextscale.nodes import switti as sw
from nextscale.nodes.collaborative import NextScaleCollaborativeSampler
from nextscale.nodes.control import NextScaleApplyControl
from nextscale.nodes.dd import NextScaleDDSampler
from nextscale.nodes.generator import NextScaleSampler
from nextscale.nodes.kv import NextScaleKVCalibrate, NextScaleKVReport
from nextscale.nodes.service import adopt
from nextscale.nodes.tokenizer import NextScaleEncode
from nextscale.nodes.upscale import NextScaleUpscale
from test_control import adapter_for, make_car, make_var4
from test_dd import official_state_dict as dd_state_dict
from test_infinity_sampler import tiny_tokenizer
from test_nsarm import TINY as NSARM_TINY, randomised
from test_sampler import CVAE, PN, VOCAB, make_var
from test_switti import official_state_dict as switti_state_dict, text as switti_text_rows

for node in (NextScaleSampler, NextScaleCollaborativeSampler, NextScaleKVCalibrate, NextScaleDDSampler,
             sw.NextScaleSwittiSampler, NextScaleUpscale):
    node.hidden = io.HiddenHolder.from_dict({})
torch.manual_seed(0)
vae = MultiScaleVQVAE(TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                      patch_nums=PN)).eval()
gen, tok, refiner, gen4 = adopt(make_var()), adopt(vae), adopt(make_var(seed=1)), adopt(make_var4())

# Collaborative sampler: drafter and refiner, a mask and a control image per image cut per sub-batch
reference = NextScaleEncode.execute(tok, torch.rand(5, 16, 16, 3), "center crop").result[0]
masks = torch.zeros(5, 16, 16)
for i in range(5):
    masks[i, : 3 + 2 * i] = 1  # another mask per image
guide = inpaint(reference, masks)
collaborative = lambda: NextScaleCollaborativeSampler.execute(gen, refiner, tok, 2, "3", 5, 2.0, 0, 0.9, False, 1,
                                                              "1, 2, 3, 4, 0", guide=guide).result[0]
message = planned("collaborative", collaborative, 5, 2, same_tokens)
assert "ScaleKV at" in message or "no KV budget" in message, message
adapter = adopt(adapter_for(gen4.module, "add", randomize=True))
adapted = NextScaleApplyControl.execute(adapter, torch.rand(5, 16, 16, 3), 1.0, 0, 0, 1.0).result[0]
controlled = lambda: NextScaleCollaborativeSampler.execute(gen4, gen4, tok, 2, "3", 5, 2.0, 0, 0.9, False, 5,
                                                           control=adapted).result[0]
planned("collaborative + a control image per image", controlled, 5, 2, same_tokens)
car = NextScaleApplyControl.execute(adopt(make_car()), torch.rand(5, 16, 16, 3), 1.0, 0, 0, 1.0).result[0]

# NextScale Sampler: a control image per image and an inpaint mask per image, cut per sub-batch
sampler = lambda **kw: NextScaleSampler.execute(**{**dict(generator=gen4, tokenizer=tok, class_name="3", seed=5,
    cfg=2.0, top_k=0, top_p=0.9, more_smooth=False, batch_size=1, class_list="1, 2, 3, 4, 0"), **kw}).result[0]
planned("sampler + a control image and a mask per image", lambda: sampler(control=car, guide=guide), 5, 2,
        same_tokens)
raises(lambda: sampler(guide=inpaint(reference.select([0, 1, 2]), masks[:3])),
       "the reference tokens holds 3 images but the sampler makes 5")

# KV report: the merged report of the sub-batches is the whole batch's (agreement and PSNR over all images)
policy = KVPolicySpec("recent", 0.3)
report = lambda: NextScaleKVReport.execute(gen, tok, policy, "3", 5, 2.0, 4).result
def same_report(a, b):
    ta, tb = a[0].splitlines(), b[0].splitlines()
    return torch.equal(a[1], b[1]) and ta[3:5] == tb[3:5] and "sub-batches of 2" in tb[-1]
planned("KV report", report, 4, 2, same_report)

# KV calibrate: one image per run with the full cache it records: only the refusal applies, without KV settings
fits.clear()
free[0] = 2**40
NextScaleKVCalibrate.execute(gen, tok, 2, 0, 2.0, "", "")
free[0] = fits[0](1) - 1
message = raises(lambda: NextScaleKVCalibrate.execute(gen, tok, 2, 0, 2.0, "", ""), "NextScale KV Calibrate: one image")
assert "ScaleKV" not in message and "fp8_e4m3fn" in message, message

# Distilled Decoding: no cache, so no KV setting is offered
dd_model = adopt(DistilledVAR.from_state_dict(dd_state_dict(depth=1, width=32, patch_nums=SCHEDULE_256)))
torch.manual_seed(0)
vq = adopt(MultiScaleVQVAE(TokenizerConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1))).eval())
dd = lambda: NextScaleDDSampler.execute(dd_model, vq, "tench", 3, 2, 0, 5, "3").result[0]
# the same tokens; the continuous codes of the finer scales agree to fp32 rounding (a matrix product's rounding on the
# CPU depends on the number of rows: 2.5e-6 here)
message = planned("distilled decoding", dd, 5, 2,
                  lambda a, b: same_tokens(a, b) and torch.allclose(a.f_hat, b.f_hat, rtol=0, atol=1e-5))
assert "ScaleKV" not in message, message

# Switti-AR: a KV policy, a prompt per image and an inpaint mask per image
switti = adopt(Switti.from_state_dict(switti_state_dict(depth=1, width=32, patch_nums=SCHEDULE_256, causal=True)))
text = switti_text_rows(3, [5, 9, 2])
marked = lambda t: [[t.context_BTC, {"pooled_output": t.pooled_BC, "attention_mask": t.bias_BT == 0, sw.MARK: True}]]
null = switti_text_rows(1, [1], seed=2)
switti_reference = NextScaleEncode.execute(vq, torch.rand(3, 32, 32, 3), "center crop",
                                           ",".join(map(str, SCHEDULE_256))).result[0]
switti_guide = inpaint(switti_reference, torch.rand(3, 32, 32).round())
run_switti = lambda: sw.NextScaleSwittiSampler.execute(switti, vq, marked(text), marked(null), 3, 6.0, 0, 0.95, False,
                                                       3, guide=switti_guide, kv_policy=KVPolicySpec("full")).result[0]
message = planned("switti-AR", run_switti, 3, 2, same_tokens)
assert "ScaleKV at" in message or "no KV budget" in message, message

# NSARM upscale: every tile's images in sub-batches
nsarm, bsq, low = adopt(randomised(NSARM(NSARM_TINY), 0)), adopt(tiny_tokenizer()), torch.rand(3, 12, 20, 3)
upscale = lambda: NextScaleUpscale.execute(nsarm, bsq, low, 1, 4.0, 1.0, 0.5, 3, "tiles", 0.25, "seamless",
                                           "adain + wavelet").result[0]
# the same bits in every tile; decoded, the pixels agree to fp32 rounding (a convolution's rounding on the CPU
# depends on the batch: 3.6e-6 here)
planned("upscale", upscale, 3, 2, lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-5))
print("node planners ok")
"""


def test_every_sampler_node_plans_sub_batches_with_per_image_inputs(tmp_path):
    _run(NODES, tmp_path, "node planners ok", timeout=900)


NEWEST = PLANNED + """
from nextscale.models.core.schedule import SCHEDULE_256
from nextscale.models.hmar.model import HMAR
from nextscale.models.var.editing import inpaint
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from nextscale.nodes import flexvar, hmar
from nextscale.nodes.collaborative import NextScaleCollaborativeSampler
from nextscale.nodes.control import NextScaleApplyControl
from nextscale.nodes.service import adopt
from nextscale.nodes.tokenizer import NextScaleEncode
from test_control import make_car, make_var4
from test_flexvar import generator_keys, random_state_dict, tokenizer_keys
from test_hmar import official_state_dict as hmar_state_dict
from test_sampler import CVAE, PN, VOCAB

for node in (hmar.NextScaleHMARSampler, flexvar.NextScaleFlexVARSampler, NextScaleCollaborativeSampler):
    node.hidden = io.HiddenHolder.from_dict({})

def masked(reference, side):  # an inpaint guide with another mask per image
    masks = torch.zeros(3, side, side)
    for i in range(3):
        masks[i, : 1 + i] = 1
    return inpaint(reference, masks)

# HMAR: no cache, so no KV setting is offered; an inpaint mask per image
model = adopt(HMAR.from_state_dict(hmar_state_dict(width=32, patch_nums=SCHEDULE_256)))
torch.manual_seed(0)
vq = adopt(MultiScaleVQVAE(TokenizerConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1))).eval())
reference = NextScaleEncode.execute(vq, torch.rand(3, 32, 32, 3), "center crop",
                                    ",".join(map(str, SCHEDULE_256))).result[0]
hmar_guide = masked(reference, 32)
run_hmar = lambda: hmar.NextScaleHMARSampler.execute(model, vq, "tench", 3, 1.7, 1000, 0.99, hmar.OFFICIAL_REFINEMENT,
                                                     1, "1, 2, 3", guide=hmar_guide).result[0]
message = planned("hmar", run_hmar, 3, 2, same_tokens)
assert "ScaleKV" not in message and "fp8_e4m3fn" in message, message

# FlexVAR: a KV cache over the run's schedule; an inpaint mask per image
torch.save({"trainer": {"var_wo_ddp": random_state_dict(generator_keys(depth=1))}}, os.path.join(folder, "flex.pth"))
torch.save({"model": random_state_dict(tokenizer_keys())}, os.path.join(folder, "flexvae.pth"))
flex, flexvae = flexvar.NextScaleLoadFlexVAR.execute("flex.pth", "flexvae.pth", "auto").result
reference = NextScaleEncode.execute(flexvae, torch.rand(3, 8, 8, 3), "center crop", "1,2,4").result[0]
flex_guide = masked(reference, 8)
run_flexvar = lambda: flexvar.NextScaleFlexVARSampler.execute(flex, flexvae, "tench", 3, 64, 3, 1.5, 4, 0.9, 1,
                                                              class_list="1, 2, 3", guide=flex_guide).result[0]
message = planned("flexvar", run_flexvar, 3, 2, same_tokens)
assert "ScaleKV at" in message or "no KV budget" in message, message

# Collaborative with a CAR control on the refiner: a control image per image through the refiner's prefill
torch.manual_seed(0)
tok = adopt(MultiScaleVQVAE(TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1),
                                            num_res_blocks=1, patch_nums=PN)).eval())
car = NextScaleApplyControl.execute(adopt(make_car()), torch.rand(3, 16, 16, 3), 1.0, 0, 0, 1.0).result[0]
drafter, refiner = adopt(make_var4(seed=1)), adopt(make_var4())
controlled = lambda: NextScaleCollaborativeSampler.execute(drafter, refiner, tok, 2, "3", 5, 2.0, 0, 0.9, False, 1,
                                                           "1, 2, 3", control=car).result[0]
planned("collaborative + CAR", controlled, 3, 2, same_tokens)
print("newest planners ok")
"""


def test_hmar_flexvar_and_a_collaborative_car_run_plan_sub_batches(tmp_path):
    _run(NEWEST, tmp_path, "newest planners ok")


BANDED_DECODE = PREAMBLE + """
from nextscale.models.core.family import Workload
from nextscale.models.core.tokens import NextScaleBitTokens
from nextscale.nodes.service import adopt
from nextscale.nodes.tokenizer import NextScaleDecode
from test_infinity_sampler import tiny_tokenizer

free = [2**40]
mm.get_free_memory = lambda dev=None, torch_free_too=False: (free[0], free[0]) if torch_free_too else free[0]
tok = adopt(tiny_tokenizer())
scales = [(1, 1), (2, 2), (4, 4), (8, 8), (12, 12)]
g = torch.Generator().manual_seed(0)
tokens = NextScaleBitTokens(bits=[torch.rand(3, h, w, tok.module.codebook_dim, generator=g) > 0.5 for h, w in scales],
                            scales=scales)
need = lambda bands: tok.family.memory(None, tok.module, Workload(decode_batch=1, schedule=scales,
                                                                  decode_bands=bands)).decode
decoded = []
real_decode = tok.family.decode
tok.family.decode = lambda *a, **k: decoded.append(k.get("bands", 1)) or real_decode(*a, **k)
whole = NextScaleDecode.execute(tok, tokens, 0).result[0]
assert decoded == [1], decoded  # the whole batch at once
decoded.clear()
free[0] = need(4)  # one image does not fit whole; in 4 bands it does
banded = NextScaleDecode.execute(tok, tokens, 0).result[0]
assert decoded == [4, 4, 4], decoded  # one image at a time, in the fewest bands that fit
assert whole.shape == banded.shape and (whole - banded).abs().max() < 1e-5
print("banded decode ok")
"""


def test_decode_splits_one_image_into_bands_of_rows_when_it_does_not_fit(tmp_path):
    _run(BANDED_DECODE, tmp_path, "banded decode ok")
