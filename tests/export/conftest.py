"""Export tests: one thread per test process (tiny tensors; the CI box has 2 shared cores) and
a tiny prepared data folder with a real SentencePiece tokenizer. Helpers live in export_helpers
(not here: `from conftest import` would pick another folder's conftest in a full-suite run)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from export_helpers import make_data_dir  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    return make_data_dir(str(tmp_path_factory.mktemp("export_data") / "prepared"))


@pytest.fixture(scope="session")
def tokenizer_path(data_dir) -> str:
    return os.path.join(data_dir, "tokenizer.model")
