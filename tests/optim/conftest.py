"""Reuse the training tests' corpus fixture and helpers, and the EP workers."""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for sub in ("train", "moe"):
    path = os.path.join(os.path.dirname(HERE), sub)
    if path not in sys.path:
        sys.path.insert(0, path)

_spec = importlib.util.spec_from_file_location("_train_conftest", os.path.join(os.path.dirname(HERE), "train",
                                                                               "conftest.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
tiny_data = _mod.tiny_data
