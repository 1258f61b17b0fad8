"""Write samples into rolling WebDataset tar shards, each with its DALI index, sha256 and stats file."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["INDEX_VERSION", "STATS_SUFFIX", "ShardRecord", "ShardWriter", "read_stats", "shard_name"]

INDEX_VERSION = "v1.2"  # the version line DALI's wds2idx writes and fn.readers.webdataset expects
STATS_SUFFIX = "stats.json"  # <prefix>-NNNNNN.stats.json: written last, the shard's "done" marker


def shard_name(prefix: str, number: int, suffix: str) -> str:
    """`<prefix>-NNNNNN.<suffix>`: zero-padded so `<prefix>-{000000..000123}.tar` brace-expands."""
    return f"{prefix}-{number:06d}.{suffix}"


@dataclass(frozen=True)
class ShardRecord:
    """What dataset.json says about one finished shard."""

    tar: str
    index: str
    samples: int
    bytes: int
    sha256: str

    def as_dict(self) -> dict:
        return asdict(self)


class _HashingFile:
    """A write-only file that hashes what passes through, so no second read of the shard is needed."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5()  # for wids' shardindex.json, which names md5sum

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.md5.update(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


class _OpenShard:
    """One tar being written under a temporary name, with its index lines collected alongside."""

    def __init__(self, folder: Path, prefix: str, number: int):
        self.tar_path = folder / shard_name(prefix, number, "tar")
        self.index_path = folder / shard_name(prefix, number, "idx")
        self.file = _HashingFile(_temporary(self.tar_path))
        # USTAR-compatible PAX: ordinary names get plain 512-byte headers, and only names over 100
        # characters get an extended header, which DALI has read since 2022.
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)
        self.index_lines: list[str] = []
        self.keys: list[str] = []

    def size_with(self, members: dict[str, bytes]) -> int:
        """The file size the tar would have if closed after adding `members`.

        Closing adds two zero blocks and pads the archive to a multiple of tarfile.RECORDSIZE.
        """
        end = self.tar.offset + sum(tarfile.BLOCKSIZE + _padded(len(data)) for data in members.values())
        end += 2 * tarfile.BLOCKSIZE
        return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def add_sample(self, key: str, members: dict[str, bytes]) -> None:
        """Append the sample's members contiguously and remember `<ext> <offset> <size> <name>` of each."""
        components = []
        for extension, data in members.items():
            name = f"{key}.{extension}"
            self.tar.addfile(_member_info(name, len(data)), io.BytesIO(data))
            # tar.offset now points past the data and its padding to the next 512-byte block.
            data_offset = self.tar.offset - _padded(len(data))
            components.append(f"{extension} {data_offset} {len(data)} {name}")
        self.index_lines.append(" ".join(components))
        self.keys.append(key)

    def finish(self, stats: dict) -> ShardRecord:
        """Close the tar, write the index, rename both into place (index first), then the stats file."""
        self.tar.close()
        self.file.close()
        index_text = f"{INDEX_VERSION} {len(self.index_lines)}\n" + "".join(
            line + "\n" for line in self.index_lines)
        _temporary(self.index_path).write_text(index_text, encoding="utf-8")
        os.replace(_temporary(self.index_path), self.index_path)
        os.replace(_temporary(self.tar_path), self.tar_path)
        record = ShardRecord(tar=self.tar_path.name, index=self.index_path.name, samples=len(self.index_lines),
                             bytes=self.tar_path.stat().st_size, sha256=self.file.sha256.hexdigest())
        content = dict(record.as_dict(), md5=self.file.md5.hexdigest(), keys=self.keys, **stats)
        stats_path = self.tar_path.with_name(self.tar_path.name.removesuffix(".tar") + "." + STATS_SUFFIX)
        _temporary(stats_path).write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
        os.replace(_temporary(stats_path), stats_path)
        return record

    def abandon(self) -> None:
        """Drop an unfinished shard, so no truncated tar is ever left under a final name."""
        self.file.close()
        _temporary(self.tar_path).unlink(missing_ok=True)


class ShardWriter:
    """Write `<prefix>-NNNNNN.tar` shards plus `.idx` indexes and `.stats.json` files.

    A shard rolls over after `max_samples` samples, or before a sample that would take it past
    `max_bytes` (a single larger sample still gets a shard of its own). `records` may hold shards of an
    earlier, interrupted build that this writer continues. Each stats file records `consumed`, the number
    of the split's manifest samples (stored or rejected) handled up to the end of the shard, and the
    reject lines met since the previous shard, so a resumed build knows where to continue.
    Use as a context manager: a normal exit finishes the last shard, an exception abandons it.
    """

    def __init__(self, folder: Path | str, *, prefix: str, max_samples: int, max_bytes: int | None = None,
                 records: list[ShardRecord] | None = None, consumed: int = 0, extra_stats: dict | None = None):
        if max_samples < 1:
            raise ValueError(f"max_samples is {max_samples}; a shard needs room for at least 1 sample.")
        self.folder = Path(folder)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.records: list[ShardRecord] = list(records or [])
        self.consumed = consumed
        self.pending_rejects: list[dict] = []
        self._extra_stats = dict(extra_stats or {})
        self._shard: _OpenShard | None = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample; `members` maps extensions (`json`, `rgb.webm`, ...) to bytes, in member order."""
        if self._shard is not None and self.max_bytes and self._shard.size_with(members) > self.max_bytes:
            self._finish_shard()
        if self._shard is None:
            self._shard = _OpenShard(self.folder, self.prefix, len(self.records))
        self._shard.add_sample(key, members)
        self.consumed += 1
        if len(self._shard.index_lines) >= self.max_samples:
            self._finish_shard()

    def reject(self, line: dict) -> None:
        """Count a rejected manifest sample; its line goes into the next finished shard's stats."""
        self.pending_rejects.append(line)
        self.consumed += 1

    def close(self) -> list[ShardRecord]:
        """Finish the open shard, if any; return the records of all shards written."""
        self._finish_shard()
        return self.records

    def _finish_shard(self) -> None:
        if self._shard is not None:
            # A shard finished before the sample that overflows it has consumed everything before that sample.
            stats = dict(self._extra_stats, consumed=self.consumed, rejects=self.pending_rejects)
            self.records.append(self._shard.finish(stats))
            self.pending_rejects = []
            self._shard = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        elif self._shard is not None:
            self._shard.abandon()
            self._shard = None


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    """A regular-file header with fixed metadata, so identical samples give identical shards."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def read_stats(folder: Path, prefix: str, number: int) -> dict | None:
    """A finished shard's stats, or None when the shard was not finished."""
    path = Path(folder) / shard_name(prefix, number, STATS_SUFFIX)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
