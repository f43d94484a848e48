import json
import os
import subprocess
import sys

import pytest

from moetrain.config import ConfigError, load_config, to_dict
from moetrain.parallel.engine import derive_deepspeed_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")

# (yaml text, fragment the one-line error must contain)
BAD = [
    ("model: {hidden_size: 250, n_heads: 8}", "not divisible by model.n_heads"),
    ("model: {n_heads: 8, n_kv_heads: 3}", "must divide model.n_heads"),
    ("model: {moe: {n_experts: 4, top_k: 5}}", "top_k=5 must be between 1"),
    ("stages: [{name: a, seq_len: 0, steps: 3}]", "seq_len=0 must be positive"),
    ("deepspeed: {zero_stage: 4}", "zero_stage=4 must be 0, 1, 2 or 3"),
    ("train: {micro_batch_size: 4, grad_accum_steps: 2, global_batch_size: 10}", "global_batch_size=10"),
    ("model: {hiden_size: 256}", "did you mean 'model.hidden_size'"),
    ("optim: {lr: fast}", "optim.lr: expected a number"),
    ("train: {precision: fp8}", "train.precision='fp8' is not one of"),
    ("model: {attention: {layer_types: [full, dense]}}", "layer_types has 'dense'"),
    ("stages: [{name: a, seq_len: 64}]", "needs exactly one of steps or tokens"),
    ("model: {moe: {n_experts: 6, ep_size: 4}}", "ep_size=4 must divide"),
    ("- just\n- a list", "must hold a mapping"),
    ("model: {hidden_size: [", "is not valid YAML"),
    ("logging: {wandb: {mode: sometimes}}", "logging.wandb.mode='sometimes'"),
]


@pytest.mark.parametrize("text,fragment", BAD)
def test_bad_config_in_process(tmp_path, capsys, text, fragment):
    from scripts_train import main
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    rc = main(["--config", str(p), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "run").exists()


def test_bad_config_cli_exit_code_no_traceback(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {hidden_size: 250, n_heads: 8}")
    r = subprocess.run([sys.executable, TRAIN, "--config", str(p)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: model.hidden_size=250")


def test_missing_config_file_and_bad_override(tmp_path, capsys):
    from scripts_train import main
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--config", os.path.join(ROOT, "configs/default.yaml"), "--set", "train.max_steps"]) == 2
    assert "dotted.key=value" in capsys.readouterr().err
    assert main(["--config", os.path.join(ROOT, "configs/default.yaml"), "--set", "modle.n_layers=2"]) == 2
    assert "did you mean 'model'" in capsys.readouterr().err


def test_overrides_are_coerced():
    cfg = load_config(os.path.join(ROOT, "configs/default.yaml"),
                      ["train.max_steps=20", "model.moe.top_k=1", "optim.lr=1e-3", "model.qk_norm=false",
                       "stages.1.seq_len=512", "model.attention.layer_types=[full]"])
    assert cfg.train.max_steps == 20 and isinstance(cfg.train.max_steps, int)
    assert cfg.model.moe.top_k == 1 and cfg.optim.lr == 1e-3 and cfg.model.qk_norm is False
    assert cfg.stages[1].seq_len == 512 and cfg.model.attention.layer_types == ["full"]
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["train.max_steps=2.5"])


def test_deepspeed_config_is_derived_with_extra_last():
    cfg = load_config(None, ["deepspeed.zero_stage=3", "train.precision=bf16", "train.grad_accum_steps=4",
                             "optim.grad_clip=0.5", "deepspeed.offload_optimizer=cpu",
                             "deepspeed.extra={zero_optimization: {overlap_comm: false}, gradient_clipping: 2.0}"])
    ds = derive_deepspeed_config(cfg, dp_world=2)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 8 * 4 * 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["overlap_comm"] is False and ds["gradient_clipping"] == 2.0


@pytest.mark.parametrize("name", ["h100_moe1b_zero2", "h100_moe1b_zero3"])
def test_h100_configs_dry_run(name):
    r = subprocess.run([sys.executable, TRAIN, "--config", os.path.join(ROOT, "configs", name + ".yaml"),
                        "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "parameters: total" in r.stdout and "memory per GPU" in r.stdout
    total, active = [float(x) for x in r.stdout.split("total ")[1].split(" B")[0:1] +
                     r.stdout.split("active per token ")[1].split(" B")[0:1]]
    assert 0.8 <= active <= 2.0 and total > 3 * active
    ds = json.loads(r.stdout[r.stdout.index("{"):])["deepspeed"]
    assert ds["zero_optimization"]["stage"] == (2 if "zero2" in name else 3) and ds["bf16"]["enabled"]


def test_default_config_round_trips():
    cfg = load_config(os.path.join(ROOT, "configs/default.yaml"))
    assert cfg.name == "default" and to_dict(cfg)["model"]["moe"]["n_experts"] == 4


def test_a_bare_yaml_off_means_off(tmp_path):
    # YAML 1.1 reads `spike_action: off` as false; the user meant the word.
    p = tmp_path / "c.yaml"
    p.write_text(open(os.path.join(ROOT, "configs/default.yaml")).read() + "\n")
    cfg = load_config(str(p), ["guards.spike_action=off"])
    assert cfg.guards.spike_action == "off"
