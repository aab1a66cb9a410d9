"""Train small models from recipes on synthetic recall and read them against chance and a no-recall baseline.

Run:  python examples/train_synthetic.py                      (CPU, a few minutes: see the README)
      python examples/train_synthetic.py --task copying
      python examples/train_synthetic.py --models mamba hybrid --steps 1000 --device cuda

Tasks (generated, nothing downloaded; see synthetic_tasks.py): multi-query associative recall (mqar, default:
12 key-value pairs) and selective copying (copying). Models, two layers of width 64 each: Mamba2 with state
4, 16 and 64 per head, and a hybrid of one Mamba2 layer (state 16) and one attention layer (one head); Mamba1
(state 16 per channel, ``--models mamba``) is slower on CPU and not in the default set. Attention can look
every pair up again; a fixed-size state has to hold them all. Each model trains at its own peak learning
rate (MODELS: 1e-2 for the pure SSMs, as Mamba2 sits on a plateau for long at 3e-3; 3e-3 for the hybrid,
whose attention fails to learn at 1e-2), with the same steps, batch and schedule. Accuracy is the share of
answers right on held-out sequences, shown next to chance and next to the expected score of answering with a
random value read earlier (a heuristic with no recall). Ends with a table and an SVG plot of held-out accuracy
against training steps, with chance and that baseline as dashed lines (written without a plotting library).

On CPU the models train two at a time (``--workers``), each in its own process on one thread: on models this
small two one-thread processes get through 1.35x the steps of one process on two threads. Everything runs on
the torch ops (training would anyway), so a first run does not wait for the C++ kernels to build.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
from synthetic_tasks import TASKS, chance, earlier_value_accuracy
from tqdm.auto import tqdm

import ssmblocks

D_MODEL = 64
SSD = {"kind": "ssd", "head_dim": 16, "chunk_size": 18}  # two chunks of the 36-token MQAR sequence
MODELS = {  # name -> (mixers, pattern, peak learning rate)
    "mamba": ({"s": {"kind": "selective_ssm", "d_state": 16}}, "s s", 1e-2),
    "mamba2-n4": ({"m": {**SSD, "d_state": 4}}, "m m", 1e-2),
    "mamba2-n16": ({"m": {**SSD, "d_state": 16}}, "m m", 1e-2),
    "mamba2-n64": ({"m": {**SSD, "d_state": 64}}, "m m", 1e-2),
    "hybrid": ({"m": {**SSD, "d_state": 16}, "a": {"kind": "attention", "n_heads": 1}}, "m a", 3e-3),
}
DEFAULT_MODELS = ["mamba2-n4", "mamba2-n16", "mamba2-n64", "hybrid"]


def build(name: str, vocab_size: int, device: str) -> ssmblocks.CausalLM:
    mixers, pattern, _ = MODELS[name]
    recipe = ssmblocks.Recipe(
        name=name, vocab_size=vocab_size, d_model=D_MODEL, n_layers=2, mixers=mixers, pattern=pattern
    )
    return ssmblocks.build(recipe, device=device)


def ssm_state_floats(model: ssmblocks.CausalLM) -> int:
    """Floats of recurrent SSM state per sequence, all layers together (attention's KV cache not counted)."""
    states = model.init_state(batch_size=1).layers
    return sum(s.ssm.numel() for s in states if hasattr(s, "ssm"))


def loss_and_right(model, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the scored positions of ids, targets (b, l), and how many are right."""
    logits = model(ids).logits  # (b, l, vocab)
    scored = targets != -100
    loss = F.cross_entropy(logits[scored], targets[scored])
    return loss, (logits[scored].argmax(-1) == targets[scored]).sum().item()


def accuracy(model, ids: torch.Tensor, targets: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    with torch.no_grad():
        right = sum(
            loss_and_right(model, ids[i : i + batch], targets[i : i + batch])[1] for i in range(0, len(ids), batch)
        )
    model.train()
    return right / (targets != -100).sum().item()


def lr_factor(steps: int):
    """Learning-rate multiplier of step s in [0, steps): linear warmup over the first tenth, constant, then
    linear decay to zero over the last fifth (recall often emerges late, after a plateau)."""
    warmup, decay = max(1, steps // 10), max(1, steps // 5)
    return lambda s: min((s + 1) / warmup, 1.0, (steps - s) / decay)


def train(name: str, task, held_out, args, bar_row: int = 0) -> dict:
    """Train one model; its held-out accuracy every ``args.eval_every`` steps and at the end.
    bar_row: the terminal row of its progress bar (one per worker)."""
    with ssmblocks.backends.use("torch"):
        return _train(name, task, held_out, args, bar_row)


def _train(name: str, task, held_out, args, bar_row: int) -> dict:
    torch.manual_seed(args.seed)
    model = build(name, task.vocab_size, args.device).train()
    lr = args.lr or MODELS[name][2]
    opt = torch.optim.AdamW(ssmblocks.training.param_groups(model, weight_decay=0.1), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.steps))
    data = torch.Generator().manual_seed(args.seed)
    curve = [(0, accuracy(model, *held_out))]
    start = time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), desc=f"{name:>10}", leave=False, position=bar_row)
    for step in bar:
        ids, targets = task(args.batch, generator=data)
        loss, _ = loss_and_right(model, ids.to(args.device), targets.to(args.device))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, accuracy(model, *held_out)))
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{curve[-1][1]:.2f}")
    result = {
        "model": name,
        "params": model.num_parameters(),
        "state": ssm_state_floats(model),
        "lr": lr,
        "accuracy": curve[-1][1],
        "seconds": time.perf_counter() - start,
        "curve": curve,
    }
    print(f"{name}: held-out accuracy {result['accuracy']:.3f} after {args.steps} steps ({result['seconds']:.0f} s)")
    return result


def state_label(result: dict) -> str:
    """SSM state floats, with +KV where an attention layer also keeps a KV cache that grows with the sequence."""
    return f"{result['state']:,}" + ("+KV" if "a" in MODELS[result["model"]][1].split() else "")


COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def svg_plot(results: list[dict], references: dict[str, float], title: str) -> str:
    """An SVG of held-out accuracy against steps, one line per model, references as dashed lines."""
    width, height, left, right, top, bottom = 680, 400, 60, 190, 40, 50
    steps = max(s for r in results for s, _ in r["curve"]) or 1

    def x(step):
        return left + (width - left - right) * step / steps

    def y(acc):
        return top + (height - top - bottom) * (1 - acc)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
        f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">training step</text>',
        f'<text x="16" y="{(top + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {(top + height - bottom) / 2})">held-out accuracy</text>',
    ]
    for tick in range(0, 11, 2):
        acc = tick / 10
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(acc)}" y2="{y(acc)}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y(acc) + 4}" text-anchor="end">{acc:.1f}</text>')
    for tick in range(5):
        step = round(steps * tick / 4)
        parts.append(f'<text x="{x(step)}" y="{height - bottom + 16}" text-anchor="middle">{step}</text>')
    parts.append(
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
        'fill="none" stroke="black"/>'
    )
    legend = [(f"{r['model']}, state {state_label(r)}", COLOURS[i % len(COLOURS)], "") for i, r in enumerate(results)]
    legend += [(name, "#555", ' stroke-dasharray="6 4"') for name in references]
    for r, (_, colour, _) in zip(results, legend, strict=False):
        points = " ".join(f"{x(s):.1f},{y(a):.1f}" for s, a in r["curve"])
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
    for name, value in references.items():
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(value)}" y2="{y(value)}" stroke="#555" '
            'stroke-dasharray="6 4"/>'
        )
        parts.append(f'<text x="{width - right - 4}" y="{y(value) - 4}" text-anchor="end" fill="#555">{name}</text>')
    for i, (label, colour, dash) in enumerate(legend):
        ly = top + 10 + 18 * i
        parts.append(
            f'<line x1="{width - right + 10}" x2="{width - right + 30}" y1="{ly}" y2="{ly}" '
            f'stroke="{colour}" stroke-width="2"{dash}/>'
        )
        parts.append(f'<text x="{width - right + 35}" y="{ly + 4}" font-size="10">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="mqar")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=DEFAULT_MODELS)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, help="peak learning rate of every model (default: each its own)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    parser.add_argument("--held-out", type=int, default=512, help="held-out sequences")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="train_synthetic.svg", help="where to write the accuracy plot")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="models trained at once, a process of one thread each (1: in this process)",
    )
    args = parser.parse_args(argv)

    task = TASKS[args.task]()
    ids, targets = task(args.held_out, generator=torch.Generator().manual_seed(10**6 + args.seed))
    references = {
        "random earlier value": earlier_value_accuracy(ids, targets, task.answers),
        "chance": chance(task.answers),
    }
    held_out = (ids.to(args.device), targets.to(args.device))
    if args.workers == 1:
        results = [train(name, task, held_out, args) for name in args.models]
    else:
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked thread pools
        with ProcessPoolExecutor(
            args.workers, mp_context=spawn, initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            # largest model first (the slowest), so that the workers finish at about the same time
            size = {name: build(name, task.vocab_size, "cpu").num_parameters() for name in args.models}
            by_size = sorted(args.models, key=size.get, reverse=True)
            jobs = {
                name: pool.submit(train, name, task, held_out, args, i % args.workers) for i, name in enumerate(by_size)
            }
            results = [jobs[name].result() for name in args.models]

    print(f"\n{task}: {args.steps} steps of batch {args.batch}, accuracy on {args.held_out} held-out sequences")
    print(f"{'model':<22}{'params':>9}{'SSM state':>11}{'lr':>8}{'accuracy':>10}{'seconds':>9}")
    for r in results:
        print(
            f"{r['model']:<22}{r['params']:>9,}{state_label(r):>11}{r['lr']:>8.0e}{r['accuracy']:>10.3f}"
            f"{r['seconds']:>9.1f}"
        )
    for name, value in references.items():
        print(f"{name:<22}{'':>28}{value:>10.3f}")
    with open(args.plot, "w") as f:
        f.write(svg_plot(results, references, f"{task}: held-out accuracy, 2 layers of width {D_MODEL}"))
    print(f"plot: {args.plot}")
    return results


if __name__ == "__main__":
    main()
