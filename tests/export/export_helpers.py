"""Helpers for the export tests: a tiny prepared data folder, tiny configs, tiny models, the CLI."""
import dataclasses
import importlib.util
import os

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Pseudo-text with unicode, digits and whitespace runs, so the tokenizer test has something to chew on.
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qua", "bri", "dor", "fen", "gal",
              "über", "café", "東京", "δέλτα", "жук", "naïve", "🙂"]
TOKENIZER_SAMPLE = ("Hello  world!\n\n\tTabs\t\tand   runs of    spaces   \n  indented line\n"
                    "naïve café 東京 über straße 🙂 emoji, δέλτα жук, digits 1234567890 3.14\n"
                    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and unseen ☃ ⚡ chars; trailing   \n\n\n"
                    "   \u3000ideographic space")


def fake_docs(n_docs: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))) for _ in range(200)]
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(int(rng.integers(20, 40))):
            ws = [words[int(rng.zipf(1.3)) % len(words)] for _ in range(int(rng.integers(3, 12)))]
            lines.append(" " * int(rng.integers(0, 3)) + " ".join(ws) + rng.choice([".", ",", "!", "", "  "]))
        docs.append("\n".join(lines) + f"\n{int(rng.integers(0, 10**6))}")
    return docs


def make_data_dir(out: str, vocab_size: int = 384, model_type: str = "bpe") -> str:
    """A prepared folder (manifest, shards, tokenizer.model) for the trainer, in about a second."""
    from moetrain.data.recipe import TokenizerSpec
    from moetrain.data.shards import write_prepared
    from moetrain.data.tokenizer import MODEL_FILE, Tokenizer, train_sentencepiece

    docs = fake_docs(40)
    proto = train_sentencepiece(docs, TokenizerSpec(vocab_size=vocab_size, model_type=model_type))
    tok = Tokenizer(proto)
    ids = [[tok.bos_id] + x + [tok.eos_id] for x in tok.encode_batch(docs)]
    write_prepared(out, {"train": [(x, 0) for x in ids[:36]], "eval": [(x, 0) for x in ids[36:]]}, ["fake"],
                   tok.info())
    with open(os.path.join(out, MODEL_FILE), "wb") as f:
        f.write(proto)
    return out


def tiny_config(name: str, zero: int = 0, ep: int = 1, rope: str = "yarn", data_dir: str = "unused"):
    """Tiny TrainConfig per target flavour: mixtral* plain MoE; qwen2* gated shared expert, a
    dense first layer, sliding/full layers; qwen3* q/k norm, no top-k renormalisation; glm4* sigmoid
    router, group-limited routing, aux-free bias, shared expert, q/k norm, a dense first layer."""
    from moetrain.config import config_from_dict, validate
    model = {"vocab_size": 384, "hidden_size": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
             "intermediate_size": 48, "init_std": 0.15,  # logits of order 1, not 0.01: a real test of exactness
             "moe": {"n_experts": 4, "top_k": 2, "intermediate_size": 24, "ep_size": ep}}
    if name.startswith("qwen2"):
        model["moe"].update(n_shared_experts=1, shared_expert_gate=True, first_k_dense=1)
        model["n_layers"] = 3
        model["attention"] = {"layer_types": ["sliding", "full"], "window": 8}
    if name.startswith("qwen3"):
        model["qk_norm"] = True
        model["moe"]["norm_topk_prob"] = False
    if name.startswith("glm4"):  # DeepSeek-V3-style routing
        model["qk_norm"], model["n_layers"] = True, 3
        model["moe"].update(n_experts=8, router="sigmoid", n_groups=4, topk_groups=2, bias_update_speed=0.01,
                            n_shared_experts=1, first_k_dense=1, routed_scaling_factor=2.5)
    d = {"name": name, "seed": 7, "model": model, "data": {"dir": data_dir, "recipe": None},
         "train": {"micro_batch_size": 2},
         "stages": [{"name": "short", "seq_len": 16, "steps": 1},
                    {"name": "long", "seq_len": 32, "steps": 1,
                     "rope": {"type": rope, "factor": 2.0 if rope != "none" else 1.0}}],
         "optim": {"warmup_steps": 0, "lr": 1e-2}, "deepspeed": {"zero_stage": zero},
         "checkpoint": {"keep_last": 1}, "logging": {"wandb": {"mode": "disabled"}}}
    cfg = config_from_dict(d)
    validate(cfg)
    return cfg


def tiny_model(name: str, rope: str = "yarn", **model_overrides):
    """(model in its final stage, ModelConfig, final-stage AttentionConfig) without DeepSpeed.
    Norm weights are perturbed so that a dropped or swapped norm cannot go unnoticed."""
    from moetrain.config import config_from_dict, to_dict
    from moetrain.model import build_model
    from moetrain.train.schedule import plan_stages

    d = to_dict(tiny_config(name, rope=rope))
    for key, value in model_overrides.items():
        node = d["model"]
        *path, last = key.split("__")
        for p in path:
            node = node[p]
        node[last] = value
    cfg = config_from_dict(d)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    plan = plan_stages(cfg)[-1]
    rope = dataclasses.replace(plan.rope, original_max_position_embeddings=plan.original_max_position_embeddings)
    model.set_rope(rope, plan.seq_len)
    model.set_attention(plan.attention)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval(), cfg.model, plan.attention


def export_script():
    """scripts/export.py as a module, to call its main() in-process."""
    spec = importlib.util.spec_from_file_location("export_script", os.path.join(ROOT, "scripts", "export.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
