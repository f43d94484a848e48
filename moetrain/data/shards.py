"""Token shards: flat uint16/uint32 files read through np.memmap, plus a document index.

Layout of a prepared folder:
    manifest.json            sources, counts, histograms, hashes (see prepare.py)
    tokenizer.model
    <split>/shard_00000.bin  raw little-endian token ids, documents back to back
    <split>/docs.npy         int64 [n_docs, 4]: shard, offset (tokens), length, source index

A document never spans two shards. Every document is stored as bos, text, eos.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from .errors import DataError
from .recipe import file_sha256

MANIFEST = "manifest.json"
DOC_INDEX = "docs.npy"
SHARD_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def shard_dtype(vocab_size: int, requested: str = "auto") -> str:
    if requested == "auto":
        return "uint16" if vocab_size <= 65536 else "uint32"
    if requested == "uint16" and vocab_size > 65536:
        raise DataError(f"tokenizer vocab {vocab_size:,} does not fit shard dtype uint16 (at most 65,536 "
                        "ids); set dtype: uint32 (or auto) in the recipe")
    return requested


def length_histogram(lengths) -> dict:
    """Document counts per power-of-two token-length bin: [0, 128), [128, 256), ..."""
    lengths = np.asarray(lengths, dtype=np.int64)
    top = max(128, int(lengths.max()) + 1 if lengths.size else 128)
    edges = [0] + [2 ** k for k in range(7, int(np.ceil(np.log2(top))) + 1)]
    counts, _ = np.histogram(lengths, bins=edges + [edges[-1] * 2])
    return {"edges": edges, "counts": counts.tolist()}


class ShardWriter:
    """Append documents to `<out>/<split>/shard_*.bin`, starting a new shard when one is full."""

    def __init__(self, out_dir: str, split: str, dtype: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.dtype = np.dtype(SHARD_DTYPES[dtype]).newbyteorder("<")
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        self.shards: list[dict] = []
        self.docs: list[tuple] = []
        self._file = None
        self._hash = None
        self._fill = 0

    def _open_shard(self) -> None:
        self._close_shard()
        rel = f"{self.split}/shard_{len(self.shards):05d}.bin"
        self.shards.append({"file": rel, "tokens": 0})
        self._file = open(os.path.join(self.out_dir, rel), "wb")
        self._hash, self._fill = hashlib.sha256(), 0

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1].update(tokens=self._fill, sha256=self._hash.hexdigest())
            self._file = None

    def add(self, ids: np.ndarray, source: int) -> None:
        if self._file is None or (self._fill and self._fill + len(ids) > self.shard_tokens):
            self._open_shard()
        data = np.asarray(ids).astype(self.dtype, copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.docs.append((len(self.shards) - 1, self._fill, len(ids), source))
        self._fill += len(ids)

    def close(self) -> dict:
        """Finish the files; return the split's manifest entry."""
        self._close_shard()
        index = np.array(self.docs, dtype=np.int64).reshape(-1, 4)
        np.save(os.path.join(self.out_dir, self.split, DOC_INDEX), index)
        lengths = index[:, 2]
        return {"documents": int(len(index)), "tokens": int(lengths.sum()), "index": f"{self.split}/{DOC_INDEX}",
                "shards": self.shards, "length_histogram": length_histogram(lengths)}


