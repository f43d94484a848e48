"""Rotary position embeddings and the RoPE scaling strategies used to extend context.

Each strategy computes `inv_freq` and the cos/sin attention scaling with the very
same float32 operations as transformers' `ROPE_INIT_FUNCTIONS` (bit-identical,
not just close: at position 100k an inv_freq off by one ulp already moves the
angle by ~1e-2), and emits the config keys transformers reads (`to_hf()`), so
the exported model cannot drift from the trained one.

Shapes: B batch, S sequence, H query heads, Hkv key/value heads, D head_dim.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from moetrain.config import RopeConfig


class RopeScaling:
    """Base strategy: plain RoPE. Subclasses override `inv_freq`, `attention_scaling`
    and `_hf_params`; `to_hf` assembles the transformers config keys from them."""

    name = "none"
    hf_type = "default"  # transformers' `rope_type`

    def __init__(self, cfg: RopeConfig, head_dim: int, max_position_embeddings: int):
        self.cfg = cfg
        self.theta = float(cfg.theta)
        self.head_dim = head_dim
        self.factor = float(cfg.factor)
        self.max_position_embeddings = max_position_embeddings
        self.original_max = cfg.original_max_position_embeddings or max_position_embeddings

    def _exponent(self) -> torch.Tensor:
        """2i/D for i < D/2, built as transformers builds it (int64 arange -> float32)."""
        return torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim

    def _plain_inv_freq(self, base: float) -> torch.Tensor:
        return 1.0 / (base ** self._exponent())

    def inv_freq(self, seq_len: Optional[int] = None) -> torch.Tensor:
        """[D/2] float32 on CPU; `seq_len` only matters for dynamic NTK and LongRoPE."""
        return self._plain_inv_freq(self.theta)

    def attention_scaling(self, seq_len: Optional[int] = None) -> float:
        """Factor multiplying cos and sin (YaRN's mscale, LongRoPE's sqrt term)."""
        return 1.0

    def _hf_params(self) -> dict:
        return {}

    def _hf_theta(self) -> float:
        return self.theta

    def _hf_max_position_embeddings(self) -> int:
        return self.max_position_embeddings

    def to_hf(self) -> dict:
        """Config keys for a transformers config.json (4.x and 5.x readers).

        `rope_parameters` is the 5.x form (rope_theta inside); `rope_scaling` is the
        legacy form with both `type` and `rope_type` (None for unscaled RoPE). 5.x
        prefers `rope_scaling` when both are present, so the two always agree.
        `max_position_embeddings` is the value transformers must see to reproduce
        our frequencies; it only differs from the trained context for dynamic NTK.
        """
        params = {"rope_type": self.hf_type, "rope_theta": self._hf_theta(), **self._hf_params()}
        legacy = None
        if self.hf_type != "default":
            legacy = {"type": self.hf_type, **{k: v for k, v in params.items() if k != "rope_theta"}}
        return {
            "rope_theta": self._hf_theta(),
            "max_position_embeddings": self._hf_max_position_embeddings(),
            "rope_parameters": params,
            "rope_scaling": legacy,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_hf()['rope_parameters']})"


class LinearScaling(RopeScaling):
    """Position interpolation (Chen et al. 2023): every frequency divided by `factor`."""

    name = hf_type = "linear"

    def inv_freq(self, seq_len=None):
        inv_freq = self._plain_inv_freq(self.theta)
        inv_freq /= self.factor
        return inv_freq

    def _hf_params(self):
        return {"factor": self.factor}


class StaticNTKScaling(RopeScaling):
    """NTK-aware scaling (bloc97): raise the base to theta * factor^(D/(D-2)).

    transformers has no static-NTK rope_type; the strategy *is* a larger base, so it
    exports as plain RoPE with the enlarged `rope_theta` (exact, and every reader
    understands it)."""

    name = "ntk"

    def _hf_theta(self):
        return self.theta * self.factor ** (self.head_dim / (self.head_dim - 2))

    def inv_freq(self, seq_len=None):
        return self._plain_inv_freq(self._hf_theta())


class DynamicNTKScaling(RopeScaling):
    """Dynamic NTK (emozilla): the NTK base grows with the sequence length seen, and
    equals plain RoPE up to the original context.

    transformers treats `max_position_embeddings` as that original context, so
    `to_hf` exports the original context there."""

    name = hf_type = "dynamic"

    def grown_inv_freq(self, seq_len: torch.Tensor) -> torch.Tensor:
        """inv_freq for a 0-dim integer tensor `seq_len`, with transformers' runtime
        (tensor, float32) arithmetic, so cos/sin match its module bit for bit."""
        m, dim = self.original_max, self.head_dim
        seq_len = torch.maximum(seq_len, torch.tensor(m, dtype=seq_len.dtype, device=seq_len.device))
        base = self.theta * ((self.factor * seq_len / m) - (self.factor - 1)) ** (dim / (dim - 2))
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_len.device).float() / dim
        return 1.0 / (base**exponent)

    def inv_freq(self, seq_len=None):
        if seq_len is None or seq_len <= self.original_max:
            return self._plain_inv_freq(self.theta)
        return self.grown_inv_freq(torch.tensor(int(seq_len)))

    def _hf_params(self):
        return {"factor": self.factor}

    def _hf_max_position_embeddings(self):
        return self.original_max


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


class YarnScaling(RopeScaling):
    """YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, ramp in
    between (by rotations over the original context), and scale cos/sin by mscale."""

    name = hf_type = "yarn"

    def attention_scaling(self, seq_len=None):
        c = self.cfg
        if c.attention_factor is not None:
            return float(c.attention_factor)
        if c.mscale and c.mscale_all_dim:  # DeepSeek form; truthiness as in transformers
            return float(_yarn_mscale(self.factor, c.mscale) / _yarn_mscale(self.factor, c.mscale_all_dim))
        return _yarn_mscale(self.factor)

    def _correction_range(self) -> tuple[float, float]:
        """Dimension indices where `beta_fast` and `beta_slow` rotations fit in the original context."""
        dim, base, m = self.head_dim, self.theta, self.original_max

        def dim_for(rotations):
            return (dim * math.log(m / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = dim_for(self.cfg.beta_fast), dim_for(self.cfg.beta_slow)
        if self.cfg.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, dim - 1)

    def inv_freq(self, seq_len=None):
        low, high = self._correction_range()
        if low == high:
            high += 0.001  # avoid a zero-width ramp, as transformers does
        ramp = torch.clamp((torch.arange(self.head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = self.theta ** self._exponent()
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (self.factor * pos_freqs)
        keep = 1 - ramp  # 1 = keep the original (high) frequency, 0 = fully interpolated
        return interpolation * (1 - keep) + extrapolation * keep

    def _hf_params(self):
        c = self.cfg
        params = {
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max,
            "beta_fast": float(c.beta_fast),
            "beta_slow": float(c.beta_slow),
            "truncate": bool(c.truncate),
        }
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(c, key) is not None:
                params[key] = float(getattr(c, key))
        return params


class Llama3Scaling(RopeScaling):
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, smooth blend
    between `original/low_freq_factor` and `original/high_freq_factor` wavelengths."""

    name = hf_type = "llama3"

    def inv_freq(self, seq_len=None):
        c, factor, old_len = self.cfg, self.factor, self.original_max
        inv_freq = self._plain_inv_freq(self.theta)
        low_wavelen, high_wavelen = old_len / c.low_freq_factor, old_len / c.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - c.low_freq_factor) / (c.high_freq_factor - c.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)

    def _hf_params(self):
        return {
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max,
            "low_freq_factor": float(self.cfg.low_freq_factor),
            "high_freq_factor": float(self.cfg.high_freq_factor),
        }


