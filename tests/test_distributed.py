"""FSDP2, tensor parallelism (also vocabulary-parallel) and both on a 2-D mesh, on gloo processes (CPU), give
the loss and gradients of one process on the whole batch; tensor-parallel decode gives the same tokens. FSDP2
in bf16 mixed precision gives those of one bf16 process, with A_log, D and dt_bias float32."""

import copy
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssmblocks import Recipe, build
from ssmblocks.backends import registry
from tests.test_model import VOCAB, hybrid

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def single_group_model():
    """Bamba-like: SSD with one group of B and C (split by state across ranks), biases, per-channel D,
    norm before gate; attention and a SelectiveSSM with biases."""
    recipe = Recipe.model_validate(
        {
            "name": "one-group",
            "vocab_size": VOCAB,
            "d_model": 32,
            "n_layers": 3,
            "mixers": {
                "m": {
                    "kind": "ssd", "d_state": 8, "head_dim": 8, "n_groups": 1, "chunk_size": 4, "bias": True,
                    "D_has_hdim": True, "norm_before_gate": True,
                },
                "a": {"kind": "attention", "n_heads": 4, "n_kv_heads": 4, "bias": True},
                "s": {"kind": "selective_ssm", "d_state": 4, "bias": True},
            },
            "mlp": {"hidden_dim": 64, "bias": True},
            "pattern": "m a s",
        }
    )  # fmt: skip
    return build(recipe).eval()


def two_group_model():
    """SSD with 2 groups: on 4 ranks each pair of ranks shares a group."""
    recipe = Recipe.model_validate(
        {
            "name": "two-groups",
            "vocab_size": VOCAB,
            "d_model": 32,
            "n_layers": 2,
            "mixers": {"m": {"kind": "ssd", "d_state": 8, "head_dim": 8, "n_groups": 2, "chunk_size": 4}},
            "pattern": "m m",
        }
    )
    return build(recipe).eval()


