"""The Triton SSD scan on CUDA: check forward and every gradient on real shapes, then time it against mamba_ssm.

    python benchmarks/gpu_ssd.py [--out DIR] [--peers DIR]

Checks (fresh random inputs, outputs allocated over NaN-poisoned memory, lengths not divisible by the chunk,
a packed batch) compare ``ssd_chunked_triton`` with the float32 torch implementation ``ssd_scan_torch`` (after
``prepare_dt_ref``) by max-relative error. The benchmark times bf16 forward and forward+backward with
``triton.testing.do_bench`` medians against mamba_ssm's ``mamba_chunk_scan_combined`` and fla's
``chunk_simple_gla`` (their source on ``--peers``; never dependencies), with the peak memory each call adds.
fla runs the same scan as a gated linear attention (q = C, k = B, v = dt x, log gate dt A, one head per head,
the inputs laid out before timing) and is timed forward only. The log goes to DIR/gpu_ssd.log.
"""

import argparse
import sys
from pathlib import Path

import torch
import triton
from gpu_common import DEVICE, peak_extra, poison, rel_err, say, write_log
from ssmblocks.kernels.ssd import DEFAULT_CHUNK_SIZE, prepare_dt_ref, ssd_chunked_triton

from ssmblocks.ops.ssd import ssd_scan_torch


def make_inputs(b, l, h, p, g, n, dtype, d_shape="h", z=True, bias=True, init=True, n_seq=None):
    torch.set_default_device(DEVICE)
    kw = dict(
        x=torch.randn(b, l, h, p),
        dt=torch.randn(b, l, h) * 0.5 - 1.0,
        A=-torch.rand(h) * 4 - 0.5,
        B=torch.randn(b, l, g, n),
        C=torch.randn(b, l, g, n),
        D={"h": torch.randn(h), "hp": torch.randn(h, p), None: None}[d_shape],
        z=torch.randn(b, l, h, p) if z else None,
        dt_bias=torch.randn(h) * 0.5 if bias else None,
        initial_state=torch.randn(n_seq or b, h, p, n) if init else None,
    )
    torch.set_default_device(None)
    big = ("x", "B", "C", "z")
    return {
        k: None if v is None else v.to(DEVICE, dtype if k in big else torch.float32).requires_grad_(True)
        for k, v in kw.items()
    }


def torch_reference(kw, softplus, limit, cu_seqlens):
    """Float32 ssd_scan_torch with autograd, per sequence when packed. Returns (y, final, leaves)."""
    leaves = {k: None if v is None else v.detach().float().requires_grad_(True) for k, v in kw.items()}
    dt = prepare_dt_ref(leaves["dt"], leaves["dt_bias"], softplus, limit)
    x, B, C, z, A, D = leaves["x"], leaves["B"], leaves["C"], leaves["z"], leaves["A"], leaves["D"]
    if cu_seqlens is None:
        y, final = ssd_scan_torch(x, dt, A, B, C, D, z, leaves["initial_state"])
        return y, final, leaves
    ys, finals = [], []
    for i, (s0, s1) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)):
        init = None if leaves["initial_state"] is None else leaves["initial_state"][i : i + 1]
        zs = None if z is None else z[:, s0:s1]
        y, final = ssd_scan_torch(x[:, s0:s1], dt[:, s0:s1], A, B[:, s0:s1], C[:, s0:s1], D, zs, init)
        ys.append(y)
        finals.append(final)
    return torch.cat(ys, 1), torch.cat(finals, 0), leaves


def check(name, shape, dtype, tol, softplus=True, limit=(0.0, float("inf")), lengths=None, chunk=None, **opts):
    """One correctness case; returns whether every tensor is within ``tol``."""
    b, l, h, p, g, n = shape
    cu_seqlens = None
    if lengths is not None:
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    kw = make_inputs(b, l, h, p, g, n, dtype, n_seq=None if lengths is None else len(lengths), **opts)
    poison()
    y, final = ssd_chunked_triton(
        **kw, dt_softplus=softplus, dt_limit=limit, cu_seqlens=cu_seqlens, chunk_size=chunk or DEFAULT_CHUNK_SIZE
    )
    y_ref, final_ref, leaves = torch_reference(kw, softplus, limit, cu_seqlens)
    # the reference gets the very gradient the kernels get (rounded to y's dtype), so only the kernels differ
    dy, dfinal = torch.randn_like(y_ref).to(y.dtype).float(), torch.randn_like(final_ref)
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


