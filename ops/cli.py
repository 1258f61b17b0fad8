"""The `cotrain` console command: one click group collecting every package's subcommands."""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import click

from shards.cli import OldSpellings, shards_group

from .ship import export_cmd, predict_cmd


class PresetChoice(click.Choice):
    """The preset names, looked up only when needed (they live with the model, which imports torch)."""

    def __init__(self):
        super().__init__([])

    @property
    def choices(self):
        from .presets import PRESETS

        return tuple(sorted(PRESETS))

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns; the names come from PRESETS instead
        pass


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cotrain")
    except PackageNotFoundError:
        return "unknown (not installed; run `pip install -e .`)"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=_version(), prog_name="cotrain", message="%(prog)s %(version)s")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
              help="Set by the deepspeed launcher, which puts it before the subcommand; LOCAL_RANK is read instead.")
def main(local_rank: int | None) -> None:
    """Co-train unimodal branches with a multimodal Transformer teacher (arXiv 2311.10170).

    \b
    Example:
      cotrain demo --count 300 --epochs 4 --seeds 0
    """
    from .quiet import silence_deepspeed_noise

    silence_deepspeed_noise()


main.add_command(shards_group, name="shards")
main.add_command(export_cmd)
main.add_command(predict_cmd)


def _split_names(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


# Every run option: (click declaration kwargs, dotted config key). Defaults live in RunConfig only, so an
# option left out never overrides the preset or the config file.
RUN_OPTIONS = {
    "shards": (dict(type=click.Path(file_okay=False), help="Directory written by `cotrain shards build`."), "shards"),
    "out": (dict(type=click.Path(file_okay=False), help="Run directory to write."), "out"),
    "modalities": (dict(help="Comma-separated modalities (default: all in the dataset)."), "modalities"),
    "mode": (dict(type=click.Choice(["cotrain", "unimodal", "multimodal"]), help="[default: cotrain]"), "mode"),
    "epochs": (dict(type=int, help="[default: 10]"), "epochs"),
    "seed": (dict(type=int, help="[default: 0]"), "seed"),
    "batch-size": (dict(type=int, help="Samples per batch on each rank. [default: 16]"), "loader.batch_size"),
    "lr": (dict(type=float, help="Peak learning rate (AdamW, warm-up then cosine)."), "optim.lr"),
    "alpha": (dict(type=float, help="Weight of the decision-level transfer term."), "transfer.alpha"),
    "temperature": (dict(type=float, help="Softmax temperature of the transfer term."), "transfer.temperature"),
    "shared-stages": (dict(type=int, help="Encoder stages shared with the teacher."), "shared_stages"),
    "transfer-gate": (dict(type=click.Choice(["none", "teacher_correct", "teacher_better", "stream_correct"]),
                           help="Transfer on every sample (none, the paper), only where the teacher is right, "
                                "where it is right and its error is below the student's, or where it and its "
                                "stream of the student's modality are right."),
                      "transfer.gate"),
    "transfer-guard": (dict(type=click.Choice(["none", "val"]),
                            help="val: no transfer to a student the teacher does not beat on validation by "
                                 "--guard-margin; none: always (the paper)."), "transfer.guard"),
    "guard-margin": (dict(type=float, help="The teacher's relative lead in validation error that the guard asks."),
                     "transfer.guard_margin"),
    "transfer-start": (dict(type=float, help="Fraction of training with no transfer, before the warm-up ramp."),
                       "transfer.start_fraction"),
    "transfer-warmup": (dict(type=float, help="Fraction of training over which the transfer weight ramps up."),
                        "transfer.warmup_fraction"),
    "stream-loss/--no-stream-loss": (dict(default=None, help="A task loss on each of the teacher's streams."),
                                     "fusion.stream_loss"),
    "late-fusion/--no-late-fusion": (dict(default=None, help="Add the product of the teacher's stream "
                                                             "predictions to its Transformer output."),
                                     "fusion.late_fusion"),
    "late-fusion-weights": (dict(type=click.Choice(["equal", "learned"]),
                                 help="Weigh the teacher's streams in late fusion equally, or by a learned gate "
                                      "per stream and sample."), "fusion.late_fusion_weights"),
    "detach-streams/--no-detach-streams": (dict(default=None, help="Train the teacher's streams by their own "
                                                                   "losses only."), "fusion.detach_streams"),
    "stream-smoothing": (dict(type=float, help="Label smoothing of the teacher's stream losses."),
                         "fusion.stream_label_smoothing"),
    "modality-dropout": (dict(type=float, help="Probability of hiding each modality from the teacher per sample."),
                         "fusion.modality_dropout"),
    "student-shared-grad": (dict(type=float, help="Scale of the students' gradient into the shared stages "
                                                  "(1: both paths train them; 0: the teacher alone)."),
                            "fusion.student_shared_grad"),
    "students": (dict(help="Comma-separated modalities that get a unimodal branch (default: all); the others "
                           "feed only the teacher."), "students"),
    "feature-weight": (dict(type=float, help="Weight of feature-level transfer (0 = off)."), "transfer.feature"),
    "attention-weight": (dict(type=float, help="Weight of attention-level transfer (0 = off)."),
                         "transfer.attention"),
    "grad-clip": (dict(type=float, help="Gradient-norm clip (0 turns it off). [default: 1.0]"), "optim.grad_clip"),
    "clip-scope": (dict(type=click.Choice(["global", "branch"]), help="Clip one gradient norm over the whole model, "
                        "or each branch's on its own. [default: global]"), "optim.clip_scope"),
    "grad-accum": (dict(type=int, help="Micro-batches per optimizer step. [default: 1]"), "optim.grad_accum"),
    "zero-stage": (dict(type=click.IntRange(0, 3), help="DeepSpeed ZeRO stage. [default: 0]"), "optim.zero_stage"),
    "offload-optimizer/--no-offload-optimizer": (dict(default=None, help="Optimizer state in host memory "
                                                                         "(ZeRO >= 1)."),
                                                 "optim.offload_optimizer"),
    "cpu-threads": (dict(type=click.IntRange(0), help="torch threads per rank on CPU (0: OMP_NUM_THREADS if set, "
                                                      "else cores / ranks on this machine). [default: 0]"),
                    "cpu_threads"),
    "save-every": (dict(type=int, help="Checkpoint every N optimizer steps (0: only on SIGTERM). [default: 0]"),
                   "checkpoint.save_every"),
    "keep-checkpoints": (dict(type=int, help="Checkpoints kept (>= 2). [default: 2]"), "checkpoint.keep"),
    "max-bad-steps": (dict(type=int, help="NaN/inf losses in a row before the run stops. [default: 5]"),
                      "checkpoint.max_bad_steps"),
    "on-corrupt": (dict(type=click.Choice(["skip", "fail"]), help="A shard sample that cannot be read: fail the "
                                                                   "run, or skip it (counted, logged). [default: fail]"),
                   "loader.on_corrupt"),
    "metrics-port": (dict(type=click.IntRange(0, 65535), help="Prometheus port of local rank 0 (rank r uses port + r); 0 turns it "
                                         "off. [default: 9400]"), "metrics.port"),
    "metrics-host": (dict(help="Address the exporter binds. [default: 127.0.0.1]"), "metrics.host"),
    "metrics-targets": (dict(help="Folder where each rank writes its Prometheus file_sd target (shared by the "
                                  "runs one Prometheus scrapes). [default: RUN/prometheus-targets]"),
                        "metrics.targets_dir"),
}


def _param_name(flag: str) -> str:
    return flag.split("/")[0].replace("-", "_")


def run_options(command):
    """--preset, --config, --set and every RUN_OPTIONS flag, in that order of precedence (last wins)."""
    for flag, (kwargs, _) in reversed(RUN_OPTIONS.items()):
        command = click.option(f"--{flag}", _param_name(flag), **kwargs)(command)
    command = click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                           help="Any config value, e.g. --set optim.lr=1e-3 (after every other option).")(command)
    command = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                           help="A JSON or YAML file with any subset of RUN/config.json's keys.")(command)
    return click.option("--preset", type=PresetChoice(), default=None,
                        help="A named preset (see `cotrain config presets`).")(command)


