"""Tokenizer files for the exported folder, from our SentencePiece model.

tokenizer.json is built by transformers' own SentencePiece converter from the
model's normaliser spec (identity normalisation, kept whitespace runs, dummy
prefix, byte fallback, user-defined pieces such as "\\n"), so AutoTokenizer needs
no sentencepiece at load time. `split_special_tokens` keeps literal "<s>" text
as plain characters, as SentencePiece does. Like training documents, encodings
start with <s> (add_special_tokens=True); without special tokens the ids equal
SentencePieceProcessor.encode exactly, which `check_tokenizer` proves on a sample
at every export.
"""
from __future__ import annotations

import json
import os
import shutil

MODEL_FILE = "tokenizer.model"
# Unicode, whitespace runs, tabs, newlines, digits, emoji, unseen characters (byte fallback).
CHECK_TEXTS = [
    "Hello  world!\n\n\tTabs\t\tand   runs of    spaces   ",
    "  leading spaces and trailing   \n",
    "naïve café 東京 über straße 🙂 δέλτα жук 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃\u3000ideographic",
    "digits 1234567890 3.14 and x  \n  y\n\n\n", " ", "\n", "▁already", "",
]


def _proto(model_path: str):
    from transformers.convert_slow_tokenizer import import_protobuf
    proto = import_protobuf().ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _backend(proto, bos: str):
    """The tokenizers.Tokenizer: converter model + normaliser, then <s> prepended."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import SpmConverter

    if proto.trainer_spec.model_type == 1:  # unigram: scores matter
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:  # BPE: merges are rebuilt from piece scores
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tk = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if tk is None:
        raise ValueError("tokenizer.model is neither a BPE nor a unigram SentencePiece model; cannot convert it")
    bos_id = proto.trainer_spec.bos_id
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, bos_id)])
    return tk


def _piece(proto, idx: int):
    return proto.pieces[idx].piece if 0 <= idx < len(proto.pieces) else None


def write_tokenizer(model_path: str, out_dir: str, model_max_length: int) -> dict:
    """Write tokenizer.model/.json, tokenizer_config.json, special_tokens_map.json;
    returns the special token ids for config.json / generation_config.json."""
    from transformers import PreTrainedTokenizerFast

    proto = _proto(model_path)
    ts = proto.trainer_spec
    special = {"bos_token": _piece(proto, ts.bos_id), "eos_token": _piece(proto, ts.eos_id),
               "unk_token": _piece(proto, ts.unk_id), "pad_token": _piece(proto, ts.pad_id)}
    special = {k: v for k, v in special.items() if v is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=_backend(proto, special["bos_token"]), split_special_tokens=True,
                                   model_max_length=model_max_length, **special)
    fast.save_pretrained(out_dir)
    shutil.copyfile(model_path, os.path.join(out_dir, MODEL_FILE))
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        tok_cfg = json.load(f)
    # The class name every transformers version (and vLLM) resolves to "load tokenizer.json as is".
    tok_cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False,
                   clean_up_tokenization_spaces=False)
    with open(cfg_path, "w") as f:
        json.dump(tok_cfg, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2, ensure_ascii=False)
    ids = {"bos_token_id": ts.bos_id, "eos_token_id": ts.eos_id}
    ids["pad_token_id"] = ts.pad_id if ts.pad_id >= 0 else None
    return ids


def check_tokenizer(out_dir: str, model_path: str, texts=CHECK_TEXTS) -> None:
    """AutoTokenizer on the folder must give SentencePiece's ids (plus a leading <s>)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=model_path)
    hf = AutoTokenizer.from_pretrained(out_dir)
    hf.model_max_length = 1 << 62  # no "sequence longer than the model" warnings for the sample
    for text in texts:
        want = sp.encode(text)
        got = hf(text, add_special_tokens=False)["input_ids"]
        if got != want or hf(text)["input_ids"] != [sp.bos_id()] + want:
            raise ValueError(f"exported tokenizer disagrees with {model_path} on {text!r}: {got[:12]} vs {want[:12]}")


def find_tokenizer(data_dir: str, explicit: str | None = None) -> str:
    """The training tokenizer.model: `explicit` if given, else the run's data.dir."""
    path = explicit or os.path.join(data_dir, MODEL_FILE)
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"no tokenizer at '{path}' (the run's data.dir); pass --tokenizer PATH/tokenizer.model")
    return path
