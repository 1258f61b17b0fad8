"""`cotrain demo`: the whole method on the built-in corpus, baselines against co-training.

Stages, each skipped when its output already exists (so an interrupted demo resumes):
synthesize the corpus -> build shards -> train every unimodal baseline, the multimodal
baseline and the co-trained model with the same budget and seed -> evaluate on test -> table.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

from .config import MetricsConfig, RunConfig, config_hash, load_config
from .evaluate import MODEL_FILE, evaluate_run
from .experiment import synthetic_shards
from .report import collect_runs, comparison_rows, format_comparison, group_runs, write_report

__all__ = ["run_demo"]


def _plan(modalities: list[str]) -> list[tuple[str, str, list[str]]]:
    """(run name, mode, modalities) of every run one seed needs."""
    plan = [(f"unimodal-{m}", "unimodal", [m]) for m in modalities]
    return plan + [("multimodal", "multimodal", []), ("cotrain", "cotrain", [])]


CODE_FILE = "code.sha256"
"""The digest of the code that trained a demo run (code_digest), beside its model."""


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """A hash of the sources that synthesize, load, train and score (model/, ops/, pipeline/, shards/)."""
    root, digest = Path(__file__).resolve().parents[1], hashlib.sha256()
    for source in sorted(path for package in ("model", "ops", "pipeline", "shards")
                         for path in (root / package).rglob("*.py")):
        digest.update(source.relative_to(root).as_posix().encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def _stale(run: Path, cfg: RunConfig) -> str | None:
    """Why a run left in the workdir is not this demo's run, or None. The same config is not enough: code that
    changed since (a default resolved at build time, a loader) trains another model under it, and reusing that
    run would put an older model's scores in the README's table."""
    saved, code = run / "config.json", run / CODE_FILE
    if saved.is_file() and config_hash(load_config(saved)) != config_hash(cfg):
        return "trained with another config"
    if (run / MODEL_FILE).is_file() and (not code.is_file() or code.read_text().strip() != code_digest()):
        return "trained by another version of the code"
    return None


def _train_and_score(run: Path, cfg: RunConfig) -> None:
    """Train the run unless it is finished under this very config and code, and score it on test unless that is
    done. A run left by another config or another version of the code is trained again."""
    from .train import train

    reason = _stale(run, cfg)
    if reason:
        print(f"[demo] {run} was {reason}; training it again", flush=True)
        shutil.rmtree(run)
    if not (run / MODEL_FILE).is_file():
        if run.exists():  # interrupted before it finished: the demo owns its runs, start it over
            shutil.rmtree(run)
        train(cfg)
        (run / CODE_FILE).write_text(code_digest() + "\n")
    if not (run / "eval-test.json").is_file():
        evaluate_run(run, split="test")


README_BEGIN, README_END = "<!-- demo-table: begin -->", "<!-- demo-table: end -->"


def update_readme(readme: Path, block: str) -> None:
    """Put `block` between the README's demo-table markers, so its table is what the demo printed."""
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {README_BEGIN} ... {README_END} markers: add them where the demo's "
                         "tables belong")
    readme.write_text(pattern.sub(lambda _: f"{README_BEGIN}\n{block.strip()}\n{README_END}", text), encoding="utf-8")


def run_demo(*, workdir: str, n: int, epochs: int, seeds: list[int], metrics_port: int,
             readme: str | None = None) -> list[dict]:
    """Run every stage and print the comparison table (test accuracy, %); with `readme`, also write the
    tables into that file between its demo-table markers."""
    started, work = time.perf_counter(), Path(workdir)
    shards = synthetic_shards("demo", work / "corpus", work / "shards", n=n, seed=0, log="demo")
    from pipeline.dataset import load_dataset_info

    modalities = list(load_dataset_info(shards).modalities)
    runs = []
    for seed in seeds:
        for name, mode, mods in _plan(modalities):
            run = work / "runs" / f"{name}-seed{seed}"
            print(f"[demo] {name}, seed {seed} -> {run}", flush=True)
            cfg = RunConfig(shards=str(shards), out=str(run), mode=mode, modalities=mods, epochs=epochs, seed=seed,
                            metrics=MetricsConfig(port=metrics_port))
            _train_and_score(run, cfg)
            runs.append(run)
    write_report(runs, work / "report", split="test")
    rows = comparison_rows(group_runs(collect_runs(runs, split="test")))
    val_rows = comparison_rows(group_runs(collect_runs(runs, split="val")))
    table, val_table = format_comparison(rows), format_comparison(val_rows)
    (work / "results.json").write_text(json.dumps({"rows": rows, "val_rows": val_rows}, indent=2) + "\n")
    (work / "results.md").write_text(f"Test\n\n{table}\n\nValidation (best epoch)\n\n{val_table}\n")
    over = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    block = (f"Test accuracy (%), {over}; every run used the same epochs, optimiser and schedule,\n"
             "and each branch is scored with the weights of its own best validation epoch.\n\n"
             f"{table}\n\nValidation accuracy (%) at each branch's best epoch, {over}: the teacher (multimodal) "
             f"must beat\nevery student here for transfer to help.\n\n{val_table}\n")
    print("\n" + block)
    if readme:
        update_readme(Path(readme), block)
        print(f"[demo] wrote these tables into {readme}")
    if metrics_port:
        print(f"\nDuring each training run, Prometheus metrics were served at http://127.0.0.1:{metrics_port}/metrics")
    print(f"Results: {work / 'results.json'}, plots: {work / 'report'}  ({time.perf_counter() - started:.0f} s)")
    return rows
