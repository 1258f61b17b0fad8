"""Build a shard directory from a manifest: validate, tokenize, convert in parallel, write shards, describe."""
from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import random
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from tokenizers import Tokenizer
from tqdm import tqdm

from shards.manifest import Manifest, ManifestSample, read_manifest
from shards.out_folder import SHARD_FILE_PATTERN, check_out_folder
from shards.tokenizer import TokenizerError, load_model_tokenizer, tokenizer_description, train_tokenizer
from shards.transcode import (
    AUDIO_FORMATS,
    FRAME_POLICIES,
    RESIZE_POLICIES,
    VIDEO_CODECS,
    AudioSettings,
    DepthSettings,
    FeatureSettings,
    TranscodeError,
    VideoSettings,
    convert_media,
    depth_source_bits,
    feature_dim,
    read_text,
    video_extension,
)
from shards.writer import STATS_SUFFIX, ShardRecord, ShardWriter, read_stats, shard_name

__all__ = ["BuildError", "ConversionSettings", "SampleResult", "build_shards", "convert_sample",
           "shuffle_within_splits", "slice_part"]

FORMAT_NAME, FORMAT_VERSION = "cotrain-shards", 1
CONVENTIONAL_SPLITS = ("train", "val", "test")


class BuildError(ValueError):
    """A build option out of range, or a build that failed as a whole; the message names the fix."""


@dataclass(frozen=True)
class ConversionSettings:
    """Everything a worker needs to turn one manifest sample into shard members."""

    video: VideoSettings
    audio: AudioSettings
    max_tokens: int
    feature_frames: int = 64
    depth: dict = field(default_factory=dict)  # modality name -> DepthSettings, decided from the manifest
    features: dict = field(default_factory=dict)  # modality name -> FeatureSettings

    def __post_init__(self) -> None:
        video, audio = self.video, self.audio
        if video.codec not in VIDEO_CODECS:
            raise BuildError(f"codec {video.codec!r} is unknown; use one of {', '.join(VIDEO_CODECS)}.")
        for name, value, allowed in (("resize", video.resize, RESIZE_POLICIES),
                                     ("frame_policy", video.policy, FRAME_POLICIES),
                                     ("audio_format", audio.format, AUDIO_FORMATS),
                                     ("audio_fit", audio.fit, ("start", "centre"))):
            if value not in allowed:
                raise BuildError(f"{name} is {value!r}; use one of {', '.join(allowed)}.")
        for name, value in (("fps", video.fps), ("frames", video.frames), ("stride", video.stride),
                            ("sample_rate", audio.sample_rate), ("samples", audio.samples),
                            ("max_tokens", self.max_tokens), ("feature_frames", self.feature_frames)):
            if value <= 0:
                raise BuildError(f"{name} is {value}; it must be greater than 0.")
        if video.keyint < 0:
            raise BuildError(f"keyint is {video.keyint}; use 0 (one keyframe per clip) or a positive interval.")
        for name in ("height", "width"):
            value = getattr(video, name)
            if value < 2 or value % 2:
                raise BuildError(f"{name} is {value}; use an even size >= 2 (4:2:0 chroma needs even frame sizes).")


@dataclass(frozen=True)
class SampleResult:
    """A converted sample: its members in write order, or the reject line that replaces it."""

    key: str
    members: dict[str, bytes] | None = None
    reject: dict | None = None


