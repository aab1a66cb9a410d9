"""FSDP2 on 2 gloo processes (CPU) gives the loss and gradients of one process on the whole batch."""

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_model import VOCAB, hybrid

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from ssmblocks.distributed import fully_shard_blocks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = hybrid().train()
        ids = torch.randint(0, VOCAB, (2 * world, 13), generator=torch.Generator().manual_seed(1))
        full = model(ids, labels=ids).loss  # one process, the whole batch
        full.backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        fully_shard_blocks(model)
        mine = ids[2 * rank : 2 * rank + 2]
        loss = model(mine, labels=mine).loss
        loss.backward()
        errors = {}
        for name, param in model.named_parameters():
            grad = param.grad.full_tensor()
            errors[name] = ((grad - expected[name]).abs().max() / expected[name].abs().max().clamp_min(1e-12)).item()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        result = {"loss": mean_loss.item() / world, "expected_loss": full.item(), "grad_errors": errors}
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_processes_match_one(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2)
    for rank in range(2):
        result = json.load(open(f"{out}.{rank}"))
        assert abs(result["loss"] - result["expected_loss"]) < 1e-5 * abs(result["expected_loss"])
        worst = max(result["grad_errors"].items(), key=lambda kv: kv[1])
        assert len(result["grad_errors"]) == len(list(hybrid().parameters()))
        assert worst[1] < 1e-5, worst
