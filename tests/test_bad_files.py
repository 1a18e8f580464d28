"""Bad model files: each one gives one clear NextScaleError naming the file, what was expected and what was found.

Every bad file is tried through the models layer (``VAR.from_file`` / ``MultiScaleVQVAE.from_file``) in this process
and, in one subprocess inside ComfyUI's python, through the loading service the nodes use (``service.load``: read
the file -> identify it through the family registry -> its family's strict build). No file ever runs code: the
pickles below would create a canary file when unpickled, and the canary never appears.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from harness.testbed import run_in_comfyui_python
from nextscale.models.core.checkpoint import save_safetensors
from nextscale.models.core.errors import NextScaleError
from nextscale.models.var.model import VAR, VARConfig
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from test_sampler import CVAE, PN, VOCAB, make_var

GEN, TOK = "generator", "tokenizer"


class SystemCanary:
    """Unpickles to ``os.system('touch <path>')``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class ExecCanary:
    """Unpickles to ``exec("open(<path>, 'w')")``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


@dataclass
class Case:
    name: str
    file: str  # file name inside the case folder
    loader: str  # GEN or TOK: what the loader expects
    found: str  # regex on the message: what was found


def _tiny_vae() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    cfg = TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN)
    return MultiScaleVQVAE(cfg).eval()


def _safetensors_bytes(sd, tmp: Path) -> bytes:
    save_safetensors(sd, str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def _with_header(data: bytes, edit) -> bytes:
    """A safetensors file whose JSON header was changed by ``edit(header_dict)`` (lengths kept consistent)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def make_bad_files(folder: Path) -> tuple[list[Case], Path]:
    """Write every bad file into ``folder``; returns the cases and the canary path."""
    folder.mkdir(parents=True, exist_ok=True)
    canary = folder / "canary"
    var, vae = make_var(), _tiny_vae()
    gen_sd, tok_sd = var.state_dict(), vae.state_dict()
    cases: list[Case] = []

    def add(name, file, loader, found, data=None):
        if data is not None:
            (folder / file).write_bytes(data)
        cases.append(Case(name, file, loader, found))

    # pickles that would run code
    refused = r"refused: it contains Python objects that could run code|not a plain PyTorch state dict"
    for payload_name, payload in (("system", SystemCanary(canary)), ("exec", ExecCanary(canary))):
        for writer in ("torch-zip", "torch-legacy", "plain-pickle"):
            file = f"evil-{payload_name}-{writer}.pth"
            obj = {"state_dict": dict(gen_sd), "hook": payload}
            if writer == "plain-pickle":
                (folder / file).write_bytes(pickle.dumps(obj, protocol=2))
            else:
                torch.save(obj, folder / file, _use_new_zipfile_serialization=writer == "torch-zip")
            add(f"pickle-{payload_name}-{writer}", file, GEN, refused)
    # a canary hidden in a tokenizer checkpoint's nested dict
    torch.save({"vae": dict(tok_sd), "args": SystemCanary(canary)}, folder / "evil-nested.pth")
    add("pickle-nested", "evil-nested.pth", TOK, refused)

    # truncated and corrupt safetensors
    good = _safetensors_bytes(gen_sd, folder / "tmp.safetensors")
    (n,) = struct.unpack("<Q", good[:8])
    damaged = r"damaged safetensors file|neither safetensors nor a PyTorch checkpoint"
    for label, cut in (("8-bytes", 8), ("mid-header", 8 + n // 2), ("header-only", 8 + n), ("mid-data", len(good) // 2),
                       ("last-byte", len(good) - 1)):
        add(f"safetensors-truncated-{label}", f"cut-{label}.safetensors", GEN, damaged, good[:cut])
    first = next(k for k in json.loads(good[8 : 8 + n]) if k != "__metadata__")
    add("safetensors-header-garbage", "garbage-header.safetensors", GEN, damaged,
        good[:8] + b"{" + b"\x00\xff" * ((n - 1) // 2) + b"}" * ((n - 1) % 2) + good[8 + n :])
    add("safetensors-header-too-long", "long-header.safetensors", GEN, damaged,
        struct.pack("<Q", len(good) * 4) + good[8:])
    add("safetensors-offsets-out-of-range", "offsets.safetensors", GEN, damaged,
        _with_header(good, lambda h: h[first].__setitem__("data_offsets", [0, len(good) * 8])))
    add("safetensors-bad-dtype", "dtype.safetensors", GEN, damaged,
        _with_header(good, lambda h: h[first].__setitem__("dtype", "Q7")))
    add("safetensors-shape-vs-bytes", "shape.safetensors", GEN, damaged,
        _with_header(good, lambda h: h[first].__setitem__("shape", [3, 3, 3, 3, 3])))

    # truncated and corrupt .pth
    torch.save(gen_sd, folder / "tmp.pth")
    pth = (folder / "tmp.pth").read_bytes()
    (folder / "tmp.pth").unlink()
    unreadable = r"could not be read as a PyTorch checkpoint|not a plain PyTorch state dict|neither safetensors|damaged"
    for label, keep in (("tenth", 0.1), ("half", 0.5), ("last-byte", None)):
        cut = len(pth) - 1 if keep is None else int(len(pth) * keep)
        add(f"pth-truncated-{label}", f"cut-{label}.pth", GEN, unreadable, pth[:cut])
    mid = len(pth) // 3
    add("pth-corrupt-middle", "corrupt.pth", GEN, unreadable,
        pth[:mid] + bytes(b ^ 0xA5 for b in pth[mid : mid + 4096]) + pth[mid + 4096 :])
    torch.save(gen_sd, folder / "tmp.pth", _use_new_zipfile_serialization=False)
    legacy = (folder / "tmp.pth").read_bytes()
    (folder / "tmp.pth").unlink()
    add("pth-legacy-truncated", "cut-legacy.pth", GEN, unreadable, legacy[: len(legacy) // 2])

    # empty, folder
    add("empty", "empty.safetensors", GEN, r"is empty \(0 bytes\)", b"")
    (folder / "folder.safetensors").mkdir()
    add("directory", "folder.safetensors", TOK, r"is a folder")

    # one kind given for another
    is_tok, is_gen = r"is a VAR tokenizer \(multi-scale VQ-VAE\)", r"is a VAR generator \(transformer\)"
    var.save(str(folder / "gen.safetensors"))
    torch.save({"trainer": {"var_wo_ddp": gen_sd}, "epoch": 3}, folder / "gen.pth")
    vae.save(str(folder / "tok.safetensors"))
    torch.save({"vae": tok_sd}, folder / "tok.pth")
    add("tokenizer-as-generator-safetensors", "tok.safetensors", GEN, is_tok)
    add("tokenizer-as-generator-pth", "tok.pth", GEN, is_tok)
    add("generator-as-tokenizer-safetensors", "gen.safetensors", TOK, is_gen)
    add("generator-as-tokenizer-pth", "gen.pth", TOK, is_gen)

    # a VAR of another depth than its fixed config (safetensors metadata written for depth 2)
    d2 = VARConfig(**{**var.config.to_dict(), "depth": 2})
    save_safetensors(gen_sd, str(folder / "depth3-config2.safetensors"), {"nextscale_config": d2.to_dict()})
    add("var-other-depth", "depth3-config2.safetensors", GEN, r"holds a depth-3 transformer .* config expects depth 2")

    # other model families
    infinity = {
        "block_chunks.0.module.0.sa.mat_qkv.weight": torch.zeros(12, 4),
        "text_norm.weight": torch.zeros(4),
        "cfg_uncond": torch.zeros(2, 4),
        "word_embed.weight": torch.zeros(4, 8),
    }
    save_safetensors(infinity, str(folder / "infinity-like.safetensors"))
    add("infinity-as-generator", "infinity-like.safetensors", GEN, r"is an Infinity transformer")
    add("infinity-as-tokenizer", "infinity-like.safetensors", TOK, r"is an Infinity transformer")
    car = {**gen_sd, "car_blocks.0.ffn.fc1.weight": torch.zeros(8, 4),
           "car_control_convs.0.weight": torch.zeros(4, 3, 3, 3)}
    torch.save(car, folder / "car-like.pth")
    add("car-as-generator", "car-like.pth", GEN, r"is a CAR control adapter")
    return cases, canary


def check_message(case: Case, path: str, message: str) -> None:
    expected = {GEN: "generator", TOK: "tokenizer"}[case.loader]
    assert os.path.basename(path) in message, (case.name, message)
    assert expected in message.lower(), (case.name, f"does not say a {expected} was expected", message)
    assert re.search(case.found, message), (case.name, f"does not say what was found ({case.found})", message)
    assert "\n" not in message and "Traceback" not in message and len(message) < 700, (case.name, message)


_FOLDER = Path(tempfile.mkdtemp(prefix="nextscale-bad-files-"))
atexit.register(shutil.rmtree, _FOLDER, ignore_errors=True)
CASES, CANARY = make_bad_files(_FOLDER)


@pytest.fixture(scope="module")
def bad_files():
    return _FOLDER, CASES, CANARY


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_models_layer_loaders(bad_files, name):
    folder, cases, canary = bad_files
    case = next(c for c in cases if c.name == name)
    path = str(folder / case.file)
    load = VAR.from_file if case.loader == GEN else MultiScaleVQVAE.from_file
    with pytest.raises(NextScaleError) as err:
        load(path)
    check_message(case, path, str(err.value))
    assert not canary.exists(), "a pickle ran code"


def test_explicit_config_of_another_depth(tmp_path):
    var = make_var()
    path = str(tmp_path / "var_d3.pth")
    torch.save(var.state_dict(), path)
    from nextscale.models.core.checkpoint import read_state_dict

    for depth in (2, 4):
        cfg = VARConfig(**{**var.config.to_dict(), "depth": depth})
        with pytest.raises(NextScaleError, match=rf"var_d3.pth' holds a depth-3 transformer .* expects depth {depth}"):
            VAR.from_state_dict(read_state_dict(path), path, cfg)


NODE_LOADERS = textwrap.dedent(
    """
    import json
    cases_json = script_args[0]
    import os
    from nextscale.nodes.service import load
    nodes = {"generator": "NextScale Load Generator", "tokenizer": "NextScale Load Tokenizer"}
    out = {}
    for name, path, role in json.loads(open(cases_json).read()):
        try:
            load(os.path.basename(path), nodes[role], role, path=path)
            out[name] = ["no error", ""]
        except Exception as e:
            out[name] = [type(e).__name__, str(e)]
    print("RESULT " + json.dumps(out))
    """
)


def test_node_loaders_inside_comfyui(bad_files, tmp_path):
    """The loading service the loader nodes call (read -> identify -> strict build), inside ComfyUI's python."""
    folder, cases, canary = bad_files
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([[c.name, str(folder / c.file), c.loader] for c in cases]))
    proc = run_in_comfyui_python(NODE_LOADERS, str(spec), cwd=tmp_path)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(line[len("RESULT ") :])
    assert not canary.exists(), "a pickle ran code"
    problems = []
    for case in cases:
        kind, message = results[case.name]
        if kind != "NextScaleError":
            problems.append(f"{case.name}: {kind}: {message[:300]}")
            continue
        try:
            check_message(case, str(folder / case.file), message)
        except AssertionError as e:
            problems.append(f"{case.name}: {e}")
    assert not problems, "\n".join(problems)


def test_safetensors_whose_header_length_starts_with_0x80_loads(tmp_path):
    """A header length of 128 + 256 k starts the file with byte 0x80, like a pickle: it must still load."""
    var = make_var()
    path = tmp_path / "gen.safetensors"
    for pad in range(256):
        save_safetensors(var.state_dict(), str(path), {"nextscale_config": var.config.to_dict(), "pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    loaded = VAR.from_file(str(path))
    assert torch.equal(loaded.state_dict()["head.weight"], var.state_dict()["head.weight"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.__setitem__("head.weight", sd["head.weight"].long()),
         r"'head.weight' holds torch.int64 values; expected floating"),
        (lambda sd: sd.__setitem__("head.bias", torch.zeros(0)), r"'head.bias' is empty \(shape \[0\]\)"),
        (lambda sd: sd.__setitem__("lvl_1L", sd["lvl_1L"].float()),
         r"'lvl_1L' holds torch.float32 values; expected integers"),
    ],
    ids=["int-weights", "empty-tensor", "float-levels"],
)
def test_retyped_and_empty_tensors(tmp_path, edit, message):
    sd = dict(make_var().state_dict())
    edit(sd)
    path = str(tmp_path / "edited.pth")
    torch.save(sd, path)
    with pytest.raises(NextScaleError, match=rf"edited.pth': key {message}"):
        VAR.from_file(path)


def test_typed_schedule_with_a_huge_last_side_is_refused():
    from nextscale.models.core.schedule import parse_schedule

    with pytest.raises(NextScaleError, match=r"ends at a 4096x4096 grid; at most 128"):
        parse_schedule("1,2,4096")
    assert parse_schedule("1,2,3,128")[-1] == 128
