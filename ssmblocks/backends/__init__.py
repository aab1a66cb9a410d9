"""Which implementation of each op runs: the registry (``registry.py``: every op, its implementations and the
rule that picks one), the C++ CPU backend (``cpp_kernels.py``, kernels in ``cpp/``) and the decode plans
(``plans.py``).

    with ssmblocks.backends.use("torch"):     # or SSMBLOCKS_BACKEND=torch; also "auto", "cpp", "triton"
        model(ids)
    ssmblocks.ops.rms_norm.which(x, w, 1e-5)  # "cpp": the backend this call takes
"""

from .registry import BACKENDS, OPS, SELECTIONS, Op, available, record, selected, use

__all__ = [
    "BACKENDS",
    "OPS",
    "SELECTIONS",
    "DecodePlan",
    "Op",
    "available",
    "decode_plan",
    "record",
    "selected",
    "use",
]


def __getattr__(name: str):
    """The decode plans import the model's classes, which import the ops: loaded on first use."""
    if name in ("DecodePlan", "decode_plan"):
        from . import plans

        return getattr(plans, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
