"""Workers for the multi-process evaluation tests (CPU, gloo; spawned, each asserts itself).

grid_split: the passkey grid with its batches split over 2 ranks equals the 1-process grid
on every rank, and each rank ran only its share of the forwards.
sequence_parallel: a model evaluated sequence-parallel over 2 ranks gives the 1-process
greedy tokens and bucket losses.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from moetrain.config import config_from_dict

from dist_helpers import free_port, init, spawn  # noqa: F401 (tests/dist_helpers.py)


class Picky:
    """A scripted model (logits callable): right on the keys whose digit sum is odd, a wrong
    last digit on the others, so the grid is neither all right nor all wrong. Counts calls."""

    def __init__(self, tok, samples):
        self.vocab, self.calls = tok.vocab_size, 0
        wrong = tok.encode("9")[-1]
        self.items = [(s.prompt_ids, s.answer_ids if sum(map(int, s.answer)) % 2 else
                       s.answer_ids[:-1] + [wrong if s.answer_ids[-1] != wrong else tok.encode("8")[-1]])
                      for s in samples]

    def __call__(self, input_ids, position_ids=None):
        self.calls += 1
        B, S = input_ids.shape
        logits = torch.zeros(B, S, self.vocab)
        for b in range(B):
            row = input_ids[b].tolist()
            found = [(p, sc) for p, sc in self.items if row[:len(p)] == p]
            if not found:
                continue  # a padding row of the decode loop
            prompt, script = found[0]
            for pos in range(len(prompt) - 1, S):
                k = pos - len(prompt) + 1
                if k < len(script):
                    logits[b, pos, script[k]] = 1.0
        return logits


GRID = dict(lengths=[160, 200], depths=[0.0, 0.5, 1.0], trials=5, seed=1, batch_tokens=400)


def all_samples(tok):
    from moetrain.eval.passkey import make_trials
    return [s for L in GRID["lengths"] for d in GRID["depths"]
            for s in make_trials(tok, L, d, GRID["trials"], GRID["seed"])]


def grid(tok, forward) -> dict:
    from moetrain.eval.passkey import passkey_grid
    return passkey_grid(forward, tok, GRID["lengths"], GRID["depths"], GRID["trials"], GRID["seed"],
                        batch_tokens=GRID["batch_tokens"])


def grid_split(rank: int, world: int, data_dir: str, want: dict, calls_one: int) -> None:
    from moetrain.data import load_tokenizer
    init(rank, world)
    tok = load_tokenizer(data_dir)
    fake = Picky(tok, all_samples(tok))
    got = grid(tok, fake)
    assert got == want, (rank, got, want)
    # Each rank did about half the forwards (rounds are padded: at most one batch more).
    assert fake.calls < calls_one, (rank, fake.calls, calls_one)
    dist.destroy_process_group()


def tiny_model():
    from moetrain.model import build_model
    torch.manual_seed(0)
    cfg = config_from_dict({"model": {
        "vocab_size": 97, "hidden_size": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
        "intermediate_size": 48, "max_position_embeddings": 512,
        "moe": {"n_experts": 4, "top_k": 2, "intermediate_size": 16, "first_k_dense": 1},
        "attention": {"layer_types": ["sliding", "full"], "window": 24, "sink_tokens": 2}}}).model
    return build_model(cfg).eval()


def sp_results(forward, ids, index, labels, bounds):
    """(greedy tokens at index, bucket loss sums) through the eval heads."""
    from moetrain.eval.loading import run_head
    from moetrain.eval.passkey import logits_at
    from moetrain.eval.position_loss import bucket_loss_head
    toks = run_head(forward, ids, logits_at(index)).argmax(-1)
    sums = run_head(forward, ids, bucket_loss_head(labels, bounds))
    return toks, sums


def sequence_parallel(rank: int, world: int, state_path: str, want_path: str) -> None:
    from moetrain.eval.loading import model_forward
    init(rank, world)
    model = tiny_model()
    model.load_state_dict(torch.load(state_path, weights_only=True))
    fwd = model_forward(model, sp_size=world)
    assert fwd.sp_size == world
    want = torch.load(want_path, weights_only=True)
    toks, sums = sp_results(fwd, want["ids"], want["index"], want["labels"], want["bounds"].tolist())
    assert torch.equal(toks, want["toks"]), (rank, toks, want["toks"])
    torch.testing.assert_close(sums, want["sums"], rtol=1e-5, atol=1e-5)
    dist.destroy_process_group()


def train_and_eval_sp(rank: int, world: int, overrides: list, run: str, out: str, argv: list) -> None:
    """Train a tiny run with sequence parallelism over the 2 ranks (its stage end evaluates
    through the SP engine), then scripts/eval_long.py on it in the same 2 processes."""
    import importlib.util
    from moetrain.compose import train
    from moetrain.config import load_config
    init(rank, world)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    train(load_config(os.path.join(root, "configs", "default.yaml"), overrides), run, resume="never")
    spec = importlib.util.spec_from_file_location("eval_long_script", os.path.join(root, "scripts", "eval_long.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(argv + ["--model", run, "--out", out]) == 0
    dist.destroy_process_group()
