"""ssmblocks: state-space-model layers (Mamba, Mamba2, hybrids) for people who build their own models."""

from . import ops
from .checkpoints import from_pretrained, save_pretrained
from .errors import CheckpointError, ShapeError, SSMBlocksError, StateError
from .generation import generate, stream
from .layers import SSD, Attention, CausalConv1d, GatedRMSNorm, RMSNorm, SelectiveSSM, SwiGLU
from .model import CausalLM, LMOutput, build
from .recipe import Recipe
from .state import ConvState, KVCache, ModelState, SSMState

__version__ = "0.1.0"

# Submodules reachable as attributes (ssmblocks.quantization.quantize_int8) but imported on first use only.
_LAZY_SUBMODULES = ("allocator", "distributed", "quantization", "training")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ssmblocks' has no attribute {name!r}")


__all__ = [
    "SSD",
    "Attention",
    "CausalConv1d",
    "CausalLM",
    "CheckpointError",
    "ConvState",
    "GatedRMSNorm",
    "KVCache",
    "LMOutput",
    "ModelState",
    "RMSNorm",
    "Recipe",
    "SSMBlocksError",
    "SSMState",
    "SelectiveSSM",
    "ShapeError",
    "StateError",
    "SwiGLU",
    "build",
    "from_pretrained",
    "generate",
    "ops",
    "save_pretrained",
    "stream",
    "training",
]
