"""Router health metrics: window accumulation, dead experts, drops, collapse warning."""
import math

import pytest
import torch

from moetrain.train.metrics import RouterMonitor, add_router_stats, router_counts, router_health


def stats(counts, tokens, dropped=0, entropy=1.0, lb=1.5, z=2.0):
    counts = torch.tensor(counts)
    return {"counts": counts, "dropped": torch.tensor(dropped), "assignments": int(counts.sum()), "tokens": tokens,
            "entropy": torch.tensor(entropy), "lb_loss": torch.tensor(lb), "z_loss": torch.tensor(z)}


def test_window_sums_micro_batches_and_steps_and_reports_per_layer():
    mon = RouterMonitor()
    step1 = add_router_stats(None, [stats([4, 4, 0, 0], 4), stats([2, 2, 2, 2], 4, dropped=2)])
    step1 = add_router_stats(step1, [stats([4, 0, 4, 0], 4, entropy=0.5), stats([2, 2, 2, 2], 4)])
    assert [c.tolist() for c in router_counts(step1)] == [[8, 4, 4, 0], [4, 4, 4, 4]]
    mon.observe(step1)
    mon.observe(add_router_stats(None, [stats([0, 8, 0, 0], 4), stats([8, 0, 0, 0], 4)]))
    out = mon.flush()
    assert out["moe/layer0/expert_share"] == pytest.approx([8 / 24, 12 / 24, 4 / 24, 0.0], abs=1e-5)
    assert out["moe/layer0/dead_experts"] == 1 and out["moe/layer1/dead_experts"] == 0  # over the whole window
    assert out["moe/layer0/max_over_mean"] == pytest.approx(0.5 * 4)
    assert out["moe/layer0/entropy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert out["moe/layer1/dropped_share"] == pytest.approx(2 / 24)
    assert out["moe/layer0/top_token_frac"] == pytest.approx(12 / 12)
    assert out["moe/layer0/lb_loss"] == pytest.approx(1.5) and out["moe/layer0/z_loss"] == pytest.approx(2.0)
    assert out["moe/dead_experts"] == 1 and out["moe/max_over_mean"] == pytest.approx(2.0)
    assert mon.flush() == {}  # the window restarts after each log


def test_collapse_warns_after_several_logs_in_a_row(capsys):
    mon = RouterMonitor(collapse_frac=0.5, patience=3)
    collapsed = [stats([90, 5, 3, 2], 100), stats([25, 25, 25, 25], 100)]
    healthy = [stats([30, 25, 25, 20], 100), stats([25, 25, 25, 25], 100)]
    for acc in (collapsed, collapsed, healthy, collapsed, collapsed):
        mon.observe(add_router_stats(None, acc))
        out = mon.flush()
    assert out["moe/collapsed_layers"] == 1
    assert "collapsed" not in capsys.readouterr().err  # the streak was broken by a healthy log
    mon.observe(add_router_stats(None, collapsed))
    mon.flush()
    err = capsys.readouterr().err
    assert "MoE layer 0 collapsed: expert 0 took 90% of tokens for 3 logs in a row" in err
    assert "layer 1" not in err


def test_persistent_collapse_escalates_to_an_error(capsys):
    mon = RouterMonitor(collapse_frac=0.5, patience=2)
    collapsed = [stats([90, 5, 3, 2], 100)]
    levels = []
    for _ in range(6):
        mon.observe(add_router_stats(None, collapsed))
        levels.append(mon.flush()["moe/collapse_level"])
    assert levels == [0, 1, 1, 1, 1, 2]  # warning from 2 logs in a row, error from 3 x 2 = 6
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["WARNING", "WARNING", "ERROR"]  # at logs 2, 4, 6
    assert "for 6 logs in a row" in err[-1]
    mon.observe(add_router_stats(None, [stats([30, 25, 25, 20], 100)]))
    assert mon.flush()["moe/collapse_level"] == 0  # a healthy log resets it


def test_uniform_top_k_share_is_not_a_collapse():
    """E=4, k=2: every expert sees half the tokens when perfectly balanced."""
    mon = RouterMonitor(collapse_frac=0.5, patience=1)
    mon.observe(add_router_stats(None, [stats([50, 50, 50, 50], 100)]))
    assert mon.flush()["moe/collapsed_layers"] == 0


def test_router_health_accepts_bare_counts():
    out = router_health([torch.tensor([3, 1, 0, 0])])
    assert out["moe/layer0/max_over_mean"] == pytest.approx(3.0) and out["moe/layer0/dead_experts"] == 2
    assert "moe/layer0/entropy" not in out and math.isclose(sum(out["moe/layer0/expert_share"]), 1.0)
