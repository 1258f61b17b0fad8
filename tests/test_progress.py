"""Progress bars: drawn on rank 0 when stderr is a terminal, never with --quiet, never into a pipe or a log.

CliRunner's stderr is not a terminal, so a plain invoke is the non-terminal case; `terminal` makes
ops.progress see one, as a person at a shell would.
"""
import re

import pytest
from click.testing import CliRunner

import ops.progress
import ops.train
from ops.cli import main
from ops.progress import show_progress

BAR = re.compile(r"\d+/\d+ \[[^\]]*(?:\?|[\d.]+)(?:step|batch|sample)/s")  # done/total [elapsed<left, rate]


@pytest.fixture
def terminal(monkeypatch):
    monkeypatch.setattr(ops.progress, "stderr_is_terminal", lambda: True)


def _train(shards, out, *args):
    result = CliRunner().invoke(main, ["train", "--shards", str(shards), "--out", str(out), "--epochs", "1",
                                       "--mode", "unimodal", "--modalities", "audio", "--metrics-port", "0", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def quiet_run(tiny_shards, tmp_path_factory):
    """(run folder, CliRunner result) of a one-epoch run trained with --quiet on a terminal."""
    run = tmp_path_factory.mktemp("progress") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops.progress, "stderr_is_terminal", lambda: True)
        return run, _train(tiny_shards, run, "--batch-size", "8", "--quiet")


@pytest.mark.parametrize("rank,quiet,isatty,shown", [
    (0, False, True, True),
    (1, False, True, False),   # another rank would draw over rank 0's line
    (0, True, True, False),    # --quiet
    (0, False, False, False),  # a pipe or a log file
])
def test_bars_only_on_rank_0_on_a_terminal_without_quiet(rank, quiet, isatty, shown):
    assert show_progress(rank, quiet=quiet, isatty=isatty) is shown


def test_training_draws_a_step_bar_whose_loss_comes_only_from_read_back_values(tiny_shards, tmp_path, terminal,
                                                                            monkeypatch):
    every_step = lambda *args, **options: ops.progress.progress_bar(*args, **options, mininterval=0, miniters=1)
    monkeypatch.setattr(ops.train, "progress_bar", every_step)  # a redraw per step, so each step can be checked
    result = _train(tiny_shards, tmp_path / "run", "--epochs", "2", "--batch-size", "2", "--set", "eval_every=0")
    draws = [d for d in re.split(r"[\r\n]", result.stderr) if BAR.search(d)]
    assert any(d.startswith("epoch 1/2:") for d in draws) and any(d.startswith("epoch 2/2:") for d in draws)
    assert any(re.search(r"<\d\d:\d\d, *[\d.]+step/s", d) for d in draws)  # time left and rate
    # 11 steps an epoch, read back at the 10th: the loss shows from there on, never before
    first_loss = next(d for d in draws if "loss=" in d)
    assert " 10/11 " in first_loss, draws
    assert re.search(r"^epoch 1/2  loss \d", result.stdout, re.M)  # the one-line epoch summary stays


def test_quiet_training_and_training_into_a_pipe_draw_no_bar(tiny_shards, quiet_run, tmp_path):
    _, quiet = quiet_run
    assert not BAR.search(quiet.stderr) and "epoch 1/1  loss" in quiet.stdout
    piped = _train(tiny_shards, tmp_path / "run", "--batch-size", "8")  # CliRunner's stderr is no terminal
    assert not BAR.search(piped.stderr) and "epoch 1/1  loss" in piped.stdout


@pytest.mark.parametrize("quiet", [False, True])
def test_eval_draws_a_batch_bar_on_a_terminal_unless_quiet(quiet_run, terminal, quiet):
    result = CliRunner().invoke(main, ["eval", "--run", str(quiet_run[0]), "--split", "val",
                                       *(["--quiet"] if quiet else [])])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert bool(re.search(r"scoring audio: .*batch/s", result.stderr)) is not quiet
    assert "audio" in result.stdout  # the table


def test_eval_into_a_pipe_draws_no_bar(quiet_run):
    result = CliRunner().invoke(main, ["eval", "--run", str(quiet_run[0]), "--split", "val"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert not BAR.search(result.stderr)


@pytest.mark.parametrize("quiet", [False, True])
def test_shards_synth_draws_a_sample_bar_on_a_terminal_unless_quiet(tmp_path, terminal, quiet):
    result = CliRunner().invoke(main, ["shards", "synth", "--out", str(tmp_path / "corpus"), "--count", "3",
                                       "--workers", "1", *(["--quiet"] if quiet else [])])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert bool(re.search(r"synth demo: .*3/3 .*sample/s", result.stderr)) is not quiet
    assert (tmp_path / "corpus" / "manifest.jsonl").is_file()
