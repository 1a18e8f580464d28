"""Fuzzing the loaders: mutated state dicts, safetensors headers, bytes and config metadata.

Whatever a file holds, loading it either succeeds or raises :class:`NextScaleError`; no other exception (KeyError,
IndexError, RuntimeError from torch, json errors, ...) escapes. Mutations never introduce NaNs (values are not
what a loader checks). Example counts are bounded so the whole file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nextscale.models.core.checkpoint import save_safetensors
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.family import identify
from nextscale.models.var.model import VAR
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from test_sampler import CVAE, PN, VOCAB, make_var

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same examples every run: a CI failure reproduces locally
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

GEN_SD = {k: v.clone() for k, v in make_var().state_dict().items()}
torch.manual_seed(0)
TOK_SD = {
    k: v.clone()
    for k, v in MultiScaleVQVAE(
        TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN)
    )
    .state_dict()
    .items()
}
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]


def loads_or_clear_error(load, *args, what: object = "") -> None:
    try:
        load(*args)
    except NextScaleError:
        pass
    except Exception as e:  # a short report instead of hypothesis' repr of whole state dicts
        raise AssertionError(f"{getattr(load, '__qualname__', load)} let {type(e).__name__} escape: {str(e)[:500]}"
                             f"\nmutations: {what}") from e


def mutated(draw, base: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A mutated copy of ``base`` and the list of mutations (``draw`` is ``st.data().draw``)."""
    sd = dict(base)
    keys = sorted(sd)
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "rename", "reshape", "retype", "scalar", "empty", "swap", "extra"]))
        key = draw(st.sampled_from(keys))
        if key not in sd:
            continue
        ops.append(f"{op} {key}")
        t = sd[key]
        if op == "drop":
            del sd[key]
        elif op == "rename":
            new = draw(st.sampled_from([key + "_x", key.replace(".", "_", 1), key.replace("0", "7"),
                                        "blocks.99.attn.q_bias", key.split(".")[-1], "car_" + key,
                                        "block_chunks.0." + key]))
            sd[new] = sd.pop(key)
        elif op == "reshape":
            if t.dim() == 0 or draw(st.booleans()):
                sd[key] = (
                    t.reshape(-1)[: max(1, t.numel() - draw(st.integers(1, 3)))].clone()
                    if t.numel() > 1
                    else t.reshape(1, 1) if t.numel() == 1 else torch.zeros(1, 1, dtype=t.dtype)  # an emptied tensor
                )
            else:
                dim = draw(st.integers(0, t.dim() - 1))
                shape = list(t.shape)
                shape[dim] = max(1, shape[dim] + draw(st.sampled_from([-1, 1, 2])))
                sd[key] = (torch.zeros(shape, dtype=t.dtype) if t.dtype != torch.bool
                           else torch.zeros(shape, dtype=torch.bool))
                if draw(st.booleans()):
                    sd[key] = sd[key].unsqueeze(0)
        elif op == "retype":
            sd[key] = t.to(draw(st.sampled_from(DTYPES)))
        elif op == "scalar":
            sd[key] = torch.tensor(draw(st.integers(-3, 3)))
        elif op == "empty":
            sd[key] = torch.zeros((0, *t.shape[1:]), dtype=t.dtype)
        elif op == "swap":
            other = draw(st.sampled_from(keys))
            if other in sd:
                sd[key], sd[other] = sd[other], sd[key]
        elif op == "extra":
            sd[draw(st.sampled_from(["lvl_1L", "blocks.3.attn.zero_k_bias", "quantize.embedding.weight",
                                     "cfg_uncond"]))] = torch.zeros(draw(st.integers(0, 5)), dtype=torch.long)
        ops[-1] += f" -> {tuple(sd[key].shape)} {sd[key].dtype}" if key in sd else ""
    return sd, ops


