"""The exported tokenizer files give SentencePiece's ids through AutoTokenizer."""
import os

import pytest
import sentencepiece as spm
from export_helpers import TOKENIZER_SAMPLE, fake_docs

from moetrain.export.tokenizer import CHECK_TEXTS, check_tokenizer, write_tokenizer

TEXTS = CHECK_TEXTS + [TOKENIZER_SAMPLE, "\u00a0non-breaking\u2009thin\u200bzero-width", "x" * 300,
                       "<s> and </s> typed as text"]


def _unigram(tmp_path):
    from moetrain.data.recipe import TokenizerSpec
    from moetrain.data.tokenizer import train_sentencepiece
    path = str(tmp_path / "unigram.model")
    with open(path, "wb") as f:
        f.write(train_sentencepiece(fake_docs(40), TokenizerSpec(vocab_size=384, model_type="unigram")))
    return path


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_autotokenizer_ids_equal_sentencepiece(tmp_path, tokenizer_path, kind):
    from transformers import AutoTokenizer
    model = tokenizer_path if kind == "bpe" else _unigram(tmp_path)
    out = str(tmp_path / "tok")
    os.makedirs(out)
    special = write_tokenizer(model, out, 4096)
    assert special == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(
        os.listdir(out))
    # A unigram lattice also matches literal control-piece text like "<s>" (a known, documented gap).
    texts = TEXTS if kind == "bpe" else TEXTS[:-1]
    check_tokenizer(out, model, texts)
    sp = spm.SentencePieceProcessor(model_file=model)
    hf = AutoTokenizer.from_pretrained(out)
    for text in texts:
        ids = sp.encode(text)
        assert hf(text)["input_ids"] == [1] + ids  # documents start with <s>, as in training
        assert hf.decode(ids) == sp.decode(ids)
    assert hf.bos_token == "<s>" and hf.eos_token == "</s>" and hf.pad_token == "<pad>"
