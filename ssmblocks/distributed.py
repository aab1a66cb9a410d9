"""Scaling out with PyTorch's own engine (launch with torchrun; gloo on CPU, nccl on GPUs).

- ``fully_shard_blocks``: FSDP2, data parallel with sharded parameters, optionally in bf16 mixed precision.
- ``tensor_parallel``: Megatron-style tensor parallelism with DTensor: every mixer and MLP is split by heads
  (channels for Mamba1) across the ranks of a 1-D mesh; one all-reduce per mixer and per MLP in forward.
  ``vocab_parallel=True`` splits the embedding and LM head by vocabulary rows too, with a cross-entropy that
  never forms whole logits.
- ``full_state_dict``: gather a tensor-parallel model's tensors back to full, checkpoint-ordered ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from .layers import SSD, Attention, CausalConv1d, GatedRMSNorm, SelectiveSSM, SwiGLU
from .layers._local import local
from .layers.lm_head import LMHead
from .losses import IGNORE
from .ops import linear


def fully_shard_blocks(model: nn.Module, mesh=None, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: shard every block of a CausalLM (one all-gather per block in forward and backward), then the
    rest (embedding, final norm, LM head). ``mesh``: a 1-D DeviceMesh, or None for the default process group.
    Gradients are averaged over ranks, as data parallelism over the ranks' batches expects. Returns the
    model, changed in place.

    ``param_dtype`` (torch.bfloat16, say): mixed precision. Parameters are all-gathered and compute in it,
    gradients are reduce-scattered in float32, the sharded parameters (and so the optimizer) stay float32:
    the forward is that of ``model.to(param_dtype)`` (the residual stream float32 if ``residual_in_fp32``).
    FSDP2 casts every parameter of a group, so the SSM layers' float32 ones (``_keep_float32``: A_log, D,
    dt_bias; a few floats per head or channel) are left out of FSDP: kept whole and float32 on every rank,
    their gradients averaged over the ranks by an all-reduce as each is accumulated."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the model casts for itself: the blocks take the residual stream in float32 if the recipe says so
    policy = MixedPrecisionPolicy(param_dtype, torch.float32 if param_dtype else None, cast_forward_inputs=False)
    kept = set()
    if param_dtype is not None:
        kept = {getattr(m, name) for m in model.modules() for name in getattr(m, "_keep_float32", ())}
        average = _AverageGradient(dist.group.WORLD if mesh is None else mesh.get_group())
        for param in kept:
            param.register_post_accumulate_grad_hook(average)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=kept)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=kept)
    return model


class _AverageGradient:
    """Post-accumulate-grad hook: the parameter's gradient becomes its mean over the ranks of ``group``."""

    def __init__(self, group):
        self.group = group

    def __call__(self, param: torch.Tensor) -> None:
        grad = local(param.grad)
        dist.all_reduce(grad, group=self.group)
        grad /= dist.get_world_size(self.group)


