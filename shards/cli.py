"""The `cotrain shards` commands: `synth` writes a synthetic corpus, `build` turns a manifest into shards."""
from __future__ import annotations

import re
import time
from pathlib import Path

import click

from shards.build import BuildError, build_shards
from shards.manifest import ManifestError
from shards.out_folder import OutFolderError
from shards.manifest import LABEL_TYPES
from shards.transcode import AUDIO_FORMATS, FRAME_POLICIES, RESIZE_POLICIES, VIDEO_CODECS

__all__ = ["shards_group", "OldSpellings"]


class OldSpellings(click.Option):
    """An option that still accepts its old spellings (`old=`) but shows only the current ones in --help."""

    def __init__(self, *args, old: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.old = set(old)

    def get_help_record(self, ctx):
        opts = self.opts
        self.opts = [o for o in opts if o not in self.old]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts

shards_group = click.Group("shards", help="Build WebDataset shards (with DALI indexes) from a corpus manifest.\n\n"
                                         "\b\nExample:\n  cotrain shards build corpus/manifest.jsonl --out shards/")


@shards_group.command("synth")
@click.option("--task", default="demo", show_default=True, metavar="NAME",
              help="demo (the built-in rgb/audio/text corpus), gesture (rgb + depth), emotion (face video + "
                   "voice) or sentiment (video + voice + text, regression in [-3, 3]); see docs/shards.md.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the media folders and manifest.jsonl.")
@click.option("--count", "--n", "count", cls=OldSpellings, old=("--n",), type=click.IntRange(min=1), default=600,
              show_default=True, help="Samples.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--classes", type=click.IntRange(min=2), default=None,
              help="Number of classes of --task demo [default: 6] or family [default: 10]; the other tasks have "
                   "fixed classes.")
@click.option("--size", type=click.IntRange(min=16), default=None,
              help="--task family: frame size in pixels [default: 48]; build its shards with --size SxS.")
@click.option("--strength", default=None, metavar="rgb=P,audio=P",
              help="--task family: the chance each modality's signal is clear [default: rgb=0.6,audio=0.5].")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Encoding processes.")
@click.option("--quiet", is_flag=True, help="No progress bar (it is drawn only when stderr is a terminal).")
def synth_command(task: str, out: Path, count: int, seed: int, classes: int | None, size: int | None,
                  strength: str | None, workers: int, quiet: bool) -> None:
    """Write a synthetic corpus whose modalities carry the label noisily and differently.

    \b
    Example:
      cotrain shards synth --task family --classes 20 --size 64 --strength rgb=0.7,audio=0.4 --out corpus/
    """
    from ops.progress import progress_wanted
    from shards.synth_tasks import TASKS, write_task_corpus
    if task not in TASKS:
        raise click.BadParameter(f"{task!r} is not a synthetic task; use one of {', '.join(TASKS)}.",
                                 param_hint="--task")
    if classes is not None and task not in ("demo", "family"):
        raise click.BadParameter(f"--task {task} has a fixed set of classes; --classes applies to --task demo "
                                 f"and family only.", param_hint="--classes")
    if (size or strength) and task != "family":
        raise click.BadParameter("--size and --strength apply to --task family only.", param_hint="--task")
    family = _family_options(classes, size, strength) if task == "family" else None
    started = time.monotonic()
    try:
        manifest = write_task_corpus(task, out, n=count, seed=seed, workers=workers, num_classes=classes or 6,
                                     family=family, progress=progress_wanted(0, quiet=quiet))
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"Wrote {count} {task} samples (seed {seed}) in {time.monotonic() - started:.1f} s; "
               f"manifest: {manifest}")


def _family_options(classes: int | None, size: int | None, strength: str | None) -> dict:
    """The family member's parameters given on the command line (the others keep their defaults)."""
    options: dict = {k: v for k, v in (("classes", classes), ("size", size)) if v is not None}
    if strength:
        pairs = [item.partition("=") for item in strength.split(",")]
        try:
            options["strength"] = {name.strip(): float(value) for name, _, value in pairs}
        except ValueError:
            raise click.BadParameter(f"{strength!r} is not rgb=P,audio=P with P a number, e.g. rgb=0.7,audio=0.4",
                                     param_hint="--strength") from None
    return options


