"""Models built from recipes: pre-norm residual blocks of any mixer, an embedding and an LM head."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ShapeError
from .generation import generate
from .layers import SSD, Attention, RMSNorm, SelectiveSSM, SwiGLU
from .layers.lm_head import LMHead
from .losses import chunked_cross_entropy, next_token_targets
from .ops import add_rms_norm
from .precision import warn_if_slow_bf16
from .recipe import AttentionSpec, ParallelSpec, Recipe, SelectiveSSMSpec, SSDSpec
from .state import ModelState


class ParallelMixers(nn.Module):
    """Several mixers on the same input, outputs summed (Falcon-H1 style). State: a tuple, one per mixer."""

    def __init__(self, mixers: dict[str, nn.Module]):
        super().__init__()
        self.mixers = nn.ModuleDict(mixers)

    def init_state(self, batch_size: int, max_seqlen: int | None = None, *, device=None, dtype=None) -> tuple:
        return tuple(m.init_state(batch_size, max_seqlen, device=device, dtype=dtype) for m in self.mixers.values())

    def forward(self, x, state=None, attention_mask=None, cu_seqlens=None):
        states = (None,) * len(self.mixers) if state is None else state
        return sum(
            m(x, state=s, attention_mask=attention_mask, cu_seqlens=cu_seqlens)
            for m, s in zip(self.mixers.values(), states, strict=True)
        )


def build_mixer(name: str, recipe: Recipe, device=None, dtype=None) -> nn.Module:
    """The module for the recipe's mixer ``name``."""
    spec = recipe.mixers[name]
    kw = {"device": device, "dtype": dtype}
    if isinstance(spec, ParallelSpec):
        return ParallelMixers({member: build_mixer(member, recipe, device, dtype) for member in spec.mixers})
    args = spec.model_dump(exclude={"kind"})
    cls = {SelectiveSSMSpec: SelectiveSSM, SSDSpec: SSD, AttentionSpec: Attention}[type(spec)]
    return cls(recipe.d_model, **args, **kw)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm2(x)) when there is an MLP."""

    def __init__(self, recipe: Recipe, mixer_name: str, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.mixer_name = mixer_name
        self.norm = RMSNorm(recipe.d_model, recipe.norm.eps, **kw)
        self.mixer = build_mixer(mixer_name, recipe, device, dtype)
        self.norm2 = self.mlp = None
        if recipe.mlp is not None:
            self.norm2 = RMSNorm(recipe.d_model, recipe.norm.eps, **kw)
            self.mlp = SwiGLU(recipe.d_model, recipe.mlp.hidden_dim, recipe.mlp.bias, **kw)

    def forward(self, residual, state=None, attention_mask=None, cu_seqlens=None):
        """residual: (b, l, d) in the residual dtype; the mixer and MLP run in the module's dtype. With an MLP,
        the mixer's residual add and norm2 are one op (``ops.add_rms_norm``)."""
        dtype = self.norm.weight.dtype
        h = self.mixer(self.norm(residual).to(dtype), state=state, attention_mask=attention_mask, cu_seqlens=cu_seqlens)
        if self.mlp is None:
            return residual + h.to(residual.dtype)
        normed, residual = add_rms_norm(h, residual, self.norm2.weight, self.norm2.eps)
        return residual + self.mlp(normed.to(dtype)).to(residual.dtype)

    def add_mlp(self, residual: torch.Tensor) -> torch.Tensor:
        """residual + mlp(norm2(residual)), or residual itself without an MLP (after a fused decode step)."""
        if self.mlp is None:
            return residual
        return residual + self.mlp(self.norm2(residual).to(self.norm.weight.dtype)).to(residual.dtype)


class LMOutput(NamedTuple):
    logits: torch.Tensor  # (b, l, vocab_size)
    loss: torch.Tensor | None = None


