"""Real DeepSpeed checkpoints (2 processes over gloo) of every target: ZeRO 2 and 3, EP 1 and 2
(ZeRO-3 with EP > 1 is rejected by config validation), RoPE none / linear / YaRN / Llama-3 as
the final stage's scaling. load_model must reproduce the engine's own logits; the export must
pass --verify. One launch writes all twelve runs."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from export_helpers import export_script
from make_checkpoints import reference_batch

import moetrain
from moetrain.export import export_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
# name:zero:ep:rope -- per architecture ZeRO-2, ZeRO-3, ZeRO-2 + EP 2 and one more EP run, the RoPE
# methods spread so that every architecture meets all four.
SPECS = ["mixtral_z2:2:1:none", "mixtral_z3:3:1:linear", "mixtral_z2_ep2:2:2:yarn", "mixtral_z0_ep2:0:2:llama3",
         "qwen2_z2:2:1:linear", "qwen2_z3:3:1:yarn", "qwen2_z2_ep2:2:2:llama3", "qwen2_z1_ep2:1:2:none",
         "qwen3_z2:2:1:yarn", "qwen3_z3:3:1:llama3", "qwen3_z2_ep2:2:2:none", "qwen3_z1_ep2:1:2:linear"]
ARCH = {"mixtral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory, data_dir) -> str:
    out = str(tmp_path_factory.mktemp("ds_runs"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), os.path.join(HERE, "make_checkpoints.py"), out, data_dir, *SPECS]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=HERE)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out


@pytest.mark.dist
@pytest.mark.parametrize("spec", SPECS)
def test_load_model_reproduces_the_trained_engine(ds_runs, spec):
    run = os.path.join(ds_runs, spec.split(":")[0])
    model = moetrain.load_model(run)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    want = torch.load(os.path.join(run, "reference.pt"), weights_only=True)["logits"]
    with torch.no_grad():
        got = model(reference_batch()).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.dist
@pytest.mark.parametrize("spec", SPECS)
def test_export_of_each_zero_ep_rope_passes_verify(ds_runs, spec, tmp_path):
    name = spec.split(":")[0]
    report = export_checkpoint(os.path.join(ds_runs, name), str(tmp_path / "hf"), verify=True, log=lambda m: None)
    assert report["architecture"] == ARCH[name.split("_")[0]] and report["exact"]
    v = report["verify"]
    assert v["passed"] and v["max_abs_logit_diff"] <= 1e-4 and v["max_kl"] <= 1e-6 and v["greedy_match"], v
    assert report["source"].endswith(os.path.join("checkpoints", "step_00000002"))


@pytest.mark.dist
def test_cli_on_one_checkpoint_folder(ds_runs, tmp_path, capsys):
    cli = export_script()
    ckpt = os.path.join(ds_runs, "qwen2_z2_ep2", "checkpoints", "step_00000002")
    out = str(tmp_path / "hf")
    assert cli.main(["--checkpoint", ckpt, "--out", out, "--verify", "--dtype", "bf16"]) == 0
    stdout = capsys.readouterr().out
    assert "exported Qwen2MoeForCausalLM (bf16)" in stdout and "verify: max |logit diff|" in stdout
    assert "identical" in stdout
    # Exporting again into the same folder replaces our previous export.
    assert cli.main(["--checkpoint", ckpt, "--out", out]) == 0
