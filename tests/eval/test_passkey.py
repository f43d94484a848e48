"""Passkey scoring: greedy-decoding exact match, checked with scripted fake models."""
import pytest
import torch

from moetrain.data import load_tokenizer
from moetrain.eval.passkey import make_trials, passkey_grid, score_batch, verdict


@pytest.mark.parametrize("text,n,want", [
    (" 12345", 6, True), ("12345", 5, None), (" 12345.", 6, True), ("\n12345", 6, True),
    (" 12346", 6, False), (" 1234", 6, False), (" 123456", 6, False), (" 12", 3, None), ("  ", 2, None),
    (" the", 1, False), (" 12x", 3, False), ("", 6, False), (" 13", 2, False),
])
def test_verdict(text, n, want):
    assert verdict(text, "12345", n, 6) is want


class Scripted:
    """A fake model that, after each known prompt, 'generates' script(sample) token by token:
    the logits at the prompt's last position and every later one pick the next script token."""

    def __init__(self, samples, script, vocab):
        self.items = [(s.prompt_ids, script(s)) for s in samples]
        self.vocab, self.calls = vocab, 0

    def __call__(self, input_ids, position_ids=None):
        self.calls += 1
        B, S = input_ids.shape
        logits = torch.zeros(B, S, self.vocab)
        for b in range(B):
            row = input_ids[b].tolist()
            prompt, script = next((p, sc) for p, sc in self.items if row[:len(p)] == p)
            for pos in range(len(prompt) - 1, S):
                k = pos - len(prompt) + 1  # tokens generated before this position's prediction
                if k < len(script):
                    logits[b, pos, script[k]] = 1.0
        return logits


@pytest.fixture(scope="module")
def tok(tiny_data):
    return load_tokenizer(tiny_data)


@pytest.fixture(scope="module")
def samples(tok):
    return make_trials(tok, 200, 0.5, 6, seed=3) + make_trials(tok, 200, 0.0, 6, seed=3)


def _digit_ids(tok, s):
    return [i for i in s.answer_ids if tok.decode([i]).strip()]


def test_oracle_scores_100_percent_in_one_forward(tok, samples):
    fake = Scripted(samples, lambda s: s.answer_ids, tok.vocab_size)
    assert all(score_batch(fake, samples, tok))
    assert fake.calls == 1  # teacher forcing covers the whole greedy path


def test_garbage_scores_0_percent(tok, samples):
    the = tok.encode(" the")[0]
    fake = Scripted(samples, lambda s: [the] * 10, tok.vocab_size)
    assert not any(score_batch(fake, samples, tok))


def test_one_wrong_digit_fails(tok, samples):
    def script(s):
        last = s.answer_ids[-1]
        other = next(i for i in _digit_ids(tok, s) + tok.encode("7") + tok.encode("8") if i != last
                     and tok.decode([i]).strip().isdigit())
        return s.answer_ids[:-1] + [other]
    fake = Scripted(samples, script, tok.vocab_size)
    assert not any(score_batch(fake, samples, tok))


def test_other_tokenisation_of_the_key_is_decoded_greedily(tok, samples):
    """Newline instead of the space piece, then the digits: leaves the teacher-forced path at
    once, so the rows are decoded token by token, and the key still matches exactly."""
    newline = tok.sp.piece_to_id("\n")
    fake = Scripted(samples, lambda s: [newline] + _digit_ids(tok, s), tok.vocab_size)
    assert all(score_batch(fake, samples, tok))
    assert fake.calls == 1 + len(_digit_ids(tok, samples[0]))


def test_grid_accuracy_and_skips(tok):
    trials = {(L, d): make_trials(tok, L, d, 4, seed=0) for L in (160, 200) for d in (0.0, 1.0)}
    everything = [s for cell in trials.values() for s in cell]
    fake = Scripted(everything, lambda s: s.answer_ids, tok.vocab_size)
    grid = passkey_grid(fake, tok, [20, 160, 200], [0.0, 1.0], 4, seed=0, batch_tokens=400)
    assert grid["lengths"] == [160, 200] and grid["accuracy"] == [[1.0, 1.0], [1.0, 1.0]]
    assert grid["accuracy_by_length"] == {"160": 1.0, "200": 1.0}
    assert len(grid["notes"]) == 1 and "20 tokens" in grid["notes"][0]
    # Trials are fixed by (seed, length, depth): every model sees the same prompts, each fitting its length.
    again = make_trials(tok, 200, 1.0, 4, seed=0)
    assert [s.prompt_ids for s in again] == [s.prompt_ids for s in trials[(200, 1.0)]]
    assert all(len(s.prompt_ids) + len(s.answer_ids) <= 200 for s in everything)
