"""The config tree: one dataclass per section, a docstring (the string literal under
each field) per field. Loading lives in mapping.py, checks in validate.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from moetrain.config.mapping import ConfigError, register_list_items


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
    """auto (Triton on CUDA; on CPU banded SDPA for sliding windows, SDPA, or the memory-lean chunked path)
    | sdpa | reference | triton | chunked | banded (causal sliding window only)."""
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
    """Weight of the sequence-level balancing loss (DeepSeek-V3; balance inside each sequence: each packed
    document under data.doc_masking, else each row; 0 = off)."""
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
    """Tokens per chunk of the LM-head + cross-entropy, chunked or fused (never full logits)."""
    loss_impl: str = "auto"
    """LM-head + cross-entropy: auto (fused on CUDA, chunked on CPU) | chunked (PyTorch, fp32 math) |
    fused (Triton kernel, moetrain.kernels.fused_ce: bf16 GEMMs, fp32 softmax and accumulation)."""
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
    """Micro-batches per optimizer step; None = train's (given or derived from train.global_batch_size)."""
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
    grad_accum_steps: Optional[int] = None
    """Micro-batches per optimizer step; None = derived from global_batch_size (1 without it)."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all ranks (stage 1; later stages keep its accumulation, so
    tokens per step stay constant). Set it and the accumulation is derived, global_batch_size /
    (micro_batch_size x data-parallel size), as in Megatron and torchtitan: a run resumed on another
    number of processes keeps its optimisation. Must be divisible by micro_batch_size x data-parallel
    size; with grad_accum_steps also set, the two must agree."""
    eval_every_steps: int = 0
    """Held-out loss every N steps (0 = only at stage ends)."""
    eval_batches: int = 4
    """Micro-batches for each held-out loss."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | muon (Moonlight recipe, moetrain.optim; deepspeed.zero_stage 0, 1 or 2, with or without EP)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak."""
    schedule: str = "cosine"
    """cosine | linear | constant | wsd (after warmup), per stage."""
    decay_fraction: float = 0.2
    """wsd: the last fraction of each stage's steps that decays (the rest after warmup is flat)."""
    decay_shape: str = "linear"
    """wsd: shape of the decay to min_lr_ratio x peak: linear | 1-sqrt."""
    muon_momentum: float = 0.95
    """muon: Nesterov momentum of the orthogonalised matrices (AdamW parts use betas)."""
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
    sequence_parallel_size: int = 1
    """Ranks of one sequence-parallel (DeepSpeed-Ulysses) group: each splits every sequence
    into this many contiguous shards; they count as data-parallel ranks for ZeRO."""
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
class MemoryConfig:
    checkpoint: str = "none"
    """Activation checkpointing (recompute in backward): none | full (whole blocks) |
    attention (only the attention of a block) | mlp (only its MLP / MoE).
    model.activation_checkpointing: true still means full."""
    checkpoint_every: int = 1
    """Checkpoint blocks 0, n, 2n, ... (1 = every block)."""
    offload: bool = False
    """Tensors a block saves for backward go to pinned CPU memory until backward (CUDA
    only; on CPU they are already in host memory)."""
    mlp_tile_tokens: int = 0
    """Run MLPs / experts over tiles of this many tokens, each recomputed in backward
    (routing and balancing losses still see every token); 0 = off."""
    release_host_memory: bool = False
    """CPU runs: glibc returns every freed block of 128 KiB or more to the OS at once,
    so the peak RSS is what is live (no heap fragmentation), at the cost of page faults,
    which transparent huge pages for blocks of 2 MiB and more (torch's THP_MEM_ALLOC_ENABLE,
    set with it) make cheaper. Off: freed blocks stay for reuse (faster, higher peak).
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / THP_MEM_ALLOC_ENABLE in the
    environment take precedence."""


@dataclass
class GuardsConfig:
    max_nonfinite_steps: int = 3
    """Stop training (exit code 1) after this many optimizer steps in a row whose loss or
    gradients held a NaN or Inf; every such step's update is skipped on all ranks."""
    spike_action: str = "log"
    """What a loss spike does: off | log (one line, counted in metrics.jsonl) | skip (that
    step's update is skipped on all ranks) | rollback (reload the newest complete checkpoint
    and drop the batches from its step through the spike; a skip where that checkpoint is in
    an earlier stage or none exists yet)."""
    spike_threshold: float = 2.0
    """A spike: the step's loss (mean over all ranks) above this ratio times the mean loss of
    the window (a ratio, not a z-score: early losses fall fast and their spread is tiny)."""
    spike_window: int = 50
    """Recent steps whose losses make the baseline (skipped and rolled-back spikes excluded)."""
    spike_warmup: int = 10
    """Steps with a finite loss the window needs before spikes are looked for (<= spike_window)."""
    max_spikes: int = 10
    """skip / rollback: stop training (exit code 1) at this many spikes acted on in the run; a
    spike that keeps coming back is a diverging run (lower optim.lr), not a bad batch."""

    def __post_init__(self):
        # YAML 1.1 reads a bare `off` as false, which reaches a string field as "False".
        if self.spike_action in (False, "False", "false"):
            self.spike_action = "off"


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
    passkey_trials: int = 100
    """Passkey trials per (length, depth) cell (100: one trial moves accuracy by 1 point)."""
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
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """Memory tools for long sequences (applied by moetrain.parallel.memory)."""
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    """Numerical guards of the fit loop (NaN / Inf steps, loss spikes)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Long-context evaluation at stage ends."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Hugging Face export at the end of training."""


register_list_items(TrainConfig, "stages", StageConfig)
