"""Muon at ZeRO-1/2 with expert parallelism (2 gloo processes): equal to ZeRO-0, and a
checkpoint resumes bit for bit (moetrain/optim/muon_zero.py)."""
import pytest
from moe_dist_workers import spawn
from optim_dist_workers import muon_zero_matches_zero0


@pytest.mark.slow
@pytest.mark.parametrize("ep", [1, 2])
def test_muon_zero12_matches_zero0_and_resumes_exactly(ep, tmp_path):
    spawn(muon_zero_matches_zero0, 2, ep, str(tmp_path))
