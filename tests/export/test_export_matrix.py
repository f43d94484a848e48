"""In-memory models -> HF folder -> AutoModelForCausalLM: every target x RoPE method, and features."""
import json
import os

import pytest
import torch
from export_helpers import tiny_model
from safetensors.torch import load_file

from moetrain.export import export_model

ROPES = ["none", "linear", "yarn", "llama3", "ntk", "dynamic", "longrope"]
ARCH = {"mixtral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}


def _tensors(out) -> dict:
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return {k: v for s in shards for k, v in load_file(os.path.join(out, s)).items()}


def _assert_no_placeholders(out):
    """vLLM refuses any tensor its model does not build (issue 14: empty shared experts)."""
    empty = sorted(k for k, t in _tensors(out).items() if 0 in t.shape)
    assert not empty, f"zero-size tensors exported: {empty}"


def _export(tmp_path, tokenizer_path, model, mcfg, attn, **kw):
    out = str(tmp_path / "hf")
    report = export_model(model, mcfg, attn, out, tokenizer_path=tokenizer_path, verify=True, log=lambda m: None, **kw)
    return out, report


@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("arch", ["mixtral", "qwen2", "qwen3"])
def test_every_target_and_rope_passes_verify(tmp_path, tokenizer_path, arch, rope):
    model, mcfg, attn = tiny_model(arch, rope if rope != "longrope" else "none")
    if rope == "longrope":  # needs per-dimension factors (head_dim / 2 = 4 of them)
        from moetrain.config import RopeConfig
        model.set_rope(RopeConfig(type="longrope", factor=2.0, original_max_position_embeddings=16,
                                  short_factor=[1.0, 1.1, 1.3, 1.6], long_factor=[1.5, 2.0, 3.0, 4.5]), 32)
    out, report = _export(tmp_path, tokenizer_path, model, mcfg, attn)
    v = report["verify"]
    assert report["architecture"] == ARCH[arch] and report["exact"]
    assert v["passed"] and v["max_abs_logit_diff"] <= 1e-4 and v["max_kl"] <= 1e-6 and v["greedy_match"]
    assert max(v["position_starts"]) + v["seq_len"] > 32, "must check positions past the trained context"
    _assert_no_placeholders(out)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == [ARCH[arch]]
    assert cfg["rope_parameters"]["rope_type"] == {"none": "default", "ntk": "default"}.get(rope, rope)
    if rope in ("linear", "yarn", "llama3", "dynamic", "longrope"):
        assert cfg["rope_scaling"]["rope_type"] == rope
    # The trained context, except dynamic NTK which transformers reads as the original context.
    assert cfg["max_position_embeddings"] == (16 if rope == "dynamic" else 32)


FEATURES = {
    "all_sliding_mixtral": ("mixtral", {"attention__layer_types": ["sliding"], "attention__window": 8}, "Mixtral"),
    "all_sliding_qwen3": ("qwen3", {"attention__layer_types": ["sliding"], "attention__window": 8}, "Qwen3Moe"),
    "ungated_shared": ("qwen2", {"moe__shared_expert_gate": False, "moe__n_shared_experts": 2}, "Qwen2Moe"),
    "no_shared_dense_layer": ("qwen2", {"moe__n_shared_experts": 0}, "Qwen2Moe"),
    "routed_scaling_topk_softmax": ("mixtral", {"moe__routed_scaling_factor": 2.5,
                                                "moe__softmax_before_topk": False}, "Mixtral"),
    "no_renorm_without_qk_norm": ("mixtral", {"moe__norm_topk_prob": False}, "Qwen2Moe"),
    "tied_embeddings": ("mixtral", {"tie_embeddings": True}, "Mixtral"),
    "odd_head_dim": ("qwen2", {"head_dim": 12}, "Qwen2Moe"),
    "dense_model": ("qwen2", {"moe__n_experts": 0, "moe__n_shared_experts": 0, "moe__first_k_dense": 0},
                    "Qwen2Moe"),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_feature_is_exact(tmp_path, tokenizer_path, feature):
    arch, overrides, want = FEATURES[feature]
    model, mcfg, attn = tiny_model(arch, "yarn", **overrides)
    out, report = _export(tmp_path, tokenizer_path, model, mcfg, attn)
    assert report["architecture"] == want + "ForCausalLM" and report["exact"]
    assert report["verify"]["passed"], report["verify_line"]
    _assert_no_placeholders(out)


def test_no_shared_expert_writes_no_shared_tensors(tmp_path, tokenizer_path):
    """Qwen2-MoE without shared experts: width 0 in config.json and no shared_expert* tensor,
    which is the form vLLM builds (no shared expert, no gate) and transformers reproduces."""
    model, mcfg, attn = tiny_model("qwen2", "yarn", moe__n_shared_experts=0)
    out, report = _export(tmp_path, tokenizer_path, model, mcfg, attn)
    assert report["verify"]["passed"], report["verify_line"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["shared_expert_intermediate_size"] == 0
    assert not [k for k in _tensors(out) if "shared_expert" in k]


def test_bf16_export_and_sharding(tmp_path, tokenizer_path):
    model, mcfg, attn = tiny_model("qwen2", "llama3", moe__routed_scaling_factor=1.5)
    out, report = _export(tmp_path, tokenizer_path, model, mcfg, attn, dtype="bf16", shard_size="40KB")
    assert report["verify"]["passed"], report["verify_line"]
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(os.path.getsize(os.path.join(out, s)) < 60_000 for s in shards)
    tensors = {k: v for s in shards for k, v in load_file(os.path.join(out, s)).items()}
    assert set(tensors) == set(index["weight_map"]) and all(t.dtype == torch.bfloat16 for t in tensors.values())
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    # Published per-expert layout, as vLLM and transformers 4.x read it.
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in tensors
    assert "model.layers.0.mlp.gate_proj.weight" in tensors  # the dense first layer
    assert not tensors["model.layers.1.self_attn.q_proj.bias"].any()


def _perturb_bias(model):
    """A bias as training leaves it: large enough to change which experts are chosen."""
    from moetrain.model.moe import moe_layers
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for moe in moe_layers(model):
            moe.router.expert_bias.copy_(0.3 * torch.randn(moe.router.expert_bias.shape, generator=g))


@pytest.mark.parametrize("rope", ["none", "yarn", "llama3"])
def test_glm4_sigmoid_grouped_biased_routing_is_exact(tmp_path, tokenizer_path, rope):
    model, mcfg, attn = tiny_model("glm4", rope)
    _perturb_bias(model)
    out, report = _export(tmp_path, tokenizer_path, model, mcfg, attn)
    v = report["verify"]
    assert report["architecture"] == "Glm4MoeForCausalLM" and report["exact"]
    assert v["passed"] and v["max_abs_logit_diff"] <= 1e-4 and v["greedy_match"], report["verify_line"]
    _assert_no_placeholders(out)
    tensors = _tensors(out)
    bias = tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert torch.equal(bias, model.layers[1].mlp.router.expert_bias)
    assert "model.layers.2.mlp.shared_experts.down_proj.weight" in tensors
    assert "model.layers.0.mlp.gate_proj.weight" in tensors  # first_k_dense_replace=1
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["n_group"], cfg["topk_group"], cfg["use_qk_norm"], cfg["routed_scaling_factor"]) == (4, 2, True, 2.5)
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 1.0


def test_glm4_without_bias_writes_zero_bias(tmp_path, tokenizer_path):
    model, mcfg, attn = tiny_model("glm4", "yarn", moe__bias_update_speed=0.0, qk_norm=False, moe__n_groups=1,
                                   moe__topk_groups=1)
    out, report = _export(tmp_path, tokenizer_path, model, mcfg, attn)
    assert report["architecture"] == "Glm4MoeForCausalLM" and report["verify"]["passed"], report["verify_line"]
    assert not _tensors(out)["model.layers.1.mlp.gate.e_score_correction_bias"].any()
