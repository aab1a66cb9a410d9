"""Load a checkpoint (local folder or hub id) and stream a generation.

Run:  python examples/load_and_generate.py state-spaces/mamba-130m-hf --prompt "The state of"
      python examples/load_and_generate.py path/to/checkpoint --max-new-tokens 64 --temperature 0.8

Any supported family works: HF Mamba, Mamba2 (Codestral), Bamba, the original state-spaces/mamba(2)-*
checkpoints, and ssmblocks' own format. Uses the checkpoint's tokenizer.json when it has one, bytes
otherwise. Without an argument it saves a small random model to a temporary folder and loads that.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

import ssmblocks


def demo_checkpoint() -> str:
    """A tiny random Mamba2 saved in transformers' format, for running without a download."""
    recipe = ssmblocks.Recipe(
        name="tiny-mamba2",
        vocab_size=256,
        d_model=128,
        n_layers=2,
        mixers={"m": {"kind": "ssd", "d_state": 16, "head_dim": 32}},
        pattern="m*2",
    )
    folder = tempfile.mkdtemp(prefix="ssmblocks-demo-")
    ssmblocks.save_pretrained(ssmblocks.build(recipe), folder, format="hf")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="folder or hub id (default: a tiny random demo model)")
    parser.add_argument("--prompt", default="Mamba is")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model = ssmblocks.from_pretrained(args.checkpoint or demo_checkpoint(), device=args.device)
    tok = model.tokenizer
    if tok is not None:
        ids = tok.encode(args.prompt).ids
        decode = lambda t: tok.decode([t])  # noqa: E731
    else:
        ids = list(args.prompt.encode("utf-8"))
        decode = lambda t: bytes([t]).decode("utf-8", "replace") if t < 256 else f"<{t}>"  # noqa: E731
    prompt = torch.tensor([ids], device=args.device)

    sys.stdout.write(args.prompt)
    for token in ssmblocks.stream(
        model,
        prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=max(args.temperature, 1e-6),
        top_p=args.top_p,
        seed=0,
    ):
        sys.stdout.write(decode(int(token[0])))
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
