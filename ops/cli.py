"""The `cotrain` console command: one click group collecting every package's subcommands."""
from __future__ import annotations

import json
import sys

import click

from shards.cli import shards_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
              help="Set by the deepspeed launcher, which puts it before the subcommand; LOCAL_RANK is read instead.")
def main(local_rank: int | None) -> None:
    """Co-train unimodal branches with a multimodal Transformer teacher (arXiv 2311.10170)."""


main.add_command(shards_group, name="shards")


def _split_names(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


@main.command("train")
@click.option("--shards", "shards_dir", required=True, type=click.Path(file_okay=False),
              help="Directory written by `cotrain shards build`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--modalities", default=None, help="Comma-separated modalities (default: all in the dataset).")
@click.option("--mode", type=click.Choice(["cotrain", "unimodal", "multimodal"]), default="cotrain", show_default=True)
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True, help="Samples per batch on each rank.")
@click.option("--lr", type=float, default=None, help="Peak learning rate (AdamW, warm-up then cosine).")
@click.option("--alpha", type=float, default=None, help="Weight of the decision-level transfer term.")
@click.option("--temperature", type=float, default=None, help="Softmax temperature of the transfer term.")
@click.option("--shared-stages", type=int, default=None, help="Encoder stages shared with the teacher.")
@click.option("--transfer-gate", type=click.Choice(["none", "teacher_correct"]), default=None,
              help="Transfer on every sample (none, the paper) or only where the teacher is right.")
@click.option("--transfer-start", type=float, default=None,
              help="Fraction of training with no transfer, before the warm-up ramp.")
@click.option("--transfer-warmup", type=float, default=None,
              help="Fraction of training over which the transfer weight ramps up from 0.")
@click.option("--stream-loss/--no-stream-loss", default=None,
              help="A task loss on each of the teacher's per-modality streams.")
@click.option("--late-fusion/--no-late-fusion", default=None,
              help="Add the product of the teacher's stream predictions to its Transformer output.")
@click.option("--detach-streams/--no-detach-streams", default=None,
              help="Train the teacher's streams by their own losses only (stop-gradient into the fusion).")
@click.option("--stream-smoothing", type=float, default=None, help="Label smoothing of the teacher's stream losses.")
@click.option("--modality-dropout", type=float, default=None,
              help="Probability of hiding each modality from the teacher per training sample.")
@click.option("--grad-clip", type=float, default=None, help="Global gradient-norm clip (0 turns it off).")
@click.option("--zero-stage", type=click.IntRange(0, 3), default=0, show_default=True)
@click.option("--metrics-port", type=int, default=9400, show_default=True,
              help="Prometheus port of local rank 0 (rank r uses port + r); 0 turns it off.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option("--on-corrupt", type=click.Choice(["skip", "fail"]), default="fail", show_default=True,
              help="A shard sample that cannot be read: fail the run, or skip it (counted, logged).")
def train_cmd(shards_dir, out, modalities, mode, epochs, seed, batch_size, lr, alpha, temperature, shared_stages,
              transfer_gate, transfer_start, transfer_warmup, stream_loss, late_fusion, detach_streams,
              stream_smoothing,
              modality_dropout, zero_stage, metrics_port,
              metrics_host, grad_clip, on_corrupt) -> None:
    """Train a run: co-trained (default), one unimodal baseline, or the multimodal baseline."""
    from .config import MetricsConfig, RunConfig
    from .train import train

    try:
        cfg = RunConfig(shards=shards_dir, out=out, mode=mode, modalities=_split_names(modalities), epochs=epochs,
                        seed=seed, metrics=MetricsConfig(port=metrics_port, host=metrics_host))
        cfg.loader.batch_size = batch_size
        cfg.loader.on_corrupt = on_corrupt
        cfg.optim.zero_stage = zero_stage
        _override(cfg, lr=lr, alpha=alpha, temperature=temperature, shared_stages=shared_stages, gate=transfer_gate,
                  start=transfer_start, warmup=transfer_warmup, stream_loss=stream_loss, late_fusion=late_fusion,
                  stream_smoothing=stream_smoothing, detach_streams=detach_streams,
                  modality_dropout=modality_dropout, grad_clip=grad_clip)
        train(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err


def _override(cfg, **values) -> None:
    """Set the options given on the command line; the rest keep the config's defaults."""
    fields = {"lr": (cfg.optim, "lr"), "alpha": (cfg.transfer, "alpha"), "temperature": (cfg.transfer, "temperature"),
              "shared_stages": (cfg, "shared_stages"), "gate": (cfg.transfer, "gate"),
              "warmup": (cfg.transfer, "warmup_fraction"), "start": (cfg.transfer, "start_fraction"),
              "modality_dropout": (cfg.fusion, "modality_dropout"),
              "stream_loss": (cfg.fusion, "stream_loss"), "late_fusion": (cfg.fusion, "late_fusion"),
              "detach_streams": (cfg.fusion, "detach_streams"),
              "stream_smoothing": (cfg.fusion, "stream_label_smoothing"), "grad_clip": (cfg.optim, "grad_clip")}
    for name, value in values.items():
        if value is not None:
            target, attr = fields[name]
            setattr(target, attr, value)
    cfg.optim.__post_init__()
    cfg.transfer.__post_init__()


@main.command("eval")
@click.option("--run", required=True, type=click.Path(file_okay=False, exists=True), help="A trained run directory.")
@click.option("--split", default="test", show_default=True)
@click.option("--shards", "shards_dir", default=None, help="Shard directory (default: the one the run trained on).")
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Each branch's best-validation weights, or the final weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON instead of the table.")
def eval_cmd(run, split, shards_dir, which, as_json) -> None:
    """Score every branch of RUN on a split; writes RUN/eval-<split>.json."""
    from .evaluate import evaluate_run, format_scores, print_warning

    try:
        result = evaluate_run(run, split=split, shards=shards_dir, which=which)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(json.dumps(result, indent=2) if as_json else format_scores(result))
    print_warning(result)


@main.command("demo")
@click.option("--workdir", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--n", type=int, default=600, show_default=True, help="Samples in the synthetic corpus.")
@click.option("--epochs", type=int, default=12, show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds; the table shows mean ± std.")
@click.option("--metrics-port", type=int, default=9400, show_default=True)
def demo_cmd(workdir, n, epochs, seeds, metrics_port) -> None:
    """Synthesize the built-in corpus, build shards, train baselines and the co-trained model, compare."""
    from .demo import run_demo

    run_demo(workdir=workdir, n=n, epochs=epochs, seeds=[int(s) for s in _split_names(seeds)],
             metrics_port=metrics_port)


if __name__ == "__main__":
    sys.exit(main())
