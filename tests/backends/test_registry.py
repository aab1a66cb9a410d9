"""The backend switch (ssmblocks.backends): selection by use() and $SSMBLOCKS_BACKEND, which() and record(),
and the conditions under which each op's C++ implementation runs instead of its torch one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ssmblocks
from ssmblocks import backends, ops
from tests.test_model import hybrid


def op_args(name: str, requires_grad: bool = False, dtype=torch.float32) -> tuple:
    """Small valid CPU arguments for op ``name``."""
    g = lambda *s: torch.randn(*s, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    b, l, e, n, h, p, c = 2, 5, 6, 4, 2, 3, 6
    return {
        "selective_scan": (g(b, l, e), g(b, l, e).abs(), -g(e, n).abs(), g(b, l, n), g(b, l, n)),
        "selective_scan_step": (g(b, e), g(b, e).abs(), -g(e, n).abs(), g(b, n), g(b, n), torch.zeros(b, e, n)),
        "ssd_scan": (g(b, l, h, p), g(b, l, h).abs(), -g(h).abs(), g(b, l, 1, n), g(b, l, 1, n)),
        "ssd_step": (g(b, h, p), g(b, h).abs(), -g(h).abs(), g(b, 1, n), g(b, 1, n), torch.zeros(b, h, p, n)),
        "causal_conv1d": (g(b, l, c), g(c, 1, 4), g(c)),
        "causal_conv1d_step": (g(b, c), torch.zeros(b, c, 3, dtype=dtype), g(c, 1, 4), g(c)),
        "rms_norm": (g(b, l, c), g(c), 1e-5),
        "gated_rms_norm": (g(b, l, c), g(b, l, c), g(c), 1e-5),
        "add_rms_norm": (g(b, l, c), g(b, l, c), g(c), 1e-5),
        "linear": (g(b * 2, c), g(3, c), g(3)),
    }[name]


CPP_OPS = [name for name, op in backends.OPS.items() if "cpp" in op.implementations]
TRITON_ONLY_OPS = [name for name, op in backends.OPS.items() if set(op.implementations) == {"torch", "triton"}]


def test_every_op_is_in_the_table_and_in_ssmblocks_ops():
    assert set(backends.OPS) == {
        "selective_scan", "selective_scan_step", "ssd_scan", "ssd_step", "causal_conv1d", "causal_conv1d_step",
        "rms_norm", "gated_rms_norm", "add_rms_norm", "linear",
    }  # fmt: skip
    for name, op in backends.OPS.items():
        assert getattr(ops, name) is op and "torch" in op.implementations
        assert op.__doc__ == op.implementations["torch"].fn.__doc__


@pytest.mark.parametrize("name", CPP_OPS)
def test_the_selection_decides_which_implementation_runs(kernel, name):
    op, args = backends.OPS[name], op_args(name)
    with torch.no_grad():
        assert op.which(*args) == "cpp"  # "auto" on the CPU
        # these arguments are CPU tensors: triton takes them only through Triton's interpreter
        interpreted = os.environ.get("TRITON_INTERPRET") == "1" and "triton" in backends.available()
        on_triton = "triton" if "triton" in op.implementations and interpreted else "torch"
        for selection, expected in [("cpp", "cpp"), ("torch", "torch"), ("triton", on_triton), ("auto", "cpp")]:
            with backends.use(selection):
                assert backends.selected() == selection
                assert op.which(*args) == expected, selection
                with backends.record() as calls:
                    op(*op_args(name))
                assert calls == [(name, expected)]


@pytest.mark.parametrize("name", TRITON_ONLY_OPS)
def test_an_op_without_a_cpp_kernel_takes_torch_on_the_cpu(name):
    op, interpreted = backends.OPS[name], os.environ.get("TRITON_INTERPRET") == "1" and "triton" in backends.available()
    with torch.no_grad():
        for selection in ("auto", "cpp", "torch", "triton"):
            expected = "triton" if selection == "triton" and interpreted else "torch"
            with backends.use(selection), backends.record() as calls:
                assert op.which(*op_args(name)) == expected, selection
                op(*op_args(name))
            assert calls == [(name, expected)]


@pytest.mark.parametrize("name", CPP_OPS)
def test_autograd_and_bfloat16_take_torch(kernel, name):
    op = backends.OPS[name]
    assert op.which(*op_args(name, requires_grad=True)) == "torch"  # the C++ kernels have no backward
    with torch.no_grad():
        bf16 = op.which(*op_args(name, dtype=torch.bfloat16))
    # the scans (and the scan step, its state float32) compute in float32 whatever their inputs; the others take
    # float32 and float64 only
    assert bf16 == ("cpp" if name in ("selective_scan", "selective_scan_step", "ssd_scan") else "torch")


def test_use_restores_the_previous_selection_even_on_error():
    with backends.use("cpp"):
        with pytest.raises(RuntimeError), backends.use("torch"):
            assert backends.selected() == "torch"
            raise RuntimeError
        assert backends.selected() == "cpp"
    assert backends.selected() == "auto"


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; expected one of auto, torch, cpp, triton"):
        with backends.use("cuda"):
            pass


@pytest.mark.parametrize("value", ["torch", "bogus"])
def test_environment_variable(value):
    env = {**os.environ, "SSMBLOCKS_BACKEND": value}
    code = "import ssmblocks.backends as b; print(b.selected())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if value == "bogus":
        assert done.returncode != 0 and "SSMBLOCKS_BACKEND: unknown backend 'bogus'" in done.stderr
    else:
        assert done.returncode == 0 and done.stdout.strip() == "torch"


def test_a_model_under_torch_runs_no_cpp_and_gives_the_same_logits(kernel):
    model, ids = hybrid(), torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        with backends.record() as auto_calls:
            logits = model(ids).logits
        with backends.use("torch"), backends.record() as torch_calls:
            reference = model(ids).logits
    assert {b for _, b in auto_calls} == {"torch", "cpp"}
    assert {b for _, b in torch_calls} == {"torch"}
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_available_lists_torch_and_the_cpp_kernels(kernel):
    found = backends.available()
    assert found[:2] == ["torch", "cpp"] and set(found) <= set(backends.BACKENDS)
    assert ssmblocks.backends.decode_plan is backends.plans.decode_plan
