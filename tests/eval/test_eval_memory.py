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
