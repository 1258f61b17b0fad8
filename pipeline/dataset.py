"""The shard directory as the loader sees it: `dataset.json` read once, shard locations resolved.

A root is a local directory, an `http(s)://` or an `s3://bucket/prefix` prefix; a split's shards may be
redirected to any brace-expanded list of URLs webdataset opens (`file`, `https://`, `pipe:cmd`) or to
`s3://bucket/train-{000000..000127}.tar` (read by pipeline/s3.py).
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field, replace
from pathlib import Path

import braceexpand

__all__ = ["DatasetInfo", "ShardRef", "load_dataset_info", "expand_urls", "is_local"]

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://")


def is_local(url: str) -> bool:
    return not url.startswith(REMOTE_PREFIXES)


def expand_urls(pattern: str) -> list[str]:
    """`a-{000000..000002}.tar` -> three URLs; several patterns may be joined by `::` (webdataset's separator)."""
    return [url for part in pattern.split("::") for url in braceexpand.braceexpand(part)]


def _join(root: str, name: str) -> str:
    return str(Path(root) / name) if is_local(root) else posixpath.join(root.rstrip("/"), name)


@dataclass(frozen=True)
class ShardRef:
    """One shard: where its tar is, where its DALI index is (None when only streaming is possible), its size."""

    url: str
    index: str | None
    samples: int

    @property
    def random_access(self) -> bool:
        """Samples can be read by offset (a local tar with a local index), not only by streaming."""
        return is_local(self.url) and self.index is not None and Path(self.index).is_file()


@dataclass(frozen=True)
class DatasetInfo:
    """What `cotrain shards build` wrote: modalities, label, and shards per split."""

    root: Path | str
    modalities: dict[str, dict]
    num_classes: int
    splits: dict[str, dict]
    label: dict = field(default_factory=lambda: {"type": "class"})
    overrides: dict = field(default_factory=dict)

    def shards(self, split: str) -> list[ShardRef]:
        """The split's shards in stored order (or in the order of its override URLs)."""
        self._check_split(split)
        stored = self.splits[split]["shards"]
        if split in self.overrides:
            return self.overrides[split]
        root = str(self.root)
        return [ShardRef(_join(root, s["tar"]), _join(root, s["index"]) if s.get("index") else None,
                         int(s["samples"])) for s in stored]

    def with_shard_urls(self, split: str, pattern: str) -> "DatasetInfo":
        """Read `split` from other URLs (brace patterns expand); each URL's file name must be one of the
        split's shards in dataset.json, whose sample count it takes."""
        self._check_split(split)
        counts = {s["tar"]: int(s["samples"]) for s in self.splits[split]["shards"]}
        refs = []
        for url in expand_urls(pattern):
            name = posixpath.basename(url.split()[-2] if url.startswith("pipe:") and url.endswith(" -") else url)
            if name not in counts:
                raise ValueError(f"shard URL {url!r} names {name!r}, which is not a {split} shard in dataset.json "
                                 f"(it has {', '.join(sorted(counts))}); the shard file names must be kept")
            local_index = str(Path(url).with_suffix(".idx")) if is_local(url) else None
            refs.append(ShardRef(url, local_index, counts[name]))
        return replace(self, overrides=dict(self.overrides, **{split: refs}))

    def shard_paths(self, split: str) -> tuple[list[str], list[str]]:
        """(tar URLs, index paths) of one split, in stored order."""
        refs = self.shards(split)
        return [r.url for r in refs], [r.index for r in refs]

    def samples(self, split: str) -> int:
        if split in self.overrides:
            return sum(r.samples for r in self.overrides[split])
        return int(self.splits[split]["samples"]) if split in self.splits else 0

    def select(self, names: list[str] | None) -> dict[str, dict]:
        """The modalities to load, in dataset order; unknown names list the valid ones."""
        if not names:
            return dict(self.modalities)
        unknown = [n for n in names if n not in self.modalities]
        if unknown:
            raise ValueError(f"modalities {unknown} are not in {self.root}/dataset.json; "
                             f"valid: {', '.join(self.modalities)}")
        return {n: self.modalities[n] for n in self.modalities if n in names}

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"split {split!r} is not in {self.root}/dataset.json; "
                             f"it has: {', '.join(sorted(self.splits))}")


def _read_remote(url: str) -> bytes:
    import webdataset as wds

    from .s3 import is_s3, read_s3_object

    if is_s3(url):
        return read_s3_object(url)
    with wds.gopen(url) as stream:
        return stream.read()


def load_dataset_info(root: str | Path) -> DatasetInfo:
    """Read ROOT/dataset.json (ROOT a directory, an http(s) URL or s3://bucket/prefix); a missing file means an
    unfinished build. s3: credentials or endpoint missing raise S3AccessError naming the AWS_* variables."""
    if is_local(str(root)):
        root = Path(root)
        path = root / "dataset.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: point --shards at a directory written by `cotrain shards build` "
                "(dataset.json is written last, so its absence also means an unfinished build)"
            )
        meta = json.loads(path.read_text())
    else:
        from .s3 import S3AccessError

        try:
            meta = json.loads(_read_remote(_join(str(root), "dataset.json")))
        except S3AccessError:
            raise
        except Exception as error:  # noqa: BLE001 - any transport error gets the same advice
            raise FileNotFoundError(f"{root}/dataset.json could not be read ({error}); serve the whole shard "
                                    "directory, dataset.json included") from error
    label = dict(meta["label"])
    label.setdefault("type", "class")
    count = label.get("num_classes", label.get("dim", 1))
    return DatasetInfo(root=root, modalities=meta["modalities"], num_classes=int(count), splits=meta["splits"],
                       label=label)