def build_shards(manifest_path: Path | str, *, out: Path | str, modality_kinds: dict[str, str] | None = None,
                 fps: float = 8, frames: int = 8, height: int = 32, width: int = 32, codec: str = "vp9",
                 sample_rate: int = 16000, audio_seconds: float = 1.0, max_tokens: int = 16,
                 max_shard_samples: int = 1000, seed: int = 0, workers: int = 2, resize: str = "crop",
                 frame_policy: str = "uniform", stride: int = 1, keyint: int = 0, audio_format: str = "wav",
                 audio_fit: str = "start", feature_frames: int = 64, label_type: str | None = None,
                 max_shard_bytes: int | None = None, max_reject_fraction: float = 1.0, resume: bool = False,
                 part: tuple[int, int] | None = None, progress: bool = True, observer=None,
                 overwrite: bool = False, tokenizer: Path | str | None = None) -> dict:
    """Convert the manifest's samples into `out` (see docs/formats.md) and return dataset.json's content.

    `resume=True` keeps the finished shards of an interrupted build with the same inputs and options and
    converts only the rest; the result is byte-identical to an uninterrupted build. `part=(I, N)` builds
    the I-th of N disjoint slices of every split (`cotrain shards merge` joins them). `observer` (e.g.
    ops.metrics.BuildMetrics) hears `begin(totals=, done=, kinds=)` once, then `sample(split, key, members,
    reject)` per converted sample. `out` must be empty or an earlier build of the same inputs and options,
    unless `overwrite` (shards/out_folder.py). `tokenizer` (a directory with tokenizer.json or vocab.txt, or
    such a file) is the text model's own tokenizer, so text members hold that model's ids; without it a word-level
    tokenizer is trained on the train split's texts.
    """
    settings = ConversionSettings(
        video=VideoSettings(fps=fps, frames=frames, height=height, width=width, codec=codec, resize=resize,
                            policy=frame_policy, stride=stride, keyint=keyint),
        audio=AudioSettings(sample_rate=sample_rate, samples=round(sample_rate * audio_seconds),
                            format=audio_format, fit=audio_fit),
        max_tokens=max_tokens, feature_frames=feature_frames)
    _check_counts(max_shard_samples=max_shard_samples, workers=workers, max_shard_bytes=max_shard_bytes,
                  max_reject_fraction=max_reject_fraction, part=part)
    manifest = read_manifest(manifest_path, modality_kinds=modality_kinds, label_type=label_type)
    # At this point the manifest is structurally valid: no work was done before, all of it comes after.
    settings = _plan_modalities(manifest, settings)
    out = Path(out)
    given = _given_tokenizer(tokenizer, manifest, max_tokens=max_tokens)
    tokens = {"tokenizer": given.to_str()} if given is not None else {}  # a resume must use the same tokenizer
    fingerprint = _fingerprint(manifest, settings, seed=seed, part=part, max_shard_samples=max_shard_samples,
                               max_shard_bytes=max_shard_bytes, **tokens)
    check_out_folder(out, manifest, fingerprint=fingerprint, overwrite=overwrite, resume=resume)
    out.mkdir(parents=True, exist_ok=True)
    # dataset.json is the "done" marker: remove it first so a crashed rebuild never looks finished.
    (out / "dataset.json").unlink(missing_ok=True)
    if not resume:
        _remove_shard_files(out, keep=set())
    source = Path(tokenizer) if tokenizer is not None else None
    tokenizer = _save_tokenizer(manifest, out, max_tokens=max_tokens, given=given)
    ordered = slice_part(shuffle_within_splits(manifest.samples, seed=seed), part)
    layout = _ShardLayout(out=out, max_samples=max_shard_samples, max_bytes=max_shard_bytes,
                          fingerprint=fingerprint, resume=resume)
    records, rejects = _convert_and_write(ordered, manifest.kinds, settings, tokenizer, layout=layout,
                                          workers=workers, progress=progress, observer=observer)
    _check_reject_fraction(rejects, len(ordered), max_reject_fraction, out)
    _remove_stale_shards(out, records)
    description = _describe(manifest, settings, tokenizer, records, rejects=rejects, seed=seed, source=source)
    if part is not None:
        description["part"] = {"index": part[0], "count": part[1],
                               "options": _fingerprint(manifest, settings, seed=seed, part=None,
                                                       max_shard_samples=max_shard_samples,
                                                       max_shard_bytes=max_shard_bytes, **tokens)}
    write_shard_index(out, description)
    _write_json_atomically(out / "dataset.json", description)
    return description


