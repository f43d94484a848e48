"""One typed config tree for everything: YAML in, dotted overrides, validate().

Every field carries a docstring (the string literal under it). Unknown keys fail
naming the closest valid key; `validate()` rejects impossible combinations with
one line before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the fix."""


# --------------------------------------------------------------------------- model
@dataclass
class RopeConfig:
    type: str = "none"
    """RoPE scaling strategy: none | linear | ntk | dynamic | yarn | llama3 | longrope."""
    theta: float = 10000.0
    """RoPE base frequency (rope_theta)."""
    factor: float = 1.0
    """Context extension factor (new context / original context)."""
    original_max_position_embeddings: Optional[int] = None
    """Context the model was pretrained at; defaults to the previous stage's seq_len."""
    beta_fast: float = 32.0
    """YaRN: rotations above which dimensions are extrapolated."""
    beta_slow: float = 1.0
    """YaRN: rotations below which dimensions are interpolated."""
    mscale: Optional[float] = None
    """YaRN (DeepSeek form): mscale numerator."""
    mscale_all_dim: Optional[float] = None
    """YaRN (DeepSeek form): mscale denominator."""
    attention_factor: Optional[float] = None
    """Explicit attention (cos/sin) scaling; None = the strategy's default."""
    truncate: bool = True
    """YaRN: round the correction range to whole dimensions (transformers' default)."""
    low_freq_factor: float = 1.0
    """Llama-3: low-frequency wavelength factor."""
    high_freq_factor: float = 4.0
    """Llama-3: high-frequency wavelength factor."""
    short_factor: Optional[list] = None
    """LongRoPE: per-dimension rescale factors for short contexts (head_dim/2 floats)."""
    long_factor: Optional[list] = None
    """LongRoPE: per-dimension rescale factors for long contexts (head_dim/2 floats)."""


@dataclass
class AttentionConfig:
    backend: str = "auto"
    """auto (Triton on CUDA, memory-lean chunked path on CPU) | sdpa | reference | triton | chunked."""
    layer_types: list = field(default_factory=lambda: ["full"])
    """Attention kind per layer, repeated cyclically over layers: full | sliding | moba."""
    full_attention_last_n: int = 0
    """Force the last N layers to full attention (MoBA's hybrid recipe)."""
    window: int = 256
    """Sliding-window size W for `sliding` layers (query i sees keys i-W+1..i)."""
    sink_tokens: int = 0
    """First N tokens of each document stay visible to `sliding`/`moba` layers."""
    block_size: int = 64
    """MoBA key-block size."""
    moba_topk: int = 3
    """MoBA: blocks selected per query (its own block included)."""
    doc_masking: bool = True
    """Keep attention inside each packed document (uses cu_seqlens from the loader)."""


