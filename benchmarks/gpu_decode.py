"""GPU check: the torch paths on CUDA match CPU, and CUDA-graph decode gives eager's tokens, faster.

Run on a CUDA machine:  python benchmarks/gpu_decode.py [--recipe recipes/mamba2-130m.yaml]
"""

from __future__ import annotations

import argparse
import time

import torch

import ssmblocks
from ssmblocks.generation import generate


def layers_match_cpu() -> None:
    torch.manual_seed(0)
    layers = {
        "SelectiveSSM": ssmblocks.SelectiveSSM(64, d_state=16),
        "SSD": ssmblocks.SSD(64, d_state=32, head_dim=16, n_groups=2, chunk_size=16),
        "Attention": ssmblocks.Attention(64, 8, 2, rotary_fraction=0.5),
    }
    x = torch.randn(2, 77, 64)
    for name, layer in layers.items():
        with torch.no_grad():
            cpu = layer(x)
            gpu = layer.cuda()(x.cuda()).cpu()
            bf16 = layer.to(torch.bfloat16)(x.cuda().bfloat16()).float().cpu()
        err = ((gpu - cpu).abs().max() / cpu.abs().max()).item()
        err_bf16 = ((bf16 - cpu).abs().max() / cpu.abs().max()).item()
        print(f"{name:12s} CUDA fp32 vs CPU rel err {err:.2e}; CUDA bf16 vs CPU fp32 rel err {err_bf16:.2e}")


def decode_speed(recipe_path: str, batch: int, prompt_len: int, new: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    recipe = ssmblocks.Recipe.from_yaml(recipe_path)
    model = ssmblocks.build(recipe, device="cuda", dtype=dtype).eval()
    ids = torch.randint(0, recipe.vocab_size, (batch, prompt_len), device="cuda")
    results = {}
    for graph in (False, True):
        generate(model, ids, max_new_tokens=4, cuda_graph=graph)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(model, ids, max_new_tokens=new, cuda_graph=graph)
        torch.cuda.synchronize()
        results[graph] = (out, time.perf_counter() - start)
    same = torch.equal(results[False][0], results[True][0])
    t_eager, t_graph = results[False][1], results[True][1]
    print(
        f"{recipe.name} {dtype} batch {batch}, prompt {prompt_len}, {new} new tokens: "
        f"eager {batch * new / t_eager:.0f} tok/s, CUDA graph {batch * new / t_graph:.0f} tok/s "
        f"({t_eager / t_graph:.1f}x); identical tokens: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", action="append", default=None)
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name())
    layers_match_cpu()
    for path in args.recipe or [
        "recipes/mamba2-130m.yaml",
        "recipes/mamba-130m.yaml",
        "recipes/hybrid-three-mixers.yaml",
    ]:
        for dtype in (torch.float32, torch.bfloat16):
            decode_speed(path, batch=1, prompt_len=128, new=128, dtype=dtype)


if __name__ == "__main__":
    main()
