"""scripts/train.py under torchrun with 2 processes: EP=2 trains exactly like EP=1,
resumes exactly from a checkpoint, and logs router health."""
import json
import os
import random
import subprocess
import sys
import sysconfig

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"model.vocab_size": 512, "model.hidden_size": 64, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.intermediate_size": 128, "model.moe.n_experts": 4, "model.moe.top_k": 2,
        "model.moe.intermediate_size": 64, "model.moe.first_k_dense": 0, "model.moe.n_shared_experts": 1,
        "model.moe.bias_update_speed": 0.01, "model.moe.aux_loss_scope": "global_batch",
        "model.moe.capacity_factor": 1.5, "model.attention.layer_types": "[sliding, full]",
        "model.attention.window": 32, "data.recipe": "null", "stages": "[{name: main, seq_len: 64, steps: 6}]",
        "train.micro_batch_size": 2, "train.eval_batches": 2, "optim.warmup_steps": 5, "optim.lr": 3e-3,
        "logging.every_steps": 1, "logging.console": "plain", "logging.wandb.mode": "disabled",
        "checkpoint.every_steps": 3, "eval.enabled": "false", "deepspeed.zero_stage": 2,
        "data.synthetic": "{}", "export.enabled": "false", "eval.lengths": "[]"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """A few stdlib sources as a corpus, prepared with a 512-piece tokenizer."""
    root = tmp_path_factory.mktemp("moe_corpus")
    (root / "texts").mkdir()
    for name in ("argparse", "dataclasses", "difflib", "inspect", "typing", "statistics"):
        path = os.path.join(sysconfig.get_paths()["stdlib"], name + ".py")
        (root / "texts" / f"{name}.txt").write_text(open(path, encoding="utf-8").read())
    recipe = {"name": "stdlib", "sources": [{"name": "stdlib", "path": str(root / "texts")}], "eval_documents": 1,
              "clean": {"min_chars": 200}, "tokenizer": {"vocab_size": 512, "sample_chars": 300_000}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    from moetrain.data import prepare
    prepare(str(root / "recipe.yaml"), str(root / "prepared"), num_proc=1)
    return str(root / "prepared")


def torchrun(data_dir, run_dir, ep, resume=None, zero=2):
    ov = [f"{k}={v}" for k, v in {**TINY, "data.dir": data_dir, "model.moe.ep_size": ep,
                                  "deepspeed.zero_stage": zero}.items()]
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(random.randint(20000, 40000)), os.path.join(ROOT, "scripts", "train.py"), "--config",
            os.path.join(ROOT, "configs", "default.yaml"), "--run-dir", run_dir]
    args += ["--resume", resume] if resume else []
    for o in ov:
        args += ["--set", o]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip() and "event" not in line]


@pytest.mark.dist
@pytest.mark.slow
def test_ep2_run_equals_ep1_and_resumes_exactly(data_dir, tmp_path):
    ep2 = torchrun(data_dir, str(tmp_path / "ep2"), 2)
    ep1 = torchrun(data_dir, str(tmp_path / "ep1"), 1)
    assert [r["step"] for r in ep2] == list(range(1, 7))
    for a, b in zip(ep2, ep1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a["step"], a["grad_norm"])
    # ZeRO-0: the norm is ours (DeepSpeed keeps none), summed over the EP group's experts.
    z0 = torchrun(data_dir, str(tmp_path / "ep2_zero0"), 2, zero=0)
    for a, b in zip(z0, ep1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a["step"], a["grad_norm"])
    ckpt = tmp_path / "ep2" / "checkpoints" / "step_00000003"
    assert (ckpt / "experts_ep0.pt").exists() and (ckpt / "experts_ep1.pt").exists()
    resumed = torchrun(data_dir, str(tmp_path / "resumed"), 2, resume=str(ckpt))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in ep2[3:]]  # bit-identical steps 4..6
    last = ep2[-1]
    for key in ("moe/layer0/expert_share", "moe/layer1/max_over_mean", "moe/layer0/dead_experts",
                "moe/layer0/entropy", "moe/layer0/dropped_share", "moe/layer0/lb_loss", "moe/layer0/z_loss",
                "moe/collapsed_layers"):
        assert key in last, key
    assert len(last["moe/layer0/expert_share"]) == 4 and 0 <= last["moe/dropped_share"] < 1
