"""Synthetic long-range tasks, generated on the fly from a random generator.

Passkey retrieval in the format of Mohtashami & Jaggi 2023 (as reported by
YaRN and LongLoRA): an instruction line, the filler "The grass is green. ..."
repeated, the key line at a chosen depth, more filler, and the question

    There is an important info hidden inside a lot of irrelevant text. ...
    The grass is green. The sky is blue. ... There and back again. The grass ...
    The pass key is 68120. Remember it. 68120 is the pass key.
    The grass is green. ...
    What is the pass key? The pass key is

with the answer " 68120". Variants change the filler and the key's length.
Multi-key value retrieval hides several "The value of key K is V." lines and
asks for one of them. The evaluation (moetrain.eval) reuses these functions;
training mixes `training_example` rows into batches (DataConfig.synthetic).

`rng` is a numpy Generator or a random.Random; the same rng state gives the
same prompt.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import DataError

PASSKEY_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                       "memorize them. I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
FILLER_VARIANTS = (
    PASSKEY_FILLER,
    "The river is wide. The hills are quiet. The road goes on. Birds fly south. Night follows day.",
    "The stone is grey. The wind is cold. The fire is warm. Time goes by. Round and round we go.",
    "The sea is calm. The sand is white. The boats come in. Gulls call out. The tide turns again.",
)
MULTIKEY_INSTRUCTION = ("There are several important values hidden inside a lot of irrelevant text. Find them "
                        "and memorize them. I will quiz you about one of them.")
_KEY_WORDS = ("amber", "birch", "cedar", "delta", "ember", "falcon", "garnet", "harbor", "iris", "juniper",
              "kestrel", "lotus", "maple", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra",
              "umber", "violet", "willow", "yarrow", "zephyr", "copper", "meadow", "silver", "thistle", "cobalt")
TASKS = ("passkey", "multikey")


@dataclass
class Sample:
    prompt_ids: list
    """Prompt tokens (bos first when add_bos), ending right before the answer."""
    answer: str
    """The expected answer, e.g. '68120'."""
    answer_ids: list
    """Tokens of the answer as they continue the prompt."""


def _randint(rng, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] for numpy Generators and random.Random alike."""
    if isinstance(rng, random.Random):
        return rng.randint(lo, hi)
    return int(rng.integers(lo, hi + 1))


def _sentences(filler: str) -> list[str]:
    parts = [s.strip() for s in filler.replace(". ", ".\0").split("\0")]
    return [p for p in parts if p]


def _fit(tokenizer, build, n_max_guess: int, budget: int) -> tuple[list, int]:
    """Largest n (filler sentences) with len(encode(build(n))) <= budget, by bisection."""
    lo, hi = 0, max(1, n_max_guess)
    while len(tokenizer.encode(build(hi))) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(tokenizer.encode(build(mid))) <= budget:
            lo = mid
        else:
            hi = mid
    return tokenizer.encode(build(lo)), lo


def _layout(tokenizer, context_tokens: int, head: str, tail: str, needles: list, depths: list,
            filler: str, add_bos: bool) -> list:
    """Token ids of head / filler with needle lines at depths / tail, fitting context_tokens."""
    sentences = _sentences(filler)

    def build(n: int) -> str:
        fill = [sentences[i % len(sentences)] for i in range(n)]
        cuts = sorted(zip([round(d * n) for d in depths], range(len(needles))))
        lines, prev = [head], 0
        for cut, j in cuts:
            if cut > prev:
                lines.append(" ".join(fill[prev:cut]))
            lines.append(needles[j])
            prev = cut
        if n > prev:
            lines.append(" ".join(fill[prev:]))
        return "\n".join(lines + [tail])

    budget = context_tokens - int(add_bos)
    bare = len(tokenizer.encode(build(0)))
    if bare > budget:
        raise DataError(f"context_tokens={context_tokens} is too short for this prompt (needs at least "
                        f"{bare + int(add_bos) + 8}); ask for a longer context")
    per = max(1, len(tokenizer.encode(" ".join(sentences))) / len(sentences))
    ids, _ = _fit(tokenizer, build, int((budget - bare) / per) + 1, budget)
    return ([tokenizer.bos_id] if add_bos else []) + ids


def _answer_ids(tokenizer, prompt_ids: list, answer: str, add_bos: bool) -> list:
    """Tokens of ' answer' as they follow the prompt (SentencePiece pieces never cross a space)."""
    body = prompt_ids[1:] if add_bos else prompt_ids
    full = tokenizer.encode(tokenizer.decode(body) + " " + answer)
    if full[:len(body)] == body:
        return full[len(body):]
    return tokenizer.encode(answer)


