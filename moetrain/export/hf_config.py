"""config.json for the exported folder, and our ModelConfig back from one (import).

RoPE keys come from the strategy's own `to_hf()` and are applied last: dynamic
NTK needs `max_position_embeddings` to be the original context, not the trained one.
"""
from __future__ import annotations

from typing import Optional

from moetrain.config import AttentionConfig, ModelConfig, MoEConfig, RopeConfig
from moetrain.export.targets import ARCHS, ExportError, Plan

_SLIDING, _FULL = "sliding_attention", "full_attention"


def hf_config_dict(mcfg: ModelConfig, rope_hf: dict, plan: Plan, special_ids: dict, dtype: str) -> dict:
    """The config.json contents for `plan.arch` (`rope_hf` = RotaryEmbedding.rope.to_hf())."""
    m = mcfg.moe
    f = m.intermediate_size or mcfg.intermediate_size
    model_type, cls = ARCHS[plan.arch]
    c = {
        "architectures": [cls], "model_type": model_type, "vocab_size": mcfg.vocab_size,
        "hidden_size": mcfg.hidden_size, "num_hidden_layers": mcfg.n_layers,
        "num_attention_heads": mcfg.n_heads, "num_key_value_heads": mcfg.n_kv_heads,
        "head_dim": mcfg.head_dim or mcfg.hidden_size // mcfg.n_heads, "hidden_act": "silu",
        "rms_norm_eps": mcfg.rms_norm_eps, "tie_word_embeddings": mcfg.tie_embeddings,
        "initializer_range": mcfg.init_std, "attention_dropout": 0.0, "use_cache": True,
        "num_experts_per_tok": m.top_k, "router_aux_loss_coef": m.aux_loss_coef, "output_router_logits": False,
        **special_ids,
    }
    sliding = [k == "sliding" for k in plan.layer_kinds]
    if plan.arch == "glm4_moe":
        c.update(_glm4_fields(mcfg))
        c["dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        return _full_rotary(c, rope_hf)
    if plan.arch == "mixtral":
        c.update(intermediate_size=f, num_local_experts=m.n_experts, router_jitter_noise=0.0,
                 sliding_window=plan.window if all(sliding) else None)
    else:
        c.update(intermediate_size=mcfg.intermediate_size, moe_intermediate_size=f, num_experts=m.n_experts,
                 norm_topk_prob=bool(m.norm_topk_prob or not m.softmax_before_topk), decoder_sparse_step=1,
                 mlp_only_layers=list(range(m.first_k_dense)) if m.n_experts else [],
                 use_sliding_window=any(sliding), sliding_window=plan.window if any(sliding) else None,
                 max_window_layers=mcfg.n_layers)
    if plan.arch == "qwen2_moe":
        c.update(qkv_bias=True, layer_types=[_SLIDING if s else _FULL for s in sliding],
                 shared_expert_intermediate_size=_shared_width(mcfg) if m.n_shared_experts else 0)
    if plan.arch == "qwen3_moe":
        c.update(attention_bias=False)
    c["dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    c.update(rope_hf)  # last (see module docstring)
    return c


def _glm4_fields(mcfg: ModelConfig) -> dict:
    m = mcfg.moe
    return dict(intermediate_size=mcfg.intermediate_size, moe_intermediate_size=m.intermediate_size or
                mcfg.intermediate_size, n_routed_experts=m.n_experts, n_shared_experts=m.n_shared_experts,
                first_k_dense_replace=m.first_k_dense, n_group=m.n_groups, topk_group=m.topk_groups,
                norm_topk_prob=bool(m.norm_topk_prob), routed_scaling_factor=float(m.routed_scaling_factor),
                use_qk_norm=bool(mcfg.qk_norm), attention_bias=False, num_nextn_predict_layers=0)


def _full_rotary(c: dict, rope_hf: dict) -> dict:
    """Glm4Moe readers default partial_rotary_factor to 0.5 (transformers at the top level,
    vLLM inside rope_parameters); we rotate the whole head, so say 1.0 in every place."""
    c.update(rope_hf)
    c["partial_rotary_factor"] = 1.0
    c["rope_parameters"] = {**c["rope_parameters"], "partial_rotary_factor": 1.0}
    if c.get("rope_scaling"):
        c["rope_scaling"] = {**c["rope_scaling"], "partial_rotary_factor": 1.0}
    return c


def _shared_width(mcfg: ModelConfig) -> int:
    m = mcfg.moe
    return m.shared_expert_intermediate_size or m.n_shared_experts * (m.intermediate_size or mcfg.intermediate_size)


# --------------------------------------------------------------------------- import direction
_ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn", "llama3": "llama3",
               "longrope": "longrope"}
_ROPE_KEYS = ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate",
              "low_freq_factor", "high_freq_factor", "short_factor", "long_factor")