class LongRopeScaling(RopeScaling):
    """LongRoPE / Phi-3: searched per-dimension rescale factors, `short_factor` up to
    the original context and `long_factor` beyond it (picked per forward from the
    longest position), with one constant cos/sin scaling."""

    name = hf_type = "longrope"

    def inv_freq(self, seq_len=None):
        long = seq_len is not None and seq_len > self.original_max
        factors = torch.tensor(self.cfg.long_factor if long else self.cfg.short_factor, dtype=torch.float32)
        return 1.0 / (factors * self.theta ** self._exponent())

    def attention_scaling(self, seq_len=None):
        if self.cfg.attention_factor is not None:
            return float(self.cfg.attention_factor)
        if self.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max))

    def _hf_params(self):
        params = {
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max,
            "short_factor": [float(x) for x in self.cfg.short_factor],
            "long_factor": [float(x) for x in self.cfg.long_factor],
        }
        if self.cfg.attention_factor is not None:
            params["attention_factor"] = float(self.cfg.attention_factor)
        return params


STRATEGIES = {
    cls.name: cls
    for cls in (RopeScaling, LinearScaling, StaticNTKScaling, DynamicNTKScaling, YarnScaling, Llama3Scaling,
                LongRopeScaling)
}


def _validate(cfg: RopeConfig, head_dim: int, max_position_embeddings: int) -> None:
    """Reject parameters that transformers would only warn about (or silently misuse)."""
    if cfg.type not in STRATEGIES:
        raise ValueError(f"rope.type={cfg.type!r} is unknown; choose one of {sorted(STRATEGIES)}")
    if head_dim < 4 or head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim >= 4, got {head_dim}")
    if not cfg.theta > 0:
        raise ValueError(f"rope.theta must be > 0, got {cfg.theta}")
    if cfg.type != "none" and not cfg.factor >= 1.0:
        raise ValueError(f"rope.factor must be >= 1 (new context / original context), got {cfg.factor}")
    original = cfg.original_max_position_embeddings or max_position_embeddings
    if not (isinstance(original, int) and original > 0):
        raise ValueError(f"rope.original_max_position_embeddings must be a positive int, got {original!r}")
    if cfg.attention_factor is not None and not cfg.attention_factor > 0:
        raise ValueError(f"rope.attention_factor must be > 0, got {cfg.attention_factor}")
    if cfg.type == "yarn" and not (0 < cfg.beta_slow <= cfg.beta_fast):
        raise ValueError(f"YaRN needs 0 < rope.beta_slow <= rope.beta_fast, got {cfg.beta_slow}, {cfg.beta_fast}")
    if cfg.type == "llama3" and not (0 < cfg.low_freq_factor < cfg.high_freq_factor):
        raise ValueError("Llama-3 RoPE needs 0 < rope.low_freq_factor < rope.high_freq_factor, got "
                         f"{cfg.low_freq_factor}, {cfg.high_freq_factor}")
    if cfg.type == "longrope":
        for key in ("short_factor", "long_factor"):
            values = getattr(cfg, key)
            if values is None or len(values) != head_dim // 2:
                got = "nothing" if values is None else f"{len(values)} values"
                raise ValueError(f"LongRoPE needs rope.{key} with head_dim/2 = {head_dim // 2} values, got {got}")
            if not all(isinstance(v, (int, float)) and v > 0 for v in values):
                raise ValueError(f"rope.{key} must hold positive numbers, got {values}")


