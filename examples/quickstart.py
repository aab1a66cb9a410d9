"""Build a small hybrid language model from ssmblocks layers, then prefill a prompt and decode.

Run:  python examples/quickstart.py      (CPU, a few seconds)

The model mixes all three sequence mixers (Mamba2's SSD, Mamba1's SelectiveSSM and grouped-query
attention) in pre-norm residual blocks. Generation uses one loop for every layer: each layer allocates
its own state with ``init_state`` and continues from it, whatever kind of layer it is.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ssmblocks import SSD, Attention, RMSNorm, SelectiveSSM, SwiGLU


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm2(x))."""

    def __init__(self, mixer: nn.Module, d_model: int, mlp_hidden: int):
        super().__init__()
        self.norm, self.mixer = RMSNorm(d_model), mixer
        self.norm2, self.mlp = RMSNorm(d_model), SwiGLU(d_model, mlp_hidden)

    def forward(self, x, state=None):
        x = x + self.mixer(self.norm(x), state=state)
        return x + self.mlp(self.norm2(x))


class TinyHybrid(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        mixers = [
            SSD(d, d_state=16, head_dim=16, n_groups=2),
            SelectiveSSM(d, d_state=8),
            Attention(d, n_heads=4, n_kv_heads=2, rotary_fraction=0.5),
            SSD(d, d_state=16, head_dim=16),
        ]
        self.blocks = nn.ModuleList(Block(m, d, 2 * d) for m in mixers)
        self.norm_f = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def init_state(self, batch_size: int, max_seqlen: int):
        return [block.mixer.init_state(batch_size, max_seqlen) for block in self.blocks]

    def forward(self, ids: torch.Tensor, states=None) -> torch.Tensor:
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            x = block(x, None if states is None else states[i])
        return self.lm_head(self.norm_f(x))


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    model = TinyHybrid().eval()
    prompt = torch.tensor([list(b"State spaces meet attention: ")])
    new_tokens = 24

    start = time.perf_counter()
    states = model.init_state(batch_size=1, max_seqlen=prompt.shape[1] + new_tokens)
    logits = model(prompt, states)  # prefill: the whole prompt in one call
    tokens = [int(logits[0, -1].argmax())]
    decode_logits = []
    for _ in range(new_tokens - 1):  # decode: one token per call, O(1) per SSM layer
        step = model(torch.tensor([[tokens[-1]]]), states)
        decode_logits.append(step[0, -1])
        tokens.append(int(step[0, -1].argmax()))
    elapsed = time.perf_counter() - start

    # The same tokens fed in one full forward give the same logits as prefill + decode.
    full = model(torch.cat([prompt, torch.tensor([tokens[:-1]])], dim=1))
    err = (full[0, prompt.shape[1] :] - torch.stack(decode_logits)).abs().max().item()

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, mixers: {[type(b.mixer).__name__ for b in model.blocks]}")
    print(f"greedy tokens: {tokens}")
    print(f"prefill {prompt.shape[1]} + decode {new_tokens} tokens in {elapsed * 1e3:.0f} ms")
    print(f"max |decode logits - full-forward logits| = {err:.2e}")
    assert err < 1e-4, "decode through the states diverged from the full forward"


if __name__ == "__main__":
    main()