def tensor_parallel(model: nn.Module, mesh, vocab_parallel: bool = False) -> nn.Module:
    """Split every Attention, SwiGLU, SSD and SelectiveSSM of ``model`` across the ranks of the 1-D
    DeviceMesh ``mesh`` (size t); the norms stay replicated, and so do the embedding and LM head unless
    ``vocab_parallel`` (a CausalLM; t must divide its padded vocabulary): then each rank holds V/t rows of
    both (``VocabParallelEmbedding``, ``VocabParallelLMHead``; tied embeddings stay tied), and the loss is
    a vocabulary-parallel cross-entropy, with ``model.loss_chunk_size`` or without.

    Every rank runs the whole batch. Input projections are split by output rows (heads), output projections
    by input columns, followed by one all-reduce, so each layer's output is whole on every rank:

    - Attention: query and key/value heads (t must divide n_heads and n_kv_heads).
    - SwiGLU: hidden units (t | hidden_dim).
    - SSD: heads, with their conv channels, A_log, D, dt_bias and norm weights (t | n_heads). B and C are split
      by group when t divides n_groups (no extra communication). Otherwise (t a multiple of n_groups, as for
      Bamba's single group) each rank computes a 1/t slice of every group's state dimension, the slices are
      summed across ranks into whole B and C, and the gated norm's sum of squares, whose group then spans
      several ranks, is summed across ranks too: two small all-reduces per layer, exact.
    - SelectiveSSM: inner channels (t | d_inner); x_proj is split by its input, so dt, B and C are whole.

    Fused input projections are reordered so each rank's rows are contiguous; ``full_state_dict`` undoes
    that. The layers keep their classes and their sizes (``n_heads`` is still the whole layer's); ``tp_size``
    says over how many ranks they are split (``local_heads`` and the like: each rank's share), so
    ``init_state`` gives the rank's share of the state and generation runs unchanged on every rank. The two
    behaviours a split SSD needs beyond that are modules of their own, put in place of the layer's:
    ``BCGatheringConv1d`` and ``GroupSpanningGatedRMSNorm``. Returns the model, changed in place.
    """
    t, rank = mesh.size(), mesh.get_local_rank()
    layers = [(name, m) for name, m in model.named_modules() if type(m) in _PLANS]
    for name, module in layers:  # check every layer before changing any
        _check_splittable(name or type(module).__name__, module, t)
    if vocab_parallel:
        _check_vocab_splittable(model, t)
    orders = {}
    for name, module in layers:
        prefix = f"{name}." if name else ""
        for param, order in _PLANS[type(module)](module, mesh, t, rank).items():
            orders[prefix + param] = order
        module.tp_size = t
    model._tp_row_orders = orders
    if vocab_parallel:
        _split_vocabulary(model, mesh)
    return model


