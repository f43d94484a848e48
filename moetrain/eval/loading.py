"""Models to evaluate: a run folder or checkpoint (moetrain) or a Hugging Face folder
(transformers), each as an eval `forward` plus the tokenizer and the held-out data.

An eval forward never hands back [B, S, V] logits. `forward.run(input_ids, head,
position_ids=None)` runs the model to its final hidden states h [B, S_local, d] and
returns `head(h, w_Vd, start)`: the head (moetrain/eval/passkey.py, position_loss.py)
projects only the positions it needs onto the vocabulary (passkey: the answer
positions; loss: chunks of the chunked cross-entropy). Under sequence parallelism h is
this rank's shard, which starts at sequence position `start`; heads return zeros for
positions outside it, so the group's results add up (a sum over the SP group).

Kinds: `ModelForward` (a moetrain model or its DeepSpeed engine: the head runs inside
the LM head module's call, where ZeRO-3 has gathered the weight), `HFForward`
(transformers: base model, then the output embedding), and any plain callable
`forward(input_ids, position_ids=None) -> logits [B, S, V]` (tests' scripted models;
it materialises logits, the head then gets them with w = None).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class EvalModel:
    forward: Callable          # an eval forward (ModelForward / HFForward), see run_head
    tokenizer: object          # moetrain.data.Tokenizer
    data_dir: Optional[str]    # prepared folder with the held-out (eval split) documents, or None
    max_len: int               # context the model was trained for (default eval length)
    info: dict = field(default_factory=dict)


def run_head(forward, input_ids, head, position_ids=None):
    """head(h_BSd, w_Vd, start) on the model's final hidden states (see the module docstring)."""
    if hasattr(forward, "run"):
        return forward.run(input_ids, head, position_ids)
    logits = forward(input_ids) if position_ids is None else forward(input_ids, position_ids=position_ids)
    return head(logits, None, 0)


