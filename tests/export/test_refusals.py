"""What no target represents is refused in one line (or approximated on request);
the output folder never loses anything; the CLI reports user errors as `error: ...`, exit 2."""
import json
import os

import pytest
from export_helpers import export_script, tiny_model

from moetrain.export import ExportError, export_model

cli = export_script()

INEXACT = {  # feature -> (flavour, model overrides, words the refusal must name)
    "moba": ("mixtral", {"attention__layer_types": ["moba", "full"], "attention__block_size": 8,
                         "attention__moba_topk": 2}, "MoBA"),
    "sinks": ("mixtral", {"attention__layer_types": ["sliding"], "attention__window": 8,
                          "attention__sink_tokens": 2}, "sink tokens"),
    "capacity": ("mixtral", {"moe__capacity_factor": 1.0}, "capacity_factor"),
    "groups": ("mixtral", {"moe__n_groups": 2, "moe__topk_groups": 1}, "group-limited"),
    "qk_norm_mixed_layers": ("qwen3", {"attention__layer_types": ["sliding", "full"], "attention__window": 8},
                             "qk_norm"),
}


def _run(tmp_path, tokenizer_path, model, mcfg, attn, **kw):
    return export_model(model, mcfg, attn, str(tmp_path / "hf"), tokenizer_path=tokenizer_path, log=lambda m: None,
                        **kw)


@pytest.mark.parametrize("feature", sorted(INEXACT))
def test_inexact_feature_refused_then_approximated(tmp_path, tokenizer_path, feature):
    arch, overrides, words = INEXACT[feature]
    model, mcfg, attn = tiny_model(arch, "yarn", **overrides)
    with pytest.raises(ExportError) as e:
        _run(tmp_path, tokenizer_path, model, mcfg, attn)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and "--allow-approx" in msg
    assert not os.path.exists(tmp_path / "hf") and not os.path.exists(tmp_path / "hf.partial")
    report = _run(tmp_path, tokenizer_path, model, mcfg, attn, allow_approx=True, verify=True)
    assert not report["exact"] and report["approximations"]
    assert report["verify"]["passed"], report["verify_line"]  # the servable form is converted exactly
    assert report["approximation"]["max_abs_logit_diff"] > 1e-3  # and it does differ from the trained model


def test_expert_bias_refused_only_when_nonzero(tmp_path, tokenizer_path):
    import torch
    model, mcfg, attn = tiny_model("mixtral", "none", moe__bias_update_speed=0.001)
    assert _run(tmp_path / "a", tokenizer_path, model, mcfg, attn)["exact"]  # a zero bias changes nothing
    with torch.no_grad():
        model.layers[0].mlp.router.expert_bias.copy_(torch.tensor([0.3, -0.1, 0.0, 0.2]))
    with pytest.raises(ExportError, match="aux-loss-free routing bias"):
        _run(tmp_path / "b", tokenizer_path, model, mcfg, attn)


@pytest.mark.parametrize("overrides,words", [({"moe__router": "sigmoid"}, "n_shared_experts=0: the sigmoid router"),
                                             ({"moe__n_shared_experts": 1}, "shared experts")])
def test_unservable_refused_even_with_allow_approx(tmp_path, tokenizer_path, overrides, words):
    model, mcfg, attn = tiny_model("qwen3", "none", **overrides)
    with pytest.raises(ExportError, match=words):
        _run(tmp_path, tokenizer_path, model, mcfg, attn, allow_approx=True)


def test_out_dir_safety(tmp_path, tokenizer_path):
    model, mcfg, attn = tiny_model("mixtral", "none")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and not a previous moetrain export"):
        _run(tmp_path, tokenizer_path, model, mcfg, attn)
    os.remove(out / "notes.txt")
    _run(tmp_path, tokenizer_path, model, mcfg, attn)  # empty folder: fine
    first = json.loads((out / "moetrain_export.json").read_text())
    _run(tmp_path, tokenizer_path, model, mcfg, attn, dtype="bf16")  # a previous export of ours is replaced
    assert json.loads((out / "moetrain_export.json").read_text())["dtype"] == "bf16" != first["dtype"]
    (out / "README.md").write_text("model card I wrote by hand")
    with pytest.raises(ValueError, match="README.md"):
        _run(tmp_path, tokenizer_path, model, mcfg, attn)
    assert (out / "README.md").read_text() == "model card I wrote by hand"
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no .partial / .old leftovers


@pytest.mark.parametrize("args,words", [
    (["--checkpoint", "/nonexistent/run", "--out", "OUT"], "does not exist"),
    (["--checkpoint", "RUN", "--out", "OUT", "--shard-size", "lots"], "shard size"),
    (["--checkpoint", "RUN", "--out", "RUN"], "not empty"),
])
def test_cli_user_errors(tmp_path, capsys, args, words):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    args = [str(run) if a == "RUN" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_cli_incomplete_run(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "client_state.json").write_text("{}")
    assert cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "no COMPLETE marker" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    assert "complete checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,words", [
    ({"attention": {"layer_types": ["sliding", "full"], "window": 8}}, "sliding-window attention layers"),
    ({"moe__shared_expert_gate": True}, "shared_expert_gate=true"),
    ({"moe__shared_expert_intermediate_size": 40}, "shared_expert_intermediate_size=40"),
    ({"moe__n_groups": 8, "moe__topk_groups": 2}, "one expert per group")])
def test_what_glm4_cannot_represent_is_refused(tmp_path, tokenizer_path, overrides, words):
    model, mcfg, attn = tiny_model("glm4", "none", **overrides)
    with pytest.raises(ExportError, match=words):
        _run(tmp_path, tokenizer_path, model, mcfg, attn, allow_approx=True)
