"""GPU check: the torch paths on CUDA match CPU, and CUDA-graph decode gives eager's tokens, faster.

Run on a CUDA machine:  python benchmarks/gpu_decode.py [--recipe recipes/mamba2-130m.yaml] [--peers DIR]

With ``--peers`` (a folder holding mamba_ssm's source; a measuring stick, never a dependency) it also compares
CUDA-graph decode, bf16, tokens/s per sequence at batch 1 and 32, with mamba_ssm's ``generate(cg=True)`` on a
model of the same sizes. Both are timed as (time of 320 new tokens - time of 64) / 256 after a same-shape
warm-up, so neither the prompt nor the graph capture is in the figure.
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


def per_token_seconds(run, short: int = 64, long: int = 320) -> float:
    """Seconds per decode step of ``run(n_new)``: the difference of two lengths, after a warm-up of each."""
    times = {}
    for n in (short, long, short, long):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(n)
        torch.cuda.synchronize()
        times[n] = time.perf_counter() - start  # the second (warm) run of each length is kept
    return (times[long] - times[short]) / (long - short)


def versus_mamba_ssm(recipe_path: str, peers: str) -> None:
    """CUDA-graph decode tokens/s per sequence, ours against mamba_ssm's generate(cg=True), bf16."""
    from gpu_train_step import mamba_ssm_model

    recipe = ssmblocks.Recipe.from_yaml(recipe_path)
    peer = mamba_ssm_model(recipe, peers, torch.bfloat16)
    if peer is None:
        return
    peer.eval()
    ours = ssmblocks.build(recipe, device="cuda", dtype=torch.bfloat16).eval()
    for batch in (1, 32):
        ids = torch.randint(0, recipe.vocab_size, (batch, 16), device="cuda")
        t_ours = per_token_seconds(lambda n, ids=ids: generate(ours, ids, max_new_tokens=n, cuda_graph=True))
        t_peer = per_token_seconds(lambda n, ids=ids: peer.generate(ids, max_length=16 + n, cg=True))
        print(
            f"{recipe.name} bf16 batch {batch}: ours {1 / t_ours:.0f} tok/s per sequence, "
            f"mamba_ssm {1 / t_peer:.0f} ({t_peer / t_ours:.2f}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", action="append", default=None)
    parser.add_argument("--peers", default=None, help="folder holding mamba_ssm's source: compare decode with it")
    args = parser.parse_args()
    if args.peers:
        for path in args.recipe or ["recipes/mamba2-130m.yaml"]:
            versus_mamba_ssm(path, args.peers)
        return
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
