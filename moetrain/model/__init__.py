"""Plain-PyTorch model code (no distributed imports)."""
from moetrain.config import ModelConfig
from moetrain.model.transformer import ModelOutput, MoETransformer


def build_model(cfg: ModelConfig) -> MoETransformer:
    """The MoE Transformer described by `cfg` (fp32, CPU, freshly initialised)."""
    return MoETransformer(cfg)


__all__ = ["build_model", "MoETransformer", "ModelOutput"]
