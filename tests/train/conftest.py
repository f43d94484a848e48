"""A small real-text corpus (Python's own stdlib sources), prepared once per session."""
import os
import sysconfig

import pytest
import yaml

MODULES = ["argparse", "dataclasses", "difflib", "enum", "functools", "heapq", "inspect", "json/decoder",
           "pathlib", "shutil", "string", "textwrap", "typing", "zipfile", "fractions", "statistics"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("stdlib_corpus")
    src = sysconfig.get_paths()["stdlib"]
    texts = root / "texts"
    texts.mkdir()
    for name in MODULES:
        path = os.path.join(src, name + ".py")
        if os.path.exists(path):
            (texts / (name.replace("/", "_") + ".txt")).write_text(open(path, encoding="utf-8").read())
    recipe = {"name": "stdlib", "sources": [{"name": "stdlib", "path": str(texts)}], "eval_documents": 2,
              "clean": {"min_chars": 200}, "tokenizer": {"vocab_size": 512, "sample_chars": 300_000}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    from moetrain.data import prepare
    out = str(root / "prepared")
    prepare(str(root / "recipe.yaml"), out, num_proc=1)
    return out


