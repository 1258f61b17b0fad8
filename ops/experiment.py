"""`cotrain experiment SPEC.yaml`: the paper's claims as a resumable grid of runs, summarised over seeds.

A spec names tasks (each a corpus and a run-config layer), seeds, and ablations (named variants, each a
run-config layer over the default co-training run). The grid is task x seed x (every unimodal baseline, the
multimodal baseline, the default co-training run, every ablation variant). Every cell resolves to a RunConfig;
cells whose configs are equal share one run (alpha=1 *is* the default co-training run), so the grid trains
each distinct config once per seed.

Resumable: a run whose model and val/test scores exist is skipped; an interrupted run continues from its last
checkpoint when it has one and restarts otherwise; a finished run whose config no longer matches the spec is
an error (never silently reused or overwritten).

Outputs in OUT: runs/<task>/<label>-seed<S>/, results.json shaped {task: {mode or ablation variant: {branch:
{mean, std, n}}}} (test split, each branch at its own best validation epoch), results-details.json (the
validation split, the teacher beside each student, the primary metric, wall times), and the report
(docs/results.md by default, ops/results_report.py) with its plots.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from model.cotrain import TEACHER

from .assemble import read_assembly
from .config import RunConfig, config_hash, load_config, resolve_config
from .evaluate import BEST_DIR, MODEL_FILE
from .late_fusion import LATE_FUSION, late_fusion_scores
from .report import _summary  # mean, population std and n, as `cotrain report` summarises seeds
from .scores import PRIMARY

__all__ = ["Cell", "ExperimentSpec", "load_spec", "plan_grid", "run_grid", "summarize", "run_experiment"]

BASELINE_MODES = ("unimodal", "multimodal", "cotrain")
QUICK = {"count": 48, "epochs": 1, "seeds": 1}


@dataclass
class TaskSpec:
    name: str
    corpus: dict
    """{"synth": TASK, "count": N, "seed": S} to synthesize, or {"shards": PATH} for built shards."""
    config: dict = field(default_factory=dict)
    ablations: dict[str, dict[str, dict]] = field(default_factory=dict)


@dataclass
class ExperimentSpec:
    tasks: dict[str, TaskSpec]
    seeds: list[int]
    config: dict = field(default_factory=dict)
    """The run-config layer under every task's own layer."""
    source: str = ""


@dataclass
class Cell:
    """One point of the grid: which table entry it fills, and the run that fills it."""
    task: str
    entry: str          # "unimodal", "multimodal", "cotrain", or "<ablation>/<variant>"
    seed: int
    cfg: RunConfig
    run: Path = Path()

    @property
    def key(self) -> tuple[str, int, str]:
        """Cells with the same key are the same run (config_hash covers everything that changes training)."""
        return self.task, self.seed, config_hash(self.cfg)


def _expand_dotted(layer: dict, where: str) -> dict:
    """{"transfer.alpha": 0} -> {"transfer": {"alpha": 0}}; nested dicts pass through."""
    if not isinstance(layer, dict):
        raise ValueError(f"{where}: expected a mapping of run-config keys, got {layer!r}")
    out: dict = {}
    for key, value in layer.items():
        *sections, leaf = str(key).split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = _expand_dotted(value, f"{where}.{key}") if isinstance(value, dict) else value
    return out


