"""Tokenizer: exact round trip on normalised text, byte-identical retraining, clear errors."""
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrain.data import DataError, load_tokenizer
from moetrain.data.clean import normalize_text
from moetrain.data.recipe import TokenizerSpec
from moetrain.data.tokenizer import Tokenizer, train_sentencepiece, training_sample

from data_helpers import fake_text


def test_round_trip_on_normalised_text(prepared):
    tok = load_tokenizer(prepared[0])
    samples = [
        "Hamlet.\nTo be, or not to be:  that is the question.\n\n    Indented verse line\nend",
        "Numbers 12345 and 3.14159, unicode café naïve Ελληνικά 日本語 emoji 🙂 and tabs\there.",
        "Pass key 86556. Remember it.\n\n\n\nWhitespace   runs\u00a0and\r\nCRLF  ",
        fake_text(np.random.default_rng(5), 400),
    ]
    for raw in samples:
        text = normalize_text(raw)
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert max(ids) < tok.vocab_size
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 400)
    assert tok.encode("a\nb").count(tok.sp.piece_to_id("\n")) == 1   # newline is a piece of its own


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab Z9.,\n\t\r \u00a0\u2581\u200b\ufeffé€日🙂\x00\x85")) |
               st.characters(), max_size=60))
def test_round_trip_property(prepared_tokenizer, raw):
    text = normalize_text(raw)
    assert prepared_tokenizer.decode(prepared_tokenizer.encode(text)) == text
    assert normalize_text(text) == text


@pytest.fixture(scope="module")
def prepared_tokenizer(prepared):
    return load_tokenizer(prepared[0])


def test_training_is_byte_identical():
    rng = np.random.default_rng(3)
    texts = [fake_text(rng, 2000) for _ in range(6)]
    spec = TokenizerSpec(vocab_size=350)
    runs = [train_sentencepiece(training_sample(texts, sum(map(len, texts)), 30_000), spec) for _ in range(2)]
    assert runs[0] == runs[1]
    assert Tokenizer(runs[0]).vocab_size == 350
    assert sum(map(len, training_sample(texts, sum(map(len, texts)), 30_000))) <= 30_000 * 1.2


def test_vocab_too_large_for_corpus():
    with pytest.raises(DataError, match="vocab_size 5000 is too large"):
        train_sentencepiece(["tiny corpus here", "and some more"], TokenizerSpec(vocab_size=5000))


def test_damaged_tokenizer_is_one_clear_error(prepared, tmp_path):
    import shutil
    out = str(tmp_path / "d")
    shutil.copytree(prepared[0], out)
    with open(os.path.join(out, "tokenizer.model"), "wb") as f:
        f.write(b"\x00not a sentencepiece model" * 10)
    with pytest.raises(DataError, match="is not a SentencePiece model .damaged.*--overwrite") as err:
        load_tokenizer(out)
    assert "\n" not in str(err.value)
