"""Whether the Triton kernels are used is decided once per install and once per device, and never raises.

The install: a Triton older than the oldest supported, or one the kernel modules cannot be built with, makes
``triton_status()`` say no with the reason. A device: compute capability under 8.0 or a failing first launch make
``triton_device_status`` say no, with exactly one warning naming the reason and the PyTorch path. CUDA is stood in
for (capability, name, the first launch) since no GPU is needed here; the launch itself runs in
``tests/test_triton_kernels.py`` (interpreter) and on a GPU in ``bench/kernels_gpu.py``.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types

import pytest
import torch
from nextscale.kernels import triton_support

TRITON_STATUS = triton_support.triton_status  # cached once per process: the tests clear it around themselves


@pytest.fixture
def fresh_status(monkeypatch):
    """Forget what this process decided (install and devices), before and after the test."""
    TRITON_STATUS.cache_clear()
    monkeypatch.setattr(triton_support, "_device_status", {})
    yield
    TRITON_STATUS.cache_clear()


@pytest.fixture
def cuda_stand_in(monkeypatch, fresh_status):
    """A CUDA device 0 whose capability and name the test sets; a working Triton of the newest kind."""
    device = {"capability": (8, 6), "name": "NVIDIA GeForce RTX 3090"}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: device["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: device["name"])
    monkeypatch.setattr(torch.cuda, "device", lambda d: _NullContext())
    monkeypatch.setattr(triton_support, "triton_status", lambda: (True, "3.8.0"))
    return device


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def nextscale_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "NextScale" and r.levelno == logging.WARNING]


def test_an_old_triton_is_refused_by_version(monkeypatch, fresh_status):
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.1.0"))
    assert triton_support.triton_status() == (
        False, "Triton 3.1.0 is older than 3.2, the oldest the kernels support"
    )


def test_a_triton_that_cannot_build_the_kernels_is_refused(monkeypatch, fresh_status):
    pytest.importorskip("triton")
    import nextscale.kernels

    monkeypatch.setitem(sys.modules, "nextscale.kernels.triton_attention", None)  # the import fails
    monkeypatch.delattr(nextscale.kernels, "triton_attention", raising=False)  # even when imported before
    available, detail = triton_support.triton_status()
    assert not available and detail.startswith(f"Triton {sys.modules['triton'].__version__} cannot build the kernels (")


def test_autotune_gets_only_the_arguments_this_triton_accepts(monkeypatch):
    """Triton 3.2 and 3.3 have no ``cache_results``: passing it raised a TypeError at import."""
    triton = pytest.importorskip("triton")
    from nextscale.kernels import triton_tuning

    received = {}

    def autotune_3_3(configs, key, prune_configs_by=None, reset_to_zero=None, restore_value=None, pre_hook=None,
                     post_hook=None, warmup=None, rep=None, use_cuda_graph=False, do_bench=None):
        received.update(inspect.currentframe().f_locals)
        return lambda fn: fn

    monkeypatch.setattr(triton, "autotune", autotune_3_3)
    triton_tuning.autotune(configs=[], key=["N"], do_bench=triton_tuning.bench, cache_results=True)(print)
    assert received["do_bench"] is triton_tuning.bench and received["key"] == ["N"]
    assert "cache_results" not in received


def test_pre_ampere_devices_fall_back_with_one_warning(cuda_stand_in, caplog):
    cuda_stand_in.update(capability=(7, 5), name="Tesla T4")
    with caplog.at_level(logging.WARNING, logger="NextScale"):
        for _ in range(3):
            assert triton_support.triton_device_status("cuda") == (
                False, "Tesla T4 has compute capability 7.5, the kernels need 8.0"
            )
        assert not triton_support.use_triton(types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0)))
    (warning,) = nextscale_warnings(caplog)
    assert "Tesla T4 has compute capability 7.5" in warning and "PyTorch SDPA" in warning and "cuda:0" in warning


def test_a_failing_first_launch_falls_back_with_one_warning(cuda_stand_in, monkeypatch, caplog):
    def broken_toolchain(device):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.\nmore detail")

    monkeypatch.setattr(triton_support, "_first_launch", broken_toolchain)
    with caplog.at_level(logging.WARNING, logger="NextScale"):
        available, detail = triton_support.triton_device_status(torch.device("cuda", 0))
        assert triton_support.triton_device_status(0) == (available, detail)
    assert not available
    assert detail == (
        "the first launch on NVIDIA GeForce RTX 3090 failed: RuntimeError: Failed to find C compiler. Please "
        "specify via CC environment variable."
    )
    (warning,) = nextscale_warnings(caplog)
    assert detail in warning and "attention runs on PyTorch SDPA" in warning


def test_a_working_device_is_checked_once_and_says_nothing(cuda_stand_in, monkeypatch, caplog):
    launches = []
    monkeypatch.setattr(triton_support, "_first_launch", launches.append)
    with caplog.at_level(logging.WARNING, logger="NextScale"):
        for _ in range(3):
            available, detail = triton_support.triton_device_status("cuda:0")
            assert available and detail == "Triton 3.8.0 on NVIDIA GeForce RTX 3090 (compute capability 8.6)"
    assert launches == [torch.device("cuda", 0)] and nextscale_warnings(caplog) == []


def test_without_triton_devices_say_no_and_only_the_load_warning_is_given(cuda_stand_in, monkeypatch, caplog):
    monkeypatch.setattr(triton_support, "triton_status", lambda: (False, "ModuleNotFoundError: No module 'triton'"))
    with caplog.at_level(logging.WARNING, logger="NextScale"):
        assert triton_support.triton_device_status("cuda:0") == (False, "ModuleNotFoundError: No module 'triton'")
    assert nextscale_warnings(caplog) == []  # nodes/__init__.py warned once at load


def test_cpu_tensors_never_go_to_triton(fresh_status):
    assert not triton_support.use_triton(torch.zeros(1))
    assert triton_support.triton_device_status("cpu") == (False, "the Triton kernels run on CUDA devices, not cpu")
