#!/usr/bin/env python
"""Export a trained run as a Hugging Face folder (Mixtral / Qwen2-MoE / Qwen3-MoE).

    python scripts/export.py --checkpoint runs/default --out exports/default --verify

--checkpoint takes a run folder (its newest complete checkpoint) or one
checkpoints/<tag> folder of any ZeRO stage or expert-parallel size. The folder
loads with AutoModelForCausalLM / AutoTokenizer and `vllm serve`, no custom code.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    from moetrain.config.mapping import ArgumentParser  # a bad command line is one error: line
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder or one checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (empty, new, or a previous export)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights dtype (default: %(default)s)")
    p.add_argument("--shard-size", default="5GB", help="max safetensors shard size (default: %(default)s)")
    p.add_argument("--verify", action="store_true",
                   help="reload with transformers and compare logits, KL and greedy tokens with our model")
    p.add_argument("--allow-approx", action="store_true",
                   help="export the nearest servable form when no architecture is exact, and print the difference")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model to ship (default: the run's data.dir)")
    p.add_argument("--verify-engine", default=None, choices=["vllm"],
                   help="also load the export in this serving engine (its venv: scripts/serving_env.sh) and compare "
                        "prompt log-probabilities and greedy continuations with our model")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from moetrain.export.deps import missing_package_line
    try:
        from moetrain.export import EngineFailed, VerificationFailed, export_checkpoint
        report = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, shard_size=args.shard_size,
                                   verify=args.verify, allow_approx=args.allow_approx, tokenizer=args.tokenizer,
                                   verify_engine=args.verify_engine)
    except ImportError as e:  # a package missing from this venv: name the install, no traceback
        print(missing_package_line(e), file=sys.stderr)
        return 2
    except VerificationFailed as e:
        print(f"error: verification failed: {e}", file=sys.stderr)
        return 1
    except EngineFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {report['architecture']} ({report['dtype']}) to {args.out}")
    if "verify_line" in report:
        print(f"verify: {report['verify_line']}")
    if "verify_engine_line" in report:
        print(f"verify-engine: {report['verify_engine_line']}")
    if "approximation_line" in report:
        print(f"approximation: {'; '.join(report['approximations'])}; differs by {report['approximation_line']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
