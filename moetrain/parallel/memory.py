"""Memory tools for long sequences, applied to the plain model from the parallel seam.

- Activation checkpointing per block: whole blocks, only their attention, or only
  their MLP/MoE, on every n-th block (`memory.checkpoint`, `memory.checkpoint_every`).
- Offload: what a block still saves for backward goes to (pinned) CPU memory,
  so on the device only the residual stream between blocks stays (`memory.offload`).
- Tiled MLP/MoE: the feed-forward runs over `memory.mlp_tile_tokens`-token tiles,
  each recomputed in backward, so its intermediates are bounded by one tile. The
  router and the balancing losses still see every token at once: only the expert
  computation is tiled (a Dispatcher wrapper), never the routing.

Modules are changed in place by swapping their class for a subclass (as FSDP2's
fully_shard does) rather than wrapping them: parameter names, state_dict keys and
isinstance checks (ZeRO-3 leaf modules, moe_layers) stay exactly as they were.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from moetrain.model.moe import Dispatcher, Experts, MoE, SwiGLU

CHECKPOINT_MODES = ("none", "full", "attention", "mlp")


class _Checkpointed:
    """Mixin: the module's own forward, recomputed in backward."""

    def forward(self, *args, **kwargs):
        base = super().forward  # bound now: checkpoint calls it again in backward
        if not (self.training and torch.is_grad_enabled()):
            return base(*args, **kwargs)
        return checkpoint(base, *args, use_reentrant=False, **kwargs)


class _Offloaded:
    """Mixin: tensors the forward saves for backward live on CPU until backward.
    Inside a checkpointed region checkpoint's own (innermost) hooks win, so only
    what is not recomputed moves; the block's input, the residual stream, stays."""

    def forward(self, *args, **kwargs):
        with offload_context(args[0].device if args and torch.is_tensor(args[0]) else None):
            return super().forward(*args, **kwargs)


class _TiledMLP:
    """Mixin for a dense SwiGLU: run it over token tiles, each recomputed in backward."""

    tile_tokens: int

    def forward(self, x):
        x_Td = x.reshape(-1, x.shape[-1])
        return tiled(super().forward, self.tile_tokens, x_Td).view(*x.shape[:-1], -1)


def offload_context(device):
    """save_on_cpu with pinned buffers on CUDA; on CPU the tensors are already there."""
    if device is not None and device.type == "cuda":
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()


def tiled(fn, tile: int, *tensors_T):
    """cat over tiles of fn(*row slices), each tile recomputed in backward: at most one
    tile's intermediates are alive at a time, in forward and in backward."""
    T = tensors_T[0].shape[0]
    if T <= tile:
        return fn(*tensors_T)
    grad = torch.is_grad_enabled()
    outs = []
    # split, not t[s:s + tile]: the backward of each slice is a zero-filled tensor of the
    # whole input, added up tile by tile (O(T^2 / tile) memory traffic: 16.9 s against 0.29 s
    # for one [131072, 256] input, 1 thread); split's backward concatenates the tiles once.
    for part in zip(*(t.split(tile) for t in tensors_T)):
        outs.append(checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part))
    return torch.cat(outs)


class TiledExperts(Dispatcher):
    """Runs `inner` over token tiles of already-routed assignments (routing, capacity
    and balancing happened on all tokens); counts are reduced as `inner` reduces them.
    Under expert parallelism every rank has the same token count, so the same number
    of tiles and of all-to-alls."""

    def __init__(self, inner: Dispatcher, tile_tokens: int):
        self.inner, self.tile_tokens = inner, tile_tokens

    def run_experts(self, experts: Experts, x_Td, weights_TK, experts_TK):
        def run(x, w, e):
            return self.inner.run_experts(experts, x, w, e)
        return tiled(run, self.tile_tokens, x_Td, weights_TK, experts_TK)

    def reduce_counts(self, counts_E):
        return self.inner.reduce_counts(counts_E)


def _swap_class(module: nn.Module, mixin: type) -> None:
    cls = module.__class__
    if issubclass(cls, mixin):
        return  # applied already (parallelize called twice on one model)
    module.__class__ = type(f"{mixin.__name__.lstrip('_')}{cls.__name__}", (mixin, cls), {})


def checkpoint_targets(model: nn.Module, mode: str, every: int) -> list:
    """The modules `mode` recomputes: blocks 0, n, 2n, ... (their attn / mlp for selective)."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"memory.checkpoint='{mode}' is not one of {', '.join(CHECKPOINT_MODES)}")
    if mode == "none":
        return []
    blocks = [b for i, b in enumerate(model.layers) if i % every == 0]
    return [{"full": b, "attention": b.attn, "mlp": b.mlp}[mode] for b in blocks]


def resolve_checkpoint_mode(cfg) -> str:
    """memory.checkpoint, or `full` for the older model.activation_checkpointing: true."""
    mode = cfg.memory.checkpoint
    return "full" if mode == "none" and cfg.model.activation_checkpointing else mode


def apply_memory(model: nn.Module, cfg) -> None:
    """Apply cfg.memory (checkpointing, offload, tiling) to the plain model, in place.
    Call after the experts' dispatchers are set (expert parallelism), so tiling wraps them."""
    mem = cfg.memory
    apply_checkpointing(model, resolve_checkpoint_mode(cfg), mem.checkpoint_every)
    if mem.offload:
        for block in model.layers:
            _swap_class(block, _Offloaded)
    if mem.mlp_tile_tokens:
        apply_tiling(model, mem.mlp_tile_tokens)


def apply_checkpointing(model: nn.Module, mode: str = "full", every: int = 1) -> None:
    """Recompute the modules checkpoint_targets names in backward (training only)."""
    for m in checkpoint_targets(model, mode, every):
        _swap_class(m, _Checkpointed)


def apply_tiling(model: nn.Module, tile_tokens: int) -> None:
    for m in list(model.modules()):
        if isinstance(m, MoE) and not isinstance(m.dispatcher, TiledExperts):
            m.set_dispatcher(TiledExperts(m.dispatcher, tile_tokens))
        elif isinstance(m, SwiGLU):  # dense blocks and shared experts
            _swap_class(m, _TiledMLP)
            m.tile_tokens = tile_tokens
