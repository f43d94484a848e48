"""Synthetic long-range tasks: the standard passkey format, lengths, answers, mixing into batches."""
import random

import numpy as np
import pytest

from moetrain.config import DataConfig
from moetrain.data import DataError, TokenLoader, load_tokenizer, make_multikey_prompt, make_passkey_prompt
from moetrain.data.synthetic import PASSKEY_FILLER, passkey_sample, training_example


@pytest.fixture(scope="module")
def tok(prepared):
    return load_tokenizer(prepared[0])


def test_passkey_standard_format(tok):
    ids, key = make_passkey_prompt(tok, 400, 0.5, np.random.default_rng(0))
    assert len(ids) <= 400 and len(ids) > 360 and ids[0] == tok.bos_id
    text = tok.decode(ids[1:])
    lines = text.split("\n")
    assert lines[0].startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert lines[1].startswith(PASSKEY_FILLER)
    assert lines[2] == f"The pass key is {key}. Remember it. {key} is the pass key."
    assert lines[-1] == "What is the pass key? The pass key is"
    assert len(key) == 5 and key.isdigit()
    # The key line sits near the requested depth (measured in filler characters).
    before, after = len(lines[1]), len(lines[3])
    assert abs(before / (before + after) - 0.5) < 0.1


def test_passkey_depth_digits_filler_and_answer_ids(tok):
    s = passkey_sample(tok, 300, 0.0, random.Random(1), key_digits=8, filler="Red fish. Blue fish.")
    text = tok.decode(s.prompt_ids[1:])
    assert text.split("\n")[1].startswith("The pass key is ") and len(s.answer) == 8
    assert "Red fish. Blue fish." in text
    assert tok.decode(s.prompt_ids[1:] + s.answer_ids) == text + " " + s.answer
    a = make_passkey_prompt(tok, 300, 1.0, np.random.default_rng(7))
    assert a == make_passkey_prompt(tok, 300, 1.0, np.random.default_rng(7))   # same rng, same prompt
    assert tok.decode(a[0][1:]).split("\n")[-2].startswith("The pass key is")
    with pytest.raises(DataError, match="too short"):
        make_passkey_prompt(tok, 20, 0.5, np.random.default_rng(0))


def test_multikey(tok):
    ids, value = make_multikey_prompt(tok, 500, np.random.default_rng(3), n_keys=5)
    text = tok.decode(ids[1:])
    assert len(ids) <= 500 and text.count("The value of key ") == 5 + 1
    asked = text.split("What is the value of key ")[1].split("?")[0]
    assert f"The value of key {asked} is {value}." in text


def test_training_example_fits(tok):
    for seed in range(5):
        ids = training_example("passkey" if seed % 2 else "multikey", tok, 257, np.random.default_rng(seed))
        assert 200 < len(ids) <= 257 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id


def test_mixed_into_batches_deterministically(prepared):
    cfg = DataConfig(dir=prepared[0], recipe=None, synthetic={"passkey": 0.5})
    make = lambda rank, world: TokenLoader(cfg, seq_len=384, micro_batch_size=2, dp_rank=rank, dp_world=world,
                                           seed=0)
    tok = load_tokenizer(prepared[0])
    a, b = make(0, 1), make(0, 1)
    n_syn = 0
    for _ in range(20):
        x, y = a.next_batch(), b.next_batch()
        assert all(np.array_equal(x[k], y[k]) for k in ("input_ids", "labels", "cu_seqlens"))
        rows = x["input_ids"].reshape(2, 384).tolist()
        n_syn += sum("The pass key is" in tok.decode(r) for r in rows)
    assert 8 <= n_syn <= 32
    # Resume mid-stream on two ranks, with synthetic slots in the mix.
    r0, r1 = make(0, 2), make(1, 2)
    for _ in range(5):
        r0.next_batch(), r1.next_batch()
    c = make(1, 2)
    c.load_state_dict(r0.state_dict())
    for _ in range(5):
        assert np.array_equal(c.next_batch()["input_ids"], r1.next_batch()["input_ids"])
    with pytest.raises(DataError, match="does not fit seq_len=64"):
        TokenLoader(DataConfig(dir=prepared[0], synthetic={"passkey": 0.1}), seq_len=64, micro_batch_size=1,
                    dp_rank=0, dp_world=1, seed=0)
    with pytest.raises(DataError, match="unknown task 'nope'"):
        TokenLoader(DataConfig(dir=prepared[0], synthetic={"nope": 0.1}), seq_len=64, micro_batch_size=1,
                    dp_rank=0, dp_world=1, seed=0)
