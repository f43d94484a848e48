"""Parallelism applied to the plain model from outside: ParallelDims (how ranks
are split), parallelize (expert parallelism, balancing, ZeRO-3 leaves), and
the DeepSpeed engine (moetrain.parallel.engine)."""
from moetrain.parallel.dims import ParallelDims, barrier
from moetrain.parallel.parallelize import Parallelism, parallelize

__all__ = ["ParallelDims", "Parallelism", "barrier", "parallelize"]
