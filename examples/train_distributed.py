"""Train a recipe's model on several processes with PyTorch's own engine: FSDP2, tensor parallelism or both.

    torchrun --nproc_per_node 2 examples/train_distributed.py --parallel fsdp        # CPU: gloo
    torchrun --nproc_per_node 2 examples/train_distributed.py --parallel tp --device cuda --recipe hybrid-bamba-1b \
        --batch 8 --seqlen 2048 --steps 50 --autocast --metrics tp.json --baseline one_gpu.json

--parallel fsdp: data parallel, each rank trains on its share of the global batch with sharded parameters.
--parallel tp: every rank runs the whole batch; each layer's heads are split across the ranks.
--parallel 2d: tensor parallel inside groups of --tp-size ranks, FSDP2 across the groups (a 2-D mesh).
--vocab-parallel (tp, 2d): the embedding and LM head split by vocabulary rows too, with a vocabulary-parallel
cross-entropy. --param-dtype bf16 (fsdp, 2d): FSDP2 mixed precision, A_log, D and dt_bias kept float32.
--loss-chunk-size: the LM head and loss a chunk of tokens at a time.
--parallel none: one process (the baseline a parallel run is compared with; run it with nproc_per_node 1).
The data is generated (Zipf-distributed tokens, the second half of each sequence repeating the first), the
same global batch at each step for every layout, so the loss curves of all three agree up to rounding.
Before training, a few tokens are decoded greedily (float32, eager). Prints loss per step, tokens/s per
process and peak memory per process; --metrics writes them as JSON, --baseline compares the loss curve and
the decoded tokens with such a file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ssmblocks
from ssmblocks.distributed import fully_shard_blocks, tensor_parallel
from ssmblocks.training import clip_grad_norm_, param_groups

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

TINY = {  # a small hybrid for trying the layouts on a CPU
    "name": "tiny-hybrid",
    "vocab_size": 256,
    "d_model": 64,
    "n_layers": 4,
    "mixers": {
        "m": {"kind": "ssd", "d_state": 16, "head_dim": 16, "n_groups": 1, "chunk_size": 16},
        "a": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "rotary_fraction": 0.5},
    },
    "mlp": {"hidden_dim": 128},
    "pattern": "m m a m",
}


def repeated_halves(step: int, batch: int, seqlen: int, vocab: int, seed: int) -> torch.Tensor:
    """(batch, seqlen) token ids whose second half repeats the first, the first drawn from a Zipf law over
    the vocabulary (so the loss falls early, from the token frequencies, then from the copying). The same for
    every rank at a given step."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    half = torch.multinomial(zipf.expand(batch, -1), (seqlen + 1) // 2, replacement=True, generator=generator)
    return torch.cat([half, half], dim=1)[:, :seqlen]


def load_recipe(name: str | None) -> ssmblocks.Recipe:
    if name is None:
        return ssmblocks.Recipe.model_validate(TINY)
    path = Path(name) if Path(name).exists() else RECIPES / f"{name}.yaml"
    return ssmblocks.Recipe.from_yaml(path)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # the process's peak RSS


