"""`cotrain report RUN...`: baselines against co-training, per branch, mean ± std over seeds, with plots.

Runs are grouped by their config minus the seed: the seeds of one group are its repeats. Each
branch of a co-trained group is compared with the group that trained that branch alone (a unimodal
run of that modality, or the multimodal run for the teacher) on the same split.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from model.cotrain import TEACHER

from .config import config_hash, load_config
from .scores import primary_metric

__all__ = ["RunRecord", "collect_runs", "group_runs", "comparison_rows", "format_comparison", "write_report"]


@dataclass
class RunRecord:
    path: Path
    mode: str
    modalities: list[str]
    seed: int
    group: str
    scores: dict      # eval-<split>.json
    history: list     # history.json (per-epoch validation), [] when absent


def _group_name(mode: str, modalities: list[str]) -> str:
    return f"unimodal-{modalities[0]}" if mode == "unimodal" else mode


def _load_scores(run: Path, split: str) -> dict:
    path = run / f"eval-{split}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if split == "val":
        raise FileNotFoundError(f"{path} not found: the run kept no validation scores (was --eval-every 0?)")
    from .evaluate import evaluate_run

    return evaluate_run(run, split=split)


def collect_runs(paths: list[str | Path], *, split: str = "test") -> list[RunRecord]:
    """Every run's config and scores on `split` (evaluated now when RUN/eval-<split>.json is missing)."""
    records = []
    for path in map(Path, paths):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path / 'config.json'} not found: pass run directories written by "
                                    "`cotrain train` (or a folder of them with a glob such as runs/*)")
        cfg = load_config(path / "config.json")
        history = json.loads((path / "history.json").read_text()) if (path / "history.json").is_file() else []
        records.append(RunRecord(path, cfg.mode, cfg.modalities, cfg.seed, "", _load_scores(path, split), history))
        cfg.seed = 0
        records[-1].group = f"{_group_name(cfg.mode, cfg.modalities)}@{config_hash(cfg)}"
    return _readable_groups(records)


def _readable_groups(records: list[RunRecord]) -> list[RunRecord]:
    """Groups named by mode alone where that is unambiguous, with the config hash where it is not."""
    by_name: dict[str, set[str]] = {}
    for r in records:
        by_name.setdefault(r.group.split("@")[0], set()).add(r.group)
    for r in records:
        name = r.group.split("@")[0]
        r.group = name if len(by_name[name]) == 1 else r.group
    return records


def group_runs(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    groups: dict[str, list[RunRecord]] = {}
    for r in sorted(records, key=lambda r: (r.group, r.seed)):
        groups.setdefault(r.group, []).append(r)
    return groups


def _metric_of(records: list[RunRecord]) -> str:
    return primary_metric(records[0].scores.get("task", "class"))


def _values(runs: list[RunRecord], branch: str, metric: str) -> list[float]:
    return [r.scores["branches"][branch][metric] for r in runs if branch in r.scores["branches"]]


def _summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values), "n": len(values)}


def comparison_rows(groups: dict[str, list[RunRecord]], cotrain_group: str = "cotrain") -> list[dict]:
    """Per branch of the co-trained group: trained alone vs co-trained (mean, std, n), the difference, and
    the co-trained teacher's score beside each student (transfer needs a stronger teacher)."""
    cotrained = groups[cotrain_group]
    metric = _metric_of(cotrained)
    teacher = _summary(_values(cotrained, TEACHER, metric))
    rows = []
    for branch in cotrained[0].scores["branches"]:
        if "/" in branch:
            continue
        alone_group = "multimodal" if branch == TEACHER else f"unimodal-{branch}"
        co = _summary(_values(cotrained, branch, metric))
        alone_values = _values(groups.get(alone_group, []), branch, metric)
        alone = _summary(alone_values) if alone_values else None
        rows.append({"branch": branch, "metric": metric, "alone": alone, "cotrained": co, "teacher": teacher,
                     "difference": co["mean"] - alone["mean"] if alone else None})
    fused = _late_fusion_summary(groups, [r["branch"] for r in rows if r["branch"] != TEACHER], metric)
    if fused is not None and TEACHER in cotrained[0].scores["branches"]:
        rows.append({"branch": LATE_FUSION_ROW, "metric": metric, "alone": fused, "cotrained": None,
                     "teacher": None, "difference": None})
    return rows


LATE_FUSION_ROW = "late fusion of the baselines"


def _late_fusion_summary(groups: dict[str, list[RunRecord]], students: list[str], metric: str) -> dict | None:
    """Late fusion of the unimodal baselines of `students`, per seed that has all of them (None with fewer
    than two)."""
    from .late_fusion import late_fusion_scores

    baselines = [{r.seed: r for r in groups.get(f"unimodal-{m}", [])} for m in students]
    seeds = sorted(set.intersection(*(set(b) for b in baselines))) if len(baselines) > 1 else []
    values = []
    for seed in seeds:
        runs = [b[seed] for b in baselines]
        scores = late_fusion_scores([r.path for r in runs], runs[0].scores["split"], runs[0].scores["task"])
        values.append(scores[metric])
    return _summary(values) if values else None