def _cli_layer(values: dict) -> dict:
    layer: dict = {}
    for flag, (_, key) in RUN_OPTIONS.items():
        value = values.get(_param_name(flag))
        if value is None:
            continue
        if key in ("modalities", "students"):
            value = _split_names(value)
        *sections, leaf = key.split(".")
        node = layer
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return layer


def resolve_run_config(preset, config_file, assignments, values: dict):
    """The run config from the command line's layers; a bad value is a ClickException naming it."""
    from .config import resolve_config
    from .presets import preset_layer

    try:
        cfg = resolve_config(preset=preset_layer(preset) if preset else None, file=config_file,
                             cli=_cli_layer(values), assignments=list(assignments))
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise click.ClickException(str(err)) from err
    if values.get("shared_stages") is not None:  # the command line beats a preset's per-modality split points
        cfg.encoders = {k: {f: v for f, v in e.items() if f != "shared_stages"} for k, e in cfg.encoders.items()}
    return cfg


QUIET_HELP = "No progress bars (they are drawn only when stderr is a terminal, and on rank 0 only)."


@main.command("train")
@run_options
@click.option("--quiet", is_flag=True, help=QUIET_HELP)
@click.option("--overwrite", is_flag=True,
              help="--out holds an earlier run: delete that run's files first (without it, such a folder is "
                   "refused, so old scores never sit beside a new model).")