def full_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Full tensors in checkpoint order, on every rank: DTensors gathered, reordered rows put back.

    tensors: name -> tensor (default ``model.state_dict()``; pass ``{n: p.grad for n, p in
    model.named_parameters()}`` to gather gradients). Collective: call it on every rank."""
    tensors = model.state_dict() if tensors is None else tensors
    orders = getattr(model, "_tp_row_orders", {})
    full = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        if name in orders:
            restored = torch.empty_like(tensor)
            restored[orders[name].to(tensor.device)] = tensor
            tensor = restored
        full[name] = tensor
    return full


def _check_splittable(name: str, module: nn.Module, t: int) -> None:
    def need(size: int, what: str, why: str = "") -> None:
        if size % t:
            raise ValueError(f"tensor_parallel: {name}: {what}={size} is not divisible by {t} ranks{why}")

    if isinstance(module, Attention):
        need(module.n_heads, "n_heads")
        need(module.n_kv_heads, "n_kv_heads", " (key/value heads are split, not replicated)")
    elif isinstance(module, SwiGLU):
        need(module.hidden_dim, "hidden_dim")
    elif isinstance(module, SelectiveSSM):
        need(module.d_inner, "d_inner")
    elif isinstance(module, SSD):
        need(module.n_heads, "n_heads")
        if module.n_groups % t and t % module.n_groups:
            raise ValueError(
                f"tensor_parallel: {name}: n_groups={module.n_groups} and {t} ranks: one must divide the other "
                "(groups split across ranks, or each rank's heads inside one group)"
            )
        if module.n_groups % t:
            need(module.d_state, "d_state", f" (n_groups={module.n_groups} < ranks: B and C are split by state)")


def _check_vocab_splittable(model: nn.Module, t: int) -> None:
    if not isinstance(getattr(model, "lm_head", None), LMHead) or not isinstance(model.embedding, nn.Embedding):
        raise TypeError(f"tensor_parallel: vocab_parallel needs a CausalLM, got {type(model).__name__}")
    rows = model.embedding.num_embeddings
    if rows % t:
        raise ValueError(
            f"tensor_parallel: vocab_parallel: the padded vocabulary ({rows} rows) is not divisible by {t} ranks; "
            "set the recipe's pad_vocab_size_multiple to a multiple of the ranks"
        )


def _split_vocabulary(model: nn.Module, mesh) -> None:
    """Embedding and LM head split by vocabulary rows; a tied weight stays one (sharded) parameter."""
    tied = model.lm_head.weight is model.embedding.weight
    model.embedding = VocabParallelEmbedding(model.embedding, mesh)
    model.lm_head = VocabParallelLMHead(model.lm_head, mesh, model.embedding.weight if tied else None)


def _shard_rows(module: nn.Module, name: str, mesh, order: torch.Tensor | None = None) -> None:
    """Replace parameter ``name`` by a DTensor split by rows (dim 0), after reordering rows by ``order``."""
    param = getattr(module, name)
    if param is None:
        return
    data = param.data if order is None else param.data[order.to(param.device)]
    module.register_parameter(name, nn.Parameter(distribute_tensor(data, mesh, [Shard(0)]), param.requires_grad))


def _split_linear(linear: nn.Linear, mesh, style, order: torch.Tensor | None = None) -> None:
    if order is not None:
        with torch.no_grad():
            linear.weight.data = linear.weight.data[order.to(linear.weight.device)]
            if linear.bias is not None:
                linear.bias.data = linear.bias.data[order.to(linear.bias.device)]
    parallelize_module(linear, mesh, style)


def _rank_blocks(t: int, *segments: tuple[int, torch.Tensor]) -> torch.Tensor:
    """Row order that puts each rank's rows together: for rank r, segment by segment, the rows
    ``offset + idx[r]``, where each segment (offset, idx) gives idx (t, rows per rank) local to the segment."""
    return torch.cat([offset + idx[r] for r in range(t) for offset, idx in segments])


def _attention(attn: Attention, mesh, t: int, rank: int) -> dict:
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        _split_linear(proj, mesh, ColwiseParallel())
    _split_linear(attn.o_proj, mesh, RowwiseParallel())
    return {}


def _swiglu(mlp: SwiGLU, mesh, t: int, rank: int) -> dict:
    _split_linear(mlp.gate_proj, mesh, ColwiseParallel())
    _split_linear(mlp.up_proj, mesh, ColwiseParallel())
    _split_linear(mlp.down_proj, mesh, RowwiseParallel())
    return {}


def _selective_ssm(ssm: SelectiveSSM, mesh, t: int, rank: int) -> dict:
    e = ssm.d_inner
    channels = torch.arange(e).view(t, -1)
    in_order = _rank_blocks(t, (0, channels), (e, channels))  # [x | z] -> rank by rank [x_r | z_r]
    _split_linear(ssm.in_proj, mesh, ColwiseParallel(), in_order)
    for name in ("weight", "bias"):
        _shard_rows(ssm.conv1d, name, mesh)
    _split_linear(ssm.x_proj, mesh, RowwiseParallel())
    ssm.x_proj.register_forward_hook(_SumBCGradients(ssm.dt_rank, mesh.get_group()))
    _split_linear(ssm.dt_proj, mesh, ColwiseParallel())
    _shard_rows(ssm, "A_log", mesh)
    _shard_rows(ssm, "D", mesh)
    _split_linear(ssm.out_proj, mesh, RowwiseParallel())
    return _orders(in_proj=in_order)


class _SumBCGradients:
    """Forward hook on SelectiveSSM's x_proj: its output [dt | B | C] is whole on every rank, but each rank's
    B and C feed only the rank's channels, so their gradients are summed across ranks in backward. (dt's are
    already: dt_proj's split sums them.)"""

    def __init__(self, dt_rank: int, group):
        self.dt_rank, self.group = dt_rank, group

    def __call__(self, module, args, output: torch.Tensor) -> torch.Tensor:
        dt, bc = output.split([self.dt_rank, output.shape[-1] - self.dt_rank], dim=-1)
        return torch.cat([dt, _SumGradient.apply(bc, self.group)], dim=-1)


