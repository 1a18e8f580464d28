"""The Triton kernels compile for real GPUs (sm_80, sm_86, sm_89, sm_90) and fit their shared memory, with no GPU.

``triton.compile`` with a ``GPUTarget`` runs Triton's whole pipeline and its bundled ``ptxas`` on a CPU-only
machine (:mod:`kernels.triton_compile`). The interpreter of ``tests/test_triton_kernels.py`` accepts constructs
the compiler rejects and ignores shared memory: both checks are needed.

The compiles run in two worker processes of ``bench/kernels_compile.py --matrix ci`` (the interpreter, which
this test session may have switched on, replaces the kernels; a fresh Triton cache in a temporary folder, so
every case really compiles; ``DISABLE_PTXAS_OPT=1``: ``ptxas`` still assembles every kernel, faster, and shared
memory is fixed before it runs). The ``ci`` matrix (33 compiles, under a minute on two idle cores) is every
config at head dim 128 in bf16 and fp32 on sm_86, the tightest limit, whose code generation sm_80 and sm_89
share; the largest case per kernel and dtype on sm_90; the largest per kernel on sm_80 and sm_89. Head dim 64
needs less shared memory than 128 for every tile, and fp16 tiles are bf16's. The full matrix (both head dims,
every dtype, every target) is ``python bench/kernels_compile.py``, whose table is in ``docs/kernels.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed here; run with the test bed's venv")

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "DISABLE_PTXAS_OPT": "1"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    script = str(ROOT / "bench" / "kernels_compile.py")
    workers = [
        subprocess.Popen(
            [sys.executable, script, "--matrix", "ci", "--json", "--no-resources", f"--shard={i}/{WORKERS}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(WORKERS)
    ]
    records = []
    for worker in workers:
        out, err = worker.communicate(timeout=900)
        records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert worker.returncode in (0, 1), f"worker crashed ({worker.returncode}):\n{err[-4000:]}"
    return records


def test_every_case_compiles(compiled):
    failed = [f"{r['label']} sm_{r['arch']}: {r['error']}" for r in compiled if "error" in r]
    assert not failed, "\n\n".join(failed)


def test_every_case_fits_its_targets_shared_memory(compiled):
    too_large = [f"{r['label']} sm_{r['arch']}: {r['shared']} > {r['limit']}" for r in compiled if not r.get("fits")]
    assert not too_large, too_large


def test_the_matrix_covers_every_kernel_dtype_and_target(compiled):
    from nextscale.kernels.triton_compile import DTYPES, KERNELS, cases

    kernel_dtypes = {(c.kernel, c.dtype) for c in cases()}  # nearest_code: fp32 only (16-bit inputs are widened)
    assert {(r["kernel"], r["dtype"]) for r in compiled if r["arch"] == 90} == kernel_dtypes
    assert {k for k, _ in kernel_dtypes} == set(KERNELS) and {d for _, d in kernel_dtypes} == set(DTYPES)
    assert {r["kernel"] for r in compiled if r["arch"] == 80} == {r["kernel"] for r in compiled if r["arch"] == 89}
    assert {r["kernel"] for r in compiled if r["arch"] == 80} == set(KERNELS)
    on_sm86 = {(r["kernel"], r["dtype"], tuple(r["blocks"]), r["num_stages"]) for r in compiled if r["arch"] == 86}
    every = {(c.kernel, c.dtype, c.blocks, c.num_stages) for c in cases() if c.dtype != "fp16"}
    assert on_sm86 == every  # each tile and stage count the autotuners may run (head dim 128)
    assert all(r["shared"] > 0 for r in compiled if "error" not in r)  # a real compile reports its buffers