def _task_spec(name: str, data: dict, shared_ablations: dict, where: str) -> TaskSpec:
    unknown = set(data) - {"corpus", "config", "ablations"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; a task has corpus, config and ablations")
    corpus = data.get("corpus") or {"synth": name}
    if not ("synth" in corpus) ^ ("shards" in corpus):
        raise ValueError(f"{where}.corpus: give either synth: TASK (with count, seed) or shards: PATH, got {corpus}")
    ablations = {**shared_ablations, **(data.get("ablations") or {})}
    for ablation, variants in ablations.items():
        if not isinstance(variants, dict) or not variants:
            raise ValueError(f"{where}.ablations.{ablation}: map variant names to run-config layers, e.g. "
                             "alpha: {alpha=0: {transfer.alpha: 0}, alpha=1: {}}")
    ablations = {a: {v: _expand_dotted({} if layer is None else layer, f"{where}.ablations.{a}.{v}")
                     for v, layer in variants.items()} for a, variants in ablations.items()}
    return TaskSpec(name, dict(corpus), _expand_dotted(data.get("config") or {}, f"{where}.config"), ablations)


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and check SPEC.yaml (or .json); errors name the key and what to write instead."""
    from .config import read_config_file

    data = {k: v for k, v in read_config_file(path).items() if not str(k).startswith("x-")}  # YAML anchors
    unknown = set(data) - {"tasks", "seeds", "config", "ablations"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; a spec has tasks, seeds, config and ablations")
    if not isinstance(data.get("tasks"), dict) or not data["tasks"]:
        raise ValueError(f"{path}: `tasks` must map task names to {{corpus, config, ablations}}, e.g. "
                         "tasks: {gesture: {corpus: {synth: gesture, count: 600}}}")
    seeds = data.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"{path}: `seeds` must be a non-empty list of integers, got {seeds!r}")
    shared = data.get("ablations") or {}
    tasks = {name: _task_spec(name, task or {}, shared, f"{path}: tasks.{name}") for name, task in data["tasks"].items()}
    return ExperimentSpec(tasks, seeds, _expand_dotted(data.get("config") or {}, f"{path}: config"), str(path))


def quick_spec(spec: ExperimentSpec, tasks: list[str] | None = None) -> ExperimentSpec:
    """The same grid at smoke-test scale: a tiny corpus, one epoch, one seed (CI runs this)."""
    from .config import _merge

    quick = dataclasses.replace(spec, seeds=spec.seeds[:QUICK["seeds"]], tasks={})
    for name, task in spec.tasks.items():
        if tasks and name not in tasks:
            continue
        corpus = {**task.corpus, "count": QUICK["count"]} if "synth" in task.corpus else task.corpus
        config = _merge(task.config, {"epochs": QUICK["epochs"]})
        quick.tasks[name] = dataclasses.replace(task, corpus=corpus, config=config)
    return quick


def select_tasks(spec: ExperimentSpec, names: list[str]) -> ExperimentSpec:
    unknown = sorted(set(names) - set(spec.tasks))
    if unknown:
        raise ValueError(f"--task {', '.join(unknown)}: not in {spec.source}; its tasks: {', '.join(spec.tasks)}")
    return dataclasses.replace(spec, tasks={n: t for n, t in spec.tasks.items() if n in names}) if names else spec


# -- the grid -----------------------------------------------------------------------------------------------

FAMILY_KEYS = ("classes", "size", "strength")


def prepare_corpus(task: TaskSpec, out: Path) -> Path:
    """The task's shards: given, or synthesized and built under OUT/corpus/<task> once. A family member
    (synth: family) is built at its own frame size."""
    if "shards" in task.corpus:
        return Path(task.corpus["shards"])
    family = {k: task.corpus[k] for k in FAMILY_KEYS if k in task.corpus}
    return synthetic_shards(task.corpus["synth"], out / "corpus" / task.name, out / "shards" / task.name,
                            n=int(task.corpus.get("count", 600)), seed=int(task.corpus.get("seed", 0)),
                            log="experiment", family=family or None)


def synthetic_shards(kind: str, corpus: Path, shards: Path, *, n: int, seed: int, log: str,
                     family: dict | None = None) -> Path:
    """Synthesize corpus `kind` into `corpus` and build it into `shards`, each stage skipped when its output
    exists (an interrupted demo or grid resumes); returns the shard directory."""
    from shards.build import build_shards
    from shards.synth_tasks import write_task_corpus

    manifest = corpus / "manifest.jsonl"
    if not manifest.is_file():
        print(f"[{log}] synthesizing the {kind} corpus ({n} samples) into {corpus}", flush=True)
        write_task_corpus(kind, corpus, n=n, seed=seed, family=family)
    if not (shards / "dataset.json").is_file():
        print(f"[{log}] building shards into {shards}", flush=True)
        size = (family or {}).get("size")
        build_shards(manifest, out=shards, **({"height": size, "width": size} if size else {}))
    return shards


def _resolve(layers: list[dict], where: str) -> RunConfig:
    from .config import _merge

    merged: dict = {}
    for layer in layers:
        merged = _merge(merged, layer)
    try:
        return resolve_config(cli=merged)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from err


def _task_cells(spec: ExperimentSpec, task: TaskSpec, shards: Path, info, seed: int) -> list[Cell]:
    from .evaluate import task_of

    modalities = list(info.modalities)
    # the task type comes from dataset.json, as the Trainer sets it, so a finished run's config matches
    common = {"shards": str(shards), "out": "-", "seed": seed, "metrics": {"port": 0},
              "task": {"type": task_of(info)[0]}}
    base = [spec.config, task.config, common]
    where = f"{spec.source}: tasks.{task.name}"
    cells = [Cell(task.name, f"unimodal/{m}", seed,
                  _resolve(base + [{"mode": "unimodal", "modalities": [m]}], f"{where} (unimodal {m})"))
             for m in modalities]
    cells.append(Cell(task.name, "multimodal", seed, _resolve(base + [{"mode": "multimodal"}], f"{where} (multimodal)")))
    cells.append(Cell(task.name, "cotrain", seed, _resolve(base + [{"mode": "cotrain"}], f"{where} (cotrain)")))
    for ablation, variants in task.ablations.items():
        for variant, layer in variants.items():
            cfg = _resolve(base + [{"mode": "cotrain"}, layer], f"{where}.ablations.{ablation}.{variant}")
            cells.append(Cell(task.name, f"{ablation}/{variant}", seed, cfg))
    return cells


def plan_grid(spec: ExperimentSpec, out: Path) -> list[Cell]:
    """Every cell of the grid with its run directory; equal configs share the first cell's directory."""
    from pipeline.dataset import load_dataset_info

    cells, runs = [], {}
    for task in spec.tasks.values():
        shards = prepare_corpus(task, out)
        info = load_dataset_info(shards)
        for seed in spec.seeds:
            for cell in _task_cells(spec, task, shards, info, seed):
                label = cell.entry.replace("/", "-")
                cell.run = runs.setdefault(cell.key, out / "runs" / task.name / f"{label}-seed{seed}")
                cell.cfg.out = str(cell.run)
                cells.append(cell)
    return cells


def _is_finished(run: Path) -> bool:
    return all((run / name).is_file() for name in (MODEL_FILE, "eval-val.json", "eval-test.json"))


def _check_unchanged(cell: Cell) -> None:
    """A run trained under another config must not stand in for this cell."""
    saved = cell.run / "config.json"
    if saved.is_file() and config_hash(load_config(saved)) != config_hash(cell.cfg):
        raise ValueError(f"{cell.run} was trained with a different config than the spec now asks for "
                         f"({cell.task} {cell.entry}, seed {cell.seed}): the spec changed. Move that run away, "
                         "or pass a new --out, to keep both.")


def _train_cell(cfg_dict: dict, threads: int) -> float:
    """Train and score one run (in a worker process); returns its wall time in seconds."""
    from .config import _build
    from .evaluate import evaluate_run
    from .train import train

    cfg = _build(RunConfig, cfg_dict)
    if threads and not cfg.cpu_threads:  # `jobs` runs share the cores; a config's own setting wins
        cfg.cpu_threads = threads
    run, started = Path(cfg.out), time.perf_counter()
    if not (run / MODEL_FILE).is_file():
        resume = (run / "checkpoints" / "latest").is_file()
        if run.exists() and not resume:
            shutil.rmtree(run)  # an interrupted run without a checkpoint restarts from scratch
        train(cfg, resume=resume)
    if not (run / "eval-test.json").is_file():
        evaluate_run(run, split="test")
    if cfg.mode == "unimodal" and not (run / "predictions-val.jsonl").is_file():
        evaluate_run(run, split="val", save_scores=False)  # late fusion of the baselines reads both splits
    seconds = time.perf_counter() - started
    (run / "wall_seconds.json").write_text(json.dumps({"seconds": seconds}) + "\n")
    return seconds


def pending_runs(cells: list[Cell]) -> list[Cell]:
    """One cell per distinct run that is not finished yet, in grid order."""
    seen, todo = set(), []
    for cell in cells:
        if cell.run in seen:
            continue
        if _is_finished(cell.run):
            _check_unchanged(cell)  # an unfinished run restarts or resumes (resume checks its own hash)
            continue
        seen.add(cell.run)
        todo.append(cell)
    return todo


def run_grid(cells: list[Cell], *, jobs: int = 1) -> None:
    """Train every pending run, `jobs` at a time, each in a fresh process with cores/jobs torch threads."""
    from tqdm import tqdm

    todo = pending_runs(cells)
    distinct = len({c.run for c in cells})
    print(f"[experiment] {len(cells)} cells, {distinct} distinct runs, {distinct - len(todo)} already done, "
          f"{len(todo)} to train with {jobs} job(s)", flush=True)
    if not todo:
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = get_context("forkserver")  # a fresh process per run: no DeepSpeed or DALI state carried over
    # forked from a server that imported torch, DeepSpeed and DALI once (importing them starts no thread), which
    # saves the 3 to 5 s of imports every run would repeat: 2 min of a 54-run grid on 2 cores
    context.set_forkserver_preload(["__main__", "ops.train", "ops.evaluate", "deepspeed", "nvidia.dali.plugin.pytorch"])
    with ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1) as pool, \
            tqdm(total=len(todo), desc="runs", unit="run") as bar:
        futures = {pool.submit(_train_cell, dataclasses.asdict(c.cfg), threads): c for c in todo}
        for future in as_completed(futures):
            cell = futures[future]
            future.result()  # a failed run stops the grid with its own error; finished runs stay done
            bar.set_postfix_str(f"{cell.task} {cell.entry} seed {cell.seed}")
            bar.update()


