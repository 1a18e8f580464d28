"""Switti's nodes inside ComfyUI's python.

1. NextScale Switti Text Encode on ComfyUI's own SDXL CLIP object (``SDXLClipModel`` and ``SDXLTokenizer``, shrunk
   through their model options, random weights) against upstream's ``FrozenCLIPEmbedder`` computation written here
   with the transformers library (``CLIPTokenizer`` padded to 77 with truncation, ``CLIPTextModel`` given the
   attention mask, the bias from the mask) on the same weights: hidden states, pooled output, padding bias, for
   short, long (truncated) and punctuated prompts, and CLIP Text Encode's weighting applied as ComfyUI applies it.
2. The node chain on tiny models in the model folder (a Hugging Face folder with config.json for Switti-AR, a file for
   Switti, the VQ-VAE): Load Switti, Switti Text Encode, Switti Sampler (KV policy, image to image), Decode.
3. Partial loading with ComfyUI's op set, fp32 and fp8 storage.
"""

from __future__ import annotations

import textwrap

from harness.testbed import run_in_comfyui_python
from test_service import PREAMBLE

CLIP = """
import comfy.sd, comfy.sd1_clip, comfy.sdxl_clip
from types import SimpleNamespace

def sdxl_clip(sizes, seed=0):
    '''ComfyUI's SDXL CLIP object with its two encoders resized by ``sizes`` ({"l": {...}, "g": {...}}), random.'''
    options = {"clip_l_model_config": sizes["l"], "clip_g_model_config": sizes["g"], "dtype": torch.float32}
    target = SimpleNamespace(params={}, clip=comfy.sdxl_clip.SDXLClipModel, tokenizer=comfy.sdxl_clip.SDXLTokenizer)
    clip = comfy.sd.CLIP(target, model_options=options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return clip
"""

PARITY = PREAMBLE + CLIP + """
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from nextscale.nodes import switti as sw

SIZES = {
    "l": dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=3,
              hidden_act="quick_gelu"),
    "g": dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3, hidden_act="gelu"),
}
clip = sdxl_clip(SIZES)
vocab = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_tokenizer")  # openai's CLIP BPE, as laion's

def upstream_encoder(which, pad_token):
    '''upstream FrozenCLIPEmbedder: the Hugging Face tokenizer and text model, this encoder's weights'''
    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, eos_token_id=49407, **SIZES[which])
    model = CLIPTextModel(cfg).eval()
    sd = getattr(clip.cond_stage_model, "clip_" + which).transformer.state_dict()
    prefix = "" if any(k.startswith("text_model.") for k in model.state_dict()) else "text_model."  # transformers 5
    weights = {k.removeprefix(prefix): v for k, v in sd.items() if k != "text_projection.weight"}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    tok = CLIPTokenizer.from_pretrained(vocab, pad_token=pad_token)

    def encode(prompts):
        enc = tok(prompts, truncation=True, max_length=77, return_overflowing_tokens=False, padding="max_length",
                  return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        bias = enc["attention_mask"].float()
        bias[bias == 0] = float("-inf")
        bias[bias == 1] = 0.0
        return out.last_hidden_state, out.pooler_output, bias
    return encode

clip_l, clip_g = upstream_encoder("l", "<|endoftext|>"), upstream_encoder("g", "!")  # laion's bigG pads with '!'

def upstream(prompt):
    (l, _, _), (g, pooled, bias) = clip_l([prompt]), clip_g([prompt])
    return torch.cat([l, g], dim=-1), pooled, bias

long_prompt = " ".join(f"word{i} and more" for i in range(40))  # far beyond 77 tokens: truncated
for prompt in ["a photo of a cat", "wow! a red cube!! on a table!", long_prompt, ""]:
    context, pooled, mask = sw.encode_switti_text(clip, prompt)
    ref_context, ref_pooled, ref_bias = upstream(prompt)
    assert context.shape == (1, 77, 80) and pooled.shape == (1, 48), (context.shape, pooled.shape)
    assert torch.equal(torch.zeros(mask.shape).masked_fill_(~mask, float("-inf")), ref_bias), prompt
    assert torch.allclose(context, ref_context, atol=1e-5, rtol=1e-5), (prompt, (context - ref_context).abs().max())
    assert torch.allclose(pooled, ref_pooled, atol=1e-5, rtol=1e-5), prompt
    # the node's conditioning carries the same, marked for the sampler
    cond = sw.NextScaleSwittiTextEncode.execute(clip, prompt).result[0]
    assert torch.equal(cond[0][0], context) and cond[0][1][sw.MARK] and torch.equal(cond[0][1]["attention_mask"], mask)
assert int(mask.sum()) == 2  # the empty prompt: start and end tokens

# CLIP Text Encode's weighting: (z - z_empty) * w + z_empty on the weighted tokens' states, as ComfyUI does it
context, pooled, mask = sw.encode_switti_text(clip, "a (red:1.5) cube")
plain, ref_pooled, ref_bias = upstream("a red cube")
empty = upstream("")[0]
weighted = plain.clone()
weighted[:, 2] = (plain[:, 2] - empty[:, 2]) * 1.5 + empty[:, 2]  # start, "a", "red"
assert torch.allclose(context, weighted, atol=1e-5, rtol=1e-5) and not torch.allclose(context, plain, atol=1e-3)
assert torch.allclose(pooled, ref_pooled, atol=1e-5) and torch.equal(mask, ref_bias == 0)

# ComfyUI's CLIP object is left as it was: CLIP Text Encode still gets SDXL's penultimate layer
assert clip.cond_stage_model.clip_g.layer == "hidden" and not clip.cond_stage_model.clip_g.enable_attention_masks
raises(lambda: sw.encode_switti_text(SimpleNamespace(cond_stage_model=clip.cond_stage_model.clip_l), "x"),
       "DualCLIPLoader with clip_l, clip_g and type sdxl")
print("switti text ok")
"""

