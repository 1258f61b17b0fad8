"""Which torch, torchvision and DALI builds this machine's NVIDIA driver can run; `make setup` asks it before installing.

    python3 ops/setup_torch.py --pip torch     # pip arguments for torch and the torchvision built against it,
                                               # e.g. torch==2.14.1 torchvision==0.29.1 --index-url .../cu128
    python3 ops/setup_torch.py --pip dali      # the DALI package, e.g. nvidia-dali-cuda120==2.4.0
    python3 ops/setup_torch.py --explain       # what was found and why this choice

The choice follows the CUDA version the driver supports (the "CUDA Version" in `nvidia-smi`'s header):
  no NVIDIA GPU       torch from the package index as it stands (the CPU build on our machines), DALI for CUDA 12
  CUDA >= 13.0        torch from the package index (a CUDA 13.0 build: driver >= 580), nvidia-dali-cuda130
  CUDA 12.8 to 12.x   torch from PyTorch's cu128 index, nvidia-dali-cuda120
  CUDA 12.0 to 12.7   torch from PyTorch's cu126 index (CUDA minor-version compatibility), nvidia-dali-cuda120
  CUDA < 12           refused: update the driver, or choose the CPU with COTRAIN_CUDA=cpu
torchvision (the video backbones, model/backbones.py) is always installed with torch, from the same index: its
compiled operators load only beside the torch build they were compiled against (torchvision 0.28's CUDA wheel next to
torch 2.13.0+cpu fails at import with "operator torchvision::nms does not exist"). torch 2.14.1 is the CUDA 13.0 build
on the package index; on a machine without a GPU it runs on the CPU.
COTRAIN_CUDA=cpu|12.6|12.8|13.0 overrides what nvidia-smi says. Standard library only: it runs before the
virtual environment has anything in it.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

TORCH_VERSION = "2.14.1"
# the torchvision release built against TORCH_VERSION (torchvision 0.N pairs with torch 2.(N-15))
TORCHVISION_VERSION = "0.29.1"
DALI_VERSION = "2.4.0"
PYTORCH_INDEX = "https://download.pytorch.org/whl"
# PyTorch's CUDA 12 wheel indexes, newest first: (lowest driver CUDA version it is chosen for, index name)
CUDA12_INDEXES = (((12, 8), "cu128"), ((12, 0), "cu126"))


class DriverTooOld(RuntimeError):
    """The driver supports no CUDA version any build of TORCH_VERSION runs on."""


@dataclass(frozen=True)
class Driver:
    version: str
    cuda: tuple[int, int]


@dataclass(frozen=True)
class Choice:
    torch: list[str]
    """pip arguments that install torch and its torchvision"""
    dali: str
    reason: str


def parse_nvidia_smi(text: str) -> Driver | None:
    """The driver version and its CUDA version from `nvidia-smi`'s header; None when it names no driver."""
    driver = re.search(r"Driver Version:\s*([\d.]+)", text)
    cuda = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    if not driver or not cuda:
        return None
    return Driver(driver.group(1), (int(cuda.group(1)), int(cuda.group(2))))


def read_driver() -> Driver | None:
    """This machine's driver, from COTRAIN_CUDA when set, else from `nvidia-smi` (None: no NVIDIA GPU)."""
    override = os.environ.get("COTRAIN_CUDA", "").strip()
    if override:
        if override == "cpu":
            return None
        match = re.fullmatch(r"(\d+)\.(\d+)", override)
        if not match:
            raise ValueError(f"COTRAIN_CUDA={override!r} is not a CUDA version; use cpu, 12.6, 12.8 or 13.0")
        return Driver("(COTRAIN_CUDA)", (int(match.group(1)), int(match.group(2))))
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(out)


def choose(driver: Driver | None) -> Choice:
    """The torch and DALI builds for `driver`."""
    torch = [f"torch=={TORCH_VERSION}", f"torchvision=={TORCHVISION_VERSION}"]
    if driver is None:
        return Choice(torch, f"nvidia-dali-cuda120=={DALI_VERSION}",
                      "no NVIDIA GPU (no nvidia-smi, or it lists none): torch as the package index has it")
    cuda = "%d.%d" % driver.cuda
    if driver.cuda >= (13, 0):
        return Choice(torch, f"nvidia-dali-cuda130=={DALI_VERSION}",
                      f"driver {driver.version} runs CUDA {cuda}: the package index's CUDA 13.0 build")
    for lowest, index in CUDA12_INDEXES:
        if driver.cuda >= lowest:
            return Choice([*torch, "--index-url", f"{PYTORCH_INDEX}/{index}"], f"nvidia-dali-cuda120=={DALI_VERSION}",
                          f"driver {driver.version} runs CUDA {cuda}, not 13.0 (driver >= 580): PyTorch's {index} build")
    raise DriverTooOld(f"driver {driver.version} runs CUDA {cuda}; torch {TORCH_VERSION} needs CUDA 12.0 or newer "
                       "(driver >= 525.60.13). Update the NVIDIA driver, or set COTRAIN_CUDA=cpu to install the "
                       "CPU build")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--pip", choices=["torch", "dali"], help="Print the pip arguments for torch (with torchvision) or DALI.")
    group.add_argument("--explain", action="store_true", help="Print what was found and the choice.")
    args = parser.parse_args(argv)
    try:
        choice = choose(read_driver())
    except (DriverTooOld, ValueError) as err:
        print(f"ops/setup_torch.py: {err}", file=sys.stderr)
        return 2
    if args.pip == "torch":
        print(" ".join(choice.torch))
    elif args.pip == "dali":
        print(choice.dali)
    else:
        print(f"{choice.reason}\n  pip install {' '.join(choice.torch)}\n  pip install {choice.dali}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
