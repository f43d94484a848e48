"""Pattern-aware attention FLOPs (moetrain/flops.py): the visible pairs it counts equal the
pairs of the kernel reference's own mask (window, sinks, MoBA, document masks), and the
MFU counter on the model adds them up from real packed batches."""
import pytest
import torch

from moetrain.config import config_from_dict, head_dim
from moetrain.flops import (PairCounter, attention_flops, attention_pairs, causal_pairs, keys_per_query,
                            train_flops_per_token)
from moetrain.kernels.sparse_attention.common import check_args, moba_select
from moetrain.kernels.sparse_attention.reference import dense_mask

DOCS = [37, 5, 130, 1, 83]   # odd document lengths, packed into one row


def _model(**attn):
    return config_from_dict({"model": {"vocab_size": 64, "hidden_size": 32, "n_layers": 1, "n_heads": 2,
                                       "n_kv_heads": 1, "intermediate_size": 48, "moe": {"n_experts": 0},
                                       "attention": attn}}).model


def _mask_pairs(S, cu, seed=0, **kw):
    """Visible pairs per head of the reference mask (MoBA: with a real selection)."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 2, S, 8, generator=g), torch.randn(1, 1, S, 8, generator=g)
    spec = check_args(q, k, k, causal=True, cu_seqlens=torch.tensor(cu, dtype=torch.int32), scale=None, **kw)
    sel = moba_select(q, k, spec) if spec.moba_topk is not None else None
    mask = dense_mask(spec, S, sel, q.device).expand(1, 2, S, S)
    return [int(m.sum()) for m in mask[0]]


def _cu(docs):
    cu = [0]
    for n in docs:
        cu.append(cu[-1] + n)
    return cu


@pytest.mark.parametrize("attn,kw", [
    ({"layer_types": ["full"]}, dict(window=None, sink_tokens=0, block_size=64, moba_topk=None)),
    ({"layer_types": ["sliding"], "window": 16}, dict(window=16, sink_tokens=0, block_size=64, moba_topk=None)),
    ({"layer_types": ["sliding"], "window": 16, "sink_tokens": 3},
     dict(window=16, sink_tokens=3, block_size=64, moba_topk=None)),
    ({"layer_types": ["moba"], "block_size": 8, "moba_topk": 3},
     dict(window=None, sink_tokens=0, block_size=8, moba_topk=3)),
])
def test_pairs_equal_the_reference_mask(attn, kw):
    S = sum(DOCS)
    want = _mask_pairs(S, _cu(DOCS), **kw)
    got = attention_pairs(_model(**attn), DOCS)
    assert all(w == got for w in want), (want, got)
    if attn["layer_types"] != ["full"]:
        assert got < causal_pairs(_model(**attn), DOCS)


def test_moba_sinks_are_an_upper_bound():
    """With sinks the MoBA cost depends on which blocks each query picked: the count is
    the most it can be (sinks outside the selection) and at least the sink-free cost."""
    attn = {"layer_types": ["moba"], "block_size": 8, "moba_topk": 2, "sink_tokens": 5}
    got = attention_pairs(_model(**attn), DOCS)
    no_sinks = attention_pairs(_model(**{**attn, "sink_tokens": 0}), DOCS)
    for seed in range(3):
        for real in _mask_pairs(sum(DOCS), _cu(DOCS), seed, window=None, sink_tokens=5, block_size=8, moba_topk=2):
            assert no_sinks <= real <= got
    assert got > no_sinks


def test_layers_mix_and_full_last_n():
    m = _model(layer_types=["sliding", "moba", "full"], window=8, block_size=4, moba_topk=2,
               full_attention_last_n=2)
    m.n_layers = 5  # kinds: sliding, moba, full, full (last 2), full (last 2)
    one = {kind: keys_per_query(_model(**a), 50) for kind, a in
           {"sliding": {"layer_types": ["sliding"], "window": 8},
            "moba": {"layer_types": ["moba"], "block_size": 4, "moba_topk": 2},
            "full": {"layer_types": ["full"]}}.items()}
    assert keys_per_query(m, 50).tolist() == (one["sliding"] + one["moba"] + 3 * one["full"]).tolist()


def test_causal_flops_match_the_palm_formula_and_sparse_is_cheaper():
    cfg = config_from_dict({"model": {"vocab_size": 512, "hidden_size": 64, "n_layers": 4, "n_heads": 4,
                                      "n_kv_heads": 2, "intermediate_size": 96}}).model
    counts = {"total": 10_000, "active": 6_000, "embedding": 512 * 64}
    S = 4096
    palm = 6 * (counts["active"] - counts["embedding"]) + 6 * cfg.n_layers * S * cfg.n_heads * head_dim(cfg)
    assert train_flops_per_token(cfg, counts, S) == pytest.approx(palm, rel=2 / S)
    cfg.attention.layer_types, cfg.attention.window = ["sliding"], 256
    sliding = train_flops_per_token(cfg, counts, S)
    attn_part = sliding - 6 * (counts["active"] - counts["embedding"])
    # almost every query sees exactly W keys: ~ 12 * L * Hq * D * W per token
    assert attn_part == pytest.approx(12 * cfg.n_layers * cfg.n_heads * head_dim(cfg) * 256, rel=0.04)
    # documents of 512 tokens (doc masking): cheaper than one 4096-token document
    full = config_from_dict({"model": {"vocab_size": 512, "hidden_size": 64, "n_layers": 4, "n_heads": 4,
                                       "n_kv_heads": 2, "intermediate_size": 96}}).model
    assert train_flops_per_token(full, counts, S, doc_len=512) < train_flops_per_token(full, counts, S)
    assert attention_flops(full, 1) == 12 * full.n_heads * head_dim(full)


def test_pair_counter_counts_training_forwards_from_position_ids():
    from moetrain.model import build_model
    cfg = _model(layer_types=["sliding", "full"], window=16, sink_tokens=2)
    cfg.n_layers = 2
    model = build_model(cfg).train()
    counter = PairCounter()
    counter.set_stage(cfg, cfg.attention, 256)
    handle = counter.attach(model)
    pos = torch.cat([torch.arange(n) for n in DOCS])[None]
    ids = torch.randint(0, 64, pos.shape)
    model(ids, labels=ids, position_ids=pos, cu_seqlens=torch.tensor(_cu(DOCS), dtype=torch.int32))
    model(ids[:, :100], labels=ids[:, :100])  # no position ids: one 100-token document
    with torch.no_grad():
        model(ids)                           # not training work: not counted
    model.eval()
    model(ids, labels=ids)
    handle.remove()
    want = attention_pairs(cfg, DOCS) + attention_pairs(cfg, [100])
    assert counter.take(torch.device("cpu")).item() == pytest.approx(want)
    assert counter.take(torch.device("cpu")).item() == 0.0


def test_mfu_in_metrics_counts_the_batches_attention(tiny_data, tmp_path, monkeypatch):
    """A real (tiny) packed run: the logged MFU is exactly 6N per token plus the attention
    pairs of the batches the loader handed out (replayed here), over the peak."""
    import json
    from moetrain import compose
    from moetrain.config import load_config
    from moetrain.data import TokenLoader
    from moetrain.train import collector
    from moetrain.train.schedule import plan_stages
    from train_helpers import ROOT, tiny_overrides
    monkeypatch.setattr(collector, "device_peak_flops", lambda device: 1e9)
    cfg = load_config(f"{ROOT}/configs/default.yaml", tiny_overrides(tiny_data, steps=3) + [
        "data.mode=packed", "model.attention.sink_tokens=2", "checkpoint.every_steps=100"])
    run = str(tmp_path / "run")
    compose.train(cfg, run, resume="never")
    recs = [json.loads(x) for x in open(f"{run}/metrics.jsonl") if x.strip()]
    steps = [r for r in recs if "event" not in r]
    plan = plan_stages(cfg, 1)[0]
    loader = TokenLoader(plan.data, seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size, dp_rank=0,
                         dp_world=1, seed=cfg.seed, split="train", doc_masking=plan.attention.doc_masking)
    table = torch.from_numpy(keys_per_query(cfg.model, plan.seq_len, plan.attention))
    from moetrain.model import build_model
    counts = build_model(cfg.model).param_counts()
    dense = 6.0 * (counts["active"] - counts["embedding"])
    prev_tokens = 0
    for rec in steps:
        pairs = sum(float(table[loader.next_batch()["position_ids"]].sum()) for _ in range(plan.grad_accum_steps))
        tokens = rec["tokens"] - prev_tokens
        prev_tokens = rec["tokens"]
        flops = dense * tokens + attention_flops(cfg.model, pairs)
        assert rec["mfu"] * 1e9 / rec["tokens_per_s"] * tokens == pytest.approx(flops, rel=1e-9)
    causal = attention_flops(cfg.model, causal_pairs(cfg.model, [plan.seq_len])) * plan.micro_batch_size
    assert attention_flops(cfg.model, pairs) < causal  # window + sinks + documents < full causal


def test_dry_run_of_the_node_config_prints_sp_memory_and_pattern_flops(capsys):
    """configs/h100_ctx_4k_32k_128k.yaml: sequence-parallel over 4 GPUs (heads divide), the
    per-GPU activations at every stage with and without it, FLOPs per token by pattern."""
    from train_helpers import ROOT
    from moetrain.config import load_config
    from moetrain.train.dryrun import activation_bytes_per_gpu, dry_run
    cfg = load_config(f"{ROOT}/configs/h100_ctx_4k_32k_128k.yaml")
    sp = cfg.deepspeed.sequence_parallel_size
    assert sp > 1 and cfg.model.n_heads % sp == 0 and cfg.model.n_kv_heads % sp == 0
    rep = dry_run(cfg, 8)
    out = capsys.readouterr().out
    assert f"act sp={sp}" in out and "act sp=1" in out and "full causal" in out
    last = rep["activations_by_stage"][-1]
    assert last["seq_len"] == 131072
    assert last[f"activations_sp{sp}"] < last["activations_sp1"] / 3
    assert last[f"total_sp{sp}"] < 60  # leaves room on an 80 GB H100
    # Tokens per step as planned: micro-batch x accumulation x (8 / sp) groups x seq_len.
    steps = {s["name"]: s for s in rep["stages"]}
    assert steps["ctx128k"]["micro_batch_size"] * steps["ctx128k"]["grad_accum_steps"] * (8 // sp) * 131072 == 2**20
    assert rep["deepspeed"]["train_batch_size"] == \
        steps["ctx4k"]["micro_batch_size"] * steps["ctx4k"]["grad_accum_steps"] * 8  # DeepSpeed sees all ranks
    flops = {r["stage"]: r for r in rep["flops_by_stage"]}
    assert flops["ctx4k"]["tflop_per_token"] == flops["ctx4k"]["tflop_per_token_full_causal"]  # window = 4096
    assert flops["ctx128k"]["tflop_per_token"] < 0.5 * flops["ctx128k"]["tflop_per_token_full_causal"]
    # Memory modes order as they should: recompute everything < keep everything.
    full = activation_bytes_per_gpu(cfg, 131072, 1, sp)
    cfg.memory.checkpoint, cfg.model.activation_checkpointing = "none", False
    assert activation_bytes_per_gpu(cfg, 131072, 1, sp) > 3 * full
