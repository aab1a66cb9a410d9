"""Whole-model CPU speed, ours vs transformers on the same saved checkpoints, with the floors.

Run:  python -m pytest tests/benchmarks --benchmark-only -p no:randomly
(deselected from the default run by --benchmark-skip in pyproject.toml). mamba-130m and mamba2-130m shaped
models with random weights, full size, fp32. Floors: for prefill, the model's own matmuls alone (every
nn.Linear and the LM head on inputs of the right shape); for batch-1 decode, one matrix-vector pass over
all weights per token. The summary table at the end prints ours, theirs, the floor and the ratios.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ssmblocks
from ssmblocks.generation import generate

tf = pytest.importorskip("transformers")

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
MODELS = ["mamba-130m", "mamba2-130m"]
PREFILL = {"prefill 1x1024": (1, 1024), "prefill 4x2048": (4, 2048)}
NEW_TOKENS = 128


@pytest.fixture(scope="module", params=MODELS)
def models(request, tmp_path_factory):
    torch.manual_seed(0)
    recipe = ssmblocks.Recipe.from_yaml(RECIPES / f"{request.param}.yaml")
    folder = tmp_path_factory.mktemp(request.param)
    ssmblocks.save_pretrained(ssmblocks.build(recipe), folder, format="hf")
    ours = ssmblocks.from_pretrained(folder)
    theirs = tf.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return request.param, ours, theirs


def linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def run(benchmark, fn, rounds: int) -> float:
    """Median seconds of ``rounds`` timed runs, after one warm-up when there are several."""
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=int(rounds > 1))
    return benchmark.stats.stats.median


@pytest.mark.parametrize("case", PREFILL)
@pytest.mark.parametrize("side", ["ours", "theirs", "floor"])
def test_prefill(benchmark, models, results, case, side):
    name, ours, theirs = models
    b, l = PREFILL[case]
    ids = torch.randint(0, ours.recipe.vocab_size, (b, l))
    if side == "floor":
        inputs = [(layer, torch.randn(b, l, layer.in_features)) for layer in linears(ours)]
        fn = lambda: [layer(x) for layer, x in inputs]  # noqa: E731
    else:
        model = ours if side == "ours" else theirs
        fn = lambda: model(ids).logits  # noqa: E731
    rounds = 1 if side == "theirs" else 3
    results(name, case, side, run(benchmark, fn, rounds))


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("side", ["ours", "theirs", "floor"])
def test_decode(benchmark, models, results, batch, side):
    name, ours, theirs = models
    if side == "floor" and batch != 1:
        pytest.skip("the weight-streaming floor is defined for batch 1")
    prompt = torch.randint(0, ours.recipe.vocab_size, (batch, 16))
    if side == "ours":
        fn = lambda: generate(ours, prompt, max_new_tokens=NEW_TOKENS)  # noqa: E731
    elif side == "theirs":
        fn = lambda: theirs.generate(  # noqa: E731
            prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    else:
        inputs = [(layer, torch.randn(1, layer.in_features)) for layer in linears(ours)]
        fn = lambda: [[layer(x) for layer, x in inputs] for _ in range(NEW_TOKENS)]  # noqa: E731
    seconds = run(benchmark, fn, 1 if side == "theirs" else 2)
    results(name, f"decode batch {batch}", side, batch * NEW_TOKENS / seconds)
