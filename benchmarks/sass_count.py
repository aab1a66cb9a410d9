"""Compile one Triton kernel of ssmblocks.kernels for sm_90 on any machine (no GPU needed) and count its SASS.

    python benchmarks/sass_count.py selective_scan_bwd.selective_scan_bwd_kernel \\
        '{"CHUNK": 16, "BLOCK_E": 4, "BLOCK_N": 16, "HAS_BIAS": true, "SOFTPLUS": true, "HAS_D": true,
          "HAS_Z": true, "HAS_DFINAL": false, "HAS_INIT": false}' --warps 1 --bf16 x dt z dy dx ddt dz B C

Prints ptxas's registers and spills and the most frequent SASS opcodes (divide by the elements a thread holds
per loop iteration to compare designs); --out keeps the ttgir (layouts), PTX and SASS. Pointer arguments are
float32 unless named in --bf16 or --i32; --scalars names the int32 scalars, --floats the float32 ones; a constexpr given
as "tl.bfloat16" (and the like) is that Triton dtype.
"""

import argparse
import collections
import importlib
import json
import re
import subprocess
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", help="module.function under ssmblocks.kernels")
    parser.add_argument("constexprs", help="JSON object of the kernel's constexpr arguments")
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--scalars", nargs="*", default=["seq_len", "width", "d_state"], help="int32 arguments")
    parser.add_argument("--floats", nargs="*", default=[], help="float32 scalar arguments")
    parser.add_argument("--bf16", nargs="*", default=[], help="pointer arguments to type as bfloat16")
    parser.add_argument("--i32", nargs="*", default=[], help="pointer arguments to type as int32")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sass_count"))
    opts = parser.parse_args()
    module, name = opts.kernel.rsplit(".", 1)
    kernel = getattr(importlib.import_module(f"ssmblocks.kernels.{module}"), name)
    constexprs = {  # "tl.bfloat16" and the like name a Triton dtype
        k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
        for k, v in json.loads(opts.constexprs).items()
    }
    signature = {
        p.name: "constexpr" if p.name in constexprs else "i32" if p.name in opts.scalars else
        "fp32" if p.name in opts.floats else "*bf16" if p.name in opts.bf16 else
        "*i32" if p.name in opts.i32 else "*fp32"
        for p in kernel.params
    }  # fmt: skip
    source = ASTSource(kernel, signature, {(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": opts.warps, "num_stages": opts.stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    opts.out.mkdir(parents=True, exist_ok=True)
    for ext in ("ttgir", "ptx"):
        (opts.out / f"{name}.{ext}").write_text(compiled.asm[ext])
    cubin = opts.out / f"{name}.cubin"
    ptxas = [TOOLS / "ptxas", "-v", "--gpu-name=sm_90a", opts.out / f"{name}.ptx", "-o", cubin]
    report = subprocess.run(ptxas, capture_output=True, text=True, check=True).stderr
    print(" ".join(re.findall(r"Used \d+ registers|\d+ bytes spill (?:stores|loads)", report)))
    sass = subprocess.run([TOOLS / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
    (opts.out / f"{name}.sass").write_text(sass)
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass, re.M)
    print(f"{len(ops)} instructions:", collections.Counter(ops).most_common(12))


if __name__ == "__main__":
    main()
