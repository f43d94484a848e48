"""Run a recipe: read, clean, dedup, hold out eval docs, tokenizer, tokenise, shard, manifest.

Everything is built in a scratch folder beside the output and moved into place
at the end, so a failure (bad input, Ctrl-C) never leaves a half-written or
overwritten output. Re-running a recipe on its own output is a quick no-op.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import datasets
import numpy as np
from tqdm.auto import tqdm

from .clean import clean_document, text_key
from .errors import DataError
from .recipe import FORMAT_VERSION, Recipe, load_recipe, recipe_hash, resolve_path
from .shards import MANIFEST, ShardWriter, SplitData, read_manifest, shard_dtype
from .sources import load_source
from .tokenizer import MODEL_FILE, Tokenizer, read_model, train_sentencepiece, training_sample


def _say(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def _procs(num_proc: int | None, n_rows: int) -> int | None:
    n = min(num_proc or 1, max(1, n_rows // 2))
    return n if n > 1 else None


# --------------------------------------------------------------------------- map functions
def _clean_batch(batch, boilerplate, normalize):
    texts = [clean_document(t, boilerplate, normalize) for t in batch["text"]]
    return {"text": texts, "key": [text_key(t) for t in texts], "n_chars": [len(t) for t in texts]}


_SP_CACHE: dict = {}


def _tokenize_batch(batch, model_proto):
    tok = _SP_CACHE.get(model_proto)
    if tok is None:  # once per worker process
        tok = _SP_CACHE.setdefault(model_proto, Tokenizer(model_proto))
    ids = [np.array([tok.bos_id] + x + [tok.eos_id], dtype=np.int32) for x in tok.encode_batch(batch["text"])]
    return {"ids": ids, "n_tokens": [len(x) for x in ids]}


# --------------------------------------------------------------------------- steps
def _read_and_clean(recipe: Recipe, hf_cache: str, num_proc) -> tuple[datasets.Dataset, dict]:
    parts, stats = [], {}
    for i, spec in enumerate(recipe.sources):
        _say(f"reading source '{spec.name}'")
        raw = load_source(recipe, i, hf_cache)
        boiler = None if spec.boilerplate in (None, "none") else spec.boilerplate
        parts.append(raw.map(_clean_batch, batched=True, batch_size=64, num_proc=_procs(num_proc, len(raw)),
                             fn_kwargs={"boilerplate": boiler, "normalize": recipe.clean.normalize_whitespace},
                             cache_file_name=os.path.join(hf_cache, f"clean_{i}.arrow"), desc=f"clean {spec.name}"))
    ds = datasets.concatenate_datasets(parts)
    sources, keys, n_chars = ds["source"], ds["key"], ds["n_chars"]
    keep, seen = [], set()
    for i, (src, key, n) in enumerate(zip(sources, keys, n_chars)):
        st = stats.setdefault(src, {"documents_read": 0, "dropped_short": 0, "dropped_duplicate": 0})
        st["documents_read"] += 1
        if n < recipe.clean.min_chars:
            st["dropped_short"] += 1
        elif recipe.clean.dedup and key in seen:
            st["dropped_duplicate"] += 1
        else:
            seen.add(key)
            keep.append(i)
    if not keep:
        read, short, dup = (sum(s[k] for s in stats.values())
                            for k in ("documents_read", "dropped_short", "dropped_duplicate"))
        raise DataError(f"empty corpus: {read} documents read, {short} shorter than clean.min_chars="
                        f"{recipe.clean.min_chars}, {dup} duplicates; check the sources and text_field, "
                        "or lower clean.min_chars")
    return ds.select(keep), stats


def _source_names(recipe: Recipe, stats: dict) -> list[str]:
    """Recipe order; sub-sources (source_field) sorted within their source. Adds empty stats rows."""
    names = []
    for spec in recipe.sources:
        if spec.source_field is None:
            names.append(spec.name)
        else:
            names += sorted(n for n in stats if n.startswith(spec.name + "/"))
    for n in names:
        stats.setdefault(n, {"documents_read": 0, "dropped_short": 0, "dropped_duplicate": 0})
    return names


def _holdout(sources: list[str], keys: list[str], names: list[str], per_source: int) -> tuple[list, list]:
    """Eval = the `per_source` docs of each source with the smallest content hash (order-free)."""
    eval_idx = []
    for name in names:
        idx = [i for i, s in enumerate(sources) if s == name]
        n = min(per_source, len(idx) - 1)  # always keep one for training
        eval_idx += sorted(idx, key=lambda i: keys[i])[:max(0, n)]
    chosen = set(eval_idx)
    return [i for i in range(len(sources)) if i not in chosen], sorted(eval_idx)


def _tokenizer(recipe: Recipe, train: datasets.Dataset) -> tuple[Tokenizer, bool]:
    spec = recipe.tokenizer
    if spec.path:
        return Tokenizer(read_model(resolve_path(recipe, spec.path))), False
    total = int(np.sum(train["n_chars"]))
    # Pre-thin whole documents for big corpora so we never read them all just to sample.
    doc_stride = max(1, total // (4 * spec.sample_chars))
    sub = train.select(range(0, len(train), doc_stride)).select_columns(["text", "n_chars"])
    sub_total = int(np.sum(sub["n_chars"]))
    texts = (t for batch in sub.iter(batch_size=256) for t in batch["text"])
    sample = training_sample(texts, sub_total, spec.sample_chars)
    _say(f"training a {spec.model_type} tokenizer (vocab {spec.vocab_size}) on {sum(map(len, sample)):,} chars")
    return Tokenizer(train_sentencepiece(sample, spec)), True


def _quotas(tokens: datasets.Dataset, idx: list, names: list[str], budget: int | None) -> dict:
    """Per-source token quotas that spend `budget` in the sources' natural proportions."""
    if budget is None:
        return {n: float("inf") for n in names}
    part = tokens.select(idx).select_columns(["source", "n_tokens"])
    have = {n: 0 for n in names}
    for src, n in zip(part["source"], part["n_tokens"]):
        have[src] += n
    total = max(1, sum(have.values()))
    return {n: budget * have[n] / total for n in names}


