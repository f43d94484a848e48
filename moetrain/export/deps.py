"""One line naming the `pip install` that fixes a missing package, instead of a traceback.

The CLI catches ImportError around its work and prints `missing_package_line(err)`.
"""
from __future__ import annotations

import importlib
import re
from typing import Optional

# import name -> what to pip install (the distribution, as pyproject.toml names it)
PIP_NAMES = {
    "transformers": "transformers>=4.46", "tokenizers": "transformers>=4.46", "safetensors": "safetensors>=0.4",
    "google": "protobuf>=4", "sentencepiece": "sentencepiece>=0.2", "wandb": "wandb>=0.17",
    "matplotlib": "matplotlib>=3.7", "datasets": "datasets>=2.19", "yaml": "pyyaml>=6", "numpy": "numpy>=1.24",
    "deepspeed": "deepspeed>=0.15", "accelerate": "accelerate>=0.30", "triton": "triton>=3.0",
    "lm_eval": "lm-eval", "liger_kernel": "liger-kernel",
}
# packages that live in another venv: the fix is a script, not a pip install here
OTHER_VENV = {"vllm": "vLLM runs in its own venv: create it with `bash scripts/serving_env.sh`"}


EXPORT_NEEDS = ("transformers", "tokenizers", "safetensors", "google.protobuf")


def require(*modules: str) -> None:
    """Import each now, so that a missing one stops the export before the slow work,
    as an ImportError that missing_package_line() turns into one line."""
    for name in modules:
        importlib.import_module(name)


def missing_module(err: ImportError) -> Optional[str]:
    """The top-level module an ImportError is about, or None when it is not a missing module."""
    name = getattr(err, "name", None)
    if not name and "protobuf" in str(err).lower():  # transformers' import_protobuf() words it this way
        return "google"
    return name.split(".")[0] if name else None


def _missing_distribution(err: ImportError) -> Optional[str]:
    """The requirement in transformers' dependency check ("The 'safetensors>=0.8.0' distribution
    was not found ..."), raised as PackageNotFoundError whose `name` is that whole sentence."""
    m = re.search(r"The '([A-Za-z0-9_.\-]+[<>=!~]*[A-Za-z0-9_.,<>=!~*]*)' distribution was not found", str(err))
    return m.group(1) if m else None


def missing_package_line(err: ImportError) -> str:
    """`error: ...` without a traceback: what is missing and the command that installs it."""
    req = _missing_distribution(err)
    if req:
        dist = re.split(r"[<>=!~]", req)[0]
        return (f"error: Python package '{dist}' is missing; install it with `pip install '{req}'` "
                "(or `pip install -e .`)")
    mod = missing_module(err)
    if mod in OTHER_VENV:
        return f"error: Python package '{mod}' is not installed here; {OTHER_VENV[mod]}"
    if mod is None:
        return f"error: {err}; reinstall with `pip install -e .`"
    pip = PIP_NAMES.get(mod, mod)
    shown = "protobuf" if mod == "google" else mod
    return f"error: Python package '{shown}' is missing; install it with `pip install '{pip}'` (or `pip install -e .`)"
