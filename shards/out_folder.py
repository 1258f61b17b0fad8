"""What `shards build` may do to its --out folder: it builds only into an empty folder or over an earlier
build of the same inputs (else --overwrite), never reads its inputs from there, and deletes only its own files.

Protects: a folder of other files (a manifest named rejects.jsonl was truncated, shard-named files were
replaced), and a finished build of other inputs silently replaced by this one.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from shards.manifest import Manifest

__all__ = ["OUTPUT_NAMES", "SHARD_FILE_PATTERN", "OutFolderError", "is_build_output", "check_out_folder"]

SHARD_FILE_PATTERN = re.compile(r"[A-Za-z0-9_-]+-\d{6}\.(tar|idx|stats\.json)(\.tmp)?")
OUTPUT_NAMES = ("dataset.json", "shardindex.json", "rejects.jsonl", "tokenizer.json")


class OutFolderError(ValueError):
    """An --out folder the build must not write into as asked; the message names the fix."""


def is_build_output(name: str) -> bool:
    """Whether a file name is one a build writes (shards, indexes, stats, descriptions, and their .tmp)."""
    return SHARD_FILE_PATTERN.fullmatch(name) is not None or name.removesuffix(".tmp") in OUTPUT_NAMES


def _inside(path: Path, folder: Path) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def _check_inputs_outside(out: Path, manifest: Manifest) -> None:
    if _inside(manifest.path, out):
        raise OutFolderError(f"the manifest {manifest.path} lies inside --out {out}, where the build writes "
                             f"(and may replace) files; move it, or build into another folder")
    for sample in manifest.samples:
        for name, value in sample.values.items():
            source = getattr(value, "path", value)
            if isinstance(source, Path) and _inside(source, out):
                raise OutFolderError(f"line {sample.line}: {name} {source} lies inside --out {out}; keep the "
                                     f"inputs out of the shard folder, or build into another folder")


def _other_builds(out: Path, fingerprint: str) -> list[str]:
    """Stats files of finished shards that an earlier build with other inputs or options wrote."""
    import json

    found = []
    for path in sorted(out.glob("*.stats.json")):
        try:
            build = json.loads(path.read_text(encoding="utf-8")).get("build")
        except (OSError, ValueError, AttributeError):
            build = None
        if build != fingerprint:
            found.append(path.name)
    return found


def check_out_folder(out: Path, manifest: Manifest, *, fingerprint: str, overwrite: bool,
                     resume: bool = False) -> None:
    """Raise unless `out` may take this build: empty, missing, or an earlier build of the same inputs and
    options (`resume`: of any inputs, whose shards it then replaces); `overwrite` allows any folder (its
    other files are kept, earlier build outputs replaced)."""
    out = Path(out)
    _check_inputs_outside(out, manifest)
    if overwrite or not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not is_build_output(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutFolderError(f"--out {out} is not empty and not a shard build ({shown}); build into an empty "
                             f"folder, or pass --overwrite to build there anyway (those files are kept)")
    other = [] if resume else _other_builds(out, fingerprint)
    if other:
        raise OutFolderError(f"--out {out} holds a build of other inputs or options ({other[0]}, ...); build "
                             f"into another folder, or pass --overwrite to replace that build")