@dataclass
class MoEConfig:
    n_experts: int = 8
    """Routed experts per MoE layer (0 = dense model)."""
    top_k: int = 2
    """Experts each token is routed to."""
    intermediate_size: Optional[int] = None
    """Expert FFN width (fine-grained experts, moe_intermediate_size); None = model.intermediate_size."""
    first_k_dense: int = 0
    """The first k layers use a dense SwiGLU MLP instead of MoE."""
    router: str = "softmax"
    """Router scoring function: softmax (Mixtral/Qwen) | sigmoid (DeepSeek-V3)."""
    softmax_before_topk: bool = True
    """softmax router: softmax over all experts then top-k (Mixtral/Qwen) or top-k logits then softmax over them."""
    norm_topk_prob: bool = True
    """Renormalise the chosen experts' weights to sum to 1."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routed experts' combine weights (DeepSeek-V3: 2.5)."""
    n_groups: int = 1
    """Group-limited routing: experts split into this many groups (1 = off)."""
    topk_groups: int = 1
    """Group-limited routing: each token picks experts only from its best topk_groups groups."""
    router_jitter: float = 0.0
    """Training only: multiply router inputs by U(1-eps, 1+eps) noise (Switch/Mixtral jitter; 0 = off)."""
    n_shared_experts: int = 0
    """Always-on shared experts (DeepSeek/Qwen2-MoE), fused into one SwiGLU."""
    shared_expert_intermediate_size: Optional[int] = None
    """Shared SwiGLU width; None = n_shared_experts x the routed expert width."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by sigmoid(x . w) (Qwen2-MoE)."""
    aux_loss_coef: float = 0.01
    """Weight of the Switch/GShard load-balancing loss (0 = off)."""
    aux_loss_scope: str = "micro_batch"
    """micro_batch | global_batch: expert token fractions of the balancing loss from this rank's micro-batch,
    or summed over all data-parallel ranks (counts all-reduced; router probabilities stay local)."""
    seq_aux_loss_coef: float = 0.0
    """Weight of the sequence-level balancing loss (DeepSeek-V3; balance inside each sequence row; 0 = off)."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss (logsumexp^2 of router logits)."""
    bias_update_speed: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): per-expert routing bias moved by this much per optimizer step
    towards uniform load, outside the gradient (0 = off; DeepSeek-V3 used 0.001)."""
    capacity_factor: Optional[float] = None
    """None = dropless; else each expert takes at most ceil(factor x tokens x top_k / n_experts) assignments
    per micro-batch (per rank) and drops the rest (lowest router weight first)."""
    experts_backend: str = "grouped"
    """grouped (sorted tokens, torch._grouped_mm or a segment loop) | loop (per-expert reference)."""
    permute_backend: str = "auto"
    """Token permute/unpermute: auto (Triton on CUDA, PyTorch on CPU) | torch | triton."""
    ep_size: int = 1
    """Expert-parallel size: experts are split over this many ranks (rank r of an EP group holds experts
    [r*E/ep, (r+1)*E/ep)); tokens move by all-to-all."""


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    """Vocabulary size; must cover the tokenizer's vocabulary."""
    hidden_size: int = 256
    """Residual stream width d."""
    n_layers: int = 4
    """Decoder blocks."""
    n_heads: int = 8
    """Query heads."""
    n_kv_heads: int = 4
    """Key/value heads (GQA when fewer than n_heads)."""
    head_dim: Optional[int] = None
    """Per-head width; None = hidden_size / n_heads."""
    intermediate_size: int = 512
    """Dense SwiGLU MLP width."""
    max_position_embeddings: Optional[int] = None
    """Trained context; None = the longest stage's seq_len."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the token embedding and LM head weights."""
    qk_norm: bool = False
    """RMSNorm on q and k per head before RoPE (Qwen3 style)."""
    init_std: float = 0.02
    """Std of the normal init for linear and embedding weights."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the chunked LM-head + cross-entropy (never full logits)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward to save activation memory."""
    init_from: Optional[str] = None
    """Warm start: a Hugging Face Mixtral/Qwen2-MoE/Qwen3-MoE folder or a moetrain run/checkpoint
    whose weights initialise a fresh run (architecture must match; RoPE/attention may differ)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts settings."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention backend and sparsity pattern."""
    rope: RopeConfig = field(default_factory=RopeConfig)
    """Rotary position embedding and its scaling strategy."""


# --------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    dir: str = "data/gutenberg_classics"
    """Folder of prepared shards (manifest.json + tokenizer.model)."""
    recipe: Optional[str] = "data_recipes/gutenberg_classics.yaml"
    """Recipe to run when `dir` holds no manifest yet (rank 0 prepares, others wait)."""
    mode: str = "packed"
    """packed: documents concatenated with cu_seqlens boundaries | window: S-token windows cut from long documents."""
    split: str = "train"
    """Which split of the prepared data to read: train | eval."""
    source_weights: dict = field(default_factory=dict)
    """Per-source sampling weights (source name -> weight, every source named); empty = natural proportions."""
    upsample_min_len: int = 0
    """Documents longer than this many tokens are upsampled (0 = off)."""
    upsample_factor: float = 1.0
    """Upsampling factor for long documents."""
    synthetic: dict = field(default_factory=dict)
    """On-the-fly synthetic tasks mixed in, e.g. {passkey: 0.1} (fraction of sequences)."""
    verify_shards: bool = True
    """Check each shard's sha256 against manifest.json when a loader opens it (turn off for huge corpora)."""


