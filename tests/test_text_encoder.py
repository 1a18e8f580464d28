"""The flan-t5-xl text encoder for Infinity (``nodes/text_encoder.py``, ``nodes/flan_t5_xl_config.json``).

The config is checked against the published google/flan-t5-xl values without ComfyUI; everything else runs in ComfyUI's
python on tiny random T5 encoders (64 wide, 2 layers, the real 32128-row vocabulary so that the real tokenizer fits),
compared with Hugging Face's own ``T5EncoderModel`` built from the same weights.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from harness.testbed import run_in_comfyui_python

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "nodes" / "flan_t5_xl_config.json"

# google/flan-t5-xl config.json (huggingface.co/google/flan-t5-xl, after "Update config.json (#5)", which set
# feed_forward_proj to gated-gelu; the same numbers as t5x's T5.1.1 XL gin: emb_dim 2048, 32 heads x 64, mlp_dim 5120,
# 24 + 24 layers, vocab 32128).
PUBLISHED = {
    "d_model": 2048,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "num_heads": 32,
    "d_kv": 64,
    "d_ff": 5120,
    "feed_forward_proj": "gated-gelu",
    "vocab_size": 32128,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "model_type": "t5",
    "tie_word_embeddings": False,
}
# shared + 24 x (attention 4 x 2048^2, gated FFN 3 x 2048 x 5120, 2 norms) + relative bias 32 x 32 + final norm
FLAN_T5_XL_ENCODER_PARAMS = 32128 * 2048 + 24 * (4 * 2048 * 2048 + 3 * 2048 * 5120 + 2 * 2048) + 32 * 32 + 2048


def test_config_is_the_published_flan_t5_xl_config():
    config = json.loads(CONFIG.read_text())
    assert {k: config[k] for k in PUBLISHED} == PUBLISHED
    # ComfyUI's T5 knows the tanh GELU as gelu_pytorch_tanh (Hugging Face: gelu_new, from feed_forward_proj gated-gelu)
    assert config["is_gated_act"] is True and config["dense_act_fn"] == "gelu_pytorch_tanh"


def test_config_builds_flan_t5_xl_in_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.activations import ACT2FN

    published = transformers.T5Config(feed_forward_proj="gated-gelu")  # how transformers reads flan-t5-xl's config
    ours = transformers.T5Config(**json.loads(CONFIG.read_text()))
    assert published.is_gated_act and published.dense_act_fn == "gelu_new" and ours.is_gated_act
    x = torch.linspace(-8, 8, 2001)
    for name in {published.dense_act_fn, ours.dense_act_fn}:  # gelu_new and gelu_pytorch_tanh: one function
        assert torch.allclose(ACT2FN[name](x), torch.nn.functional.gelu(x, approximate="tanh"), atol=1e-6), name
    with torch.device("meta"):
        model = transformers.T5EncoderModel(ours)
    assert sum(p.numel() for p in model.parameters()) == FLAN_T5_XL_ENCODER_PARAMS  # 1.22 B


PREAMBLE = """
import os, json, tempfile
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration
import folder_paths
from nextscale.nodes import text_encoder as te

def tiny_t5(seed=0):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=1, num_heads=4,
                   feed_forward_proj="gated-gelu")
    model = T5ForConditionalGeneration(cfg).eval()
    full = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # tied copies made separate
    encoder = {k: v for k, v in full.items() if k == "shared.weight" or k.startswith("encoder.")}
    encoder.pop("encoder.embed_tokens.weight", None)
    return model, full, encoder