class _SumGradient(torch.autograd.Function):
    """Identity in forward; in backward the gradient is summed across the ranks of ``group``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _ssd(ssd: SSD, mesh, t: int, rank: int) -> dict:
    e, h, g, n = ssd.d_inner, ssd.n_heads, ssd.n_groups, ssd.d_state
    inner, heads = torch.arange(e).view(t, -1), torch.arange(h).view(t, -1)
    state = torch.arange(g * n).view(g, n)
    split_groups = g % t == 0
    if split_groups:  # rank r: groups [r g/t, (r+1) g/t), every state index
        bc = state.view(t, -1)
    else:  # rank r: every group, state indices [r n/t, (r+1) n/t)
        bc = state.view(g, t, n // t).transpose(0, 1).reshape(t, -1)
    in_order = _rank_blocks(t, (0, inner), (e, inner), (2 * e, bc), (2 * e + g * n, bc), (2 * e + 2 * g * n, heads))
    conv_order = _rank_blocks(t, (0, inner), (e, bc), (e + g * n, bc))
    _split_linear(ssd.in_proj, mesh, ColwiseParallel(), in_order)
    for name in ("weight", "bias"):
        _shard_rows(ssd.conv1d, name, mesh, conv_order)
    for name in ("A_log", "D", "dt_bias"):
        _shard_rows(ssd, name, mesh)
    _shard_rows(ssd.norm, "weight", mesh)
    _split_linear(ssd.out_proj, mesh, RowwiseParallel())

    if not split_groups:
        group = rank // (t // g)  # the one group this rank's heads read
        ssd.conv1d = BCGatheringConv1d(ssd.conv1d, mesh.get_group(), e // t, g, group)
        ssd.norm = GroupSpanningGatedRMSNorm(ssd.norm, mesh.get_group(), g, group)
    return _orders(in_proj=in_order, conv1d=conv_order)


def _orders(**row_orders: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reordered rows by parameter name (weight and bias of each module)."""
    return {f"{module}.{p}": order for module, order in row_orders.items() for p in ("weight", "bias")}


class BCGatheringConv1d(CausalConv1d):
    """SSD's conv when each rank holds a slice of the state dimension of B and C (tensor parallelism with fewer
    groups than ranks): after the (channel-wise) convolution, the slices of all ranks are summed into whole B
    and C of the rank's group ``rank_group``. Takes over the parameters of ``conv``.

    Input (b, l, inner + 2 g n/t) = [x | B slice | C slice]; output (b, l, inner + 2 n) = [x | B | C]."""

    def __init__(self, conv: CausalConv1d, group, inner: int, n_groups: int, rank_group: int):
        super().__init__(conv.channels, conv.kernel_size, conv.bias is not None, conv.activation, device="meta")
        self.weight, self.bias = conv.weight, conv.bias
        self.group, self.inner, self.n_groups, self.rank_group = group, inner, n_groups, rank_group

    def conv(self, x, conv_state=None, mask=None, cu_seqlens=None):
        y = super().conv(x, conv_state, mask, cu_seqlens)
        xs, bc = y.split([self.inner, y.shape[-1] - self.inner], dim=-1)
        t, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        b, l, _ = bc.shape
        whole = bc.new_zeros(b, l, 2, self.n_groups, t, bc.shape[-1] // (2 * self.n_groups))
        whole[:, :, :, :, rank] = bc.view(b, l, 2, self.n_groups, -1)
        whole = all_reduce(whole, group=self.group).flatten(-2)  # (b, l, 2, g, n)
        return torch.cat([xs, whole[:, :, :, self.rank_group].flatten(-2)], dim=-1)


class GroupSpanningGatedRMSNorm(GatedRMSNorm):
    """SSD's gated norm when one norm group spans several ranks: the sum of squares of the rank's channels
    (all in group ``rank_group``) is summed across ranks. x, z: (b, l, d / t). Takes over the weight of
    ``norm``."""

    def __init__(self, norm: GatedRMSNorm, group, n_groups: int, rank_group: int):
        super().__init__(norm.dim, norm.eps, norm.group_size, norm.norm_before_gate, device="meta")
        self.weight = norm.weight
        self.group, self.n_groups, self.rank_group = group, n_groups, rank_group

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        wd = torch.promote_types(x.dtype, torch.float32)
        gate = torch.nn.functional.silu(z.to(wd))
        v = x.to(wd) if self.norm_before_gate else x.to(wd) * gate
        sums = v.new_zeros(*v.shape[:-1], self.n_groups)
        sums[..., self.rank_group] = v.square().sum(-1)
        sums = all_reduce(sums, group=self.group)[..., self.rank_group : self.rank_group + 1]
        y = v * torch.rsqrt(sums / self.group_size + self.eps) * local(self.weight).to(wd)
        return (y * gate if self.norm_before_gate else y).to(x.dtype)


class VocabParallelEmbedding(nn.Embedding):
    """The embedding split by vocabulary rows: rank r holds rows [r V/t, (r+1) V/t) of the (padded) V, as a
    DTensor. Each rank looks up the ids it holds, zeros for the others, and one all-reduce sums the ranks'
    rows. ids (b, l) -> (b, l, d), whole on every rank. Takes over the weight of ``embedding``."""

    def __init__(self, embedding: nn.Embedding, mesh):
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, device="meta")
        self.weight = embedding.weight
        _shard_rows(self, "weight", mesh)
        self.mesh, self.rows = mesh, embedding.num_embeddings // mesh.size()
        self.first = mesh.get_local_rank() * self.rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids - self.first
        elsewhere = (ids < 0) | (ids >= self.rows)
        rows = nn.functional.embedding(ids.masked_fill(elsewhere, 0), local(self.weight))
        return _sum_over_ranks(rows.masked_fill(elsewhere[..., None], 0), self.mesh)


