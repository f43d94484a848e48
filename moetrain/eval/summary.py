"""The end-of-run summary: what a person reads when `scripts/train.py` finishes.

One table (per stage: steps, tokens, final train loss, held-out loss, loss by
position at the stage's length, passkey accuracy per length), the plots, the
export folder and the commands to generate from and serve it. Printed on the
console, written to RUN_DIR/summary.md (PNGs linked) and sent to W&B.

Everything is read back from the run folder (metrics.jsonl, eval/<stage>/eval.json,
export/moetrain_export.json), so `write_summary(run_dir)` also works on a finished
run after the fact.
"""
from __future__ import annotations

import json
import os
import shlex
from typing import Optional

from moetrain.checkpoint import RunDir
from moetrain.eval.long_context import EVAL_JSON
from moetrain.eval.plots import plot_passkey_by_stage, plot_training_curve
from moetrain.train.callback import Callback
from moetrain.train.sinks import WandbSink

SUMMARY_MD = "summary.md"
PLOTS = "plots"
EXPORT_REPORT = "moetrain_export.json"  # moetrain.export.writer.MARKER (not imported: eval/ does not need export/)
LAST_LOSSES = 5  # final train loss = mean of the stage's last logged losses (one step is noisy)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def stage_rows(records: list[dict], run: RunDir) -> list[dict]:
    """One row per stage that ended (stage_end / run_end events), in run order."""
    steps = [r for r in records if "event" not in r and "loss" in r]
    rows, first_step, prev_tokens = [], 0, 0
    for end in (r for r in records if r.get("event") in ("stage_end", "run_end")):
        name = end["stage"]
        mine = [r for r in steps if r["stage"] == name and first_step < r["step"] <= end["step"]]
        res = _read_json(os.path.join(run.eval_dir(name), EVAL_JSON)) or {}
        seq_len = int(res.get("seq_len") or (mine[-1].get("seq_len", 0) if mine else 0))
        curve = res.get("loss_by_position", {}).get(str(seq_len))
        grid = res.get("passkey", {})
        tokens = end.get("tokens", mine[-1]["tokens"] if mine else prev_tokens)
        rows.append({
            "stage": name, "seq_len": seq_len, "rope": (res.get("rope") or {}).get("type"),
            "first_step": first_step + 1, "last_step": end["step"], "steps": end["step"] - first_step,
            "tokens": tokens - prev_tokens,
            "train_loss": sum(r["loss"] for r in mine[-LAST_LOSSES:]) / len(mine[-LAST_LOSSES:]) if mine else None,
            "eval_loss": end.get("eval_loss"),
            "loss_at_len": None if curve is None else (curve["mean"], curve["loss"][0], curve["loss"][-1]),
            "passkey": grid.get("accuracy_by_length", {}), "trials": grid.get("trials"),
            "plots": [os.path.join(run.eval_dir(name), p) for p in ("passkey_heatmap.png", "loss_by_position.png")
                      if os.path.isfile(os.path.join(run.eval_dir(name), p))]})
        first_step, prev_tokens = end["step"], tokens
    return rows