# --------------------------------------------------------------------------- training
@dataclass
class StageConfig:
    name: str = "main"
    """Stage name (carried in metrics and W&B as `stage`)."""
    seq_len: int = 256
    """Tokens per sequence in this stage."""
    steps: Optional[int] = None
    """Optimizer steps in this stage (or give `tokens`)."""
    tokens: Optional[int] = None
    """Tokens to train on in this stage (converted to steps)."""
    rope: Optional[RopeConfig] = None
    """RoPE for this stage; None = model.rope."""
    lr: Optional[float] = None
    """Peak LR for this stage; None = optim.lr."""
    warmup_steps: Optional[int] = None
    """Re-warmup steps at the start of this stage; None = optim.warmup_steps."""
    micro_batch_size: Optional[int] = None
    """Sequences per micro-batch; None = keep tokens per micro-batch constant."""
    grad_accum_steps: Optional[int] = None
    """Micro-batches per optimizer step; None = train.grad_accum_steps."""
    attention: Optional[dict] = None
    """Overrides of model.attention fields for this stage (e.g. {layer_types: [moba]})."""
    data: Optional[dict] = None
    """Overrides of data fields for this stage (mix, upsampling, synthetic rates)."""


@dataclass
class TrainSection:
    max_steps: Optional[int] = None
    """Cap on optimizer steps over all stages (smoke runs)."""
    precision: str = "fp32"
    """fp32 | bf16 (bf16 only makes sense on GPUs)."""
    micro_batch_size: int = 8
    """Sequences per micro-batch per rank (stage 1; later stages keep tokens constant)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    global_batch_size: Optional[int] = None
    """If set, must equal micro_batch_size x grad_accum_steps x data-parallel world size."""
    eval_every_steps: int = 0
    """Held-out loss every N steps (0 = only at stage ends)."""
    eval_batches: int = 4
    """Micro-batches for each held-out loss."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | muon."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak."""
    schedule: str = "cosine"
    """cosine | linear | constant (after warmup), per stage."""
    warmup_steps: int = 20
    """Linear warmup steps (per stage, re-warmup)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms, biases, embeddings)."""
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO stage 0-3."""
    offload_optimizer: str = "none"
    """none | cpu: ZeRO optimizer-state offload."""
    offload_param: str = "none"
    """none | cpu: ZeRO-3 parameter offload."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduce bucket."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """ZeRO-3 parameter prefetch bucket size."""
    extra: dict = field(default_factory=dict)
    """Merged last into the derived DeepSpeed JSON (escape hatch)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    """Save every N optimizer steps (and always at the end)."""
    keep_last: int = 2
    """Complete checkpoints to keep (older ones are deleted)."""


@dataclass
class WandbConfig:
    mode: str = "online"
    """online | offline | disabled (online falls back to offline without an API key)."""
    project: str = "moetrain"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team); None = your default."""
    name: Optional[str] = None
    """Run name; None = the run folder's name."""
    tags: list = field(default_factory=list)
    """Run tags."""


@dataclass
class LoggingConfig:
    every_steps: int = 10
    """Log to console, metrics.jsonl and W&B every N optimizer steps."""
    console: str = "tqdm"
    """tqdm (progress bar + log lines) | plain (log lines only)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases."""


