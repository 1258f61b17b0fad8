"""Guards around a run folder: no run trains over another, and a resume continues the same run on the same data.

What each guard protects (docs: README "Run folders and resume"):
- `check_new_run`: `train --out RUN` never mixes two runs' files (an old eval-*.json beside a new model.pt
  would report the old model's scores); `--overwrite` first clears every file a run writes.
- `check_resumable`: `--resume` of a finished run changes nothing; of a run without a checkpoint it refuses,
  since it would retrain from scratch over the folder (unless `--restart`).
- `check_same_shards`: a resume reads the shards it started on (same dataset.json content), or the data
  position and the val scores would silently mean another corpus (unless `--allow-new-shards`).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .checkpoint import CHECKPOINT_DIR, latest_tag
from .evaluate import BEST_DIR, MODEL_FILE
from .metrics import TARGETS_DIR

__all__ = ["RunFolderError", "RUN_FILES", "run_files", "check_new_run", "clear_run", "check_resumable",
           "shards_fingerprint", "record_shards", "check_same_shards", "SHARDS_RECORD"]

SHARDS_RECORD = "shards.json"
# What `cotrain train` and `cotrain eval` write into RUN (glob patterns); nothing else is ever removed.
RUN_FILES = ("config.json", MODEL_FILE, "history.json", "eval-*.json", "predictions-*.jsonl", "params-rank*.sha256",
             SHARDS_RECORD, BEST_DIR, "plots", CHECKPOINT_DIR, TARGETS_DIR)


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names the folder and the fix."""


def run_files(run: Path) -> list[Path]:
    """The files and folders of an earlier run in `run`, sorted."""
    run = Path(run)
    return sorted({path for pattern in RUN_FILES for path in run.glob(pattern)})


def check_new_run(run: Path, *, overwrite: bool) -> None:
    """Refuse a folder that holds a run, unless `overwrite`, which clears that run's files first."""
    found = run_files(run)
    if not found:
        return
    if not overwrite:
        names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
        raise RunFolderError(f"--out {run} already holds a run ({names}); pick a new --out, continue it with "
                             f"`cotrain train --resume {run}`, or pass --overwrite to delete that run's files first")
    clear_run(run)


def clear_run(run: Path) -> None:
    """Delete what a run writes, and nothing else (several ranks may do this at once, hence the tolerance)."""
    for path in run_files(run):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_resumable(run: Path, *, restart: bool) -> None:
    """Refuse to resume a finished run (it says so) or one without a checkpoint (unless `restart`)."""
    run = Path(run)
    if (run / MODEL_FILE).is_file():
        raise RunFinished(f"{run} is finished ({run / MODEL_FILE} is written): nothing to resume. Evaluate it with "
                          f"`cotrain eval --run {run}`, or train longer in a new folder with --out")
    if latest_tag(run) is None and not restart:
        raise RunFolderError(f"{run} has no checkpoint in {run / CHECKPOINT_DIR}, so --resume would train it again "
                             f"from scratch; pass --restart to do that (its earlier files are deleted), or use "
                             f"--save-every N next time so an interrupted run can continue")


class RunFinished(RunFolderError):
    """--resume of a run that already ended: not an error, nothing to do."""


def shards_fingerprint(shards: str | Path) -> str:
    """A hash of a shard directory's dataset.json: its modalities, label, splits and every shard's sha256."""
    description = json.loads((Path(shards) / "dataset.json").read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def record_shards(run: Path, shards: str | Path) -> None:
    """RUN/shards.json: which build this run trains on, for the resume check."""
    content = {"shards": str(shards), "fingerprint": shards_fingerprint(shards)}
    (Path(run) / SHARDS_RECORD).write_text(json.dumps(content, indent=2) + "\n")


def check_same_shards(run: Path, shards: str | Path, *, allow_new: bool) -> None:
    """Refuse to resume on shards other than the recorded ones, unless `allow_new`."""
    record_path = Path(run) / SHARDS_RECORD
    if allow_new or not record_path.is_file():
        return
    record = json.loads(record_path.read_text())
    if not (Path(shards) / "dataset.json").is_file():
        raise RunFolderError(f"--shards {shards} has no dataset.json; point --shards at the build {run} trained on "
                             f"({record['shards']})")
    now = shards_fingerprint(shards)
    if now != record["fingerprint"]:
        raise RunFolderError(f"{run} trained on {record['shards']} (fingerprint {record['fingerprint']}), but "
                             f"{shards} holds another build (fingerprint {now}: other samples, options or seed); "
                             f"resume on the same shards, or pass --allow-new-shards to continue on these")