def _fmt(summary: dict | None, scale: float) -> str:
    if summary is None:
        return "n/a"
    text = f"{scale * summary['mean']:.1f}" if scale != 1 else f"{summary['mean']:.3f}"
    if summary["n"] > 1:
        text += f" ± {scale * summary['std']:.1f}" if scale != 1 else f" ± {summary['std']:.3f}"
    return text


def _scale(metric: str) -> float:
    return 1.0 if metric in ("mae",) else 100.0


def format_comparison(rows: list[dict]) -> str:
    """A Markdown table; percentages for accuracy-like metrics."""
    scale = _scale(rows[0]["metric"]) if rows else 100.0
    lines = ["| branch | trained alone | co-trained | difference | co-trained teacher |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        diff = "n/a" if r["difference"] is None else (f"{scale * r['difference']:+.1f}" if scale != 1
                                                       else f"{r['difference']:+.3f}")
        teacher = "" if r["branch"] == TEACHER or r["teacher"] is None else _fmt(r["teacher"], scale)
        lines.append(f"| {r['branch']} | {_fmt(r['alone'], scale)} | {_fmt(r['cotrained'], scale)} | {diff} | "
                     f"{teacher} |")
    return "\n".join(lines)


def _plot_bars(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, x = _scale(rows[0]["metric"]), range(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.6))
    for offset, key, label in ((-0.2, "alone", "trained alone"), (0.2, "cotrained", "co-trained")):
        means = [scale * r[key]["mean"] if r[key] else 0 for r in rows]
        stds = [scale * r[key]["std"] if r[key] else 0 for r in rows]
        ax.bar([i + offset for i in x], means, 0.4, yerr=stds, capsize=4, label=label)
    ax.set_xticks(list(x), [r["branch"] for r in rows])
    ax.set_ylabel(rows[0]["metric"] + (" (%)" if scale != 1 else ""))
    ax.set_title(f"{rows[0]['metric']} per branch, mean ± std over seeds")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(groups: dict[str, list[RunRecord]], rows: list[dict], cotrain_group: str, path: Path) -> bool:
    """Validation metric per epoch for each branch, alone against co-trained (means over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    branches = [r["branch"] for r in rows]
    fig, axes = plt.subplots(1, len(branches), figsize=(3.2 * len(branches), 3.0), squeeze=False)
    drawn = False
    for ax, branch in zip(axes[0], branches):
        alone = "multimodal" if branch == TEACHER else f"unimodal-{branch}"
        for group, label in ((alone, "alone"), (cotrain_group, "co-trained")):
            curves = [[e["val"][branch] for e in r.history if branch in e["val"]] for r in groups.get(group, [])]
            curves = [c for c in curves if c]
            if not curves:
                continue
            length = min(map(len, curves))
            ax.plot(range(1, length + 1), [statistics.mean(c[i] for c in curves) for i in range(length)],
                    label=label)
            drawn = True
        ax.set(title=branch, xlabel="epoch", ylabel=f"val {rows[0]['metric']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def write_report(paths: list[str | Path], out: str | Path, *, split: str = "test") -> str:
    """report.md (+ bars.png, curves.png) in `out`, one section per co-trained group; returns the Markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(collect_runs(paths, split=split))
    cotrain_groups = [g for g, runs in groups.items() if runs[0].mode == "cotrain"]
    if not cotrain_groups:
        raise ValueError("no co-trained run among the runs given: add the `cotrain train` run(s) to compare")
    sections = [f"# Co-training report ({split} split)\n",
                "Runs: " + ", ".join(f"{g} ({len(r)} seed{'s' * (len(r) > 1)})" for g, r in groups.items()) + "\n"]
    summary = {}
    for group in cotrain_groups:
        rows = comparison_rows(groups, group)
        summary[group] = rows
        suffix = "" if group == "cotrain" else "-" + group.split("@")[-1]
        _plot_bars(rows, out / f"bars{suffix}.png")
        curves = _plot_curves(groups, rows, group, out / f"curves{suffix}.png")
        sections += [f"## {group}\n", f"{rows[0]['metric']} on {split}, each branch at its own best validation "
                     "epoch; the teacher's score is beside each student.\n", format_comparison(rows) + "\n",
                     f"![bars](bars{suffix}.png)\n"] + ([f"![curves](curves{suffix}.png)\n"] if curves else [])
    markdown = "\n".join(sections)
    (out / "report.md").write_text(markdown)
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return markdown