def _num(x, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def stage_table(rows: list[dict]) -> str:
    """Markdown table (readable as plain text on the console too)."""
    lengths = sorted({int(n) for r in rows for n in r["passkey"]})
    head = ["stage", "context", "RoPE", "steps", "tokens", "train loss", "held-out loss",
            "loss by position at context (mean / first / last bucket)"] + [f"passkey @{n}" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lp = r["loss_at_len"]
        cells = [r["stage"], str(r["seq_len"]), r["rope"] or "-", f"{r['steps']} ({r['first_step']}-{r['last_step']})",
                 f"{r['tokens']:,}", _num(r["train_loss"]), _num(r["eval_loss"]),
                 "-" if lp is None else f"{lp[0]:.3f} / {lp[1]:.3f} / {lp[2]:.3f}"]
        cells += [_num(None) if str(n) not in r["passkey"] else f"{100 * r['passkey'][str(n)]:.0f}%" for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _extension_line(rows: list[dict]) -> Optional[str]:
    """The point of a context-extension run in one sentence: retrieval at the longest length
    evaluated, before and after the stages that train at it."""
    if len(rows) < 2 or not rows[-1]["passkey"]:
        return None
    top = max(rows[-1]["passkey"], key=int)
    first, last = rows[0], rows[-1]
    if top not in first["passkey"]:
        return None
    return (f"Passkey retrieval at {top} tokens ({last['trials']} trials per depth, greedy, exact match): "
            f"{100 * first['passkey'][top]:.0f}% after stage '{first['stage']}' (trained at {first['seq_len']}, "
            f"no extension), {100 * last['passkey'][top]:.0f}% after stage '{last['stage']}' "
            f"(trained at {last['seq_len']}, RoPE {last['rope']}).")


def _export_lines(run: RunDir) -> list[str]:
    report = _read_json(os.path.join(run.export, EXPORT_REPORT))
    if report is None:
        return []
    d = shlex.quote(run.export)
    hf = _read_json(os.path.join(run.export, "config.json")) or {}
    out = [f"Export: `{run.export}` ({report['architecture']}, {report['dtype']})"
           + (f"; verified against transformers: {report['verify_line']}" if report.get("verify_line") else "")]
    if report.get("verify_engine_line"):
        out.append(f"Checked in the serving engine: {report['verify_engine_line']}")
    gen = ("from transformers import AutoModelForCausalLM, AutoTokenizer; "
           f"t = AutoTokenizer.from_pretrained({run.export!r}); m = AutoModelForCausalLM.from_pretrained({run.export!r}); "
           "ids = t('ROMEO:', return_tensors='pt').input_ids; "
           "print(t.decode(m.generate(ids, max_new_tokens=40, do_sample=False)[0], skip_special_tokens=True))")
    out += ["", "Generate with transformers:", "", "```bash", f"python -c {shlex.quote(gen)}", "```", "",
            "Serve with vLLM (its own venv: `bash scripts/serving_env.sh`), then query it:", "", "```bash",
            f".venv-vllm/bin/vllm serve {d} --dtype float32 --max-model-len {hf.get('max_position_embeddings')}",
            "curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{run.export}\", \"prompt\": \"ROMEO:\", \"max_tokens\": 40, \"temperature\": 0}}'",
            "```"]
    return out


def write_summary(run_dir: str, wandb_run=None) -> str:
    """Build RUN_DIR/summary.md and RUN_DIR/plots/*.png from the run folder; returns the text."""
    run = RunDir(run_dir)
    records = read_jsonl(run.metrics)
    rows = stage_rows(records, run)
    plots_dir = os.path.join(run_dir, PLOTS)
    os.makedirs(plots_dir, exist_ok=True)
    plots = [plot_training_curve(records, os.path.join(plots_dir, "training_curve.png"))]
    if any(r["passkey"] for r in rows):
        plots.append(plot_passkey_by_stage(rows, os.path.join(plots_dir, "passkey_by_stage.png")))
    overlay = os.path.join(run_dir, "eval", "loss_by_position_stages.png")
    plots += ([overlay] if os.path.isfile(overlay) else []) + [p for r in rows for p in r["plots"]]
    text = "\n".join(filter(lambda x: x is not None, [
        f"# Run summary: {run_dir}", "", stage_table(rows), "", _extension_line(rows), "",
        "Plots:", *[f"- `{p}`" for p in plots], "", *_export_lines(run)]))
    md_plots = "\n".join(f"![{os.path.basename(p)}]({os.path.relpath(p, run_dir)})" for p in plots)
    path = os.path.join(run_dir, SUMMARY_MD)
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n\n" + md_plots + "\n")
    os.replace(path + ".tmp", path)
    if wandb_run is not None:
        _to_wandb(wandb_run, rows, text, plots)
    return text


def _to_wandb(wandb_run, rows: list[dict], text: str, plots: list[str]) -> None:
    import wandb
    cols = ["stage", "seq_len", "rope", "steps", "tokens", "train_loss", "eval_loss"]
    lengths = sorted({int(n) for r in rows for n in r["passkey"]})
    table = wandb.Table(columns=cols + [f"passkey@{n}" for n in lengths],
                        data=[[r[c] for c in cols] + [r["passkey"].get(str(n)) for n in lengths] for r in rows])
    images = {f"summary/{os.path.splitext(os.path.basename(p))[0]}": wandb.Image(p) for p in plots[:2]}
    wandb_run.log({"summary/stages": table, "summary/text": wandb.Html(f"<pre>{text}</pre>"), **images})
    for r in rows:
        for n, acc in r["passkey"].items():
            wandb_run.summary[f"final/{r['stage']}/passkey@{n}"] = acc


class RunSummaryCallback(Callback):
    """At the end of a finished run, rank 0 writes and prints the summary (after the
    final checkpoint and the export, before the sinks close)."""

    priority = -20

    def on_train_end(self, trainer) -> None:
        if trainer.rank != 0 or trainer.stop_reason:
            return  # a stopped run is not finished: its relaunch summarises
        sink = trainer.callback(WandbSink)
        text = write_summary(trainer.run_dir, wandb_run=sink.run if sink else None)
        print("\n" + text + f"\n\n(also in {os.path.join(trainer.run_dir, SUMMARY_MD)})", flush=True)