@shards_group.command("build")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Shard directory to write.")
@click.option("--modality", "modalities", multiple=True, metavar="NAME=KIND",
              help="Fix a modality's kind (video, audio, text, depth, features) instead of inferring it; "
                   "repeatable (see docs/formats.md for what is inferred).")
@click.option("--label-type", type=click.Choice(LABEL_TYPES), default=None,
              help="Label type instead of inferring it (a list of ints is multilabel unless 'regression').")
@click.option("--codec", type=click.Choice(list(VIDEO_CODECS)), default="vp9", show_default=True,
              help="Video codec of the stored members (DALI's CPU decoder reads vp9 and mjpeg).")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=8, show_default=True)
@click.option("--frames", type=click.IntRange(min=1), default=8, show_default=True, help="Frames per clip.")
@click.option("--frame-policy", type=click.Choice(FRAME_POLICIES), default="uniform", show_default=True,
              help="uniform: frames spread over the whole clip; stride: a centred window, --stride frames apart.")
@click.option("--stride", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--resize", type=click.Choice(RESIZE_POLICIES), default="crop", show_default=True,
              help="crop: scale to cover and cut the centre; pad: scale to fit and pad with black.")
@click.option("--keyint", type=click.IntRange(min=0), default=0, show_default=True,
              help="Keyframe interval in frames (0: one keyframe per clip).")
