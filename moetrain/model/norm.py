"""RMSNorm, computed in fp32 like transformers' Llama/Mixtral/Qwen norms.

The forward is the same expression as theirs (so exported logits match to the bit); the
backward is written out so that autograd keeps only the input and the per-row 1/rms, not
the fp32 normalised copy that the plain graph saves: one [tokens, d] tensor less per norm
for the backward, which is what long sequences run out of (every block has two norms).
"""
import torch
import torch.nn as nn


def _normalized(x, eps: float):
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h * rstd, rstd


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        n, rstd = _normalized(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * n.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight, rstd = ctx.saved_tensors
        n = x.float() * rstd
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (gy * n.to(x.dtype)).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            # rstd * (gn - n * mean(gn * n)), in place on the two [tokens, d] temporaries
            # (n, gn): two of them alive at a time, not five.
            gn = (gy * weight).float()  # d/d(normalised)
            dot = (gn.unsqueeze(-2) @ n.unsqueeze(-1)).squeeze(-1) / n.shape[-1]  # mean(gn * n), no product kept
            gx = gn.sub_(n.mul_(dot)).mul_(rstd).to(x.dtype)
        return gx, gw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return self.weight * _normalized(x, self.eps)[0].to(x.dtype)
