"""`cotrain experiment`: spec checks, the grid's shared runs, resume, results.json and the report."""
import json
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml

from ops.late_fusion import late_fusion_scores

from ops.experiment import load_spec, plan_grid
from ops.results_report import MARKER, verdict
from subprocesses import VENV_BIN, clean_env

REPO = Path(__file__).resolve().parents[1]


def _spec(tmp_path: Path, data: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _experiment(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "cotrain"), "experiment", *map(str, args)], capture_output=True, text=True,
                          env=clean_env(), cwd=cwd, timeout=1500)


@pytest.mark.parametrize("data,expected", [
    ({"tasks": {}}, "`tasks` must map task names"),
    ({"tasks": {"t": {}}, "seed": [0]}, "unknown keys ['seed']"),
    ({"tasks": {"t": {}}, "seeds": "0,1"}, "`seeds` must be a non-empty list of integers"),
    ({"tasks": {"t": {"corpus": {"synth": "gesture", "shards": "x"}}}}, "give either synth: TASK"),
    ({"tasks": {"t": {"ablation": {}}}}, "tasks.t: unknown keys ['ablation']"),
    ({"tasks": {"t": {}}, "ablations": {"alpha": {"alpha=0": 0}}}, "ablations.alpha.alpha=0: expected a mapping"),
])
def test_a_bad_spec_names_the_key_and_the_fix(tmp_path, data, expected):
    with pytest.raises(ValueError, match=None) as err:
        load_spec(_spec(tmp_path, data))
    assert expected in str(err.value)


def test_a_bad_config_key_in_a_variant_names_the_variant(tiny_shards, tmp_path):
    spec = load_spec(_spec(tmp_path, {"tasks": {"tiny": {"corpus": {"shards": str(tiny_shards)}}},
                                      "ablations": {"alpha": {"alpha=0": {"transfer.alfa": 0}}}}))
    with pytest.raises(ValueError) as err:
        plan_grid(spec, tmp_path / "out")
    assert "tasks.tiny.ablations.alpha.alpha=0" in str(err.value) and "alfa" in str(err.value)


def test_variants_equal_to_the_default_share_its_run(tiny_shards, tmp_path):
    spec = load_spec(_spec(tmp_path, {
        "seeds": [0, 1], "tasks": {"tiny": {"corpus": {"shards": str(tiny_shards)}}},
        "ablations": {"alpha": {"alpha=0": {"transfer.alpha": 0}, "alpha=1": {"transfer": {"alpha": 1.0}}},
                      "depth": {"shared=1": {"shared_stages": 1}, "shared=0": {"shared_stages": 0}}}}))
    cells = plan_grid(spec, tmp_path / "out")
    by_entry = {(c.entry, c.seed): c.run for c in cells}
    for seed in (0, 1):
        assert by_entry[("alpha/alpha=1", seed)] == by_entry[("cotrain", seed)] == by_entry[("depth/shared=1", seed)]
        assert by_entry[("alpha/alpha=0", seed)] != by_entry[("cotrain", seed)]
    assert by_entry[("cotrain", 0)] != by_entry[("cotrain", 1)]
    # 3 unimodal + multimodal + cotrain + alpha=0 + shared=0, per seed
    assert len({c.run for c in cells}) == 2 * 7


def _primary(run: Path, branch: str) -> float:
    return json.loads((run / "eval-test.json").read_text())["branches"][branch]["accuracy"]