def passkey_sample(tokenizer, context_tokens: int, depth: float, rng, key_digits: int = 5,
                   filler: str | None = None, add_bos: bool = True) -> Sample:
    """A passkey prompt of at most context_tokens tokens with the key line at `depth` (0 = start, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise DataError(f"depth={depth} must be in [0, 1]")
    if key_digits < 1:
        raise DataError(f"key_digits={key_digits} must be >= 1")
    key = str(_randint(rng, 10 ** (key_digits - 1), 10 ** key_digits - 1))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    ids = _layout(tokenizer, context_tokens, PASSKEY_INSTRUCTION, PASSKEY_QUESTION, [needle], [depth],
                  filler or PASSKEY_FILLER, add_bos)
    return Sample(ids, key, _answer_ids(tokenizer, ids, key, add_bos))


def make_passkey_prompt(tokenizer, context_tokens: int, depth: float, rng, key_digits: int = 5,
                        filler: str | None = None, add_bos: bool = True) -> tuple[list, str]:
    """(prompt_ids, answer) of a passkey-retrieval prompt; see passkey_sample."""
    s = passkey_sample(tokenizer, context_tokens, depth, rng, key_digits, filler, add_bos)
    return s.prompt_ids, s.answer


def multikey_sample(tokenizer, context_tokens: int, rng, n_keys: int = 4, value_digits: int = 6,
                    filler: str | None = None, add_bos: bool = True) -> Sample:
    """n_keys "The value of key K is V." lines at random depths; asks for one of them."""
    if not 1 <= n_keys <= len(_KEY_WORDS) ** 2:
        raise DataError(f"n_keys={n_keys} must be between 1 and {len(_KEY_WORDS) ** 2}")
    keys = set()
    while len(keys) < n_keys:
        keys.add(f"{_KEY_WORDS[_randint(rng, 0, len(_KEY_WORDS) - 1)]}-"
                 f"{_KEY_WORDS[_randint(rng, 0, len(_KEY_WORDS) - 1)]}")
    keys = sorted(keys)
    values = [str(_randint(rng, 10 ** (value_digits - 1), 10 ** value_digits - 1)) for _ in keys]
    depths = [_randint(rng, 0, 1000) / 1000 for _ in keys]
    ask = _randint(rng, 0, n_keys - 1)
    needles = [f"The value of key {k} is {v}." for k, v in zip(keys, values)]
    question = f"What is the value of key {keys[ask]}? The value of key {keys[ask]} is"
    ids = _layout(tokenizer, context_tokens, MULTIKEY_INSTRUCTION, question, needles, depths,
                  filler or PASSKEY_FILLER, add_bos)
    return Sample(ids, values[ask], _answer_ids(tokenizer, ids, values[ask], add_bos))


def make_multikey_prompt(tokenizer, context_tokens: int, rng, n_keys: int = 4, value_digits: int = 6,
                         filler: str | None = None, add_bos: bool = True) -> tuple[list, str]:
    """(prompt_ids, answer) of a multi-key value-retrieval prompt; see multikey_sample."""
    s = multikey_sample(tokenizer, context_tokens, rng, n_keys, value_digits, filler, add_bos)
    return s.prompt_ids, s.answer


def _multikey_that_fits(tokenizer, context_tokens: int, rng, n_keys: int, digits: int, filler: str) -> Sample:
    """Fewer keys when a short row cannot hold n_keys of them."""
    for n in range(n_keys, 0, -1):
        try:
            return multikey_sample(tokenizer, context_tokens, rng, n, digits, filler)
        except DataError:
            if n == 1:
                raise


def training_example(task: str, tokenizer, total_tokens: int, rng) -> list:
    """bos + prompt + answer + eos in at most total_tokens tokens, with random depth, filler and key length."""
    filler = FILLER_VARIANTS[_randint(rng, 0, len(FILLER_VARIANTS) - 1)]
    digits = _randint(rng, 4, 8) if task == "passkey" else _randint(rng, 4, 7)
    reserve = digits + 3  # answer pieces (+ a leading space piece) and eos
    if task == "passkey":
        s = passkey_sample(tokenizer, total_tokens - reserve, _randint(rng, 0, 1000) / 1000, rng, digits, filler)
    elif task == "multikey":
        s = _multikey_that_fits(tokenizer, total_tokens - reserve, rng, _randint(rng, 2, 6), digits, filler)
    else:
        raise DataError(f"unknown synthetic task '{task}'; use one of {', '.join(TASKS)}")
    ids = s.prompt_ids + s.answer_ids + [tokenizer.eos_id]
    assert len(ids) <= total_tokens, (len(ids), total_tokens)
    return ids