@click.option("--resume", "resume_run", type=click.Path(file_okay=False), default=None,
              help="Continue RUN from its latest checkpoint, with RUN/config.json (other options then only "
                   "change metrics and checkpointing).")
@click.option("--restart", is_flag=True,
              help="With --resume: a run without a checkpoint is trained again from scratch (refused otherwise).")
@click.option("--allow-reshard", is_flag=True,
              help="Resume on a different world size (or changed data settings): the data position restarts "
                   "at the checkpoint's epoch.")
@click.option("--allow-new-shards", is_flag=True,
              help="Resume on shards other than the build the run started on (refused otherwise).")
@click.option("--device", type=click.Choice(["auto", "cpu"]), default="auto", show_default=True,
              help="auto: the GPU when there is one (refused when nvidia-smi sees a GPU torch cannot use); cpu: "
                   "the CPU on purpose.")
def train_cmd(preset, config_file, assignments, quiet, overwrite, resume_run, restart, allow_reshard,
              allow_new_shards, device, **values) -> None:
    """Train a run: co-trained (default), one unimodal baseline, or the multimodal baseline.

    \b
    Example:
      cotrain train --shards shards/ --out runs/cotrain-s0 --preset quick
    """
    from .checkpoint import CheckpointError
    from .device import GpuUnusableError
    from .run_folder import RunFinished, check_new_run
    from .train import train

    try:
        if resume_run:
            cfg = _resume_config(resume_run, values, assignments, restart=restart, allow_new_shards=allow_new_shards)
        else:
            cfg = resolve_run_config(preset, config_file, assignments, values)
            check_new_run(Path(cfg.out), overwrite=overwrite)
        train(cfg, resume=bool(resume_run), allow_reshard=allow_reshard, device=device, progress=not quiet)
    except RunFinished as done:
        click.echo(str(done))
    except (ValueError, FileNotFoundError, CheckpointError, GpuUnusableError) as err:
        raise click.ClickException(str(err)) from err


def _resume_config(run: str, values: dict, assignments, *, restart: bool, allow_new_shards: bool):
    """RUN/config.json, with only checkpoint and metrics settings open to change, after the resume guards."""
    from .config import resolve_config
    from .run_folder import check_resumable, check_same_shards, clear_run

    saved = Path(run) / "config.json"
    if not saved.is_file():
        raise click.ClickException(f"{saved} not found: --resume takes a run directory written by `cotrain train`")
    layer = _cli_layer(values)
    fixed = sorted(k for k in layer if k not in ("checkpoint", "metrics", "out", "shards"))
    if fixed:
        raise click.ClickException(f"--resume continues {run} with its own config; drop {', '.join(fixed)} "
                                   "(or start a new run with --out)")
    check_resumable(Path(run), restart=restart)
    cfg = resolve_config(file=saved, cli=dict(layer, out=run), assignments=list(assignments))  # shards may move
    check_same_shards(Path(run), cfg.shards, allow_new=allow_new_shards)
    if restart and not _has_checkpoint(run):
        clear_run(Path(run))  # from scratch: nothing of the earlier attempt may remain beside the new run
    return cfg


def _has_checkpoint(run: str) -> bool:
    from .checkpoint import latest_tag

    return latest_tag(Path(run)) is not None


@main.group("config")
def config_group() -> None:
    """Inspect run configs.

    \b
    Example:
      cotrain config show --preset emotion --json > run.json
    """


@config_group.command("show")
@run_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object {run, deepspeed} instead of two blocks.")
def config_show_cmd(preset, config_file, assignments, as_json, **values) -> None:
    """Print the resolved run config and the DeepSpeed JSON derived from it (placeholders for --shards/--out).

    The --json output is itself a valid --config file (its "deepspeed" part is derived, so it is ignored).

    \b
    Example:
      cotrain config show --preset emotion --set optim.lr=1e-3 --json > run.json
    """
    from .config import SHOW_PLACEHOLDERS, deepspeed_config

    values = {k: v for k, v in values.items()}
    values["shards"] = values.get("shards") or SHOW_PLACEHOLDERS["shards"]
    values["out"] = values.get("out") or SHOW_PLACEHOLDERS["out"]
    cfg = resolve_run_config(preset, config_file, assignments, values)
    ds = deepspeed_config(cfg, total_steps=1000, bf16=False)
    if as_json:
        click.echo(json.dumps({"run": cfg.to_dict(), "deepspeed": ds}, indent=2))
        return
    click.echo("# run config (RUN/config.json)\n" + json.dumps(cfg.to_dict(), indent=2))
    click.echo("# DeepSpeed config (derived; total_num_steps shown for 1000 steps, bf16 is on with a GPU)\n"
               + json.dumps(ds, indent=2))


