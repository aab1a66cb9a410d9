"""Fixtures of the op tests."""

import warnings

import pytest

from ssmblocks.ops.cpu_kernel import cpu_ops


@pytest.fixture(scope="module")
def kernel():
    """``torch.ops.ssmblocks_cpu`` (the C++ CPU kernels); the test is skipped, with the reason, if they did
    not build."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops = cpu_ops()
    if ops is None:
        pytest.skip(f"the C++ CPU kernels did not build: {[str(w.message) for w in caught]}")
    return ops
