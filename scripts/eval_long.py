#!/usr/bin/env python
"""Long-context evaluation of a trained model: passkey retrieval on a (length x depth)
grid (greedy decoding, exact match) and loss by position on held-out documents.

    python scripts/eval_long.py --model runs/default --lengths 256,1024 --out runs/default/eval_long
    python scripts/eval_long.py --model runs/default/export --lengths 1024 --data-dir data/gutenberg_classics --out DIR

--model is a run folder (newest complete checkpoint), one checkpoints/<tag>, or a Hugging
Face folder (config.json; loaded with transformers, tokenizer.model from that folder).
Writes OUT/eval.json, OUT/loss_by_position.png and OUT/passkey_heatmap.png.
Evaluation settings (depths, windows, buckets, batch size, seed) come from the config's
`eval` section: --config FILE, else the run's config.yaml, else the defaults; --set
overrides them, and --lengths/--depths/--trials override those.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like the other user errors
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run dir, checkpoints/<tag>, or HF folder")
    p.add_argument("--out", required=True, help="output folder for eval.json and the plots")
    p.add_argument("--lengths", default=None, help="comma-separated context lengths (default: eval.lengths, "
                   "else the model's trained context)")
    p.add_argument("--depths", default=None, help="comma-separated key depths in [0, 1] (default: eval.depths)")
    p.add_argument("--trials", type=int, default=100, help="passkey trials per cell (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="prepared folder for held-out documents and the tokenizer "
                   "(default: the run's data.dir; needed for HF folders' loss curves)")
    p.add_argument("--config", default=None, help="YAML config whose eval section to use")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    return p.parse_args(argv)


def _ints(text: str, what: str) -> list:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} '{text}' must be comma-separated integers, e.g. 512,2048") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"--{what} '{text}' must list positive integers")
    return vals


def _floats(text: str, what: str) -> list:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} '{text}' must be comma-separated numbers, e.g. 0,0.5,1") from None
    if not vals or not all(0 <= v <= 1 for v in vals):
        raise ValueError(f"--{what} '{text}' must list numbers in [0, 1]")
    return vals


def eval_config(args):
    """cfg.eval from --config (else the run's config.yaml or the checkpoint's own config,
    else defaults) + --set + flags."""
    import dataclasses
    from moetrain.checkpoint import run_config
    from moetrain.config import load_config
    cfg = None if args.config else run_config(args.model, args.set)  # None for an HF folder
    if cfg is None:
        cfg = load_config(args.config, args.set)
    ecfg = cfg.eval
    if args.depths is not None:
        ecfg = dataclasses.replace(ecfg, depths=_floats(args.depths, "depths"))
    if args.trials < 1:
        raise ValueError(f"--trials {args.trials} must be >= 1")
    return ecfg


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from moetrain.eval import evaluate, flat_metrics, load_for_eval, write_result
        ecfg = eval_config(args)
        lengths = _ints(args.lengths, "lengths") if args.lengths else None
        m = load_for_eval(args.model, args.data_dir)
        lengths = lengths or [int(x) for x in ecfg.lengths] or [m.max_len]
        result = evaluate(m.forward, m.tokenizer, m.data_dir, lengths, ecfg, trials=args.trials)
        result["model"] = m.info
        result["metrics"] = flat_metrics(result, max(lengths))
        write_result(result, args.out, os.path.basename(os.path.normpath(args.model)))
    except (ValueError, FileNotFoundError) as e:  # ConfigError and DataError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(result["metrics"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
