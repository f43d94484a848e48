"""Which transformers architecture represents a trained model exactly.

Mapping (our feature -> Mixtral | Qwen2-MoE | Qwen3-MoE), checked in that
order; the first target that represents every feature wins. A sigmoid router
(DeepSeek-V3-style routing) goes to Glm4Moe instead, see GLM4_MOE below:

| our feature                                  | Mixtral | Qwen2-MoE              | Qwen3-MoE       |
|----------------------------------------------|---------|------------------------|-----------------|
| routed SwiGLU experts, softmax top-k router  | yes     | yes                    | yes             |
| norm_topk_prob=false                         | no      | yes                    | yes             |
| softmax_before_topk=false (== renormalised)  | yes     | yes (norm_topk_prob)   | yes             |
| routed_scaling_factor != 1                   | folded into the experts' down projections (all) |
| first_k_dense dense SwiGLU layers            | no      | mlp_only_layers        | mlp_only_layers |
| shared experts, sigmoid-gated                | no      | shared_expert(_gate)   | no              |
| shared experts, ungated                      | no      | gate=0, down x2 (exact)| no              |
| q/k RMSNorm (qk_norm)                        | no      | no                     | required        |
| all layers full attention                    | yes     | yes                    | yes             |
| all layers sliding window W                  | yes     | yes                    | yes             |
| per-layer sliding/full mix                   | no      | layer_types            | no              |
| RoPE none/linear/ntk/dynamic/yarn/llama3/longrope | rope_parameters + rope_scaling (all)   |
| tied embeddings                              | tie_word_embeddings (all)                           |

Never exact in any target (refused; --allow-approx exports the nearest form):
MoBA layers (-> full attention), sink tokens (-> full attention on those layers),
capacity_factor token dropping (-> dropless), group-limited routing (-> plain
top-k), a non-zero aux-loss-free selection bias (-> no bias), and q/k norm with a
per-layer sliding/full mix (-> full attention everywhere). Refused even with
--allow-approx: q/k norm together with shared experts under a softmax router.

GLM4_MOE (transformers' Glm4MoeForCausalLM, served by vLLM as well) is the target
for model.moe.router=sigmoid: sigmoid scores, selection on score + bias
(e_score_correction_bias = our expert_bias; zeros without bias_update_speed),
group-limited routing (n_group / topk_group, groups ranked by their two best
scores, as ours), norm_topk_prob (+1e-20 as ours), routed_scaling_factor,
first_k_dense_replace, ungated shared experts of width n_shared_experts x F,
optional q/k RMSNorm (use_qk_norm), partial_rotary_factor=1. It has no sliding
windows, no shared-expert gate and always at least one shared expert: those are
refused (one line each).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from moetrain.config import AttentionConfig, ModelConfig
from moetrain.model.attention import layer_kind

ARCHS = {  # our name -> (model_type, architectures entry)
    "mixtral": ("mixtral", "MixtralForCausalLM"),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "glm4_moe": ("glm4_moe", "Glm4MoeForCausalLM"),
}


class ExportError(ValueError):
    """The model cannot be exported as asked; the message is one line naming the feature."""


@dataclass
class Plan:
    arch: str                        # key of ARCHS
    layer_kinds: list                # per layer: "full" | "sliding" (after approximations)
    window: int                      # sliding window W (only used when a layer is sliding)
    approximations: list = field(default_factory=list)  # human-readable, empty when exact

    @property
    def exact(self) -> bool:
        return not self.approximations


def layer_kinds(mcfg: ModelConfig, attn: AttentionConfig) -> list:
    return [layer_kind(attn, i, mcfg.n_layers) for i in range(mcfg.n_layers)]


def _bias_nonzero(state_dict: Optional[dict]) -> bool:
    if not state_dict:
        return False
    return any(k.endswith("router.expert_bias") and bool(torch.any(v != 0)) for k, v in state_dict.items())


def _inexact_features(mcfg: ModelConfig, attn: AttentionConfig, kinds: list, state_dict) -> list:
    """(feature, approximation) pairs that no target represents (routing ones: no softmax target)."""
    m, out = mcfg.moe, []
    if "moba" in kinds:
        out.append(("MoBA attention layers", "full attention on the MoBA layers"))
    if attn.sink_tokens and any(k in ("sliding", "moba") for k in kinds):
        out.append((f"attention sink tokens (sink_tokens={attn.sink_tokens})",
                    "full attention on the sliding/MoBA layers"))
    if m.n_experts:
        if m.capacity_factor is not None:
            out.append((f"token dropping (moe.capacity_factor={m.capacity_factor})", "dropless routing"))
        if m.router == "sigmoid":  # Glm4Moe has group-limited routing and the bias
            return out
        if m.n_groups > 1:
            out.append((f"group-limited routing (moe.n_groups={m.n_groups})", "plain top-k over all experts"))
        if _bias_nonzero(state_dict):
            out.append(("aux-loss-free routing bias (moe.bias_update_speed)", "top-k without the bias"))
    return out


def _fits(arch: str, mcfg: ModelConfig, kinds: list) -> bool:
    """Whether `arch` represents this model exactly (the table in the module docstring)."""
    m = mcfg.moe
    uniform = len(set(kinds)) == 1  # one attention pattern for every layer
    if arch == "mixtral":  # every layer MoE, always renormalised top-k, nothing extra
        renorm = m.norm_topk_prob or not m.softmax_before_topk
        return (m.n_experts > 0 and not mcfg.qk_norm and not m.n_shared_experts and not m.first_k_dense
                and renorm and uniform)
    if arch == "qwen3_moe":  # q/k norm is built in, so it must be there
        return mcfg.qk_norm and not m.n_shared_experts and uniform
    return not mcfg.qk_norm  # qwen2_moe: the rest, per-layer layer_types included


def _no_target_message(mcfg: ModelConfig) -> str:
    if mcfg.moe.n_shared_experts:
        return ("model.qk_norm together with shared experts: no target architecture has both "
                "(Qwen3-MoE has q/k norm but no shared experts, Qwen2-MoE the reverse)")
    return ("model.qk_norm together with a per-layer sliding/full attention mix: no target architecture has both "
            "(Qwen3-MoE has q/k norm but one attention pattern for all layers); --allow-approx exports full "
            "attention everywhere")


def plan_export(mcfg: ModelConfig, attn: AttentionConfig, state_dict: Optional[dict] = None,
                allow_approx: bool = False) -> Plan:
    """Choose the target for a model whose final-stage attention is `attn`; raises
    ExportError (one line) when the model is not exactly representable and
    `allow_approx` is off, or when no target comes close."""
    kinds = layer_kinds(mcfg, attn)
    inexact = _inexact_features(mcfg, attn, kinds, state_dict)
    sigmoid = bool(mcfg.moe.n_experts) and mcfg.moe.router == "sigmoid"
    targets = "Glm4Moe" if sigmoid else "Mixtral, Qwen2-MoE or Qwen3-MoE"
    if inexact and not allow_approx:
        raise ExportError(f"{inexact[0][0]} cannot be represented exactly by {targets}; "
                          f"rerun with --allow-approx to export with {inexact[0][1]}")
    approx = [f"{feat} -> {instead}" for feat, instead in inexact]
    sinks = bool(attn.sink_tokens)
    kinds = ["full" if k == "moba" or (sinks and k == "sliding") else k for k in kinds]
    if sigmoid:
        _check_glm4(mcfg, kinds)
        return Plan("glm4_moe", kinds, attn.window, approx)
    for arch in ARCHS:  # in order of preference: the plainest architecture that fits
        if _fits(arch, mcfg, kinds):
            return Plan(arch, kinds, attn.window, approx)
    if mcfg.qk_norm and not mcfg.moe.n_shared_experts and allow_approx:
        approx.append("per-layer sliding/full attention with q/k norm -> full attention everywhere")
        return Plan("qwen3_moe", ["full"] * len(kinds), attn.window, approx)
    raise ExportError(_no_target_message(mcfg))


def _check_glm4(mcfg: ModelConfig, kinds: list) -> None:
    """Glm4Moe represents a sigmoid-routed model exactly or not at all (module docstring)."""
    m, f = mcfg.moe, mcfg.moe.intermediate_size or mcfg.intermediate_size
    where = "the sigmoid router's only target, Glm4Moe,"
    if "sliding" in kinds:
        raise ExportError(f"sliding-window attention layers: {where} has full attention only; train the "
                          "sigmoid-routed model with model.attention.layer_types=[full]")
    if not m.n_shared_experts:
        raise ExportError(f"model.moe.n_shared_experts=0: {where} always has shared experts; "
                          "set model.moe.n_shared_experts >= 1")
    if m.shared_expert_gate:
        raise ExportError(f"model.moe.shared_expert_gate=true: {where} has ungated shared experts; "
                          "set model.moe.shared_expert_gate=false")
    if m.shared_expert_intermediate_size not in (None, m.n_shared_experts * f):
        raise ExportError(f"model.moe.shared_expert_intermediate_size={m.shared_expert_intermediate_size}: {where} "
                          f"needs n_shared_experts x expert width = {m.n_shared_experts * f}; leave it unset")
    if m.n_groups > 1 and m.n_experts // m.n_groups < 2:
        raise ExportError(f"model.moe.n_groups={m.n_groups} leaves one expert per group: {where} ranks a group by "
                          "its two best experts; use n_groups <= n_experts / 2")


def approx_attention(attn: AttentionConfig, plan: Plan) -> AttentionConfig:
    """The attention config the exported model actually implements (explicit per layer)."""
    return dataclasses.replace(attn, layer_types=list(plan.layer_kinds), full_attention_last_n=0, sink_tokens=0)


@torch.no_grad()
def apply_approximations(model, plan: Plan, attn: AttentionConfig) -> None:
    """Turn our model into the servable form in place (a no-op for exact plans)."""
    if plan.exact:
        return
    model.set_attention(approx_attention(attn, plan))
    from moetrain.model.moe import moe_layers
    for moe in moe_layers(model):
        moe.capacity_factor = None
        if plan.arch == "glm4_moe":  # represents group-limited routing and the bias exactly
            continue
        moe.router.n_groups = 1
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.zero_()
