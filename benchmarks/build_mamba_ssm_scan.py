"""Build mamba_ssm's CUDA selective scan (``selective_scan_cuda``) from its source, for the GPU comparisons.

    python benchmarks/build_mamba_ssm_scan.py PEERS   # PEERS holds mamba_ssm/ and csrc/selective_scan/

The module lands in PEERS (``import selective_scan_cuda`` works with PEERS on sys.path), built for the GPU
present (sm_90 on an H100/H200; about 2 minutes on 16 cores with ninja). mamba_ssm is a measuring stick for
benchmarks/gpu_scan.py, gpu_train_step.py and gpu_decode.py, never a dependency of ssmblocks.
"""

import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

NVCC_FLAGS = [  # the flags of mamba_ssm's own setup.py
    "-O3",
    "-std=c++17",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
]


def main() -> None:
    peers = Path(sys.argv[1]).resolve()
    source = peers / "csrc" / "selective_scan"
    if not source.is_dir():
        raise SystemExit(f"{source} is missing: put mamba_ssm's csrc/selective_scan there")
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count()))
    build = peers / "build_selective_scan"
    build.mkdir(exist_ok=True)
    start = time.perf_counter()
    load(
        name="selective_scan_cuda",
        sources=[str(source / "selective_scan.cpp"), *map(str, sorted(source.glob("*.cu")))],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=NVCC_FLAGS,
        extra_include_paths=[str(source)],
        build_directory=str(build),
        verbose=False,
    )
    (peers / "selective_scan_cuda.so").unlink(missing_ok=True)
    (peers / "selective_scan_cuda.so").symlink_to(build / "selective_scan_cuda.so")
    print(f"built selective_scan_cuda for sm_{major}{minor} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
