"""Train small models from recipes on synthetic recall tasks and compare them on the same budget.

Run:  python examples/train_synthetic.py            (CPU, about 3 minutes)
      python examples/train_synthetic.py --task copying --steps 400 --models mamba hybrid --device cuda

Tasks (generated, nothing downloaded), both used in SSM papers to tell architectures apart:
- mqar: multi-query associative recall. A sequence of key-value pairs, then queries of some keys; the model
  must answer each query with the value paired to it earlier.
- copying: selective copying. A few data tokens scattered among noise tokens; after a separator the model
  must reproduce the data tokens in order.
Only the answer positions are scored (labels elsewhere are -100). Accuracy is the share of answers right
on fresh held-out sequences. Ends with a table, and a PNG of the loss curves when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

import ssmblocks

VOCAB = 64


def mqar(batch: int, pairs: int = 8, queries: int = 4, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, labels (b, 2 * pairs + 2 * queries). Keys from [1, 32), values from [32, 64)."""
    keys = torch.stack([torch.randperm(31, generator=generator)[:pairs] + 1 for _ in range(batch)])
    values = torch.randint(32, VOCAB, (batch, pairs), generator=generator)
    asked = torch.stack([torch.randperm(pairs, generator=generator)[:queries] for _ in range(batch)])
    context = torch.stack([keys, values], dim=2).flatten(1)  # k1 v1 k2 v2 ...
    query_keys = keys.gather(1, asked)
    answers = values.gather(1, asked)
    questions = torch.stack([query_keys, answers], dim=2).flatten(1)  # q1 a1 q2 a2 ...
    ids = torch.cat([context, questions], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, 2 * pairs + 1 :: 2] = answers  # position t is scored on ids[t]: the answer after each query
    return ids, labels


def copying(batch: int, length: int = 32, data: int = 6, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, labels (b, length + 1 + data). Noise token 0, separator 1, data tokens from [2, 64)."""
    ids = torch.zeros(batch, length + 1 + data, dtype=torch.long)
    tokens = torch.randint(2, VOCAB, (batch, data), generator=generator)
    for row in range(batch):
        where = torch.randperm(length, generator=generator)[:data].sort().values
        ids[row, where] = tokens[row]
    ids[:, length] = 1
    ids[:, length + 1 :] = tokens
    labels = torch.full_like(ids, -100)
    labels[:, length + 1 :] = tokens
    return ids, labels


TASKS = {"mqar": mqar, "copying": copying}


def recipe(kind: str) -> ssmblocks.Recipe:
    """Small models of about the same size: pure Mamba, pure Mamba2, and a Mamba2 + attention hybrid."""
    mixers = {
        "mamba": {"s": {"kind": "selective_ssm", "d_state": 16}},
        "mamba2": {"m": {"kind": "ssd", "d_state": 32, "head_dim": 16, "chunk_size": 16}},
        "hybrid": {
            "m": {"kind": "ssd", "d_state": 32, "head_dim": 16, "chunk_size": 16},
            "a": {"kind": "attention", "n_heads": 4},
        },
    }[kind]
    pattern = {"mamba": "s s s s", "mamba2": "m m m m", "hybrid": "m a m a"}[kind]
    return ssmblocks.Recipe(name=kind, vocab_size=VOCAB, d_model=64, n_layers=4, mixers=mixers, pattern=pattern)


def accuracy(model, task, generator, batches: int = 4, batch: int = 64) -> float:
    right = total = 0
    with torch.no_grad():
        for _ in range(batches):
            ids, labels = task(batch, generator=generator)
            ids, labels = ids.to(model.embedding.weight.device), labels.to(model.embedding.weight.device)
            predicted = model(ids).logits[:, :-1].argmax(-1)
            scored = labels[:, 1:] != -100
            right += (predicted == labels[:, 1:])[scored].sum().item()
            total += scored.sum().item()
    return right / total


def train(kind: str, task, steps: int, batch: int, lr: float, device: str, seed: int) -> dict:
    torch.manual_seed(seed)
    model = ssmblocks.build(recipe(kind), device=device).train()
    opt = torch.optim.AdamW(ssmblocks.training.param_groups(model, weight_decay=0.1), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    data = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"{kind:>7}", leave=False)
    for step in bar:
        ids, labels = task(batch, generator=data)
        loss = model(ids.to(device), labels=labels.to(device)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            acc = accuracy(model.eval(), task, torch.Generator().manual_seed(10**6 + step), batches=1)
            model.train()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
    seconds = time.perf_counter() - start
    held_out = accuracy(model.eval(), task, torch.Generator().manual_seed(12345))
    return {
        "model": kind,
        "params": model.num_parameters(),
        "loss": losses[-1],
        "accuracy": held_out,
        "seconds": seconds,
        "losses": losses,
    }


def plot(results: list[dict], task: str, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(r["losses"], label=f"{r['model']} (acc {r['accuracy']:.2f})")
    ax.set(xlabel="step", ylabel="loss", title=f"{task}: same budget, three architectures", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="mqar")
    parser.add_argument(
        "--models", nargs="+", choices=["mamba", "mamba2", "hybrid"], default=["mamba", "mamba2", "hybrid"]
    )
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="train_synthetic.png", help="where to save the loss plot")
    args = parser.parse_args(argv)

    task = TASKS[args.task]
    results = [train(k, task, args.steps, args.batch, args.lr, args.device, args.seed) for k in args.models]
    chance = 1 / 32 if args.task == "mqar" else 1 / (VOCAB - 2)
    print(f"\n{args.task}, {args.steps} steps of batch {args.batch}, chance accuracy {chance:.3f}")
    print(f"{'model':<8}{'params':>10}{'final loss':>12}{'accuracy':>10}{'seconds':>9}")
    for r in results:
        print(f"{r['model']:<8}{r['params']:>10,}{r['loss']:>12.3f}{r['accuracy']:>10.3f}{r['seconds']:>9.1f}")
    saved = plot(results, args.task, args.plot)
    print(f"loss curves: {saved}" if saved else "(install matplotlib for a plot of the loss curves)")
    return results


if __name__ == "__main__":
    main()
