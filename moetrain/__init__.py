"""moetrain: long-context Mixture-of-Experts training on DeepSpeed."""
__version__ = "0.1.0"


def load_model(path: str):
    """A run folder (newest complete checkpoint) or one checkpoint, consolidated
    into one fp32 model on CPU in eval mode."""
    from moetrain.checkpoint import load_model as _load
    return _load(path)
