"""Muon with the Moonlight recipe (Liu et al. 2025, "Muon is Scalable for LLM Training").

Hidden 2-D matrices: Nesterov momentum, orthogonalised by a quintic Newton-Schulz
iteration (Keller Jordan's coefficients), scaled by 0.2 * sqrt(max(rows, cols)) so
that the update RMS matches AdamW's (~0.2) and AdamW's learning rate carries over;
decoupled weight decay. A stacked expert weight `[E, R, C]` is E separate matrices:
the iteration runs batched over the leading dim. Everything else (embeddings,
norms, router, biases, LM head) gets AdamW inside the same optimizer, chosen per
param group by its `use_muon` flag. Under ZeRO-1/2 the groups hold flat partitions;
muon_zero.py gathers each matrix for the iteration.
"""
from __future__ import annotations

import math

import torch

# Quintic coefficients (Keller Jordan): maximise the slope at 0; singular values
# converge into a band around 1 (roughly [0.7, 1.2]) rather than to exactly 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MOONLIGHT_RMS = 0.2


def newton_schulz(G: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U V^T of G (`[..., R, C]`, batched over leading dims).
    fp32 on CPU (bf16 matmuls are very slow there), bf16 on GPU."""
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def muon_scale(shape: torch.Size) -> float:
    """0.2 * sqrt(max(rows, cols)) of one matrix: an orthogonal R x C matrix has RMS
    1/sqrt(max(R, C)), so this sets the update RMS to 0.2, like AdamW's."""
    return MOONLIGHT_RMS * math.sqrt(max(shape[-2], shape[-1]))


class MoonlightMuon(torch.optim.Optimizer):
    """One optimizer, two rules. Groups with `use_muon=True` hold matrices (2-D or
    stacked 3-D experts); the others are AdamW. Defaults apply to both."""

    def __init__(self, param_groups, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = NS_STEPS, betas=(0.9, 0.95), eps: float = 1e-8):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, betas=tuple(betas), eps=eps, use_muon=False)
        super().__init__(param_groups, defaults)
        self.zero_layouts: dict = {}  # id(flat partition) -> FlatLayout under ZeRO-1/2 (muon_zero.py)
        for g in self.param_groups:
            if g["use_muon"]:
                bad = [tuple(p.shape) for p in g["params"] if p.dim() not in (2, 3)]
                if bad:
                    raise ValueError(f"Muon groups take 2-D matrices or stacked [E, R, C] experts, got shapes "
                                     f"{bad}: put them in a group with use_muon=False")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if g["use_muon"]:
                    self._muon_step(p, g, self.zero_layouts.get(id(p)) if p.dim() == 1 else None)
                else:
                    self._adamw_step(p, g)
        return loss

    def _muon_step(self, p: torch.Tensor, g: dict, flat_layout=None) -> None:
        """`p` a matrix, or under ZeRO-1/2 a flat partition of matrices (muon_zero.py)."""
        if p.dim() == 1 and flat_layout is None:
            raise ValueError("MoonlightMuon got a flat ZeRO partition without its layout: call "
                             "moetrain.optim.muon_zero.attach_zero_layouts(engine.optimizer) after deepspeed.initialize")
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf, mu = state["momentum_buffer"], g["momentum"]
        buf.mul_(mu).add_(p.grad)
        update = p.grad.add(buf, alpha=mu) if g["nesterov"] else buf
        if flat_layout is not None:
            from moetrain.optim.muon_zero import orthogonalised_partition
            update = orthogonalised_partition(update, flat_layout, g["ns_steps"])
        else:
            update = newton_schulz(update, g["ns_steps"]) * muon_scale(p.shape)
        p.mul_(1.0 - g["lr"] * g["weight_decay"])
        p.add_(update, alpha=-g["lr"])

    def _adamw_step(self, p: torch.Tensor, g: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            # A float tensor, like torch.optim.AdamW's, so that it checkpoints the same way.
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = state["step"].to(p.device)  # bias corrections as tensors: no host sync per parameter
        (b1, b2), m, v = g["betas"], state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(p.grad, 1.0 - b1)
        v.mul_(b2).addcmul_(p.grad, p.grad, value=1.0 - b2)
        denom = (v / (1.0 - b2 ** t)).sqrt_().add_(g["eps"])
        p.mul_(1.0 - g["lr"] * g["weight_decay"])
        p.addcdiv_(m / (1.0 - b1 ** t), denom, value=-g["lr"])
