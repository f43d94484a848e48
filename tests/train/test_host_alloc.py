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
    import resource, sys, torch
    from moetrain.train.host_alloc import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "1" else False

    def step():  # 8 buffers of 8 MiB live at once, then freed: a step's logits chunks, MoE buffers
        ys = [torch.empty(2 << 20).fill_(1.0) for _ in range(8)]
        del ys
    for _ in range(3):  # warm up
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(apply: bool, env=None):
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if apply else "0"], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={**os.environ, **(env or {})}).stdout.split()
    return out[0] == "True", int(out[1])


def test_settings_stop_page_faults_on_reallocated_buffers():
    applied, with_settings = _faults(True)
    _, without = _faults(False)
    assert applied
    # without: glibc trims the freed heap back to the OS and faults it in again every step
    # (~16k faults per step of 64 MiB); with: the heap keeps it
    assert without > 20 * 4000 and with_settings < without / 10, (with_settings, without)


def test_user_settings_are_left_alone():
    applied, _ = _faults(True, {"MALLOC_TRIM_THRESHOLD_": "1000000"})
    assert not applied
