"""Eval-test fixtures: the lead's tiny stdlib corpus (tests/train/conftest.py), loaded by
path under its own module name so the two conftest modules never shadow each other."""
import importlib.util
import os

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train", "conftest.py")
_spec = importlib.util.spec_from_file_location("moetrain_tests_train_conftest", _path)
train_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_conftest)

_hpath = os.path.join(os.path.dirname(_path), "train_helpers.py")
_hspec = importlib.util.spec_from_file_location("moetrain_tests_train_helpers", _hpath)
train_helpers = importlib.util.module_from_spec(_hspec)
_hspec.loader.exec_module(train_helpers)

tiny_data = train_conftest.tiny_data  # session fixture: prepared folder (vocab 512, 2 held-out docs per source)
tiny_overrides = train_helpers.tiny_overrides
ROOT = train_helpers.ROOT

import pytest  # noqa: E402

DEFAULT = os.path.join(ROOT, "configs", "default.yaml")


@pytest.fixture(scope="session")
def tiny_cfg(tiny_data):
    """Factory: the lead's tiny model/data config with extra dotted overrides."""
    from moetrain.config import load_config

    def make(**extra):
        return load_config(DEFAULT, tiny_overrides(tiny_data, **extra))
    return make
