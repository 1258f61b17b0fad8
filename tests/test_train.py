"""ops/: training under DeepSpeed in every mode, evaluation JSON, metrics endpoint, two ranks."""
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from ops.cli import main
from ops.config import RunConfig, deepspeed_config, load_config
from ops.engine import free_port
from subprocesses import VENV_BIN, clean_env




def _train(shards, out, *args):
    result = CliRunner().invoke(main, ["train", "--shards", str(shards), "--out", str(out), "--epochs", "1",
                                       "--batch-size", "4", "--metrics-port", "0", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.mark.parametrize("mode,modalities,branches", [
    ("cotrain", None, {"rgb", "audio", "text", "multimodal"}),
    ("unimodal", "audio", {"audio"}),
    ("multimodal", None, {"multimodal"}),
])
def test_one_epoch_in_each_mode_then_eval_writes_json(tiny_shards, tmp_path, mode, modalities, branches):
    run = tmp_path / mode
    _train(tiny_shards, run, "--mode", mode, *(["--modalities", modalities] if modalities else []))
    assert (run / "model.pt").is_file() and (run / "config.json").is_file()
    assert load_config(run / "config.json").mode == mode
    assert not (run / "best" / "multimodal").exists()  # fusion.assemble off: no teacher parts kept

    result = CliRunner().invoke(main, ["eval", "--run", str(run), "--split", "test"])
    assert result.exit_code == 0, result.output
    written = json.loads((run / "eval-test.json").read_text())
    assert written["split"] == "test"
    assert set(written["branches"]) == branches
    assert all(0.0 <= b["accuracy"] <= 1.0 for b in written["branches"].values())
    assert all(b["samples"] > 0 for b in written["branches"].values())
    for branch, score in written["branches"].items():
        assert branch in result.output
        assert 0.0 <= score["macro_f1"] <= 1.0
        assert sum(map(sum, score["confusion"])) == score["samples"]
        assert (run / "plots" / f"confusion-test-{branch}.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (run / "predictions-test.jsonl").read_text().splitlines()]
    assert len({r["key"] for r in rows}) == len(rows) == max(b["samples"] for b in written["branches"].values())
    for branch, score in written["branches"].items():  # the saved outputs give the scores eval printed
        hits = [max(range(6), key=r["outputs"][branch].__getitem__) == r["label"] for r in rows
                if branch in r["outputs"]]
        assert len(hits) == score["samples"] and sum(hits) / len(hits) == pytest.approx(score["accuracy"])


def test_loader_backend_picks_the_training_loader_and_the_epoch_line_reports_the_data_wait(tiny_shards, tmp_path,
                                                                                           monkeypatch):
    import re

    from pipeline import loader as loaders

    chosen = []
    original = loaders.make_loader
    monkeypatch.setattr("ops.train.make_loader", lambda *a, **k: chosen.append(k["backend"]) or original(*a, **k))
    result = _train(tiny_shards, tmp_path / "wds", "--mode", "unimodal", "--modalities", "audio",
                    "--set", "loader.backend=wds", "--set", "loader.workers=0")
    assert chosen and set(chosen) == {"wds"}
    wait = re.findall(r"epoch 1/1 .* samples/s  data wait ([\d.]+)%", result.output)
    assert wait and 0.0 <= float(wait[0]) <= 100.0


def test_the_validation_guard_stops_transfer_to_a_student_the_teacher_does_not_lead(tiny_shards, tmp_path):
    run = tmp_path / "guarded"  # a margin of 0.99 asks the teacher for 1% of the student's error: never met
    _train(tiny_shards, run, "--epochs", "2", "--transfer-start", "0", "--transfer-warmup", "0",
           "--transfer-gate", "none", "--guard-margin", "0.99")
    history = json.loads((run / "history.json").read_text())
    assert "rgb_transfer_loss" in history[0]["train"]  # before the first validation every student transfers
    assert history[0]["transfer_muted"] == ["audio", "rgb", "text"]
    assert not any(k.endswith("_transfer_loss") for k in history[1]["train"])

    free = tmp_path / "unguarded"
    _train(tiny_shards, free, "--epochs", "2", "--transfer-start", "0", "--transfer-gate", "none",
           "--transfer-guard", "none", "--guard-margin", "0.99")
    history = json.loads((free / "history.json").read_text())
    assert "rgb_transfer_loss" in history[1]["train"] and "transfer_muted" not in history[0]


def test_unimodal_mode_needs_exactly_one_modality(tiny_shards, tmp_path):
    result = CliRunner().invoke(main, ["train", "--shards", str(tiny_shards), "--out", str(tmp_path / "r"),
                                       "--mode", "unimodal"])
    assert result.exit_code != 0 and "--modalities NAME" in result.output


def test_eval_of_a_missing_run_says_what_to_do(tmp_path):
    result = CliRunner().invoke(main, ["eval", "--run", str(tmp_path)])
    assert result.exit_code != 0 and "train first" in result.output


def test_deepspeed_config_is_derived_from_the_run_config():
    cfg = RunConfig(shards="s", out="o")
    cfg.optim.zero_stage = 2
    ds = deepspeed_config(cfg, total_steps=100, bf16=False)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == cfg.loader.batch_size and "train_batch_size" not in ds
    assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr and ds["optimizer"]["params"]["torch_adam"]
    assert ds["scheduler"]["type"] == "WarmupCosineLR" and ds["scheduler"]["params"]["total_num_steps"] == 100
    assert ds["gradient_clipping"] == cfg.optim.grad_clip and ds["branch_clipping"] == 0
    # clipped per branch inside the optimizer (ops/optimizer.py), so DeepSpeed's global clipping is off
    cfg.optim.clip_scope = "branch"
    ds = deepspeed_config(cfg, total_steps=100, bf16=False)
    assert ds["branch_clipping"] == cfg.optim.grad_clip and ds["gradient_clipping"] == 0


def test_metrics_endpoint_answers_during_training(tiny_shards, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    proc = subprocess.Popen([str(VENV_BIN / "cotrain"), "train", "--shards", str(tiny_shards), "--out",
                             str(tmp_path / "run"), "--epochs", "30", "--batch-size", "4", "--metrics-port", str(port),
                             "--transfer-start", "0", "--transfer-warmup", "0", "--set", "eval_every=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env())
    body, deadline = "", time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                body = urllib.request.urlopen(url, timeout=2).read().decode()
                if 'cotrain_steps_total{rank="0"}' in body and 'term="transfer"' in body:
                    break
            except OSError:
                pass
            time.sleep(0.2)
    finally:
        proc.kill()
        output = proc.communicate()[0]
    assert 'cotrain_steps_total{rank="0"}' in body, output[-3000:]
    for name in ("cotrain_total_loss", "cotrain_samples_per_second", "cotrain_step_duration_seconds_bucket",
                 "cotrain_samples_total", "cotrain_learning_rate", "cotrain_last_step_timestamp_seconds"):
        assert name in body
    for branch in ("rgb", "audio", "text", "multimodal"):
        assert f'branch="{branch}",rank="0",term="task"' in body
    assert 'branch="rgb",rank="0",term="transfer"' in body


def test_two_ranks_under_the_deepspeed_launcher_end_with_identical_parameters(tiny_shards, tmp_path):
    run = tmp_path / "two"
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(VENV_BIN / "cotrain"), "train", "--shards", str(tiny_shards), "--out", str(run), "--epochs", "2",
           "--batch-size", "4", "--metrics-port", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=clean_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    digests = [(run / f"params-rank{r}.sha256").read_text() for r in range(2)]
    assert digests[0] == digests[1]
    assert "2 rank(s)" in done.stdout


def _fake_run(root: Path, name: str, mode: str, modalities: list, seed: int, scores: dict) -> Path:
    run = root / f"{name}-{seed}"
    run.mkdir()
    cfg = RunConfig(shards="s", out=str(run), mode=mode, modalities=modalities, seed=seed)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    branches = {b: {"accuracy": v, "samples": 10} for b, v in scores.items()}
    (run / "eval-test.json").write_text(json.dumps({"split": "test", "task": "class", "branches": branches}))
    (run / "history.json").write_text(json.dumps([{"epoch": e, "val": scores} for e in (1, 2)]))
    return run


def test_report_compares_each_branch_with_its_baseline_over_seeds(tmp_path):
    runs = [_fake_run(tmp_path, "uni", "unimodal", ["a"], 0, {"a": 0.5}),
            _fake_run(tmp_path, "uni", "unimodal", ["a"], 1, {"a": 0.7}),
            _fake_run(tmp_path, "mm", "multimodal", [], 0, {"multimodal": 0.8}),
            _fake_run(tmp_path, "co", "cotrain", [], 0, {"a": 0.7, "multimodal": 0.9}),
            _fake_run(tmp_path, "co", "cotrain", [], 1, {"a": 0.7, "multimodal": 0.9})]
    result = CliRunner().invoke(main, ["report", *map(str, runs), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "| a | 60.0 ± 10.0 | 70.0 ± 0.0 | +10.0 | 90.0 ± 0.0 |" in result.output
    assert "| multimodal | 80.0 | 90.0 ± 0.0 | +10.0 |  |" in result.output
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["cotrain"]
    assert rows[0]["alone"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1), "n": 2}
    assert (tmp_path / "rep" / "bars.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "curves.png").stat().st_size > 1000


def _predictions(run: Path, branch: str, rows: list[tuple[str, int, list]]) -> None:
    (run / "predictions-test.jsonl").write_text("".join(
        json.dumps({"key": key, "label": label, "outputs": {branch: logits}}) + "\n" for key, label, logits in rows))


def test_report_adds_late_fusion_of_the_baselines_from_their_predictions(tmp_path):
    """Each baseline is right on 2 of 3 samples, on different ones, and confident where it is right: the
    product of their probabilities is right on all 3, which neither baseline is."""
    runs = [_fake_run(tmp_path, "uni-a", "unimodal", ["a"], 0, {"a": 2 / 3}),
            _fake_run(tmp_path, "uni-b", "unimodal", ["b"], 0, {"b": 2 / 3}),
            _fake_run(tmp_path, "co", "cotrain", [], 0, {"a": 0.7, "b": 0.7, "multimodal": 0.9})]
    _predictions(runs[0], "a", [("k0", 0, [4.0, 0.0]), ("k1", 1, [0.0, 4.0]), ("k2", 0, [0.0, 0.5])])
    _predictions(runs[1], "b", [("k0", 0, [0.5, 0.0]), ("k1", 1, [0.3, 0.0]), ("k2", 0, [4.0, 0.0])])
    result = CliRunner().invoke(main, ["report", *map(str, runs), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "| late fusion of the baselines | 100.0 | n/a | n/a |  |" in result.output
    _predictions(runs[1], "b", [("k0", 0, [0.5, 0.0]), ("k1", 1, [5.0, 0.0]), ("k2", 0, [4.0, 0.0])])
    result = CliRunner().invoke(main, ["report", *map(str, runs), "--out", str(tmp_path / "rep")])
    assert "| late fusion of the baselines | 66.7 | n/a | n/a |  |" in result.output  # k1 now outvoted


def test_report_without_a_cotrained_run_says_what_to_add(tmp_path):
    run = _fake_run(tmp_path, "uni", "unimodal", ["a"], 0, {"a": 0.5})
    result = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "rep")])
    assert result.exit_code != 0 and "no co-trained run" in result.output


def _demo(workdir: Path, *args: str):
    result = CliRunner().invoke(main, ["demo", "--workdir", str(workdir), "--n", "40", "--epochs", "1",
                                       "--seeds", "0", "--metrics-port", "0", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_demo_runs_every_stage_prints_the_table_and_repeats_it_exactly(tmp_path):
    """Twice from the same shards, the demo prints the same tables (what the README quotes must be what a
    user's `make demo` prints), and --readme writes them between the markers."""
    first = _demo(tmp_path / "a")
    assert "| branch | trained alone | co-trained | difference |" in first.output
    for branch in ("rgb", "audio", "text", "multimodal", "late fusion of the baselines"):
        assert f"| {branch} |" in first.output
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [r["branch"] for r in saved["rows"]] == ["rgb", "audio", "text", "multimodal",
                                                    "late fusion of the baselines"]
    runs = sorted(p.name for p in (tmp_path / "a" / "runs").iterdir())
    assert runs == ["cotrain-seed0", "multimodal-seed0", "unimodal-audio-seed0", "unimodal-rgb-seed0",
                    "unimodal-text-seed0"]
    for stage in ("corpus", "shards"):  # the same inputs; every run trained again
        shutil.copytree(tmp_path / "a" / stage, tmp_path / "b" / stage)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo-table: begin -->\nold table\n<!-- demo-table: end -->\nrest\n")
    _demo(tmp_path / "b", "--readme", str(readme))
    tables = [(tmp_path / w / "results.md").read_text() for w in ("a", "b")]
    assert tables[0] == tables[1]
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert saved["rows"][0]["branch"] in text and "| late fusion of the baselines |" in text

    # a finished run whose config differs from what the demo asks now is trained again, not reused
    run = tmp_path / "b" / "runs" / "unimodal-rgb-seed0"
    stale = json.loads((run / "config.json").read_text())
    stale["optim"]["lr"] = 0.5
    (run / "config.json").write_text(json.dumps(stale))
    (run / "eval-test.json").write_text("{}")
    result = _demo(tmp_path / "b")
    assert result.output.count("training it again") == 1 and "unimodal-rgb-seed0 was trained with" in result.output
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] != 0.5
    assert (tmp_path / "b" / "results.md").read_text() == tables[0]

    # and so is one trained by another version of the code under the same config (a default resolved at build
    # time once put an older model's scores in the README)
    (run / "code.sha256").write_text("0123456789abcdef\n")
    result = _demo(tmp_path / "b")
    assert result.output.count("training it again") == 1 and "another version of the code" in result.output
    assert (run / "code.sha256").read_text().strip() != "0123456789abcdef"
    assert (tmp_path / "b" / "results.md").read_text() == tables[0]


def test_two_launchers_as_two_nodes_without_ssh_train_together(tiny_shards, tmp_path):
    """The multi-node recipe of the README on one machine: node 0 and node 1 on 127.0.0.1, no SSH."""
    hostfile, run, port = tmp_path / "hostfile", tmp_path / "nodes", str(free_port())
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    launchers = [subprocess.Popen(
        [str(VENV_BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
         "--master_addr", "127.0.0.1", "--master_port", port, str(VENV_BIN / "cotrain"), "train",
         "--shards", str(tiny_shards), "--out", str(run), "--epochs", "1", "--batch-size", "4", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env()) for node in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "nnodes=2" in outputs[0] and "2 rank(s)" in outputs[0]
    assert (run / "params-rank0.sha256").read_text() == (run / "params-rank1.sha256").read_text()


# --- CPU threads per rank ----------------------------------------------------------------------------------

RANK_THREADS = """
import os, sys
from ops.engine import init_distributed, rank_info
import torch
init_distributed()
rank, _, _ = rank_info()
open(os.path.join(sys.argv[-1], f"threads-rank{rank}"), "w").write(str(torch.get_num_threads()))  # --local_rank comes first
"""


def _cores() -> int:
    import os
    return len(os.sched_getaffinity(0))


def test_two_ranks_on_one_machine_share_its_cores(tmp_path):
    script = tmp_path / "threads.py"
    script.write_text(RANK_THREADS)
    env = clean_env()
    env.pop("OMP_NUM_THREADS", None)
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), str(script),
           str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    threads = [int((tmp_path / f"threads-rank{r}").read_text()) for r in range(2)]
    assert threads == [max(1, _cores() // 2)] * 2  # 1 each on a 2-core machine, not torch's default of 2


def test_a_second_run_in_one_process_gets_its_own_thread_count():
    """The learning guard asks for one thread so its sums are the same everywhere; in the suite a run before it
    had initialised the process group, and it trained with that run's two threads."""
    import torch

    from ops.engine import init_distributed

    before = torch.get_num_threads()
    try:
        init_distributed(2)
        init_distributed(1)  # the group exists now: only the threads change
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_explicit_thread_counts_win_over_the_share(monkeypatch):
    from ops.engine import cpu_threads_per_rank

    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads_per_rank() == max(1, _cores() // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads_per_rank() == 3          # the user's environment
    assert cpu_threads_per_rank(requested=5) == 5  # the run config's cpu_threads, over both
    monkeypatch.setenv("LOCAL_SIZE", str(4 * _cores()))
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads_per_rank() == 1          # more ranks than cores: never 0
