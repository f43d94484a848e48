"""Compare our model with a transformers model: logits, KL, greedy continuations.

Both run in fp32 on the same random batch, once at positions 0.. and again with
position ids shifted past the RoPE original maximum and the trained context
(where scaled-RoPE converters usually break), then 32 greedy tokens each:
ours by full recomputation, theirs through `generate` and its KV cache, i.e. the
serving path. Exception: dynamic NTK and LongRoPE pick their frequencies from the
current length, and a KV cache keeps keys rotated for the length at which they
were cached (in transformers and vLLM alike), so for them `generate` runs without
the cache: that is the model; cached decoding is each engine's approximation.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch

MAX_ABS_LOGIT_DIFF = 1e-4
MAX_KL = 1e-6
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass
class Comparison:
    max_abs_logit_diff: float
    max_kl: float
    mean_kl: float
    greedy_match: bool
    greedy_tokens: int
    seq_len: int
    position_starts: list

    @property
    def passed(self) -> bool:
        return (self.max_abs_logit_diff <= MAX_ABS_LOGIT_DIFF and self.max_kl <= MAX_KL and self.greedy_match)

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def line(self, limits: bool = True) -> str:
        lim = (f" (<= {MAX_ABS_LOGIT_DIFF:g})", f" (<= {MAX_KL:g})") if limits else ("", "")
        return (f"max |logit diff| {self.max_abs_logit_diff:.3e}{lim[0]}, max KL {self.max_kl:.3e}{lim[1]}, "
                f"mean KL {self.mean_kl:.3e}, greedy {self.greedy_tokens} tokens "
                f"{'identical' if self.greedy_match else 'differ'}; positions from {self.position_starts}, "
                f"{self.seq_len} tokens each")


def position_starts(rope, seq_len: int) -> list:
    """Start positions: 0, straddling the original maximum, the end of the trained
    context, and beyond it (the two implementations must agree everywhere)."""
    orig, ctx = rope.original_max, rope.max_position_embeddings
    starts = [0, orig - seq_len // 2, ctx - seq_len, ctx + seq_len]
    return sorted({max(0, s) for s in starts})


def verify_seq_len(attn, kinds: list) -> int:
    """Long enough for every sparse pattern of the trained model to matter (past the
    window, more MoBA blocks than a query selects), capped for CPU time."""
    n = 48
    if "sliding" in kinds:
        n = max(n, attn.window + 16)
    if "moba" in kinds:
        n = max(n, attn.block_size * (attn.moba_topk + 1) + 16)
    return min(n, 2048)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, in float64."""
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)  # >= 0 up to float64 rounding


@torch.no_grad()
def _greedy_ours(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    seq = prompt
    for _ in range(n):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompt.shape[1]:]


@torch.no_grad()
def _greedy_hf(hf_model, prompt: torch.Tensor, n: int, use_cache: bool) -> torch.Tensor:
    from transformers import GenerationConfig
    gen = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=0, use_cache=use_cache)
    saved = hf_model.generation_config.eos_token_id
    hf_model.generation_config.eos_token_id = None  # else generate fills it in and stops early at </s>
    try:
        out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)
    finally:
        hf_model.generation_config.eos_token_id = saved
    return out[:, prompt.shape[1]:]


@torch.no_grad()
def compare_models(ours, hf_model, vocab_size: int, rope, seq_len: int = 48, greedy_tokens: int = 32,
                   prompt_len: int = 16, seed: int = 0) -> Comparison:
    """Our model (fp32) against a transformers model (fp32) on one random batch: logits and
    KL at every position start of `position_starts`, then `greedy_tokens` greedy tokens
    after a `prompt_len`-token prompt (HF through `generate`). Export and import use it alike."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, seq_len), generator=g)
    # Greedy first, then growing positions: transformers' dynamic NTK keeps the longest
    # length seen so far, so only an increasing order makes it a pure function of the input.
    prompt = ids[:1, :prompt_len]
    cache = rope.name not in LENGTH_DEPENDENT_ROPE
    same = torch.equal(_greedy_ours(ours, prompt, greedy_tokens), _greedy_hf(hf_model, prompt, greedy_tokens, cache))
    starts = position_starts(rope, seq_len)
    max_abs, kls = 0.0, []
    for s in starts:
        pos = torch.arange(s, s + seq_len).expand(2, seq_len)
        a = ours(ids, position_ids=pos).logits.float()
        b = hf_model(input_ids=ids, position_ids=pos).logits.float()
        diff = (a - b).abs().max().item()
        max_abs = max(max_abs, diff if math.isfinite(diff) else math.inf)  # NaN must fail, not vanish in max()
        kls.append(_kl(a, b).flatten())
    kl = torch.cat(kls).nan_to_num(nan=math.inf)
    return Comparison(max_abs, kl.max().item(), kl.mean().item(), same, greedy_tokens, seq_len, starts)


def load_hf(out_dir: str):
    """AutoModelForCausalLM in fp32, no remote code: what a user gets."""
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():  # transformers builds Qwen2-MoE's shared expert even at width 0
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, trust_remote_code=False).eval()
