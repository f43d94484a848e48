"""Long-context evaluation: passkey retrieval on a (length x depth) grid, loss by
position on held-out documents, eval.json and PNG plots (also to W&B).

    evaluate_stage(forward, cfg, plan, out_dir, write, wandb_run)  stage ends (train loop)
    evaluate(forward, tokenizer, data_dir, lengths, eval_cfg)       any model (scripts/eval_long.py)
    load_for_eval(path, data_dir=None, device=None, dtype=None)     run dir / checkpoint / HF folder

An eval forward runs the model to its hidden states and applies a metric's head to them
(moetrain/eval/loading.py: ModelForward, HFForward, run_head); a plain callable
`forward(input_ids, position_ids=None) -> logits [B, S, V]` also works (it materialises them).
"""
from moetrain.eval.long_context import evaluate, evaluate_stage, flat_metrics, write_result
from moetrain.eval.passkey import passkey_grid, score_batch
from moetrain.eval.position_loss import loss_by_position

__all__ = ["evaluate", "evaluate_stage", "flat_metrics", "write_result", "passkey_grid", "score_batch",
           "loss_by_position", "load_for_eval"]


def load_for_eval(path: str, data_dir=None, device=None, dtype=None):
    """(forward, tokenizer, data_dir, info) for a run dir, checkpoint or HF folder; see loading.py."""
    from moetrain.eval.loading import load_for_eval as _load
    return _load(path, data_dir, device, dtype)