CHAIN = PREAMBLE + CLIP + """
import json
from safetensors.torch import save_file
from nextscale.models.core.schedule import SCHEDULE_256
from nextscale.models.kv.policies import KVPolicySpec
from nextscale.models.var.editing import image_to_image
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from nextscale.nodes import NODE_MODULES
from nextscale.nodes import switti as sw
from nextscale.nodes.tokenizer import NextScaleDecode, NextScaleEncode
from test_switti import official_state_dict

assert any(sw.NextScaleSwittiSampler in m.NODES for m in NODE_MODULES)
msg = sw.NextScaleLoadSwitti.validate_inputs("Switti", "VQVAE-Switti")
assert "model not found: Switti transformer 'Switti'" in msg and folder in msg and "yresearch/Switti" in msg, msg
save_file(official_state_dict(depth=1, width=32, patch_nums=SCHEDULE_256), os.path.join(folder, "switti.safetensors"))
msg = sw.NextScaleLoadSwitti.validate_inputs("switti.safetensors", "VQVAE-Switti")
assert "Switti's VQ-VAE 'VQVAE-Switti'" in msg and "yresearch/VQVAE-Switti" in msg, msg

# Switti-AR as Hugging Face ships it (a folder, config.json saying use_ar; no mask to tell), Switti as a file
ar = os.path.join(folder, "Switti-AR-tiny")
os.makedirs(ar)
weights = official_state_dict(depth=1, width=32, patch_nums=SCHEDULE_256, causal=True)
save_file({k: v for k, v in weights.items() if k != "attn_bias_for_masking"}, os.path.join(ar, "model.safetensors"))
with open(os.path.join(ar, "config.json"), "w") as f:
    json.dump({"depth": 1, "rope": True, "use_ar": True, "use_swiglu_ffn": True, "reso": 256}, f)
torch.manual_seed(0)
vq = MultiScaleVQVAE(TokenizerConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1)))
save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, os.path.join(folder, "vqvae.safetensors"))

model, vqvae = sw.NextScaleLoadSwitti.execute("switti.safetensors", "vqvae.safetensors", "auto").result
model_ar = sw.NextScaleLoadSwitti.execute("Switti-AR-tiny", "vqvae.safetensors", "auto").result[0]
assert str(model.kind) == "switti-generator" and str(vqvae.kind) == "var-tokenizer"
assert model_ar.module.config.causal and not model.module.config.causal
raises(lambda: sw.NextScaleLoadSwitti.execute("vqvae.safetensors", "vqvae.safetensors", "auto"),
       "'vqvae.safetensors' is a VAR tokenizer", "this node expects a Switti transformer")

# the real widths (CLIP-L 768, bigG 1280), three thin layers
clip = sdxl_clip({"l": dict(intermediate_size=8, num_attention_heads=1, num_hidden_layers=3),
                  "g": dict(intermediate_size=8, num_attention_heads=1, num_hidden_layers=3)})
positive = sw.NextScaleSwittiTextEncode.execute(clip, "a red cube").result[0]
negative = sw.NextScaleSwittiTextEncode.execute(clip, "").result[0]

sw.NextScaleSwittiSampler.hidden = io.HiddenHolder.from_dict({})
def sample(**kw):
    args = dict(model=model, vqvae=vqvae, positive=positive, negative=negative, seed=3, cfg=6.0, top_k=400, top_p=0.95,
                more_smooth=False, batch_size=2)
    return sw.NextScaleSwittiSampler.execute(**{**args, **kw}).result[0]

tokens = sample()
assert tokens.batch_size == 2 and tokens.patch_nums == SCHEDULE_256
assert all(torch.equal(a, b) for a, b in zip(tokens.indices, sample().indices))
assert not all(torch.equal(a, b) for a, b in zip(tokens.indices, sample(seed=4).indices))
images = NextScaleDecode.execute(vqvae, tokens, 0).result[0]
assert tuple(images.shape) == (2, 32, 32, 3) and float(images.std()) > 0

cached = sample(model=model_ar, kv_policy=KVPolicySpec("full"), cfg_stop_scale=7, temperature=0.5, more_smooth=True,
                smooth_start_scale=2)
assert cached.f_hat is not None and cached.extra["kv_policy"] == "full"
raises(lambda: sample(kv_policy=KVPolicySpec("full")), "KV policies apply to Switti-AR only")
sdxl_style = [[positive[0][0], {"pooled_output": positive[0][1]["pooled_output"]}]]
raises(lambda: sample(positive=sdxl_style), "not made by NextScale Switti Text Encode")
raises(lambda: sample(resolution="1024"), "has 14 scales but this Switti model has 10")

# image to image by kept scales: the reference encoded on Switti's schedule, its first 3 scales kept
reference = NextScaleEncode.execute(vqvae, images[:1], "center crop", ",".join(map(str, SCHEDULE_256))).result[0]
edited = sample(guide=image_to_image(reference, 3), seed=9)
assert all(torch.equal(edited.indices[si], reference.indices[si].expand(2, -1, -1)) for si in range(3))
print("switti chain ok")
"""

