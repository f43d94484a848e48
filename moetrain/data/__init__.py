"""Long-context data: recipes -> cleaned, tokenised, sharded corpora -> deterministic batches.

    prepare(recipe, out_dir)        run a recipe (scripts/prepare_data.py)
    ensure_prepared(data_cfg)       prepare data_cfg.dir from data_cfg.recipe if needed
    load_tokenizer(data_dir)        the folder's SentencePiece tokenizer
    TokenLoader(data_cfg, ...)      resumable, data-parallel batches (packed or window)
    synthetic                       passkey / multi-key retrieval prompts (training and eval)
"""
from .errors import DataError
from .loader import TokenLoader
from .prepare import ensure_prepared, prepare
from .synthetic import make_multikey_prompt, make_passkey_prompt, multikey_sample, passkey_sample
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["DataError", "TokenLoader", "Tokenizer", "ensure_prepared", "load_tokenizer", "make_multikey_prompt",
           "make_passkey_prompt", "multikey_sample", "passkey_sample", "prepare"]
