"""The ``ssmblocks`` command: ``recipes``, ``info RECIPE``, ``generate`` and ``convert``. Every error in what
the user asked for, the command line's own included, is printed as one line, ``ssmblocks: error: ...``, with
exit status 2 (as argparse does), not a traceback."""

from __future__ import annotations

import argparse
import codecs
import os
import sys
from pathlib import Path

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


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line like every other error (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"ssmblocks: error: {message} (see {self.prog} --help)\n")


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name (``mamba2-130m``), or a recipe YAML file: a path with a '/', a .yaml or .yml
    suffix, or an existing file."""
    if "/" in name_or_path or os.sep in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return Recipe.from_yaml(Path(name_or_path))
    if Path(name_or_path).is_file():
        return Recipe.from_yaml(Path(name_or_path))
    return Recipe.from_name(name_or_path)


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


def recipes() -> str:
    """One line per shipped recipe: name, layers, width and mixer kinds."""
    lines = []
    for name in Recipe.names():
        recipe = Recipe.from_name(name)
        kinds = sorted({spec.kind for spec in recipe.mixers.values()})
        lines.append(f"{name:<22} {recipe.n_layers:>3} layers  d_model {recipe.d_model:>5}  {', '.join(kinds)}")
    return "\n".join(lines)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here (torch.cuda.is_available() is False)")
    return device


class _ByteText:
    """Byte-level tokens: the prompt's UTF-8 bytes are its ids; generated ids are bytes, decoded as they come
    (a character split over tokens appears once complete; ids >= 256 print as ``<id>``)."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def add(self, token: int) -> str:
        if token >= 256:
            return self._decoder.decode(b"", final=True) + f"<{token}>"
        return self._decoder.decode(bytes([token]))

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)


class _TokenizerText:
    """A ``tokenizers.Tokenizer``: the text of all generated ids is decoded again at each step and the new
    part printed, held back while it ends in an incomplete character."""

    def __init__(self, tokenizer):
        self._tokenizer, self._ids, self._shown = tokenizer, [], 0

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def add(self, token: int) -> str:
        self._ids.append(token)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        new, self._shown = text[self._shown :], len(text)
        return new

    def finish(self) -> str:
        return self._tokenizer.decode(self._ids)[self._shown :]


def _generate(args) -> None:
    from .checkpoints import from_pretrained
    from .generation import stream

    device, dtype = _device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    if args.model is not None:
        if args.model.startswith((".", "/", os.sep)) and not Path(args.model).exists():  # a path, not a hub id
            raise ValueError(f"--model {args.model!r}: no such checkpoint folder")
        model = from_pretrained(args.model, dtype=dtype, device=device)
        tokenizer = getattr(model, "tokenizer", None)
    else:
        model = build(load_recipe(args.recipe), device=device, dtype=dtype).eval()
        tokenizer = None
    text = _ByteText() if tokenizer is None else _TokenizerText(tokenizer)
    prompt = text.encode(args.prompt)
    if not prompt:
        raise ValueError("generate: --prompt is empty; give at least one character")
    vocab = model.recipe.vocab_size
    if max(prompt) >= vocab:
        need = f"the prompt has id {max(prompt)}" if tokenizer else "a byte-level prompt needs vocab_size >= 256"
        raise ValueError(f"generate: {need}, but the model's vocab_size is {vocab}")
    if args.recipe is not None:
        print(f"ssmblocks: {model.recipe.name} has random weights (--recipe: untrained)", file=sys.stderr)
    if tokenizer is None:
        why = "the checkpoint has no tokenizer.json" if args.model is not None else "a recipe has no tokenizer"
        print(f"ssmblocks: byte-level tokens ({why}): the prompt's UTF-8 bytes are its ids", file=sys.stderr)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for token in stream(
        model,
        torch.tensor([prompt], device=device),
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=max(args.temperature, 1e-6),
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    ):
        sys.stdout.write(text.add(int(token[0])))
        sys.stdout.flush()
    sys.stdout.write(text.finish() + "\n")


def _convert(args) -> None:
    from .checkpoints import from_pretrained, save_pretrained

    if not args.dst.strip():
        raise ValueError("convert: DST is an empty path; name the folder to write")
    model = from_pretrained(args.src, dtype=DTYPES[args.dtype] if args.dtype else None, progress=True)
    save_pretrained(model, args.dst, format=args.to, max_shard_size=args.max_shard_size, progress=True)
    print(f"wrote {args.dst} ({args.to} format, {model.num_parameters():,} parameters)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ssmblocks", description="State-space-model blocks: inspect recipes, run checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("recipes", help="list the shipped recipes (the names info and generate --recipe take)")
    p_info = sub.add_parser("info", help="parameters, per-layer table, state and KV-cache sizes of a recipe")
    p_info.add_argument("recipe", help="a shipped recipe's name (see 'ssmblocks recipes') or a recipe YAML path")
    p_info.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="activation dtype for the sizes")
    p_gen = sub.add_parser(
        "generate",
        help="stream a generation from a checkpoint (or a recipe's random weights)",
        description="Stream a generation. Tokens: the checkpoint's tokenizer.json when it has one, else bytes "
        "(the prompt's UTF-8 bytes are its ids).",
    )
    source = p_gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder or hub id (any family from_pretrained loads)")
    source.add_argument("--recipe", help="recipe name or YAML path: random weights, for trying a shape")
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
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "recipes":
            print(recipes())
        elif args.command == "info":
            print(info(load_recipe(args.recipe), DTYPES[args.dtype]))
        elif args.command == "convert":
            _convert(args)
        else:
            _generate(args)
    except USER_ERRORS as e:
        parser.exit(2, f"ssmblocks: error: {one_line(e)}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\n")


def one_line(error: BaseException, limit: int = 2000) -> str:
    """The error's message on one line (lines joined with '; '), at most ``limit`` characters."""
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    main()
