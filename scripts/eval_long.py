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

Logits are computed only where a metric needs them (the passkey answer positions; chunks
of the chunked cross-entropy), never as a [B, S, V] tensor. Launched with several
processes (torchrun --nproc_per_node N scripts/eval_long.py ...) the passkey batches and
loss windows are split over them, and a run trained with sequence parallelism is
evaluated sequence-parallel (N a multiple of its deepspeed.sequence_parallel_size); rank 0
writes the results.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    from moetrain.config.mapping import ArgumentParser  # a bad command line is one error: line
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run dir, checkpoints/<tag>, or HF folder")
    p.add_argument("--out", required=True, help="output folder for eval.json and the plots")
    p.add_argument("--lengths", default=None, help="comma-separated context lengths (default: eval.lengths, "
                   "else the model's trained context)")
    p.add_argument("--depths", default=None, help="comma-separated key depths in [0, 1] (default: eval.depths)")
    p.add_argument("--trials", type=int, default=100, help="passkey trials per cell (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="prepared folder for held-out documents and the tokenizer "
                   "(default: the run's data.dir; needed for HF folders' loss curves)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when CUDA is available, else cpu), "
                   "cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and activations")
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


def join_processes(device_arg: str):
    """(rank, device). Under torchrun/deepspeed (WORLD_SIZE > 1) this joins the process group
    (NCCL on CUDA, else gloo), so the evaluation's work is split over the processes."""
    import torch
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device_arg)
        except RuntimeError:
            raise ValueError(f"--device '{device_arg}' is not a device; give auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device_arg}: CUDA is not available here; use --device cpu")
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if dist.is_initialized() else 0), device


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
        from moetrain.eval import evaluate, flat_metrics, load_for_eval, write_result
        ecfg = eval_config(args)
        lengths = _ints(args.lengths, "lengths") if args.lengths else None
        rank, device = join_processes(args.device)
        m = load_for_eval(args.model, args.data_dir, device, torch.bfloat16 if args.dtype == "bf16" else None)
        lengths = lengths or [int(x) for x in ecfg.lengths] or [m.max_len]
        result = evaluate(m.forward, m.tokenizer, m.data_dir, lengths, ecfg, trials=args.trials)
        result["model"] = m.info
        result["notes"] += [m.info["note"]] if "note" in m.info else []
        result["metrics"] = flat_metrics(result, max(lengths))
        if rank == 0:
            write_result(result, args.out, os.path.basename(os.path.normpath(args.model)))
    except (ValueError, FileNotFoundError) as e:  # ConfigError and DataError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(result["metrics"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