def write_profile(profiler, path: Path, device: torch.device) -> None:
    """The profiled steps' ops, by their own device time and by their own host time (rank 0's view)."""
    events = profiler.key_averages()
    by_device = events.table(sort_by=f"self_{device.type}_time_total", row_limit=40)
    by_host = events.table(sort_by="self_cpu_time_total", row_limit=25)
    path.write_text(f"by device time\n{by_device}\nby host time\n{by_host}\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", choices=["fsdp", "tp", "2d", "none"], default="fsdp")
    parser.add_argument("--tp-size", type=int, default=2, help="--parallel 2d: ranks per tensor-parallel group")
    parser.add_argument("--vocab-parallel", action="store_true", help="tp, 2d: split embedding and LM head too")
    parser.add_argument("--param-dtype", choices=["bf16"], help="fsdp, 2d: FSDP2 mixed precision")
    parser.add_argument("--loss-chunk-size", type=int, help="tokens per chunk of the LM head and loss")
    parser.add_argument("--recipe", help="a recipe name in recipes/ or a YAML path (default: a tiny hybrid)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences per step, all ranks)")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-warmup", type=int, default=10, help="steps of linear learning-rate warmup")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: none)")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast (parameters stay float32)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (after sharding; any layout)")
    parser.add_argument("--timing-warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode", type=int, default=16, help="greedy tokens decoded before training (0: none)")
    parser.add_argument("--metrics", help="write loss curve, tokens/s and peak memory here (JSON, rank 0)")
    parser.add_argument("--baseline", help="metrics JSON of another run: print the largest and median loss difference")
    parser.add_argument("--profile", help="profile 3 steps after the timing warmup; rank 0 writes op tables here")
    args = parser.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.parallel == "none" and world != 1:
        parser.error("--parallel none runs one process: torchrun --nproc_per_node 1")
    if args.parallel == "2d" and world % args.tp_size:
        parser.error(f"--tp-size {args.tp_size} must divide the {world} processes")
    dp_size = {"fsdp": world, "2d": world // args.tp_size}.get(args.parallel, 1)
    if args.batch % dp_size:
        parser.error(f"--batch {args.batch} must be divisible by the {dp_size} data-parallel ranks")
    if args.vocab_parallel and args.parallel not in ("tp", "2d"):
        parser.error("--vocab-parallel needs --parallel tp or 2d")
    if args.param_dtype and args.parallel not in ("fsdp", "2d"):
        parser.error("--param-dtype needs --parallel fsdp or 2d (FSDP2 mixed precision)")
    if args.param_dtype and args.decode:  # init_state takes the sharded float32 weights' dtype, the layers run bf16
        parser.error("--param-dtype: decoding the mixed-precision model is not supported; pass --decode 0")
    if args.profile and args.steps < args.timing_warmup + 4:
        parser.error(f"--profile needs --steps >= {args.timing_warmup + 4} (timing warmup, 1 warmup, 3 profiled)")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 or args.parallel != "none":
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0

    recipe = load_recipe(args.recipe)
    torch.manual_seed(args.seed)  # every rank builds the same model
    model = ssmblocks.build(recipe, device=device)
    model.gradient_checkpointing = args.gradient_checkpointing
    model.loss_chunk_size = args.loss_chunk_size
    n_params = model.num_parameters()
    dp_rank, dp_group = 0, None
    if args.parallel != "none":
        from torch.distributed.device_mesh import init_device_mesh

        tp_size = {"fsdp": 1, "tp": world}.get(args.parallel, args.tp_size)
        mesh = init_device_mesh(device.type, (world // tp_size, tp_size), mesh_dim_names=("dp", "tp"))
        if args.parallel != "fsdp":
            tensor_parallel(model, mesh["tp"], vocab_parallel=args.vocab_parallel)
        if args.parallel != "tp":
            param_dtype = torch.bfloat16 if args.param_dtype == "bf16" else None
            fully_shard_blocks(model, mesh["dp"], param_dtype=param_dtype)
            dp_rank, dp_group = mesh["dp"].get_local_rank(), mesh["dp"].get_group()
    if args.compile:  # per block: the blocks of one kind share their compiled code
        for block in model.layers:
            block.compile()
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (args.lr_warmup + 1)))
    if rank == 0:
        print(f"{recipe.name}: {n_params / 1e6:.1f}M parameters, {args.parallel} on {world} x {device.type}")

    decoded = None
    if args.decode:  # before training, so every layout decodes with the same weights (float32, eager)
        prompt = repeated_halves(-1, 2, 16, recipe.vocab_size, args.seed).to(device)
        decoded = model.eval().generate(prompt, max_new_tokens=args.decode, cuda_graph=False)[:, 16:].tolist()
        model.train()

    profiling = contextlib.nullcontext()
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
        )
        profiling = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=args.timing_warmup, warmup=1, active=3, repeat=1),
            on_trace_ready=lambda profiler: rank == 0 and write_profile(profiler, Path(args.profile), device),
        )
    losses, step_times = [], []
    with profiling as profiler:
        for step in range(args.steps):
            ids = repeated_halves(step, args.batch, args.seqlen, recipe.vocab_size, args.seed).to(device)
            if dp_group is not None:
                ids = ids.chunk(dp_size)[dp_rank]
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
                loss = model(ids, labels=ids).loss
            loss.backward()
            if args.clip:
                clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
            if dp_group is not None:  # equal shares: the mean of the ranks' losses is the global batch's
                dist.all_reduce(loss, group=dp_group)
                loss /= dp_size
            losses.append(loss.item())  # a host read: the step is finished
            step_times.append(time.perf_counter() - start)
            if rank == 0:
                print(f"step {step:4d}  loss {losses[-1]:.5f}  {step_times[-1] * 1e3:8.1f} ms")
            if profiler is not None:
                profiler.step()

    timed = step_times[args.timing_warmup :] or step_times
    tokens_per_s = args.batch * args.seqlen * len(timed) / sum(timed)
    metrics = {
        "recipe": recipe.name,
        "parameters": n_params,
        "parallel": args.parallel,
        "vocab_parallel": args.vocab_parallel,
        "param_dtype": args.param_dtype,
        "loss_chunk_size": args.loss_chunk_size,
        "processes": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": args.batch,
        "seqlen": args.seqlen,
        "autocast_bf16": args.autocast,
        "losses": losses,
        "decoded": decoded,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_process": tokens_per_s / world,
        "peak_memory_mib_per_process": peak_memory_mib(device),
    }
    memory = torch.tensor([metrics["peak_memory_mib_per_process"]], device=device)
    if dist.is_initialized():
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        metrics["peak_memory_mib_per_process"] = memory.item()  # the largest over the ranks
    if rank == 0:
        print(
            f"tokens/s {tokens_per_s:.0f} ({metrics['tokens_per_s_per_process']:.0f} per process), "
            f"peak memory per process {metrics['peak_memory_mib_per_process']:.0f} MiB"
        )
        if args.baseline:
            base = json.loads(Path(args.baseline).read_text())
            diffs = [abs(a - b) for a, b in zip(losses, base["losses"], strict=False)]
            metrics["max_loss_difference_to_baseline"] = max(diffs)
            metrics["median_loss_difference_to_baseline"] = statistics.median(diffs)
            print(
                f"loss difference to {args.baseline} over {len(diffs)} steps: largest {max(diffs):.3g}, "
                f"median {statistics.median(diffs):.3g}"
            )
            if decoded is not None and base["decoded"] is not None:
                metrics["decoded_equal_to_baseline"] = decoded == base["decoded"]
                print(f"decoded tokens equal to the baseline's: {decoded == base['decoded']}")
        if args.metrics:
            Path(args.metrics).write_text(json.dumps(metrics, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
