"""`cotrain demo`: the whole method on the built-in corpus, baselines against co-training.

Stages, each skipped when its output already exists (so an interrupted demo resumes):
synthesize the corpus -> build shards -> train every unimodal baseline, the multimodal
baseline and the co-trained model with the same budget and seed -> evaluate on test -> table.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from model.cotrain import TEACHER

from .config import MetricsConfig, RunConfig
from .evaluate import MODEL_FILE, evaluate_run

__all__ = ["run_demo", "comparison_rows", "format_comparison"]


def _prepare_shards(work: Path, n: int) -> Path:
    from shards.build import build_shards
    from shards.synth import write_synthetic_corpus

    corpus, shards = work / "corpus", work / "shards"
    manifest = corpus / "manifest.jsonl"
    if not manifest.is_file():
        print(f"[demo] synthesizing {n} samples into {corpus}", flush=True)
        write_synthetic_corpus(corpus, n=n, seed=0)
    if not (shards / "dataset.json").is_file():
        print(f"[demo] building shards into {shards}", flush=True)
        build_shards(manifest, out=shards)
    return shards


def _plan(modalities: list[str]) -> list[tuple[str, str, list[str]]]:
    """(run name, mode, modalities) of every run one seed needs."""
    plan = [(f"unimodal-{m}", "unimodal", [m]) for m in modalities]
    return plan + [("multimodal", "multimodal", []), ("cotrain", "cotrain", [])]


def _train_and_score(run: Path, cfg: RunConfig) -> tuple[dict, dict]:
    """(test scores, best validation scores) of one run, training it first if needed."""
    from .train import train

    if not (run / MODEL_FILE).is_file():
        train(cfg)
    path = run / "eval-test.json"
    test = json.loads(path.read_text()) if path.is_file() else evaluate_run(run, split="test")
    return test, json.loads((run / "eval-val.json").read_text())


def comparison_rows(results: dict[str, list[dict]], modalities: list[str]) -> list[dict]:
    """Per branch: mean test accuracy trained alone vs co-trained, over seeds."""
    rows = []
    for branch in modalities + [TEACHER]:
        alone_run = f"unimodal-{branch}" if branch != TEACHER else "multimodal"
        alone = [r["branches"][branch]["accuracy"] for r in results[alone_run]]
        co = [r["branches"][branch]["accuracy"] for r in results["cotrain"]]
        rows.append({"branch": branch, "alone": statistics.mean(alone), "cotrained": statistics.mean(co),
                     "difference": statistics.mean(co) - statistics.mean(alone),
                     "alone_std": statistics.pstdev(alone), "cotrained_std": statistics.pstdev(co), "seeds": len(co)})
    return rows


def format_comparison(rows: list[dict]) -> str:
    lines = ["| branch | trained alone | co-trained | difference |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        spread = lambda mean, std: f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if r["seeds"] > 1 else "")  # noqa
        lines.append(f"| {r['branch']} | {spread(r['alone'], r['alone_std'])} | "
                     f"{spread(r['cotrained'], r['cotrained_std'])} | {100 * r['difference']:+.1f} |")
    return "\n".join(lines)


def run_demo(*, workdir: str, n: int, epochs: int, seeds: list[int], metrics_port: int) -> list[dict]:
    """Run every stage and print the comparison table (test accuracy, %)."""
    started, work = time.perf_counter(), Path(workdir)
    shards = _prepare_shards(work, n)
    from pipeline.dataset import load_dataset_info

    modalities = list(load_dataset_info(shards).modalities)
    results: dict[str, list[dict]] = {}
    val_results: dict[str, list[dict]] = {}
    for seed in seeds:
        for name, mode, mods in _plan(modalities):
            run = work / "runs" / f"{name}-seed{seed}"
            print(f"[demo] {name}, seed {seed} -> {run}", flush=True)
            cfg = RunConfig(shards=str(shards), out=str(run), mode=mode, modalities=mods, epochs=epochs, seed=seed,
                            metrics=MetricsConfig(port=metrics_port))
            test, val = _train_and_score(run, cfg)
            results.setdefault(name, []).append(test)
            val_results.setdefault(name, []).append(val)
    rows, val_rows = comparison_rows(results, modalities), comparison_rows(val_results, modalities)
    table, val_table = format_comparison(rows), format_comparison(val_rows)
    (work / "results.json").write_text(json.dumps({"rows": rows, "val_rows": val_rows, "runs": results},
                                                  indent=2) + "\n")
    (work / "results.md").write_text(f"Test\n\n{table}\n\nValidation (best epoch)\n\n{val_table}\n")
    over = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    print(f"\nTest accuracy (%), {over}; every run used the same epochs, optimiser and schedule,")
    print("and each branch is scored with the weights of its own best validation epoch.")
    print(table)
    print(f"\nValidation accuracy (%) at each branch's best epoch, {over}: the teacher (multimodal) must beat")
    print("every student here for transfer to help.")
    print(val_table)
    if metrics_port:
        print(f"\nDuring each training run, Prometheus metrics were served at http://127.0.0.1:{metrics_port}/metrics")
    print(f"Results: {work / 'results.json'}  ({time.perf_counter() - started:.0f} s)")
    return rows
