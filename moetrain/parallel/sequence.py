"""DeepSpeed-Ulysses sequence parallelism, applied to the plain model from outside.

`deepspeed.sequence_parallel_size = P`: ranks [i*P, (i+1)*P) form one sequence-
parallel (SP) group (the layout of DeepSpeed's runtime/sequence_parallel/
parallel_state_sp.py, whose groups we use). Every rank of a group reads the same
batch and keeps the contiguous columns [r*S/P, (r+1)*S/P) of each row
(shard_batch); positions stay global, `cu_seqlens` stays the full sequence's.

Attention: the Ulysses all-to-all is DeepSpeed's own
`deepspeed.sequence.layer.DistributedAttention` (scatter heads, gather the
sequence; after attention the inverse), with the layer's own `Attention.core`
(our `moetrain.kernels.sparse_attention` backends: Triton on GPU, SDPA /
chunked on CPU) as the local attention over the whole sequence for Hq/P heads.
DeepSpeed's exchange carries what we need: `cu_seqlens` and the sparse settings
reach the kernel as keyword arguments, unchanged, because after the all-to-all
each rank sees the full sequence, so document masks, sliding windows, sinks and
MoBA need no change. The one gap is GQA with fewer KV heads than P: DeepSpeed
asserts n_kv_heads >= P, so we replicate each KV head P / n_kv_heads times
before the exchange (as Ulysses implementations do; the gradients of the copies
add up in the backward of repeat_interleave). No exchange of our own is needed.
RoPE is applied before the exchange, on the local shard, with global positions.

Gradients: every rank's loss is the unsharded value (local sums added over the
group by a differentiable all-reduce whose backward is the same sum, see
UlyssesShard.sum), so the gradients a group's ranks hold add up to P times the
full-sequence gradient. DeepSpeed then averages over all world ranks, giving
exactly the data-parallel mean of the groups' gradients. This is why the engine
is NOT handed parallel_state_sp as its `mpu`: that path reduces dense gradients
with a divisor of world/P but expert gradients (ZeRO-0, engine
_reduce_expert_gradients) with the plain data-parallel world, so expert and
dense gradients would disagree by a factor P under expert parallelism; it also
makes DeepSpeed's data-parallel world None for its batch arithmetic. With the
default groups ZeRO 0-3 partition over all ranks, which is DeepSpeed-Ulysses'
sequence-data-parallel group (SP ranks count as data-parallel ranks for ZeRO).

MoE layers route their own shard's tokens; balancing losses and router
statistics are summed over the group (moetrain.model.shard.SequenceShard), so
they equal the unsharded values; capacity is decided over the whole sequences.

Legend: B batch, S sequence (a rank holds S/P of it before the exchange, all of
it after), H heads (H/P per rank after the exchange), D head dim, P group size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from moetrain.model.attention import Attention
from moetrain.model.shard import SequenceShard


# --------------------------------------------------------------------------- group + shard
class _AllReduceSum(torch.autograd.Function):
    """Sum over `group`; the backward sums the gradients over the group as well (the adjoint
    of "every rank gets the sum"), so each rank may use the result as its own loss."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class UlyssesShard(SequenceShard):
    """This rank's shard `rank` of `size` of every sequence, the group holding the others."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return _AllReduceSum.apply(x, self.group)
        out = x.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out

    def gather_tokens(self, x_T: torch.Tensor, rows: int) -> torch.Tensor:
        parts = [torch.empty_like(x_T) for _ in range(self.size)]
        dist.all_gather(parts, x_T.detach().contiguous(), group=self.group)
        x = torch.stack([p.reshape(rows, -1, *x_T.shape[1:]) for p in parts], dim=1)  # [rows, P, S_loc, ...]
        return x.reshape(-1, *x_T.shape[1:])


def sp_group(size: int):
    """Collective on first use: this rank's SP group, DeepSpeed's parallel_state_sp groups
    (contiguous ranks), created once per process; deepspeed.comm wraps torch.distributed."""
    import deepspeed.comm as ds_comm
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as sps
    if not ds_comm.is_initialized():  # our own init_distributed went through DeepSpeed; plain torchrun did not
        ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
    if sps._SEQUENCE_PARALLEL_GROUP is None:
        sps.initialize_sequence_parallel(size)
    have = dist.get_world_size(sps.get_sequence_parallel_group())
    if have != size:
        raise ValueError(f"this process already has sequence-parallel groups of {have} ranks; "
                         f"deepspeed.sequence_parallel_size={size} needs a new process (one size per run)")
    return sps.get_sequence_parallel_group()


# --------------------------------------------------------------------------- attention
def check_heads(n_heads: int, n_kv_heads: int, sp: int) -> None:
    """Ulysses splits heads over the group: query heads must divide, KV heads divide or replicate."""
    if n_heads % sp:
        raise ValueError(f"model.n_heads={n_heads} is not divisible by deepspeed.sequence_parallel_size={sp}; "
                         f"Ulysses gives every rank n_heads/{sp} heads: choose a size that divides {n_heads}")
    if n_kv_heads % sp and sp % n_kv_heads:
        raise ValueError(f"model.n_kv_heads={n_kv_heads} and deepspeed.sequence_parallel_size={sp}: one must "
                         "divide the other (KV heads are split over the group, or replicated when fewer)")


class _LocalAttention(nn.Module):
    """DistributedAttention's local attention: [B, S, H/P, D] in and out, the layer's core in between."""

    def forward(self, q_BSHD, k_BSHD, v_BSHD, core=None, cu_seqlens=None):
        o = core(q_BSHD.transpose(1, 2), k_BSHD.transpose(1, 2), v_BSHD.transpose(1, 2), cu_seqlens)
        return o.transpose(1, 2)


class _UlyssesAttention:
    """Mixin on Attention (class swap, as moetrain/parallel/memory.py does: parameter names and
    isinstance checks stay): `core` runs inside DeepSpeed's all-to-all."""

    def core(self, q_BHSD, k_BHSD, v_BHSD, cu_seqlens=None):
        ulysses, sp = self.__dict__["_ulysses"], self.__dict__["_sp_size"]
        if k_BHSD.shape[1] < sp:  # GQA with fewer KV heads than ranks: one (copied) KV head per rank
            rep = sp // k_BHSD.shape[1]
            k_BHSD, v_BHSD = k_BHSD.repeat_interleave(rep, dim=1), v_BHSD.repeat_interleave(rep, dim=1)
        local = super().core
        o_BSHD = ulysses(q_BHSD.transpose(1, 2), k_BHSD.transpose(1, 2), v_BHSD.transpose(1, 2), 0, None,
                         core=local, cu_seqlens=cu_seqlens)
        return o_BSHD.transpose(1, 2)


