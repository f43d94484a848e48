"""validate(): impossible combinations rejected with one line before any work starts;
the per-stage views of attention and data."""
from __future__ import annotations

import dataclasses
import math

from moetrain.config.mapping import ConfigError, _from_dict, brief, to_dict
from moetrain.config.schema import (AttentionConfig, DataConfig, ModelConfig, RopeConfig, StageConfig,
                                    TrainConfig)


_CHOICES = {
    "model.attention.backend": ("auto", "sdpa", "reference", "triton", "chunked", "banded"),
    "model.loss_impl": ("auto", "chunked", "fused"),
    "model.moe.router": ("softmax", "sigmoid"),
    "data.mode": ("packed", "window"),
    "data.split": ("train", "eval"),
    "train.precision": ("fp32", "bf16"),
    "optim.name": ("adamw", "muon"),
    "optim.schedule": ("cosine", "linear", "constant", "wsd"),
    "optim.decay_shape": ("linear", "1-sqrt"),
    "deepspeed.offload_optimizer": ("none", "cpu"),
    "deepspeed.offload_param": ("none", "cpu"),
    "logging.console": ("tqdm", "plain"),
    "memory.checkpoint": ("none", "full", "attention", "mlp"),
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


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    _need(r.original_max_position_embeddings is None or r.original_max_position_embeddings > 0,
          f"{where}.original_max_position_embeddings={r.original_max_position_embeddings} must be positive")
    if r.type == "longrope":
        for name in ("short_factor", "long_factor"):
            vals = getattr(r, name)
            _need(vals is not None and len(vals) == hd // 2 and all(_is_number(v) for v in vals),
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
    _validate_sequence_parallel(cfg, world_size)
    _validate_attention(m.attention, "model.attention")
    _validate_rope(m.rope, "model.rope", head_dim(m))
    _validate_stages(cfg)
    t = cfg.train
    _need(t.micro_batch_size > 0, f"train.micro_batch_size={t.micro_batch_size} must be positive")
    _need(t.grad_accum_steps is None or t.grad_accum_steps > 0,
          f"train.grad_accum_steps={t.grad_accum_steps} must be positive (or null: derived from global_batch_size)")
    _need(t.max_steps is None or t.max_steps > 0, f"train.max_steps={t.max_steps} must be positive")
    if t.global_batch_size is not None:
        _need(t.global_batch_size > 0, f"train.global_batch_size={t.global_batch_size} must be positive")
        # world_size=1 also means "not launched yet" (load_config): then only what holds at any size
        # is checked here; the trainer's plan (grad_accum_for) checks the real data-parallel size.
        dp = max(1, world_size // cfg.deepspeed.sequence_parallel_size)  # an SP group reads one batch
        if world_size == 1:
            _need(t.global_batch_size % t.micro_batch_size == 0,
                  f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size "
                  f"{t.micro_batch_size}; use a multiple of micro_batch_size x data-parallel size")
        else:
            grad_accum_for(t, dp)
    d = cfg.deepspeed
    _need(d.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage={d.zero_stage} must be 0, 1, 2 or 3")
    _need(d.offload_param == "none" or d.zero_stage == 3, "deepspeed.offload_param needs deepspeed.zero_stage=3")
    _need(d.offload_optimizer == "none" or d.zero_stage >= 1, "deepspeed.offload_optimizer needs zero_stage >= 1")
    o = cfg.optim
    _need(o.lr > 0, f"optim.lr={o.lr} must be positive")
    _need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _need(len(o.betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in o.betas),
          f"optim.betas={brief(o.betas)} must be two numbers in [0, 1)")
    _need(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0")
    _need(0 < o.decay_fraction <= 1, f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
    _need(0 <= o.muon_momentum < 1, f"optim.muon_momentum={o.muon_momentum} must be in [0, 1)")
    _need(o.name != "muon" or d.zero_stage < 3,
          "optim.name=muon needs whole matrices, which ZeRO-3 keeps partitioned even in the optimizer step: "
          "set deepspeed.zero_stage to 0, 1 or 2 (expert parallelism works with all three) or use optim.name=adamw")
    _need(cfg.checkpoint.every_steps > 0, f"checkpoint.every_steps={cfg.checkpoint.every_steps} must be positive")
    _need(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be >= 1")
    _need(cfg.logging.every_steps > 0, f"logging.every_steps={cfg.logging.every_steps} must be positive")
    _need(cfg.memory.checkpoint_every >= 1, f"memory.checkpoint_every={cfg.memory.checkpoint_every} must be >= 1")
    _need(cfg.memory.mlp_tile_tokens >= 0,
          f"memory.mlp_tile_tokens={cfg.memory.mlp_tile_tokens} must be >= 0 (0 turns tiling off)")
    _need(cfg.guards.max_nonfinite_steps > 0, f"guards.max_nonfinite_steps={cfg.guards.max_nonfinite_steps} "
          "must be positive (the number of NaN/Inf steps in a row that stops training)")
    _validate_spike_guard(cfg.guards)
    _validate_ranges(cfg)


def grad_accum_for(t, dp: int) -> int:
    """train.grad_accum_steps at `dp` data-parallel ranks: as given, derived from
    train.global_batch_size (Megatron's and torchtitan's rule), or 1. Raises ConfigError
    when the global batch cannot be split that way."""
    gbs, mbs = t.global_batch_size, t.micro_batch_size
    if gbs is None:
        return t.grad_accum_steps or 1
    per_step = mbs * dp
    _need(gbs % per_step == 0, f"train.global_batch_size={gbs} is not divisible by micro_batch_size {mbs} x "
          f"data-parallel size {dp} = {per_step}; use a multiple of {per_step} or another micro_batch_size")
    ga = gbs // per_step
    _need(t.grad_accum_steps in (None, ga), f"train.global_batch_size={gbs} != micro_batch_size {mbs} x "
          f"grad_accum_steps {t.grad_accum_steps} x data-parallel size {dp}; drop train.grad_accum_steps "
          f"(it is derived from the global batch: {ga} here) or fix one of them")
    return ga


def _validate_sequence_parallel(cfg: TrainConfig, world_size: int) -> None:
    """DeepSpeed-Ulysses (moetrain/parallel/sequence.py): one size per run, heads split over
    the group, every sequence cut into equal contiguous shards."""
    sp, m, w = cfg.deepspeed.sequence_parallel_size, cfg.model, "deepspeed.sequence_parallel_size"
    _need(isinstance(sp, int) and sp >= 1, f"{w}={sp!r} must be a positive integer (1 turns it off)")
    if sp == 1:
        return
    _need(world_size == 1 or world_size % sp == 0,
          f"world size {world_size} is not divisible by {w}={sp}; launch a multiple of {sp} processes")
    _need(m.n_heads % sp == 0, f"model.n_heads={m.n_heads} is not divisible by {w}={sp} (Ulysses gives every "
          f"rank n_heads/{sp} heads); choose a size that divides {m.n_heads}")
    _need(m.n_kv_heads % sp == 0 or sp % m.n_kv_heads == 0,
          f"model.n_kv_heads={m.n_kv_heads} and {w}={sp}: one must divide the other (KV heads are split "
          "over the group, or replicated when there are fewer)")
    for i, s in enumerate(cfg.stages):
        _need(s.seq_len % sp == 0, f"stages[{i}].seq_len={s.seq_len} is not divisible by {w}={sp} "
              "(every rank holds an equal contiguous shard); make it a multiple")


def _validate_ranges(cfg: TrainConfig) -> None:
    """Bounds the libraries underneath would otherwise hit late, naming no key (numpy's
    seed range, torch's init std and AdamW's eps, ...)."""
    _need(0 <= cfg.seed < 2 ** 32, f"seed={cfg.seed} must be in [0, 2**32) (numpy's seed range)")
    _need(cfg.eval.seed >= 0, f"eval.seed={cfg.eval.seed} must be >= 0")
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.deepspeed
    _need(m.head_dim is None or m.head_dim > 0, f"model.head_dim={m.head_dim} must be positive (or null)")
    _need(m.init_std >= 0, f"model.init_std={m.init_std} must be >= 0")
    _need(m.rms_norm_eps > 0, f"model.rms_norm_eps={m.rms_norm_eps} must be positive")
    sis = m.moe.shared_expert_intermediate_size
    _need(sis is None or sis > 0, f"model.moe.shared_expert_intermediate_size={sis} must be positive (or null)")
    _need(o.eps >= 0, f"optim.eps={o.eps} must be >= 0")
    _need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _need(t.eval_every_steps >= 0, f"train.eval_every_steps={t.eval_every_steps} must be >= 0 (0 = at stage ends)")
    _need(t.eval_batches >= 1, f"train.eval_batches={t.eval_batches} must be >= 1")
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size"):
        _need(getattr(d, key) > 0, f"deepspeed.{key}={getattr(d, key)} must be positive")
    _validate_data(cfg.data, "data")


def _validate_data(data: DataConfig, where: str) -> None:
    """Types and ranges of the data section (or a stage's view of it); sources and
    synthetic task names are checked against the prepared folder by the loader."""
    for key in ("mode", "split"):
        choices = _CHOICES[f"data.{key}"]
        _need(getattr(data, key) in choices, f"{where}.{key}='{getattr(data, key)}' is not one of {', '.join(choices)}")
    _need(data.upsample_factor >= 1, f"{where}.upsample_factor={data.upsample_factor} must be >= 1")
    _need(data.upsample_min_len >= 0, f"{where}.upsample_min_len={data.upsample_min_len} must be >= 0")
    for key in ("source_weights", "synthetic"):
        for name, v in getattr(data, key).items():
            _need(_is_number(v) and v >= 0, f"{where}.{key}.{name}={brief(v)} must be a number >= 0")


def _validate_spike_guard(g) -> None:
    _need(g.spike_action in ("off", "log", "skip", "rollback"),
          f"guards.spike_action='{g.spike_action}' must be off, log, skip or rollback")
    _need(g.spike_threshold > 1, f"guards.spike_threshold={g.spike_threshold} must be > 1 (a ratio to the "
          "window's mean loss, e.g. 2.0)")
    _need(g.spike_window >= 1, f"guards.spike_window={g.spike_window} must be >= 1")
    _need(1 <= g.spike_warmup <= g.spike_window, f"guards.spike_warmup={g.spike_warmup} must be in "
          f"[1, guards.spike_window={g.spike_window}]")
    _need(g.max_spikes >= 1, f"guards.max_spikes={g.max_spikes} must be >= 1")


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
        _need(s.lr is None or s.lr > 0, f"{where}.lr={s.lr} must be positive (or null for optim.lr)")
        if s.attention is not None:
            _validate_attention(stage_attention(cfg, s, f"{where}.attention"), f"{where}.attention")
        if s.data is not None:
            bad = [k for k in s.data if k not in {f.name for f in dataclasses.fields(DataConfig)}]
            _need(not bad, f"{where}.data has unknown key '{bad[0] if bad else ''}'; use fields of data")
            _validate_data(stage_data(cfg, s, f"{where}.data"), f"{where}.data")
    mp = cfg.model.max_position_embeddings
    longest = max(s.seq_len for s in cfg.stages)
    _need(mp is None or mp >= longest,
          f"model.max_position_embeddings={mp} is shorter than the longest stage ({longest}); raise it")


def stage_attention(cfg: TrainConfig, stage: StageConfig, where: str = "attention") -> AttentionConfig:
    """model.attention with the stage's overrides applied (`where` names it in errors)."""
    base = to_dict(cfg.model.attention)
    base.update(stage.attention or {})
    return _from_dict(AttentionConfig, base, where)


def stage_data(cfg: TrainConfig, stage: StageConfig, where: str = "data") -> DataConfig:
    """data with the stage's overrides applied (`where` names it in errors)."""
    base = to_dict(cfg.data)
    base.update(stage.data or {})
    return _from_dict(DataConfig, base, where)
