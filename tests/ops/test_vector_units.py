"""The C++ kernels' AVX2 and baseline (SSE) variants: the kernel tests again, in a process whose kernels are
capped at that vector unit ($SSMBLOCKS_CPU_VECTORS). The default run covers the widest unit the machine has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
KERNEL_TESTS = [
    "tests/ops/test_selective_scan_cpu_kernel.py",
    "tests/ops/test_ssd_cpu_kernel.py",
    "tests/ops/test_conv.py",
    "tests/ops/test_linear.py",
    "tests/ops/test_norm.py",
    "tests/backends/test_plans.py",
]
BYTES = {"avx2": 32, "baseline": 16}
RUN = """
import sys
import pytest
from ssmblocks.backends.cpp_kernels import library
bytes_ = library().vector_bytes()
assert bytes_ == int(sys.argv[1]), f"the kernels use {bytes_}-byte vectors, expected {sys.argv[1]}"
sys.exit(pytest.main(["-q", "-p", "no:randomly", "-p", "no:cacheprovider", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("unit", BYTES)
def test_kernel_tests_pass_on_a_narrower_vector_unit(kernel, unit):
    if unit == "avx2" and kernel.vector_bytes() < 32:
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "SSMBLOCKS_CPU_VECTORS": unit, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    env.pop("TRITON_INTERPRET", None)  # the kernel tests of the C++ backend only
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(BYTES[unit]), *KERNEL_TESTS], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
