"""Task functions that lm-evaluation-harness loads from the task YAMLs (`!function utils.X`).

Standalone on purpose (stdlib + lm_eval only): the YAMLs are also run from the vLLM venv
(scripts/serving_env.sh), which has no moetrain. Rows come from moetrain.eval.harness.rows.
"""
import math
import re

_LEADING_DIGITS = re.compile(r"\d*")


# ---------------------------------------------------------------- held-out perplexity
def ppl_context(doc: dict) -> str:
    """The window's first token as text; "" for a window that starts a document: the harness
    then conditions on its prefix token (<s>), which is that window's first token."""
    return doc["context"]


def ppl_continuation(doc: dict) -> str:
    return doc["continuation"]


def ppl_results(doc: dict, results) -> dict:
    """results = [(log-likelihood of the continuation, is_greedy)]; n_tokens is the number of
    scored tokens (window length), checked by the row writer against the HF tokenizer."""
    ll = float(results[0][0])
    n = int(doc["n_tokens"])
    return {"token_perplexity": (ll, n), "token_nll": (ll, n), "bits_per_byte": (ll, int(doc["n_bytes"]))}


def token_nll(items) -> float:
    """Mean negative log-likelihood per scored token (nats): the same quantity as our eval loss."""
    ll = math.fsum(a for a, _ in items)
    return -ll / sum(n for _, n in items)


# ---------------------------------------------------------------- passkey retrieval
def passkey_prompt(doc: dict) -> str:
    return doc["prompt"]


def passkey_answer(doc: dict) -> str:
    return doc["answer"]


def passkey_correct(generation: str, answer: str) -> bool:
    """Exact match as moetrain.eval.passkey.verdict decides it at the end of decoding: the digits
    that lead the generation (after whitespace) equal the key."""
    return _LEADING_DIGITS.match(generation.lstrip()).group() == answer


def passkey_results(doc: dict, results) -> dict:
    return {"exact_match": float(passkey_correct(results[0], doc["answer"]))}


def _passkey_task_class():
    from lm_eval.api.task import ConfigurableTask

    class PasskeyTask(ConfigurableTask):
        """generate_until with the token budget of each row (max_gen_toks = the answer's token
        count, as our grid decodes): the YAML's generation_kwargs are one setting for all rows."""

        def __init__(self, config=None, **kwargs):
            config = {k: v for k, v in (config or {}).items() if k != "class"}
            super().__init__(config=config, **kwargs)

        def construct_requests(self, doc, ctx, **kwargs):
            reqs = super().construct_requests(doc, ctx, **kwargs)
            for req in reqs if isinstance(reqs, list) else [reqs]:
                req.arguments[1]["max_gen_toks"] = int(doc["max_gen_toks"])
            return reqs

    return PasskeyTask


def __getattr__(name):  # lm_eval is imported only when the YAML asks for the class
    if name == "PasskeyTask":
        return _passkey_task_class()
    raise AttributeError(name)