def _write_split(tokens: datasets.Dataset, idx: list, split: str, out: str, dtype: str, recipe: Recipe,
                 names: list[str], budget: int | None) -> dict:
    writer = ShardWriter(out, split, dtype, recipe.shard_tokens)
    src_index = {n: i for i, n in enumerate(names)}
    quota, used = _quotas(tokens, idx, names, budget), {n: 0 for n in names}
    part = tokens.select(idx).with_format("arrow")
    with tqdm(total=len(idx), desc=f"write {split} shards", unit="doc", file=sys.stderr) as bar:
        for table in part.iter(batch_size=256):
            col = table.column("ids").combine_chunks()
            flat, offsets = col.flatten().to_numpy(), col.offsets.to_numpy()
            for j, src in enumerate(table.column("source").to_pylist()):
                if used[src] < quota[src]:  # a token budget keeps each source's share
                    writer.add(flat[offsets[j]:offsets[j + 1]], src_index[src])
                    used[src] += int(offsets[j + 1] - offsets[j])
            bar.update(table.num_rows)
    return writer.close()


def _per_source(names: list[str], stats: dict, out: str, splits: dict) -> list[dict]:
    rows = [dict(name=n, **stats[n], documents={}, tokens={}) for n in names]
    for split in splits:
        docs = np.load(os.path.join(out, split, "docs.npy"))
        for i, row in enumerate(rows):
            mine = docs[docs[:, 3] == i]
            row["documents"][split] = int(len(mine))
            row["tokens"][split] = int(mine[:, 2].sum())
    return rows


