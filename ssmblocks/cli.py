"""The ``ssmblocks`` command: ``info RECIPE``, ``generate`` and ``convert``. An error in what the user asked
for is printed as one line, ``ssmblocks: error: ...``, with exit status 2 (as argparse does), not a traceback."""

from __future__ import annotations

import argparse
import sys

import torch
import yaml

from .errors import SSMBlocksError
from .layers import Attention
from .model import build
from .recipe import Recipe
from .state import map_state

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a bad recipe, checkpoint, path, argument or device raises; anything else is a bug and keeps its traceback.
USER_ERRORS = (SSMBlocksError, ValueError, TypeError, OSError, yaml.YAMLError, RuntimeError)


def _bytes(state) -> int:
    total = 0

    def add(_, t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    map_state(state, add)
    return total


def info(recipe: Recipe, dtype: torch.dtype) -> str:
    """Parameter count, a per-layer table, state bytes per sequence and KV-cache bytes per token."""
    model = build(recipe, device="meta", dtype=dtype)
    lines = [f"{recipe.name}: {model.num_parameters():,} parameters ({model.num_parameters() / 1e6:.2f}M)", ""]
    lines.append(
        f"{'layer':>5}  {'mixer':<8} {'kind':<14} {'parameters':>14}  {'state bytes/seq':>15}  {'KV bytes/token':>14}"
    )
    state_total = kv_total = 0
    for i, block in enumerate(model.layers):
        mixers = block.mixer.mixers.values() if hasattr(block.mixer, "mixers") else [block.mixer]
        kv = sum(2 * m.n_kv_heads * m.head_dim * dtype.itemsize + 1 for m in mixers if isinstance(m, Attention))
        state = _bytes(block.mixer.init_state(1, 0, device="meta", dtype=dtype))  # KV caches empty: O(1) part
        kinds = "+".join(type(m).__name__ for m in mixers)
        params = sum(p.numel() for p in block.parameters())
        lines.append(f"{i:>5}  {block.mixer_name:<8} {kinds:<14} {params:>14,}  {state:>15,}  {kv:>14,}")
        state_total += state
        kv_total += kv
    lines.append("")
    lines.append(f"state per sequence (SSM + conv, fixed): {state_total:,} bytes ({state_total / 2**20:.2f} MiB)")
    lines.append(f"KV cache per token (attention layers): {kv_total:,} bytes ({kv_total / 2**10:.2f} KiB)")
    lines.append(f"activation dtype {dtype}; SSM states in float32")
    return "\n".join(lines)


def _generate(args) -> None:
    from .generation import generate

    torch.manual_seed(args.seed)
    recipe = Recipe.from_yaml(args.recipe)
    model = build(recipe, device=args.device, dtype=DTYPES[args.dtype]).eval()
    prompt = list(args.prompt.encode("utf-8"))
    if not prompt:
        raise ValueError("generate: --prompt is empty; give at least one character")
    if max(prompt) >= recipe.vocab_size:
        raise ValueError(f"generate: byte-level prompt needs vocab_size >= 256, recipe has {recipe.vocab_size}")
    ids = torch.tensor([prompt], device=args.device)

    def show(token):
        t = int(token[0])
        sys.stdout.write(bytes([t]).decode("utf-8", "replace") if t < 256 else f"<{t}>")
        sys.stdout.flush()

    sys.stdout.write(args.prompt)
    generate(
        model,
        ids,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=max(args.temperature, 1e-6),
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        streamer=show,
    )
    sys.stdout.write("\n")


def _convert(args) -> None:
    from .checkpoints import from_pretrained, save_pretrained

    if not args.dst.strip():
        raise ValueError("convert: DST is an empty path; name the folder to write")
    model = from_pretrained(args.src, dtype=DTYPES[args.dtype] if args.dtype else None, progress=True)
    save_pretrained(model, args.dst, format=args.to, max_shard_size=args.max_shard_size, progress=True)
    print(f"wrote {args.dst} ({args.to} format, {model.num_parameters():,} parameters)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ssmblocks", description="State-space-model blocks: inspect and run recipes")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="parameters, per-layer table, state and KV-cache sizes of a recipe")
    p_info.add_argument("recipe", help="path to a recipe YAML")
    p_info.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="activation dtype for the sizes")
    p_gen = sub.add_parser("generate", help="generate from a recipe (random weights), byte-level tokens")
    p_gen.add_argument("--recipe", required=True, help="path to a recipe YAML")
    p_gen.add_argument("--prompt", default="Hello")
    p_gen.add_argument("--max-new-tokens", type=int, default=32)
    p_gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p_gen.add_argument("--top-k", type=int, default=0)
    p_gen.add_argument("--top-p", type=float, default=1.0)
    p_gen.add_argument("--seed", type=int, default=0)
    p_gen.add_argument("--device", default="cpu")
    p_gen.add_argument("--dtype", default="float32", choices=DTYPES)
    p_conv = sub.add_parser("convert", help="read any supported checkpoint, write it as hf or ssmblocks")
    p_conv.add_argument("src", help="checkpoint folder or hub id")
    p_conv.add_argument("dst", help="output folder (written atomically)")
    p_conv.add_argument("--to", required=True, choices=["hf", "ssmblocks"])
    p_conv.add_argument("--dtype", choices=DTYPES, default=None, help="default float32")
    p_conv.add_argument("--max-shard-size", type=int, default=5 * 2**30, help="bytes per safetensors shard")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(info(Recipe.from_yaml(args.recipe), DTYPES[args.dtype]))
        elif args.command == "convert":
            _convert(args)
        else:
            _generate(args)
    except USER_ERRORS as e:
        parser.exit(2, f"ssmblocks: error: {one_line(e)}\n")


def one_line(error: BaseException, limit: int = 2000) -> str:
    """The error's message on one line (lines joined with '; '), at most ``limit`` characters."""
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    main()
