"""DeepSpeed set-up: distributed init that works with and without the `deepspeed` launcher."""
from __future__ import annotations

import os
import socket

import torch

from .quiet import silence_deepspeed_noise
from .rendezvous import init_loopback_group, is_loopback_master

__all__ = ["free_port", "init_distributed", "rank_info", "build_engine", "cpu_threads_per_rank",
           "set_cpu_threads"]


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cpu_threads: int = 0) -> None:
    """Join the process group the launcher describes, or make a world of one, and give this rank its share
    of the CPU threads (set_cpu_threads; `cpu_threads` > 0 overrides it).

    Without the launcher's variables DeepSpeed would try MPI discovery; a single process
    gets RANK=0, WORLD_SIZE=1 and a free loopback port instead.
    """
    silence_deepspeed_noise()
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # a second run in this process (a notebook, the test suite) joins the same group, and still gets its
        # own thread count: it had kept the first run's, so a run asking for 1 thread summed with 2
        set_cpu_threads(cpu_threads)
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    set_cpu_threads(cpu_threads)
    if torch.cuda.is_available():
        # NCCL binds a communicator to the current device at its first collective: each rank must be on its
        # own GPU before that, or every rank of a node talks through GPU 0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        _skip_shm_all_reduce()
    if is_loopback_master():  # one node: no socket of the run may listen beyond this machine
        from deepspeed.constants import default_pg_timeout
        init_loopback_group(default_pg_timeout)
    deepspeed.init_distributed(verbose=False)


def _skip_shm_all_reduce() -> None:
    """Keep DeepSpeed's CPU backend from building its shared-memory all-reduce op.

    Training never uses it (only DeepSpeed's inference_all_reduce does; gradients go through gloo), yet
    init_distributed compiles it with g++ whenever the cached build came from another path to DeepSpeed
    (minutes, 1.5 GB per compiler), and every rank then creates a 66 MB /dev/shm/deepspeed_allreduce_buffer_*
    file that it never unlinks: on a machine running many short jobs, RAM filled up with them (20 GB)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def cpu_threads_per_rank(requested: int = 0) -> int:
    """torch intra-op threads for this rank on CPU: `requested` when > 0, else OMP_NUM_THREADS when the user
    set it, else this process's cores divided among the ranks on this node (LOCAL_SIZE, set by the launcher).

    torch's default is every core in every rank: two ranks on two cores then run four compute threads plus
    their loaders' threads, and the oversubscribed threads spin-wait on each other."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, cores // max(local_ranks, 1))


def set_cpu_threads(requested: int = 0) -> int:
    """Apply cpu_threads_per_rank to torch (CPU runs only: on a GPU the threads barely matter); returns it."""
    threads = cpu_threads_per_rank(requested)
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
    return threads


def rank_info() -> tuple[int, int, int]:
    """(rank, local rank, world size) of this process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
    return 0, 0, 1


def build_engine(model: torch.nn.Module, ds_config: dict, param_groups: list[dict] | None = None):
    """deepspeed.initialize with the optimizer and scheduler the config names; `param_groups` (each with its own
    "lr", ops/finetune.py) keep their rates relative to each other through the schedule."""
    import deepspeed

    ds_config = dict(ds_config)
    branch_clip = ds_config.pop("branch_clipping", 0.0)
    if branch_clip > 0:
        optimizer = _branch_clipped_optimizer(model, ds_config, branch_clip, param_groups)
        engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    else:
        parameters = param_groups if param_groups is not None else model.parameters()
        engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=parameters, config=ds_config)
    if rank_info()[2] == 1 and ds_config["zero_optimization"]["stage"] == 0 and not ds_config["bf16"]["enabled"]:
        # one process, no ZeRO optimizer: the gradient "all-reduce" over one rank only flattens and copies every
        # gradient back (5 ms of a 77 ms CPU step, bench/loop_overhead.py); the result is the same without it
        engine.enable_backward_allreduce = False
    return engine, scheduler


def _branch_clipped_optimizer(model: torch.nn.Module, ds_config: dict, max_norm: float,
                              param_groups: list[dict] | None):
    """The config's AdamW as a BranchClippedAdamW with each group (the fine-tuning groups, else the whole model) split
    by branch, handed to DeepSpeed as the client optimizer (the config's "optimizer" section is taken out: DeepSpeed
    would otherwise build its own)."""
    from .optimizer import BranchClippedAdamW, branch_groups

    params = dict(ds_config.pop("optimizer")["params"])
    params.pop("torch_adam", None)
    params["betas"] = tuple(params["betas"])
    # ZeRO 1-3 and DeepSpeed's bf16 optimizer give each rank a flat slice of every group
    partitioned = ds_config["zero_optimization"]["stage"] > 0 or ds_config["bf16"]["enabled"]
    # a subclass of torch's AdamW is not on ZeRO's list of tested optimizers, though it steps the same way
    ds_config["zero_allow_untested_optimizer"] = True
    return BranchClippedAdamW(branch_groups(model, param_groups), max_norm=max_norm, partitioned=partitioned,
                              **params)
