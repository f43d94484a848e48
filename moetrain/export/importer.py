"""Import a transformers Mixtral / Qwen2-MoE / Qwen3-MoE folder as our model (warm starts).

    model, mcfg = import_hf(HF_DIR)                 exact copy, checked like an export (verify=True)
    hf_model_config(HF_DIR)                         just the ModelConfig (for a training config's model:)
    init_from(model, PATH)                          the trainer hook: weights of an HF folder or of a
                                                    moetrain run/checkpoint into a freshly built model
"""
from __future__ import annotations

import glob
import json
import os

import torch

from moetrain.config import ModelConfig, head_dim
from moetrain.export.convert import from_hf_state_dict
from moetrain.export.hf_config import arch_of, model_config
from moetrain.export.targets import ExportError


def _read_tensors(hf_dir: str) -> dict:
    from safetensors.torch import load_file
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors"))]
    if not files:
        raise ExportError(f"'{hf_dir}' has no *.safetensors weights (pytorch_model.bin is not read: it needs "
                          "unsafe unpickling); re-save the model with safe_serialization=True")
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(hf_dir, name)))
    return tensors


_DEEPSEEK_V3_BIAS_SPEED = 0.001  # what DeepSeek-V3 used; a warm start keeps balancing the same way


def _check_unused(unused: dict) -> None:
    """Tensors the conversion did not take must be ones that change nothing: zero attention
    biases (our own Qwen2-MoE exports write them), an empty shared expert, cached RoPE."""
    for k, t in unused.items():
        if k.endswith("_proj.bias") and bool(torch.any(t != 0)):
            raise ExportError(f"'{k}' is a non-zero attention bias; moetrain attention has no biases, so this "
                              "model cannot be imported exactly")
        harmless = (k.endswith("_proj.bias") or k.endswith("rotary_emb.inv_freq")
                    or (k.endswith("e_score_correction_bias") and not bool(torch.any(t != 0)))
                    or (".shared_expert" in k and (t.numel() == 0 or k.endswith("shared_expert_gate.weight"))))
        if not harmless:
            raise ExportError(f"tensor '{k}' has no place in a moetrain model; this checkpoint holds something "
                              "its config does not describe, so it cannot be imported exactly")


def _hf_config(hf_dir: str):
    from transformers import AutoConfig
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ExportError(f"'{hf_dir}' has no config.json; pass a Hugging Face model folder")
    return AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)


def hf_model_config(hf_dir: str) -> ModelConfig:
    """Our ModelConfig for an HF folder (config only, no weights): the `model:` section a
    warm-start training config needs (dump it with moetrain.config.to_dict)."""
    return model_config(_hf_config(hf_dir))


def read_hf(hf_dir: str) -> tuple[dict, ModelConfig]:
    """(our fp32 state dict, our ModelConfig) of an HF folder; refuses what we cannot represent."""
    c = _hf_config(hf_dir)
    mcfg = model_config(c)
    tensors = _read_tensors(hf_dir)
    if any(k.endswith("e_score_correction_bias") and bool(torch.any(t != 0)) for k, t in tensors.items()):
        mcfg.moe.bias_update_speed = _DEEPSEEK_V3_BIAS_SPEED  # the bias only exists in our model when it moves
    try:
        sd, unused = from_hf_state_dict(tensors, mcfg, arch_of(c))
    except KeyError as e:
        raise ExportError(f"'{hf_dir}' lacks tensor {e} that its config.json implies") from None
    _check_unused(unused)
    return sd, mcfg


def import_hf(hf_dir: str, verify: bool = False):
    """(our model in fp32/CPU/eval, its ModelConfig). With verify, runs the export
    checks the other way round and attaches the numbers as model.import_check."""
    from moetrain.checkpoint import model_from_state_dict
    sd, mcfg = read_hf(hf_dir)
    model = model_from_state_dict(mcfg, sd)
    if verify:
        from moetrain.export.verify import compare_models, load_hf
        res = compare_models(model, load_hf(hf_dir), mcfg.vocab_size, model.rotary.rope)
        model.import_check = res.as_dict()
        if not res.passed:
            raise RuntimeError(f"imported model does not reproduce {hf_dir}: {res.line()}")
    return model, mcfg


# --------------------------------------------------------------------------- warm starts
def _resolved(m: ModelConfig) -> dict:
    """The fields that decide what the weights compute (not RoPE/attention, which
    continued long-context training is free to change)."""
    e = m.moe
    f = e.intermediate_size or m.intermediate_size
    out = {"vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "n_layers": m.n_layers, "n_heads": m.n_heads,
           "n_kv_heads": m.n_kv_heads, "head_dim": head_dim(m), "tie_embeddings": m.tie_embeddings,
           "qk_norm": m.qk_norm, "moe.n_experts": e.n_experts}
    if e.n_experts:
        shared = (e.shared_expert_intermediate_size or e.n_shared_experts * f) if e.n_shared_experts else 0
        out.update({"moe.intermediate_size": f, "moe.first_k_dense": e.first_k_dense, "moe.top_k": e.top_k,
                    "moe.norm_topk_prob": e.norm_topk_prob or not e.softmax_before_topk, "moe.router": e.router,
                    "moe.shared_expert_intermediate_size": shared,
                    "moe.shared_expert_gate": e.shared_expert_gate and bool(shared)})
    if not e.n_experts or e.first_k_dense:
        out["intermediate_size"] = m.intermediate_size
    return out


def check_compatible(want: ModelConfig, have: ModelConfig, source: str) -> None:
    a, b = _resolved(want), _resolved(have)
    for key in a:
        if a[key] != b.get(key):
            raise ValueError(f"model.init_from {source} has {key}={b.get(key)!r} but the config says {a[key]!r}; "
                             f"set model.{key}={b.get(key)} (or start from a matching model)")


@torch.no_grad()
def init_from(model, path: str) -> None:
    """Warm start: copy the weights of an HF folder or a moetrain run/checkpoint into
    `model` (freshly built from the training config, before expert parallelism
    shards it). Architecture fields must match; RoPE and attention may differ."""
    if os.path.isfile(os.path.join(path, "config.json")):
        sd, have = read_hf(path)
    else:
        from moetrain.checkpoint import read_state_dict, resolve_checkpoint
        sd, cfg = read_state_dict(resolve_checkpoint(path))
        have = cfg.model
    check_compatible(model.cfg, have, path)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not k.endswith("expert_bias")}
    for k in own:
        if k.endswith("router.expert_bias") and k not in sd:
            sd[k] = torch.zeros_like(own[k])  # a fresh aux-loss-free bias on top of imported weights
    model.load_state_dict(sd, strict=True)
