"""DeepSpeed set-up: distributed init that works with and without the `deepspeed` launcher."""
from __future__ import annotations

import os
import socket

import torch

__all__ = ["free_port", "init_distributed", "rank_info", "build_engine"]


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the process group the launcher describes, or make a world of one.

    Without the launcher's variables DeepSpeed would try MPI discovery; a single process
    gets RANK=0, WORLD_SIZE=1 and a free loopback port instead.
    """
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if os.environ.get("WORLD_SIZE") == "1":
        _skip_shm_comm_op()
    deepspeed.init_distributed(verbose=False)


def _skip_shm_comm_op() -> None:
    """A world of one has nothing to all-reduce, so keep DeepSpeed's CPU backend from JIT-compiling its
    shared-memory comm op: that is minutes of C++ on a small CPU machine, repeated whenever the op cache was
    built by another environment (we measured a 1-epoch run taking 10 minutes waiting on it)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def rank_info() -> tuple[int, int, int]:
    """(rank, local rank, world size) of this process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
    return 0, 0, 1


def build_engine(model: torch.nn.Module, ds_config: dict):
    """deepspeed.initialize with the optimizer and scheduler the config names."""
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine, scheduler