# -- summaries ----------------------------------------------------------------------------------------------

def _scores(run: Path, split: str) -> dict:
    return json.loads((run / f"eval-{split}.json").read_text())


def _entry_values(cells: list[Cell], split: str) -> dict[tuple[str, str], dict[str, list[float]]]:
    """(task, entry) -> branch -> the primary metric per seed."""
    table: dict[tuple[str, str], dict[str, list[float]]] = {}
    for cell in cells:
        scores = _scores(cell.run, split)
        metric = PRIMARY[scores["task"]][0]
        entry = cell.entry.split("/")[0] if cell.entry.startswith("unimodal/") else cell.entry
        branches = table.setdefault((cell.task, entry), {})
        for branch, values in scores["branches"].items():
            if "/" not in branch:
                branches.setdefault(branch, []).append(values[metric])
    return table


def _late_fusion_values(cells: list[Cell], split: str) -> dict[tuple[str, str], dict[str, list[float]]]:
    """(task, "late_fusion") -> {"multimodal": the primary metric per seed} of late fusion of the seed's
    unimodal baselines (ops/late_fusion.py), the baseline the multimodal branch must beat."""
    baselines: dict[tuple[str, int], list[Path]] = {}
    for cell in cells:
        if cell.entry.startswith("unimodal/") and cell.run not in baselines.get((cell.task, cell.seed), []):
            baselines.setdefault((cell.task, cell.seed), []).append(cell.run)
    table: dict[tuple[str, str], dict[str, list[float]]] = {}
    for (task, _seed), runs in baselines.items():
        if len(runs) < 2:
            continue
        scores = _scores(runs[0], split)
        metric = PRIMARY[scores["task"]][0]
        fused = late_fusion_scores(runs, split, scores["task"])
        table.setdefault((task, LATE_FUSION), {}).setdefault(TEACHER, []).append(fused[metric])
    return table


