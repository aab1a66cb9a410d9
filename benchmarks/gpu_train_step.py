"""A recipe's model trained on one GPU: the step time, tokens/s and peak memory under each backend selection,
after a check that the selections agree on the loss and the gradients.

    python benchmarks/gpu_train_step.py [--recipe mamba2-130m] [--batch 8] [--seqlen 2048] [--peers DIR] [--out DIR]

bf16 autocast over float32 weights, AdamW, gradients of every parameter; the step is timed with CUDA events
(median of --steps steps after --warmup). With ``--peers`` (a folder holding mamba_ssm's source; a measuring
stick, never a dependency) the same step of mamba_ssm's ``MambaLMHeadModel`` with the recipe's sizes runs in the
same process (Mamba2 layers with ``use_mem_eff_path=False``; Mamba1 layers only where its CUDA extension imports).
The log goes to DIR/gpu_train_step.log.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from gpu_common import say, write_log

import ssmblocks
from ssmblocks import backends


def step(model, optimizer, ids) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def agreement(recipe, ids) -> None:
    """Loss and gradients of the same weights under each selection, against the torch implementations."""
    torch.manual_seed(0)
    model = ssmblocks.build(recipe, device="cuda")
    results = {}
    for selection in ("torch", "auto"):
        with backends.use(selection), backends.record() as calls:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss
            loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        results[selection] = (loss.item(), grads, sorted({f"{op}:{b}" for op, b in calls}))
    ref_loss, ref_grads, _ = results["torch"]
    loss, grads, ran = results["auto"]
    worst, worst_name = max(
        (((grads[n] - g).norm() / g.norm()).item(), n) for n, g in ref_grads.items() if g.norm() > 0
    )
    say(f"auto ran: {', '.join(ran)}")
    say(f"loss torch {ref_loss:.5f}  auto {loss:.5f}  |diff| {abs(loss - ref_loss):.2e}")
    say(f"largest relative gradient difference (norm), auto vs torch: {worst:.2e} ({worst_name})")


def mamba_ssm_model(recipe, peers: str, dtype: torch.dtype = torch.float32):
    """mamba_ssm's MambaLMHeadModel with the sizes of a pure-Mamba recipe, on CUDA in ``dtype``, or None if it
    cannot run (Mamba1 needs mamba_ssm's CUDA extension)."""
    sys.path.insert(0, peers)
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    (spec,) = recipe.mixers.values()
    if spec.kind == "ssd":
        ssm_cfg = dict(
            layer="Mamba2",
            d_state=spec.d_state,
            d_conv=spec.d_conv,
            expand=spec.expand,
            headdim=spec.head_dim,
            ngroups=spec.n_groups,
            use_mem_eff_path=False,
        )
    else:
        try:
            import selective_scan_cuda  # noqa: F401
        except ImportError:
            say("mamba_ssm: Mamba1 needs its CUDA extension (selective_scan_cuda), not built here: skipped")
            return None
        ssm_cfg = dict(layer="Mamba1", d_state=spec.d_state, d_conv=spec.d_conv, expand=spec.expand)
    config = MambaConfig(
        d_model=recipe.d_model,
        n_layer=recipe.n_layers,
        vocab_size=recipe.vocab_size,
        ssm_cfg=ssm_cfg,
        rms_norm=True,
        residual_in_fp32=recipe.residual_in_fp32,
        fused_add_norm=True,
        pad_vocab_size_multiple=recipe.pad_vocab_size_multiple,
        tie_embeddings=recipe.tie_embeddings,
    )
    return MambaLMHeadModel(config, device="cuda", dtype=dtype)


def mamba_ssm_step(model, optimizer, ids) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def timed(recipe, ids, selection: str, warmup: int, steps: int, peers: str | None = None) -> tuple[float, float]:
    """Median step time (ms) and peak memory (GiB) of training under ``selection`` ("mamba_ssm": the peer)."""
    torch.manual_seed(0)
    if selection == "mamba_ssm":
        model, train_step = mamba_ssm_model(recipe, peers), mamba_ssm_step
        if model is None:
            return float("nan"), float("nan")
    else:
        model, train_step = ssmblocks.build(recipe, device="cuda"), step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times = []
    with backends.use("auto" if selection == "mamba_ssm" else selection):
        for i in range(warmup + steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            train_step(model, optimizer, ids)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="mamba2-130m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--selections", nargs="+", default=["auto", "torch"])
    parser.add_argument("--peers", default=None, help="folder holding mamba_ssm's source: adds its model's step")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    recipe = ssmblocks.Recipe.from_yaml(Path(__file__).resolve().parents[1] / "recipes" / f"{args.recipe}.yaml")
    say(f"{args.recipe} train step, batch {args.batch} x {args.seqlen}, bf16 autocast, {torch.cuda.get_device_name()}")
    agreement(recipe, torch.randint(0, recipe.vocab_size, (2, 300), device="cuda"))
    ids = torch.randint(0, recipe.vocab_size, (args.batch, args.seqlen), device="cuda")
    tokens = args.batch * args.seqlen
    say(f"{'selection':<10}{'ms/step':>10}{'tok/s':>10}{'peak GiB':>10}")
    results = {}
    for selection in [*args.selections, *(["mamba_ssm"] if args.peers else [])]:
        results[selection] = ms, gib = timed(recipe, ids, selection, args.warmup, args.steps, args.peers)
        say(f"{selection:<10}{ms:>10.1f}{tokens / ms * 1e3:>10.0f}{gib:>10.1f}")
        torch.cuda.empty_cache()
    if "mamba_ssm" in results and "auto" in results:
        (peer_ms, peer_gib), (ms, gib) = results["mamba_ssm"], results["auto"]
        say(f"auto vs mamba_ssm: {peer_ms / ms:.2f}x its tokens/s at {gib / peer_gib:.2f}x its peak memory")
    write_log(args.out / "gpu_train_step.log")


if __name__ == "__main__":
    main()
