"""Stage-end evaluation inside a real (tiny) two-stage training run, then
scripts/eval_long.py on that run folder, on a Hugging Face folder, and on bad input."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "eval_long.py")
STAGES = ("[{name: short, seq_len: 64, steps: 3}, {name: long, seq_len: 160, steps: 2, warmup_steps: 1, "
          "rope: {type: yarn, factor: 2.5}}]")
EVAL = {"eval.enabled": "true", "eval.lengths": "[160]", "eval.passkey_trials": 2, "eval.depths": "[0, 1]",
        "eval.loss_documents": 2, "eval.position_buckets": 4}


def _eval_long():
    spec = importlib.util.spec_from_file_location("eval_long_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run_dir(tiny_cfg, tmp_path_factory):
    from moetrain.compose import train
    run = str(tmp_path_factory.mktemp("evalrun"))
    train(tiny_cfg(stages=STAGES, **EVAL), run, resume="never")
    return run


def _stage_end(run, stage):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return next(r for r in recs if r.get("event") == "stage_end" and r["stage"] == stage)


def test_stage_end_records_and_files(run_dir):
    for stage in ("short", "long"):
        rec = _stage_end(run_dir, stage)
        for key in ("eval_loss", "passkey_acc", "passkey_acc@160", "loss@160", "loss_pos_first", "loss_pos_last"):
            assert key in rec, (stage, key)
        for name in ("eval.json", "loss_by_position.png", "passkey_heatmap.png"):
            assert os.path.isfile(os.path.join(run_dir, "eval", stage, name)), (stage, name)
    assert os.path.isfile(os.path.join(run_dir, "eval", "loss_by_position_stages.png"))


def test_eval_long_on_run_dir_reproduces_the_stage_end_eval(run_dir, tmp_path):
    """Loading the checkpoint (weights, and the last stage's YaRN) gives the very numbers
    the training engine gave at the end of that stage."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    p = subprocess.run([sys.executable, SCRIPT, "--model", run_dir, "--lengths", "160", "--depths", "0,1",
                        "--trials", "2", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.load(open(out / "eval.json"))
    assert res["model"]["kind"] == "moetrain" and res["model"]["stage"] == "long"
    assert res["model"]["rope"]["type"] == "yarn"
    want = _stage_end(run_dir, "long")
    assert res["metrics"]["loss@160"] == pytest.approx(want["loss@160"], abs=1e-4)
    assert res["metrics"]["passkey_acc@160"] == want["passkey_acc@160"]
    assert (out / "loss_by_position.png").is_file() and (out / "passkey_heatmap.png").is_file()
    printed = json.loads(p.stdout[p.stdout.index("{\n"):])  # DeepSpeed may log a line before it
    assert printed["passkey_acc@160"] == want["passkey_acc@160"]


def test_eval_long_on_one_checkpoint_uses_its_config(run_dir, tmp_path):
    from moetrain.checkpoint import newest_complete
    path = newest_complete(os.path.join(run_dir, "checkpoints"))
    rc = _eval_long().main(["--model", path, "--depths", "1", "--trials", "1", "--out", str(tmp_path)])
    res = json.load(open(tmp_path / "eval.json"))
    assert rc == 0 and res["model"]["checkpoint"] == path
    # eval settings and lengths from the checkpoint's own config (eval.lengths [160], loss_documents 2)
    assert res["settings"]["lengths"] == [160] and res["settings"]["loss_documents"] == 2


def test_eval_long_on_hf_folder(tiny_data, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import torch
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160)
    hf = tmp_path / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf)
    shutil.copy(os.path.join(tiny_data, "tokenizer.model"), hf / "tokenizer.model")
    out = tmp_path / "out"
    rc = _eval_long().main(["--model", str(hf), "--lengths", "160,200", "--depths", "0.5", "--trials", "3",
                            "--data-dir", tiny_data, "--set", "eval.loss_documents=2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.load(open(out / "eval.json"))
    assert res["model"]["kind"] == "hf" and res["model"]["architecture"] == "LlamaForCausalLM"
    assert res["passkey"]["lengths"] == [160, 200] and res["settings"]["trials"] == 3
    assert set(res["loss_by_position"]) == {"160", "200"} and res["loss_by_position"]["200"]["windows"] == 2
    assert (out / "passkey_heatmap.png").is_file() and (out / "loss_by_position.png").is_file()
    # Without --data-dir the HF folder still gets its passkey grid; the loss curves are skipped, with a note.
    rc = _eval_long().main(["--model", str(hf), "--lengths", "160", "--depths", "0.5", "--trials", "2",
                            "--out", str(tmp_path / "out2")])
    res = json.load(open(tmp_path / "out2" / "eval.json"))
    assert rc == 0 and res["loss_by_position"] == {} and "give --data-dir" in res["notes"][0]


@pytest.mark.parametrize("args,msg", [
    (["--model", "/nonexistent/run"], "is not a folder"),
    (["--model", "{run}", "--lengths", "12a"], "comma-separated integers"),
    (["--model", "{run}", "--depths", "0,1.5"], "numbers in [0, 1]"),
    (["--model", "{run}", "--set", "eval.position_buckets=0"], "eval.position_buckets"),
    (["--model", "{run}", "--trials", "x"], "invalid int value"),
    (["--model", "{tmp}"], "no complete checkpoint"),
])
def test_bad_input_is_one_line_and_exit_2(args, msg, run_dir, tmp_path, capsys):
    args = [a.format(run=run_dir, tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        sys.exit(_eval_long().main(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and msg in err and "\n" not in err, err


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--model", str(tmp_path), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr, p.stderr
