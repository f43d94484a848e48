"""Helpers for the kernel tests: error reports (max / mean) collected into one summary table.

tests/conftest.py already sets TRITON_INTERPRET=1 without CUDA; the setdefault
below only matters when this folder is run with another root conftest.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_REPORT: list[tuple[str, str, float, float, float]] = []


def errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    diff = (actual.double() - expected.double()).abs()
    return diff.max().item(), diff.mean().item()


@pytest.fixture
def report(request):
    """report(name, actual, expected, atol, rtol): assert closeness, log max/mean error."""
    def check(name, actual, expected, atol, rtol):
        mx, mean = errors(actual, expected)
        _REPORT.append((request.node.name, name, mx, mean, atol))
        print(f"{request.node.name} {name}: max {mx:.2e} mean {mean:.2e}")
        torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name}: {m}")
    return check


def pytest_terminal_summary(terminalreporter):
    if not _REPORT:
        return
    tr = terminalreporter
    tr.section("sparse attention errors vs reference (max / mean abs)")
    for test, name, mx, mean, atol in _REPORT:
        tr.write_line(f"{test:<72} {name:<4} max {mx:.2e}  mean {mean:.2e}  (atol {atol:.1e})")


@pytest.fixture
def one_thread():
    """These tests use small tensors, where OpenMP hand-offs on a busy 2-core CI box cost
    more than they save (10x on tiny softmaxes); restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
