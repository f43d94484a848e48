"""Long-context evaluation never builds full-vocabulary logits for the sequence: every
tensor with the vocabulary as its last dim is watched (a TorchDispatchMode sees each op's
output), and the largest stays within one cross-entropy chunk or the passkey's answer
positions, while the old logits path is shown to exceed that bound. The heads give the
numbers full logits give; the passkey grid split over 2 processes equals the 1-process
grid; a model evaluated sequence-parallel over 2 processes gives the 1-process results."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import eval_dist_workers as W
from moetrain.data import load_tokenizer
from moetrain.eval.loading import ModelForward, run_head
from moetrain.eval.passkey import logits_at, make_trials, passkey_grid
import moetrain.eval.position_loss as PL
from moetrain.eval.position_loss import bucket_bounds, bucket_loss_head, bucket_losses

V = 4099  # vocabulary: odd and unlike any other size in the model


class LargestVocabTensor(TorchDispatchMode):
    """Records the most elements of any op output whose last dim is V."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == V:
                self.most = max(self.most, t.numel())
        return out


@pytest.fixture(scope="module")
def model():
    from moetrain.config import config_from_dict
    from moetrain.model import build_model
    torch.manual_seed(0)
    cfg = config_from_dict({"model": {
        "vocab_size": V, "hidden_size": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
        "intermediate_size": 24, "max_position_embeddings": 16384, "moe": {"n_experts": 0},
        "attention": {"layer_types": ["sliding"], "window": 64, "backend": "chunked"}}}).model
    return build_model(cfg).eval()


def test_long_eval_never_materialises_vocab_logits(model, monkeypatch):
    chunk = 256  # a small chunk keeps the sequence that is many chunks long cheap on CPU
    monkeypatch.setattr(PL, "LOSS_CHUNK", chunk)
    S, B = 6 * chunk + 5, 2
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, V, (B, S + 1), generator=g).numpy()
    bounds = bucket_bounds(S, 4)
    fwd = ModelForward(model)
    with LargestVocabTensor() as probe:
        loss = bucket_losses(fwd, windows, bounds, batch_tokens=B * S)
    assert probe.most <= chunk * V < B * S * V / 10, probe.most
    assert np.isfinite(loss).all() and (loss > 0).all()
    index = torch.tensor([[S - 7 + t for t in range(6)]] * B)  # the passkey head: 6 answer positions
    with LargestVocabTensor() as probe:
        run_head(fwd, torch.from_numpy(windows[:, :-1]), logits_at(index))
    assert probe.most == max(B * 6, model.cfg.hidden_size) * V  # the answer logits, or the view w.T
    # The logits path the evaluation used before builds [B, S, V]: the probe would catch it.
    with LargestVocabTensor() as probe, torch.no_grad():
        model(torch.from_numpy(windows[:, :500]))
    assert probe.most >= B * 500 * V


def test_heads_equal_full_logits(model):
    S, B = 300, 3
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, V, (B, S + 1), generator=g)
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits.float()
    per_pos = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").double()
    bounds = bucket_bounds(S, 7)
    fwd = ModelForward(model)
    want = torch.stack([per_pos[:, a:b].sum() for a, b in bounds])
    got = run_head(fwd, tokens[:, :-1], bucket_loss_head(tokens[:, 1:], bounds, chunk=64))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    mean = bucket_losses(fwd, tokens.numpy(), bounds, batch_tokens=2 * S)  # 2 forwards, summed
    torch.testing.assert_close(torch.from_numpy(mean), want / (B * torch.tensor([b - a for a, b in bounds])),
                               rtol=1e-5, atol=1e-6)
    index = torch.tensor([[5, 17, 299], [0, 150, 151], [298, 298, 1]])
    at = run_head(fwd, tokens[:, :-1], logits_at(index))
    torch.testing.assert_close(at, logits[torch.arange(B)[:, None], index], rtol=1e-5, atol=1e-5)
    # A logits callable (scripted test models) goes through the same heads.
    torch.testing.assert_close(run_head(lambda ids: logits, tokens[:, :-1], logits_at(index)), at,
                               rtol=1e-5, atol=1e-5)


def test_passkey_grid_split_over_two_processes(tiny_data):
    tok = load_tokenizer(tiny_data)
    fake = W.Picky(tok, W.all_samples(tok))
    want = W.grid(tok, fake)
    cells = [a for row in want["accuracy"] for a in row]
    assert 0 < min(cells) < 1 or 0 < max(cells) < 1 or len(set(cells)) > 1  # a grid with structure
    W.spawn(W.grid_split, 2, tiny_data, want, fake.calls)


