"""Standalone layers; each takes and returns (batch, seqlen, d_model) tensors."""

from .attention import Attention
from .conv import CausalConv1d
from .mlp import SwiGLU
from .norm import GatedRMSNorm, RMSNorm
from .selective_ssm import SelectiveSSM
from .ssd import SSD

__all__ = ["Attention", "CausalConv1d", "GatedRMSNorm", "RMSNorm", "SSD", "SelectiveSSM", "SwiGLU"]
