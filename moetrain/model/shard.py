"""SequenceShard: which part of its sequences this rank's tokens are.

The model is written for whole sequences; under sequence parallelism
(moetrain/parallel/sequence.py) each rank holds the contiguous columns
[rank * S, (rank + 1) * S) of every row of a longer sequence. Everything that
is a statistic over the whole sequence (the LM loss normaliser, balancing
losses, router statistics, RoPE positions) asks this object instead of assuming
its tokens are all there is. The default here is the identity: one rank, whole
sequences, nothing to reduce. Parallel code hands a subclass in from outside
(MoETransformer.set_sequence_shard); the model itself never imports
torch.distributed.
"""
from __future__ import annotations

import torch


class SequenceShard:
    rank: int = 0
    size: int = 1

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks holding the other shards of these sequences. Differentiable:
        the backward sums the incoming gradients the same way (the adjoint), so every rank can
        use the result as its own loss."""
        return x

    def gather_tokens(self, x_T: torch.Tensor, rows: int) -> torch.Tensor:
        """No grad. This rank's tokens x [rows * S_local, ...] -> the whole sequences' tokens
        [rows * S_local * size, ...] in the order the unsharded model sees them (row-major)."""
        return x_T

    def local_tokens(self, x_T: torch.Tensor, rows: int) -> torch.Tensor:
        """The inverse of gather_tokens: this rank's part of whole-sequence tokens [rows * S, ...]."""
        if self.size == 1:
            return x_T
        x = x_T.reshape(rows, self.size, -1, *x_T.shape[1:])[:, self.rank]
        return x.reshape(-1, *x_T.shape[1:])

    def token_mean(self, x_T: torch.Tensor) -> torch.Tensor:
        """Mean over dim 0 across all shards (equal shard sizes); x.mean(0) on one rank."""
        if self.size == 1:
            return x_T.mean(dim=0)
        return self.sum(x_T.sum(dim=0)) / (x_T.shape[0] * self.size)
