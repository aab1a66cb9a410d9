"""Checkpoints: load the official Mamba / Mamba2 / Bamba families and ssmblocks' own format; save back.

One module per family (``mamba_hf``, ``mamba2_hf``, ``bamba_hf``, ``mamba_ssm``), each a key table plus
config <-> recipe functions; ``loading`` does the rest.
"""

from .loading import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
