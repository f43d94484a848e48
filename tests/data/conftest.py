"""Fixtures for the data tests: small local corpora and prepared folders (no network anywhere)."""
import pytest
from data_helpers import write_corpus, write_recipe

from moetrain.data.shards import write_prepared


@pytest.fixture(scope="session")
def small_recipe(tmp_path_factory):
    """A two-source recipe (jsonl + folder of txt) over ~30k words."""
    root = tmp_path_factory.mktemp("corpus")
    a = write_corpus(root / "a", n_docs=8, seed=1, kind="jsonl")
    b = write_corpus(root / "b", n_docs=5, seed=2, kind="txt")
    return write_recipe(root / "recipe.yaml", [{"name": "alpha", "path": a}, {"name": "beta", "path": b}])


@pytest.fixture(scope="session")
def prepared(small_recipe, tmp_path_factory):
    """The small recipe, prepared once per test session; returns (dir, manifest)."""
    from moetrain.data import prepare
    out = str(tmp_path_factory.mktemp("prepared") / "out")
    return out, prepare(small_recipe, out, num_proc=1)


@pytest.fixture
def token_folder(tmp_path):
    """Factory: a prepared folder from raw token documents {split: [(ids, source)]}."""
    def make(splits, sources=("s0",), vocab=1000, shard_tokens=100_000, name="tokens"):
        info = {"file": "tokenizer.model", "sha256": "", "vocab_size": int(vocab), "bos_id": 1, "eos_id": 2,
                "pad_id": 3, "unk_id": 0}
        out = str(tmp_path / name)
        write_prepared(out, splits, list(sources), info, shard_tokens=shard_tokens)
        return out
    return make