def _check_counts(*, max_shard_samples: int, workers: int, max_shard_bytes: int | None,
                  max_reject_fraction: float, part: tuple[int, int] | None) -> None:
    if max_shard_samples < 1:
        raise BuildError(f"max_shard_samples is {max_shard_samples}; use 1 or more.")
    if workers < 1:
        raise BuildError(f"workers is {workers}; use 1 or more.")
    if max_shard_bytes is not None and max_shard_bytes < 10240:
        raise BuildError(f"max_shard_bytes is {max_shard_bytes}; use at least 10240 (one tar record).")
    if not 0 <= max_reject_fraction <= 1:
        raise BuildError(f"max_reject_fraction is {max_reject_fraction}; use a fraction between 0 and 1.")
    if part is not None and not (part[1] >= 1 and 0 <= part[0] < part[1]):
        raise BuildError(f"part is {part[0]}/{part[1]}; use I/N with 0 <= I < N, e.g. 0/4 ... 3/4.")


def _plan_modalities(manifest: Manifest, settings: ConversionSettings) -> ConversionSettings:
    """Fix each depth modality's dtype and each features modality's dim from its first readable sample.

    Done once in the main process (a header read or one probe), so every worker stores the same format.
    """
    depth, features = {}, {}
    for name, kind in manifest.kinds.items():
        if kind == "depth":
            bits = _first_readable(manifest, name, depth_source_bits, default=8)
            depth[name] = DepthSettings(dtype="uint16" if bits > 8 else "uint8")
        elif kind == "features":
            dim = _first_readable(manifest, name, feature_dim, default=0)
            features[name] = FeatureSettings(dim=dim, max_frames=settings.feature_frames)
    return replace(settings, depth=depth, features=features)


def _first_readable(manifest: Manifest, name: str, read, *, default):
    for sample in manifest.samples:
        if name in sample.values:
            try:
                return read(sample.values[name])
            except TranscodeError:
                continue  # this sample will be rejected during conversion; the next one decides
    return default


def _given_tokenizer(path: Path | str | None, manifest: Manifest, *, max_tokens: int) -> Tokenizer | None:
    """The text model's own tokenizer the user gave (checked before any work is done), or None."""
    if path is None:
        return None
    if "text" not in manifest.kinds.values():
        raise BuildError(f"tokenizer {path} is given but the manifest has no text modality; leave out --tokenizer")
    try:
        return load_model_tokenizer(path, max_tokens=max_tokens)
    except TokenizerError as error:
        raise BuildError(str(error)) from None


def _save_tokenizer(manifest: Manifest, out: Path, *, max_tokens: int, given: Tokenizer | None) -> Tokenizer | None:
    """The `given` tokenizer, else one trained on the train split's texts (all texts if there is no `train`
    split); saved as tokenizer.json, which the loaders, export and predict read."""
    text_names = [name for name, kind in manifest.kinds.items() if kind == "text"]
    if not text_names:
        (out / "tokenizer.json").unlink(missing_ok=True)  # an earlier build's tokenizer would mislead
        return None
    if given is not None:
        given.save(str(out / "tokenizer.json"))
        return given
    has_train = any(sample.split == "train" for sample in manifest.samples)
    texts = [text for sample in manifest.samples if sample.split == "train" or not has_train
             for text in _readable_texts(sample, text_names)]
    tokenizer = train_tokenizer(texts, max_tokens=max_tokens)
    tokenizer.save(str(out / "tokenizer.json"))
    return tokenizer


def _readable_texts(sample: ManifestSample, text_names: list[str]) -> list[str]:
    """The sample's texts; an unreadable .txt file is skipped here and rejected during conversion."""
    texts = []
    for name in text_names:
        if name in sample.values:
            try:
                texts.append(read_text(sample.values[name]))
            except TranscodeError:
                pass
    return texts


