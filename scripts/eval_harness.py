#!/usr/bin/env python
"""lm-evaluation-harness on an exported model, beside our own evaluation of the same rows.

    python scripts/eval_harness.py --model runs/default/export --out runs/default/harness
    python scripts/eval_harness.py --model EXPORT --data-dir data/gutenberg_classics --backends hf,vllm --out DIR

Writes OUT/tasks/ (the task YAMLs of moetrain/eval/harness/, utils.py and the JSONL rows:
`lm_eval --include_path OUT/tasks --tasks moetrain_heldout_ppl,moetrain_passkey` runs them
by hand), then runs the harness (HF backend in this venv; vLLM backend in the vLLM venv,
`bash scripts/serving_env.sh --with-lm-eval`) and our eval code on the same rows:

- moetrain_heldout_ppl: our held-out windows (moetrain.eval.position_loss.held_out_windows,
  the windows of eval.json's loss@L), each scored on tokens 1..S given token 0; token-level
  mean NLL vs ours, agreeing within moetrain.eval.harness.compare.PPL_TOL[backend] nats.
- moetrain_passkey: the trials of our passkey grid (same seed, lengths, depths), greedy,
  exact match; the same verdict on every trial.

Rows whose text does not tokenise back to our ids are dropped and counted (OUT/harness.json).
"Ours" is the export's source checkpoint when it is still there (and the export is fp32),
else the export itself through our eval code; --ours picks another. Exit 0 when every
backend agrees, 1 when one does not, 2 on bad input.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    from moetrain.config.mapping import ArgumentParser  # a bad command line is one error: line
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported Hugging Face folder (scripts/export.py)")
    p.add_argument("--out", required=True, help="output folder (tasks/, harness.json)")
    p.add_argument("--data-dir", default=None, help="prepared folder with the held-out documents (default: the "
                   "export's source run's data.dir)")
    p.add_argument("--ours", default=None, help="run dir, checkpoint or HF folder for our numbers (default: the "
                   "export's source checkpoint, else the export)")
    p.add_argument("--backends", default="hf", help="comma-separated: hf, vllm (default: %(default)s)")
    p.add_argument("--lengths", default=None, help="comma-separated context lengths (default: eval.lengths, else "
                   "the export's max_position_embeddings; the vLLM backend takes up to max_position_embeddings - 2 "
                   "and shortens the defaults to that)")
    p.add_argument("--depths", default=None, help="comma-separated key depths in [0, 1] (default: eval.depths)")
    p.add_argument("--trials", type=int, default=None, help="passkey trials per cell (default: eval.passkey_trials)")
    p.add_argument("--windows", type=int, default=32, help="held-out windows per length (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="HF backend batch size (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="HF backend device (default: %(default)s)")
    p.add_argument("--config", default=None, help="YAML config whose eval section to use")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    return p.parse_args(argv)


def _list(text: str, what: str, kind=int) -> list:
    try:
        vals = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} '{text}' must be a comma-separated list, e.g. "
                         f"{'512,1024' if kind is int else '0,0.5,1'}") from None
    if not vals or (kind is int and min(vals) < 1) or (kind is float and not all(0 <= v <= 1 for v in vals)):
        raise ValueError(f"--{what} '{text}' must list {'positive integers' if kind is int else 'numbers in [0, 1]'}")
    return vals


def export_info(model_dir: str) -> tuple[dict, dict]:
    """(config.json, moetrain_export.json or {}) of the export; ValueError when it is not one."""
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"--model {model_dir} has no config.json; give an exported folder (scripts/export.py)")
    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        raise ValueError(f"--model {model_dir} has no tokenizer.json; export it again with scripts/export.py")
    with open(cfg_path) as f:
        hf_cfg = json.load(f)
    report = {}
    if os.path.isfile(os.path.join(model_dir, "moetrain_export.json")):
        with open(os.path.join(model_dir, "moetrain_export.json")) as f:
            report = json.load(f)
    return hf_cfg, report


def resolve(args):
    """(ours path, data dir, eval config, lengths, backends) from the flags, the export and its source run."""
    import dataclasses
    from moetrain.checkpoint import run_config
    from moetrain.config import load_config
    from moetrain.eval.harness.backends import BACKENDS
    hf_cfg, report = export_info(args.model)
    source = report.get("source")
    ours = args.ours or (source if source and os.path.isdir(source) and report.get("dtype") == "fp32" else args.model)
    cfg = load_config(args.config, args.set) if args.config else (
        (run_config(ours, args.set) if ours != args.model else None) or load_config(None, args.set))
    data_dir = args.data_dir or (cfg.data.dir if ours != args.model and os.path.isdir(cfg.data.dir) else None)
    if data_dir is None or not os.path.isdir(data_dir):
        bad = f"; {data_dir} is not one" if data_dir else ""
        raise ValueError(f"no held-out data: give --data-dir (a prepared folder){bad}")
    ecfg = cfg.eval
    if args.depths is not None:
        ecfg = dataclasses.replace(ecfg, depths=_list(args.depths, "depths", float))
    if args.trials is not None:
        if args.trials < 1:
            raise ValueError(f"--trials {args.trials} must be >= 1")
        ecfg = dataclasses.replace(ecfg, passkey_trials=args.trials)
    if args.windows < 1:
        raise ValueError(f"--windows {args.windows} must be >= 1")
    lengths = (_list(args.lengths, "lengths") if args.lengths else [int(x) for x in ecfg.lengths]
               or [int(hf_cfg.get("max_position_embeddings") or 0)])
    if min(lengths) < 1:
        raise ValueError(f"--model {args.model} has no max_position_embeddings; give --lengths")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or any(b not in BACKENDS for b in backends):
        raise ValueError(f"--backends '{args.backends}' must list {' and/or '.join(BACKENDS)}")
    return ours, data_dir, ecfg, lengths, backends


def build_rows(args, data_dir, ecfg, lengths):
    """Windows, trials, the rows and OUT/tasks; returns (windows, kept, cells, tokenizer, report)."""
    from transformers import AutoTokenizer
    from moetrain.data import load_tokenizer
    from moetrain.eval.harness import rows as R
    from moetrain.eval.passkey import make_trials
    from moetrain.eval.position_loss import held_out_windows
    hf_tok = AutoTokenizer.from_pretrained(args.model)
    tok = load_tokenizer(args.model if os.path.isfile(os.path.join(args.model, "tokenizer.model")) else data_dir)
    windows = {L: held_out_windows(data_dir, L, args.windows) for L in lengths}
    ppl, kept = R.ppl_rows(hf_tok, windows)
    cells, notes = {}, []
    for L in lengths:
        try:
            for d in ecfg.depths:
                cells[(L, float(d))] = make_trials(tok, L, d, ecfg.passkey_trials, ecfg.seed, ecfg.key_digits)
        except ValueError as e:  # DataError: this context cannot hold the prompt (as our grid skips it)
            notes.append(f"passkey at {L} tokens skipped: {e}")
    notes += [f"perplexity at {L} tokens skipped: none of the {k['windows']} held-out windows tokenises back to "
              "our ids (or no document is that long)" for L, k in kept.items() if not k["kept"]]
    passkey, dropped = R.passkey_rows(hf_tok, cells)
    tasks_dir = R.write_task_folder(args.out, ppl, passkey)
    report = {"tasks_dir": tasks_dir, "ppl_rows": len(ppl), "passkey_rows": len(passkey),
              "ppl_windows": {str(L): {"windows": k["windows"], "kept": len(k["kept"]),
                                       "dropped": k["windows"] - len(k["kept"])} for L, k in kept.items()},
              "passkey_dropped": dropped, "notes": notes}
    return windows, kept, cells, tok, report


def ours_numbers(ours_path, data_dir, windows, kept, cells, tok, ecfg) -> dict:
    from moetrain.eval import load_for_eval
    from moetrain.eval.harness import compare as C
    m = load_for_eval(ours_path, data_dir)
    ppl = C.our_perplexity(m.forward, windows, kept, ecfg.batch_tokens)
    pk = C.our_passkey(m.forward, tok, cells, ecfg.batch_tokens)
    return {"info": m.info, "ppl": ppl, "passkey": pk}


def run_backend(backend, args, lengths, rows_report, ours) -> dict:
    from moetrain.eval.harness import backends as B
    from moetrain.eval.harness import compare as C
    from moetrain.eval.harness.rows import PASSKEY_TASK, PPL_TASK
    n_rows = {PPL_TASK: rows_report["ppl_rows"], PASSKEY_TASK: rows_report["passkey_rows"]}
    req = B.request(backend, args.model, rows_report["tasks_dir"], max(lengths), n_rows, args.batch_size, args.device)
    result = B.run(backend, req, os.path.abspath(args.out))
    samples = B.as_samples(result)
    ppl = C.compare_perplexity(ours["ppl"], C.harness_perplexity(samples.get(PPL_TASK, [])), C.PPL_TOL[backend])
    pk = C.compare_passkey(ours["passkey"], C.harness_passkey(samples.get(PASSKEY_TASK, [])))
    return {"lm_eval_version": result["lm_eval_version"], "model_args": [r["model_args"] for r in req["runs"]],
            "ppl_tolerance": C.PPL_TOL[backend],
            "results": {t: v for r in result["runs"] for t, v in r["results"].items()},
            "perplexity": {str(k): v for k, v in ppl.items()}, "passkey": {str(k): v for k, v in pk.items()},
            "agree": all(v["agree"] for v in ppl.values()) and all(v["agree"] for v in pk.values())}


def table(res: dict) -> str:
    """The side-by-side lines printed at the end."""
    lines = [f"ours: {res['ours']['kind']} {res['ours']['path']}"]
    for backend, r in res["backends"].items():
        for L, p in r["perplexity"].items():
            lines.append(f"[{backend}] ppl@{L}: ours nll {p['ours_nll']:.6f} (ppl {p['ours_ppl']:.4f}), harness nll "
                         f"{p['harness_nll']:.6f} (ppl {p['harness_ppl']:.4f}), |diff| {p['abs_diff']:.2e}, per "
                         f"window <= {p['max_row_diff']:.2e}, {p['windows']} windows "
                         f"(tolerance {r['ppl_tolerance']:g}): "
                         f"{'agree' if p['agree'] else 'DISAGREE'}")
        for L, p in r["passkey"].items():
            lines.append(f"[{backend}] passkey@{L}: ours {p['ours_acc']:.3f}, harness {p['harness_acc']:.3f} over "
                         f"{p['trials']} trials, {len(p['differ'])} differ: {'agree' if p['agree'] else 'DISAGREE'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from moetrain.eval.harness import backends as B
        from moetrain.eval.harness.compare import our_grid_accuracy
        ours_path, data_dir, ecfg, lengths, backends = resolve(args)
        trained = int(export_info(args.model)[0].get("max_position_embeddings") or 0)
        fit_notes = []
        if args.lengths is None:  # defaults: shortened for vLLM; explicit lengths are refused below when too long
            lengths, fit_notes = B.fit_lengths(lengths, backends, trained)
        for b in backends:
            B.check_backend(b, max(lengths), trained)
        os.makedirs(args.out, exist_ok=True)
        windows, kept, cells, tok, rows_report = build_rows(args, data_dir, ecfg, lengths)
        rows_report["notes"] = fit_notes + rows_report["notes"]
        ours = ours_numbers(ours_path, data_dir, windows, kept, cells, tok, ecfg)
        res = {"model": os.path.abspath(args.model), "data_dir": os.path.abspath(data_dir), "lengths": lengths,
               "settings": {"depths": list(ecfg.depths), "trials": ecfg.passkey_trials, "seed": ecfg.seed,
                            "key_digits": ecfg.key_digits, "windows": args.windows},
               "rows": rows_report,
               "ours": {"kind": ours["info"].get("kind"), "path": ours_path,
                        "perplexity": {str(k): v for k, v in ours["ppl"].items()},
                        "passkey_grid": {str(k): v for k, v in our_grid_accuracy(ours["passkey"]).items()}},
               "backends": {b: run_backend(b, args, lengths, rows_report, ours) for b in backends}}
    except ImportError as e:
        if (getattr(e, "name", "") or "").split(".")[0] == "lm_eval":
            print(B.MISSING_LM_EVAL, file=sys.stderr)
            return 2
        raise
    except (ValueError, FileNotFoundError) as e:  # ConfigError and DataError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except B.HarnessFailed as e:  # the vLLM subprocess failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    path = os.path.join(args.out, "harness.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)
    for note in rows_report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(table(res))
    return 0 if all(r["agree"] for r in res["backends"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
