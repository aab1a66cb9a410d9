import warnings

import pytest
import torch

from ssmblocks.ops.cpu_kernel import cpu_ops


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
