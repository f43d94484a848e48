#!/usr/bin/env python
"""Prepare a corpus: `python scripts/prepare_data.py --recipe data_recipes/NAME.yaml --out DIR`.

Writes token shards, manifest.json and tokenizer.model into DIR (plus an eval
split of held-out documents). Running it again on an up-to-date DIR does
nothing; a DIR prepared from another recipe is only replaced with --overwrite.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_RECIPE = "data_recipes/gutenberg_classics.yaml"


def parse_args(argv=None):
    from moetrain.config.mapping import ArgumentParser  # a bad command line is one error: line
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None,
                   help="recipe YAML (default: the config's data.recipe, else " + DEFAULT_RECIPE + ")")
    p.add_argument("--out", default=None, help="output folder (default: the config's data.dir, else data/<recipe>)")
    p.add_argument("--num-proc", type=int, default=None, help="worker processes (default: CPU count, max 8)")
    p.add_argument("--overwrite", action="store_true", help="replace a folder prepared from another recipe")
    p.add_argument("--config", default=None, help="training config whose data.recipe/data.dir are the defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of that config, e.g. --set data.dir=data/x")
    return p.parse_args(argv)


def _targets(args) -> tuple[str, str]:
    """(recipe, out) from the flags, else from --config/--set, else the defaults."""
    recipe, out = args.recipe, args.out
    if args.config or args.set:
        from moetrain.config import load_config
        data = load_config(args.config, args.set).data
        recipe, out = recipe or data.recipe, out or data.dir
    recipe = recipe or DEFAULT_RECIPE
    return recipe, out or os.path.join("data", os.path.splitext(os.path.basename(recipe))[0])


def main(argv=None) -> int:
    args = parse_args(argv)
    from moetrain.data import prepare
    try:
        recipe, out = _targets(args)
        m = prepare(recipe, out, num_proc=args.num_proc, overwrite=args.overwrite)
    except ValueError as e:  # DataError and ConfigError: user mistakes, one line each
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the output folder was left as it was", file=sys.stderr)
        return 130
    for split, info in m["splits"].items():
        print(f"{split:5s}: {info['documents']:6d} documents  {info['tokens']:12,d} tokens  "
              f"{len(info['shards'])} shard(s)")
    print(f"tokenizer: vocab {m['tokenizer']['vocab_size']}, sha256 {m['tokenizer']['sha256'][:16]}...  -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
