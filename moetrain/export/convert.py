"""Tensor names and layouts: our state dict <-> transformers checkpoints.

We write (and read) the per-expert layout that published Mixtral / Qwen / GLM MoE
checkpoints use and serving engines (vLLM) load: `experts.{e}.w1/w3/w2`
(Mixtral, under `block_sparse_moe`) or `experts.{e}.gate_proj/up_proj/down_proj`
(Qwen). transformers 5.x fuses them into `gate_up_proj` on load and splits them
again on save; the importer also accepts that fused layout.

Legend: E experts, F expert width, d model width. Ours: gate_EFd, up_EFd [E,F,d],
down_EdF [E,d,F], i.e. per expert exactly nn.Linear weights.
"""
from __future__ import annotations

import torch

from moetrain.config import ModelConfig
from moetrain.export.targets import Plan

_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen": ("gate_proj", "up_proj", "down_proj")}
_OURS_EXPERTS = ("gate_EFd", "up_EFd", "down_EdF")


def is_moe_layer(mcfg: ModelConfig, i: int) -> bool:
    return mcfg.moe.n_experts > 0 and i >= mcfg.moe.first_k_dense


def _moe_prefix(arch: str) -> str:
    return "block_sparse_moe" if arch == "mixtral" else "mlp"


def _expert_names(arch: str) -> tuple:
    return _EXPERT_NAMES["mixtral" if arch == "mixtral" else "qwen"]


def one_to_one(mcfg: ModelConfig, arch: str) -> list:
    """(our name, HF name) for every tensor that maps unchanged (experts excluded)."""
    pairs = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if not mcfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    for i in range(mcfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(ours + "attn_norm.weight", hf + "input_layernorm.weight"),
                  (ours + "mlp_norm.weight", hf + "post_attention_layernorm.weight")]
        pairs += [(f"{ours}attn.{p}.weight", f"{hf}self_attn.{p}.weight") for p in ("q_proj", "k_proj", "v_proj",
                                                                                     "o_proj")]
        if mcfg.qk_norm:
            pairs += [(f"{ours}attn.{n}.weight", f"{hf}self_attn.{n}.weight") for n in ("q_norm", "k_norm")]
        if not is_moe_layer(mcfg, i):
            pairs += [(f"{ours}mlp.{p}.weight", f"{hf}mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")]
            continue
        pairs.append((ours + "mlp.router.gate.weight", f"{hf}{_moe_prefix(arch)}.gate.weight"))
        if mcfg.moe.n_shared_experts:
            shared = "shared_experts" if arch == "glm4_moe" else "shared_expert"
            pairs += [(f"{ours}mlp.shared_experts.{p}.weight", f"{hf}mlp.{shared}.{p}.weight")
                      for p in ("gate_proj", "up_proj", "down_proj")]
            if mcfg.moe.shared_expert_gate:
                pairs.append((ours + "mlp.shared_gate.weight", hf + "mlp.shared_expert_gate.weight"))
    return pairs


