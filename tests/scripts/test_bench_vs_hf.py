"""scripts/bench_vs_hf.py and scripts/gpu_check.sh at tiny sizes: the search's doubling and
bisection, skipping points that cannot fit, the tables, pattern-aware FLOPs (moetrain.flops), one training
point of each stack, and the memory cap killing a try that exceeds it."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bvh = _load("bench_vs_hf")


def _threshold_try(limit, seen):
    def try_fn(S):
        seen.append(S)
        return S <= limit
    return try_fn


@pytest.mark.parametrize("limit", [1024, 5000, 10_240, 11_000, 12_287, 70_000])
def test_longest_doubles_then_bisects(limit):
    seen = []
    lo, hi, tries = bvh.longest(_threshold_try(limit, seen), 1024, 1 << 20, 256)
    assert lo <= limit < hi
    assert hi - lo <= max(256, lo // 8)
    assert len(set(seen)) == len(seen)  # never tries a length twice
    assert [S for S, _ in tries] == seen and all(ok == (S <= limit) for S, ok in tries)
    doubling = [S for S in seen if S <= 2 * lo and S & (S - 1) == 0]
    assert doubling[:2] == [1024, 2048][:len(doubling[:2])]


def test_longest_cap_and_first_failure():
    lo, hi, tries = bvh.longest(lambda S: True, 1000, 8000, 100)
    assert (lo, hi) == (8000, None) and [S for S, _ in tries] == [1000, 2000, 4000, 8000]
    lo, hi, tries = bvh.longest(lambda S: False, 1000, 8000, 100)
    assert (lo, hi, len(tries)) == (None, 1000, 1)


def _args(**kw):
    a = bvh.parse_args(["--tiny"])
    vars(a).update(kw)
    return a


def test_sweep_skips_what_cannot_fit(monkeypatch):
    ran = []

    def fake(a, v, S, warmup, steps):  # hf: 1 GB + 1 GB per 1000 tokens; dense: a quarter; sliding blows up at 4000
        ran.append((v, S))
        gb = (1 + S / 1000) * (1 if v == "hf" else 0.25)
        fits = gb <= a.budget_gb and not (v == "sliding" and S >= 4000)
        return {"status": "ok" if fits else "oom", "tok_s": 1000.0, "tok_cpu_s": 900.0, "peak_gb": gb,
                "flops_per_token": 1e6,
                "note": "killed"}
    monkeypatch.setattr(bvh, "run_capped", fake)
    a = _args(seq_lens="1000,2000,4000,6000,8000,16000", variants="hf,dense,sliding", budget_gb=8.0)
    res = {v: dict(rows) for v, rows in bvh.sweep(a, lambda s: None).items()}
    # hf: 6000 extrapolates to 7 GB and runs; 8000 is predicted at 9 GB > 8 GB; 16000 follows it
    assert [s for v, s in ran if v == "hf"] == [1000, 2000, 4000, 6000]
    assert res["hf"][8000]["status"] == "skip" and "predicted 9.0 GB" in res["hf"][8000]["note"]
    assert res["hf"][16000]["status"] == "skip" and "at 8000" in res["hf"][16000]["note"]
    assert [s for v, s in ran if v == "dense"] == [1000, 2000, 4000, 6000, 8000, 16000]
    assert [s for v, s in ran if v == "sliding"] == [1000, 2000, 4000]
    assert res["sliding"][4000]["status"] == "oom" and "at 4000" in res["sliding"][16000]["note"]


def _ok(tok_s, gb, cpu_ratio=1.0):
    return {"status": "ok", "tok_s": tok_s, "tok_cpu_s": tok_s * cpu_ratio, "peak_gb": gb, "flops_per_token": 2e6}


def test_tables_show_ratios_and_targets():
    res = {"hf": [(2048, _ok(1000, 2.0)), (16384, _ok(400, 12.0))],
           "dense": [(2048, _ok(1100, 1.5)), (16384, {"status": "skip", "note": "predicted 9 GB"})],
           "sliding": [(2048, _ok(1200, 1.5)), (16384, _ok(1200, 4.0, cpu_ratio=0.7))],
           "sliding+mem": [(16384, _ok(900, 1.0)), (32768, _ok(800, 1.5))]}
    found = {"hf": {"longest": 10240, "first_fail": 11264, "capped": False, "result": _ok(300, 7.9),
                    "tries": [(16384, "oom"), (12288, "oom"), (10240, "ok"), (11264, "oom")]},
             "sliding+mem": {"longest": 131072, "first_fail": None, "capped": True, "result": _ok(600, 5.0),
                             "tries": [(65536, "ok"), (131072, "ok")]}}
    pts = "\n".join(bvh.points_table(res, 1e11))
    assert "1.10x" in pts and "0.75x" in pts and "  1100" in pts  # dense at 2k: tok/s and memory against hf
    assert "skip: predicted 9 GB" in pts
    assert "    2.2" in pts  # MFU of dense at 2k: 2e6 flop/token * 1100 tok/s / 1e11 flop/s
    srch = "\n".join(bvh.search_table(found, 8))
    assert ">=131072" in srch and "10240" in srch and "11264:oom" in srch
    a = _args(budget_gb=8.0)
    tgt = bvh.targets_table(a, res, found)
    by_name = {line[:52].strip(): line for line in tgt[2:]}
    assert by_name["tok/s at 2k, dense: ours / hf (wall/cpu)"].rstrip().endswith("yes")
    fast = by_name["tok/s at 16k: ours sliding / hf dense (wall/cpu)"]
    assert "3.00x/2.10x" in fast and fast.rstrip().endswith("mixed")
    assert "0.08x" in by_name["peak memory at 16k: ours sliding+mem / hf dense"]
    assert by_name["longest trainable in 8 GB, sliding+mem"].rstrip().endswith("NO")
    assert "12.80x" in by_name["... / hf's longest"]
    assert "0.75x/0.75x" in by_name["tok/s there / sliding+mem at 32k (wall/cpu)"]
    # a search whose only try timed out says so, rather than "not searched"
    found["sliding+mem"] = {"longest": None, "first_fail": 1179648, "capped": False, "result": None,
                            "tries": [(1179648, "timeout")]}
    by_name = {line[:52].strip(): line for line in bvh.targets_table(a, res, found)[2:]}
    assert "(no try passed: 1179648:timeout)" in by_name["longest trainable in 8 GB, sliding+mem"]
    assert "(no sliding+mem length)" in by_name["tok/s there / sliding+mem at 32k (wall/cpu)"]


def test_report_from_a_saved_json(tmp_path):
    a = _args(budget_gb=8.0, seq_lens="2048")
    res = {"hf": [(2048, _ok(1000, 2.0))], "dense": [(2048, _ok(1100, 1.5))]}
    found = {"hf": {"longest": 2048, "first_fail": None, "capped": False, "partial": True,
                    "result": _ok(1000, 2.0), "tries": [(2048, "ok")]}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"args": vars(a), "peak_flops": 1e11, "points": res, "search": found}))
    text = "\n".join(bvh.report_from_json(str(path)))
    assert "budget 8 GB" in text and "1.10x" in text and ">=2048" in text  # partial search: a lower bound
    assert "tok/s at 2k, dense: ours / hf (wall/cpu)" in text


def test_flops_match_model_helper_for_dense_and_shrink_for_sliding():
    a = _args()
    dense = bvh.train_config(a, "dense", "cpu").model
    sliding = bvh.train_config(a, "sliding", "cpu").model
    from moetrain.model import build_model
    S = 1024
    assert bvh.flops_per_token(dense, S) == pytest.approx(build_model(dense).flops_per_token(S), rel=2e-3)
    assert bvh.flops_per_token(sliding, S) < 0.95 * bvh.flops_per_token(dense, S)


def test_variant_configs_and_bad_variant():
    a = _args()
    cfg = bvh.train_config(a, "sliding+mem", "cpu")
    assert cfg.model.attention.layer_types == ["sliding"] and cfg.model.attention.window == 64
    assert cfg.memory.checkpoint == "full" and cfg.memory.mlp_tile_tokens == 64 and not cfg.memory.offload
    assert bvh.train_config(a, "dense", "cuda").memory.checkpoint == "none"
    with pytest.raises(SystemExit, match="unknown variant 'sparse'"):
        bvh.split_variant("sparse")


@pytest.mark.parametrize("variant", ["hf", "sliding+mem"])
def test_one_tiny_point_per_stack(variant, monkeypatch):
    # run_point applies the host settings as a run would; keep its os.environ change
    # (THP_MEM_ALLOC_ENABLE for +mem) out of the later tests' subprocesses
    monkeypatch.setattr(os, "environ", dict(os.environ))
    a = _args()
    r = bvh.run_point({"args": vars(a), "variant": variant, "S": 128, "warmup": 0, "steps": 1,
                       "device": "cpu", "budget_gb": 20})
    assert r["status"] == "ok" and r["tok_s"] > 0 and r["peak_gb"] > 0.05 and r["flops_per_token"] > 0


def test_cap_kills_only_the_try():
    a = _args(budget_gb=0.15, point_timeout=120)  # below what importing torch alone needs
    r = bvh.run_capped(a, "dense", 128, 0, 1)
    assert r["status"] == "oom", r


def test_gpu_summary_reads_the_stage_outputs(tmp_path, capsys):
    ba = _load("bench_attention")
    rows = []
    for S in (16384, 65536):  # GPU-like: dense-equivalent TFLOP/s of the window rows above 1000
        base = (10.0 * (S // 16384) ** 2, 30.0 * (S // 16384) ** 2)
        rows.append((S, "causal", "sdpa", *base, S * S // 2, S * S // 2, base))
        rows.append((S, "causal", "ours", base[0] * 1.25, base[1] * 0.8, S * S // 2, S * S // 2, base))
        rows.append((S, "window", "ours", base[0] / 10, base[1] / 8, S * 4096, S * S // 2, base))
    ba.print_table(rows, 4 * 16 * 128)
    (tmp_path / "attention.log").write_text(capsys.readouterr().out)
    (tmp_path / "pytest.log").write_text("....\n7 passed, 3 deselected in 41.2s\n")
    (tmp_path / "pytest.rc").write_text("0\n")
    (tmp_path / "search.json").write_text(
        '{"args": {"device": "cuda", "dtype": "bf16"}, "peak_flops": 1e15, "points": {"sliding+mem": []}, '
        '"search": {"sliding+mem": {"longest": 1572864, "first_fail": 2097152, "capped": false, "result": null, '
        '"tries": []}}}')
    (tmp_path / "smoke.json").write_text(
        '{"args": {"device": "cuda", "dtype": "bf16"}, "peak_flops": 1e15, "search": {}, "points": {"cfg": '
        '[[4096, {"status": "ok", "tok_s": 20000, "tok_cpu_s": 1, "flops_per_token": 1e10, "peak_gb": 9}]]}}')
    text = "\n".join(bvh.gpu_summary(str(tmp_path)))
    tf16 = 4 * 16 * 128 * (16384 * 16384 // 2) / 12.5e-3 / 1e12
    assert f"{tf16:.0f}" in text
    assert "10.0x / 8.0x" in text  # window at 64k against SDPA causal at 64k
    assert "1572864" in text and "20000 tok/s 20.0% MFU" in text and "bf16 train step" in text
    assert "7 passed" in text and "3 deselected" not in text


def test_gpu_check_script_parses():
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