def test_grid_writes_results_resumes_and_refuses_a_changed_spec(tiny_shards, tmp_path):
    data = {"seeds": [0, 1], "config": {"epochs": 1, "loader": {"batch_size": 8}},
            "tasks": {"tiny": {"corpus": {"shards": str(tiny_shards)}}},
            "ablations": {"alpha": {"alpha=0": {"transfer.alpha": 0}, "alpha=1": {}}}}
    spec, out = _spec(tmp_path, data), tmp_path / "out"
    done = _experiment(spec, "--out", out, "--jobs", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "12 to train" in done.stdout  # (3 unimodal + multimodal + cotrain + alpha=0) x 2 seeds

    results = json.loads((out / "results.json").read_text())["tiny"]
    assert set(results) == {"unimodal", "multimodal", "cotrain", "late_fusion", "alpha/alpha=0", "alpha/alpha=1"}
    assert set(results["unimodal"]) == {"rgb", "audio", "text"}
    assert set(results["cotrain"]) == {"rgb", "audio", "text", "multimodal"}
    assert results["alpha/alpha=1"] == results["cotrain"]
    runs = out / "runs" / "tiny"
    for branch in ("rgb", "multimodal"):
        values = [_primary(runs / f"cotrain-seed{s}", branch) for s in (0, 1)]
        assert results["cotrain"][branch] == {"mean": pytest.approx(statistics.mean(values)),
                                              "std": pytest.approx(statistics.pstdev(values)), "n": 2}
    assert results["unimodal"]["audio"]["mean"] == pytest.approx(
        statistics.mean(_primary(runs / f"unimodal-audio-seed{s}", "audio") for s in (0, 1)))
    fused = [late_fusion_scores([runs / f"unimodal-{m}-seed{s}" for m in ("rgb", "audio", "text")], "test",
                                "class")["accuracy"] for s in (0, 1)]
    assert results["late_fusion"]["multimodal"]["mean"] == pytest.approx(statistics.mean(fused))
    details = json.loads((out / "results-details.json").read_text())["tiny"]
    assert details["metric"] == "accuracy" and set(details["val"]) == set(results)
    assert details["teacher"]["cotrain"] == results["cotrain"]["multimodal"]

    report = (out / "results.md").read_text()
    assert MARKER in report and "### Ablation: alpha" in report and "Chosen on validation" in report
    assert "| late fusion of the baselines |" in report and "Goals of the defaults" in report
    assert (out / "results" / "tiny-baselines.png").stat().st_size > 1000
    assert (out / "results" / "tiny-alpha.png").stat().st_size > 1000

    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/model.pt")}
    (out / "results.md").write_text("# Results\n\nOur findings.\n\n" + MARKER + "\nstale\n")
    again = _experiment(spec, "--out", out)
    assert again.returncode == 0 and "12 already done, 0 to train" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/model.pt")} == stamps
    kept = (out / "results.md").read_text()
    assert kept.startswith("# Results\n\nOur findings.") and "stale" not in kept

    data["config"]["optim"] = {"lr": 0.01}
    changed = _experiment(_spec(tmp_path, data), "--out", out)
    assert changed.returncode != 0 and "the spec changed" in changed.stderr
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/model.pt")} == stamps


def test_quick_grid_of_the_shipped_spec_runs_every_cell(tmp_path):
    """The CI-sized version of experiments/paper.yaml: every task, every ablation variant, one seed."""
    out = tmp_path / "quick"
    done = _experiment(REPO / "experiments" / "paper.yaml", "--quick", "--out", out, "--jobs", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    spec = load_spec(REPO / "experiments" / "paper.yaml")
    assert set(results) == set(spec.tasks)
    for name, task in spec.tasks.items():
        entries = {f"{a}/{v}" for a, variants in task.ablations.items() for v in variants}
        assert {"unimodal", "multimodal", "cotrain", "late_fusion"} | entries == set(results[name])
        assert all(s["n"] == 1 for entry in results[name].values() for s in entry.values())


@pytest.mark.parametrize("alone,cotrained,larger,expected", [
    ({"mean": 0.80, "std": 0.01, "n": 3}, {"mean": 0.85, "std": 0.01, "n": 3}, True, "better"),
    ({"mean": 0.80, "std": 0.05, "n": 3}, {"mean": 0.82, "std": 0.05, "n": 3}, True, "within noise"),
    ({"mean": 0.80, "std": 0.01, "n": 3}, {"mean": 0.75, "std": 0.01, "n": 3}, True, "worse"),
    ({"mean": 0.50, "std": 0.01, "n": 3}, {"mean": 0.40, "std": 0.01, "n": 3}, False, "better"),  # MAE
    ({"mean": 0.50, "std": 0.0, "n": 1}, {"mean": 0.51, "std": 0.0, "n": 1}, False, "worse"),
])
def test_verdict_weighs_the_difference_against_seed_noise(alone, cotrained, larger, expected):
    assert verdict(alone, cotrained, larger) == expected


def test_details_count_the_seeds_whose_guard_muted_each_student(tmp_path):
    from ops.experiment import Cell, _muted_seeds

    def run(name, history):
        path = tmp_path / name
        path.mkdir()
        (path / "history.json").write_text(json.dumps(history))
        return path

    muted_late = [{"epoch": 1, "transfer_muted": ["audio"]}, {"epoch": 2}, {"epoch": 3, "transfer_muted": ["text"]}]
    unmuted_again = [{"epoch": 1, "transfer_muted": ["text"]}, {"epoch": 2, "transfer_muted": []}]
    cells = [Cell("t", "cotrain", 0, None, run("a", muted_late)), Cell("t", "cotrain", 1, None, run("b", unmuted_again)),
             Cell("t", "cotrain", 2, None, run("c", [{"epoch": 1}])),
             Cell("t", "alpha/alpha=5", 0, None, run("d", muted_late))]
    assert _muted_seeds(cells) == {"cotrain": {"text": 1}, "alpha/alpha=5": {"text": 1}}


def test_details_and_report_count_the_seeds_whose_teacher_was_assembled(tmp_path):
    from ops.experiment import Cell, _assembled_seeds
    from ops.results_report import _assembled_lines

    def run(name, used, parts=("multimodal/a", "multimodal/transformer")):
        best = tmp_path / name / "best"
        (best / "multimodal").mkdir(parents=True)
        for part in parts:
            (best / f"{part}.pt").write_bytes(b"weights")
        (best / "assembly.json").write_text(json.dumps({"used": used, "parts": {"multimodal/a": 2,
                                                                                 "multimodal/transformer": 3}}))
        return tmp_path / name

    cells = [Cell("t", "cotrain", 0, None, run("a", True)), Cell("t", "cotrain", 1, None, run("b", False)),
             Cell("t", "cotrain", 2, None, run("c", True, parts=("multimodal/a",))),  # a part's weights are gone
             Cell("t", "multimodal", 0, None, run("d", True))]
    counts = _assembled_seeds(cells)
    assert counts == {"cotrain": 1, "multimodal": 1}
    n = {"mean": 0.5, "std": 0.0, "n": 3}
    lines = _assembled_lines({"cotrain": {"multimodal": n}, "multimodal": {"multimodal": n}}, {"assembled": counts})
    assert "co-trained in 1 of 3 seeds, from scratch in 1 of 3 seeds." in lines[0]
    assert _assembled_lines({"cotrain": {"multimodal": n}}, {"assembled": {}}) == []  # the option off: no line


def test_an_ablation_of_multimodal_only_runs_is_chosen_by_the_teacher(tmp_path):
    from ops.results_report import write_results_report

    def s(mean):
        return {"mean": mean, "std": 0.01, "n": 3}

    test = {"unimodal": {"a": s(0.9), "b": s(1.0)}, "multimodal": {"multimodal": s(0.6)},
            "cotrain": {"a": s(0.85), "b": s(1.0), "multimodal": s(0.62)},
            "scratch/equal": {"multimodal": s(0.6)}, "scratch/learned": {"multimodal": s(0.5)}}
    val = dict(test, **{"scratch/equal": {"multimodal": s(0.7)}, "scratch/learned": {"multimodal": s(0.65)}})
    details = {"metric": "mae", "larger_is_better": False, "val": val, "muted": {}}
    report = write_results_report({"t": test}, {"t": details}, tmp_path / "results.md")
    assert "Chosen on validation (the teacher's mae): **learned**." in report
    assert (tmp_path / "results" / "t-scratch.png").stat().st_size > 1000


def test_goal_checks_say_which_goal_each_task_meets_with_its_numbers():
    from ops.results_report import goal_checks, goal_lines

    def s(mean):
        return {"mean": mean, "std": 0.01, "n": 2}

    results = {"unimodal": {"a": s(0.60), "b": s(0.80)}, "multimodal": {"multimodal": s(0.85)},
               "late_fusion": {"multimodal": s(0.86)}, "cotrain": {"a": s(0.62), "b": s(0.79), "multimodal": s(0.87)}}
    per_seed = {"unimodal": {"a": [0.6, 0.6], "b": [0.8, 0.8]}, "multimodal": {"multimodal": [0.85, 0.85]},
                "cotrain": {"a": [0.66, 0.58], "b": [0.79, 0.79], "multimodal": [0.87, 0.87]}}
    checks = {goal: (met, numbers) for goal, met, numbers in
              goal_checks(results, {"larger_is_better": True, "per_seed": per_seed})}
    assert checks["a: no more than 0.005 below trained alone"] == (True, "+0.020")
    assert checks["a: the teacher leads it by 0.270, so it gains 0.015 or more"] == (True, "+0.020")
    assert checks["b: no more than 0.005 below trained alone"] == (False, "-0.010")
    assert not any(goal.startswith("b: the teacher leads") for goal in checks)  # a lead of 0.07 asks nothing
    assert checks["co-trained teacher >= multimodal from scratch"][0]
    assert checks["multimodal from scratch >= late fusion"] == (False, "0.850 against 0.860")
    assert checks["no seed loses more than 0.02 on any branch"] == (True, "worst: a seed #1 -0.020")
    assert "- **missed**: multimodal from scratch >= late fusion" in "\n".join(
        goal_lines(results, {"larger_is_better": True, "per_seed": per_seed}))


def test_the_protocol_spec_spans_the_family_and_keeps_development_apart_from_evaluation():
    from shards.synth_family import FamilyMember

    spec = load_spec(REPO / "experiments" / "protocol.yaml")
    corpora = {name: task.corpus for name, task in spec.tasks.items()}
    assert {name.split("-")[0] for name in corpora} == {"dev", "eval"}
    for corpus in corpora.values():
        assert corpus["synth"] == "family"
        FamilyMember(classes=corpus["classes"], size=corpus["size"], strength=corpus["strength"])  # valid
    for key, low, high in (("count", 600, 5000), ("classes", 5, 50), ("size", 32, 112)):
        values = [c[key] for c in corpora.values()]
        assert min(values) <= low and max(values) >= high, (key, values)
    assert len({c["seed"] for c in corpora.values()}) == len(corpora)  # no corpus repeats another
