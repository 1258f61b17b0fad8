"""Resumable checkpoints: DeepSpeed's state plus what DeepSpeed does not keep per rank.

Layout of RUN/checkpoints/:

    step-00000120/          DeepSpeed's files (weights, optimizer and scheduler, per ZeRO partition)
        rank-0.pt ...       per rank: loader position, RNG states, trainer counters (DeepSpeed's
                            client_state is written by one rank only, so per-rank state needs its own files)
        meta.json           written last, by rank 0 after every rank is done: the "complete" marker
    latest                  the tag of the newest complete checkpoint, replaced atomically

A checkpoint directory without meta.json is an interrupted save: it is never loaded and is
removed by the next successful save.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

__all__ = ["CHECKPOINT_DIR", "FORMAT_VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "latest_tag", "rng_state", "restore_rng"]

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed as asked; the message says why and what to do."""


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def latest_tag(run: Path) -> str | None:
    path = Path(run) / CHECKPOINT_DIR / "latest"
    return path.read_text().strip() if path.is_file() else None


def _complete_tags(root: Path) -> list[str]:
    """Tags with meta.json, oldest first (tags are zero-padded step numbers)."""
    return sorted(p.name for p in root.glob("step-*") if (p / "meta.json").is_file())


def _prune(root: Path, keep: int) -> None:
    complete = _complete_tags(root)
    doomed = complete[:-keep] + [p.name for p in root.glob("step-*") if p.name not in complete]
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)


def save_checkpoint(engine, run: Path, *, step: int, rank: int, world_size: int, config_hash: str,
                    rank_state: dict, keep: int, config: dict | None = None) -> str:
    """Every rank calls this at the same step. Returns the tag; `latest` moves only once it is complete."""
    root = Path(run) / CHECKPOINT_DIR
    tag = f"step-{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    _atomic_write(root / tag / f"rank-{rank}.pt", _to_bytes(dict(rank_state, rng=rng_state())))
    _barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if rank == 0:
        meta = {"format": FORMAT_VERSION, "step": step, "world_size": world_size, "config_hash": config_hash,
                "config": config}
        _atomic_write(root / tag / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
        _atomic_write(root / "latest", (tag + "\n").encode())
        _prune(root, keep)
    _barrier()
    return tag


def _to_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _check_meta(meta: dict, where: Path, *, world_size: int, config_hash: str, allow_reshard: bool,
                config: dict | None = None) -> bool:
    """Whether the per-rank data positions can be restored; raise where resuming would be wrong."""
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{where} has checkpoint format {meta.get('format')}, this cotrain reads "
                              f"{FORMAT_VERSION}; resume it with the cotrain version that wrote it")
    same_world, same_config = meta["world_size"] == world_size, meta["config_hash"] == config_hash
    if same_world and same_config:
        return True
    what = (f"world size {meta['world_size']} -> {world_size}" if not same_world else
            _config_changes(meta, config_hash, config))
    if not allow_reshard:
        raise CheckpointError(f"{where} was saved with a different setup ({what}); resume with the same number "
                              "of ranks and config (undo those changes in --set or the run's config.json), or "
                              "pass --allow-reshard to restart the data position at the checkpoint's epoch")
    print(f"warning: resuming {where} with {what}: --allow-reshard restarts the data position", flush=True)
    return False


def _config_changes(meta: dict, config_hash: str, config: dict | None) -> str:
    """The config keys that differ from the checkpoint's ("key: old -> new"), or the two hashes when the
    checkpoint predates saving its config."""
    from .config import config_differences

    if meta.get("config") is None or config is None:
        return f"config hash {meta['config_hash']} -> {config_hash}"
    return "config changed: " + "; ".join(config_differences(meta["config"], config))


def load_checkpoint(engine, run: Path, *, rank: int, world_size: int, config_hash: str,
                    allow_reshard: bool = False, config: dict | None = None) -> tuple[dict, bool] | None:
    """(this rank's saved state, whether its data position is valid here), or None when RUN has no
    complete checkpoint. Restores weights, optimizer, scheduler and this rank's RNG states."""
    root = Path(run) / CHECKPOINT_DIR
    tag = latest_tag(run)
    if tag is None:
        return None
    where = root / tag
    meta_path = where / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{where} is incomplete (no meta.json) although `latest` names it; "
                              f"point {root / 'latest'} at an older complete checkpoint: {_complete_tags(root)}")
    exact = _check_meta(json.loads(meta_path.read_text()), where, world_size=world_size, config_hash=config_hash,
                        allow_reshard=allow_reshard, config=config)
    path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {where}; its files may be damaged")
    rank_file = where / f"rank-{rank if exact else 0}.pt"
    state = torch.load(rank_file, map_location="cpu", weights_only=False)
    if exact:
        restore_rng(state["rng"])
    return state, exact
