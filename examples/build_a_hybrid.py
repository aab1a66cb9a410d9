"""Build a novel hybrid from a YAML recipe, prefill a batch of prompts and stream the generation.

Run:  python examples/build_a_hybrid.py      (CPU, seconds; random weights, byte-level tokens)
"""

from __future__ import annotations

import torch

import ssmblocks
from ssmblocks.generation import stream

RECIPE = """
name: tiny-hybrid
vocab_size: 256                 # byte-level tokens
d_model: 128
n_layers: 7
mixers:
  s: {kind: selective_ssm, d_state: 16}                          # Mamba1
  m: {kind: ssd, d_state: 32, head_dim: 32, n_groups: 2}         # Mamba2
  a: {kind: attention, n_heads: 4, n_kv_heads: 2, rotary_fraction: 0.5}
  p: {kind: parallel, mixers: [m, a]}                            # Falcon-H1 style: side by side, summed
mlp: {kind: swiglu, hidden_dim: 256}
pattern: "s m a (m p)*2"       # one mixer name per layer; *N repeats, (...) groups
"""


def main() -> None:
    torch.manual_seed(0)
    recipe = ssmblocks.Recipe.from_yaml(RECIPE)
    print(f"layers: {recipe.layers}")
    model = ssmblocks.build(recipe).eval()
    print(f"{model.num_parameters() / 1e6:.2f}M parameters")

    prompts = [b"Hello, state spaces", b"Hi"]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    print("streaming (greedy, prompts prefilled in chunks of 8 tokens):")
    texts = [bytearray() for _ in prompts]
    for step, tokens in enumerate(stream(model, ids, attention_mask=mask, max_new_tokens=16, prefill_chunk_size=8)):
        for text, t in zip(texts, tokens.tolist(), strict=True):
            text.append(t)
        print(f"  step {step:2d}: {tokens.tolist()}")
    for p, text in zip(prompts, texts, strict=True):
        print(f"{p!r} -> {bytes(text)!r}")


if __name__ == "__main__":
    main()
