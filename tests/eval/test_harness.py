"""lm-evaluation-harness on a tiny trained model's export (scripts/eval_harness.py): its held-out
perplexity and passkey numbers equal ours on the same windows and trials."""
import importlib.util
import json
import os
import sys

import pytest

from moetrain.eval.harness import compare as C
from moetrain.eval.harness import rows as R
from moetrain.eval.harness.utils import passkey_correct

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "eval_harness.py")
VLLM_VENV = os.environ.get("MOETRAIN_VLLM_VENV") or os.path.join(ROOT, ".venv-vllm")
# lengths: 160 (the shortest the passkey prompt fits; the vLLM backend takes rows up to the trained
# context 168 less its 2 extra positions) and a shorter one
ARGS = ["--lengths", "64,160", "--depths", "0,1", "--trials", "3", "--windows", "16"]


def _script():
    spec = importlib.util.spec_from_file_location("eval_harness_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run_dir(tiny_cfg, tmp_path_factory):
    """A tiny model trained 20 steps at 168 tokens, exported (fp32) at the end of training. Head
    size 32 (hidden 128 / 4 heads): vLLM's CPU attention has no kernel for 16."""
    from moetrain.compose import train
    run = str(tmp_path_factory.mktemp("harness_run"))
    train(tiny_cfg(**{"model.hidden_size": 128, "stages": "[{name: main, seq_len: 168, steps: 20}]",
                      # all layers sliding (32): vLLM 0.32 computes a sliding/full mix differently (harness README)
                      "model.attention.layer_types": "[sliding, sliding]",
                      "export.enabled": "true", "export.verify": "false"}), run, resume="never")
    return run


@pytest.fixture(scope="module")
def hf_result(run_dir, tmp_path_factory):
    pytest.importorskip("lm_eval")
    out = str(tmp_path_factory.mktemp("harness_hf"))
    rc = _script().main(["--model", os.path.join(run_dir, "export"), "--out", out] + ARGS)
    with open(os.path.join(out, "harness.json")) as f:
        return rc, json.load(f), out


@pytest.mark.slow
def test_hf_backend_agrees_with_our_eval(hf_result, run_dir, tiny_data):
    rc, res, _ = hf_result
    assert rc == 0, res["backends"]["hf"]
    assert res["ours"]["kind"] == "moetrain" and "step_00000020" in res["ours"]["path"]  # the training checkpoint
    hf = res["backends"]["hf"]
    for length in ("64", "160"):
        p = hf["perplexity"][length]
        rows = res["rows"]["ppl_windows"][length]
        assert rows["windows"] == 16 and p["windows"] == rows["kept"] >= 3, rows
        assert p["abs_diff"] <= C.PPL_TOL["hf"] and p["max_row_diff"] <= C.PPL_TOL["hf"] and p["agree"], p
        assert 1.0 < p["ours_nll"] < 7.0  # a trained model: below uniform (ln 512 = 6.24 +)
    # The harness's own aggregate is the per-row number the comparison used (over both lengths).
    tot = sum(hf["perplexity"][L]["harness_nll"] * hf["perplexity"][L]["windows"] * int(L) for L in ("64", "160"))
    n = sum(hf["perplexity"][L]["windows"] * int(L) for L in ("64", "160"))
    assert hf["results"][R.PPL_TASK]["token_nll"] == pytest.approx(tot / n, abs=1e-9)
    pk = hf["passkey"]["160"]
    assert res["rows"]["passkey_dropped"] == 0 and pk["trials"] == 6 and pk["agree"] and not pk["differ"]
    assert pk["harness_acc"] == pk["ours_acc"] == hf["results"][R.PASSKEY_TASK]["exact_match"]
    assert "64" not in hf["passkey"] and any("64 tokens" in n for n in res["rows"]["notes"])


@pytest.mark.slow
def test_ours_are_our_eval_numbers(hf_result, run_dir, tiny_data):
    """'Ours' in harness.json is what our eval reports: loss@L over the same windows (eval.json's
    loss_by_position mean) and the passkey grid's accuracy for the same seed and cells."""
    from moetrain.eval import load_for_eval, passkey_grid
    from moetrain.eval.position_loss import loss_by_position
    _, res, _ = hf_result
    m = load_for_eval(run_dir)
    for length in (64, 160):
        want = loss_by_position(m.forward, tiny_data, length, 16, 4)
        assert res["ours"]["perplexity"][str(length)]["nll"] == pytest.approx(want["mean"], abs=1e-6)
    grid = passkey_grid(m.forward, m.tokenizer, [160], [0.0, 1.0], 3, seed=0, key_digits=5)
    assert res["ours"]["passkey_grid"]["160"] == grid["accuracy_by_length"]["160"]


@pytest.mark.slow
def test_task_folder_runs_as_written(hf_result, run_dir):
    """OUT/tasks is a plain --include_path folder; with add_bos_token left at the tokenizer's
    default (<s> before every window) the numbers move far past the tolerance, so the
    comparison can tell a wrong setting apart."""
    from moetrain.eval.harness.runner import run_tasks
    _, res, out = hf_result
    tasks = os.path.join(out, "tasks")
    assert {"moetrain_heldout_ppl.jsonl", "moetrain_heldout_ppl.yaml", "moetrain_passkey.jsonl",
            "moetrain_passkey.yaml", "utils.py"} <= set(os.listdir(tasks))
    # max_length 200: room for the extra <s>, so that nothing is truncated and only the <s> differs
    args = {"pretrained": os.path.join(run_dir, "export"), "dtype": "float32", "max_length": 200, "device": "cpu"}
    wrong = run_tasks("hf", args, tasks, [R.PPL_TASK], batch_size=8)
    right = res["backends"]["hf"]["results"][R.PPL_TASK]["token_nll"]
    assert abs(wrong["results"][R.PPL_TASK]["token_nll"] - right) > C.PPL_TOL["vllm"]


def test_rows_round_trip_or_are_dropped(run_dir, tiny_data):
    from transformers import AutoTokenizer
    from moetrain.eval.position_loss import held_out_windows
    tok = AutoTokenizer.from_pretrained(os.path.join(run_dir, "export"))
    windows = held_out_windows(tiny_data, 32, 24)
    rows, kept = R.ppl_rows(tok, {32: windows})
    assert 0 < len(rows) < len(windows)  # stdlib code: many windows start inside a word
    for row in rows:
        w = windows[row["window"]].tolist()
        assert R.encode_pair(tok, row["context"], row["continuation"]) == (w[:1], w[1:])
        assert row["context"] == "" if w[0] == tok.bos_token_id else row["context"]
    starts_inside = next(w for w in windows if not tok.convert_ids_to_tokens(int(w[0])).startswith("▁")
                         and int(w[0]) != tok.bos_token_id)
    assert R.window_row(tok, starts_inside) is None


@pytest.mark.parametrize("text,want", [
    (" 12345", True), (" 12345.", True), ("\n12345", True), ("12345", True), (" 1234", False),
    (" 123456", False), (" 12346", False), ("     ", False), ("", False), (" the", False), (" 12x", False),
])
def test_harness_metric_is_our_verdict(text, want):
    """The harness's exact match equals our verdict once decoding has used its token budget."""
    from moetrain.eval.passkey import verdict
    assert passkey_correct(text, "12345") is want
    assert verdict(text, "12345", 6, 6) is want


def test_missing_lm_eval_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    rc = _script().main(["--model", os.path.join(run_dir, "export"), "--out", str(tmp_path)] + ARGS)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "pip install -e '.[eval]'" in err, err
    assert not os.path.exists(tmp_path / "harness.json")


@pytest.mark.parametrize("args,msg", [
    (["--model", "{tmp}"], "no config.json"),
    (["--model", "{export}", "--backends", "hf,tgi"], "--backends"),
    (["--model", "{export}", "--lengths", "6x"], "comma-separated"),
    (["--model", "{export}", "--windows", "0"], "--windows"),
    (["--model", "{export}", "--data-dir", "{tmp}/nope"], "--data-dir"),
    (["--model", "{export}", "--backends", "vllm", "--lengths", "400"], "max_position_embeddings is 168"),
    # a row of 167 tokens would need positions 168 and 169, past vLLM's RoPE table
    (["--model", "{export}", "--backends", "vllm", "--lengths", "64,167"], "use --lengths up to 166"),
])
def test_bad_input_is_one_line_and_exit_2(args, msg, run_dir, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, export=os.path.join(run_dir, "export")) for a in args]
    rc = _script().main(args + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and msg in err and "\n" not in err, err


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(VLLM_VENV, "bin", "python"))
                    and os.environ.get("MOETRAIN_REQUIRE_VLLM") != "1",  # CI (.ci/run) sets it: fail, not skip
                    reason=f"no vLLM venv at {VLLM_VENV}; create it with `bash scripts/serving_env.sh --with-lm-eval`")
