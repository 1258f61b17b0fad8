"""Raw samples by global index: member bytes read by offset (local tar + index) or from a streamed shard
(`https://`, `pipe:`, `s3://`, a local tar without index). Every sample is checked before decoding, so a
truncated shard or a bad member is reported as `CorruptSample` with a reason, never a hang."""
from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .dataset import ShardRef
from .s3 import is_s3, read_s3_object, read_s3_objects_with_dali

__all__ = ["RawSample", "CorruptSample", "SampleReader", "check_sample"]

STREAMED_SHARDS_CACHED = 2


class CorruptSample(Exception):
    """A sample that cannot be used; `reason` is a short, bounded label (for counters), `detail` says more."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class RawSample:
    index: int
    key: str
    meta: dict
    members: dict[str, bytes]


def _key_of(member_name: str) -> tuple[str, str]:
    base = member_name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext


def _parse_index(path: str) -> list[dict[str, tuple[int, int]]]:
    """DALI index lines -> per sample {ext: (offset, size)}."""
    with open(path, encoding="utf-8") as file:
        lines = file.read().splitlines()
    samples = []
    for line in lines[1:]:
        words = line.split()
        samples.append({words[i]: (int(words[i + 1]), int(words[i + 2])) for i in range(0, len(words), 4)})
    return samples


class SampleReader:
    """Reads samples of a list of shards by global index (index = position in the concatenated shards)."""

    def __init__(self, shards: list[ShardRef], *, s3_with_dali: bool = False):
        self.shards = shards
        self.s3_with_dali = s3_with_dali  # the DALI loader fetches s3:// shards with DALI's own S3 reader
        self.starts = np.concatenate([[0], np.cumsum([s.samples for s in shards])]).astype(np.int64)
        self._indexes: dict[int, list] = {}
        self._files: dict[int, int] = {}
        self._pid = os.getpid()
        self._streamed: OrderedDict[int, list] = OrderedDict()

    @property
    def random_access(self) -> bool:
        return all(s.random_access for s in self.shards)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        return shard, int(index - self.starts[shard])

    def read(self, index: int) -> RawSample:
        shard, local = self.locate(index)
        ref = self.shards[shard]
        members = self._read_by_offset(shard, local) if ref.random_access else self._read_streamed(shard, local)
        return _with_meta(index, members, ref.url)

    # -- by offset ---------------------------------------------------------------------------------
    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker opens its own files
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = os.open(self.shards[shard].url, os.O_RDONLY)
        return self._files[shard]

    def _read_by_offset(self, shard: int, local: int) -> dict[str, bytes]:
        if shard not in self._indexes:
            self._indexes[shard] = _parse_index(self.shards[shard].index)
        entries = self._indexes[shard]
        if local >= len(entries):
            raise CorruptSample("index_mismatch", f"{self.shards[shard].index} lists {len(entries)} samples, "
                                                  f"dataset.json {self.shards[shard].samples}")
        fd, members = self._fd(shard), {}
        for ext, (offset, size) in entries[local].items():
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise CorruptSample("truncated_shard", f"{self.shards[shard].url} ends before member {ext} of "
                                                       f"sample {local} (offset {offset}, {size} bytes)")
            members[ext] = data
        return members

    # -- streamed ----------------------------------------------------------------------------------
    def _read_streamed(self, shard: int, local: int) -> dict[str, bytes]:
        if shard not in self._streamed:
            self._streamed[shard] = _stream_shard(self.shards[shard].url, s3_with_dali=self.s3_with_dali)
            while len(self._streamed) > STREAMED_SHARDS_CACHED:
                self._streamed.popitem(last=False)
        samples = self._streamed[shard]
        if local >= len(samples):
            raise CorruptSample("truncated_shard", f"{self.shards[shard].url} holds {len(samples)} readable "
                                                   f"samples, dataset.json says {self.shards[shard].samples}")
        return samples[local]


def _shard_bytes(url: str, s3_with_dali: bool) -> bytes:
    """The whole tar. `s3://` is read here (outside `_stream_shard`'s damage handling) so that missing
    credentials or a wrong endpoint raise S3AccessError instead of looking like an empty shard."""
    import webdataset as wds

    if is_s3(url):
        return read_s3_objects_with_dali([url])[0] if s3_with_dali else read_s3_object(url)
    with wds.gopen(url) as stream:
        return stream.read()


def _stream_shard(url: str, s3_with_dali: bool = False) -> list[dict[str, bytes]]:
    """All complete samples of one tar, in order; a truncated tar yields the samples before the damage."""
    samples: list[dict[str, bytes]] = []
    current_key = None
    data = _shard_bytes(url, s3_with_dali) if is_s3(url) else None
    try:
        if data is None:
            data = _shard_bytes(url, s3_with_dali)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _key_of(info.name)
                content = tar.extractfile(info).read()
                if len(content) != info.size:
                    break
                if key != current_key:
                    samples.append({})
                    current_key = key
                samples[-1][ext] = content
    except (tarfile.TarError, OSError, EOFError):
        if samples:
            samples.pop()  # the last sample may miss members that were lost with the rest of the tar
    return samples


def _with_meta(index: int, members: dict[str, bytes], url: str) -> RawSample:
    if "json" not in members:
        raise CorruptSample("bad_member", f"a sample of {url} has no json member")
    try:
        meta = json.loads(members["json"])
        key = str(meta["key"])
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptSample("bad_member", f"the json member of a sample of {url} is unreadable ({error})") from None
    return RawSample(index=index, key=key, meta=meta, members=members)


_MAGIC = {"webm": (0, b"\x1a\x45\xdf\xa3"), "mkv": (0, b"\x1a\x45\xdf\xa3"), "avi": (0, b"RIFF"),
          "mp4": (4, b"ftyp"), "wav": (0, b"RIFF"), "flac": (0, b"fLaC"), "npy": (0, b"\x93NUMPY")}


def check_sample(sample: RawSample, modalities: dict[str, dict]) -> None:
    """Cheap structural checks of every present member: container magic, npy header, token ids size."""
    for name, spec in modalities.items():
        data = sample.members.get(spec["ext"])
        if data is None:
            continue
        suffix = spec["ext"].rsplit(".", 1)[-1]
        where = f"member {sample.key}.{spec['ext']}"
        if suffix in _MAGIC:
            offset, magic = _MAGIC[suffix]
            if data[offset:offset + len(magic)] != magic:
                raise CorruptSample("bad_member", f"{where} is not a {suffix} file")
        if spec["kind"] == "text" and len(data) != 4 * int(spec["max_tokens"]):
            raise CorruptSample("bad_member", f"{where} has {len(data)} bytes, expected "
                                              f"{4 * int(spec['max_tokens'])} (max_tokens int32 ids)")
        if suffix == "npy":
            try:
                array = read_npy(data)
            except ValueError as error:
                raise CorruptSample("bad_member", f"{where} is not a readable npy file ({error})") from None
            _check_array(array, spec, where)


_NPY_HEADER_LOCK = threading.Lock()


def read_npy(data: bytes) -> np.ndarray:
    """An .npy member's array. np.load parses the header with ast.literal_eval, and CPython 3.11's AST
    constructor is not thread-safe (python/cpython#106905: "SystemError: AST constructor recursion depth
    mismatch", which stopped a 54-run grid here): the reader's threads take turns."""
    with _NPY_HEADER_LOCK:
        return np.load(io.BytesIO(data), allow_pickle=False)


def _check_array(array: np.ndarray, spec: dict, where: str) -> None:
    if str(array.dtype) != spec.get("dtype", str(array.dtype)):
        raise CorruptSample("bad_member", f"{where} is {array.dtype}, dataset.json says {spec['dtype']}")
    if spec["kind"] == "depth" and array.shape != (spec["frames"], spec["height"], spec["width"]):
        raise CorruptSample("bad_member", f"{where} has shape {array.shape}, dataset.json says "
                                          f"{(spec['frames'], spec['height'], spec['width'])}")
    if spec["kind"] == "features" and (array.ndim != 2 or array.shape[1] != spec["dim"]):
        raise CorruptSample("bad_member", f"{where} has shape {array.shape}, expected (T, {spec['dim']})")
