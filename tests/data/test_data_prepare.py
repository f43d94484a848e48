"""prepare(): manifest == shards, caching, determinism, cleaning stats, and one clear error per bad input."""
import json
import os
import shutil
import time

import numpy as np
import pytest
from data_helpers import fake_text, write_corpus, write_recipe

from moetrain.config import DataConfig
from moetrain.data import DataError, TokenLoader, ensure_prepared, prepare
from moetrain.data.shards import SplitData


def snapshot(folder):
    """{relative path: (size, mtime)} of every file, to prove nothing was touched."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = (os.path.getsize(p), os.path.getmtime(p))
    return out


def test_manifest_counts_equal_shards(prepared):
    out, m = prepared
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 400
    for split, info in m["splits"].items():
        docs = np.load(os.path.join(out, info["index"]))
        assert len(docs) == info["documents"] and docs[:, 2].sum() == info["tokens"]
        assert sum(info["length_histogram"]["counts"]) == info["documents"]
        for i, shard in enumerate(info["shards"]):
            assert os.path.getsize(os.path.join(out, shard["file"])) == 2 * shard["tokens"]
            assert docs[docs[:, 0] == i, 2].sum() == shard["tokens"]
        data = SplitData(out, split)
        for d in range(len(docs)):
            t = data.tokens(d, 0, int(docs[d, 2]))
            assert t[0] == 1 and t[-1] == 2 and (t[1:-1] > 3).all()
    per_source = {s["name"]: s for s in m["sources"]}
    assert per_source["alpha"]["documents"] == {"train": 7, "eval": 1}
    assert per_source["beta"]["documents"] == {"train": 4, "eval": 1}
    assert m["tokens"] == sum(s["tokens"]["train"] + s["tokens"]["eval"] for s in m["sources"])
    assert len(m["recipe_hash"]) == 64 and len(m["tokenizer"]["sha256"]) == 64


def test_rerun_is_a_noop_and_output_is_deterministic(prepared, small_recipe, tmp_path):
    out, m = prepared
    before = snapshot(out)
    t0 = time.time()
    assert prepare(small_recipe, out) == m
    assert time.time() - t0 < 5 and snapshot(out) == before
    other = prepare(small_recipe, str(tmp_path / "again"), num_proc=2)
    assert other["data_hash"] == m["data_hash"] and other["tokenizer"]["sha256"] == m["tokenizer"]["sha256"]
    with open(os.path.join(out, "tokenizer.model"), "rb") as a, open(tmp_path / "again" / "tokenizer.model", "rb") as b:
        assert a.read() == b.read()


def test_formats_cleaning_and_dedup(tmp_path):
    j = write_corpus(tmp_path / "j", n_docs=4, seed=3, kind="json", field="body")
    p = write_corpus(tmp_path / "p", n_docs=4, seed=4, kind="parquet")
    dup = tmp_path / "dup.jsonl"
    with open(j) as f:
        rows = json.load(f)
    with open(dup, "w") as f:   # two exact duplicates (after whitespace normalisation) and one short doc
        f.write(json.dumps({"text": rows[0]["body"] + "  \n\n\n"}) + "\n")
        f.write(json.dumps({"text": rows[1]["body"].replace("\n", "\r\n")}) + "\n")
        f.write(json.dumps({"text": "too short"}) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", [{"name": "j", "path": j, "text_field": "body"},
                                                {"name": "p", "path": p}, {"name": "d", "path": str(dup)}],
                          eval_documents=0)
    m = prepare(recipe, str(tmp_path / "out"), num_proc=1)
    stats = {s["name"]: s for s in m["sources"]}
    assert stats["d"]["dropped_duplicate"] == 2 and stats["d"]["dropped_short"] == 1
    assert "d" not in [n for n, s in stats.items() if s["documents"]["train"]] and m["documents"] == 8
    assert m["splits"]["eval"]["documents"] == 0


def test_refuses_to_overwrite(small_recipe, prepared, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(prepared[0], out)
    changed = write_recipe(tmp_path / "changed.yaml", [{"name": "alpha", "path": os.path.join(
        os.path.dirname(small_recipe), "a", "docs.jsonl")}], vocab_size=380)
    before = snapshot(out)
    with pytest.raises(DataError, match="different recipe.*--overwrite"):
        prepare(changed, out)
    assert snapshot(out) == before
    m = prepare(changed, out, overwrite=True, num_proc=1)
    assert m["tokenizer"]["vocab_size"] == 380 and [s["name"] for s in m["sources"]] == ["alpha"]
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a prepared data folder"):
        prepare(changed, str(stranger), overwrite=True)
    assert (stranger / "notes.txt").read_text() == "mine"
    assert not [p for p in os.listdir(tmp_path) if ".build-" in p]    # no scratch left behind


def big_vocab_model(prepared, path):
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = pb.ModelProto()
    with open(os.path.join(prepared[0], "tokenizer.model"), "rb") as f:
        proto.ParseFromString(f.read())
    for i in range(66_000):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<x{i}>", 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return str(path)


@pytest.mark.parametrize("case", ["missing_path", "empty", "text_field", "hub_offline", "vocab_dtype",
                                  "bad_key"])
def test_bad_input_one_clear_error_nothing_written(case, prepared, small_recipe, tmp_path, monkeypatch):
    corpus = os.path.join(os.path.dirname(small_recipe), "a", "docs.jsonl")
    src = {"name": "a", "path": corpus}
    extra, match = {}, None
    if case == "missing_path":
        src, match = {"name": "a", "path": str(tmp_path / "nowhere")}, "path '.*nowhere' does not exist"
    elif case == "empty":
        extra, match = {"clean": {"min_chars": 10 ** 9}}, "empty corpus: 8 documents read, 8 shorter"
    elif case == "text_field":
        src, match = dict(src, text_field="content"), "no field 'content' .fields: .*text.*; set text_field"
    elif case == "hub_offline":
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        src, match = {"name": "a", "dataset": "deepmind/pg19"}, "needs the network.*set `path:`"
    elif case == "vocab_dtype":
        extra = {"tokenizer": {"path": big_vocab_model(prepared, tmp_path / "big.model")}, "dtype": "uint16"}
        match = "vocab 66,400 does not fit shard dtype uint16"
    elif case == "bad_key":
        extra, match = {"tokeniser": {}}, "unknown key 'tokeniser'; did you mean 'tokenizer'"
    recipe = write_recipe(tmp_path / "r.yaml", [src], **extra)
    out = str(tmp_path / "out")
    shutil.copytree(prepared[0], out)
    before = snapshot(out)
    t0 = time.time()
    with pytest.raises(DataError, match=match) as err:
        prepare(recipe, out, overwrite=True, num_proc=1)
    assert "\n" not in str(err.value) and time.time() - t0 < 30
    assert snapshot(out) == before
    assert not [p for p in os.listdir(tmp_path) if ".build-" in p]


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "index", "manifest", "unlisted", "malformed"])
def test_damaged_folder_is_detected(prepared, tmp_path, damage):
    out = str(tmp_path / "d")
    shutil.copytree(prepared[0], out)
    shard = os.path.join(out, "train", "shard_00000.bin")
    if damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) - 2)
        match = "has .* bytes but manifest.json says"
    elif damage == "corrupt":
        with open(shard, "r+b") as f:
            f.seek(100)
            f.write(b"\xff\xff")
        match = "does not match its sha256"
    elif damage == "index":
        docs = np.load(os.path.join(out, "train", "docs.npy"))
        docs[0, 2] -= 1
        np.save(os.path.join(out, "train", "docs.npy"), docs)
        match = "disagrees with manifest.json"
    elif damage == "unlisted":  # a shard copied in from another preparation
        shutil.copy(shard, os.path.join(out, "train", "shard_00007.bin"))
        match = r"shard train/shard_00007.bin is not listed in manifest.json \(1 shard\(s\) listed, 2 on disk\)"
    elif damage == "malformed":
        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)
        m["splits"]["train"]["shards"][0]["file"] = "../../etc/passwd"
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump(m, f)
        match = "is malformed: splits.train names '../../etc/passwd' outside the folder"
    else:
        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)
        m["splits"]["train"]["tokens"] += 5
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump(m, f)
        match = "disagrees with manifest.json"
    cfg = DataConfig(dir=out, recipe=None)
    with pytest.raises(DataError, match=match):
        TokenLoader(cfg, seq_len=64, micro_batch_size=1, dp_rank=0, dp_world=1, seed=0)
    if damage == "corrupt":  # with hashing off, the bad id is still caught when read
        cfg.verify_shards = False
        loader = TokenLoader(cfg, seq_len=64, micro_batch_size=1, dp_rank=0, dp_world=1, seed=0)
        with pytest.raises(DataError, match="token id 65535 >= vocab size 400"):
            for _ in range(loader._plan(0).rows):
                loader.next_batch()


def test_ensure_prepared(small_recipe, prepared, tmp_path):
    assert ensure_prepared(DataConfig(dir=prepared[0], recipe=small_recipe)) == prepared[0]
    with pytest.raises(DataError, match="holds no manifest.json and data.recipe is not set"):
        ensure_prepared(DataConfig(dir=str(tmp_path / "none"), recipe=None))
    with pytest.raises(DataError, match="data.recipe 'nope.yaml' does not exist"):
        ensure_prepared(DataConfig(dir=str(tmp_path / "none"), recipe="nope.yaml"))
    other = write_recipe(tmp_path / "other.yaml", [{"name": "x", "path": os.path.join(
        os.path.dirname(small_recipe), "b", "texts")}], vocab_size=380)
    with pytest.raises(DataError, match="prepared from another version of data.recipe"):
        ensure_prepared(DataConfig(dir=prepared[0], recipe=other))
    d = ensure_prepared(DataConfig(dir=str(tmp_path / "fresh"), recipe=other))
    assert os.path.isfile(os.path.join(d, "manifest.json"))


def test_nested_fields_sub_sources_and_budgets(tmp_path):
    rng = np.random.default_rng(9)
    rows = [{"doc": {"body": fake_text(rng, 300)}, "meta": {"set": ["Book", "Web"][i % 2]}} for i in range(10)]
    path = tmp_path / "nested.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", [{"name": "mix", "path": str(path), "text_field": "doc.body",
                                                 "source_field": "meta.set", "max_docs": 8}],
                          eval_documents=1, token_budget=2000)
    m = prepare(recipe, str(tmp_path / "out"), num_proc=1)
    names = [s["name"] for s in m["sources"]]
    assert names == ["mix/Book", "mix/Web"]
    assert [s["documents_read"] for s in m["sources"]] == [4, 4]          # max_docs=8
    assert m["splits"]["eval"]["documents"] == 2
    assert 2000 <= m["splits"]["train"]["tokens"] < 2000 + 2 * max(np.load(
        os.path.join(tmp_path, "out", "train", "docs.npy"))[:, 2])        # stops at the budget
    loader = TokenLoader(DataConfig(dir=str(tmp_path / "out"), recipe=None,
                                    source_weights={"mix/Book": 1, "mix/Web": 1}),
                         seq_len=32, micro_batch_size=2, dp_rank=0, dp_world=1, seed=0)
    assert loader.next_batch()["input_ids"].shape == (1, 64)
