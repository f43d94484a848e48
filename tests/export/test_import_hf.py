"""transformers Mixtral / Qwen2-MoE / Qwen3-MoE folders -> our model (warm start), checked like
an export; import -> export reproduces the original tensors bit for bit."""
import glob
import os

import pytest
import torch
from safetensors.torch import load_file

from moetrain.export import import_hf, init_from
from moetrain.export.exporter import export_model

ROPES = {"mixtral": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 16},
         "qwen2_moe": {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
         "qwen3_moe": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
         "glm4_moe": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}}


def hf_folder(path, arch: str, dtype=torch.float32) -> str:
    """A random tiny transformers model saved the way the Hub stores them."""
    import transformers as tf
    common = dict(vocab_size=384, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=64, initializer_range=0.15,
                  rope_parameters=ROPES[arch], bos_token_id=1, eos_token_id=2)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=24, num_local_experts=4, sliding_window=8, head_dim=8, **common)
        cls = tf.MixtralForCausalLM
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                shared_expert_intermediate_size=40, mlp_only_layers=[0], norm_topk_prob=False,
                                use_sliding_window=True, sliding_window=8,
                                layer_types=["full_attention", "sliding_attention", "full_attention"], **common)
        cls = tf.Qwen2MoeForCausalLM
    elif arch == "glm4_moe":
        cfg = tf.Glm4MoeConfig(intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=2,
                               n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                               use_qk_norm=True, partial_rotary_factor=1.0, **common)
        cls = tf.Glm4MoeForCausalLM
    else:
        cfg = tf.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=4, norm_topk_prob=True,
                                tie_word_embeddings=True, **common)
        cls = tf.Qwen3MoeForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).to(dtype)
    with torch.no_grad():  # norms at exactly 1 would hide a dropped or swapped norm
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():  # a trained selection bias changes which experts are chosen
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    out = str(path / arch)
    model.save_pretrained(out)
    return out


def _tensors(folder):
    out = {}
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe"])
def test_import_verify_and_round_trip(tmp_path, tokenizer_path, arch):
    src = hf_folder(tmp_path, arch)
    model, mcfg = import_hf(src, verify=True)
    assert model.import_check["passed"], model.import_check
    out = str(tmp_path / "export")
    report = export_model(model, mcfg, mcfg.attention, out, tokenizer_path=tokenizer_path, verify=True,
                          log=lambda m: None)
    assert report["model_type"] == arch and report["verify"]["passed"]
    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_bf16_round_trip_and_fused_layout(tmp_path, tokenizer_path):
    """bf16 weights survive the trip; the 5.x fused in-memory layout (gate_up_proj) is read too."""
    src = hf_folder(tmp_path, "mixtral", torch.bfloat16)
    model, mcfg = import_hf(src)
    out = str(tmp_path / "export")
    export_model(model, mcfg, mcfg.attention, out, tokenizer_path=tokenizer_path, dtype="bf16", log=lambda m: None)
    a = _tensors(src)
    b = _tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(a) == sorted(b)
    fused = {}
    for k, v in a.items():  # rewrite as transformers 5.x holds it in memory
        if ".experts." in k:
            continue
        fused[k.replace(".block_sparse_moe.", ".mlp.")] = v
    for i in range(3):
        p = f"model.layers.{i}.block_sparse_moe.experts"
        gate = torch.stack([a[f"{p}.{e}.w1.weight"] for e in range(4)])
        up = torch.stack([a[f"{p}.{e}.w3.weight"] for e in range(4)])
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([a[f"{p}.{e}.w2.weight"] for e in range(4)])
    _rewrite(src, fused)
    again, _ = import_hf(src)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def _rewrite(src, tensors):
    from safetensors.torch import save_file
    for f in glob.glob(os.path.join(src, "*.safetensors")) + glob.glob(os.path.join(src, "*.index.json")):
        os.remove(f)
    save_file(tensors, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})


def test_what_we_cannot_represent_is_refused(tmp_path):
    from moetrain.export import ExportError
    src = hf_folder(tmp_path, "qwen2_moe")
    t = _tensors(src)
    bias = "model.layers.1.self_attn.q_proj.bias"
    _rewrite(src, {**t, bias: torch.ones_like(t[bias])})
    with pytest.raises(ExportError, match="non-zero attention bias"):
        import_hf(src)
    _rewrite(src, {**t, "model.mtp.proj.weight": torch.ones(2, 2)})  # e.g. a multi-token-prediction head
    with pytest.raises(ExportError, match="model.mtp.proj.weight' has no place"):
        import_hf(src)


def test_init_from_warm_start(tmp_path):
    """The trainer hook: a model built from a training config takes the HF weights;
    RoPE/attention may differ (continued long-context training), architecture may not."""
    import dataclasses

    from moetrain.config import RopeConfig
    from moetrain.model import build_model
    src = hf_folder(tmp_path, "qwen3_moe")
    ref, mcfg = import_hf(src)
    train_cfg = dataclasses.replace(mcfg, rope=RopeConfig(type="yarn", factor=4.0, theta=1e6),
                                    max_position_embeddings=256)
    model = build_model(train_cfg)
    init_from(model, src)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    bad = build_model(dataclasses.replace(mcfg, moe=dataclasses.replace(mcfg.moe, top_k=1)))
    with pytest.raises(ValueError, match="moe.top_k=2"):
        init_from(bad, src)