def _nest(table: dict[tuple[str, str], dict[str, list[float]]]) -> dict:
    """{task: {mode: {branch: summary}, ablation/variant: ...}} with ablations flattened as "ablation/variant"."""
    out: dict = {}
    for (task, entry), branches in table.items():
        out.setdefault(task, {})[entry] = {b: _summary(v) for b, v in branches.items()}
    return out


def summarize(cells: list[Cell]) -> tuple[dict, dict]:
    """(results, details): test summaries in the issue's shape; validation, metric and times beside them."""
    per_seed = {**_entry_values(cells, "test"), **_late_fusion_values(cells, "test")}
    results = _nest(per_seed)
    validation = _nest({**_entry_values(cells, "val"), **_late_fusion_values(cells, "val")})
    details: dict = {}
    for task in results:
        first = next(c for c in cells if c.task == task)
        kind = _scores(first.run, "test")["task"]
        metric, larger = PRIMARY[kind]
        details[task] = {
            "metric": metric, "larger_is_better": larger, "task_type": kind, "val": validation[task],
            "teacher": {entry: branches.get(TEACHER) for entry, branches in results[task].items()
                        if entry not in ("unimodal", "multimodal", LATE_FUSION)},
            "runs": {f"{c.entry} seed {c.seed}": str(c.run) for c in cells if c.task == task},
            "train_seconds": sum(_wall(run) for run in {c.run for c in cells if c.task == task}),
            "configs": {c.entry: _config_digest(c.cfg) for c in cells if c.task == task and c.seed == first.seed},
            "muted": _muted_seeds([c for c in cells if c.task == task]),
            "assembled": _assembled_seeds([c for c in cells if c.task == task]),
            # the goals' per-seed checks pair the seeds of these entries, in the spec's seed order
            "per_seed": {entry: branches for (t, entry), branches in per_seed.items()
                         if t == task and entry in ("unimodal", "multimodal", "cotrain", LATE_FUSION)},
        }
        by_band = _visibility_rows([c for c in cells if c.task == task]) if kind == "class" else None
        if by_band:
            details[task]["by_visibility"] = by_band
    return results, details


