"""ops/: run folders are never mixed or clobbered, resumes continue the same run on the same data, the
rendezvous store listens on loopback only, and DeepSpeed's routine warnings stay out of the output."""
import json
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from ops.cli import main
from subprocesses import VENV_BIN, clean_env

TRAIN = ["--epochs", "1", "--batch-size", "4", "--metrics-port", "0", "--save-every", "2"]


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_shards, tmp_path_factory) -> Path:
    """One epoch, checkpointed every 2 steps, then evaluated on test."""
    run = tmp_path_factory.mktemp("runs") / "done"
    result = _invoke("train", "--shards", tiny_shards, "--out", run, *TRAIN)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert _invoke("eval", "--run", run, "--split", "test").exit_code == 0
    return run


def _unfinished_copy(finished_run: Path, tmp_path: Path) -> Path:
    """The run as a kill after its last checkpoint leaves it: no model.pt."""
    run = tmp_path / "unfinished"
    shutil.copytree(finished_run, run)
    (run / "model.pt").unlink()
    return run


def test_train_over_an_existing_run_is_refused_and_changes_nothing(finished_run, tiny_shards):
    before = _snapshot(finished_run)
    result = _invoke("train", "--shards", tiny_shards, "--out", finished_run, *TRAIN)
    assert result.exit_code != 0 and "already holds a run" in result.output and "--overwrite" in result.output
    assert "eval-test.json" in result.output
    assert _snapshot(finished_run) == before


def test_resuming_a_finished_run_says_so_and_changes_nothing(finished_run):
    before = _snapshot(finished_run)
    result = _invoke("train", "--resume", finished_run)
    assert result.exit_code == 0 and "is finished" in result.output
    assert _snapshot(finished_run) == before


def test_resuming_a_run_without_a_checkpoint_is_refused_unless_restart(finished_run, tmp_path):
    run = _unfinished_copy(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints")
    before = _snapshot(run)
    result = _invoke("train", "--resume", run)
    assert result.exit_code != 0 and "no checkpoint" in result.output and "--restart" in result.output
    assert _snapshot(run) == before


def test_resuming_with_a_changed_config_lists_the_keys_that_differ(finished_run, tmp_path):
    run = _unfinished_copy(finished_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["transfer"]["alpha"] = 0.123
    (run / "config.json").write_text(json.dumps(config))
    result = _invoke("train", "--resume", run)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert "transfer.alpha:" in result.output and "-> 0.123" in result.output and "Traceback" not in result.output


def test_resuming_on_another_shard_build_is_refused_unless_allowed(finished_run, tiny_shards, tmp_path):
    run = _unfinished_copy(finished_run, tmp_path)
    other = tmp_path / "other-shards"
    shutil.copytree(tiny_shards, other)
    description = json.loads((other / "dataset.json").read_text())
    description["seed"] += 1  # another build of the same corpus
    (other / "dataset.json").write_text(json.dumps(description))
    config_before = (run / "config.json").read_bytes()
    result = _invoke("train", "--resume", run, "--shards", other)
    assert result.exit_code != 0 and "--allow-new-shards" in result.output and str(other) in result.output
    assert (run / "config.json").read_bytes() == config_before
    moved = tmp_path / "moved-shards"  # the same build in another place is the same data
    shutil.copytree(tiny_shards, moved)
    from ops.run_folder import check_same_shards
    check_same_shards(run, moved, allow_new=False)
    check_same_shards(run, other, allow_new=True)


def _listening(pid: int) -> set[str]:
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        return {c.laddr.ip for p in processes for c in p.net_connections(kind="inet") if c.status == "LISTEN"}
    except psutil.Error:
        return set()


def test_overwrite_clears_the_old_run_and_a_run_listens_on_loopback_only_without_noise(finished_run, tiny_shards,
                                                                                         tmp_path):
    run = tmp_path / "again"
    shutil.copytree(finished_run, run)
    (run / "plots" / "old.png").write_bytes(b"stale")
    (run / "notes.txt").write_text("mine")  # not a run file: kept
    cmd = [str(VENV_BIN / "cotrain"), "train", "--shards", str(tiny_shards), "--out", str(run), *TRAIN,
           "--overwrite"]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env())
    seen = set()
    while child.poll() is None:
        seen |= _listening(child.pid)
        time.sleep(0.05)
    output = child.stdout.read()
    assert child.returncode == 0, output[-3000:]
    assert seen and seen <= {"127.0.0.1"}, seen  # the rendezvous store (and gloo) on loopback only
    assert "Setting accelerator to CPU" not in output and "Attempting to get learning rate" not in output
    assert not (run / "eval-test.json").exists() and not (run / "plots").exists()
    assert (run / "model.pt").is_file() and (run / "notes.txt").read_text() == "mine"



def test_eval_on_incompatible_shards_names_what_differs(finished_run, tiny_shards, tmp_path):
    other = tmp_path / "other-shards"
    shutil.copytree(tiny_shards, other)
    description = json.loads((other / "dataset.json").read_text())
    description["label"]["num_classes"] = 3
    description["modalities"]["rgb"]["frames"] += 2
    (other / "dataset.json").write_text(json.dumps(description))
    result = _invoke("eval", "--run", finished_run, "--shards", other)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert "classes: the run has 6, the shards 3" in result.output and "rgb.frames" in result.output
    description["label"] = {"type": "regression", "dim": 1}
    del description["modalities"]["audio"]
    (other / "dataset.json").write_text(json.dumps(description))
    result = _invoke("eval", "--run", finished_run, "--shards", other)
    assert "task: the run is class, the shards are regression" in result.output
    assert "modality audio: the run reads it, the shards lack it" in result.output