def read_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"'{data_dir}' holds no {MANIFEST}; prepare it with scripts/prepare_data.py "
                        f"--recipe data_recipes/NAME.yaml --out {data_dir}")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        raise DataError(f"{path} is not valid JSON; re-run scripts/prepare_data.py with --overwrite") from None
    from .recipe import FORMAT_VERSION
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(f"{path} has format version {version!r:.40}, this code reads "
                        f"{FORMAT_VERSION}; re-run scripts/prepare_data.py with --overwrite")
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} is malformed: {problem}; re-run scripts/prepare_data.py with --overwrite")
    return manifest


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _manifest_problem(m: dict):
    """What a loader needs from manifest.json and this one lacks (None when all is there)."""
    if m.get("dtype") not in SHARD_DTYPES:
        return f"dtype {m.get('dtype')!r:.40} is not one of {', '.join(SHARD_DTYPES)}"
    tok = m.get("tokenizer")
    if not (isinstance(tok, dict) and _is_count(tok.get("vocab_size")) and tok["vocab_size"] > 0):
        return "tokenizer.vocab_size is missing or not a positive integer"
    sources = m.get("sources")
    if not (isinstance(sources, list) and all(isinstance(x, dict) and isinstance(x.get("name"), str)
                                              for x in sources)):
        return "sources must be a list of {name: ...} entries"
    splits = m.get("splits")
    if not isinstance(splits, dict):
        return "splits must be a mapping of split name -> shards"
    for name, sp in splits.items():
        if not (isinstance(sp, dict) and isinstance(sp.get("index"), str) and isinstance(sp.get("shards"), list)
                and _is_count(sp.get("documents")) and _is_count(sp.get("tokens"))):
            return f"splits.{name} needs index, shards, documents and tokens"
        for i, sh in enumerate(sp["shards"]):
            if not (isinstance(sh, dict) and isinstance(sh.get("file"), str) and _is_count(sh.get("tokens"))
                    and isinstance(sh.get("sha256"), str)):
                return f"splits.{name}.shards[{i}] needs file, tokens and sha256"
            for rel in (sh["file"], sp["index"]):
                if os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == "..":
                    return f"splits.{name} names '{rel}' outside the folder"
    return None


