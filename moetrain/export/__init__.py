"""Hugging Face export (Mixtral / Qwen2-MoE / Qwen3-MoE), verification, and import for warm starts.

    export_checkpoint(run_or_ckpt, out_dir, dtype=, shard_size=, verify=, allow_approx=, verify_engine="vllm")
    (reading checkpoints: moetrain.checkpoint.load_model(path) / read_state_dict(ckpt_dir))
    import_hf(hf_dir) -> (model, ModelConfig); hf_model_config(hf_dir); init_from(model, path) (warm starts)
"""
from moetrain.export.engine_check import EngineFailed
from moetrain.export.exporter import VerificationFailed, export_checkpoint, export_model
from moetrain.export.importer import hf_model_config, import_hf, init_from
from moetrain.export.targets import ExportError

__all__ = ["EngineFailed", "ExportError", "VerificationFailed", "export_checkpoint", "export_model", "hf_model_config", "import_hf",
           "init_from"]
