"""Where tensors live on a GPU machine, decided in one place.

- collectives: NCCL (DeepSpeed's backend on GPUs) takes CUDA tensors only, gloo takes CPU tensors; every
  collective of the training loop goes through `all_reduce_flags` / `broadcast_object`, which put their
  tensors on `collective_device()`.
- compute dtype: the engine's (bf16 on GPU), which every copy of the model and every input must share.
- loaders: a GPU decodes (`loader_device_id`); host batches reach it from pinned memory (pipeline.batch.to_device).
- set-up: `check_torch_sees_gpu` refuses to train on the CPU when `nvidia-smi` sees a GPU that torch cannot use.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import torch

__all__ = ["collective_device", "all_reduce_flags", "broadcast_object", "compute_dtype", "loader_device_id",
           "nvidia_smi_gpus", "check_torch_sees_gpu", "force_cpu", "DEVICES", "GpuUnusableError"]

DEVICES = ("auto", "cpu")
"""`cotrain train --device`: auto uses the GPU when there is one (and refuses a GPU torch cannot use); cpu
trains on the CPU on purpose."""


def collective_device() -> torch.device:
    """The device a collective's tensors must live on: this rank's GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    backend = str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else "gloo"
    # a mixed backend ("cpu:gloo,cuda:nccl") sends CUDA tensors to NCCL: put them on the GPU too
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_flags(flags: list) -> list[bool]:
    """Each flag (a bool, or a 0-d tensor on any device) OR-ed over every rank: one small all-reduce and one
    read back, however many flags."""
    import torch.distributed as dist

    device = collective_device()
    values = torch.stack([torch.as_tensor(f).float().reshape(()).to(device) for f in flags])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return [v > 0 for v in values.tolist()]


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (pickled through a tensor on the collective device)."""
    import torch.distributed as dist

    box = [obj]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=src, device=collective_device())
    return box[0]


def compute_dtype(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed keeps the model's weights in for this config (bf16 or fp32)."""
    return torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32


def loader_device_id(local_rank: int = 0) -> int | None:
    """The GPU a loader decodes on (this rank's), or None on a machine without a usable GPU."""
    return local_rank if torch.cuda.is_available() else None


class GpuUnusableError(RuntimeError):
    """nvidia-smi sees a GPU, torch cannot use it: training would silently run on the CPU."""


def nvidia_smi_gpus() -> list[dict[str, str]]:
    """[{name, driver}] for each GPU `nvidia-smi` lists; [] without nvidia-smi or when it fails."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        name, _, driver = line.rpartition(",")
        if name.strip():
            gpus.append({"name": name.strip(), "driver": driver.strip()})
    return gpus


def check_torch_sees_gpu(device: str = "auto") -> None:
    """Refuse (GpuUnusableError) when nvidia-smi lists a GPU that torch cannot use and the CPU was not asked
    for: the torch build needs a newer driver, or is a CPU build."""
    if device not in DEVICES:
        raise ValueError(f"--device {device!r} is unknown; use one of {', '.join(DEVICES)}")
    if device == "cpu" or torch.cuda.is_available():
        return
    gpus = nvidia_smi_gpus()
    if not gpus:
        return
    built = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    raise GpuUnusableError(
        f"nvidia-smi sees {len(gpus)} GPU(s) ({gpus[0]['name']}, driver {gpus[0]['driver']}) but torch "
        f"{torch.__version__} is {built} and cannot use them, so training would run on the CPU. Fix: `make setup` "
        "in a fresh clone (or `python3 ops/setup_torch.py --explain`) installs the torch build this driver runs; "
        "CUDA 13 builds need driver >= 580. Pass --device cpu to train on the CPU on purpose.")


def force_cpu() -> None:
    """Hide every GPU from this process (before CUDA is first touched), so torch and DeepSpeed use the CPU."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
