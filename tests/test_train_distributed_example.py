"""examples/train_distributed.py under torchrun on CPU (gloo): FSDP2 and tensor parallelism on 2 processes
follow the loss curve of one process on the same global batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.test_distributed import _free_port

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_distributed.py"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def torchrun(tmp_path, processes: int, parallel: str, *extra: str, fails: bool = False):
    metrics = tmp_path / f"{parallel}.json"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    command += [f"--master_port={_free_port()}", str(EXAMPLE), "--parallel", parallel, "--steps", "4"]
    command += ["--seqlen", "32", "--metrics", str(metrics), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if fails:
        assert run.returncode != 0
        return run.stderr
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(metrics.read_text())


def test_fsdp_and_tensor_parallel_follow_one_process(tmp_path):
    one = torchrun(tmp_path, 1, "none")
    assert len(one["losses"]) == 4 and one["tokens_per_s"] > 0 and one["peak_memory_mib_per_process"] > 0
    for parallel in ("fsdp", "tp"):
        profile = tmp_path / f"{parallel}_profile.txt"
        run = torchrun(
            tmp_path,
            2,
            parallel,
            "--baseline",
            str(tmp_path / "none.json"),
            "--profile",
            str(profile),
            "--timing-warmup",
            "0",
        )
        assert "by device time" in profile.read_text() and "aten::mm" in profile.read_text()
        assert run["processes"] == 2
        assert run["max_loss_difference_to_baseline"] < 1e-5 * max(one["losses"]), (parallel, run["losses"])
        assert run["decoded_equal_to_baseline"] and len(run["decoded"][0]) == 16


def test_refuses_what_it_cannot_run(tmp_path):
    assert "--vocab-parallel needs --parallel tp or 2d" in torchrun(tmp_path, 1, "fsdp", "--vocab-parallel", fails=True)
    assert "pass --decode 0" in torchrun(tmp_path, 1, "fsdp", "--param-dtype", "bf16", fails=True)
    assert "--profile needs --steps >= 7" in torchrun(tmp_path, 1, "none", "--profile", "p.txt", fails=True)