def build_rope(cfg: RopeConfig, head_dim: int, max_position_embeddings: int) -> RopeScaling:
    """The strategy for `cfg`; `max_position_embeddings` is the trained (target) context,
    `cfg.original_max_position_embeddings` (default: the same) the one being extended."""
    _validate(cfg, head_dim, max_position_embeddings)
    return STRATEGIES[cfg.type](cfg, head_dim, max_position_embeddings)


class RotaryEmbedding(nn.Module):
    """cos/sin for position ids, in transformers' layout ([B, S, D], freqs repeated twice).

    Frequencies live in non-persistent float32 buffers: checkpoints don't carry them,
    and `_apply` recomputes them after `.to(...)`/`.bfloat16()`/`to_empty()` so a bf16
    engine or meta-device init can never round or lose them.
    """

    def __init__(self, cfg: RopeConfig, head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.head_dim = head_dim
        self.set_rope(cfg, max_position_embeddings)

    def set_rope(self, cfg: RopeConfig, max_position_embeddings: int) -> None:
        """Stage transition: swap the strategy in place (buffers only, same device)."""
        self.rope = build_rope(cfg, self.head_dim, max_position_embeddings)
        self.attention_scaling = self.rope.attention_scaling()
        old = self._buffers.get("inv_freq")
        self._fill_buffers(old.device if old is not None else torch.device("cpu"))

    def _fill_buffers(self, device: torch.device) -> None:
        rope = self.rope
        with torch.device("cpu"):  # real values even inside a `torch.device("meta")` build
            short = rope.inv_freq()
            long = rope.inv_freq(rope.original_max + 1) if rope.name == "longrope" else None
        self.register_buffer("inv_freq", short.to(device), persistent=False)
        long = long.to(device) if long is not None else None
        self.register_buffer("inv_freq_long", long, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._fill_buffers(self.inv_freq.device)  # keep exact float32 frequencies whatever fn did
        return self

    def _inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Like transformers: dynamic NTK and LongRoPE switch on max(position_ids)+1
        (torch.where, so no host sync); the rest are fixed."""
        rope = self.rope
        if rope.name not in ("dynamic", "longrope"):
            return self.inv_freq
        seq_len = position_ids.max() + 1
        if rope.name == "longrope":
            longer = self.inv_freq_long
        else:
            longer = rope.grown_inv_freq(seq_len)
        return torch.where(seq_len > rope.original_max, longer, self.inv_freq)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32):
        """position_ids [B, S] -> cos, sin [B, S, D] with the attention scaling folded in."""
        inv_freq = self._inv_freq(position_ids)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs_BSd = position_ids[..., None].float() * inv_freq.float()
            emb_BSD = torch.cat((freqs_BSd, freqs_BSd), dim=-1)
            cos = emb_BSD.cos() * self.attention_scaling
            sin = emb_BSD.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, H, S, D], k [B, Hkv, S, D], cos/sin [B, S, D]: the rotate_half convention,
    same operations as transformers' apply_rotary_pos_emb (so same numerics)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
