"""Whole-model CPU speed of two checkouts of ssmblocks, interleaved in one sitting.

    python benchmarks/cpu_before_after.py BEFORE_TREE AFTER_TREE [--rounds 3]

Each (round, model, tree) runs in a process of its own with that tree first on PYTHONPATH (and its own
C++ build folder), trees alternating, so a slow stretch of the machine hits both. Cases: prefill 1x1024 and
4x2048, decode batch 1 and 8 (128 new tokens after a 16-token prompt), mamba-130m and mamba2-130m shapes with
random weights, fp32. Prints each run and the medians with after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CASE = """
import json, statistics, sys, time, torch, ssmblocks
from ssmblocks.generation import generate
torch.manual_seed(0)
model = ssmblocks.build(ssmblocks.Recipe.from_yaml(sys.argv[1])).eval()
def median_s(fn, n):
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return statistics.median(times)
out = {}
with torch.inference_mode():
    for b, l in ((1, 1024), (4, 2048)):
        ids = torch.randint(0, 1000, (b, l))
        out[f"prefill {b}x{l} (s)"] = median_s(lambda: model(ids), 3 if b == 1 else 1)
    for b in (1, 8):
        prompt = torch.randint(0, 1000, (b, 16))
        out[f"decode batch {b} (tok/s)"] = b * 128 / median_s(lambda: generate(model, prompt, max_new_tokens=128), 2)
print(json.dumps(out))
"""
MODELS = ("mamba-130m", "mamba2-130m")


def run(tree: Path, model: str) -> dict[str, float]:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / f"{model}.yaml"
    env = {**os.environ, "PYTHONPATH": str(tree), "TORCH_EXTENSIONS_DIR": f"/tmp/ssmblocks-ext-{tree.name}"}
    done = subprocess.run(
        [sys.executable, "-c", CASE, str(recipe)], env=env, cwd="/", capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.rounds):
        for model in MODELS:
            for side, tree in (("before", args.before), ("after", args.after)):
                result = run(tree.resolve(), model)
                print(r + 1, model, side, json.dumps(result), flush=True)
                for case, value in result.items():
                    runs.setdefault((model, case, side), []).append(value)
    print(f"\n{'model':<13}{'case':<26}{'before':>9}{'after':>9}{'after/before':>14}")
    for model, case, side in runs:
        if side == "before":
            before, after = (statistics.median(runs[(model, case, s)]) for s in ("before", "after"))
            print(f"{model:<13}{case:<26}{before:>9.3g}{after:>9.3g}{after / before:>14.2f}")


if __name__ == "__main__":
    main()