@dataclass
class EvalConfig:
    enabled: bool = True
    """Run the long-context evaluation at the end of every stage (writes RUN_DIR/eval/)."""
    lengths: list = field(default_factory=list)
    """Context lengths for passkey retrieval and loss by position; empty = the stage's seq_len."""
    depths: list = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Relative depths of the pass key in the context."""
    passkey_trials: int = 10
    """Passkey trials per (length, depth) cell; 10 keeps stage ends cheap on CPU (~10 s at 1k tokens
    for the default model), the full grid is 100: eval.passkey_trials=100, or scripts/eval_long.py."""
    key_digits: int = 5
    """Digits of the pass key."""
    loss_documents: int = 4
    """Held-out windows (of each length) for the loss-by-position curve, cut round-robin from the
    eval split's documents long enough."""
    position_buckets: int = 8
    """Buckets of the loss-by-position curve."""
    batch_tokens: int = 8192
    """Tokens per evaluation forward (batch = batch_tokens // length, at least 1)."""
    seed: int = 0
    """Seed of the passkey trials (fixed, so every stage and model sees the same prompts)."""

    def __post_init__(self):
        # Checked here, where the fields live, so a bad value fails at load time, not at a stage end.
        for key in ("passkey_trials", "key_digits", "loss_documents", "position_buckets", "batch_tokens"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
                raise ConfigError(f"eval.{key}={getattr(self, key)!r} must be a positive integer")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in self.lengths):
            raise ConfigError(f"eval.lengths={self.lengths!r} must be positive integers (tokens)")
        if not self.depths or not all(isinstance(d, (int, float)) and 0 <= d <= 1 for d in self.depths):
            raise ConfigError(f"eval.depths={self.depths!r} must be a non-empty list of numbers in [0, 1]")


@dataclass
class ExportConfig:
    enabled: bool = False
    """Export RUN_DIR/export/ (a Hugging Face folder) at the end of training."""
    dtype: str = "fp32"
    """fp32 | bf16 weights in the exported folder."""
    shard_size: str = "5GB"
    """Max size of one safetensors shard."""
    verify: bool = True
    """Reload with transformers and compare logits after exporting."""
    allow_approx: bool = False
    """Export the nearest servable form when no target architecture is exact."""


@dataclass
class TrainConfig:
    name: str = "default"
    """Config name; the run folder defaults to runs/<name>."""
    seed: int = 1234
    """Seed for model init, data order and dropout."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: TrainSection = field(default_factory=TrainSection)
    """Batching, precision, step cap."""
    stages: list = field(default_factory=lambda: [StageConfig(steps=1000)])
    """Context-length curriculum: list of stages run in order in one launch."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """ZeRO and DeepSpeed engine settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console, metrics.jsonl and W&B."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Long-context evaluation at stage ends."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Hugging Face export at the end of training."""


# Element types of list fields holding dataclasses.
_LIST_ITEM_TYPES = {(TrainConfig, "stages"): StageConfig}


# --------------------------------------------------------------------------- loading
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, path: str, noun: str = "config key") -> Any:
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: null is not allowed; give a {_type_name(base)}")
    if dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {base.__name__} fields, got {value!r}")
        return _from_dict(base, value, path, noun)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(f)
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if base is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    if base is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return list(value)
    if base is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def register_list_items(cls, name: str, item_cls) -> None:
    """Declare that list field `cls.name` holds `item_cls` mappings (for from_mapping)."""
    _LIST_ITEM_TYPES[(cls, name)] = item_cls


def _from_dict(cls, data: dict, prefix: str = "", noun: str = "config key"):
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else (
                f"; valid keys: {', '.join(names)}")
            raise ConfigError(f"unknown {noun} '{path}'{hint}")
        item_cls = _LIST_ITEM_TYPES.get((cls, key))
        if item_cls is not None:
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{path}: expected a non-empty list of {item_cls.__name__} mappings")
            kwargs[key] = [_coerce(v, item_cls, f"{path}[{i}]", noun) for i, v in enumerate(value)]
        else:
            kwargs[key] = _coerce(value, hints[key], path, noun)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key '{(prefix + '.' if prefix else '') + missing[0]}'")
    return cls(**kwargs)


def from_mapping(cls, data: Any, where: str = ""):
    """A dataclass instance from a (YAML) mapping: types coerced, unknown keys
    named with the closest valid one, required keys enforced (ConfigError)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    return _from_dict(cls, data, where, noun="key")