@FUZZ
@given(data=st.data())
def test_mutated_generator_state_dicts(data):
    sd, ops = mutated(data.draw, GEN_SD)
    identify(sd)
    loads_or_clear_error(VAR.from_state_dict, sd, "fuzz_generator.pth", what=ops)
    loads_or_clear_error(MultiScaleVQVAE.from_state_dict, sd, "fuzz_generator.pth", what=ops)


@FUZZ
@given(data=st.data())
def test_mutated_tokenizer_state_dicts(data):
    sd, ops = mutated(data.draw, TOK_SD)
    identify(sd)
    loads_or_clear_error(MultiScaleVQVAE.from_state_dict, sd, "fuzz_tokenizer.pth", what=ops)
    loads_or_clear_error(VAR.from_state_dict, sd, "fuzz_tokenizer.pth", what=ops)


def _good_files() -> dict:
    """Bytes of a generator file (with its config metadata) and of a small safetensors file."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        var = make_var()
        var.save(str(Path(d) / "gen.safetensors"))
        small = dict(list(TOK_SD.items())[:6])
        save_safetensors(small, str(Path(d) / "small.safetensors"), {"note": "x"})
        return {
            "gen": (Path(d) / "gen.safetensors").read_bytes(),
            "small": (Path(d) / "small.safetensors").read_bytes(),
            "config": var.config.to_dict(),
        }


GOOD = _good_files()


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=6),
    st.lists(st.integers(-5, 2**33), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@FUZZ
@given(data=st.data())
def test_mutated_safetensors_headers(tmp_path, data):
    header, body = split(GOOD["small"])
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "__whole__"]))
        if field == "__whole__":
            header[name] = data.draw(JSON_VALUES)
        elif isinstance(header[name], dict):
            header[name][field] = data.draw(st.one_of(JSON_VALUES,
                                                      st.sampled_from(["F16", "I64", "BOOL", "F8_E4M3", "Q"])))
    if data.draw(st.booleans()):
        header["__metadata__"] = data.draw(JSON_VALUES)
    path = tmp_path / "fuzz_header.safetensors"
    path.write_bytes(join(header, body))
    loads_or_clear_error(MultiScaleVQVAE.from_file, str(path))
    loads_or_clear_error(VAR.from_file, str(path))


@FUZZ
@given(data=st.data())
def test_mutated_safetensors_bytes(tmp_path, data):
    raw = bytearray(GOOD[data.draw(st.sampled_from(["small", "gen"]))])
    op = data.draw(st.sampled_from(["flip", "truncate", "insert", "length"]))
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(0, min(len(raw) - 1, 4096)))  # mostly the header, where parsing happens
            raw[pos] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif op == "insert":
        pos = data.draw(st.integers(0, len(raw)))
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    path = tmp_path / "fuzz_bytes.safetensors"
    path.write_bytes(bytes(raw))
    loads_or_clear_error(VAR.from_file, str(path))
    loads_or_clear_error(MultiScaleVQVAE.from_file, str(path))


@FUZZ
@given(data=st.data())
def test_mutated_config_metadata(tmp_path, data):
    """The ``nextscale_config`` metadata a generator carries: wrong types, out-of-range sizes, other schedules."""
    config = dict(GOOD["config"])
    for _ in range(data.draw(st.integers(1, 3))):
        field = data.draw(st.sampled_from([*sorted(config), "unknown_field"]))
        config[field] = data.draw(
            st.one_of(
                JSON_VALUES,
                st.sampled_from([0, -1, 3, 2, 4, 96, 97, 1e-9, 1e30, [1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 4], [1, 4096],
                                 [2, 3], [], "1,2,3,4", ["a"] * 10, None]),
            )
        )
    header, body = split(GOOD["gen"])
    header["__metadata__"] = {"nextscale_config": json.dumps(config) if data.draw(st.booleans()) else str(config)}
    path = tmp_path / "fuzz_config.safetensors"
    path.write_bytes(join(header, body))
    loads_or_clear_error(VAR.from_file, str(path))
