"""Helpers for the data tests: fake text, small corpora on disk, recipes, token documents."""
import json
import os

import numpy as np

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qua", "bri", "dor", "fen",
              "gal", "hum", "jor", "kel", "mar", "nis", "or", "pel", "rin", "sol", "tor", "ul", "ven", "wy"]


def fake_text(rng: np.random.Generator, n_words: int) -> str:
    """Pseudo-English: capitalised sentences of made-up words, lines and paragraphs."""
    words = ["".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))) for _ in range(300)]
    out, line = [], []
    for i in range(n_words):
        w = words[int(rng.zipf(1.3)) % len(words)]
        line.append(w.capitalize() if not line else w)
        if rng.random() < 0.12:
            line[-1] += rng.choice([".", ",", ";", "!", "?"])
        if rng.random() < 0.05 or i == n_words - 1:
            out.append(" ".join(line))
            line = []
            if rng.random() < 0.3:
                out.append("")
    return "\n".join(out)


def write_corpus(root, n_docs=12, words=(300, 1500), seed=0, kind="jsonl", field="text"):
    """n_docs documents as one jsonl/json/parquet file or a folder of .txt files; returns the path."""
    rng = np.random.default_rng(seed)
    texts = [fake_text(rng, int(rng.integers(*words))) for _ in range(n_docs)]
    os.makedirs(root, exist_ok=True)
    if kind == "txt":
        folder = os.path.join(root, "texts")
        os.makedirs(folder, exist_ok=True)
        for i, t in enumerate(texts):
            with open(os.path.join(folder, f"doc{i:03d}.txt"), "w") as f:
                f.write(t)
        return folder
    path = os.path.join(root, f"docs.{kind}")
    rows = [{field: t, "id": i} for i, t in enumerate(texts)]
    if kind == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif kind == "json":
        with open(path, "w") as f:
            json.dump(rows, f)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_recipe(path, sources, vocab_size=400, eval_documents=1, **extra):
    import yaml
    recipe = {"name": "test", "sources": sources, "eval_documents": eval_documents,
              "clean": {"min_chars": 100}, "tokenizer": {"vocab_size": vocab_size, "sample_chars": 200_000}}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return str(path)
