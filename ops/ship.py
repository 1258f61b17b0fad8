"""`cotrain export` and `cotrain predict`: ship one unimodal branch and run it on raw media."""
from __future__ import annotations

import json

import click

from shards.cli import OldSpellings

__all__ = ["export_cmd", "predict_cmd"]


@click.command("export")
@click.option("--run", required=True, type=click.Path(file_okay=False, exists=True), help="A trained run directory.")
@click.option("--modality", required=True, help="The unimodal branch to ship.")
@click.option("--format", "fmt", type=click.Choice(["torchscript", "onnx", "state_dict"]), default="torchscript",
              show_default=True)
@click.option("-o", "--out", "--output", "output", cls=OldSpellings, old=("--output",), required=True,
              type=click.Path(dir_okay=False), help="File to write.")
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="The branch's best-validation weights, or the final weights.")
def export_cmd(run, modality, fmt, output, which) -> None:
    """Write MODALITY's branch of RUN as a standalone model (shared stages, branch, head; no teacher).

    \b
    Example:
      cotrain export --run runs/cotrain-s0 --modality audio --format onnx --out audio.onnx
    """
    from model.export import export_run

    try:
        path = export_run(run, modality, fmt, output, which=which)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {path} ({fmt}, {modality})")


@click.command("predict")
@click.argument("model_file", type=click.Path(dir_okay=False, exists=True))
@click.argument("inputs", nargs=-1)
@click.option("--text", "texts", multiple=True, help="Literal text to predict (repeatable); files go as INPUTS.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of one line per input.")
def predict_cmd(model_file, inputs, texts, as_json) -> None:
    """Run an exported model on raw media files (video, audio, a .txt file, a features .npy) or --text.

    An input that cannot be read gets one line with the reason (an "error" entry with --json); the others
    are still predicted, and the exit code is 1 when any input failed.

    \b
    Example:
      cotrain predict audio.onnx clip1.wav clip2.wav --json
    """
    from .predict import predict_files

    if not inputs and not texts:
        raise click.UsageError("give at least one input file, or --text TEXT")
    try:
        results = predict_files(model_file, list(inputs), list(texts))
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            click.echo(_result_line(r), err="error" in r)
    if any("error" in r for r in results):
        raise SystemExit(1)


def _result_line(r: dict) -> str:
    if "error" in r:
        return f"{r['input']}: error: {r['error']}"
    if "prediction" in r:
        return f"{r['input']}: {r['prediction']}  p={r['probabilities'][r['prediction']]:.3f}"
    return f"{r['input']}: {r.get('values') or r.get('probabilities')}"
