"""RoPE strategies against transformers itself: inv_freq and attention scaling via a
transformers config built from our to_hf() (which proves to_hf too), cos/sin against
its rotary modules beyond the original context, and apply_rotary against
apply_rotary_pos_emb."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import modeling_rope_utils  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaConfig,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import (  # noqa: E402
    Qwen3MoeConfig,
    Qwen3MoeRotaryEmbedding,
)

from moetrain.config import RopeConfig  # noqa: E402
from moetrain.model.rope import RotaryEmbedding, apply_rotary, build_rope  # noqa: E402

D = 64  # head_dim
ORIG = 256  # original (pretraining) context
TARGET = 1024  # trained context after extension
HF_MODULES = {"llama": (LlamaConfig, LlamaRotaryEmbedding), "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeRotaryEmbedding)}


def _factors(seed, lo, hi):
    g = torch.Generator().manual_seed(seed)
    return sorted((lo + (hi - lo) * torch.rand(D // 2, generator=g)).tolist())


CASES = {
    "none": dict(type="none"),
    "linear": dict(type="linear", factor=4.0),
    "ntk": dict(type="ntk", factor=4.0),
    "dynamic": dict(type="dynamic", factor=4.0),
    "yarn": dict(type="yarn", factor=4.0),
    "yarn_no_truncate": dict(type="yarn", factor=4.0, truncate=False),
    "yarn_betas_theta": dict(type="yarn", factor=4.0, beta_fast=16, beta_slow=2, theta=1e6, truncate=False),
    "yarn_mscale": dict(type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=0.8),
    "yarn_attention_factor": dict(type="yarn", factor=4.0, attention_factor=1.3, truncate=False),
    "llama3": dict(type="llama3", factor=4.0, theta=500000.0),
    "longrope": dict(type="longrope", factor=4.0, short_factor=_factors(0, 1.0, 1.5),
                     long_factor=_factors(1, 1.0, 8.0)),
    "longrope_attention_factor": dict(type="longrope", factor=4.0, attention_factor=1.2,
                                      short_factor=_factors(2, 1.0, 1.5), long_factor=_factors(3, 1.0, 8.0)),
}
SEQ_LENS = [None, 100, ORIG, ORIG + 1, TARGET, 3000]  # None = init time


def _rope(case):
    return build_rope(RopeConfig(original_max_position_embeddings=ORIG, **CASES[case]), D, TARGET)


def _hf_config(rope, form="both", arch="llama"):
    """A transformers config from to_hf() as it would come back from config.json."""
    hf = json.loads(json.dumps(rope.to_hf()))
    kwargs = dict(hidden_size=2 * D, num_attention_heads=2, num_key_value_heads=1, head_dim=D,
                  num_hidden_layers=1, vocab_size=16, intermediate_size=8,
                  max_position_embeddings=hf["max_position_embeddings"], rope_theta=hf["rope_theta"])
    if form in ("rope_parameters", "both"):
        kwargs["rope_parameters"] = hf["rope_parameters"]
    if form in ("rope_scaling", "both") and hf["rope_scaling"] is not None:
        kwargs["rope_scaling"] = hf["rope_scaling"]
    return HF_MODULES[arch][0](**kwargs)


def _hf_init(config, seq_len=None):
    rope_type = config.rope_parameters["rope_type"]
    fn = modeling_rope_utils.ROPE_INIT_FUNCTIONS.get(rope_type, LlamaRotaryEmbedding.compute_default_rope_parameters)
    return fn(config, device=None, seq_len=seq_len)


def _assert_rel(ours, theirs, rtol=1e-6):
    rel = ((ours.double() - theirs.double()).abs() / theirs.double().abs()).max().item()
    assert rel <= rtol, f"max relative error {rel:.2e}"


@pytest.mark.parametrize("form", ["rope_parameters", "rope_scaling", "both"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_inv_freq_and_scaling_match_transformers_init(case, form, monkeypatch):
    warnings = []
    monkeypatch.setattr(modeling_rope_utils.logger, "warning", lambda msg, *a, **k: warnings.append(msg))
    monkeypatch.setattr(modeling_rope_utils.logger, "warning_once", lambda msg, *a, **k: warnings.append(msg))
    rope = _rope(case)
    config = _hf_config(rope, form)
    assert config.rope_parameters["rope_type"] == rope.to_hf()["rope_parameters"]["rope_type"]
    for seq_len in SEQ_LENS:
        inv_freq, scaling = _hf_init(config, seq_len)
        ours = rope.inv_freq(seq_len)
        assert ours.dtype == torch.float32 and ours.shape == (D // 2,)
        _assert_rel(ours, inv_freq)
        assert rope.attention_scaling(seq_len) == pytest.approx(scaling, rel=1e-6)
    assert not warnings, f"transformers complained about our keys: {warnings}"


def test_strategies_really_differ():
    """Guard against a vacuous comparison: the cases exercise distinct code paths."""
    base = _rope("none").inv_freq()
    for case in CASES:
        if case != "none":
            assert not torch.equal(_rope(case).inv_freq(TARGET), base), case
    yarn = {c: (_rope(c).inv_freq(), _rope(c).attention_scaling()) for c in CASES if c.startswith("yarn")}
    assert not torch.equal(yarn["yarn"][0], yarn["yarn_no_truncate"][0])
    assert yarn["yarn_mscale"][1] != yarn["yarn"][1] > 1 and yarn["yarn_attention_factor"][1] == 1.3
    dyn = _rope("dynamic")
    assert torch.equal(dyn.inv_freq(ORIG), base) and not torch.equal(dyn.inv_freq(ORIG + 1), base)
    lr = _rope("longrope")
    assert not torch.equal(lr.inv_freq(ORIG), lr.inv_freq(ORIG + 1))
    llama3 = _rope("llama3")  # all three wavelength bands present
    ratio = llama3.inv_freq() / build_rope(RopeConfig(theta=500000.0), D, TARGET).inv_freq()
    assert (ratio == 1).any() and (ratio == 0.25).any() and ((ratio > 0.25) & (ratio < 1)).any()


def test_static_ntk_is_dynamic_ntk_frozen_at_factor_times_context():
    """transformers has no static NTK; its dynamic NTK with factor 1 at seq_len =
    factor * context is exactly the static NTK base, an independent check."""
    ours = _rope("ntk").inv_freq()
    config = LlamaConfig(hidden_size=2 * D, num_attention_heads=2, head_dim=D, max_position_embeddings=ORIG,
                         rope_parameters={"rope_type": "dynamic", "factor": 1.0, "rope_theta": 10000.0})
    inv_freq, _ = _hf_init(config, seq_len=4 * ORIG)
    _assert_rel(ours, inv_freq)


def test_to_hf_legacy_and_new_forms_agree():
    for case in CASES:
        hf = _rope(case).to_hf()
        assert json.loads(json.dumps(hf)) == hf
        params, legacy = hf["rope_parameters"], hf["rope_scaling"]
        assert params["rope_theta"] == hf["rope_theta"]
        if params["rope_type"] == "default":
            assert legacy is None
            continue
        assert legacy["type"] == legacy["rope_type"] == params["rope_type"]
        assert {k: v for k, v in params.items() if k != "rope_theta"} == {k: v for k, v in legacy.items() if k != "type"}
    assert _rope("dynamic").to_hf()["max_position_embeddings"] == ORIG  # transformers' dynamic NTK base context
    assert _rope("yarn").to_hf()["max_position_embeddings"] == TARGET


def _positions(max_pos, batch=2, seq=48):
    """[B, S] positions ending at max_pos - 1, second row shifted (as with packed documents)."""
    row = torch.arange(max_pos - seq, max_pos)
    return torch.stack([row, row - 7])[:batch]


@pytest.mark.parametrize("arch", sorted(HF_MODULES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_cos_sin_match_transformers_module_beyond_original_context(case, arch):
    rope_cfg = RopeConfig(original_max_position_embeddings=ORIG, **CASES[case])
    ours = RotaryEmbedding(rope_cfg, D, TARGET)
    config = _hf_config(ours.rope, "both", arch)
    x = torch.zeros(1)
    # Short, just past the original context, the target context, and far beyond it.
    for max_pos in (ORIG // 2, ORIG + 1, TARGET, 4 * TARGET):
        position_ids = _positions(max_pos)
        theirs = HF_MODULES[arch][1](config)  # fresh: transformers' dynamic NTK caches the longest length seen
        cos_ref, sin_ref = theirs(x, position_ids)
        cos, sin = ours(position_ids)
        assert cos.shape == (2, 48, D)
        torch.testing.assert_close(cos, cos_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sin, sin_ref, rtol=1e-6, atol=1e-6)
        cos16, _ = ours(position_ids, dtype=torch.bfloat16)
        cos16_ref, _ = theirs(x.to(torch.bfloat16), position_ids)
        assert torch.equal(cos16, cos16_ref)


def test_apply_rotary_matches_transformers():
    g = torch.Generator().manual_seed(0)
    rotary = RotaryEmbedding(RopeConfig(original_max_position_embeddings=ORIG, **CASES["yarn"]), D, TARGET)
    cos, sin = rotary(_positions(TARGET, seq=37))
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 4, 37, D, generator=g).to(dtype)
        k = torch.randn(2, 2, 37, D, generator=g).to(dtype)
        c, s = cos.to(dtype), sin.to(dtype)
        for ours, ref in zip(apply_rotary(q, k, c, s), apply_rotary_pos_emb(q, k, c, s)):
            assert ours.dtype == ref.dtype and torch.equal(ours, ref)


def test_rotary_module_buffers_stage_swap_and_dtype_casts():
    rotary = RotaryEmbedding(RopeConfig(), D, ORIG)
    assert not list(rotary.parameters()) and rotary.state_dict() == {}  # checkpoints never carry frequencies
    rotary.set_rope(RopeConfig(original_max_position_embeddings=ORIG, **CASES["yarn"]), TARGET)
    assert rotary.rope.name == "yarn" and rotary.attention_scaling > 1
    assert torch.equal(rotary.inv_freq, _rope("yarn").inv_freq())
    rotary.to(torch.bfloat16)  # a bf16 engine must not round the frequencies
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, _rope("yarn").inv_freq())
    meta = RotaryEmbedding(RopeConfig(original_max_position_embeddings=ORIG, **CASES["longrope"]), D, TARGET)
    meta.to("meta").to_empty(device="cpu")  # meta-device init: buffers come back exact
    assert torch.equal(meta.inv_freq_long, _rope("longrope").inv_freq(ORIG + 1))


@pytest.mark.parametrize("overrides, match", [
    (dict(type="rotary"), "unknown"),
    (dict(type="linear", factor=0.5), "factor must be >= 1"),
    (dict(type="yarn", factor=4.0, beta_fast=1.0, beta_slow=32.0), "beta_slow <= rope.beta_fast"),
    (dict(type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0), "low_freq_factor"),
    (dict(type="longrope", factor=4.0, short_factor=[1.0] * (D // 2), long_factor=[1.0] * 3), "long_factor"),
    (dict(type="longrope", factor=4.0, long_factor=[1.0] * (D // 2)), "short_factor with head_dim/2 = 32"),
    (dict(type="yarn", factor=4.0, attention_factor=0.0), "attention_factor"),
])
def test_bad_parameters_raise_helpful_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_rope(RopeConfig(**overrides), D, TARGET)
    with pytest.raises(ValueError, match="even head_dim"):
        build_rope(RopeConfig(), 63, TARGET)
