"""Safe checkpoint reading: no file ever runs code, and every damaged or wrong file gets a clear error."""

import os
import pickle

import pytest
import torch
from nextscale.models.core.checkpoint import (
    check_state_dict,
    read_safetensors_metadata,
    read_state_dict,
    save_safetensors,
)
from nextscale.models.core.errors import NextScaleError

SD = {"encoder.conv_in.weight": torch.arange(24.0).view(2, 3, 2, 2), "quantize.embedding.weight": torch.randn(16, 4)}


class Canary:
    """Pickles to a call that would create ``path`` when unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def assert_same(a, b):
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("writer", ["torch-zip", "torch-legacy", "plain-pickle"])
def test_code_in_a_pickle_is_refused_without_running(tmp_path, writer):
    canary = tmp_path / "canary"
    payload = {"state_dict": dict(SD), "hook": Canary(canary)}
    path = tmp_path / "evil.pth"
    if writer == "plain-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch-zip")
    with pytest.raises(NextScaleError, match=r"evil.pth") as e:
        read_state_dict(str(path), "VAR tokenizer")
    assert not canary.exists()
    if writer != "plain-pickle":
        assert "refused" in str(e.value)


@pytest.mark.parametrize("nesting", ["flat", "trainer", "vae", "ema-with-extras", "legacy-format"])
def test_nested_checkpoints_are_unwrapped(tmp_path, nesting):
    obj = {
        "flat": SD,
        "trainer": {"trainer": {"var_wo_ddp": SD, "optimizer": {"lr": 1e-4}}, "epoch": 7, "args": {"depth": 16}},
        "vae": {"vae": SD},
        "ema-with-extras": {"ema": SD, "step": torch.tensor(3), "name": "run-1"},
        "legacy-format": SD,
    }[nesting]
    path = tmp_path / "model.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=nesting != "legacy-format")
    assert_same(read_state_dict(str(path)), SD)


def test_safetensors_round_trip_with_metadata(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_safetensors(SD, path, {"nextscale_config": {"vocab_size": 16}, "note": "plain"})
    assert_same(read_state_dict(path), SD)
    assert read_safetensors_metadata(path) == {"nextscale_config": '{"vocab_size": 16}', "note": "plain"}
    torch.save(SD, tmp_path / "model.pth")
    assert read_safetensors_metadata(str(tmp_path / "model.pth")) == {}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_files(tmp_path, suffix, keep):
    path = tmp_path / f"model{suffix}"
    if suffix == ".pth":
        torch.save(SD, path)
    else:
        save_safetensors(SD, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: max(9, int(len(data) * keep))])
    with pytest.raises(NextScaleError, match=f"model{suffix}"):
        read_state_dict(str(path))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"<!DOCTYPE html><html><head><title>vae_ch160v4096z32.pth</title></head></html>", "web page"),
        (b"\n  <html>Repository not found</html>", "web page"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 436061595\n", "neither safetensors"),
        (pickle.dumps([1, 2, 3], protocol=2), "model.pth"),
        (pickle.dumps({"a": 1}, protocol=4), "not a plain PyTorch state dict"),
    ],
    ids=["empty", "html", "html-whitespace", "lfs-pointer", "pickled-list", "pickled-dict"],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_wrong_files(tmp_path, content, message):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(NextScaleError, match=message):
        read_state_dict(str(path))


def test_missing_path_directory_and_no_tensors(tmp_path):
    with pytest.raises(NextScaleError, match="does not exist"):
        read_state_dict(str(tmp_path / "nope.pth"))
    with pytest.raises(NextScaleError, match="folder"):
        read_state_dict(str(tmp_path))
    for obj in ({}, {"epoch": 3, "args": {"lr": 0.1}}, {"model": {}}, torch.zeros(3)):
        torch.save(obj, tmp_path / "x.pth")
        with pytest.raises(NextScaleError, match=r"x.pth"):
            read_state_dict(str(tmp_path / "x.pth"))


def test_check_state_dict_messages():
    expected = {"a.weight": (2, 3), "b.weight": (4,), "buf": (1, 5)}
    check_state_dict(
        {"a.weight": torch.empty(2, 3), "b.weight": torch.empty(4)}, expected, "f.pth", "model", optional=["buf"]
    )
    with pytest.raises(NextScaleError) as e:
        check_state_dict(
            {"a.weight": torch.empty(3, 2), "c": torch.empty(1), "buf": torch.empty(2, 5)},
            expected,
            "f.pth",
            "model",
            optional=["buf"],
        )
    msg = str(e.value)
    for part in (
        "'f.pth'",
        "missing key(s): b.weight",
        "unexpected key(s): c",
        "a.weight is [3, 2], expected [2, 3]",
        "buf is [2, 5], expected [1, 5]",
    ):
        assert part in msg