class VocabParallelLMHead(LMHead):
    """The LM head split by vocabulary rows like ``VocabParallelEmbedding`` (and sharing its weight when
    ``tied_weight`` is given). ``forward`` gathers whole logits (decode); ``cross_entropy_sum`` computes the
    loss from the rank's logits (c, V/t) with three all-reduces of (c,) floats: the max, the sum of exp and
    the target's logit (from the rank that holds it). Takes over the weight of ``head``."""

    loss_from_logits = False

    def __init__(self, head: LMHead, mesh, tied_weight: nn.Parameter | None = None):
        super().__init__(head.in_features, head.out_features, head.vocab_size, device="meta")
        self.weight = head.weight if tied_weight is None else tied_weight
        if tied_weight is None:
            _shard_rows(self, "weight", mesh)
        self.mesh, self.rows = mesh, head.out_features // mesh.size()
        self.first = mesh.get_local_rank() * self.rows

    def shard_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d), whole on every rank -> the rank's logits (..., V/t); in backward the gradient of
        hidden is summed over the ranks."""
        return linear(_SumGradient.apply(hidden, self.mesh.get_group()), local(self.weight))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) -> logits (..., V), gathered from every rank."""
        shard = self.shard_logits(hidden)
        return DTensor.from_local(shard, self.mesh, [Shard(shard.dim() - 1)]).full_tensor()

    def cross_entropy_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of float32 logits over the whole vocabulary: hidden (c, d), targets (c,) token
        ids or -100 (ignored); the padding rows are left out of the softmax."""
        logits = self.shard_logits(hidden).float()
        tokens = self.first + torch.arange(self.rows, device=logits.device)
        logits = logits.masked_fill(tokens >= self.vocab_size, -torch.inf)
        peak = _sum_over_ranks(logits.detach().amax(-1), self.mesh, "max")  # (c,)
        sum_exp = _sum_over_ranks((logits - peak[:, None]).exp().sum(-1), self.mesh)
        column = targets - self.first
        mine = (column >= 0) & (column < self.rows)  # never for -100
        target_logit = logits.gather(-1, column.clamp(0, self.rows - 1)[:, None])[:, 0].masked_fill(~mine, 0)
        losses = sum_exp.log() + peak - _sum_over_ranks(target_logit, self.mesh)
        return losses.masked_fill(targets == IGNORE, 0).sum()


def _sum_over_ranks(x: torch.Tensor, mesh, op: str = "sum") -> torch.Tensor:
    """All-reduce of the ranks' ``x`` (sum, or "max"); in backward each rank's gradient passes unchanged, as
    whatever follows runs whole on every rank."""
    return DTensor.from_local(x, mesh, [Partial(op)]).full_tensor()


_PLANS = {Attention: _attention, SwiGLU: _swiglu, SelectiveSSM: _selective_ssm, SSD: _ssd}
