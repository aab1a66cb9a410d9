"""The Triton selective scan (Mamba1) on CUDA: check forward, every gradient and the decode step on real shapes,
then time it against the torch path and mamba_ssm's CUDA kernel.

    python benchmarks/gpu_scan.py [--out DIR] [--peers DIR] [--sweep]

Checks (fresh random inputs, outputs allocated over NaN-poisoned memory, lengths not divisible by the chunk)
compare ``selective_scan_triton`` with the float32 torch implementation ``selective_scan_torch`` (after
``prepare_dt_ref``) by max-relative error. The benchmark times bf16 forward and forward+backward (the Mamba
call: raw dt with dt_bias and softplus, D, z) with ``triton.testing.do_bench`` medians against the torch path and
mamba_ssm's ``selective_scan_fn`` (its CUDA extension ``selective_scan_cuda``, importable or under ``--peers``;
never a dependency), with the peak memory each call adds. ``--sweep`` first times the kernels' chunk and tile
settings on the first shape and the split into sequence segments (each direction) on all three. The log goes to
DIR/gpu_scan.log.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton
from gpu_common import DEVICE, peak_extra, poison, rel_err, say, write_log
from ssmblocks.kernels import selective_scan as kernels
from ssmblocks.kernels.selective_scan import (
    DEFAULT_CHUNK_SIZE,
    prepare_dt_ref,
    selective_scan_step_triton,
    selective_scan_triton,
)

from ssmblocks.ops.selective_scan import selective_scan_step_torch, selective_scan_torch


def make_inputs(b, l, e, n, dtype, z=True, bias=True, init=True, dt_scale=None):
    """Leaves in selective_scan_triton's names: x, B, C, z in ``dtype``; dt raw (softplus'd by the op) unless
    ``dt_scale`` gives dt directly as uniform [0, dt_scale); A, D, dt_bias and the state float32."""
    torch.set_default_device(DEVICE)
    kw = dict(
        x=torch.randn(b, l, e),
        dt=torch.randn(b, l, e) * 0.5 - 1.0 if dt_scale is None else torch.rand(b, l, e) * dt_scale,
        A=-torch.rand(e, n) * 8 - 0.5,
        B=torch.randn(b, l, n),
        C=torch.randn(b, l, n),
        D=torch.randn(e),
        z=torch.randn(b, l, e) if z else None,
        dt_bias=torch.randn(e) * 0.5 if bias else None,
        initial_state=torch.randn(b, e, n) if init else None,
    )
    torch.set_default_device(None)
    big = ("x", "dt", "B", "C", "z")
    return {
        k: None if v is None else v.to(DEVICE, dtype if k in big else torch.float32).requires_grad_(True)
        for k, v in kw.items()
    }


def check(name, shape, dtype, tol, softplus=True, chunk=DEFAULT_CHUNK_SIZE, **opts):
    """One correctness case against float32 selective_scan_torch; returns whether every tensor is within tol."""
    kw = make_inputs(*shape, dtype, **opts)
    poison()
    y, final = selective_scan_triton(**kw, dt_softplus=softplus, chunk_size=chunk)
    leaves = {k: None if v is None else v.detach().float().requires_grad_(True) for k, v in kw.items()}
    dt = prepare_dt_ref(leaves["dt"], leaves["dt_bias"], softplus)
    args = [leaves[k] for k in ("x", "A", "B", "C", "D", "z", "initial_state")]
    y_ref, final_ref = selective_scan_torch(args[0], dt, *args[1:])
    dy, dfinal = torch.randn_like(y_ref), torch.randn_like(final_ref)
    poison()
    torch.autograd.backward((y, final), (dy.to(y.dtype), dfinal))
    torch.autograd.backward((y_ref, final_ref), (dy, dfinal))
    errs = {"y": rel_err(y, y_ref), "final": rel_err(final, final_ref)}
    errs.update({f"d{k}": rel_err(v.grad, leaves[k].grad) for k, v in kw.items() if v is not None})
    worst = max(errs.values())
    ok = worst <= tol and all(torch.isfinite(t).all() for t in (y, final))
    say(
        f"{'PASS' if ok else 'FAIL'} {name} {str(dtype)[6:]} tol {tol:.0e} worst {worst:.2e} |",
        " ".join(f"{k} {v:.1e}" for k, v in errs.items()),
    )
    return ok


def check_packed(lengths, e, n, dtype, tol):
    """Packed sequences (cu_seqlens) against float32 selective_scan_torch on each sequence alone, from its own
    initial state: y, the final states and every gradient."""
    kw = make_inputs(1, sum(lengths), e, n, dtype, init=False)
    kw["initial_state"] = torch.randn(len(lengths), e, n, device=DEVICE, requires_grad=True)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)
    poison()
    y, final = selective_scan_triton(**kw, dt_softplus=True, cu_seqlens=cu_seqlens)
    leaves = {k: v.detach().float().requires_grad_(True) for k, v in kw.items()}
    dt = prepare_dt_ref(leaves["dt"], leaves["dt_bias"], True)
    ys, finals = [], []
    for i, (s0, s1) in enumerate(itertools.pairwise(cu_seqlens.tolist())):
        x, dt_i, B, C, z = (t[:, s0:s1] for t in (leaves["x"], dt, leaves["B"], leaves["C"], leaves["z"]))
        h0 = leaves["initial_state"][i : i + 1]
        y_i, final_i = selective_scan_torch(x, dt_i, leaves["A"], B, C, leaves["D"], z, h0)
        ys.append(y_i)
        finals.append(final_i)
    y_ref, final_ref = torch.cat(ys, 1), torch.cat(finals)
    dy, dfinal = torch.randn_like(y_ref), torch.randn_like(final_ref)
    poison()
    torch.autograd.backward((y, final), (dy.to(y.dtype), dfinal))
    torch.autograd.backward((y_ref, final_ref), (dy, dfinal))
    errs = {"y": rel_err(y, y_ref), "final": rel_err(final, final_ref)}
    errs.update({f"d{k}": rel_err(v.grad, leaves[k].grad) for k, v in kw.items()})
    worst = max(errs.values())
    ok = worst <= tol and all(torch.isfinite(t).all() for t in (y, final))
    name = f"packed {'+'.join(map(str, lengths))} E{e} N{n}, initial states"
    say(f"{'PASS' if ok else 'FAIL'} {name} {str(dtype)[6:]} tol {tol:.0e} worst {worst:.2e} |",
        " ".join(f"{k} {v:.1e}" for k, v in errs.items()))  # fmt: skip
    return ok


def check_step(b, e, n, dtype, tol):
    kw = {k: v.detach() for k, v in make_inputs(b, 8, e, n, dtype, dt_scale=0.2).items() if v is not None}
    state, expected = kw["initial_state"].clone(), kw["initial_state"].clone()
    worst = 0.0
    for t in range(8):
        args = (kw["x"][:, t], kw["dt"][:, t], kw["A"], kw["B"][:, t], kw["C"][:, t])
        y = selective_scan_step_triton(*args, state, kw["D"], kw["z"][:, t])
        y_ref = selective_scan_step_torch(*args, expected, kw["D"], kw["z"][:, t])
        worst = max(worst, rel_err(y, y_ref), rel_err(state, expected))
    ok = worst <= tol
    say(
        f"{'PASS' if ok else 'FAIL'} decode step B{b} E{e} N{n} {str(dtype)[6:]} 8 tokens",
        f"tol {tol:.0e} worst {worst:.2e}",
    )
    return ok


def time_impl(fn, dy, leaves):
    """(fwd ms, fwd+bwd ms, fwd peak GiB, fwd+bwd peak GiB) of ``fn`` (returns y)."""

    def fwd_bwd():
        torch.autograd.backward(fn(), dy)

    with torch.no_grad():
        fn()
        t_fwd = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        m_fwd = peak_extra(fn)
    fwd_bwd()
    t_bwd = triton.testing.do_bench(fwd_bwd, warmup=10, rep=50, grad_to_none=leaves, return_mode="median")
    m_bwd = peak_extra(fwd_bwd)
    return t_fwd, t_bwd, m_fwd / 2**30, m_bwd / 2**30


def impls(kw, mamba_fn, with_torch):
    """name -> a call returning y, each on its native layout (made outside the timing)."""
    x, dt, A, B, C, D, z, bias = (kw[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias"))
    found = {"ours": lambda: selective_scan_triton(x, dt, A, B, C, D, z, dt_bias=bias, dt_softplus=True)[0]}
    if with_torch:
        found["torch"] = lambda: selective_scan_torch(x, prepare_dt_ref(dt, bias, True), A, B, C, D, z)[0]
    if mamba_fn is not None:
        # mamba_ssm's layout: u, delta, z (b, e, l); B, C (b, n, l); leaves of their own, gradients in place
        t = {k: kw[k].detach().transpose(1, 2).contiguous().requires_grad_(True) for k in ("x", "dt", "B", "C", "z")}
        kw.update({f"mamba_{k}": v for k, v in t.items()})
        found["mamba_ssm"] = lambda: mamba_fn(
            t["x"], t["dt"], A, t["B"], t["C"], D, t["z"], delta_bias=bias, delta_softplus=True
        )
    return found


def bench_shape(label, b, l, e, n, mamba_fn, with_torch):
    kw = make_inputs(b, l, e, n, torch.bfloat16, init=False)
    rows = {}
    for name, fn in impls(kw, mamba_fn, with_torch).items():
        dy = torch.randn_like(fn())
        rows[name] = time_impl(fn, dy, [v for v in kw.values() if v is not None])
        tf, tb, mf, mb = rows[name]
        say(f"  {label:22s} {name:10s} fwd {tf:8.3f} ms  fwd+bwd {tb:8.3f} ms  peak extra {mf:5.2f} / {mb:5.2f} GiB")
        torch.cuda.empty_cache()
    return rows


def sweep(b, l, e, n):
    """Time the kernels' settings (module constants of ssmblocks.kernels.selective_scan) on one shape, one side
    at a time around the defaults: forward steps per iteration and channels per program; backward chunk (the
    chunk_size argument) and channels per program."""
    kw = make_inputs(b, l, e, n, torch.bfloat16, init=False)
    leaves = [v for v in kw.values() if v is not None]
    args = [kw[k] for k in ("x", "dt", "A", "B", "C", "D", "z")]
    names = ("_FWD_CHUNK", "_FWD_CHANNELS", "_BWD_CHANNELS")
    defaults = {k: getattr(kernels, k) for k in names}
    settings = [(8, fc, fe, defaults["_BWD_CHANNELS"]) for fc, fe in ((8, 8), (16, 4), (16, 8), (16, 16), (32, 8))]
    settings += [(c, defaults["_FWD_CHUNK"], defaults["_FWD_CHANNELS"], be) for c in (4, 8, 16) for be in (2, 4, 8)]
    results = []
    for chunk, *setting in settings:
        for k, v in zip(names, setting, strict=True):
            setattr(kernels, k, v)

        def fn(chunk=chunk):
            return kernels.selective_scan_triton(*args, dt_bias=kw["dt_bias"], dt_softplus=True, chunk_size=chunk)[0]

        try:
            tf, tb, _, _ = time_impl(fn, torch.randn_like(kw["x"]), leaves)
        except Exception as error:  # a setting the compiler refuses is reported, not fatal
            say(f"  sweep chunk {chunk} {dict(zip(names, setting, strict=True))} failed: {error}")
            continue
        results.append((tb, tf, chunk, *setting))
        say(f"  sweep chunk {chunk:<3d} fwd {setting[0]:3d} steps x {setting[1]:2d} channels  bwd {setting[2]:2d} "
            f"channels  fwd {tf:7.3f} ms  fwd+bwd {tb:7.3f} ms")  # fmt: skip
    for k, v in defaults.items():
        setattr(kernels, k, v)
    best_fwd, best = min(results, key=lambda r: r[1]), min(results)
    say(f"  best fwd {best_fwd[1]:.3f} ms: {best_fwd[3]} steps x {best_fwd[4]} channels")
    say(f"  best fwd+bwd {best[0]:.3f} ms: chunk {best[2]}, fwd {best[3]} x {best[4]}, bwd {best[5]} channels")


def sweep_segments(b, l, e, n):
    """Time one shape with each direction split into 1, 2, 4, 9 and 16 sequence segments (the forward alone;
    forward+backward with the forward as picked), next to the counts the kernels pick."""
    kw = make_inputs(b, l, e, n, torch.bfloat16, init=False)
    leaves = [v for v in kw.values() if v is not None]
    args = [kw[k] for k in ("x", "dt", "A", "B", "C", "D", "z")]

    def fn():
        return kernels.selective_scan_triton(*args, dt_bias=kw["dt_bias"], dt_softplus=True)[0]

    for side, channels in (("_forward", kernels._FWD_CHANNELS), ("_backward", kernels._BWD_CHANNELS)):
        block_e, block_n = kernels._blocks(e, n, channels)
        steps = kernels._forward_steps(DEFAULT_CHUNK_SIZE, block_n) if side == "_forward" else DEFAULT_CHUNK_SIZE
        pick = getattr(kernels, f"{side}_segments")
        programs = b * triton.cdiv(e, block_e)
        picked = pick(programs, triton.cdiv(l, steps), torch.device(DEVICE))
        for segments in (1, 2, 4, 9, 16):
            setattr(kernels, f"{side}_segments", lambda programs, n_chunks, device, s=segments: s)
            tf, tb, _, mb = time_impl(fn, torch.randn_like(kw["x"]), leaves)
            say(
                f"  B{b} L{l} E{e} {side[1:]} {segments:2d} segments{' (picked)' if segments == picked else ''}"
                f"  fwd {tf:7.3f} ms  fwd+bwd {tb:7.3f} ms  peak extra {mb:.2f} GiB"
            )
        setattr(kernels, f"{side}_segments", pick)
        say(f"  B{b} L{l} E{e}: {side[1:]} picks {picked} segments")


def load_mamba(peers):
    if peers:
        sys.path.insert(0, peers)
    try:
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as error:
        say(f"mamba_ssm's selective_scan_cuda does not import ({error}): no mamba_ssm column")
        return None
    return selective_scan_fn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for gpu_scan.log")
    parser.add_argument("--peers", default=None, help="folder holding mamba_ssm's source and built extension")
    parser.add_argument("--sweep", action="store_true", help="time chunk and tile settings first")
    opts = parser.parse_args()
    torch.manual_seed(0)
    say(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")

    say("== correctness against the float32 torch path ==")
    cases = [
        ("B2 L1037 E768 N16, D, z, bias, softplus, init", (2, 1037, 768, 16), {}, "fb"),
        ("B1 L2111 E1536 N16, no z, no bias, init", (1, 2111, 1536, 16), dict(z=False, bias=False), "b"),
        ("B3 L333 E100 N7, chunk 32", (3, 333, 100, 7), dict(chunk=32), "f"),
        ("B1 L500 E256 N16, dt up to 4 (no softplus), A to -8.5", (1, 500, 256, 16),
         dict(softplus=False, bias=False, dt_scale=4.0), "f"),
    ]  # fmt: skip
    ok = True
    for name, shape, extra, dtypes in cases:
        for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
            if str(dtype)[6] in dtypes:
                ok &= check(name, shape, dtype, tol, **extra)
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
        ok &= check_packed([300, 1, 517, 1200], 768, 16, dtype, tol)
    ok &= check_step(32, 5120, 16, torch.float32, 1e-4)
    ok &= check_step(7, 1000, 16, torch.bfloat16, 2e-2)
    say("correctness:", "all PASS" if ok else "some FAIL")

    if opts.sweep:
        say("== sweep, B8 L2048 E1536 N16 bf16 ==")
        sweep(8, 2048, 1536, 16)
        say("== sweep, sequence segments (forward, backward) ==")
        for shape in ((8, 2048, 1536, 16), (2, 8192, 2048, 16), (1, 16384, 5120, 16)):
            sweep_segments(*shape)

    mamba_fn = load_mamba(opts.peers)
    say("== benchmark, bf16, do_bench medians ==")
    shapes = [
        ("B8 L2048 D1536 N16", (8, 2048, 1536, 16), True),
        ("B2 L8192 D2048 N16", (2, 8192, 2048, 16), True),
        ("B1 L16384 D5120 N16", (1, 16384, 5120, 16), False),  # the torch path: too slow and large to time
    ]
    table = [(label, bench_shape(label, *shape, mamba_fn, with_torch)) for label, shape, with_torch in shapes]

    say("\n| shape | impl | fwd ms | fwd+bwd ms | fwd peak GiB | fwd+bwd peak GiB | fwd x | fwd+bwd x |")
    say("|---|---|---|---|---|---|---|---|")
    for label, rows in table:
        peer = rows.get("mamba_ssm")
        for name, (tf, tb, mf, mb) in rows.items():
            ratio = f"{peer[0] / tf:.2f} | {peer[1] / tb:.2f}" if peer else "- | -"
            say(f"| {label} | {name} | {tf:.3f} | {tb:.3f} | {mf:.2f} | {mb:.2f} | {ratio} |")
    say("(x = mamba_ssm time / this time; > 1 is faster than mamba_ssm)")
    write_log(Path(opts.out) / "gpu_scan.log")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
