#!/usr/bin/env python
"""Train an MoE Transformer: `deepspeed scripts/train.py --config configs/default.yaml`.

Also runs under torchrun, accelerate launch, and plain python (one process).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    from moetrain.config.mapping import ArgumentParser
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable, e.g. --set train.max_steps=20")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", default="auto", help="auto (newest complete checkpoint) | never | PATH")
    p.add_argument("--overwrite", action="store_true", help="with --resume never: discard existing checkpoints")
    p.add_argument("--dry-run", action="store_true",
                   help="print parameter counts, memory estimate and the DeepSpeed config, then exit")
    p.add_argument("--world-size", type=int, default=None, help="with --dry-run: GPUs to plan for")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _check_paths(p, args)
    return args


def _check_paths(p, args) -> None:
    """Refuse a --resume or --run-dir that cannot work before anything is imported or read."""
    if args.resume not in ("auto", "never") and not os.path.isdir(args.resume):
        p.error(f"argument --resume: '{args.resume}' is neither auto, never nor an existing checkpoint folder "
                "(RUN_DIR/checkpoints/<tag>)")
    if args.run_dir is not None and (not args.run_dir.strip() or os.path.exists(args.run_dir)
                                     and not os.path.isdir(args.run_dir)):
        p.error(f"argument --run-dir: '{args.run_dir}' is not a folder; give a folder path (it is created)")


def main(argv=None) -> int:
    args = parse_args(argv)
    from moetrain.checkpoint import CheckpointSaveError
    from moetrain.config import ConfigError, load_config
    from moetrain.config.mapping import one_line
    try:
        cfg = load_config(args.config, args.set)
        if args.dry_run:
            from moetrain.train.dryrun import dry_run
            dry_run(cfg, args.world_size)
            return 0
        from moetrain.compose import train
        run_dir = args.run_dir or os.path.join("runs", cfg.name)
        state = train(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, local_rank=args.local_rank)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except CheckpointSaveError as e:  # disk full & co: the previous checkpoint is intact
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    return _report_stop(state)


def _report_stop(state) -> int:
    """0 for a finished or preempted run (a relaunch continues), 1 when a guard stopped it."""
    if state.stop_reason is None:
        return 0
    if _is_rank0():
        if state.stop_ok:
            print(f"{state.stop_reason}; checkpoint saved at step {state.step} - run the same command again "
                  "to continue (--resume auto)", file=sys.stderr)
        else:  # a guard: relaunching unchanged would hit the same fault
            print(f"error: {state.stop_reason} (checkpoint saved at step {state.step})", file=sys.stderr)
    return 0 if state.stop_ok else 1


def _is_rank0() -> bool:
    import torch.distributed as dist
    return not dist.is_initialized() or dist.get_rank() == 0


if __name__ == "__main__":
    sys.exit(main())