class SplitData:
    """One split of a prepared folder: memmapped shards + document index, checked against the manifest."""

    def __init__(self, data_dir: str, split: str, verify_hashes: bool = True, manifest: dict | None = None):
        self.dir = data_dir
        self.manifest = manifest or read_manifest(data_dir)
        splits = self.manifest.get("splits", {})
        if split not in splits:
            raise DataError(f"'{data_dir}' has no '{split}' split (it has: {', '.join(splits) or 'none'}); "
                            "set data.split to one of those")
        self.split, self.info = split, splits[split]
        self.dtype = np.dtype(SHARD_DTYPES[self.manifest["dtype"]]).newbyteorder("<")
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
        self.sources = [s["name"] for s in self.manifest["sources"]]
        self._check_listed()
        self.shards = [self._open(s, verify_hashes) for s in self.info["shards"]]
        self.docs = self._load_index()

    def _fix(self) -> str:
        return f"the prepared folder '{self.dir}' is damaged: re-run scripts/prepare_data.py with --overwrite"

    def _check_listed(self) -> None:
        """A shard file on disk that manifest.json does not list means the two come from
        different preparations (a copy over an older folder): neither can be trusted."""
        folder = os.path.join(self.dir, self.split)
        listed = {os.path.normpath(s["file"]) for s in self.info["shards"]}
        on_disk = sorted(f for f in (os.listdir(folder) if os.path.isdir(folder) else [])
                         if f.startswith("shard_") and f.endswith(".bin"))
        extra = [f for f in on_disk if os.path.normpath(f"{self.split}/{f}") not in listed]
        if extra:
            raise DataError(f"shard {self.split}/{extra[0]} is not listed in manifest.json ({len(listed)} shard(s) "
                            f"listed, {len(on_disk)} on disk); {self._fix()}")

    def _open(self, shard: dict, verify_hashes: bool) -> np.ndarray:
        path = os.path.join(self.dir, shard["file"])
        if not os.path.isfile(path):
            raise DataError(f"shard {shard['file']} is missing; {self._fix()}")
        want = shard["tokens"] * self.dtype.itemsize
        size = os.path.getsize(path)
        if size != want:
            raise DataError(f"shard {shard['file']} has {size:,} bytes but manifest.json says {want:,} "
                            f"(truncated or replaced); {self._fix()}")
        if verify_hashes and not _hash_matches(path, shard["sha256"]):
            raise DataError(f"shard {shard['file']} does not match its sha256 in manifest.json (corrupt); "
                            f"{self._fix()}")
        if shard["tokens"] == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def _load_index(self) -> np.ndarray:
        path = os.path.join(self.dir, self.info["index"])
        try:
            docs = np.load(path)
        except (OSError, ValueError):
            raise DataError(f"document index {self.info['index']} is missing or unreadable; {self._fix()}") from None
        ok = docs.dtype.kind in "iu" and docs.ndim == 2 and docs.shape[1] == 4 and len(docs) == self.info["documents"]
        ok = ok and int(docs[:, 2].sum()) == self.info["tokens"]
        if ok and len(docs):
            ok = docs[:, 0].min() >= 0 and docs[:, 0].max() < len(self.shards)
            per_shard = np.bincount(docs[:, 0], weights=docs[:, 2], minlength=len(self.shards))
            ok = ok and all(int(per_shard[i]) == s["tokens"] for i, s in enumerate(self.info["shards"]))
            ends = docs[:, 1] + docs[:, 2]
            shard_len = np.array([len(s) for s in self.shards], dtype=np.int64)
            ok = ok and bool((docs[:, 1] >= 0).all() and (ends <= shard_len[docs[:, 0]]).all())
        if not ok:
            raise DataError(f"{self.info['index']} disagrees with manifest.json (document or token counts); "
                            f"{self._fix()}")
        return docs

    @property
    def lengths(self) -> np.ndarray:
        return self.docs[:, 2]

    def tokens(self, doc: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of document `doc`, as int64."""
        shard, offset, length, _ = self.docs[doc]
        assert 0 <= start <= stop <= length, (doc, start, stop, length)
        out = np.asarray(self.shards[shard][offset + start: offset + stop], dtype=np.int64)
        if out.size and int(out.max()) >= self.vocab_size:
            raise DataError(f"shard {self.info['shards'][shard]['file']} holds token id {int(out.max())} >= "
                            f"vocab size {self.vocab_size} (corrupt); {self._fix()}")
        return out


# (real path, size, mtime_ns, sha256) of shards hashed by this process: a stage's
# loaders and every held-out evaluation reopen the same shards, which are hashed once.
_VERIFIED: set = set()


def _hash_matches(path: str, sha256: str) -> bool:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, sha256)
    if key not in _VERIFIED:
        if file_sha256(path) != sha256:
            return False
        _VERIFIED.add(key)
    return True


def check_prepared(data_dir: str, verify_hashes: bool = True) -> None:
    """Open every split of a prepared folder as a loader would (manifest, index, shard
    sizes and hashes): a damaged folder fails with one DataError before training starts."""
    manifest = read_manifest(data_dir)
    for split in manifest["splits"]:
        SplitData(data_dir, split, verify_hashes, manifest)


def write_prepared(out_dir: str, splits: dict, sources: list[str], tokenizer_info: dict, dtype: str = "auto",
                   shard_tokens: int = 100_000_000) -> dict:
    """A prepared folder from already tokenised documents: splits = {name: [(ids, source index), ...]}.

    For corpora tokenised elsewhere and for tests; prepare() is the usual way in.
    """
    from .recipe import FORMAT_VERSION
    dtype = shard_dtype(int(tokenizer_info["vocab_size"]), dtype)
    os.makedirs(out_dir, exist_ok=False)
    info = {}
    for split, docs in splits.items():
        writer = ShardWriter(out_dir, split, dtype, shard_tokens)
        for ids, source in docs:
            writer.add(np.asarray(ids), int(source))
        info[split] = writer.close()
    hashes = "".join(s["sha256"] for sp in info.values() for s in sp["shards"])
    manifest = {"format_version": FORMAT_VERSION, "name": os.path.basename(out_dir), "dtype": dtype,
                "tokenizer": dict(tokenizer_info), "sources": [{"name": n} for n in sources], "splits": info,
                "documents": sum(s["documents"] for s in info.values()),
                "tokens": sum(s["tokens"] for s in info.values()),
                "data_hash": hashlib.sha256(hashes.encode()).hexdigest()}
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