class CausalLM(nn.Module):
    """Embedding -> blocks -> final RMSNorm -> LM head, as the recipe says.

    ``model(input_ids, state=None, attention_mask=None, cu_seqlens=None, labels=None)`` returns
    ``LMOutput(logits (b, l, vocab_size), loss)``; the loss (mean cross-entropy of next-token prediction,
    labels shifted inside, -100 ignored) only when labels are given. Set ``model.gradient_checkpointing =
    True`` to keep only each block's input in training and recompute the block in backward.

    Set ``model.loss_chunk_size = c`` to compute the loss from the final hidden states c tokens at a time,
    each chunk's logits recomputed in backward (``losses.chunked_cross_entropy``), so the (b, l, vocab)
    float32 logits never exist; the output's logits are then None when labels are given. They are None too
    under a vocabulary-parallel head (``distributed.tensor_parallel(..., vocab_parallel=True)``), where no rank
    holds whole logits.
    """

    def __init__(self, recipe: Recipe, device=None, dtype=None):
        super().__init__()
        self.recipe = recipe
        self.tokenizer = None  # set by from_pretrained when the checkpoint has a tokenizer.json
        self.gradient_checkpointing = False  # True: recompute each block in backward (training, no state)
        self.loss_chunk_size: int | None = None  # tokens per chunk of the LM head and loss (None: all at once)
        kw = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(recipe.padded_vocab_size, recipe.d_model, **kw)
        self.layers = nn.ModuleList(Block(recipe, name, device, dtype) for name in recipe.layers)
        self.norm_f = RMSNorm(recipe.d_model, recipe.norm.eps, **kw)
        self.lm_head = LMHead(recipe.d_model, recipe.padded_vocab_size, recipe.vocab_size, **kw)
        if recipe.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        if self.embedding.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Upstream Mamba LM init: embedding N(0, 0.02), linear biases zero (dt_proj's kept), and the output
        projections of each residual branch scaled by 1/sqrt(branches * n_layers)."""
        nn.init.normal_(self.embedding.weight, std=0.02)
        branches = 1 if self.recipe.mlp is None else 2
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not name.endswith("dt_proj"):
                nn.init.zeros_(module.bias)
            if name.rsplit(".", 1)[-1] in ("out_proj", "o_proj", "down_proj"):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                module.weight /= math.sqrt(branches * self.recipe.n_layers)

    def init_state(self, batch_size: int, max_seqlen: int | None = None, *, device=None, dtype=None) -> ModelState:
        """One state per layer (None for layers without state). max_seqlen preallocates KV caches."""
        w = self.embedding.weight
        device = w.device if device is None else device
        dtype = w.dtype if dtype is None else dtype
        states = [b.mixer.init_state(batch_size, max_seqlen, device=device, dtype=dtype) for b in self.layers]
        return ModelState(states)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        state: ModelState | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> LMOutput:
        """input_ids: (b, l) int. state: read and updated in place. labels: (b, l), -100 = ignore."""
        self._check_ids(input_ids, state)
        residual = self.embed(input_ids)
        layer_states = [None] * len(self.layers) if state is None else state.layers
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and state is None
        for block, layer_state in zip(self.layers, layer_states, strict=True):
            if recompute:
                residual = checkpoint(block, residual, None, attention_mask, cu_seqlens, use_reentrant=False)
            else:
                residual = block(residual, layer_state, attention_mask, cu_seqlens)
        if labels is not None and (self.loss_chunk_size is not None or not self.lm_head.loss_from_logits):
            return LMOutput(None, self.head_loss(residual, labels, cu_seqlens))
        logits = self.head(residual)
        loss = None if labels is None else self.loss(logits, labels, cu_seqlens)
        return LMOutput(logits, loss)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (b, l) -> the residual stream (b, l, d): embeddings, in float32 if residual_in_fp32."""
        residual = self.embedding(input_ids)
        return residual.float() if self.recipe.residual_in_fp32 else residual

    def head(self, residual: torch.Tensor) -> torch.Tensor:
        """The residual stream (b, l, d) -> logits (b, l, vocab_size): final norm, then the LM head."""
        hidden = self.norm_f(residual).to(self.lm_head.weight.dtype)
        return self.lm_head(hidden)[..., : self.recipe.vocab_size]

    def head_loss(
        self, residual: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``loss(head(residual), labels, cu_seqlens)`` without the whole logits: the final norm, then the LM
        head's cross-entropy ``loss_chunk_size`` tokens at a time. residual: (b, l, d)."""
        targets = next_token_targets(labels, residual.shape[:2], cu_seqlens).flatten()
        hidden = self.norm_f(residual[:, :-1]).to(self.lm_head.weight.dtype).flatten(0, 1)
        return chunked_cross_entropy(hidden, targets, self.lm_head.cross_entropy_sum, self.loss_chunk_size)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy: position t predicts labels[t + 1]; -100 ignored; packed
        sequences (cu_seqlens) never predict across a boundary. labels: (b, l) integer, like the input ids."""
        targets = next_token_targets(labels, logits.shape[:2], cu_seqlens)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def _check_ids(self, input_ids: torch.Tensor, state: ModelState | None) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(
                f"CausalLM: input_ids must be a torch.Tensor of token ids (batch, seqlen), got "
                f"{type(input_ids).__name__}; wrap it, e.g. torch.tensor([[...]])"
            )
        if input_ids.dim() != 2:
            raise ShapeError(f"CausalLM: input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):  # what nn.Embedding takes; never cast
            raise TypeError(f"CausalLM: input_ids must be integer token ids (int64 or int32), got {input_ids.dtype}")
        if input_ids.shape[0] == 0:
            raise ShapeError(f"CausalLM: empty batch (input_ids of shape {tuple(input_ids.shape)})")
        if input_ids.shape[1] == 0:
            raise ShapeError(f"CausalLM: empty sequence (seqlen 0, input_ids of shape {tuple(input_ids.shape)})")
        # no host reads while a CUDA graph is captured or torch.compile traces (a data-dependent branch)
        capturing = torch.compiler.is_compiling() or (input_ids.is_cuda and torch.cuda.is_current_stream_capturing())
        if not capturing and (input_ids.min() < 0 or input_ids.max() >= self.recipe.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= self.recipe.vocab_size)][0].item()
            raise ShapeError(f"CausalLM: token id {bad} is out of range for vocab_size={self.recipe.vocab_size}")
        if state is not None and len(state.layers) != len(self.layers):
            raise ShapeError(f"CausalLM: state has {len(state.layers)} layers, the model {len(self.layers)}")

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """See ssmblocks.generation.generate."""
        return generate(self, input_ids, **kwargs)

    def num_parameters(self) -> int:
        """Parameters counted once (tied embeddings once)."""
        return sum(p.numel() for p in self.parameters())


def build(recipe: Recipe, device=None, dtype=None) -> CausalLM:
    """Build a CausalLM from a recipe. device="meta" builds without allocating (for counting). Warns when
    asked for bfloat16 on a CPU where bf16 matmuls are slow."""
    if device != "meta":
        warn_if_slow_bf16(dtype, device)
    return CausalLM(recipe, device=device, dtype=dtype)
