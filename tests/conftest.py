import importlib.machinery
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch


def _import_pypi_kernels() -> None:
    """Import the PyPI package ``kernels`` (which transformers >= 5.25 depends on and imports), if installed,
    past the repository's own kernels/ folder (installed as ``ssmblocks.kernels``), which shadows it while the
    repository root is on sys.path, as ``python -m pytest`` puts it."""
    if "kernels" in sys.modules:
        return
    root = Path(__file__).resolve().parents[1]
    others = [p for p in sys.path if Path(p or ".").resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", others)
    if spec is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


_import_pypi_kernels()

from ssmblocks import backends  # noqa: E402
from ssmblocks.backends.cpp_kernels import library  # noqa: E402

AVAILABLE = backends.available()  # the backends of this machine (builds the C++ kernels, once)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def kernel():
    """``torch.ops.ssmblocks_cpu`` (the C++ CPU kernels); the test is skipped, with the reason, if they did
    not build."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops = library()
    if ops is None:
        pytest.skip(f"the C++ CPU kernels did not build: {[str(w.message) for w in caught]}")
    return ops


@pytest.fixture(params=AVAILABLE)
def backend(request):
    """Each backend present on this machine in turn, selected for the test (ssmblocks.backends.use)."""
    with backends.use(request.param):
        yield request.param


@pytest.fixture
def torch_path():
    """Only the torch implementations run (ssmblocks.backends.use("torch"))."""
    with backends.use("torch"):
        yield


@pytest.fixture
def kernel_calls(kernel):
    """The names of the ops that ran their C++ implementation during the test, in order (a live list)."""
    with backends.record() as calls:
        yield CppCalls(calls)


class CppCalls:
    """The op names of the "cpp" entries of a ``backends.record()`` list, read when compared."""

    def __init__(self, records: list[tuple[str, str]]):
        self.records = records

    def names(self) -> list[str]:
        return [op for op, backend in self.records if backend == "cpp"]

    def __len__(self) -> int:
        return len(self.names())

    def __eq__(self, other) -> bool:
        return self.names() == other

    def __repr__(self) -> str:
        return repr(self.names())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
