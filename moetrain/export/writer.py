"""Sharded safetensors + index, and a safe output folder (nothing lost silently).

An export is built in `<out>.partial/` and moved into place only when complete
(and verified, when asked). An existing `<out>` is only replaced when it is a
previous export of ours holding nothing but the files that export wrote.
"""
from __future__ import annotations

import json
import os
import re
import shutil

MARKER = "moetrain_export.json"  # provenance + the file list; also marks the folder as ours
INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
    """'5GB' / '500MiB' / 1000000 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"shard size '{text}' is not a size like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def write_shards(tensors: dict, out_dir: str, max_bytes: int) -> list:
    """Greedy in name order; a tensor larger than max_bytes gets a shard of its own.
    Always writes the index (also for one shard), as transformers and vLLM accept."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + [INDEX]


def write_json(out_dir: str, name: str, obj: dict) -> str:
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return name


def _ours(path: str) -> list | None:
    """The file list of a previous export of ours at `path`, else None."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            return list(json.load(f)["files"]) + [MARKER]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_out_dir(out_dir: str) -> None:
    """Refuse before any work when finishing the export would lose something."""
    if os.path.isfile(out_dir):
        raise ValueError(f"--out {out_dir} is a file; give a folder")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    files = _ours(out_dir)
    if files is None:
        raise ValueError(f"--out {out_dir} is not empty and not a previous moetrain export; "
                         "choose an empty or new folder")
    extra = sorted(set(os.listdir(out_dir)) - set(files))
    if extra:
        raise ValueError(f"--out {out_dir} is a previous export but also holds {extra[0]!r} (not written by the "
                         "export); move it away or choose another folder")


_SENTINEL = ".moetrain_partial"


def staging_dir(out_dir: str) -> str:
    """`<out>.partial/`, created fresh; a leftover of a failed or killed export of ours
    (it carries our sentinel file) is replaced, anything else is left alone."""
    stage = os.path.normpath(out_dir) + ".partial"
    if os.path.exists(stage):
        if not os.path.isfile(os.path.join(stage, _SENTINEL)):
            raise ValueError(f"{stage} exists and was not made by an export; move it away")
        shutil.rmtree(stage)
    os.makedirs(stage)
    open(os.path.join(stage, _SENTINEL), "w").close()
    return stage


def written_files(stage: str) -> list:
    return sorted(f for f in os.listdir(stage) if f not in (_SENTINEL, MARKER))


def publish(stage: str, out_dir: str) -> None:
    """Move the finished export into place, replacing a previous export of ours."""
    check_out_dir(out_dir)  # again: the folder may have changed while we worked
    os.remove(os.path.join(stage, _SENTINEL))
    old = None
    if os.path.isdir(out_dir):
        old = os.path.normpath(out_dir) + ".old"
        if os.path.isdir(old):
            shutil.rmtree(old)
        os.replace(out_dir, old)
    os.replace(stage, out_dir)
    if old:
        shutil.rmtree(old)
