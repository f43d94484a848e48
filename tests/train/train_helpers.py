"""Shared helpers for the training tests (a uniquely named module: `conftest` would clash)."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_overrides(data_dir: str, steps: int = 20, **extra) -> list[str]:
    """--set overrides for a fast tiny run on the prepared corpus."""
    ov = {
        "model.vocab_size": 512, "model.hidden_size": 64, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.intermediate_size": 128, "model.moe.n_experts": 4, "model.moe.top_k": 2,
        "model.moe.intermediate_size": 64, "model.moe.first_k_dense": 0,
        "model.attention.layer_types": "[sliding, full]", "model.attention.window": 32,
        "data.dir": data_dir, "data.recipe": "null",
        "stages": f"[{{name: main, seq_len: 64, steps: {steps}}}]",
        "train.micro_batch_size": 4, "train.eval_batches": 2,
        "optim.warmup_steps": 5, "optim.lr": 3e-3,
        "logging.every_steps": 1, "logging.console": "plain", "logging.wandb.mode": "disabled",
        "checkpoint.every_steps": 10, "eval.enabled": "false",
        # configs/default.yaml is the demo (passkey rows, export at the end); a test opts in
        "data.synthetic": "{}", "export.enabled": "false", "eval.lengths": "[]", "guards.spike_threshold": 2.0,
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]
