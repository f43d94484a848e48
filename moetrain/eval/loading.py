"""Models to evaluate: a run folder or checkpoint (moetrain) or a Hugging Face folder
(transformers), each as a `forward` plus the tokenizer and the held-out data."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class EvalModel:
    forward: Callable          # (input_ids [B, S], position_ids=None) -> logits [B, S, V] float32
    tokenizer: object          # moetrain.data.Tokenizer
    data_dir: Optional[str]    # prepared folder with the held-out (eval split) documents, or None
    max_len: int               # context the model was trained for (default eval length)
    info: dict = field(default_factory=dict)


def _tokenizer(folder: str, data_dir: Optional[str], what: str):
    from moetrain.data import load_tokenizer
    for d in (folder, data_dir):
        if d and os.path.isfile(os.path.join(d, "tokenizer.model")):
            return load_tokenizer(d)
    raise ValueError(f"{what} has no tokenizer.model; give --data-dir with a prepared folder")


def _load_hf(path: str, data_dir: Optional[str]) -> EvalModel:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ValueError("evaluating a Hugging Face folder needs transformers (pip install -e '.[dev]')") from None
    model = AutoModelForCausalLM.from_pretrained(path).float().eval()

    @torch.no_grad()
    def forward(input_ids, position_ids=None):
        return model(input_ids=input_ids, position_ids=position_ids).logits.float()

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


def model_forward(model):
    """The eval `forward` of a moetrain model."""
    @torch.no_grad()
    def forward(input_ids, position_ids=None):
        return model(input_ids, position_ids=position_ids).logits.float()
    return forward


def _load_run(path: str, data_dir: Optional[str]) -> EvalModel:
    model, cfg, plan, client, ckpt_dir = load_run_model(path)
    data_dir = data_dir or (plan.data.dir if os.path.isdir(plan.data.dir) else None)
    if data_dir is None:
        raise ValueError(f"the run's data folder '{plan.data.dir}' is not here; give --data-dir")
    return EvalModel(model_forward(model), _tokenizer(data_dir, None, f"data folder {data_dir}"), data_dir,
                     plan.seq_len, {"kind": "moetrain", "path": path, "checkpoint": ckpt_dir,
                                    "step": client["step"], "stage": plan.name,
                                    "rope": dataclasses.asdict(plan.rope)})


def load_for_eval(path: str, data_dir: Optional[str] = None) -> EvalModel:
    """A run folder / checkpoints/<tag> (moetrain) or a folder with config.json (transformers)."""
    if not os.path.isdir(path):
        raise ValueError(f"--model {path} is not a folder; give a run dir, a checkpoint or an HF folder")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise ValueError(f"--data-dir {data_dir} is not a folder")
    if os.path.isfile(os.path.join(path, "config.json")):
        return _load_hf(path, data_dir)
    return _load_run(path, data_dir)
