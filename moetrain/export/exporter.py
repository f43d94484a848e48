"""Export a trained model as a Hugging Face folder that loads without custom code.

    export_checkpoint(RUN_DIR_OR_CKPT, OUT)   what scripts/export.py and the trainer call
    export_model(model, ...)                  the same for an in-memory model (tests, import round trips)

OUT gets config.json, generation_config.json, model-*.safetensors + index,
tokenizer.model/.json, tokenizer_config.json, special_tokens_map.json and
moetrain_export.json (what was exported from where, approximations, verify numbers).
"""
from __future__ import annotations

import copy
import sys
from typing import Callable, Optional

import torch

from moetrain.config import AttentionConfig, ModelConfig, config_from_dict
from moetrain.export import deps, engine_check, writer
from moetrain.export.convert import to_hf_state_dict
from moetrain.export.hf_config import hf_config_dict
from moetrain.export.targets import ARCHS, apply_approximations, layer_kinds, plan_export
from moetrain.export.tokenizer import check_tokenizer, find_tokenizer, write_tokenizer
from moetrain.export.verify import LENGTH_DEPENDENT_ROPE, compare_models, load_hf, verify_seq_len

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class VerificationFailed(RuntimeError):
    """The reloaded export does not reproduce the model (not a user error)."""


def _say(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def _check_args(out_dir: str, dtype: str, shard_size, verify_engine: Optional[str] = None) -> int:
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    writer.check_out_dir(out_dir)
    deps.require(*deps.EXPORT_NEEDS)
    if verify_engine:
        engine_check.engine_python(verify_engine)  # a missing engine venv fails before the slow work
    return writer.parse_size(shard_size)


def export_checkpoint(checkpoint: str, out_dir: str, *, dtype: str = "fp32", shard_size="5GB", verify: bool = False,
                      allow_approx: bool = False, tokenizer: Optional[str] = None, verify_engine: Optional[str] = None,
                      log: Callable[[str], None] = _say) -> dict:
    """A run folder (newest complete checkpoint) or one checkpoint -> HF folder `out_dir`.
    Returns the report (also saved as out_dir/moetrain_export.json)."""
    from moetrain import checkpoint as ckpt

    _check_args(out_dir, dtype, shard_size, verify_engine)
    ckpt_dir = ckpt.resolve_checkpoint(checkpoint)
    client = ckpt.read_client_state(ckpt_dir)
    tok = find_tokenizer(client["config"]["data"]["dir"], tokenizer)  # before the (slow) weights
    log(f"reading {ckpt_dir}")
    model = ckpt.load_model(ckpt_dir)  # fp32, CPU, the last stage's RoPE/attention
    cfg = config_from_dict(client["config"])
    return export_model(model, cfg.model, ckpt.stage_of(cfg, client).attention, out_dir, tokenizer_path=tok,
                        dtype=dtype, shard_size=shard_size, verify=verify, allow_approx=allow_approx,
                        source=ckpt_dir, verify_engine=verify_engine, prompt_data_dir=client["config"]["data"]["dir"],
                        log=log)


def export_model(model, mcfg: ModelConfig, attn: AttentionConfig, out_dir: str, *, tokenizer_path: str,
                 dtype: str = "fp32", shard_size="5GB", verify: bool = False, allow_approx: bool = False,
                 source: Optional[str] = None, verify_engine: Optional[str] = None,
                 prompt_data_dir: Optional[str] = None, log: Callable[[str], None] = _say) -> dict:
    """Our model (fp32, CPU, RoPE/attention of its final stage) -> HF folder. The model is
    modified in place (approximations; bf16 rounding for the check), to keep memory at
    one copy of it plus the reloaded transformers model. `verify_engine` ("vllm") also runs
    the export in that engine (engine_check.py), prompts from `prompt_data_dir`'s eval text."""
    max_bytes = _check_args(out_dir, dtype, shard_size, verify_engine)
    model.eval()
    plan = plan_export(mcfg, attn, model.state_dict(), allow_approx)
    if verify_engine:
        engine_check.check_supported(model.rotary.rope, plan, mcfg)
    original = copy.deepcopy(model) if not plan.exact else None
    apply_approximations(model, plan, attn)
    log(f"target {ARCHS[plan.arch][1]}" + ("" if plan.exact else f", approximated: {'; '.join(plan.approximations)}"))
    if len(set(plan.layer_kinds)) > 1:
        log("note: vLLM 0.32 serves per-layer sliding/full attention as full attention on every layer "
            "(transformers is exact); see README, Export and serving")
    if model.rotary.rope.name in LENGTH_DEPENDENT_ROPE:
        log(f"note: {model.rotary.rope.name} RoPE changes with the sequence length; KV-cached decoding (transformers, "
            "vLLM) keeps keys rotated for shorter lengths, so served outputs can drift past the original context")
    stage = writer.staging_dir(out_dir)
    _write_folder(model, mcfg, plan, stage, tokenizer_path, dtype, max_bytes)
    report = {"architecture": ARCHS[plan.arch][1], "model_type": ARCHS[plan.arch][0], "dtype": dtype,
              "exact": plan.exact, "approximations": plan.approximations, "source": source,
              "files": writer.written_files(stage)}
    if verify or original is not None:
        seq_len = verify_seq_len(attn, layer_kinds(mcfg, attn))  # the trained pattern, before approximations
        report.update(_check(model, original, mcfg, stage, dtype, verify, seq_len, log))
    if verify_engine and (not verify or report["verify"]["passed"]):
        res = engine_check.check_engine(round_as_exported_(model, dtype), stage, mcfg.vocab_size,
                                        model.rotary.rope.max_position_embeddings, dtype, verify_engine,
                                        prompt_data_dir, log)
        report.update(verify_engine=res.as_dict(), verify_engine_line=res.line())
        log(f"verify-engine {'passed' if res.passed else 'FAILED'}: {res.line()}")
    writer.write_json(stage, writer.MARKER, report)
    if verify and not report["verify"]["passed"]:
        raise VerificationFailed(f"the export does not reproduce the model ({report['verify_line']}); "
                                 f"left for inspection in {stage}")
    if verify_engine and not report["verify_engine"]["passed"]:
        raise VerificationFailed(f"{verify_engine} does not compute what the model computes "
                                 f"({report['verify_engine_line']}); left for inspection in {stage}")
    writer.publish(stage, out_dir)
    log(f"wrote {out_dir}")
    return report


def _write_folder(model, mcfg, plan, stage: str, tokenizer_path: str, dtype: str, max_bytes: int) -> None:
    from transformers import AutoConfig, GenerationConfig, __version__

    rope = model.rotary.rope
    special = write_tokenizer(tokenizer_path, stage, rope.max_position_embeddings)
    check_tokenizer(stage, tokenizer_path)
    config = hf_config_dict(mcfg, rope.to_hf(), plan, special, dtype)
    config["transformers_version"] = __version__
    writer.write_json(stage, "config.json", config)
    AutoConfig.from_pretrained(stage)  # fail here, not in the user's serving engine
    GenerationConfig(**special).save_pretrained(stage)
    writer.write_shards(to_hf_state_dict(model.state_dict(), mcfg, plan, DTYPES[dtype]), stage, max_bytes)


@torch.no_grad()
def round_as_exported_(model, dtype: str):
    """In place, once the tensors are written: our model as a bf16 export stores it
    (routed scaling folded into the experts, every weight rounded), the reference
    that transformers must then reproduce. A no-op for fp32."""
    if dtype == "fp32":
        return model
    from moetrain.model.moe import moe_layers
    for moe in moe_layers(model):
        if moe.router.scaling != 1.0:
            moe.experts.down_EdF.mul_(moe.router.scaling)
            moe.router.scaling = 1.0
    for p in model.parameters():
        p.copy_(p.to(DTYPES[dtype]).float())
    return model


def _check(model, original, mcfg, stage, dtype, verify, seq_len, log) -> dict:
    """Reload with transformers; exactness of the conversion (verify) and, for
    approximated exports, the measured difference to the original model."""
    hf = load_hf(stage)
    rope = model.rotary.rope
    out = {}
    if verify:
        res = compare_models(round_as_exported_(model, dtype), hf, mcfg.vocab_size, rope, seq_len)
        out.update(verify=res.as_dict(), verify_line=res.line())
        log(f"verify {'passed' if res.passed else 'FAILED'}: {res.line()}")
    if original is not None:
        res = compare_models(original, hf, mcfg.vocab_size, rope, seq_len)
        numbers = {k: v for k, v in res.as_dict().items() if k != "passed"}  # informative, not a pass/fail check
        out.update(approximation=numbers, approximation_line=res.line(limits=False))
        log(f"approximation: the export differs from the trained model by {res.line(limits=False)}")
    return out
