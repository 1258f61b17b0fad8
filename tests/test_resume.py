"""ops/: layered run config, checkpoints, exact resume after kill -9, SIGTERM, NaN steps, accumulation."""
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ops.checkpoint import CHECKPOINT_DIR, latest_tag
from ops.cli import main
from ops.config import RunConfig, config_hash, deepspeed_config, resolve_config
from ops.engine import free_port
from subprocesses import VENV_BIN, clean_env

BASE = ["--epochs", "2", "--batch-size", "4", "--metrics-port", "0", "--seed", "3"]



def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _digest(run: Path, rank: int = 0) -> str:
    return (run / f"params-rank{rank}.sha256").read_text().strip()


def _launch(run: Path, shards: Path, *args, ranks: int = 1, env: dict | None = None, resume: bool = False):
    train = [str(VENV_BIN / "cotrain"), "train"]
    train += ["--resume", str(run)] if resume else ["--shards", str(shards), "--out", str(run), *BASE, *args]
    cmd = train if ranks == 1 else [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
                                    str(free_port()), *train]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=clean_env(**(env or {})))


# --- the layered config ----------------------------------------------------------------------------------

def test_preset_then_file_then_options_then_set(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("epochs: 7\noptim:\n  lr: 0.01\n  zero_stage: 1\nloader:\n  batch_size: 32\n")
    cfg = resolve_config(preset={"epochs": 2, "loader": {"batch_size": 8}, "seed": 5}, file=file,
                         cli={"shards": "s", "out": "o", "optim": {"zero_stage": 2}},
                         assignments=["optim.lr=3e-4", "fusion.late_fusion=false"])
    assert cfg.seed == 5                      # preset only
    assert cfg.epochs == 7 and cfg.loader.batch_size == 32  # file over preset
    assert cfg.optim.zero_stage == 2          # option over file
    assert cfg.optim.lr == 3e-4 and cfg.fusion.late_fusion is False  # --set last, typed like the default
    assert cfg.optim.weight_decay == RunConfig(shards="s", out="o").optim.weight_decay  # untouched default


def test_config_errors_name_the_key_and_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"optim\.lrr.*valid here: .*lr"):
        resolve_config(cli={"shards": "s", "out": "o"}, assignments=["optim.lrr=1"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"optim": {"learning_rate": 1}}')
    with pytest.raises(ValueError, match=r"optim\.learning_rate.*valid keys of optim"):
        resolve_config(file=bad, cli={"shards": "s", "out": "o"})
    with pytest.raises(ValueError, match="expected an integer"):
        resolve_config(cli={"shards": "s", "out": "o"}, assignments=["epochs=2.5"])


def test_config_show_prints_the_run_config_and_the_derived_deepspeed_json():
    result = _invoke("config", "show", "--zero-stage", "2", "--grad-accum", "3", "--offload-optimizer", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["run"]["optim"]["zero_stage"] == 2
    assert shown["deepspeed"]["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu",
                                                                                        "pin_memory": False}}
    assert shown["deepspeed"]["gradient_accumulation_steps"] == 3


def test_offload_without_zero_is_refused_with_the_fix():
    result = _invoke("config", "show", "--offload-optimizer")
    assert result.exit_code != 0 and "--zero-stage 2" in result.output


def test_config_hash_ignores_where_the_run_lives_but_not_the_math():
    a, b = RunConfig(shards="s", out="o1"), RunConfig(shards="s", out="o2")
    b.checkpoint.save_every, b.metrics.port = 5, 0
    assert config_hash(a) == config_hash(b)
    b.optim.lr *= 2
    assert config_hash(a) != config_hash(b)


def test_the_default_gate_without_teacher_streams_is_refused_before_training_with_the_fix():
    with pytest.raises(ValueError, match="set transfer.gate teacher_correct"):
        resolve_config(cli={"shards": "s", "out": "o"}, assignments=["fusion.stream_loss=false"])


def test_transfer_settings_are_in_the_hash_of_a_cotrained_run_only():
    """A baseline trained under an older transfer default is the same run: grids reuse it."""
    for mode, changes in (("cotrain", True), ("unimodal", False), ("multimodal", False)):
        modalities = ["rgb"] if mode == "unimodal" else []
        a = RunConfig(shards="s", out="o", mode=mode, modalities=modalities)
        b = RunConfig(shards="s", out="o", mode=mode, modalities=modalities)
        b.transfer.gate = "teacher_correct" if a.transfer.gate != "teacher_correct" else "none"
        assert (config_hash(a) != config_hash(b)) is changes, mode


# --- accumulation, NaN, SIGTERM -------------------------------------------------------------------------

def test_a_partial_accumulation_group_at_epoch_end_is_stepped(tiny_shards, tmp_path):
    from ops.train import Trainer

    cfg = resolve_config(cli={"shards": str(tiny_shards), "out": str(tmp_path / "r"), "epochs": 2, "seed": 1,
                              "loader": {"batch_size": 4}, "metrics": {"port": 0}, "optim": {"grad_accum": 2}})
    trainer = Trainer(cfg)
    steps = trainer.loader.steps_per_epoch
    assert steps % 2 == 1, "the fixture should leave a partial group"
    assert trainer.fit()
    assert trainer.engine.global_steps == 2 * math.ceil(steps / 2)
    assert trainer.scheduler.last_batch_iteration == trainer.engine.global_steps - 1  # one LR step per update


def test_nonfinite_losses_are_skipped_then_stop_the_run(tiny_shards, tmp_path, monkeypatch):
    import ops.train as train_module

    real, calls = train_module.step_loss, {"n": 0}

    def poisoned(*args, **kwargs):  # steps 3 and 4 are NaN, then from step 8 on every step is
        calls["n"] += 1
        loss, terms = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] in (3, 4) or calls["n"] >= 8 else loss), terms

    monkeypatch.setattr(train_module, "step_loss", poisoned)
    run = tmp_path / "nan"
    cfg = resolve_config(cli={"shards": str(tiny_shards), "out": str(run), "epochs": 4, "loader": {"batch_size": 4},
                              "metrics": {"port": 0}, "checkpoint": {"save_every": 2, "max_bad_steps": 3}})
    trainer = train_module.Trainer(cfg)
    with pytest.raises(FloatingPointError, match="3 steps in a row.*last good checkpoint"):
        trainer.fit()
    assert trainer.state.bad_total == 5  # two isolated skips, then three in a row
    assert trainer.engine.global_steps == 5  # 7 good steps minus the two skipped
    assert 'reason="nonfinite_loss"' in trainer.metrics.exposition()
    tag = latest_tag(run)
    assert tag == "step-00000006" and (run / CHECKPOINT_DIR / tag / "meta.json").is_file()
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())