from harness.checks import raises
"""

ENCODE_CHECK = textwrap.dedent(PREAMBLE) + textwrap.dedent(
    """
    import comfy.ops
    import comfy.text_encoders.t5
    import nodes as comfy_nodes
    from transformers import T5EncoderModel, T5TokenizerFast

    # The JSON, the expected layout and ComfyUI's T5 agree with Hugging Face's flan-t5-xl encoder (on the meta device).
    config = te.load_config()
    shapes = te.expected_t5_shapes({**config, **{k: config[k] for k in te.SHAPE_FIELDS}})
    with torch.device("meta"):
        hf_xl = T5EncoderModel(T5Config(**config))
        comfy_xl = comfy.text_encoders.t5.T5(config, None, "meta", comfy.ops.manual_cast)
    hf_shapes = {k: tuple(v.shape) for k, v in hf_xl.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert hf_shapes == shapes, set(hf_shapes) ^ set(shapes)
    assert {k: tuple(v.shape) for k, v in comfy_xl.state_dict().items()} == shapes
    meta_sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert te.infer_t5_config(meta_sd) == {k: config[k] for k in te.SHAPE_FIELDS}
    x = torch.linspace(-8, 8, 2001)
    assert torch.allclose(comfy.text_encoders.t5.activations[config["dense_act_fn"]](x),
                          torch.nn.functional.gelu(x, approximate="tanh"))

    # The tokenizer: ComfyUI's t5_tokenizer, the T5 SentencePiece vocabulary (32100 = 32000 + 100 sentinels).
    hf_tok = T5TokenizerFast.from_pretrained(te.TOKENIZER_DIR)
    assert len(hf_tok) == 32100 and hf_tok.pad_token_id == 0 and hf_tok.eos_token_id == 1
    ids = hf_tok("a red circle").input_ids
    assert ids[-1] == 1

    model, full, encoder = tiny_t5()
    d = tempfile.mkdtemp()
    path = os.path.join(d, "tiny.safetensors")
    save_file(encoder, path)
    clip = te.load_flan_t5(path, dtype=torch.float32)
    tokens = clip.tokenize("a red circle")
    assert [t for t, _ in tokens[te.NAME][0]] == ids, tokens
    cond = clip.encode_from_tokens_scheduled(tokens)
    assert len(cond) == 1 and set(cond[0][1]) == {"pooled_output"} and cond[0][1]["pooled_output"] is None
    feats = cond[0][0]
    assert feats.shape == (1, len(ids), 64) and feats.dtype == torch.float32, feats.shape
    with torch.no_grad():  # Hugging Face's encoder on the same weights (last_hidden_state, after the final norm)
        ref = model.encoder(input_ids=torch.tensor([ids])).last_hidden_state
        padded = torch.tensor([ids + [0] * (16 - len(ids))])  # upstream: padded, masked, real tokens kept
        ref_padded = model.encoder(input_ids=padded, attention_mask=(torch.arange(16) < len(ids)).long()[None])
    assert torch.allclose(feats, ref, atol=1e-5), (feats - ref).abs().max()
    assert torch.allclose(feats, ref_padded.last_hidden_state[:, : len(ids)], atol=1e-5)
    assert clip.tokenize("")[te.NAME] == [[(1, 1.0)]]  # an empty prompt is the end token alone

    # Long prompts are cut like upstream's truncation=True, max_length=512, the end token last.
    long_text = " ".join(f"word{i}" for i in range(400))
    long_ids = [t for t, _ in clip.tokenize(long_text)[te.NAME][0]]
    assert long_ids == hf_tok(long_text, truncation=True, max_length=512).input_ids and len(long_ids) == 512
    assert clip.encode_from_tokens_scheduled(clip.tokenize(long_text))[0][0].shape == (1, 512, 64)
    with_ids = clip.tokenize(long_text, return_word_ids=True)[te.NAME][0]
    assert len(with_ids) == 512 and with_ids[-1] == (1, 1.0, 0) and with_ids[0][2] > 0

    # Weighting: ComfyUI's (x - empty) * w + empty on the weighted tokens only.
    plain = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))[0][0]
    same = clip.encode_from_tokens_scheduled(clip.tokenize("a (red:1.0) circle"))[0][0]
    wtok = clip.tokenize("a (red:1.5) circle")[te.NAME][0]
    weighted = clip.encode_from_tokens_scheduled(clip.tokenize("a (red:1.5) circle"))[0][0]
    assert weighted.shape == same.shape and not torch.allclose(weighted, plain[:, : weighted.shape[1]])
    changed = [i for i, (_, w) in enumerate(wtok) if w != 1.0]
    kept = [i for i, (_, w) in enumerate(wtok) if w == 1.0]
    assert changed and torch.allclose(weighted[0, kept], same[0, kept], atol=1e-6)
    assert not torch.allclose(weighted[0, changed], same[0, changed])
    empty = clip.cond_stage_model.flan_t5_xl.encode([[1] + [0] * (len(wtok) - 1)])[0][0]
    assert torch.allclose(weighted[0, changed], (same[0, changed] - empty[changed]) * 1.5 + empty[changed], atol=1e-5)

    # The stock CLIPTextEncode node gives the same conditioning.
    stock = comfy_nodes.CLIPTextEncode().encode(clip, "a red circle")[0]
    assert torch.equal(stock[0][0], plain) and stock[0][1].keys() == {"pooled_output"}

    # One cache entry keyed by (real path, mtime, dtype).
    assert te.load_flan_t5(path, dtype=torch.float32) is clip
    assert te.load_flan_t5(os.path.join(d, ".", "tiny.safetensors"), dtype=torch.float32) is clip
    half = te.load_flan_t5(path, dtype=torch.float16)
    assert half is not clip and half.cond_stage_model.flan_t5_xl.transformer.shared.weight.dtype == torch.float16
    assert te.load_flan_t5(path, dtype=torch.float16) is half
    again = te.load_flan_t5(path, dtype=torch.float32)
    assert again is not clip  # one entry: the float16 load replaced it
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert te.load_flan_t5(path, dtype=torch.float32) is not again
    print("encode ok")
    """
)

NODE_CHECK = textwrap.dedent(PREAMBLE) + textwrap.dedent(
    """
    from nextscale.nodes import NODE_MODULES  # the pack imports with this module present

    model, full, encoder = tiny_t5()
    base = os.path.join(tempfile.mkdtemp(), "text_encoders")
    os.makedirs(base)
    folder_paths.add_model_folder_path("text_encoders", base, is_default=True)
    p = lambda *names: os.path.join(base, *names)
    save_file(encoder, p("tiny_encoder.safetensors"))
    save_file(full, p("full_t5.safetensors"))  # T5ForConditionalGeneration: decoder and lm_head are dropped
    torch.save(full, p("full_t5.bin"))
    # A Hugging Face folder: encoder in shard 1, decoder in shard 2 (shard 2 is never read: it is garbage here).
    os.makedirs(p("flan-t5-tiny"))
    save_file(encoder, p("flan-t5-tiny", "model-00001-of-00002.safetensors"))
    with open(p("flan-t5-tiny", "model-00002-of-00002.safetensors"), "wb") as f:
        f.write(b"not weights")
    weight_map = {k: ("model-00001-of-00002.safetensors" if k in encoder else "model-00002-of-00002.safetensors")
                  for k in full}
    with open(p("flan-t5-tiny", "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    os.makedirs(p("incomplete"))
    save_file({k: v for k, v in encoder.items() if "block.1" not in k}, p("incomplete", "model-00001-of-00002.safetensors"))
    with open(p("incomplete", "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: "model-0000%d-of-00002.safetensors" % (2 if "block.1" in k else 1) for k in encoder}}, f)
    os.makedirs(os.path.join(os.path.dirname(base), "outside"))
    save_file(encoder, os.path.join(os.path.dirname(base), "outside", "model.safetensors"))
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(8, 4)}, p("clip_l.safetensors"))
    save_file({k: v for k, v in encoder.items() if k != "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"},
              p("missing_key.safetensors"))
    save_file({**encoder, "shared.weight": torch.zeros(1000, 64)}, p("other_vocab.safetensors"))
    bias = "encoder.block.%d.layer.0.SelfAttention.relative_attention_bias.weight"
    save_file({**encoder, bias % 1: encoder[bias % 0].clone()}, p("pile_t5_like.safetensors"))
    data = open(p("tiny_encoder.safetensors"), "rb").read()
    with open(p("broken.safetensors"), "wb") as f:
        f.write(data[: len(data) // 2])

    choices = te.text_encoder_choices()
    assert choices[0] == "nextscale-embedded-t2i", choices  # the pack's own T5 (weights/) comes first
    choices = choices[1:]
    assert choices[0] == "flan-t5-tiny" and "incomplete" in choices, choices
    assert "tiny_encoder.safetensors" in choices and "full_t5.bin" in choices
    assert not any(c.startswith(("flan-t5-tiny/", "incomplete/")) for c in choices), choices

    schema = te.NextScaleTextEncodeT5.define_schema()
    assert schema.node_id == "NextScaleTextEncodeT5" and schema.display_name == "NextScale Text Encode (T5)"
    assert schema.category.startswith("NextScale") and schema.description
    assert [i.id for i in schema.inputs] == ["text_encoder", "text"] and all(i.tooltip for i in schema.inputs)
    assert "ComfyUI/models/text_encoders/" in schema.inputs[0].tooltip and "google/flan-t5-xl" in schema.inputs[0].tooltip
    assert schema.inputs[1].multiline and schema.inputs[1].dynamic_prompts
    assert [o.io_type for o in schema.outputs] == ["CONDITIONING"]
    assert te.NODES == [te.NextScaleTextEncodeT5]

    run = lambda name, text="a red circle": te.NextScaleTextEncodeT5.execute(name, text).result[0]
    cond = run("tiny_encoder.safetensors")
    assert cond[0][0].shape == (1, 5, 64) and cond[0][1] == {"pooled_output": None}
    for name in ("full_t5.safetensors", "full_t5.bin", "flan-t5-tiny"):
        assert torch.equal(run(name)[0][0], cond[0][0]), name
    same_clip = te.load_flan_t5(te.resolve_text_encoder("flan-t5-tiny"))
    assert te.load_flan_t5(te.resolve_text_encoder("flan-t5-tiny")) is same_clip

    assert te.NextScaleTextEncodeT5.validate_inputs("flan-t5-tiny") is True
    msg = te.NextScaleTextEncodeT5.validate_inputs("flan-t5-xl")
    for needle in ("model not found", "models/text_encoders", "google/flan-t5-xl", "ComfyUI/models/text_encoders/"):
        assert needle in msg, msg
    raises(lambda: run("flan-t5-xl"), "model not found", "models/text_encoders", "google/flan-t5-xl")
    raises(lambda: run("../outside"), "model not found")  # a Hugging Face folder beside, not in, the model folder

    path = lambda name: te.resolve_text_encoder(name)
    raises(lambda: te.load_flan_t5(path("clip_l.safetensors")), "is not a T5 text encoder", "CLIP", "google/flan-t5-xl")
    raises(lambda: te.load_flan_t5(path("missing_key.safetensors")), "missing key",
           "encoder.block.1.layer.1.DenseReluDense.wi_1.weight", "download it again")
    raises(lambda: te.load_flan_t5(path("broken.safetensors")), "damaged", "download it again")
    raises(lambda: te.load_flan_t5(path("other_vocab.safetensors")), "1000-token vocabulary")
    raises(lambda: te.load_flan_t5(path("pile_t5_like.safetensors")), "umT5", "another tokenizer")
    raises(lambda: te.load_flan_t5(path("incomplete")), "incomplete", "model-00002-of-00002.safetensors")

    te.check_text_width(2048)
    te.check_text_width(64, expected=64)
    raises(lambda: te.check_text_width(4096), "4096-wide", "t5-xxl", "wrong model", "google/flan-t5-xl")
    raises(lambda: te.check_text_width(64), "64-wide", "expects 2048-wide")
    print("nodes ok")
    """  # noqa: E501 (lines of the script above; wrapping them would change the string)
)


def _check(script: str, marker: str, tmp_path) -> None:
    result = run_in_comfyui_python(script, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and marker in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_encoder_features_tokenizer_weighting_and_cache_in_comfyui(tmp_path):
    """Features equal Hugging Face's T5EncoderModel (unpadded = padded and masked), the real tokenizer with upstream's
    truncation, ComfyUI's prompt weighting, the stock CLIPTextEncode node, and the one-entry cache."""
    _check(ENCODE_CHECK, "encode ok", tmp_path)


def test_node_files_and_errors_in_comfyui(tmp_path):
    """The node's schema, the combo (files and Hugging Face folders), full T5 files and sharded folders, and the errors
    for a missing model, a non-T5 file, a missing key, a damaged file, another vocabulary and a wrong width."""
    _check(NODE_CHECK, "nodes ok", tmp_path)