def to_dict(cfg) -> dict:
    """Plain nested dict (for YAML dumps, checkpoints and W&B)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if k.isdigit() and isinstance(node, list):
            k = int(k)
            if k >= len(node):
                raise ConfigError(f"override '{dotted}': index {k} is out of range (list has {len(node)} items)")
        elif not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
        node = node.setdefault(k, {}) if isinstance(node, dict) else node[k]
        if node is None:
            raise ConfigError(f"override '{dotted}': '{k}' is null; set the whole section instead")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override '{dotted}': '{last}' is not a valid list index")
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=3' -> ('a.b', 3); the value is parsed as a YAML scalar/list/mapping."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like dotted.key=value, e.g. train.max_steps=20")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key; use dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def read_yaml_mapping(path: str, what: str = "config file",
                      fix: str = "pass an existing YAML file to --config") -> dict:
    """yaml.safe_load a file that must hold a mapping; one-line ConfigError otherwise."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} '{path}' does not exist; {fix}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{what} '{path}' is not valid YAML{where}; fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of keys at the top level")
    return data


def config_from_dict(data: dict, overrides=()) -> TrainConfig:
    tree = dict(data)
    for ov in overrides:
        key, value = parse_override(ov) if isinstance(ov, str) else ov
        _set_dotted(tree, key, value)
    return _from_dict(TrainConfig, tree)


def load_config(path: Optional[str] = None, overrides=()) -> TrainConfig:
    """Load YAML (or defaults when `path` is None), apply dotted overrides, validate."""
    data = read_yaml_mapping(path) if path else {}
    if path and "name" not in data:
        data["name"] = os.path.splitext(os.path.basename(path))[0]
    cfg = config_from_dict(data, overrides)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation
