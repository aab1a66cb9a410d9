"""Peak memory of a prefill forward on CPU, ours vs transformers, each in a fresh subprocess.

Run:  python benchmarks/prefill_memory.py            (Linux: reads VmHWM after resetting it)

mamba-130m / mamba2-130m shapes, random weights, fp32, inference mode, logits for every position. Reports
the peak resident memory the forward adds on top of the loaded model, and ours alone at 1x16384 to show
that memory grows linearly with the sequence.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CHILD = r"""
import json, sys, torch
name, side, b, l = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import ssmblocks
recipe = ssmblocks.Recipe.from_yaml(sys.argv[5])
if side == "ours":
    model = ssmblocks.build(recipe).eval()
else:
    import transformers as tf
    spec = recipe.mixers["m"]
    if spec.kind == "ssd":
        cfg = tf.Mamba2Config(hidden_size=recipe.d_model, num_hidden_layers=recipe.n_layers,
                              vocab_size=recipe.padded_vocab_size, num_heads=2 * recipe.d_model // 64,
                              head_dim=64, n_groups=1, state_size=128, tie_word_embeddings=True)
        model = tf.Mamba2ForCausalLM(cfg).eval()
    else:
        cfg = tf.MambaConfig(hidden_size=recipe.d_model, num_hidden_layers=recipe.n_layers,
                             vocab_size=recipe.padded_vocab_size, state_size=16)
        model = tf.MambaForCausalLM(cfg).eval()
ids = torch.randint(0, recipe.vocab_size, (b, l))
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
before = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current size
with torch.inference_mode():
    model(ids)
print(json.dumps({"extra_mib": (kib("VmHWM") - before) / 1024}))
"""


def measure(name: str, side: str, b: int, l: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, name, side, str(b), str(l), str(RECIPES / f"{name}.yaml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_mib"]


def main() -> None:
    print(f"{'model':<13}{'shape':<10}{'ours MiB':>10}{'transformers MiB':>18}")
    for name in ("mamba-130m", "mamba2-130m"):
        for b, l in ((1, 1024), (4, 2048)):
            ours, theirs = measure(name, "ours", b, l), measure(name, "theirs", b, l)
            print(f"{name:<13}{f'{b}x{l}':<10}{ours:>10.0f}{theirs:>18.0f}", flush=True)
        print(f"{name:<13}{'1x16384':<10}{measure(name, 'ours', 1, 16384):>10.0f}{'-':>18}", flush=True)


if __name__ == "__main__":
    main()
