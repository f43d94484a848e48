"""The end-of-run summary (moetrain/eval/summary.py): a tiny two-stage run with evaluation
and export ends with summary.md, the console table, plots and working commands."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from moetrain.config import load_config
from moetrain.eval.summary import SUMMARY_MD, read_jsonl, write_summary

from conftest import DEFAULT, tiny_overrides

# The tiny tokenizer needs >= 167 tokens for a passkey prompt.
STAGES = "[{name: short, seq_len: 96, steps: 4}, {name: long, seq_len: 192, steps: 3, rope: {type: ntk, factor: 2.0}}]"


class FakeWandb:
    def __init__(self):
        self.logged, self.summary = [], {}

    def log(self, data, commit=True, step=None):
        self.logged.append(data)


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    from moetrain.compose import train
    run = str(tmp_path_factory.mktemp("summary") / "run")
    cfg = load_config(DEFAULT, tiny_overrides(tiny_data, **{
        "stages": STAGES, "model.attention.layer_types": "[full]", "eval.enabled": "true",
        "eval.lengths": "[192, 384]", "eval.passkey_trials": 2, "eval.depths": "[0, 1]", "eval.loss_documents": 2,
        "export.enabled": "true", "logging.every_steps": 2}))
    train(cfg, run, resume="never")
    return run


def test_summary_md_holds_one_row_per_stage_with_the_run_s_numbers(finished_run, capsys):
    text = open(os.path.join(finished_run, SUMMARY_MD)).read()
    records = read_jsonl(os.path.join(finished_run, "metrics.jsonl"))
    steps = [r for r in records if "event" not in r]
    rows = [line for line in text.splitlines() if line.startswith("| short") or line.startswith("| long")]
    assert len(rows) == 2
    short, long_ = (line.split(" | ") for line in rows)
    assert short[3] == "4 (1-4)" and long_[3] == "3 (5-7)"
    ends = [r for r in records if r.get("event") == "stage_end"]
    assert short[4] == f"{ends[0]['tokens']:,}" and long_[4] == f"{ends[1]['tokens'] - ends[0]['tokens']:,}"
    assert ends[0]["tokens"] == next(r["tokens"] for r in steps if r["step"] == 4)  # step 4 is a logged step
    short_losses = [r["loss"] for r in steps if r["stage"] == "short"]
    assert float(short[5]) == pytest.approx(sum(short_losses[-5:]) / len(short_losses[-5:]), abs=5e-4)
    end = next(r for r in records if r.get("event") == "stage_end" and r["stage"] == "long")
    assert float(long_[6]) == pytest.approx(end["eval_loss"], abs=5e-4)
    assert long_[2] == "ntk" and re.fullmatch(r"\d+%", long_[-1].rstrip(" |"))
    assert "after stage 'short' (trained at 96, no extension)" in text
    for png in re.findall(r"\]\((\S+\.png)\)", text):
        with open(os.path.join(finished_run, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "plots/training_curve.png" in text and "plots/passkey_by_stage.png" in text


def test_the_summary_names_the_export_and_its_generate_command_runs(finished_run):
    text = open(os.path.join(finished_run, SUMMARY_MD)).read()
    export = os.path.join(finished_run, "export")
    assert f"Export: `{export}`" in text and "verified against transformers" in text
    assert f"vllm serve {export}" in text and "--max-model-len 192" in text
    cmd = next(line for line in text.splitlines() if line.startswith("python -c "))
    out = subprocess.run([sys.executable] + shlex.split(cmd)[1:], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("ROMEO:")


def test_write_summary_sends_the_table_and_plots_to_wandb(finished_run):
    wb = FakeWandb()
    write_summary(finished_run, wandb_run=wb)
    keys = set(wb.logged[0])
    assert {"summary/stages", "summary/text", "summary/training_curve", "summary/passkey_by_stage"} <= keys
    assert set(wb.summary) == {f"final/{s}/passkey@{n}" for s in ("short", "long") for n in (192, 384)}
