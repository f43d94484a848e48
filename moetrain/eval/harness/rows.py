"""JSONL rows for the harness tasks, each checked to tokenise back to our exact token ids.

lm-evaluation-harness tokenises text itself (the model folder's tokenizer.json, as HF and
vLLM load it), so a row is kept only when the harness will see our very tokens:

- perplexity: a window w of S + 1 ids (moetrain.eval.position_loss.held_out_windows) is
  (context = text of w[0], continuation = text of w[1:]); the harness scores w[1:] given
  w[:1] exactly when `encode_pair` (its split, add_bos_token=False) returns (w[:1], w[1:]).
  A window that starts a document (w[0] = <s>) has context "": the harness then uses its
  prefix token, <s>. Windows that cannot round-trip are dropped and counted: text cannot
  start with a piece that lacks the SentencePiece word boundary (dummy prefix), nor hold
  </s>.
- passkey: our prompt ids (<s> + text) must equal the harness's encoding of the text with
  add_bos_token=True.
"""
from __future__ import annotations

import json
import os
import shutil

PPL_TASK = "moetrain_heldout_ppl"
PASSKEY_TASK = "moetrain_passkey"
TASK_FILES = (f"{PPL_TASK}.yaml", f"{PASSKEY_TASK}.yaml", "utils.py")
_HERE = os.path.dirname(os.path.abspath(__file__))


def _enc(tok, text: str) -> list:
    return tok.encode(text, add_special_tokens=False)


def encode_pair(tok, context: str, continuation: str) -> tuple[list, list]:
    """(context ids, continuation ids) as lm_eval's TemplateLM.loglikelihood forms them for a
    causal model with add_bos_token=False (empty context: the prefix token, <s>)."""
    if context == "":
        cont = _enc(tok, continuation)
        bos = tok.bos_token_id
        return ([bos], cont) if cont[:1] != [bos] else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:  # the harness moves trailing whitespace of the context to the continuation
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = _enc(tok, context + continuation), _enc(tok, context)
    return ctx, whole[len(ctx):]


def window_row(tok, window) -> dict | None:
    """The row of one window (list of S + 1 ids), or None when it does not round-trip."""
    ids = [int(i) for i in window]
    if ids[0] == tok.bos_token_id:
        context, continuation = "", tok.decode(ids[1:])
    else:
        context, text = tok.decode(ids[:1]), tok.decode(ids)
        if not text.startswith(context):
            return None
        continuation = text[len(context):]
    if encode_pair(tok, context, continuation) != (ids[:1], ids[1:]):
        return None
    return {"context": context, "continuation": continuation, "n_tokens": len(ids) - 1,
            "n_bytes": len(continuation.encode("utf-8"))}


def ppl_rows(tok, windows_by_length: dict) -> tuple[list, dict]:
    """Rows over all lengths, and per length {"windows", "kept": [window index]}."""
    rows, kept = [], {}
    for length, windows in windows_by_length.items():
        kept[length] = {"windows": int(len(windows)), "kept": []}
        for i, w in enumerate(windows):
            row = window_row(tok, w)
            if row is not None:
                rows.append({"length": int(length), "window": i, **row})
                kept[length]["kept"].append(i)
    return rows, kept


def passkey_row(tok, sample) -> dict | None:
    """The row of one moetrain Sample (prompt_ids start with <s>), or None when its text
    does not encode back to prompt_ids."""
    ids = [int(i) for i in sample.prompt_ids]
    if ids[:1] != [tok.bos_token_id]:
        return None
    text = tok.decode(ids[1:])
    if text.startswith(tok.bos_token) or tok.encode(text, add_special_tokens=True) != ids:
        return None  # the harness skips adding <s> to text that starts with its literal form
    return {"prompt": text, "answer": sample.answer, "max_gen_toks": len(sample.answer_ids)}


def passkey_rows(tok, cells: dict) -> tuple[list, int]:
    """cells {(length, depth): [Sample]} -> rows (with length, depth, trial) and the dropped count."""
    rows, dropped = [], 0
    for (length, depth), samples in cells.items():
        for t, s in enumerate(samples):
            row = passkey_row(tok, s)
            if row is None:
                dropped += 1
            else:
                rows.append({"length": int(length), "depth": float(depth), "trial": t, **row})
    return rows, dropped


def write_jsonl(path: str, rows: list) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def write_task_folder(out_dir: str, ppl: list, passkey: list) -> str:
    """OUT/tasks: the task YAMLs (data_files pointing at the JSONL beside them, datasets'
    cache inside the folder) + utils.py + the JSONL, for `lm_eval --include_path OUT/tasks`."""
    folder = os.path.join(out_dir, "tasks")
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(_HERE, "utils.py"), os.path.join(folder, "utils.py"))
    for task, rows in ((PPL_TASK, ppl), (PASSKEY_TASK, passkey)):
        data = os.path.abspath(os.path.join(folder, f"{task}.jsonl"))
        write_jsonl(data, rows)
        with open(os.path.join(_HERE, f"{task}.yaml"), encoding="utf-8") as f:
            text = f.read()
        # The one data line is replaced textually: the YAML's !function tags are lm_eval's own.
        old = f"    test: {task}.jsonl\n"
        assert old in text, f"{task}.yaml lost its data_files line"
        new = f"    test: {json.dumps(data)}\n  cache_dir: {json.dumps(os.path.join(folder, '.hf_datasets'))}\n"
        with open(os.path.join(folder, f"{task}.yaml"), "w", encoding="utf-8") as f:
            f.write(text.replace(old, new))
    return folder