MODELS = {
    "hybrid": hybrid,
    "hybrid-untied": lambda: hybrid(tie=False),
    "one-group": single_group_model,
    "two-groups": two_group_model,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relative_errors(got: dict, expected: dict) -> dict:
    scale = {n: e.abs().max().clamp_min(1e-12) for n, e in expected.items()}
    return {n: ((g - expected[n]).abs().max() / scale[n]).item() for n, g in got.items()}


def _worker(rank: int, world: int, port: int, out: str, parallel: str, model_name: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from ssmblocks.distributed import full_state_dict, fully_shard_blocks, tensor_parallel
    from ssmblocks.training import clip_grad_norm_, param_groups

    def sgd_step(m):  # foreach: fails if a parameter group mixes DTensors and plain tensors
        torch.optim.SGD(param_groups(m, 0.1), lr=0.1, momentum=0.9, foreach=True).step()

    torch.set_num_threads(1)  # the processes share the cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with registry.use("torch"):  # the layouts' math; the C++ kernels would be built in every process
            torch.manual_seed(0)
            model = MODELS[model_name]().train()
            ids = torch.randint(0, VOCAB, (2 * world, 13), generator=torch.Generator().manual_seed(1))
            full = model(ids, labels=ids).loss  # one process, the whole batch
            full.backward()
            expected = {n: p.grad.clone() for n, p in model.named_parameters()}
            result = {
                "expected_loss": full.item(),
                "expected_norm": torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9),
            }
            weights = {n: t.clone() for n, t in model.state_dict().items()}
            reference = copy.deepcopy(model)  # deepcopy leaves the gradients behind
            for ref_param, param in zip(reference.parameters(), model.parameters(), strict=True):
                ref_param.grad = param.grad.clone()
            sgd_step(reference)
            stepped = reference.state_dict()
            model.zero_grad()
            prompt = ids[:2, :6]
            expected_tokens = model.eval().generate(prompt, max_new_tokens=8).tolist()
            model.train()
            if parallel == "2d":  # tensor parallel inside each pair of ranks, data parallel across the pairs
                mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
                tensor_parallel(model, mesh["tp"], vocab_parallel=True)
                fully_shard_blocks(model, mesh["dp"])
                dp_mesh = mesh["dp"]
            elif parallel == "fsdp":
                dp_mesh = init_device_mesh("cpu", (world,))
                fully_shard_blocks(model, dp_mesh)
            else:
                dp_mesh = None  # every rank runs the whole batch
                tensor_parallel(model, init_device_mesh("cpu", (world,)), vocab_parallel=parallel == "tp-vocab")
                model.loss_chunk_size = 5 if parallel == "tp-vocab" else None
            # before training: under FSDP2 a decode leaves the root's parameters unsharded until its next backward
            result["tokens_equal"] = model.eval().generate(prompt, max_new_tokens=8).tolist() == expected_tokens
            model.train()
            if dp_mesh is None:
                loss = model(ids, labels=ids).loss
                result["loss"] = loss.item()
            else:  # data parallel: the rank's share of the batch
                share = len(ids) // dp_mesh.size()
                mine = ids[dp_mesh.get_local_rank() * share :][:share]
                loss = model(mine, labels=mine).loss
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss, group=dp_mesh.get_group())
                result["loss"] = mean_loss.item() / dp_mesh.size()
            loss.backward()
            grads = full_state_dict(model, {n: p.grad for n, p in model.named_parameters()})
            gathered = full_state_dict(model)
            result["weights_equal"] = gathered.keys() == weights.keys() and all(
                torch.equal(gathered[n], weights[n]) for n in weights
            )
            result["grad_errors"] = _relative_errors(grads, expected)
            sgd_step(model)
            result["step_errors"] = _relative_errors(full_state_dict(model), stepped)
            result["step_changes"] = _relative_errors(stepped, weights)
            result["norm"] = clip_grad_norm_(model.parameters(), 1e9).item()  # the gathered gradients' norm
            result["expected_norm"] = result["expected_norm"].item()
            with open(f"{out}.{rank}", "w") as f:
                json.dump(result, f)
            dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "parallel, model_name, world",
    [
        ("fsdp", "hybrid", 2),
        ("tp", "hybrid", 2),
        ("tp", "one-group", 2),
        ("tp", "two-groups", 4),
        ("tp-vocab", "hybrid", 2),  # tied embeddings, chunked loss
        ("2d", "hybrid-untied", 4),
    ],
)
def test_parallel_processes_match_one(tmp_path, parallel, model_name, world):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(world, _free_port(), out, parallel, model_name), nprocs=world)
    n_params = len(list(MODELS[model_name]().parameters()))
    for rank in range(world):
        result = json.load(open(f"{out}.{rank}"))
        assert abs(result["loss"] - result["expected_loss"]) < 1e-5 * abs(result["expected_loss"])
        assert len(result["grad_errors"]) == n_params
        worst = max(result["grad_errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, worst
        assert abs(result["norm"] - result["expected_norm"]) < 1e-5 * result["expected_norm"]
        worst = max(result["step_errors"].items(), key=lambda kv: kv[1])
        step_tolerance = 5e-6 if parallel == "2d" else 1e-6  # gradients summed over two mesh dimensions
        assert worst[1] < step_tolerance, f"weights after one optimizer step: {worst}"
        assert max(result["step_changes"].values()) > 1e-2, "the step must change the weights"
        assert result["weights_equal"], "full_state_dict does not give back the checkpoint-ordered weights"
        assert result["tokens_equal"], f"{parallel} decode differs from one process"


def _mixed_precision_worker(rank: int, world: int, port: int, out: str) -> None:
    from ssmblocks.distributed import full_state_dict, fully_shard_blocks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with registry.use("torch"):
            torch.manual_seed(0)
            model = hybrid().train()
            ids = torch.randint(0, VOCAB, (2 * world, 13), generator=torch.Generator().manual_seed(1))
            one = copy.deepcopy(model).bfloat16()  # A_log, D and dt_bias stay float32
            expected, expected_loss = {}, 0.0
            for share in ids.split(2):  # one process, each rank's share, gradients averaged in float32
                one.zero_grad()
                loss = one(share, labels=share).loss
                loss.backward()
                expected_loss += loss.item() / world
                for n, p in one.named_parameters():
                    expected[n] = expected.get(n, 0) + p.grad.float() / world
            fully_shard_blocks(model, param_dtype=torch.bfloat16)
            compute_dtypes = {}
            for name, module in model.named_modules():
                if hasattr(module, "A_log"):
                    module.register_forward_pre_hook(
                        lambda m, args, name=name: compute_dtypes.update(
                            {f"{name}.{n}": str(p.dtype) for n, p in m.named_parameters()}
                        )
                    )
            mine = ids[2 * rank : 2 * rank + 2]
            loss = model(mine, labels=mine).loss
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            grads = full_state_dict(model, {n: p.grad for n, p in model.named_parameters()})
            result = {
                "loss": mean_loss.item() / world,
                "expected_loss": expected_loss,
                "grad_errors": _relative_errors(grads, expected),
                "grad_dtypes": {n: str(g.dtype) for n, g in grads.items()},
                "compute_dtypes": compute_dtypes,
            }
            with open(f"{out}.{rank}", "w") as f:
                json.dump(result, f)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp_bf16_mixed_precision_keeps_ssm_parameters_float32(tmp_path):
    """bf16 compute as in one process's ``model.bfloat16()`` (A_log, D, dt_bias float32 there too), gradients
    averaged in float32; the sharded parameters and their gradients float32."""
    out, world = str(tmp_path / "result"), 2
    mp.spawn(_mixed_precision_worker, args=(world, _free_port(), out), nprocs=world)
    for rank in range(world):
        result = json.load(open(f"{out}.{rank}"))
        assert abs(result["loss"] - result["expected_loss"]) < 1e-5 * result["expected_loss"]
        worst = max(result["grad_errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, worst
        assert set(result["grad_dtypes"].values()) == {"torch.float32"}
        kept = {n: d for n, d in result["compute_dtypes"].items() if n.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias")}
        cast = {n: d for n, d in result["compute_dtypes"].items() if n not in kept}
        assert len(kept) == 11 and set(kept.values()) == {"torch.float32"}, kept
        assert cast and set(cast.values()) == {"torch.bfloat16"}, cast


def test_tensor_parallel_refuses_unsplittable_layers():
    """Checked before anything is changed; the error names the layer and the size."""
    from types import SimpleNamespace

    from ssmblocks.distributed import tensor_parallel

    model = hybrid()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers\.0\.mixer: d_inner=64 is not divisible by 3 ranks"):
        tensor_parallel(model, SimpleNamespace(size=lambda: 3, get_local_rank=lambda: 0))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_vocab_parallel_refuses_an_unsplittable_vocabulary():
    from types import SimpleNamespace

    from ssmblocks.distributed import tensor_parallel

    with pytest.raises(ValueError, match=r"padded vocabulary \(97 rows\) is not divisible by 2 ranks"):
        tensor_parallel(
            two_group_model(), SimpleNamespace(size=lambda: 2, get_local_rank=lambda: 0), vocab_parallel=True
        )