def _swap_class(module: nn.Module, mixin: type) -> None:
    cls = module.__class__
    if not issubclass(cls, mixin):
        module.__class__ = type(f"{mixin.__name__.lstrip('_')}{cls.__name__}", (mixin, cls), {})


# --------------------------------------------------------------------------- applying SP
def apply_sequence_parallel(model: nn.Module, size: int) -> SequenceShard:
    """Collective (every rank of the world calls it). Shard every sequence over groups of
    `size` contiguous ranks: Ulysses attention in every layer, loss and MoE statistics
    over the group. size 1 changes nothing and returns the model's whole-sequence shard."""
    if size == 1:
        return model.seq_shard
    if not dist.is_initialized():
        raise ValueError(f"deepspeed.sequence_parallel_size={size} needs torch.distributed "
                         "(launch with deepspeed/torchrun)")
    cfg = model.cfg
    check_heads(cfg.n_heads, cfg.n_kv_heads, size)
    from deepspeed.sequence.layer import DistributedAttention
    group = sp_group(size)
    shard = UlyssesShard(group, dist.get_rank(group), size)
    ulysses = DistributedAttention(_LocalAttention(), group, scatter_idx=2, gather_idx=1)
    for m in model.modules():
        if isinstance(m, Attention):
            _swap_class(m, _UlyssesAttention)
            m.__dict__["_ulysses"], m.__dict__["_sp_size"] = ulysses, size  # not a submodule: no state
    model.set_sequence_shard(shard)
    return shard


def sequence_shard_of(model) -> SequenceShard:
    """The SequenceShard of a model, a DeepSpeed engine or a Trainer (size 1 without SP)."""
    for attr in ("model", "module"):
        if not hasattr(model, "seq_shard") and hasattr(model, attr):
            model = getattr(model, attr)
    return model.seq_shard


# --------------------------------------------------------------------------- batches
def shard_batch(batch: dict, rank: int, size: int) -> dict:
    """This rank's contiguous column shard of a batch {input_ids, labels, position_ids,
    cu_seqlens} of [B, S] tensors; positions become explicit global ones, cu_seqlens
    (the full sequence attention sees after the all-to-all) and other keys pass through."""
    if size == 1:
        return batch
    ids = batch["input_ids"]
    B, S = ids.shape
    if S % size:
        raise ValueError(f"sequence length {S} is not divisible by deepspeed.sequence_parallel_size={size}")
    n = S // size
    cols = slice(rank * n, (rank + 1) * n)
    out = dict(batch)
    if batch.get("position_ids") is None:
        out["position_ids"] = torch.arange(S, device=ids.device).expand(B, S)
    for key in ("input_ids", "labels", "position_ids"):
        if out.get(key) is not None:
            out[key] = out[key][:, cols].contiguous()
    return out


def gather_sequence(x: torch.Tensor, shard: SequenceShard, dim: int = 1) -> torch.Tensor:
    """No grad. The shards of x (split along `dim`, the sequence) concatenated in rank
    order: per-position values of the whole sequence on every rank of the group."""
    if shard.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(shard.size)]
    dist.all_gather(parts, x.detach().contiguous(), group=shard.group)
    return torch.cat(parts, dim=dim)


class SequenceShardedLoader:
    """A loader whose batches are whole sequences (the same on every rank of an SP group),
    cut to this rank's shard. State (and everything else) is the wrapped loader's."""

    def __init__(self, loader, rank: int, size: int):
        self.loader, self.sp_rank, self.sp_size = loader, rank, size

    def next_batch(self) -> dict:
        return shard_batch(self.loader.next_batch(), self.sp_rank, self.sp_size)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def __getattr__(self, name):
        return getattr(self.__dict__["loader"], name)


def check_resume_size(cfg, client: dict, ckpt_dir: str) -> None:
    """One sequence-parallel size per run: a checkpoint resumes only at the size it was trained with
    (the data order, batches per step and shards all follow from it)."""
    saved = ((client.get("config") or {}).get("deepspeed") or {}).get("sequence_parallel_size", 1)
    now = cfg.deepspeed.sequence_parallel_size
    if saved != now:
        raise ValueError(f"checkpoint {ckpt_dir} was trained with deepspeed.sequence_parallel_size={saved}, this "
                         f"launch sets {now}; one size per run: set it back to {saved} or start a new --run-dir")


def sharded_loader(loader, dims) -> object:
    """`loader` (built for dims.dp_rank of dims.dp) cut to this rank's shard when SP is on."""
    return loader if dims.sp == 1 else SequenceShardedLoader(loader, dims.sp_rank, dims.sp)
