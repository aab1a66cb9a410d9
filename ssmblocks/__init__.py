"""ssmblocks: state-space-model layers (Mamba, Mamba2, hybrids) for people who build their own models."""

from . import ops
from .errors import ShapeError, SSMBlocksError, StateError
from .layers import SSD, Attention, CausalConv1d, GatedRMSNorm, RMSNorm, SelectiveSSM, SwiGLU
from .state import ConvState, KVCache, SSMState

__version__ = "0.1.0"

__all__ = [
    "SSD",
    "Attention",
    "CausalConv1d",
    "ConvState",
    "GatedRMSNorm",
    "KVCache",
    "RMSNorm",
    "SSMBlocksError",
    "SSMState",
    "SelectiveSSM",
    "ShapeError",
    "StateError",
    "SwiGLU",
    "ops",
]
