"""evaluate_stage on a tiny random model: flat metrics, eval.json schema, PNGs, W&B images;
loss by position on held-out windows."""
import json
import math

import numpy as np
import pytest
import torch

from moetrain.eval import evaluate_stage
from moetrain.eval.position_loss import bucket_bounds, held_out_windows, loss_by_position
from moetrain.model import build_model
from moetrain.train.schedule import plan_stages

STAGES = "[{name: short, seq_len: 64, steps: 1}, {name: long, seq_len: 160, steps: 1, rope: {type: yarn, factor: 2.5}}]"


class FakeWandb:
    def __init__(self):
        self.logged = []

    def log(self, data, commit=True, step=None):
        self.logged.append((data, commit))


@pytest.fixture(scope="module")
def stage_eval(tiny_cfg, tmp_path_factory):
    cfg = tiny_cfg(**{"stages": STAGES, "eval.lengths": "[64, 160]", "eval.passkey_trials": 2,
                      "eval.depths": "[0, 1]", "eval.position_buckets": 4, "eval.loss_documents": 3})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()

    def forward(input_ids, position_ids=None):
        with torch.no_grad():
            return model(input_ids, position_ids=position_ids).logits.float()

    root = tmp_path_factory.mktemp("run") / "eval"
    wb = FakeWandb()
    out = {}
    for plan in plan_stages(cfg):
        out[plan.name] = evaluate_stage(forward, cfg, plan, str(root / plan.name), write=True, wandb_run=wb)
    return root, out, wb


def test_metrics_are_flat_json_scalars(stage_eval):
    _, metrics, _ = stage_eval
    m = metrics["long"]
    for key in ("passkey_acc", "passkey_acc@160", "loss@64", "loss@160", "loss_pos_first", "loss_pos_last",
                "loss_pos_first@160", "loss_pos_last@64", "eval_seconds"):
        assert key in m, key
    assert "passkey_acc@64" not in m  # a 64-token context cannot hold the prompt: skipped, not 0
    for v in m.values():
        assert isinstance(v, (int, float)) and math.isfinite(v)
    json.dumps(m)
    assert 0.0 <= m["passkey_acc"] <= 1.0
    assert m["loss_pos_last"] == m["loss_pos_last@160"]  # unsuffixed = the stage's own seq_len
    assert metrics["short"]["loss_pos_last"] == metrics["short"]["loss_pos_last@64"]
    assert abs(m["loss@64"] - math.log(512)) < 1.0  # a random model is near uniform


def test_eval_json_schema_and_pngs(stage_eval):
    root, _, _ = stage_eval
    res = json.load(open(root / "long" / "eval.json"))
    assert res["stage"] == "long" and res["stage_index"] == 1 and res["seq_len"] == 160
    assert res["rope"]["type"] == "yarn" and res["rope"]["original_max_position_embeddings"] == 64
    assert res["settings"]["trials"] == 2 and res["settings"]["depths"] == [0.0, 1.0]
    pk = res["passkey"]
    assert pk["lengths"] == [160] and len(pk["accuracy"]) == 1 and len(pk["accuracy"][0]) == 2
    assert set(res["loss_by_position"]) == {"64", "160"}
    curve = res["loss_by_position"]["160"]
    assert curve["bucket_start"] == [0, 40, 80, 120] and curve["bucket_end"] == [40, 80, 120, 160]
    assert len(curve["loss"]) == 4 and curve["windows"] == 3
    assert any("64 tokens skipped" in n for n in res["notes"])
    assert res["metrics"]["passkey_acc@160"] == pk["accuracy_by_length"]["160"]
    for stage in ("short", "long"):
        assert (root / stage / "loss_by_position.png").stat().st_size > 1000
    assert (root / "long" / "passkey_heatmap.png").stat().st_size > 1000
    assert json.load(open(root / "short" / "eval.json"))["passkey"]["lengths"] == [160]  # eval.lengths: all stages
    assert (root / "loss_by_position_stages.png").stat().st_size > 1000


def test_plots_go_to_wandb_as_images(stage_eval):
    import wandb
    _, _, wb = stage_eval
    data, commit = wb.logged[-1]
    assert commit is False  # joins the stage_end record's step
    assert set(data) == {"eval/long/loss_by_position", "eval/long/passkey_heatmap",
                         "eval/long/loss_by_position_stages"}
    assert all(isinstance(v, wandb.Image) for v in data.values())


def test_held_out_windows_round_robin(tiny_data):
    from moetrain.data.shards import SplitData
    lengths = SplitData(tiny_data, "eval", verify_hashes=False).lengths
    n_fit = int(sum(n // 101 for n in lengths))
    w = held_out_windows(tiny_data, 100, n_fit + 5)
    assert w.shape == (n_fit, 101)  # every window that fits, none more
    assert held_out_windows(tiny_data, int(lengths.max()) + 1, 3).shape == (0, int(lengths.max()) + 2)
    with pytest.raises(ValueError, match="no held-out document"):
        loss_by_position(lambda x, position_ids=None: None, tiny_data, int(lengths.max()) + 1, 2, 4)


def test_loss_by_position_matches_a_direct_computation(tiny_data):
    torch.manual_seed(0)
    table = torch.randn(512, 512)  # a bigram "model": logits depend on the current token only

    def forward(input_ids, position_ids=None):
        return table[input_ids]

    c = loss_by_position(forward, tiny_data, 50, 3, 5, batch_tokens=60)
    w = torch.from_numpy(held_out_windows(tiny_data, 50, 3))
    ce = torch.nn.functional.cross_entropy(table[w[:, :-1]].transpose(1, 2), w[:, 1:], reduction="none")
    want = [float(ce[:, a:b].mean()) for a, b in bucket_bounds(50, 5)]
    assert np.allclose(c["loss"], want, atol=1e-5) and c["windows"] == 3
