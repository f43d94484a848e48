"""Read recipe sources into Hugging Face `datasets` with columns text, source.

Local files and folders (json/jsonl/parquet/txt) go through `load_dataset` with
the matching builder; hub names through `load_dataset(name, config, split,
streaming)`. A hub source on a machine without network fails at once, with one
line saying how to point the recipe at local files instead.
"""
from __future__ import annotations

import glob
import os
import urllib.error
import urllib.request

import datasets

from .errors import DataError
from .fetch import archive_texts
from .recipe import Recipe, SourceSpec, resolve_path

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def _local_files(path: str, where: str) -> tuple[list[str], str]:
    """(sorted files, builder) for a file or folder; one format per source."""
    if not os.path.exists(path):
        raise DataError(f"{where}: path '{path}' does not exist; fix sources[].path "
                        "(relative paths are relative to the recipe file)")
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.isfile(f) and os.path.splitext(f)[1].lower() in _BUILDERS)
    if not files:
        raise DataError(f"{where}: no .json/.jsonl/.parquet/.txt files under '{path}'")
    kinds = {_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in kinds:
        raise DataError(f"{where}: '{path}' is not a .json/.jsonl/.parquet/.txt file")
    if len(kinds) > 1:
        raise DataError(f"{where}: '{path}' mixes {sorted(kinds)} files; make one source per format")
    return files, kinds.pop()


def _load_local(files: list[str], builder: str, cache: str, where: str) -> datasets.Dataset:
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache, **kwargs)
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(f"{where}: could not read {files[0]}{' ...' if len(files) > 1 else ''} as "
                        f"{builder} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def hub_reachable(timeout: float = 5.0) -> tuple[bool, str]:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False, "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    try:
        urllib.request.urlopen(endpoint + "/api/datasets?limit=1", timeout=timeout).close()
        return True, ""
    except urllib.error.HTTPError:
        return True, ""  # the server answered; access problems surface with the real request
    except (OSError, ValueError) as e:
        return False, f"{endpoint} is unreachable ({getattr(e, 'reason', e)})"


def _load_hub(spec: SourceSpec, where: str) -> datasets.Dataset | datasets.IterableDataset:
    ok, why = hub_reachable()
    if not ok:
        raise DataError(f"{where}: hub dataset '{spec.dataset}' needs the network but {why}; download "
                        "its files elsewhere and set `path:` to the local json/jsonl/parquet/txt files "
                        "instead of `dataset:`")
    try:
        return datasets.load_dataset(spec.dataset, spec.config, split=spec.split, data_files=spec.data_files,
                                     streaming=spec.streaming)
    except Exception as e:
        raise DataError(f"{where}: loading hub dataset '{spec.dataset}' failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None


def _get(row: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(row, dict) or key not in row:
            return None
        row = row[key]
    return row


def _check_field(ds, spec: SourceSpec, where: str) -> None:
    cols = ds.column_names or []
    top = spec.text_field.split(".")[0]
    if cols and top not in cols:
        raise DataError(f"{where}: no field '{spec.text_field}' (fields: {', '.join(cols)}); "
                        "set text_field to the one holding the text")


def _rows(ds, spec: SourceSpec, where: str):
    """Yield {'text', 'source'} up to max_docs / max_chars."""
    n_docs = n_chars = 0
    for row in ds:
        text = _get(row, spec.text_field)
        if text is None:
            raise DataError(f"{where}: no field '{spec.text_field}' (fields: {', '.join(map(str, row))}); "
                            "set text_field to the one holding the text")
        if not isinstance(text, str):
            raise DataError(f"{where}: field '{spec.text_field}' holds {type(text).__name__}, not text; "
                            "set text_field to a string field")
        sub = _get(row, spec.source_field) if spec.source_field else None
        yield {"text": text, "source": f"{spec.name}/{sub}" if sub is not None else spec.name}
        n_docs += 1
        n_chars += len(text)
        if (spec.max_docs and n_docs >= spec.max_docs) or (spec.max_chars and n_chars >= spec.max_chars):
            return


def load_source(recipe: Recipe, index: int, cache: str) -> datasets.Dataset:
    """One recipe source as a Dataset with columns text (str) and source (str)."""
    spec = recipe.sources[index]
    where = f"source '{spec.name}'"
    if spec.archive is not None:
        ds = _load_local(archive_texts(spec.archive), "text", cache, where)
    elif spec.path is not None:
        ds = _load_local(*_local_files(resolve_path(recipe, spec.path), where), cache, where)
    else:
        ds = _load_hub(spec, where)
    _check_field(ds, spec, where)
    simple = isinstance(ds, datasets.Dataset) and spec.source_field is None and "." not in spec.text_field
    if simple and not spec.max_chars:
        if spec.max_docs:
            ds = ds.select(range(min(spec.max_docs, len(ds))))
        ds = ds.select_columns([spec.text_field])
        if spec.text_field != "text":
            ds = ds.rename_column(spec.text_field, "text")
        _check_strings(ds, spec, where)
        return ds.add_column("source", [spec.name] * len(ds))
    # Streams, nested fields and per-row source names: materialise through a generator.
    try:
        return datasets.Dataset.from_generator(_rows, gen_kwargs={"ds": ds, "spec": spec, "where": where},
                                               cache_dir=cache)
    except Exception as e:
        raise _data_error_in(e) or DataError(f"{where}: reading failed ({type(e).__name__}: "
                                             f"{str(e).splitlines()[0][:200]})") from None


def _data_error_in(e: BaseException) -> DataError | None:
    """The DataError that `datasets` wrapped in its own exception, if any."""
    while e is not None:
        if isinstance(e, DataError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _check_strings(ds: datasets.Dataset, spec: SourceSpec, where: str) -> None:
    feature = ds.features["text"]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{where}: field '{spec.text_field}' holds {feature}, not text; "
                        "set text_field to a string field")