@click.option("--size", metavar="HxW", help="Frame size, e.g. 32x32 (or use --height and --width).")
@click.option("--height", type=click.IntRange(min=2), help="Frame height [default: 32].")
@click.option("--width", type=click.IntRange(min=2), help="Frame width [default: 32].")
@click.option("--sample-rate", type=click.IntRange(min=1), default=16000, show_default=True)
@click.option("--audio-seconds", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--audio-format", type=click.Choice(AUDIO_FORMATS), default="wav", show_default=True)
@click.option("--audio-fit", type=click.Choice(["start", "centre"]), default="start", show_default=True,
              help="Which part of longer audio is kept (and where shorter audio is zero-padded).")
@click.option("--feature-frames", type=click.IntRange(min=1), default=64, show_default=True,
              help="Longest stored features sequence (longer ones keep their first frames).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="The text model's own tokenizer (a directory with tokenizer.json or vocab.txt, or such a file), "
                   "so text is stored as that model's ids (e.g. for encoders.text.name: bert); default: a "
                   "word-level tokenizer trained on the train split.")
@click.option("--max-shard-samples", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--max-shard-bytes", type=click.IntRange(min=10240), default=None,
              help="Roll over before a shard would exceed this size.")
@click.option("--max-reject-fraction", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="Fail the build when more than this fraction of samples is rejected.")
@click.option("--resume", is_flag=True, help="Keep the finished shards of an interrupted build and do the rest.")
@click.option("--overwrite", is_flag=True,
              help="Build into --out although it holds other files or a build of other inputs (without it, "
                   "such a folder is refused). Only the build's own files are replaced; others are kept.")
@click.option("--part", metavar="I/N", default=None, help="Build only part I of N (0-based); see `merge`.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the within-split shuffle.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Conversion processes.")
@click.option("--metrics-port", type=click.IntRange(min=0), default=0, show_default=True,
              help="Serve Prometheus metrics of the build on this port (0: off).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address the exporter binds.")
def build_command(manifest: Path, out: Path, modalities: tuple[str, ...], size: str | None,
                  height: int | None, width: int | None, fps: float, part: str | None, metrics_port: int,
                  metrics_host: str, **options) -> None:
    """Validate MANIFEST (JSON Lines, or CSV by its .csv suffix), convert every sample and write shards,
    indexes and dataset.json into --out.

    \b
    Example:
      cotrain shards build corpus/manifest.jsonl --out shards/ --frames 8 --size 32x32
    """
    height, width = _frame_size(size, height, width)
    started = time.monotonic()
    observer = _build_exporter(metrics_host, metrics_port)
    try:
        description = build_shards(manifest, out=out, modality_kinds=_parse_modalities(modalities),
                                   height=height, width=width, fps=_whole_if_integral(fps),
                                   part=_parse_part(part), observer=observer, **options)
    except (ManifestError, BuildError, OutFolderError) as error:
        raise click.ClickException(str(error)) from None
    finally:
        if observer is not None:
            observer.close()
    click.echo(_summary(description, out, seconds=time.monotonic() - started))


def _build_exporter(host: str, port: int):
    """BuildMetrics served on host:port, or None when off (ops is imported only then)."""
    if not port:
        return None
    from ops.metrics import BuildMetrics

    metrics = BuildMetrics()
    url = metrics.serve(host=host, port=port)
    if url:
        click.echo(f"metrics at {url}", err=True)
    return metrics


def _parse_part(part: str | None) -> tuple[int, int] | None:
    if part is None:
        return None
    match = re.fullmatch(r"(\d+)/(\d+)", part)
    if not match or not int(match[1]) < int(match[2]):
        raise click.BadParameter(f"{part!r} is not I/N with 0 <= I < N, e.g. 0/4.", param_hint="--part")
    return int(match[1]), int(match[2])


def _parse_modalities(modalities: tuple[str, ...]) -> dict[str, str]:
    kinds = {}
    for item in modalities:
        name, separator, kind = item.partition("=")
        if not separator or not name or not kind:
            raise click.BadParameter(f"{item!r} is not NAME=KIND, e.g. rgb=video.", param_hint="--modality")
        kinds[name] = kind
    return kinds


def _frame_size(size: str | None, height: int | None, width: int | None) -> tuple[int, int]:
    """--size HxW, or --height/--width, defaulting to 32x32."""
    if size is None:
        return height or 32, width or 32
    if height is not None or width is not None:
        raise click.UsageError("give either --size or --height/--width, not both.")
    match = re.fullmatch(r"(\d+)[xX](\d+)", size)
    if not match:
        raise click.BadParameter(f"{size!r} is not HxW, e.g. 32x32.", param_hint="--size")
    return int(match[1]), int(match[2])


def _whole_if_integral(value: float) -> float | int:
    """8.0 -> 8, so dataset.json says "fps": 8 as in docs/formats.md."""
    return int(value) if float(value).is_integer() else value


def _summary(description: dict, out: Path, *, seconds: float) -> str:
    splits = description["splits"]
    shards = [shard for split in splits.values() for shard in split["shards"]]
    per_split = ", ".join(f"{name} {split['samples']}" for name, split in splits.items())
    megabytes = sum(shard["bytes"] for shard in shards) / 1e6
    built = (f"Built {sum(split['samples'] for split in splits.values())} samples ({per_split}) into "
             f"{len(shards)} shards ({megabytes:.1f} MB) in {seconds:.1f} s; {description['rejects']} rejected "
             f"(see {out / 'rejects.jsonl'}). Dataset description: {out / 'dataset.json'}.")
    return "\n".join([built, _label_line(description["label"]), _rejected_lines(out / "rejects.jsonl")])


def _rejected_lines(rejects_path: Path, *, shown: int = 5) -> str:
    """Rejected samples counted per modality and reason (its first clause, paths as <file>), with a first key."""
    import json
    from collections import Counter
    lines = rejects_path.read_text(encoding="utf-8").splitlines() if rejects_path.exists() else []
    counts, examples = Counter(), {}
    for line in lines:
        reject = json.loads(line)
        reason = f"{reject['modality'] or 'sample'}: {re.sub(r'[^ ]*/[^ ]*', '<file>', reject['reason'].split(';')[0])}"
        counts[reason] += 1
        examples.setdefault(reason, reject["key"])
    summary = [f"{count} rejected, {reason} (e.g. {examples[reason]})" for reason, count in counts.most_common(shown)]
    if len(counts) > shown:
        summary.append(f"... and {len(counts) - shown} other reasons in {rejects_path}")
    return _skipped_lines(summary)


@shards_group.command("verify")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--full", is_flag=True, help="Decode every sample (default: the first sample of each shard).")
def verify_command(folder: Path, full: bool) -> None:
    """Re-hash every shard against dataset.json, check each index against its tar, decode samples.

    \b
    Example:
      cotrain shards verify shards/ --full
    """
    from shards.verify import verify_shards
    problems = verify_shards(folder, full=full)
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in {folder}.")
    click.echo(f"{folder}: every shard matches dataset.json ({'all samples' if full else 'first samples'} decoded).")


@shards_group.command("inspect")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--key", default=None, help="Write this sample's members and decoded media to --out.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for --key's files [default: ./<key>].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_command(folder: Path, key: str | None, out: Path | None, as_json: bool) -> None:
    """Samples per split and class, stored durations, bytes and modality coverage; or export one sample.

    \b
    Example:
      cotrain shards inspect shards/ --key sample-0001 --out sample/
    """
    import json
    from shards.summary import export_sample, format_summary, summarize_shards
    if key is not None:
        try:
            written = export_sample(folder, key, out or Path(key))
        except KeyError as error:
            raise click.ClickException(error.args[0]) from None
        click.echo("\n".join(str(path) for path in written))
        return
    summary = summarize_shards(folder)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@shards_group.command("merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def merge_command(parts: tuple[Path, ...], out: Path) -> None:
    """Join the PARTS of a `build --part I/N` into one shard directory with contiguous shard numbers.

    \b
    Example:
      cotrain shards merge part-0/ part-1/ --out shards/
    """
    from shards.merge import merge_parts
    try:
        description = merge_parts(list(parts), out=out)
    except BuildError as error:
        raise click.ClickException(str(error)) from None
    click.echo(_summary(description, out, seconds=0).replace(" in 0.0 s", ""))


@shards_group.command("manifest")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "dataset", type=click.Choice(["egogesture", "nvgesture", "ravdess", "cmu-mosei"]),
              required=True, help="The dataset whose publisher's layout ROOT holds.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--list", "lists", multiple=True, metavar="SPLIT=FILE",
              help="nvgesture: read SPLIT's samples from FILE (relative to ROOT) instead of the publisher's "
                   "nvgesture_{train,test}_correct_cvpr2016_v2.lst; repeatable.")
def manifest_command(root: Path, dataset: str, out: Path, lists: tuple[str, ...]) -> None:
    """Write a manifest (with the dataset's standard split and classes) for the dataset under ROOT, and say
    what was skipped or clamped.

    \b
    Example:
      cotrain shards manifest /data/RAVDESS --format ravdess --out ravdess.jsonl
    """
    from shards.adapters import AdapterError, write_manifest
    from shards.manifest import read_manifest
    try:
        result = write_manifest(dataset, root, out, lists=_parse_lists(lists))
        label = read_manifest(out).label
    except (AdapterError, ManifestError) as error:
        raise click.ClickException(str(error)) from None
    splits = _split_counts(record["split"] for record in result.records)
    click.echo(f"Wrote {len(result.records)} samples ({splits}) to {out}.")
    click.echo(_label_line(label))
    click.echo(_skipped_lines(result.report.lines()))


def _parse_lists(lists: tuple[str, ...]) -> dict[str, str]:
    chosen = {}
    for item in lists:
        split, separator, name = item.partition("=")
        if not separator or not split or not name:
            raise click.BadParameter(f"{item!r} is not SPLIT=FILE, e.g. "
                                     f"train=nvgesture_arm_train_correct_cvpr2016_v2.lst.", param_hint="--list")
        chosen[split] = name
    return chosen


def _split_counts(splits) -> str:
    """"train 3, val 1, test 1": the conventional splits first, then the others in order of appearance."""
    from collections import Counter
    counts = Counter(splits)
    order = {name: rank for rank, name in enumerate(("train", "val", "test"))}
    ranked = sorted(counts, key=lambda name: order.get(name, len(order)))
    return ", ".join(f"{name} {counts[name]}" for name in ranked)


def _label_line(label: dict) -> str:
    """The label type, and the class count with the class names when there are names."""
    if label["type"] == "regression":
        return f"label type: regression, dim {label['dim']}"
    names = label.get("names")
    shown = f" ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else ""
    return f"label type: {label['type']}, {label['num_classes']} classes{shown}"


def _skipped_lines(lines: list[str]) -> str:
    if not lines:
        return "skipped or clamped: nothing"
    return "skipped or clamped:\n" + "\n".join(f"  {line}" for line in lines)