def rope_from_hf(params: Optional[dict], max_pos: int) -> RopeConfig:
    """RopeConfig from transformers' standardised `rope_parameters`."""
    params = dict(params or {"rope_type": "default", "rope_theta": 10000.0})
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ExportError(f"partial_rotary_factor={params['partial_rotary_factor']}: moetrain rotates the whole "
                          "head dimension, so this model cannot be imported exactly")
    if kind not in _ROPE_TYPES:
        raise ExportError(f"RoPE type '{kind}' has no moetrain strategy; supported: {', '.join(_ROPE_TYPES)}")
    rope = RopeConfig(type=_ROPE_TYPES[kind], theta=float(params["rope_theta"]))
    for key in _ROPE_KEYS:
        v = params.get(key)
        if v is not None:
            setattr(rope, key, [float(x) for x in v] if isinstance(v, list) else bool(v) if key == "truncate"
                    else float(v))
    if kind == "dynamic":  # transformers reads max_position_embeddings as the original context
        rope.original_max_position_embeddings = max_pos
    elif kind != "default":
        rope.original_max_position_embeddings = int(params.get("original_max_position_embeddings") or max_pos)
    return rope


def _attention_from_hf(c, arch: str) -> AttentionConfig:
    n, window = c.num_hidden_layers, getattr(c, "sliding_window", None)
    if arch == "qwen2_moe":
        kinds = ["sliding" if t == _SLIDING else "full" for t in c.layer_types] if window else ["full"] * n
    else:
        kinds = ["sliding" if window else "full"] * n
    return AttentionConfig(layer_types=kinds, window=int(window) if window else AttentionConfig.window)


def _moe_from_hf(c, arch: str) -> MoEConfig:
    if arch == "glm4_moe":  # e_score_correction_bias is read with the tensors (importer.read_hf)
        return MoEConfig(n_experts=c.n_routed_experts, top_k=c.num_experts_per_tok, router="sigmoid",
                         norm_topk_prob=bool(c.norm_topk_prob), routed_scaling_factor=float(c.routed_scaling_factor),
                         n_groups=c.n_group, topk_groups=c.topk_group, intermediate_size=c.moe_intermediate_size,
                         first_k_dense=c.first_k_dense_replace, n_shared_experts=c.n_shared_experts or 0)
    if arch == "mixtral":
        return MoEConfig(n_experts=c.num_local_experts, top_k=c.num_experts_per_tok, norm_topk_prob=True,
                         intermediate_size=c.intermediate_size)
    n_layers, dense = c.num_hidden_layers, list(c.mlp_only_layers or [])
    step = c.decoder_sparse_step
    dense = sorted(set(dense) | {i for i in range(n_layers) if (i + 1) % step})
    if dense != list(range(len(dense))):
        raise ExportError(f"dense layers {dense} (mlp_only_layers / decoder_sparse_step) are not the first k layers; "
                          "moetrain only has model.moe.first_k_dense")
    m = MoEConfig(n_experts=c.num_experts, top_k=c.num_experts_per_tok, norm_topk_prob=bool(c.norm_topk_prob),
                  intermediate_size=c.moe_intermediate_size, first_k_dense=len(dense) if c.num_experts else 0)
    if arch == "qwen2_moe" and c.shared_expert_intermediate_size:
        m.n_shared_experts, m.shared_expert_gate = 1, True
        m.shared_expert_intermediate_size = c.shared_expert_intermediate_size
    return m


def arch_of(c) -> str:
    for arch, (model_type, _) in ARCHS.items():
        if c.model_type == model_type:
            return arch
    raise ExportError(f"model_type '{c.model_type}' is not importable; supported: "
                      f"{', '.join(t for t, _ in ARCHS.values())}")


def model_config(c) -> ModelConfig:
    """Our ModelConfig for a transformers Mixtral / Qwen2-MoE / Qwen3-MoE / Glm4Moe config object."""
    arch = arch_of(c)
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act '{c.hidden_act}' is not supported; moetrain experts are SwiGLU (silu)")
    moe = _moe_from_hf(c, arch)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
        head_dim=None if head_dim * c.num_attention_heads == c.hidden_size else head_dim,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        tie_embeddings=bool(c.tie_word_embeddings),
        qk_norm=arch == "qwen3_moe" or (arch == "glm4_moe" and bool(c.use_qk_norm)),
        init_std=getattr(c, "initializer_range", 0.02), moe=moe, attention=_attention_from_hf(c, arch),
        rope=rope_from_hf(getattr(c, "rope_parameters", None), c.max_position_embeddings))
