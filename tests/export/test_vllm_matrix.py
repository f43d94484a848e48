"""vLLM serves what we trained (issue 14): tiny models trained on text, exported to every target
and every servable RoPE family, give in vLLM the greedy tokens that transformers and our model
give, on prompts from a quarter of the trained context to all of it (crossing the sliding
window and the RoPE original maximum). Needs .venv-vllm (scripts/serving_env.sh); CI sets
MOETRAIN_REQUIRE_VLLM=1, which turns the skip into a failure.

One vLLM process checks all exports (one engine each, shut down before the next), so the
matrix costs one vLLM import; MATRIX is the smallest table that covers every target and family.
"""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from export_helpers import tiny_config

from moetrain.export import export_model
from moetrain.export import engine_check as ec
from moetrain.export.targets import ARCHS, plan_export
from moetrain.export.verify import LENGTH_DEPENDENT_ROPE, _greedy_hf, load_hf

CONTEXT, ORIGINAL, WINDOW = 128, 64, 48  # trained context, RoPE original maximum, sliding window
SERVABLE_ROPE = ("none", "linear", "ntk", "yarn", "llama3")  # dynamic / longrope: refused (test_engine_check)
TRAIN_STEPS, LR = 60, 1e-2

# id: (flavour of tiny_config, attention of every layer, RoPE of the long stage, architecture)
MATRIX = {
    "mixtral_full_none": ("mixtral", "full", "none", "mixtral"),
    "mixtral_sliding_llama3": ("mixtral", "sliding", "llama3", "mixtral"),
    "qwen2_sliding_yarn": ("qwen2", "sliding", "yarn", "qwen2_moe"),   # gated shared expert, dense layer 0
    "qwen2_full_linear": ("qwen2", "full", "linear", "qwen2_moe"),
    "qwen3_sliding_ntk": ("qwen3", "sliding", "ntk", "qwen3_moe"),     # q/k norm, no top-k renormalisation
    "glm4_full_yarn": ("glm4", "full", "yarn", "glm4_moe"),            # sigmoid, groups, bias, shared expert
}


def vllm_python() -> str:
    """The vLLM venv's interpreter; skip without it, fail instead where CI asks for it."""
    try:
        return ec.engine_python("vllm")
    except ValueError as e:
        if os.environ.get(ec.REQUIRE_ENV) == "1":
            pytest.fail(f"{ec.REQUIRE_ENV}=1 but {e}")
        pytest.skip(str(e))


def _config(flavour: str, kind: str, rope: str):
    """A tiny config whose final stage runs CONTEXT tokens, RoPE extended from ORIGINAL."""
    from moetrain.config import config_from_dict, to_dict, validate
    d = to_dict(tiny_config(flavour, rope=rope))
    d["model"].update(hidden_size=128, intermediate_size=192)  # head_dim 32: vLLM's CPU attention needs >= 32
    d["model"]["moe"]["intermediate_size"] = 64
    d["model"]["attention"] = {"layer_types": [kind], "window": WINDOW}
    d["stages"][0]["seq_len"], d["stages"][1]["seq_len"] = ORIGINAL, CONTEXT
    cfg = config_from_dict(d)
    validate(cfg)
    return cfg