_CHOICES = {
    "model.attention.backend": ("auto", "sdpa", "reference", "triton", "chunked"),
    "model.moe.router": ("softmax", "sigmoid"),
    "data.mode": ("packed", "window"),
    "data.split": ("train", "eval"),
    "train.precision": ("fp32", "bf16"),
    "optim.name": ("adamw", "muon"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "deepspeed.offload_optimizer": ("none", "cpu"),
    "deepspeed.offload_param": ("none", "cpu"),
    "logging.console": ("tqdm", "plain"),
    "logging.wandb.mode": ("online", "offline", "disabled"),
    "export.dtype": ("fp32", "bf16"),
}
ATTENTION_KINDS = ("full", "sliding", "moba")
ROPE_TYPES = ("none", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")


def _get(cfg, dotted: str):
    for k in dotted.split("."):
        cfg = getattr(cfg, k)
    return cfg


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def head_dim(m: ModelConfig) -> int:
    return m.head_dim or m.hidden_size // m.n_heads


def _validate_attention(a: AttentionConfig, where: str) -> None:
    _need(a.backend in _CHOICES["model.attention.backend"],
          f"{where}.backend='{a.backend}' is not one of {', '.join(_CHOICES['model.attention.backend'])}")
    _need(bool(a.layer_types), f"{where}.layer_types is empty; give e.g. [full] or [sliding, sliding, sliding, full]")
    for t in a.layer_types:
        _need(t in ATTENTION_KINDS, f"{where}.layer_types has '{t}'; use {', '.join(ATTENTION_KINDS)}")
    _need(a.window > 0, f"{where}.window={a.window} must be positive")
    _need(a.sink_tokens >= 0, f"{where}.sink_tokens={a.sink_tokens} must be >= 0")
    _need(a.block_size > 0, f"{where}.block_size={a.block_size} must be positive")
    _need(a.moba_topk >= 1, f"{where}.moba_topk={a.moba_topk} must be >= 1 (its own block counts)")
    _need(a.full_attention_last_n >= 0, f"{where}.full_attention_last_n must be >= 0")


def _validate_rope(r: RopeConfig, where: str, hd: int) -> None:
    _need(r.type in ROPE_TYPES, f"{where}.type='{r.type}' is not one of {', '.join(ROPE_TYPES)}")
    _need(r.theta > 0, f"{where}.theta={r.theta} must be positive")
    _need(r.factor >= 1.0 or r.type == "none", f"{where}.factor={r.factor} must be >= 1 for scaling")
    if r.type == "longrope":
        for name in ("short_factor", "long_factor"):
            vals = getattr(r, name)
            _need(vals is not None and len(vals) == hd // 2,
                  f"{where}.{name} needs head_dim/2 = {hd // 2} floats for longrope")


_MOE_CHOICES = {"aux_loss_scope": ("micro_batch", "global_batch"), "experts_backend": ("grouped", "loop"),
                "permute_backend": ("auto", "torch", "triton")}


def _validate_moe(cfg: TrainConfig, world_size: int) -> None:
    e, w = cfg.model.moe, "model.moe"
    _need(e.n_experts >= 0, f"{w}.n_experts={e.n_experts} must be >= 0")
    _need(0 <= e.first_k_dense <= cfg.model.n_layers, f"{w}.first_k_dense={e.first_k_dense} exceeds model.n_layers")
    if e.n_experts == 0:
        return
    for key, choices in _MOE_CHOICES.items():
        _need(getattr(e, key) in choices, f"{w}.{key}='{getattr(e, key)}' is not one of {', '.join(choices)}")
    _need(1 <= e.top_k <= e.n_experts, f"{w}.top_k={e.top_k} must be between 1 and {w}.n_experts={e.n_experts}")
    _need(e.ep_size >= 1 and e.n_experts % e.ep_size == 0,
          f"{w}.ep_size={e.ep_size} must divide {w}.n_experts={e.n_experts}")
    # world_size=1 also means "not launched yet" (load_config); the EP setup re-checks the real world.
    _need(world_size == 1 or world_size % e.ep_size == 0,
          f"world size {world_size} is not divisible by {w}.ep_size={e.ep_size}")
    _need(e.ep_size == 1 or cfg.deepspeed.zero_stage < 3,
          f"{w}.ep_size={e.ep_size} needs deepspeed.zero_stage 0, 1 or 2 (DeepSpeed cannot partition expert-parallel "
          "parameters with ZeRO-3); use zero_stage=2 or ep_size=1")
    _need(e.n_groups >= 1 and e.n_experts % e.n_groups == 0,
          f"{w}.n_groups={e.n_groups} must divide {w}.n_experts={e.n_experts}")
    _need(1 <= e.topk_groups <= e.n_groups, f"{w}.topk_groups={e.topk_groups} must be between 1 and n_groups")
    _need(e.top_k <= e.topk_groups * (e.n_experts // e.n_groups),
          f"{w}.top_k={e.top_k} exceeds the experts in topk_groups={e.topk_groups} groups; raise topk_groups")
    _need(e.intermediate_size is None or e.intermediate_size > 0, f"{w}.intermediate_size must be positive")
    _need(e.n_shared_experts >= 0, f"{w}.n_shared_experts={e.n_shared_experts} must be >= 0")
    _need(e.routed_scaling_factor > 0, f"{w}.routed_scaling_factor must be positive")
    _need(0 <= e.router_jitter < 1, f"{w}.router_jitter={e.router_jitter} must be in [0, 1)")
    for key in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_speed"):
        _need(getattr(e, key) >= 0, f"{w}.{key}={getattr(e, key)} must be >= 0")
    _need(e.capacity_factor is None or e.capacity_factor > 0,
          f"{w}.capacity_factor={e.capacity_factor} must be positive (or null for dropless)")


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Reject impossible settings with one clear line (raises ConfigError)."""
    for key, choices in _CHOICES.items():
        val = _get(cfg, key)
        _need(val in choices, f"{key}='{val}' is not one of {', '.join(choices)}")
    m = cfg.model
    for key in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "intermediate_size"):
        _need(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive")
    _need(m.head_dim is not None or m.hidden_size % m.n_heads == 0,
          f"model.hidden_size={m.hidden_size} is not divisible by model.n_heads={m.n_heads}; "
          "change one of them or set model.head_dim")
    _need(m.n_heads % m.n_kv_heads == 0,
          f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads} (GQA groups)")
    _need(head_dim(m) % 2 == 0, f"head dim {head_dim(m)} must be even for RoPE")
    _need(m.loss_chunk_size > 0, f"model.loss_chunk_size={m.loss_chunk_size} must be positive")
    _validate_moe(cfg, world_size)
    _validate_attention(m.attention, "model.attention")
    _validate_rope(m.rope, "model.rope", head_dim(m))
    _validate_stages(cfg)
    t = cfg.train
    _need(t.micro_batch_size > 0, f"train.micro_batch_size={t.micro_batch_size} must be positive")
    _need(t.grad_accum_steps > 0, f"train.grad_accum_steps={t.grad_accum_steps} must be positive")
    _need(t.max_steps is None or t.max_steps > 0, f"train.max_steps={t.max_steps} must be positive")
    if t.global_batch_size is not None:
        dp = world_size
        _need(t.global_batch_size == t.micro_batch_size * t.grad_accum_steps * dp,
              f"train.global_batch_size={t.global_batch_size} != micro_batch_size {t.micro_batch_size} x "
              f"grad_accum_steps {t.grad_accum_steps} x world size {dp}; fix one of them")
    d = cfg.deepspeed
    _need(d.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage={d.zero_stage} must be 0, 1, 2 or 3")
    _need(d.offload_param == "none" or d.zero_stage == 3, "deepspeed.offload_param needs deepspeed.zero_stage=3")
    _need(d.offload_optimizer == "none" or d.zero_stage >= 1, "deepspeed.offload_optimizer needs zero_stage >= 1")
    o = cfg.optim
    _need(o.lr > 0, f"optim.lr={o.lr} must be positive")
    _need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas={o.betas} must be two numbers in [0, 1)")
    _need(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0")
    _need(cfg.checkpoint.every_steps > 0, f"checkpoint.every_steps={cfg.checkpoint.every_steps} must be positive")
    _need(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be >= 1")
    _need(cfg.logging.every_steps > 0, f"logging.every_steps={cfg.logging.every_steps} must be positive")
    _need(cfg.data.upsample_factor >= 1, f"data.upsample_factor={cfg.data.upsample_factor} must be >= 1")


def _validate_stages(cfg: TrainConfig) -> None:
    names = set()
    for i, s in enumerate(cfg.stages):
        where = f"stages[{i}]"
        _need(s.name not in names, f"{where}.name='{s.name}' is used twice; stage names must be unique")
        names.add(s.name)
        _need(s.seq_len > 0, f"{where}.seq_len={s.seq_len} must be positive")
        _need((s.steps is None) != (s.tokens is None),
              f"{where} needs exactly one of steps or tokens")
        _need((s.steps or 1) > 0 and (s.tokens or 1) > 0, f"{where}: steps/tokens must be positive")
        for key in ("micro_batch_size", "grad_accum_steps", "warmup_steps"):
            v = getattr(s, key)
            _need(v is None or v >= (0 if key == "warmup_steps" else 1), f"{where}.{key}={v} is out of range")
        if s.rope is not None:
            _validate_rope(s.rope, f"{where}.rope", head_dim(cfg.model))
        if s.attention is not None:
            _validate_attention(stage_attention(cfg, s), f"{where}.attention")
        if s.data is not None:
            bad = [k for k in s.data if k not in {f.name for f in dataclasses.fields(DataConfig)}]
            _need(not bad, f"{where}.data has unknown key '{bad[0] if bad else ''}'; use fields of data")
    mp = cfg.model.max_position_embeddings
    longest = max(s.seq_len for s in cfg.stages)
    _need(mp is None or mp >= longest,
          f"model.max_position_embeddings={mp} is shorter than the longest stage ({longest}); raise it")


def stage_attention(cfg: TrainConfig, stage: StageConfig) -> AttentionConfig:
    """model.attention with the stage's overrides applied."""
    base = to_dict(cfg.model.attention)
    base.update(stage.attention or {})
    return _from_dict(AttentionConfig, base, "attention")


def stage_data(cfg: TrainConfig, stage: StageConfig) -> DataConfig:
    """data with the stage's overrides applied."""
    base = to_dict(cfg.data)
    base.update(stage.data or {})
    return _from_dict(DataConfig, base, "data")


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