def fla_inputs(kw, h):
    """chunk_simple_gla's (q, k, v, g) for the SSD inputs: B, C repeated to every head, v = dt x, g = dt A."""
    dt = prepare_dt_ref(kw["dt"].detach(), kw["dt_bias"].detach(), True)
    g = kw["B"].shape[2]
    q, k = (t.detach().repeat_interleave(h // g, dim=2).contiguous() for t in (kw["C"], kw["B"]))
    v = (kw["x"].detach() * dt[..., None]).to(kw["x"].dtype)
    return q, k, v, (dt * kw["A"].detach()).contiguous()


def bench_shape(label, b, l, h, p, g, n, mamba_combined, fla_gla, chunks):
    kw = make_inputs(b, l, h, p, g, n, torch.bfloat16, z=False, init=False)
    args = (kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"])
    leaves = [t for t in kw.values() if t is not None]
    dy = torch.randn_like(kw["x"])
    impls = {}
    for c in chunks:
        impls[f"ours c{c}"] = lambda c=c: ssd_chunked_triton(
            *args, kw["D"], dt_bias=kw["dt_bias"], dt_softplus=True, chunk_size=c
        )[0]
    if mamba_combined is not None:
        impls["mamba_ssm c256"] = lambda: mamba_combined(*args, 256, D=kw["D"], dt_bias=kw["dt_bias"], dt_softplus=True)
    if fla_gla is not None:
        q, k, v, gate = fla_inputs(kw, h)
        impls["fla c64 (fwd)"] = lambda: fla_gla(q, k, v, g=gate, scale=1.0)[0]
        with torch.no_grad():
            ours = ssd_chunked_triton(*args, dt_bias=kw["dt_bias"], dt_softplus=True)[0]
            err = rel_err(impls["fla c64 (fwd)"](), ours)
            say(f"  {label:28s} fla's output against ours (no D): max-relative {err:.1e}")
    rows = {}
    for name, fn in impls.items():

        def fwd_bwd(fn=fn):
            torch.autograd.backward(fn(), dy)

        with torch.no_grad():
            fn()
            t_fwd = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
            m_fwd = peak_extra(fn)
        if name.endswith("(fwd)"):
            rows[name] = (t_fwd, float("nan"), m_fwd / 2**30, float("nan"))
            say(f"  {label:28s} {name:16s} fwd {t_fwd:7.3f} ms  peak extra {m_fwd / 2**30:5.2f} GiB")
            continue
        fwd_bwd()
        t_bwd = triton.testing.do_bench(fwd_bwd, warmup=10, rep=50, grad_to_none=leaves, return_mode="median")
        m_bwd = peak_extra(fwd_bwd)
        rows[name] = (t_fwd, t_bwd, m_fwd / 2**30, m_bwd / 2**30)
        say(
            f"  {label:28s} {name:16s} fwd {t_fwd:7.3f} ms  fwd+bwd {t_bwd:7.3f} ms  "
            f"peak extra {m_fwd / 2**30:5.2f} / {m_bwd / 2**30:5.2f} GiB"
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for gpu_ssd.log")
    parser.add_argument("--peers", default=None, help="folder holding mamba_ssm's source (mamba_ssm/ops/triton)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[DEFAULT_CHUNK_SIZE], help="our chunk sizes to time")
    opts = parser.parse_args()
    torch.manual_seed(0)
    say(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")

    say("== correctness against the float32 torch path ==")
    inf = float("inf")
    cases = [
        ("B2 L1037 H16 P64 N128 G1, D(h), z, init, limits", (2, 1037, 16, 64, 1, 128), dict(limit=(1e-3, 0.3))),
        ("B1 L777 H8 P32 N64 G4, D(h,p), z, init", (1, 777, 8, 32, 4, 64), dict(d_shape="hp")),
        ("B1 L600 H4 P128 N256 G1, no z, no bias", (1, 600, 4, 128, 1, 256), dict(z=False, bias=False)),
        (
            "packed 300+1+517+1200 H16 P64 N128 G2",
            (1, 2018, 16, 64, 2, 128),
            dict(lengths=[300, 1, 517, 1200], init=False, limit=(0.0, inf)),
        ),
        ("B2 L333 H8 P64 N64 G1 chunk 128", (2, 333, 8, 64, 1, 64), dict(chunk=128)),
    ]
    ok = True
    for (name, shape, extra), dtypes in zip(cases, ("b", "b", "fb", "fb", "b"), strict=True):
        for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
            if str(dtype)[6] in dtypes:
                ok &= check(name, shape, dtype, tol, **extra)
    say("correctness:", "all PASS" if ok else "some FAIL")

    mamba_combined = fla_gla = None
    if opts.peers:
        sys.path.insert(0, opts.peers)
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as mamba_combined

        try:
            from fla.ops.simple_gla import chunk_simple_gla as fla_gla
        except ImportError as error:
            say(f"fla not timed: {error}")

    say("== benchmark, bf16, do_bench medians ==")
    shapes = [
        ("B4 L4096 H64 P64 N128 G1", (4, 4096, 64, 64, 1, 128)),
        ("B1 L16384 H64 P64 N128 G1", (1, 16384, 64, 64, 1, 128)),
        ("B8 L2048 H32 P64 N64 G8", (8, 2048, 32, 64, 8, 64)),
    ]
    table = []
    for label, shape in shapes:
        rows = bench_shape(label, *shape, mamba_combined, fla_gla, chunks=opts.chunks)
        table.append((label, rows))
        torch.cuda.empty_cache()

    say("\n| shape | impl | fwd ms | fwd+bwd ms | fwd peak GiB | fwd+bwd peak GiB | fwd x | fwd+bwd x |")
    say("|---|---|---|---|---|---|---|---|")
    for label, rows in table:
        peer = rows.get("mamba_ssm c256")
        for name, (tf, tb, mf, mb) in rows.items():
            ratio = f"{peer[0] / tf:.2f} | {peer[1] / tb:.2f}" if peer else "- | -"
            ratio = ratio.replace("nan", "-")
            say(f"| {label} | {name} | {tf:.3f} | {tb:.3f} | {mf:.2f} | {mb:.2f} | {ratio} |")
    say("(x = mamba_ssm time / this time; > 1 is faster than mamba_ssm)")
    write_log(Path(opts.out) / "gpu_ssd.log")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