def eval_layout(forward) -> tuple[int, int, bool]:
    """(dp_rank, dp_size, lead): which share of the evaluation work this rank does. Ranks of one
    sequence-parallel group (contiguous, moetrain/parallel/sequence.py) evaluate the same
    batches together; `lead` is the one that reports them (SP rank 0)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, True
    sp = getattr(forward, "sp_size", 1)
    rank = dist.get_rank()
    return rank // sp, dist.get_world_size() // sp, rank % sp == 0


class ModelForward:
    """A moetrain model (`model`, the plain MoETransformer) run through `call` (the model itself,
    or the DeepSpeed engine wrapping it); sequence-parallel when the model is (each rank of the
    group gets its shard of the same padded batch)."""

    def __init__(self, model, call=None, device=None, pad_id: int = 0):
        self.model, self.call = model, call or model
        self.device = torch.device(device) if device is not None else None
        self.pad_id = pad_id

    @property
    def sp_size(self) -> int:
        return self.model.seq_shard.size

    def run(self, input_ids, head, position_ids=None):
        from moetrain.parallel.sequence import shard_batch
        sh = self.model.seq_shard
        B, S = input_ids.shape
        pad = -S % sh.size  # right padding to a multiple of the group: causal, so harmless
        ids = F.pad(input_ids, (0, pad), value=self.pad_id)
        pos = None if position_ids is None else F.pad(position_ids, (0, pad), value=int(position_ids.max()))
        local = shard_batch({"input_ids": ids, "labels": None, "position_ids": pos, "cu_seqlens": None},
                            sh.rank, sh.size)
        start, out = sh.rank * ids.shape[1] // sh.size, {}

        def hook(module, args, kwargs):  # runs inside the LM head's call: ZeRO-3 has gathered the weight
            h = args[0] if args else kwargs.pop("h_Td")
            assert module.weight.numel() > 0, "LM head weight not gathered when the eval head ran"
            out["r"] = head(h, module.weight, start)
            return (h[:, :0],) + tuple(args[1:]), kwargs  # the model's own projection gets no tokens

        def to_dev(t):
            return t if t is None or self.device is None else t.to(self.device)

        handle = self.model.lm_head.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.call(to_dev(local["input_ids"]), position_ids=to_dev(local["position_ids"]))
        finally:
            handle.remove()
        return sh.sum(out["r"]) if sh.size > 1 else out["r"]


class HFForward:
    """A transformers causal LM: its base model gives h, its output embedding is the head."""

    def __init__(self, model):
        self.model = model
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def run(self, input_ids, head, position_ids=None):
        dev = self.model.device
        input_ids = input_ids.to(dev)
        position_ids = None if position_ids is None else position_ids.to(dev)
        with torch.no_grad():
            if self.softcap:  # the head is not a plain projection: hand over its logits
                return head(self.model(input_ids=input_ids, position_ids=position_ids).logits.float(), None, 0)
            h = self.model.get_decoder()(input_ids=input_ids, position_ids=position_ids).last_hidden_state
            return head(h, self.model.get_output_embeddings().weight, 0)


def _tokenizer(folder: str, data_dir: Optional[str], what: str):
    from moetrain.data import load_tokenizer
    for d in (folder, data_dir):
        if d and os.path.isfile(os.path.join(d, "tokenizer.model")):
            return load_tokenizer(d)
    raise ValueError(f"{what} has no tokenizer.model; give --data-dir with a prepared folder")


def _load_hf(path: str, data_dir: Optional[str], device=None, dtype=None) -> EvalModel:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ValueError("evaluating a Hugging Face folder needs transformers (pip install -e '.[dev]')") from None
    model = AutoModelForCausalLM.from_pretrained(path).to(device=device, dtype=dtype or torch.float32).eval()
    forward = HFForward(model)
    tok = _tokenizer(path, data_dir, f"HF folder {path}")
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    return EvalModel(forward, tok, data_dir, max_len, {"kind": "hf", "path": path,
                                                       "architecture": type(model).__name__})


def load_run_model(path: str):
    """(model, cfg, plan, client_state, ckpt_dir) of a run folder or checkpoint: fp32 on CPU,
    eval mode, with the RoPE and attention of the stage the checkpoint was written in
    (moetrain.checkpoint.stage_of), as moetrain.load_model and the export see it."""
    from moetrain import checkpoint as ckpt
    from moetrain.config import config_from_dict
    ckpt_dir = ckpt.resolve_checkpoint(path)
    client = ckpt.read_client_state(ckpt_dir)
    cfg = config_from_dict(client["config"])
    return ckpt.load_model(ckpt_dir), cfg, ckpt.stage_of(cfg, client), client, ckpt_dir


def model_forward(model, sp_size: int = 1) -> ModelForward:
    """The eval forward of a moetrain model; sp_size > 1 (collective: every rank calls it)
    evaluates it sequence-parallel over groups of that many ranks, as it was trained."""
    if sp_size > 1:
        from moetrain.parallel.sequence import apply_sequence_parallel
        apply_sequence_parallel(model, sp_size)
    return ModelForward(model)


def _load_run(path: str, data_dir: Optional[str], device=None, dtype=None) -> EvalModel:
    model, cfg, plan, client, ckpt_dir = load_run_model(path)
    data_dir = data_dir or (plan.data.dir if os.path.isdir(plan.data.dir) else None)
    if data_dir is None:
        raise ValueError(f"the run's data folder '{plan.data.dir}' is not here; give --data-dir")
    model.to(device=device, dtype=dtype or torch.float32)
    # Evaluated as trained: sequence-parallel when the run was and this launch has the ranks for it.
    sp = cfg.deepspeed.sequence_parallel_size
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    use_sp = sp if sp > 1 and world % sp == 0 else 1
    info = {"kind": "moetrain", "path": path, "checkpoint": ckpt_dir, "step": client["step"], "stage": plan.name,
            "rope": dataclasses.asdict(plan.rope), "sequence_parallel_size": use_sp}
    if sp > 1 and use_sp == 1:
        info["note"] = (f"trained with deepspeed.sequence_parallel_size={sp}; evaluated in one piece on "
                        f"{world} process(es) (launch with torchrun --nproc_per_node {sp} for sequence parallelism)")
    fwd = model_forward(model, use_sp)
    fwd.device = torch.device(device) if device is not None else None
    return EvalModel(fwd, _tokenizer(data_dir, None, f"data folder {data_dir}"), data_dir, plan.seq_len, info)


def load_for_eval(path: str, data_dir: Optional[str] = None, device=None, dtype=None) -> EvalModel:
    """A run folder / checkpoints/<tag> (moetrain) or a folder with config.json (transformers),
    on `device` (default CPU) in `dtype` (default float32). Collective for a run trained with
    sequence parallelism when torch.distributed is initialised (every rank calls it)."""
    if not os.path.isdir(path):
        raise ValueError(f"--model {path} is not a folder; give a run dir, a checkpoint or an HF folder")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise ValueError(f"--data-dir {data_dir} is not a folder")
    if os.path.isfile(os.path.join(path, "config.json")):
        return _load_hf(path, data_dir, device, dtype)
    return _load_run(path, data_dir, device, dtype)