def _own(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy: safetensors refuses views that share storage."""
    return t.detach().to(dtype=dtype, copy=True).contiguous()


def to_hf_state_dict(sd: dict, mcfg: ModelConfig, plan: Plan, dtype: torch.dtype = torch.float32) -> dict:
    """Our (consolidated, full) state dict -> HF tensors for `plan.arch`."""
    arch, m = plan.arch, mcfg.moe
    out = {hf: _own(sd[ours], dtype) for ours, hf in one_to_one(mcfg, arch)}
    for i in range(mcfg.n_layers):
        hf = f"model.layers.{i}."
        if arch == "qwen2_moe":  # Qwen2-MoE readers (vLLM, transformers 4.x) always build q/k/v biases
            for p, n in (("q_proj", mcfg.n_heads), ("k_proj", mcfg.n_kv_heads), ("v_proj", mcfg.n_kv_heads)):
                out[f"{hf}self_attn.{p}.bias"] = torch.zeros(n * _head_dim(mcfg), dtype=dtype)
        if not is_moe_layer(mcfg, i):
            continue
        stacks = [sd[f"layers.{i}.mlp.experts.{n}"] for n in _OURS_EXPERTS]
        if arch == "glm4_moe":  # routed_scaling_factor is in its config; the bias is a tensor of its own
            bias = sd.get(f"layers.{i}.mlp.router.expert_bias")
            out[f"{hf}mlp.gate.e_score_correction_bias"] = (_own(bias, torch.float32) if bias is not None
                                                             else torch.zeros(m.n_experts, dtype=torch.float32))
        elif m.routed_scaling_factor != 1.0:  # y = s * sum_k w_k E_k(x): fold s into every down projection
            stacks[2] = stacks[2] * m.routed_scaling_factor
        for e in range(m.n_experts):
            for name, stack in zip(_expert_names(arch), stacks):
                out[f"{hf}{_moe_prefix(arch)}.experts.{e}.{name}.weight"] = _own(stack[e], dtype)
        if arch == "qwen2_moe":
            _qwen2_shared(out, sd, mcfg, i, dtype)
    return out


def _qwen2_shared(out: dict, sd: dict, mcfg: ModelConfig, i: int, dtype) -> None:
    """Qwen2-MoE's shared expert is sigmoid-gated. Ungated ones become gate weight 0
    (sigmoid = 1/2) and down x 2: both factors are powers of two, so the product is
    bit-exact. No shared experts: no tensors at all, with shared_expert_intermediate_size
    0 in config.json (vLLM then builds no shared expert and refuses any tensor for one;
    transformers builds an empty one whose output is 0 whatever its gate)."""
    hf, d = f"model.layers.{i}.mlp.", mcfg.hidden_size
    if mcfg.moe.n_shared_experts and not mcfg.moe.shared_expert_gate:
        out[hf + "shared_expert.down_proj.weight"] = _own(sd[f"layers.{i}.mlp.shared_experts.down_proj.weight"] * 2,
                                                          dtype)
        out[hf + "shared_expert_gate.weight"] = torch.zeros(1, d, dtype=dtype)


def _head_dim(mcfg: ModelConfig) -> int:
    return mcfg.head_dim or mcfg.hidden_size // mcfg.n_heads


# --------------------------------------------------------------------------- import direction
def _hf_expert_stack(hf: dict, prefix: str, arch: str, n_experts: int) -> list:
    """[gate_EFd, up_EFd, down_EdF] from per-expert tensors or transformers 5.x fused ones."""
    fused = f"{prefix}.experts.gate_up_proj"
    if fused in hf:  # [E, 2F, d] = cat(gate, up) along F; down_proj [E, d, F]
        gate, up = hf[fused].chunk(2, dim=1)
        return [gate.contiguous(), up.contiguous(), hf[f"{prefix}.experts.down_proj"]]
    names = _expert_names(arch)
    return [torch.stack([hf[f"{prefix}.experts.{e}.{n}.weight"] for e in range(n_experts)]) for n in names]


class _Reads(dict):
    """A dict that remembers which keys were read, to find tensors nothing consumed."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def from_hf_state_dict(hf: dict, mcfg: ModelConfig, arch: str) -> tuple[dict, dict]:
    """HF tensors -> (our state dict in float32, the HF tensors left unused).
    `mcfg` comes from hf_config.model_config."""
    hf = _Reads(_legacy_names(hf, arch))
    sd = {ours: hf[name].float() for ours, name in one_to_one(mcfg, arch)}
    if mcfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    for i in range(mcfg.n_layers):
        if is_moe_layer(mcfg, i):
            stacks = _hf_expert_stack(hf, f"model.layers.{i}.{_moe_prefix(arch)}", arch, mcfg.moe.n_experts)
            for name, t in zip(_OURS_EXPERTS, stacks):
                sd[f"layers.{i}.mlp.experts.{name}"] = t.float().contiguous()
            if arch == "glm4_moe" and mcfg.moe.bias_update_speed > 0:
                bias = hf[f"model.layers.{i}.mlp.gate.e_score_correction_bias"]
                sd[f"layers.{i}.mlp.router.expert_bias"] = bias.float()
    return sd, {k: dict.__getitem__(hf, k) for k in sorted(set(hf) - hf.read)}


def _legacy_names(hf: dict, arch: str) -> dict:
    """transformers 5.x renames Mixtral's `block_sparse_moe` to `mlp` in memory; accept both."""
    if arch != "mixtral" or any(".block_sparse_moe." in k for k in hf):
        return hf
    return {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in hf.items()}
