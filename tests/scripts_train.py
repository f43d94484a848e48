"""Import shim so tests can call scripts/train.py's main() in-process."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "moetrain_train_script", os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "train.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
main = _mod.main