def test_sigterm_checkpoints_exits_zero_and_the_run_resumes(tiny_shards, tmp_path):
    run = tmp_path / "term"
    done = _launch(run, tiny_shards, env={"COTRAIN_FAULT_SIGTERM_AT_STEP": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SIGTERM: checkpoint saved" in done.stdout and not (run / "model.pt").exists()
    assert latest_tag(run) == "step-00000004"  # finished the step after the signal, then saved
    resumed = _launch(run, tiny_shards, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout and (run / "model.pt").is_file()


def test_resume_refuses_changed_options_and_missing_runs(tmp_path):
    result = _invoke("train", "--resume", tmp_path / "nothing")
    assert result.exit_code != 0 and "config.json not found" in result.output
    (tmp_path / "config.json").write_text(json.dumps({"shards": "s", "out": str(tmp_path)}))
    result = _invoke("train", "--resume", tmp_path, "--lr", "0.1")
    assert result.exit_code != 0 and "drop optim" in result.output


def test_checkpoints_keep_the_newest_complete_ones(tiny_shards, tmp_path):
    run = tmp_path / "keep"
    assert _invoke("train", "--shards", tiny_shards, "--out", run, *BASE, "--save-every", "1",
                   "--keep-checkpoints", "2").exit_code == 0
    kept = sorted(p.name for p in (run / CHECKPOINT_DIR).glob("step-*"))
    assert len(kept) == 2 and latest_tag(run) == kept[-1]
    assert all((run / CHECKPOINT_DIR / k / "meta.json").is_file() and (run / CHECKPOINT_DIR / k / "rank-0.pt").is_file()
               for k in kept)


# --- exact resume after kill -9 ----------------------------------------------------------------------------

def _kill_then_resume(run: Path, shards: Path, args: list, *, kill_at: int, ranks: int):
    killed = _launch(run, shards, *args, ranks=ranks, env={"COTRAIN_FAULT_KILL_AT_STEP": str(kill_at)})
    assert killed.returncode != 0 and not (run / "model.pt").exists(), "the run should have died"
    assert latest_tag(run) is not None
    return killed


def test_kill9_mid_epoch_then_resume_gives_bit_identical_parameters_one_rank(tiny_shards, tmp_path, monkeypatch):
    import shutil

    args = ["--save-every", "4"]  # checkpoint after step 4 of 5 in epoch 1; killed in epoch 2
    whole = _launch(tmp_path / "whole", tiny_shards, *args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "killed"
    _kill_then_resume(run, tiny_shards, args, kill_at=7, ranks=1)
    assert latest_tag(run) == "step-00000004"
    control = tmp_path / "control"
    shutil.copytree(run, control)

    resumed = _launch(run, tiny_shards, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout and "batch 4/5" in resumed.stdout
    assert _digest(run) == _digest(tmp_path / "whole")
    # every epoch's entry, train losses over the whole interrupted epoch included
    assert json.loads((run / "history.json").read_text()) == json.loads((tmp_path / "whole" / "history.json").read_text())

    # negative control: the same resume without restoring the loader's position must not match
    from pipeline.loader import BaseLoader
    monkeypatch.setattr(BaseLoader, "load_state_dict", lambda self, state: None)
    result = _invoke("train", "--resume", control)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert _digest(control) != _digest(tmp_path / "whole")


def test_kill9_of_both_ranks_then_resume_gives_bit_identical_parameters_two_ranks(tiny_shards, tmp_path):
    args = ["--save-every", "1", "--epochs", "3"]
    whole = _launch(tmp_path / "whole", tiny_shards, *args, ranks=2)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    run = tmp_path / "killed"
    _kill_then_resume(run, tiny_shards, args, kill_at=3, ranks=2)
    resumed = _launch(run, tiny_shards, ranks=2, resume=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    for rank in (0, 1):
        assert _digest(run, rank) == _digest(tmp_path / "whole", rank)


def test_resume_on_another_world_size_is_refused_unless_resharded(tiny_shards, tmp_path):
    run = tmp_path / "one"
    _kill_then_resume(run, tiny_shards, ["--save-every", "2"], kill_at=3, ranks=1)
    refused = _launch(run, tiny_shards, ranks=2, resume=True)
    assert refused.returncode != 0 and "world size 1 -> 2" in refused.stdout + refused.stderr
    train = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
             str(VENV_BIN / "cotrain"), "train", "--resume", str(run), "--allow-reshard"]
    resharded = subprocess.run(train, capture_output=True, text=True, timeout=600, env=clean_env())
    assert resharded.returncode == 0, resharded.stdout[-3000:] + resharded.stderr[-3000:]
    assert "restarts the data position" in resharded.stdout and (run / "model.pt").is_file()


# --- every ZeRO stage with the co-trained model -----------------------------------------------------------

@pytest.mark.parametrize("stage,extra", [(1, []), (2, ["--offload-optimizer", "--grad-accum", "2"]), (3, [])])
def test_zero_stages_train_two_ranks_to_identical_parameters(tiny_shards, tmp_path, stage, extra):
    run = tmp_path / f"zero{stage}"
    done = _launch(run, tiny_shards, "--zero-stage", str(stage), *extra, ranks=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _digest(run, 0) == _digest(run, 1)
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]  # validated every epoch, ZeRO-3 included
    assert set(json.loads((run / "eval-val.json").read_text())["branches"]) == {"rgb", "audio", "text", "multimodal"}
    # each branch's best weights are a whole fp32 state (under ZeRO-3: the one gathered for validation)
    final = torch.load(run / "model.pt", weights_only=False)["state_dict"]
    for branch in ("rgb", "audio", "text", "multimodal"):
        best = torch.load(run / "best" / f"{branch}.pt")
        assert best.keys() == final.keys() and all(v.dtype == torch.float32 for v in best.values())
