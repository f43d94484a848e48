"""Pure-PyTorch token permute / unpermute for MoE dispatch (the reference).

Legend: T tokens, K top-k slots, S permuted rows (token, slot assignments
sorted by expert; the MoE layer puts dropped slots last), d width.

Index conventions shared with the Triton path:
  src_S   flat slot index t*K + k of the assignment in permuted row s
  pos_TK  permuted row of slot (t, k), or -1 when that slot was dropped
so that src_S[pos_TK[t, k]] == t*K + k for every kept slot. Rows no kept
slot points at are never read back (their values may be anything), and their
gradients must be zero (the MoE layer zeroes them; the Triton permute
backward ignores them).
"""
from __future__ import annotations

import torch


def permute(x_Td: torch.Tensor, src_S: torch.Tensor, pos_TK: torch.Tensor) -> torch.Tensor:
    """x_Sd[s] = x_Td[src_S[s] // K] (gather; its gradient is a scatter-add over slots)."""
    return x_Td[src_S // pos_TK.shape[1]]


def unpermute(y_Sd: torch.Tensor, src_S: torch.Tensor, pos_TK: torch.Tensor,
              w_TK: torch.Tensor | None = None) -> torch.Tensor:
    """out_Td[t] = sum_k w_TK[t, k] * y_Sd[pos_TK[t, k]] over kept slots (weighted scatter-add,
    written as a per-token gather so it is deterministic)."""
    T, d = pos_TK.shape[0], y_Sd.shape[1]
    if y_Sd.shape[0] == 0:  # every slot dropped
        return y_Sd.new_zeros(T, d)
    kept_TK = pos_TK >= 0
    y_TKd = y_Sd[pos_TK.clamp_min(0)].float()  # accumulate in fp32 like the kernel
    scale_TK = kept_TK.float() if w_TK is None else w_TK.float() * kept_TK
    return (y_TKd * scale_TK[..., None]).sum(dim=1).to(y_Sd.dtype)
