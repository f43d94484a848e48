"""Several CPU ranks on one machine share its cores instead of each taking all of them."""
import os

import pytest
import torch

from moetrain.parallel.engine import _share_cpu_threads


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("var", ["LOCAL_WORLD_SIZE", "LOCAL_SIZE"])  # torchrun, deepspeed launcher
def test_local_ranks_split_the_cores(monkeypatch, threads, var):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv(var, "4")
    _share_cpu_threads()
    assert torch.get_num_threads() == 4
    monkeypatch.setenv(var, "32")  # more ranks than cores: still one thread each
    _share_cpu_threads()
    assert torch.get_num_threads() == 1


def test_explicit_omp_setting_and_single_process_are_left_alone(monkeypatch, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    torch.set_num_threads(3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    _share_cpu_threads()
    assert torch.get_num_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    _share_cpu_threads()
    assert torch.get_num_threads() == 3