@config_group.command("presets")
def config_presets_cmd() -> None:
    """List the named presets and what each sets.

    \b
    Example:
      cotrain config presets
    """
    from .presets import PRESETS

    for name, layer in PRESETS.items():
        click.echo(f"{name}: {json.dumps(layer)}")


@main.command("eval")
@click.option("--run", required=True, type=click.Path(file_okay=False, exists=True), help="A trained run directory.")
@click.option("--split", default="test", show_default=True)
@click.option("--shards", "shards_dir", default=None, type=click.Path(file_okay=False, exists=True),
              help="Shard directory (default: the one the run trained on).")
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Each branch's best-validation weights, or the final weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON instead of the table.")
@click.option("--quiet", is_flag=True, help=QUIET_HELP)
def eval_cmd(run, split, shards_dir, which, as_json, quiet) -> None:
    """Score every branch of RUN on a split; writes RUN/eval-<split>.json.

    \b
    Example:
      cotrain eval --run runs/cotrain-s0 --split test
    """
    from .evaluate import evaluate_run, format_scores, print_warning
    from .progress import progress_wanted

    try:
        result = evaluate_run(run, split=split, shards=shards_dir, which=which,
                              progress=progress_wanted(0, quiet=quiet))  # eval is one process
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(json.dumps(result, indent=2) if as_json else format_scores(result))
    print_warning(result)


@main.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--out", default="report", show_default=True, type=click.Path(file_okay=False),
              help="Folder for report.md, report.json and the plots.")
@click.option("--split", default="test", show_default=True, help="Split to compare (eval-<split>.json).")
def report_cmd(runs, out, split) -> None:
    """Compare runs: each branch trained alone vs co-trained, mean ± std over seeds, with plots.

    \b
    Example:
      cotrain report runs/* --out report/
    """
    from .report import write_report

    try:
        click.echo(write_report(list(runs), out, split=split))
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"written: {Path(out) / 'report.md'}")


@main.command("experiment")
@click.argument("spec", type=click.Path(dir_okay=False, exists=True))
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for runs, corpora and results.  [default: experiments-out/<SPEC's name>]")
@click.option("--task", "tasks", multiple=True, help="Run only this task of the spec (repeatable).")
@click.option("--quick", is_flag=True, help="The same grid at smoke-test scale (tiny corpus, one epoch, one seed).")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Runs trained at once, each with cores/jobs torch threads.")
@click.option("--report", default=None, type=click.Path(dir_okay=False),
              help="Markdown report to write (plots beside it).  [default: OUT/results.md]")
def experiment_cmd(spec, out, tasks, quick, jobs, report) -> None:
    """Run a grid of baselines, co-training and ablations over seeds; write results.json and a report.

    Resumable: finished runs are skipped, so rerun the same command after an interruption.

    \b
    Example:
      cotrain experiment experiments/paper.yaml --quick --jobs 2
    """
    from .experiment import run_experiment

    if jobs < 1:
        raise click.BadParameter(f"--jobs must be at least 1, got {jobs}", param_hint="--jobs")
    out = out or str(Path("experiments-out") / (Path(spec).stem + ("-quick" if quick else "")))
    try:
        run_experiment(spec, out=out, tasks=list(tasks), quick=quick, jobs=jobs, report=report)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err


@main.command("demo")
@click.option("--workdir", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--count", "--n", "n", cls=OldSpellings, old=("--n",), type=click.IntRange(min=1), default=600,
              show_default=True, help="Samples in the synthetic corpus.")
@click.option("--epochs", type=int, default=12, show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds; the table shows mean ± std.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9400, show_default=True,
              help="Prometheus port of the training runs (0: off).")
@click.option("--readme", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Also write the tables into this file between its demo-table markers (make readme-demo).")
def demo_cmd(workdir, n, epochs, seeds, metrics_port, readme) -> None:
    """Synthesize the built-in corpus, build shards, train baselines and the co-trained model, compare.

    \b
    Example:
      cotrain demo --workdir demo-out --count 300 --epochs 4 --seeds 0
    """
    from .demo import run_demo

    try:
        run_demo(workdir=workdir, n=n, epochs=epochs, seeds=[int(s) for s in _split_names(seeds)],
                 metrics_port=metrics_port, readme=readme)
    except ValueError as err:
        raise click.ClickException(str(err)) from err


def _examples_last(command: click.Command) -> None:
    """Move each docstring's closing "Example:" block into the epilog, so every --help ends with it."""
    marker = "\b\nExample:"
    text = inspect.cleandoc(command.help or "")
    if marker in text:
        command.help, example = text.split(marker, 1)
        command.epilog = marker + example
    for sub in getattr(command, "commands", {}).values():
        _examples_last(sub)


_examples_last(main)

if __name__ == "__main__":
    sys.exit(main())
