"""--verify-engine vllm: what is refused before any engine runs, how a divergence is reported,
and (slow, needs .venv-vllm from scripts/serving_env.sh) a real vLLM run through export_model.
Every target and RoPE family in vLLM: test_vllm_matrix.py."""
import os

import pytest
import torch
from export_helpers import tiny_model
from test_vllm_matrix import vllm_python

from moetrain.export import ExportError, VerificationFailed, export_model
from moetrain.export import engine_check as ec


def _fake_venv(tmp_path, monkeypatch):
    """An interpreter path that exists: the refusals below must fire before it is ever run."""
    py = tmp_path / "venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("#!/bin/sh\nexit 99\n")
    monkeypatch.setenv(ec.VENV_ENV, str(tmp_path / "venv"))


@pytest.mark.parametrize("rope,overrides,words", [
    ("yarn", {}, "per-layer sliding/full"),  # qwen2 flavour: sliding + full layers (issue 14)
    ("dynamic", {"attention__layer_types": ["full"]}, "dynamic RoPE"),
    ("longrope", {"attention__layer_types": ["full"]}, "longrope RoPE"),
    ("yarn_short", {"attention__layer_types": ["full"]}, "set the stage's rope.factor >= 2"),
    ("none", {"attention__layer_types": ["full"], "head_dim": 12}, "head_dim"),
])
def test_vllm_refusals_are_one_line(tmp_path, tokenizer_path, monkeypatch, rope, overrides, words):
    """What vLLM 0.32 computes differently is refused before the export is written."""
    from moetrain.config import RopeConfig
    _fake_venv(tmp_path, monkeypatch)
    model, mcfg, attn = tiny_model("qwen2", "none" if rope in ("longrope", "yarn_short") else rope, **overrides)
    if rope == "longrope":
        model.set_rope(RopeConfig(type="longrope", factor=2.0, original_max_position_embeddings=16,
                                  short_factor=[1.0] * 4, long_factor=[2.0] * 4), 32)
    if rope == "yarn_short":  # YaRN x1.5 over 16 tokens covers 24 positions of the 32 trained
        model.set_rope(RopeConfig(type="yarn", factor=1.5, original_max_position_embeddings=16), 32)
    with pytest.raises(ExportError) as e:
        export_model(model, mcfg, attn, str(tmp_path / "hf"), tokenizer_path=tokenizer_path, verify_engine="vllm",
                     log=lambda m: None)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "hf")


def test_prompt_lengths_cross_window_and_original_max():
    lengths = ec.prompt_lengths(1024)
    assert len(lengths) == 8 and lengths[0] == 256 and lengths[-1] + ec.GEN_TOKENS == 1024
    assert ec.prompt_lengths(32) == [16]  # tiny models: one prompt, still reaching the context


def _ours(prompt_lps, tokens, vocab=5):
    steps = torch.full((len(tokens), vocab), -10.0, dtype=torch.float64)
    for k, t in enumerate(tokens):
        steps[k, t] = -0.1
    return {"prompt_logprobs": prompt_lps, "tokens": tokens, "step_logprobs": steps}


def test_compare_names_first_divergent_position():
    prompts = [[0, 1, 2, 3], [0, 1, 2, 3, 4]]
    ours = [_ours([-1.0, -2.0, -3.0], [1, 2]), _ours([-1.0, -2.0, -3.0, -4.0], [3, 4])]
    theirs = {"vllm_version": "x", "results": [
        {"prompt_logprobs": [-1.0, -2.0, -3.0], "tokens": [1, 2], "logprobs": [-0.1, -0.1]},
        {"prompt_logprobs": [-1.0, -2.0, -3.5, -4.0], "tokens": [3, 0], "logprobs": [-0.1, -9.0]}]}
    c = ec.compare(ours, theirs, prompts, 1e-3)
    assert not c.passed and c.real_greedy_split and abs(c.max_dlogprob - 0.5) < 1e-9
    assert c.first_divergence == {"prompt": 1, "length": 5, "position": 3, "dlogprob": 0.5}
    assert c.greedy_identical == 1 and c.greedy_tokens_agreeing == 3
    assert "prompt 1 (5 tokens) at position 3" in c.line() and "greedy identical on 1/2" in c.line()


def test_compare_tolerates_a_greedy_near_tie():
    ours = [_ours([-1.0], [1, 2])]
    ours[0]["step_logprobs"][1, 3] = -0.1 + 1e-5  # token 3 is as likely as our choice 2
    theirs = {"results": [{"prompt_logprobs": [-1.0], "tokens": [1, 3], "logprobs": [-0.1, -0.1]}]}
    c = ec.compare(ours, theirs, [[0, 1]], 1e-3)
    assert c.passed and c.greedy_identical == 0


@pytest.mark.slow
def test_verify_engine_runs_vllm_on_the_export(tmp_path, tokenizer_path, data_dir):
    """export_model(verify_engine="vllm") end to end: the engine subprocess, its report and
    moetrain_export.json (window W, YaRN x2, gated shared expert, dense first layer)."""
    vllm_python()
    model, mcfg, attn = tiny_model("qwen2", "yarn", hidden_size=128, attention__layer_types=["sliding"])
    report = export_model(model, mcfg, attn, str(tmp_path / "hf"), tokenizer_path=tokenizer_path,
                          verify_engine="vllm", prompt_data_dir=data_dir, log=lambda m: None)
    v = report["verify_engine"]
    assert v["passed"] and v["versions"]["vllm_version"].startswith("0.32"), report["verify_engine_line"]
    assert v["prompt_lengths"] == ec.prompt_lengths(32) and v["max_dlogprob"] <= ec.MAX_DLOGPROB["fp32"]
    with open(tmp_path / "hf" / "moetrain_export.json") as f:
        assert '"verify_engine"' in f.read()


def test_vllm_failure_is_verification_failed(tmp_path, tokenizer_path, monkeypatch):
    """A divergence found by the engine stops the export and leaves the folder for inspection."""
    _fake_venv(tmp_path, monkeypatch)
    model, mcfg, attn = tiny_model("qwen2", "yarn", attention__layer_types=["full"])

    def diverging(hf_dir, prompts, gen, max_len, python):
        return {"vllm_version": "fake", "results": [
            {"prompt_logprobs": [-1.0] * (len(p) - 1), "tokens": [0] * gen, "logprobs": [-1.0] * gen}
            for p in prompts]}
    monkeypatch.setattr(ec, "run_vllm", diverging)
    with pytest.raises(VerificationFailed, match="vllm does not compute what the model computes"):
        export_model(model, mcfg, attn, str(tmp_path / "hf"), tokenizer_path=tokenizer_path, verify_engine="vllm",
                     log=lambda m: None)
    assert os.path.isdir(tmp_path / "hf.partial") and not os.path.exists(tmp_path / "hf")
