"""The `cotrain shards` commands: `synth` writes a synthetic corpus, `build` turns a manifest into shards."""
from __future__ import annotations

import re
import time
from pathlib import Path

import click

from shards.build import BuildError, build_shards
from shards.manifest import ManifestError
from shards.synth import write_synthetic_corpus
from shards.transcode import VIDEO_CODECS

__all__ = ["shards_group"]

shards_group = click.Group("shards", help="Build WebDataset shards (with DALI indexes) from a corpus manifest.")


@shards_group.command("synth")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for video/, audio/ and manifest.jsonl.")
@click.option("--n", "count", type=click.IntRange(min=1), default=600, show_default=True, help="Samples.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--classes", type=click.IntRange(min=2), default=6, show_default=True, help="Number of classes.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Encoding processes.")
def synth_command(out: Path, count: int, seed: int, classes: int, workers: int) -> None:
    """Write a synthetic rgb/audio/text corpus whose modalities carry the label noisily and differently."""
    started = time.monotonic()
    manifest = write_synthetic_corpus(out, n=count, seed=seed, num_classes=classes, workers=workers)
    click.echo(f"Wrote {count} samples ({classes} classes, seed {seed}) in {time.monotonic() - started:.1f} s; "
               f"manifest: {manifest}")


@shards_group.command("build")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Shard directory to write.")
@click.option("--modality", "modalities", multiple=True, metavar="NAME=KIND",
              help="Fix a modality's kind (video, audio, text) instead of inferring it; repeatable.")
@click.option("--codec", type=click.Choice(list(VIDEO_CODECS)), default="vp9", show_default=True,
              help="Video codec of the stored members (DALI's CPU decoder reads vp9 and mjpeg).")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=8, show_default=True)
@click.option("--frames", type=click.IntRange(min=1), default=8, show_default=True, help="Frames per clip.")
@click.option("--size", metavar="HxW", help="Frame size, e.g. 32x32 (or use --height and --width).")
@click.option("--height", type=click.IntRange(min=2), help="Frame height [default: 32].")
@click.option("--width", type=click.IntRange(min=2), help="Frame width [default: 32].")
@click.option("--sample-rate", type=click.IntRange(min=1), default=16000, show_default=True)
@click.option("--audio-seconds", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-shard-samples", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the within-split shuffle.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Conversion processes.")
def build_command(manifest: Path, out: Path, modalities: tuple[str, ...], size: str | None,
                  height: int | None, width: int | None, fps: float, **options) -> None:
    """Validate MANIFEST, convert every sample and write shards, indexes and dataset.json into --out."""
    height, width = _frame_size(size, height, width)
    started = time.monotonic()
    try:
        description = build_shards(manifest, out=out, modality_kinds=_parse_modalities(modalities),
                                   height=height, width=width, fps=_whole_if_integral(fps), **options)
    except (ManifestError, BuildError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(_summary(description, out, seconds=time.monotonic() - started))


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
    return (f"Built {sum(split['samples'] for split in splits.values())} samples ({per_split}) into "
            f"{len(shards)} shards ({megabytes:.1f} MB) in {seconds:.1f} s; {description['rejects']} rejected "
            f"(see {out / 'rejects.jsonl'}). Dataset description: {out / 'dataset.json'}.")