@pytest.mark.slow
def test_sequence_parallel_eval_matches_one_process(tmp_path):
    model = W.tiny_model()
    S, B = 101, 2  # odd: the eval forward pads to a multiple of the group
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 97, (B, S + 1), generator=g)
    index = torch.tensor([[3, 50, 100], [49, 51, 99]])  # both shards
    bounds = torch.tensor(bucket_bounds(S, 5))
    toks, sums = W.sp_results(ModelForward(model), tokens[:, :-1], index, tokens[:, 1:], bounds.tolist())
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save({"ids": tokens[:, :-1], "labels": tokens[:, 1:], "index": index, "bounds": bounds, "toks": toks,
                "sums": sums}, tmp_path / "want.pt")
    W.spawn(W.sequence_parallel, 2, str(tmp_path / "model.pt"), str(tmp_path / "want.pt"))


def test_make_trials_still_fit(tiny_data):
    """The heads read positions inside each row: prompt + answer fit the length."""
    tok = load_tokenizer(tiny_data)
    assert all(len(s.prompt_ids) + len(s.answer_ids) <= 200 for s in make_trials(tok, 200, 0.5, 4, seed=0))
    assert passkey_grid(W.Picky(tok, []), tok, [10], [0.5], 2)["notes"]  # too short: skipped with a note


@pytest.mark.slow
def test_stage_end_eval_under_zero3_matches_the_checkpoint(tiny_cfg, tmp_path):
    """The eval head runs inside the LM head's call through the ZeRO-3 engine (the weight is
    gathered there): the stage-end numbers equal those of the consolidated checkpoint."""
    import json
    from moetrain.compose import train
    from moetrain.eval import evaluate, flat_metrics, load_for_eval
    run = str(tmp_path / "run")
    cfg = tiny_cfg(**{"stages": "[{name: main, seq_len: 64, steps: 2}]", "deepspeed.zero_stage": 3,
                      "eval.enabled": "true", "eval.lengths": "[160]", "eval.passkey_trials": 2,
                      "eval.depths": "[0, 1]", "eval.loss_documents": 2, "eval.position_buckets": 4})
    train(cfg, run, resume="never")
    rec = next(json.loads(x) for x in open(f"{run}/metrics.jsonl") if '"stage_end"' in x)
    m = load_for_eval(run)
    res = evaluate(m.forward, m.tokenizer, m.data_dir, [160], cfg.eval)
    got = flat_metrics(res, 160)
    assert got["passkey_acc@160"] == rec["passkey_acc@160"]
    assert got["loss@160"] == pytest.approx(rec["loss@160"], abs=1e-4)
    assert got["loss_pos_first@160"] == pytest.approx(rec["loss_pos_first@160"], abs=1e-4)


@pytest.mark.slow
def test_run_trained_with_sequence_parallelism_is_evaluated_with_it(tiny_data, tmp_path):
    """2 processes train with deepspeed.sequence_parallel_size=2; the stage end and
    scripts/eval_long.py (2 processes) evaluate sequence-parallel and agree; one process
    evaluates the same checkpoint in one piece (with a note) and gets the same numbers."""
    import json
    import os
    from eval_dist_workers import train_and_eval_sp
    from moetrain.eval import evaluate, flat_metrics, load_for_eval
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "eval_sp_train_helpers", os.path.join(os.path.dirname(os.path.dirname(__file__)), "train", "train_helpers.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    tiny_overrides = helpers.tiny_overrides
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    ev = {"eval.enabled": "true", "eval.lengths": "[161]", "eval.passkey_trials": 2, "eval.depths": "[0, 1]",
          "eval.loss_documents": 2, "eval.position_buckets": 4}
    ov = tiny_overrides(tiny_data, steps=2, **{"deepspeed.sequence_parallel_size": 2, **ev})
    argv = ["--lengths", "161", "--depths", "0,1", "--trials", "2", "--device", "cpu"]
    W.spawn(train_and_eval_sp, 2, ov, run, out, argv)
    rec = next(json.loads(x) for x in open(os.path.join(run, "metrics.jsonl")) if '"stage_end"' in x)
    res = json.load(open(os.path.join(out, "eval.json")))
    assert res["model"]["sequence_parallel_size"] == 2 and not res["notes"]
    for key in ("passkey_acc@161", "loss@161", "loss_pos_first@161", "loss_pos_last@161"):
        assert res["metrics"][key] == pytest.approx(rec[key], abs=1e-5), key
    one = load_for_eval(run)  # this process: no group, so in one piece
    assert one.info["sequence_parallel_size"] == 1 and "sequence_parallel_size=2" in one.info["note"]
    from moetrain.config import load_config
    got = flat_metrics(evaluate(one.forward, one.tokenizer, one.data_dir, [161],
                                load_config(os.path.join(run, "config.yaml")).eval), 161)
    assert got["passkey_acc@161"] == rec["passkey_acc@161"]
    assert got["loss@161"] == pytest.approx(rec["loss@161"], abs=1e-4)
