"""Which parameters Muon orthogonalises, and the optimizer built from our config."""
from __future__ import annotations

import torch

# Leaf-module names whose 2-D weights stay on AdamW although they are matrices:
# the token embedding, the LM head, and the router (a tiny classifier, not a hidden map).
_ADAMW_MATRICES = ("embed", "lm_head", "router", "shared_gate")


def is_muon_param(name: str, p: torch.nn.Parameter) -> bool:
    """Hidden matrices (2-D) and stacked expert matrices (3-D `[E, R, C]`)."""
    return p.dim() in (2, 3) and not any(part in _ADAMW_MATRICES for part in name.split("."))


def muon_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Three groups: Muon matrices (decayed), AdamW matrices (decayed), AdamW
    vectors (norm gains, biases: no decay)."""
    muon, adam_decay, adam_plain = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_muon_param(name, p):
            muon.append(p)
        else:
            (adam_plain if p.dim() < 2 else adam_decay).append(p)
    groups = [{"params": muon, "weight_decay": weight_decay, "use_muon": True},
              {"params": adam_decay, "weight_decay": weight_decay, "use_muon": False},
              {"params": adam_plain, "weight_decay": 0.0, "use_muon": False}]
    return [g for g in groups if g["params"]]

