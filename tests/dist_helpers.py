"""Process-group plumbing shared by the multi-process test workers (CPU, gloo, spawned).

On sys.path through tests/conftest.py's folder; spawned children inherit the parent's path."""
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    os.environ["MASTER_PORT"] = str(free_port())  # children inherit the environment
    torch.multiprocessing.spawn(fn, args=(world, *args), nprocs=world, join=True)


def init(rank: int, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