def test_vllm_backend_agrees_with_our_eval(run_dir, tmp_path):
    out = str(tmp_path / "vllm")
    rc = _script().main(["--model", os.path.join(run_dir, "export"), "--out", out, "--backends", "vllm"] + ARGS)
    assert os.path.isfile(os.path.join(out, "harness.json")), f"eval_harness.py exit {rc} (its error line above)"
    with open(os.path.join(out, "harness.json")) as f:
        res = json.load(f)
    v = res["backends"]["vllm"]
    assert rc == 0, v
    for length in ("64", "160"):
        p = v["perplexity"][length]
        assert p["abs_diff"] <= C.PPL_TOL["vllm"] and p["max_row_diff"] <= C.PPL_TOL["vllm"], p
    assert v["passkey"]["160"]["agree"] and v["passkey"]["160"]["trials"] == 6


def test_default_lengths_stop_short_of_the_rope_table_for_vllm():
    from moetrain.eval.harness.backends import fit_lengths
    assert fit_lengths([128, 512], ["hf"], 512) == ([128, 512], [])
    lengths, notes = fit_lengths([128, 512], ["hf", "vllm"], 512)
    assert lengths == [128, 510] and len(notes) == 1 and "512 evaluated at 510" in notes[0]
    assert fit_lengths([510, 512], ["vllm"], 512)[0] == [510]


def test_a_nan_row_from_a_backend_is_a_disagreement():
    # Python's max() keeps its first operand when the other is NaN: a NaN window must not hide.
    import math
    from moetrain.eval.harness.compare import compare_perplexity
    ours = {512: {"kept": 2, "nll_kept": 1.0, "rows": {0: 1.0, 1: 1.0}}}
    for rows in ({0: 1.0, 1: math.nan}, {0: math.nan, 1: 1.0}):
        out = compare_perplexity(ours, {512: {"nll": 1.0, "rows": rows}}, 1e-5)[512]
        assert out["agree"] is False and math.isnan(out["max_row_diff"])
    assert compare_perplexity(ours, {512: {"nll": 1.0, "rows": {0: 1.0, 1: 1.0}}}, 1e-5)[512]["agree"] is True