def _train(cfg, data_dir: str):
    """TRAIN_STEPS of AdamW on the prepared text, in the final stage (as the last checkpoint of
    a run): learned weights, so greedy continuations are not the near-ties of random ones."""
    from moetrain.data.shards import SplitData
    from moetrain.model import build_model
    from moetrain.model.moe import moe_layers
    from moetrain.train.schedule import plan_stages
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    plan = plan_stages(cfg)[-1]
    rope = dataclasses.replace(plan.rope, original_max_position_embeddings=plan.original_max_position_embeddings)
    model.set_rope(rope, plan.seq_len)
    model.set_attention(plan.attention)
    train = SplitData(data_dir, "train", verify_hashes=False)
    stream = torch.from_numpy(np.concatenate([train.tokens(d, 0, int(n)) for d, n in enumerate(train.lengths)])
                              .astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        starts = torch.randint(0, len(stream) - CONTEXT - 1, (4,), generator=g)
        batch = torch.stack([stream[s:s + CONTEXT + 1] for s in starts.tolist()])
        loss = model(batch[:, :-1], labels=batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # the selection bias is learned by a callback in real runs: give it one
        for moe in moe_layers(model):
            if moe.router.expert_bias is not None:
                moe.router.expert_bias.copy_(0.3 * torch.randn(moe.router.expert_bias.shape, generator=g))
    return model.eval(), plan.attention, loss.item()


def _export_one(name: str, tmp, data_dir: str, tokenizer_path: str) -> dict:
    flavour, kind, rope, _ = MATRIX[name]
    cfg = _config(flavour, kind, rope)
    model, attn, loss = _train(cfg, data_dir)
    out = str(tmp / name)
    report = export_model(model, cfg.model, attn, out, tokenizer_path=tokenizer_path, verify=True,
                          log=lambda m: None)
    ec.check_supported(model.rotary.rope, plan_export(cfg.model, attn), cfg.model)  # what --verify-engine would refuse
    prompts, ours = ec.prepare(model, cfg.model.vocab_size, CONTEXT, data_dir)
    hf = load_hf(out)
    hf_tokens = [_greedy_hf(hf, torch.tensor([p]), ec.GEN_TOKENS, use_cache=True)[0].tolist() for p in prompts]
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    return {"out": out, "report": report, "loss": loss, "prompts": prompts, "ours": ours, "hf_tokens": hf_tokens,
            "config": config}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, data_dir, tokenizer_path):
    python = vllm_python()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("vllm_matrix")
    runs = {name: _export_one(name, tmp, data_dir, tokenizer_path) for name in MATRIX}
    jobs = [{"model": r["out"], "prompts": r["prompts"], "max_tokens": ec.GEN_TOKENS, "max_model_len": CONTEXT}
            for r in runs.values()]
    versions, results = ec.run_vllm_jobs(jobs, python)
    for r, res in zip(runs.values(), results):
        r["vllm"] = {**versions, "results": res}
        r["comparison"] = ec.compare(r["ours"], r["vllm"], r["prompts"], ec.MAX_DLOGPROB["fp32"])
    return runs


def test_matrix_covers_every_target_and_servable_rope():
    assert {arch for *_, arch in MATRIX.values()} == set(ARCHS)
    assert {rope for _, _, rope, _ in MATRIX.values()} == set(SERVABLE_ROPE)
    assert not set(SERVABLE_ROPE) & set(LENGTH_DEPENDENT_ROPE)
    assert {kind for _, kind, _, _ in MATRIX.values()} == {"sliding", "full"}
    lengths = ec.prompt_lengths(CONTEXT)
    assert len(lengths) == ec.N_PROMPTS and lengths[0] == CONTEXT // 4 and lengths[-1] + ec.GEN_TOKENS == CONTEXT
    assert lengths[0] < WINDOW < lengths[-1] and lengths[0] < ORIGINAL < lengths[-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MATRIX))
def test_vllm_greedy_equals_transformers_and_ours(matrix, name):
    r = matrix[name]
    c = r["comparison"]
    print(f"{name}: {c.line()}")  # shown with -s / -rA: the numbers behind the pass
    _, kind, rope, arch = MATRIX[name]
    assert r["report"]["architecture"] == ARCHS[arch][1] and r["report"]["verify"]["passed"], r["report"]
    assert r["loss"] < 5.0, f"training did not learn (loss {r['loss']:.2f}; ln 384 = 5.95)"
    assert r["config"].get("sliding_window") == (WINDOW if kind == "sliding" else None), r["config"]
    ours = [a["tokens"] for a in r["ours"]]
    theirs = [b["tokens"] for b in r["vllm"]["results"]]
    assert [len(p) for p in r["prompts"]] == ec.prompt_lengths(CONTEXT)
    assert ours == r["hf_tokens"], f"{name}: transformers' greedy tokens differ from ours"
    assert theirs == ours, f"{name}: vLLM's greedy tokens differ from ours: {c.line()}"
    assert c.passed and c.max_dlogprob <= ec.MAX_DLOGPROB["fp32"], c.line()