def shuffle_within_splits(samples: list[ManifestSample], *, seed: int) -> list[ManifestSample]:
    """Samples grouped by split (conventional splits first), each split shuffled with `seed`.

    DALI shuffles only inside a buffer and reads tars in stored order, so a label-sorted manifest
    must be shuffled here. Each split's order depends only on (seed, split name).
    """
    by_split: dict[str, list[ManifestSample]] = {}
    for sample in samples:
        by_split.setdefault(sample.split, []).append(sample)
    ordered = []
    for split in _ordered_splits(by_split):
        group = list(by_split[split])
        random.Random(f"{seed}:{split}").shuffle(group)
        ordered.extend(group)
    return ordered


def _ordered_splits(splits) -> list[str]:
    """train, val, test first, then other splits in order of first appearance."""
    names = list(splits)
    rank = {name: index for index, name in enumerate(CONVENTIONAL_SPLITS)}
    return sorted(names, key=lambda name: (rank.get(name, len(rank)), names.index(name)))


def slice_part(ordered: list[ManifestSample], part: tuple[int, int] | None) -> list[ManifestSample]:
    """Part I of N: the I-th contiguous slice of every split's shuffled order (all of it without a part).

    Parts of all I together are exactly the whole ordered list, so merged parts keep the full build's order.
    """
    if part is None:
        return ordered
    index, count = part
    by_split: dict[str, list[ManifestSample]] = {}
    for sample in ordered:
        by_split.setdefault(sample.split, []).append(sample)
    return [sample for group in by_split.values()
            for sample in group[index * len(group) // count:(index + 1) * len(group) // count]]


def _fingerprint(manifest: Manifest, settings: ConversionSettings, **options) -> str:
    """A hash of the manifest bytes, the options and the format version: what a resume must match."""
    digest = hashlib.sha256(manifest.path.read_bytes())
    digest.update(repr((settings, sorted(options.items()), FORMAT_VERSION)).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class _ShardLayout:
    """Where and how shards are written, and whether an interrupted build is continued."""

    out: Path
    max_samples: int
    max_bytes: int | None
    fingerprint: str
    resume: bool


def _resumed_shards(layout: _ShardLayout, split: str) -> tuple[list[ShardRecord], int, list[dict]]:
    """The finished shards of `split` an earlier build with the same fingerprint left, contiguous from 0.

    A shard counts as finished when its stats file (written last) exists, names this build, and the tar
    has the recorded size and sha256. Returns (records, manifest samples they consumed, their reject lines).
    """
    records, consumed, rejects = [], 0, []
    while layout.resume:
        stats = read_stats(layout.out, split, len(records))
        if stats is None or stats.get("build") != layout.fingerprint or not _intact(layout.out, stats):
            break
        records.append(ShardRecord(**{name: stats[name] for name in ("tar", "index", "samples", "bytes", "sha256")}))
        consumed = stats["consumed"]
        rejects += stats["rejects"]
    return records, consumed, rejects


def _intact(out: Path, stats: dict) -> bool:
    tar, index = out / stats["tar"], out / stats["index"]
    if not (tar.is_file() and index.is_file() and tar.stat().st_size == stats["bytes"]):
        return False
    digest = hashlib.sha256()
    with open(tar, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == stats["sha256"]


def _convert_and_write(ordered: list[ManifestSample], kinds: dict[str, str], settings: ConversionSettings,
                       tokenizer: Tokenizer | None, *, layout: _ShardLayout, workers: int,
                       progress: bool, observer=None) -> tuple[dict[str, list[ShardRecord]], int]:
    """Convert in a pool (order kept) and stream each split's samples into its shards."""
    by_split: dict[str, list[ManifestSample]] = {}
    for sample in ordered:  # first-seen order = write order
        by_split.setdefault(sample.split, []).append(sample)
    resumed = {split: _resumed_shards(layout, split) for split in by_split}
    todo = [sample for split, group in by_split.items() for sample in group[resumed[split][1]:]]
    if observer is not None:
        observer.begin(totals={split: len(group) for split, group in by_split.items()},
                       done={split: resumed[split][1] for split in by_split}, kinds=kinds)
    records, rejects = {}, 0
    with _conversion_pool(workers, kinds, settings, tokenizer) as pool, \
            open(layout.out / "rejects.jsonl", "w", encoding="utf-8") as rejects_file, \
            tqdm(total=len(ordered), initial=len(ordered) - len(todo), unit="sample", desc="converting",
                 file=sys.stderr, mininterval=1.0, disable=not progress, dynamic_ncols=True) as bar:
        results = pool.imap(_convert_in_worker, todo)
        for split, group in by_split.items():
            done, consumed, old_rejects = resumed[split]
            for line in old_rejects:
                rejects_file.write(json.dumps(line) + "\n")
            rejects += len(old_rejects)
            with ShardWriter(layout.out, prefix=split, max_samples=layout.max_samples, max_bytes=layout.max_bytes,
                             records=done, consumed=consumed, extra_stats={"build": layout.fingerprint}) as writer:
                for result in itertools.islice(results, len(group) - consumed):
                    bar.update()
                    if observer is not None:
                        observer.sample(split, result.key, result.members, result.reject)
                    rejects += _store(result, writer, rejects_file)
            records[split] = writer.records
    return records, rejects


def _store(result: SampleResult, writer: ShardWriter, rejects_file) -> int:
    """Write the sample into its shard, or only its reject line beside the shards; return 1 for a reject."""
    if result.reject is not None:
        rejects_file.write(json.dumps(result.reject) + "\n")
        writer.reject(result.reject)
        return 1
    writer.write(result.key, result.members)
    return 0


def _check_reject_fraction(rejects: int, total: int, limit: float, out: Path) -> None:
    if total and rejects / total > limit:
        raise BuildError(f"{rejects} of {total} samples ({rejects / total:.1%}) were rejected, above "
                         f"--max-reject-fraction {limit}; see {out / 'rejects.jsonl'} for each sample's reason, "
                         f"fix the inputs (or raise the limit) and build again with --resume.")


def _conversion_pool(workers: int, kinds: dict[str, str], settings: ConversionSettings,
                     tokenizer: Tokenizer | None):
    """A pool whose workers each hold the kinds, settings and tokenizer.

    forkserver, not fork: callers may hold threads (torch, DALI), and forking a threaded process can
    deadlock the child.
    """
    tokenizer_json = tokenizer.to_str() if tokenizer is not None else None
    return multiprocessing.get_context("forkserver").Pool(
        workers, initializer=_start_worker, initargs=(kinds, settings, tokenizer_json))


_worker_context: dict = {}


def _start_worker(kinds: dict[str, str], settings: ConversionSettings, tokenizer_json: str | None) -> None:
    """Pool initializer: build the tokenizer once per worker instead of pickling it per sample."""
    tokenizer = Tokenizer.from_str(tokenizer_json) if tokenizer_json is not None else None
    _worker_context.update(kinds=kinds, settings=settings, tokenizer=tokenizer)


def _convert_in_worker(sample: ManifestSample) -> SampleResult:
    return convert_sample(sample, **_worker_context)


def convert_sample(sample: ManifestSample, *, kinds: dict[str, str], settings: ConversionSettings,
                   tokenizer: Tokenizer | None) -> SampleResult:
    """All members of one sample (`<key>.json` first), or a reject naming the failing modality."""
    present = [name for name in kinds if name in sample.values]
    if not present:
        return _reject(sample, None, "the sample has no modality; give it at least one non-null field")
    members = {"json": json.dumps({"key": sample.key, "split": sample.split, "label": sample.label,
                                   "present": present}).encode("utf-8")}
    try:
        members.update(convert_media({name: (kinds[name], sample.values[name]) for name in present},
                                     video=settings.video, audio=settings.audio, depth=settings.depth,
                                     features=settings.features, tokenizer=tokenizer,
                                     max_tokens=settings.max_tokens))
    except TranscodeError as error:
        return _reject(sample, error.modality, error.reason)
    return SampleResult(key=sample.key, members=members)


def _reject(sample: ManifestSample, modality: str | None, reason: str) -> SampleResult:
    return SampleResult(key=sample.key, reject={"key": sample.key, "line": sample.line, "modality": modality,
                                                "reason": reason})


def _remove_shard_files(out: Path, *, keep: set[str]) -> None:
    for path in out.iterdir():
        if SHARD_FILE_PATTERN.fullmatch(path.name) and path.name not in keep:
            path.unlink()


def _remove_stale_shards(out: Path, records: dict[str, list[ShardRecord]]) -> None:
    """Delete shard files an earlier build left behind, so globs and brace patterns see only this build."""
    current = {name for shards in records.values() for record in shards
               for name in (record.tar, record.index, _stats_name(record.tar))}
    _remove_shard_files(out, keep=current)


def _stats_name(tar: str) -> str:
    return tar.removesuffix(".tar") + "." + STATS_SUFFIX


def _describe(manifest: Manifest, settings: ConversionSettings, tokenizer: Tokenizer | None,
              records: dict[str, list[ShardRecord]], *, rejects: int, seed: int, source: Path | None) -> dict:
    """The dataset.json content (docs/formats.md)."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "seed": seed,
        "label": manifest.label,
        "modalities": {name: describe_modality(name, kind, settings, tokenizer, source)
                       for name, kind in manifest.kinds.items()},
        "splits": {split: {"samples": sum(record.samples for record in shards),
                           "shards": [record.as_dict() for record in shards]}
                   for split, shards in records.items()},
        "rejects": rejects,
    }


def describe_modality(name: str, kind: str, settings: ConversionSettings, tokenizer: Tokenizer | None,
                      source: Path | None = None) -> dict:
    video, audio = settings.video, settings.audio
    sampling = {"resize": video.resize, "policy": video.policy, "stride": video.stride}
    if kind == "video":
        return {"kind": kind, "ext": f"{name}.{video_extension(video.codec)}", "codec": video.codec,
                "fps": video.fps, "frames": video.frames, "height": video.height, "width": video.width,
                "keyint": video.gop, **sampling}
    if kind == "audio":
        return {"kind": kind, "ext": f"{name}.{audio.format}", "format": audio.format,
                "sample_rate": audio.sample_rate, "samples": audio.samples, "fit": audio.fit}
    if kind == "depth":
        depth = settings.depth[name]
        return {"kind": kind, "ext": f"{name}.npy", "dtype": depth.dtype, "frames": video.frames,
                "height": video.height, "width": video.width, "max_value": depth.max_value, "fps": video.fps,
                **sampling}
    if kind == "features":
        features = settings.features[name]
        return {"kind": kind, "ext": f"{name}.npy", "dtype": "float32", "dim": features.dim,
                "max_frames": features.max_frames}
    return {"kind": kind, "ext": f"{name}.ids", "text_ext": f"{name}.txt", "max_tokens": settings.max_tokens,
            "vocab_size": tokenizer.get_vocab_size(), "tokenizer": "tokenizer.json",
            **tokenizer_description(tokenizer, source)}


def write_shard_index(out: Path, description: dict) -> None:
    """wids' shardindex.json: the train split (else the first split) as "shardlist", every split under "splits".

    md5sum comes from each shard's stats file (wids names md5); readers ignore the extra keys.
    """
    splits = {}
    for split, content in description["splits"].items():
        splits[split] = [{"url": shard["tar"], "nsamples": shard["samples"], "filesize": shard["bytes"],
                          "md5sum": (read_stats_file(out, shard["tar"]) or {}).get("md5"),
                          "sha256": shard["sha256"]} for shard in content["shards"]]
    main = "train" if "train" in splits else next(iter(splits), None)
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": main,
             "shardlist": splits.get(main, []), "splits": splits}
    _write_json_atomically(out / "shardindex.json", index)


def read_stats_file(out: Path, tar: str) -> dict | None:
    try:
        return json.loads((out / _stats_name(tar)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json_atomically(path: Path, content: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
