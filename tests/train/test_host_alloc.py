"""glibc malloc settings for CPU training (moetrain/train/host_alloc.py): applied once, left
alone when the user set them, and they stop the page faults of re-allocated large buffers."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")

PROBE = textwrap.dedent("""
    import ctypes, resource, sys, torch
    from moetrain.train import host_alloc
    if sys.argv[1] == "keep":
        applied = host_alloc.keep_freed_memory()
    elif sys.argv[1] == "release":
        applied = host_alloc.release_freed_memory()
    else:  # control: glibc's starting mmap threshold (128 KiB), fixed, so large buffers are always mmapped
        ctypes.CDLL("libc.so.6").mallopt(host_alloc.M_MMAP_THRESHOLD, 128 * 1024)
        applied = False

    rss = lambda: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS:")))
    base = rss()

    def step():  # 8 buffers of 8 MiB live at once, then freed: a step's logits chunks, MoE buffers
        ys = [torch.empty(2 << 20).fill_(1.0) for _ in range(8)]
        del ys
    for _ in range(3):  # warm up
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(applied, faults, rss() - base)  # KiB still resident after the last free

""")


def _without_huge_pages() -> dict:
    """os.environ less the huge-page request an earlier in-process run (release_host_memory)
    may have left there."""
    from moetrain.train.host_alloc import HUGE_PAGES_ENV
    return {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}


def _faults(mode: str, env=None):
    # 4 KiB pages: huge pages would cut each 8 MiB buffer's faults from 2048 to a handful
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, check=True, capture_output=True, text=True,
                         env={**_without_huge_pages(), **(env or {})}).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


def test_settings_stop_page_faults_on_reallocated_buffers():
    # glibc's own behaviour varies from run to run (its thresholds adapt to the allocation
    # history): anywhere between the control below and none. The control pins the bad case:
    # every 8 MiB buffer a fresh mmap, faulted in page by page (2048 faults each, every step).
    applied, kept, _ = _faults("keep")
    _, mmapped, _ = _faults("mmap")
    assert applied
    # kept: at most a buffer or two faulted in again (CI once saw exactly one, 2048), against
    # every buffer of every step in the control
    assert mmapped >= 20 * 8 * 2000 and kept <= 2 * 2048, (kept, mmapped)


def test_user_settings_are_left_alone():
    applied, _, _ = _faults("keep", {"MALLOC_TRIM_THRESHOLD_": "1000000"})
    assert not applied
    applied, _, _ = _faults("release", {"MALLOC_MMAP_THRESHOLD_": "1000000"})
    assert not applied


def test_release_returns_freed_blocks():
    """memory.release_host_memory: every large block is its own mmap, returned when freed
    (the RSS drops back), where the reuse setting keeps 64 MiB of freed buffers resident."""
    applied, faults, kept_kib = _faults("release")
    _, _, reuse_kib = _faults("keep")
    assert applied
    assert faults >= 20 * 8 * 2000, faults        # the price: each 8 MiB buffer faulted in anew
    assert kept_kib < 8 * 1024 and reuse_kib >= 60 * 1024, (kept_kib, reuse_kib)


def test_trainer_setting_follows_config(monkeypatch):
    from moetrain.config import config_from_dict
    from moetrain.train import host_alloc
    calls = []
    monkeypatch.setattr(host_alloc, "_set", lambda m, t: calls.append((m, t)) or True)
    monkeypatch.setattr(os, "environ", _without_huge_pages())
    host_alloc.apply_host_memory(config_from_dict({}, []))
    assert host_alloc.HUGE_PAGES_ENV not in os.environ
    host_alloc.apply_host_memory(config_from_dict({}, ["memory.release_host_memory=true"]))
    assert calls == [(host_alloc.MMAP_THRESHOLD_MAX, 2 ** 31 - 1), (128 * 1024, 128 * 1024)]
    assert os.environ[host_alloc.HUGE_PAGES_ENV] == "1"


HUGE = textwrap.dedent("""
    import sys
    from moetrain.config import config_from_dict
    from moetrain.train import host_alloc
    host_alloc.apply_host_memory(config_from_dict({}, [f"memory.release_host_memory={sys.argv[1]}"]))
    print(host_alloc.huge_pages_in_use())
""")


@pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
                    reason="kernel built without transparent huge pages")
@pytest.mark.parametrize("release,env,expect", [("true", None, "True"), ("false", None, "False"),
                                                ("true", "0", "False")])
def test_release_asks_for_huge_pages_before_the_first_tensor(release, env, expect):
    """With release_host_memory, large blocks carry MADV_HUGEPAGE (2 MiB faults instead of
    4 KiB ones); without it nothing changes, and a THP_MEM_ALLOC_ENABLE the user set wins."""
    e = _without_huge_pages()
    if env is not None:
        e["THP_MEM_ALLOC_ENABLE"] = env
    out = subprocess.run([sys.executable, "-c", HUGE, release], cwd=ROOT, check=True, capture_output=True,
                         text=True, env=e).stdout.split()
    assert out[-1] == expect, out
