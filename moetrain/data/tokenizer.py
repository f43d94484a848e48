"""SentencePiece tokenizer: train on a deterministic sample, or reuse a given model.

Training is byte-for-byte reproducible: the sample is chosen by stride (no
randomness), fed in a fixed order through an iterator, SentencePiece's own
sampling and shuffling are off, and the model is written from memory (so no
file paths end up inside it). The identity normaliser with extra whitespace
kept makes decode(encode(x)) == x for normalised text; newline is a piece of
its own so line structure (verse, code) costs one token per line.
"""
from __future__ import annotations

import hashlib
import io
import os

import sentencepiece as spm

from .errors import DataError
from .recipe import TokenizerSpec

MODEL_FILE = "tokenizer.model"
_MAX_PIECE_CHARS = 4000  # well under SentencePiece's max_sentence_length (16384 bytes)
# The thread count is stored inside the model file, so it is a constant, not the
# machine's core count: otherwise two machines would write different bytes.
_TRAIN_THREADS = 4


class Tokenizer:
    """Thin wrapper: encode(str)->list[int], decode(list[int])->str, ids of the special tokens."""

    def __init__(self, model_proto: bytes):
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.model_proto = model_proto
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        # A reused model may have no pad piece; padding is always masked, so eos serves.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.sha256 = hashlib.sha256(model_proto).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def info(self) -> dict:
        return {"file": MODEL_FILE, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "unk_id": self.unk_id}


def _pieces(text: str):
    """Paragraphs of a document, long ones cut at line (else character) boundaries."""
    for para in text.split("\n\n"):
        while len(para) > _MAX_PIECE_CHARS:
            cut = para.rfind("\n", 0, _MAX_PIECE_CHARS)
            cut = cut if cut > 0 else _MAX_PIECE_CHARS
            yield para[:cut]
            para = para[cut:].lstrip("\n")
        if para.strip():
            yield para


def training_sample(texts, total_chars: int, sample_chars: int) -> list[str]:
    """Every k-th paragraph of the corpus, k chosen so the sample is about sample_chars long."""
    stride = max(1, -(-total_chars // max(1, sample_chars)))  # ceil: the sample stays under budget
    out, i = [], 0
    for text in texts:
        for piece in _pieces(text):
            if i % stride == 0:
                out.append(piece)
            i += 1
    return out


def train_sentencepiece(sample: list[str], spec: TokenizerSpec) -> bytes:
    if not sample:
        raise DataError("tokenizer: no text to train on; the corpus is empty after cleaning")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=buf, vocab_size=spec.vocab_size,
            model_type=spec.model_type, byte_fallback=spec.byte_fallback, split_digits=spec.split_digits,
            character_coverage=spec.character_coverage, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
            unk_id=spec.unk_id, bos_id=spec.bos_id, eos_id=spec.eos_id, pad_id=spec.pad_id,
            input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=16384,
            num_threads=_TRAIN_THREADS, minloglevel=2)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1][:200]
        if "vocab_size" in msg.lower() or "too high" in msg.lower():
            raise DataError(f"tokenizer: vocab_size {spec.vocab_size} is too large for this corpus "
                            f"({msg}); lower tokenizer.vocab_size or raise tokenizer.sample_chars") from None
        raise DataError(f"tokenizer: SentencePiece training failed ({msg})") from None
    return buf.getvalue()


def read_model(path: str) -> bytes:
    if not os.path.isfile(path):
        raise DataError(f"tokenizer.path '{path}' does not exist; point it at a SentencePiece .model file "
                        "or remove it to train one")
    with open(path, "rb") as f:
        proto = f.read()
    try:
        Tokenizer(proto)
    except Exception:
        raise DataError(f"tokenizer.path '{path}' is not a SentencePiece model") from None
    return proto


def load_tokenizer(data_dir: str) -> Tokenizer:
    """The tokenizer of a prepared folder, checked against its manifest."""
    path = os.path.join(data_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise DataError(f"'{data_dir}' has no {MODEL_FILE}; run scripts/prepare_data.py --out {data_dir}")
    with open(path, "rb") as f:
        proto = f.read()
    try:
        tok = Tokenizer(proto)
    except Exception:  # SentencePiece raises RuntimeError/OSError variants on garbage
        raise DataError(f"{path} is not a SentencePiece model (damaged?); re-run scripts/prepare_data.py "
                        "with --overwrite") from None
    manifest = os.path.join(data_dir, "manifest.json")
    if os.path.isfile(manifest):
        from .shards import read_manifest
        want = read_manifest(data_dir)["tokenizer"].get("sha256")
        if want and want != tok.sha256:
            raise DataError(f"{path} does not match manifest.json (sha256 differs); the folder was "
                            "modified: re-run scripts/prepare_data.py with --overwrite")
    return tok