PARTIAL = PREAMBLE + """
import comfy.ops
from nextscale.models.core.kv_cache import KVCache
from nextscale.models.switti.model import Switti, SwittiText
from test_partial_loading import FRACTIONS, META, DeviceAudit, partial_load
from test_switti import official_state_dict

def step(model, x):  # scales 0 and 1 of Switti-AR through its KV cache, with guidance rows, as the sampler runs them
    cond = model.condition(SwittiText(x["context"], x["pooled"], x["bias"]))
    cache = KVCache(model.depth, model.num_tokens)
    try:
        model.forward_scale(0, model.first_token_map(cond), cond, cache)
        return model.forward_scale(1, model.scale_input(1, x["next_1"]).repeat(2, 1, 1), cond, cache)
    finally:
        cache.free()

weights = official_state_dict(causal=True)
g = torch.Generator().manual_seed(1)
bias = torch.zeros(4, 77)
bias[:, 9:] = float("-inf")
inputs = {"context": torch.randn(4, 77, 2048, generator=g), "pooled": torch.randn(4, 1280, generator=g), "bias": bias,
          "next_1": torch.randn(2, 4, 8, generator=g)}
plain = step(Switti.from_state_dict(dict(weights)), inputs)
for storage in (None, torch.float8_e4m3fn):
    for fraction in FRACTIONS:
        compute = None if storage is None else torch.bfloat16
        model = Switti.from_state_dict(dict(weights), operations=comfy.ops.manual_cast, compute_dtype=compute)
        if storage is not None:
            model = model.to(storage)
        if fraction == 1.0 and storage is None:  # manual cast computes exactly what torch layers compute
            assert torch.equal(step(model, inputs), plain)
        partial_load([model], fraction)
        placed = [t.device.type for t in (*model.parameters(), *model.buffers())]
        assert "cpu" in placed and (("meta" in placed) == (fraction > 0)), (storage, fraction)
        model.rope(model.patch_nums, 0, 1, META)  # the RoPE table: made on the CPU from the schedule, then moved
        x = {k: v.to(META) for k, v in inputs.items()}
        audit = DeviceAudit()
        with torch.no_grad(), audit:
            out = step(model, x)
        assert not audit.violations, (storage, fraction, audit.violations[:8])
        assert out.device == META and out.dtype == torch.float32 and tuple(out.shape) == (4, 4, 32)
print("switti partial loading ok")
"""


def _run(script: str, tmp_path, needle: str) -> None:
    result = run_in_comfyui_python(textwrap.dedent(script), cwd=tmp_path, timeout=600)
    assert result.returncode == 0 and needle in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_switti_text_encode_matches_upstreams_clip_embedder(tmp_path):
    _run(PARITY, tmp_path, "switti text ok")


def test_the_switti_node_chain_runs_in_comfyui(tmp_path):
    _run(CHAIN, tmp_path, "switti chain ok")


def test_switti_computes_on_the_load_device_when_partially_loaded(tmp_path):
    """ComfyUI's manual-cast op set, the model loaded onto ``meta`` (a stand-in GPU) at 0x, 0.5x and 1x of its size,
    fp32 and fp8 storage: one cached step touches no tensor off the load device (tests/test_partial_loading.py's
    audit), and the fully loaded fp32 build computes exactly what the torch build does."""
    _run(PARTIAL, tmp_path, "switti partial loading ok")
