"""`cotrain export` and `cotrain predict`: ship one unimodal branch and run it on raw media."""
from __future__ import annotations

import json

import click

__all__ = ["export_cmd", "predict_cmd"]


@click.command("export")
@click.option("--run", required=True, type=click.Path(file_okay=False, exists=True), help="A trained run directory.")
@click.option("--modality", required=True, help="The unimodal branch to ship.")
@click.option("--format", "fmt", type=click.Choice(["torchscript", "onnx", "state_dict"]), default="torchscript",
              show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="File to write.")
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="The branch's best-validation weights, or the final weights.")
def export_cmd(run, modality, fmt, output, which) -> None:
    """Write MODALITY's branch of RUN as a standalone model (shared stages, branch, head; no teacher)."""
    from model.export import export_run

    try:
        path = export_run(run, modality, fmt, output, which=which)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {path} ({fmt}, {modality})")


@click.command("predict")
@click.argument("model_file", type=click.Path(dir_okay=False, exists=True))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of one line per input.")
def predict_cmd(model_file, inputs, as_json) -> None:
    """Run an exported model on raw media files (video, audio, a text file or text, a features .npy)."""
    from .predict import predict_files

    try:
        results = predict_files(model_file, list(inputs))
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        if "prediction" in r:
            click.echo(f"{r['input']}: {r['prediction']}  p={r['probabilities'][r['prediction']]:.3f}")
        else:
            click.echo(f"{r['input']}: {r.get('values') or r.get('probabilities')}")
