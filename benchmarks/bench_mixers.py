"""CPU benchmark of the two SSM mixers against transformers' torch path and the layer's own projections.

Run:  python benchmarks/bench_mixers.py [--seqlen 1024 --d-model 768 --batch 1 --repeats 15]

For SSD (mamba2-130m shape) and SelectiveSSM (mamba-130m shape), fp32, in one process: our forward,
transformers' Mamba2Mixer / MambaMixer with the same weights (its torch path, no cache), and the floor:
the layer's nn.Linear projections alone on inputs of the right shapes. Repeats are interleaved (ours,
theirs, projections, ours, ...) after two warm-up calls each; each figure is the median, so a slow moment of
the machine hits all three. Target: ours <= 1.4x the projections. Each mixer gets a second row, "torch
backend": the same layer under ``ssmblocks.backends.use("torch")`` (no C++ kernel), timed in the same
interleaved loop.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from ssmblocks import SSD, SelectiveSSM, backends


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def hf_mixer(ours, kind: str, args):
    """transformers' mixer of the same shape, with our weights copied in."""
    import transformers as tf

    if kind == "ssd":
        config = tf.Mamba2Config(
            hidden_size=args.d_model,
            num_heads=ours.n_heads,
            head_dim=ours.head_dim,
            state_size=ours.d_state,
            n_groups=ours.n_groups,
            expand=2,
            conv_kernel=ours.d_conv,
            chunk_size=ours.chunk_size or 256,
            num_hidden_layers=1,
        )
        theirs = tf.models.mamba2.modeling_mamba2.Mamba2Mixer(config, layer_idx=0)
    else:
        config = tf.MambaConfig(
            hidden_size=args.d_model, state_size=ours.d_state, expand=2, conv_kernel=ours.d_conv, num_hidden_layers=1
        )
        theirs = tf.models.mamba.modeling_mamba.MambaMixer(config, layer_idx=0)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return theirs.eval()


def projections(layer, kind: str, x: torch.Tensor):
    """The layer's nn.Linear projections alone: the floor no CPU implementation beats by much."""
    b, l, _ = x.shape
    inner = torch.randn(b, l, layer.d_inner)
    if kind == "ssd":
        return lambda: (layer.in_proj(x), layer.out_proj(inner))
    low = torch.randn(b, l, layer.dt_rank)
    return lambda: (layer.in_proj(x), layer.x_proj(inner), layer.dt_proj(low), layer.out_proj(inner))


def on_torch(fn):
    """fn with only the torch implementations selected."""

    def run():
        with backends.use("torch"):
            return fn()

    return run


def median_ms(fns: dict, repeats: int) -> dict:
    for fn in fns.values():  # warm up
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}")
    print(f"fp32, batch {args.batch}, seqlen {args.seqlen}, d_model {args.d_model}, median of {args.repeats}")
    print(f"backends on this machine: {', '.join(backends.available())}\n")
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seqlen, args.d_model)
    mixers = {
        "SSD (mamba2-130m)": ("ssd", SSD(args.d_model, d_state=128, head_dim=64, n_groups=1).eval()),
        "SelectiveSSM (mamba-130m)": ("selective", SelectiveSSM(args.d_model, d_state=16).eval()),
    }
    header = ["ours ms", "transformers ms", "projections ms", "ours/projections", "transformers/ours"]
    print(f"{'mixer':<28}" + "".join(f"{h:>{len(h) + 3}}" for h in header))
    for name, (kind, ours) in mixers.items():
        theirs = hf_mixer(ours, kind, args)
        expected = theirs(x)
        err = ((ours(x) - expected).abs().max() / expected.abs().max()).item()
        fns = {"ours": lambda m=ours: m(x), "theirs": lambda m=theirs: m(x), "proj": projections(ours, kind, x)}
        fns["torch backend"] = on_torch(fns["ours"])
        rows = {name: "ours", "  same, torch backend": "torch backend"}
        ms = median_ms(fns, args.repeats)
        for label, key in rows.items():
            row = [ms[key], ms["theirs"], ms["proj"], ms[key] / ms["proj"], ms["theirs"] / ms[key]]
            cells = "".join(f"{v:>{len(h) + 3}.{1 if 'ms' in h else 2}f}" for h, v in zip(header, row, strict=True))
            print(f"{label:<28}{cells}" + (f"   (outputs agree to {err:.1e})" if key == "ours" else ""))


if __name__ == "__main__":
    main()
