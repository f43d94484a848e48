"""Cleaning: whitespace normalisation and Gutenberg boilerplate stripping."""
from moetrain.data.clean import clean_document, normalize_text, strip_gutenberg


def test_normalize_text():
    raw = "\ufeff  Title\r\n\r\nLine one   \r\nLine\u00a0two\t\n\n\n\n\nAfter\u200b gap\x00\r  indented  \n\n"
    out = normalize_text(raw)
    assert out == "Title\n\nLine one\nLine two\n\nAfter gap\n  indented"
    assert normalize_text(out) == out                          # idempotent
    assert normalize_text("e\u0301") == "\u00e9"                 # NFC


GUTENBERG = """The Project Gutenberg EBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

Produced by Some Volunteers.
And more volunteers.

HAMLET, PRINCE OF DENMARK

To be, or not to be.

*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

***** This file should be named 1524.txt *****
Licence text that must go.
"""


def test_strip_gutenberg():
    body = clean_document(GUTENBERG, "gutenberg", True)
    assert body == "HAMLET, PRINCE OF DENMARK\n\nTo be, or not to be."
    assert strip_gutenberg("no markers here\n") == "no markers here\n"
    old = ("Header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nBook text\n"
           "End of Project Gutenberg's X\nfooter")
    assert clean_document(old, "gutenberg", True) == "Book text"