def _visibility_rows(cells: list[Cell]) -> dict | None:
    """Per student modality, test accuracy per visibility band (ops/evidence.py) of the baseline, the co-trained
    student and the co-trained teacher, pooled over seeds; None unless the task's corpus recorded visibility."""
    from .evidence import accuracy_by_band, read_visibility

    visibility = read_visibility(cells[0].run.parents[2] / "corpus" / cells[0].task)
    runs: dict[str, list[Path]] = {}
    for cell in cells:
        runs.setdefault(cell.entry, []).append(cell.run)
    if visibility is None or "cotrain" not in runs:
        return None
    rows = {}
    for student in sorted(b for b in _scores(runs["cotrain"][0], "test")["branches"] if "/" not in b and b != TEACHER):
        alone = accuracy_by_band(runs[f"unimodal/{student}"], [student], student, visibility)
        co = accuracy_by_band(runs["cotrain"], [student, TEACHER], student, visibility)
        rows[student] = {"alone": alone[student], "co-trained": co[student], "co-trained teacher": co[TEACHER]}
    return rows


def _muted_seeds(cells: list[Cell]) -> dict[str, dict[str, int]]:
    """entry -> student -> in how many seeds the validation guard (transfer.guard) had muted it at the end."""
    muted: dict[str, dict[str, int]] = {}
    for cell in cells:
        path = cell.run / "history.json"
        history = json.loads(path.read_text()) if path.is_file() else []
        decisions = [h["transfer_muted"] for h in history if "transfer_muted" in h]
        for student in decisions[-1] if decisions else []:
            counts = muted.setdefault(cell.entry, {})
            counts[student] = counts.get(student, 0) + 1
    return muted


def _assembled_seeds(cells: list[Cell]) -> dict[str, int]:
    """entry -> in how many seeds the teacher was scored assembled from its parts' best epochs (fusion.assemble)."""
    counts: dict[str, int] = {}
    for cell in cells:
        if read_assembly(cell.run / BEST_DIR) is not None:
            counts[cell.entry] = counts.get(cell.entry, 0) + 1
    return counts


def _wall(run: Path) -> float:
    path = run / "wall_seconds.json"
    return json.loads(path.read_text())["seconds"] if path.is_file() else 0.0


def _config_digest(cfg: RunConfig) -> dict:
    """The settings the ablations vary, for the report."""
    return {"mode": cfg.mode, "modalities": cfg.modalities, "students": cfg.students,
            "shared_stages": cfg.shared_stages, "transfer": dataclasses.asdict(cfg.transfer)}


def run_experiment(spec_path: str, *, out: str, tasks: list[str], quick: bool, jobs: int,
                   report: str | None) -> dict:
    """Plan, train what is missing, summarise, and write results.json, results-details.json and the report."""
    from .results_report import write_results_report

    started = time.perf_counter()
    spec = select_tasks(load_spec(spec_path), tasks)
    spec = quick_spec(spec) if quick else spec
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = plan_grid(spec, out_dir)
    run_grid(cells, jobs=jobs)
    results, details = summarize(cells)
    for task in details:
        details[task]["seeds"] = spec.seeds
        details[task]["quick"] = quick
    details["_grid"] = {"spec": spec.source, "wall_seconds": time.perf_counter() - started, "jobs": jobs}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results-details.json").write_text(json.dumps(details, indent=2) + "\n")
    report_path = Path(report) if report else out_dir / "results.md"
    write_results_report(results, details, report_path)
    print(f"[experiment] results: {out_dir / 'results.json'}, report: {report_path} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return results
