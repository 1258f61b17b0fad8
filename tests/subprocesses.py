"""What tests need to start `cotrain` and `deepspeed` in child processes."""
import os
import sys
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
DIST_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def clean_env(**extra: str) -> dict:
    """This process's environment without the distributed variables an in-process run set (a child would
    otherwise join this process's world), with the virtual environment's commands first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    env.update(extra)
    return env