def _build(recipe: Recipe, rhash: str, recipe_path: str, out: str, hf_cache: str, num_proc) -> dict:
    ds, stats = _read_and_clean(recipe, hf_cache, num_proc)
    sources, keys = ds["source"], ds["key"]
    names = _source_names(recipe, stats)
    train_idx, eval_idx = _holdout(list(sources), list(keys), names, recipe.eval_documents)
    _say(f"{len(ds)} documents after cleaning: {len(train_idx)} train, {len(eval_idx)} eval")
    tok, trained = _tokenizer(recipe, ds.select(train_idx))
    dtype = shard_dtype(tok.vocab_size, recipe.dtype)
    tokens = ds.map(_tokenize_batch, batched=True, batch_size=16, num_proc=_procs(num_proc, len(ds)),
                    fn_kwargs={"model_proto": tok.model_proto}, remove_columns=["text", "key", "n_chars"],
                    cache_file_name=os.path.join(hf_cache, "tokens.arrow"), desc="tokenise")
    os.makedirs(out)
    with open(os.path.join(out, MODEL_FILE), "wb") as f:
        f.write(tok.model_proto)
    splits = {"train": _write_split(tokens, train_idx, "train", out, dtype, recipe, names, recipe.token_budget),
              "eval": _write_split(tokens, eval_idx, "eval", out, dtype, recipe, names, None)}
    shard_hashes = [s["sha256"] for sp in splits.values() for s in sp["shards"]]
    manifest = {
        "format_version": FORMAT_VERSION, "name": recipe.name, "description": recipe.description,
        "recipe": {"path": recipe_path, "sha256": rhash}, "recipe_hash": rhash,
        "tokenizer": dict(tok.info(), trained=trained, model_type=recipe.tokenizer.model_type),
        "dtype": dtype, "sources": _per_source(names, stats, out, splits),
        "documents": sum(s["documents"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "token_budget": recipe.token_budget, "splits": splits,
        "data_hash": hashlib.sha256("".join(shard_hashes).encode()).hexdigest(),
    }
    with open(os.path.join(out, MANIFEST), "w") as f:  # written last: its presence means complete
        json.dump(manifest, f, indent=1)
    return manifest


def _check_intact(out_dir: str, manifest: dict) -> None:
    """Cheap consistency check of an existing prepared folder (sizes and counts, no hashing)."""
    for split in manifest.get("splits", {}):
        SplitData(out_dir, split, verify_hashes=False, manifest=manifest)


def _replace_dir(new: str, out_dir: str, trash: str) -> None:
    if os.path.exists(out_dir):
        os.replace(out_dir, trash)
    os.replace(new, out_dir)


def prepare(recipe_path: str, out_dir: str, *, num_proc: int | None = None, overwrite: bool = False) -> dict:
    """Run a recipe into out_dir; return its manifest. A no-op when out_dir already holds this recipe."""
    t0 = time.time()
    recipe = load_recipe(recipe_path)
    rhash = recipe_hash(recipe)
    has_manifest = os.path.isfile(os.path.join(out_dir, MANIFEST))
    existing = None
    if has_manifest:
        try:
            existing = read_manifest(out_dir)
        except DataError:
            if not overwrite:
                raise
    if existing is not None and existing.get("recipe_hash") == rhash and not overwrite:
        _check_intact(out_dir, existing)
        _say(f"'{out_dir}' is up to date ({existing['documents']} documents, {existing['tokens']:,} tokens)")
        return existing
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not has_manifest:
            raise DataError(f"'{out_dir}' exists and is not a prepared data folder (no {MANIFEST}); refusing "
                            "to touch it: choose another --out")
        if not overwrite:
            raise DataError(f"'{out_dir}' holds data prepared from a different recipe (or version); pass "
                            "--overwrite to replace it, or choose another --out")
    elif os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out '{out_dir}' is a file; give a folder path")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.build-", dir=parent)
    try:
        manifest = _build(recipe, rhash, recipe_path, os.path.join(work, "out"), os.path.join(work, "hf"),
                          num_proc or min(8, os.cpu_count() or 1))
        _replace_dir(os.path.join(work, "out"), out_dir, os.path.join(work, "old"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _say(f"wrote '{out_dir}': {manifest['documents']} documents, {manifest['tokens']:,} tokens "
         f"in {time.time() - t0:.1f}s")
    return manifest


_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _find_recipe(path: str) -> str | None:
    """A relative recipe path: from the working directory, else from the repository root."""
    for cand in (path, os.path.join(_REPO_ROOT, path)):
        if os.path.isfile(cand):
            return cand
    return None


def ensure_prepared(data_cfg) -> str:
    """data_cfg.dir, preparing it from data_cfg.recipe first when it holds no manifest yet."""
    out_dir = data_cfg.dir
    recipe = _find_recipe(data_cfg.recipe) if data_cfg.recipe else None
    if os.path.isfile(os.path.join(out_dir, MANIFEST)):
        if recipe is not None:
            have = read_manifest(out_dir).get("recipe_hash")
            if have != recipe_hash(load_recipe(recipe)):
                raise DataError(f"data.dir '{out_dir}' was prepared from another version of data.recipe "
                                f"'{data_cfg.recipe}'; re-run scripts/prepare_data.py --recipe {data_cfg.recipe} "
                                f"--out {out_dir} --overwrite, or point data.dir elsewhere")
        return out_dir
    if not data_cfg.recipe:
        raise DataError(f"data.dir '{out_dir}' holds no {MANIFEST} and data.recipe is not set; set data.recipe "
                        "(e.g. data_recipes/gutenberg_classics.yaml) or prepare the folder with "
                        "scripts/prepare_data.py")
    if recipe is None:
        raise DataError(f"data.recipe '{data_cfg.recipe}' does not exist; fix data.recipe")
    prepare(recipe, out_dir)
    return out_dir
