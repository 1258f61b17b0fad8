"""Prometheus metrics of a training rank and of a shard build, each served over HTTP from an isolated registry.

Names follow one scheme: prefix `cotrain_`, base units (`_seconds`, `_bytes`, `_ratio` from 0 to 1), counters
ending in `_total`, and only bounded labels (rank, local_rank, branch, term, reason, split) so that sums and
averages over labels make sense. `cotrain_build_info` carries the run's constants (version, ZeRO stage, world
size, mode) as labels of a gauge that is always 1, to join onto other series.
"""
from __future__ import annotations

import json
import os
import resource
import socket
import time
import warnings
from collections import deque
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

__all__ = ["TrainingMetrics", "BuildMetrics", "read_grad_norm", "host_rss_bytes", "write_scrape_target",
           "TARGETS_DIR", "LOADER_SKIP_REASONS", "EVAL_METRICS"]

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
WAIT_WINDOW = 50  # steps over which the data-wait fraction is measured
TARGETS_DIR = "prometheus-targets"  # RUN/<this>/rank-NNNNN.json: Prometheus file_sd target files
# Reasons known in advance get a series at 0 from the start, so rate() and alerts see them before the first event.
LOADER_SKIP_REASONS = ("truncated_shard", "bad_member", "index_mismatch")
STEP_SKIP_REASONS = ("nonfinite_loss",)
# scores.py key -> (metric name, help); the other keys (samples, confusion) are not gauges of quality
EVAL_METRICS = {
    "accuracy": ("cotrain_eval_accuracy_ratio", "Validation accuracy (classification)."),
    "top5": ("cotrain_eval_top5_accuracy_ratio", "Validation top-5 accuracy (more than 5 classes)."),
    "macro_f1": ("cotrain_eval_macro_f1_ratio", "Validation macro-F1 (classification, multi-label)."),
    "micro_f1": ("cotrain_eval_micro_f1_ratio", "Validation micro-F1 (multi-label)."),
    "subset_accuracy": ("cotrain_eval_subset_accuracy_ratio", "Validation subset accuracy (multi-label)."),
    "mae": ("cotrain_eval_mean_absolute_error", "Validation mean absolute error (regression, label units)."),
    "pearson": ("cotrain_eval_pearson_correlation", "Validation Pearson correlation (regression)."),
    "ccc": ("cotrain_eval_concordance_correlation", "Validation concordance correlation (regression)."),
}


def host_rss_bytes() -> float:
    """Resident memory of this process: /proc's current value on Linux, else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as statm:
            return float(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux


def read_grad_norm(engine) -> float | None:
    """The global gradient norm of the last optimizer step, where the engine exposes it (None otherwise)."""
    getter = getattr(engine, "get_global_grad_norm", None)
    value = getter() if getter is not None else None
    if value is None:
        return None
    value = float(value.item() if hasattr(value, "item") else value)
    return value if value == value and value >= 0 else None  # NaN or the -1 "unknown" marker: no sample


class _Exporter:
    """An isolated registry and the HTTP endpoint that serves it."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self._server = None

    def serve(self, *, host: str, port: int) -> str | None:
        """Start the endpoint; a busy port or bad address warns and the work goes on without it."""
        if port <= 0:
            return None
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except (OSError, ValueError, OverflowError) as err:
            warnings.warn(f"metrics: cannot serve on {host}:{port} ({err}); continuing without the exporter; "
                          "pass --metrics-port with a free port (or --metrics-host with a local address) to "
                          "get it back", stacklevel=2)
            return None
        return f"http://{host}:{port}/metrics"

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class TrainingMetrics(_Exporter):
    """The metrics one rank exports; `serve()` starts the HTTP endpoint, `close()` stops it."""

    def __init__(self, *, rank: int = 0, local_rank: int = 0, gpu: bool = False):
        super().__init__()
        self.rank, self.local_rank = str(rank), str(local_rank)
        r = self.registry
        self.build_info = Gauge("cotrain_build_info", "Constants of the run as labels; the value is always 1.",
                                ["rank", "local_rank", "version", "zero_stage", "world_size", "mode"], registry=r)
        self.start_time = Gauge("cotrain_start_time_seconds", "Unix time this rank started training.", ["rank"],
                                registry=r)
        self.steps = Counter("cotrain_steps", "Optimizer steps taken.", ["rank"], registry=r)
        self.samples = Counter("cotrain_samples", "Training samples consumed.", ["rank"], registry=r)
        self.loss = Gauge("cotrain_loss", "Last step's loss per branch and term (task, transfer).",
                          ["rank", "branch", "term"], registry=r)
        self.total_loss = Gauge("cotrain_total_loss", "Last step's objective: the sum of all terms.", ["rank"],
                                registry=r)
        self.samples_per_second = Gauge("cotrain_samples_per_second", "Training throughput of this rank.",
                                        ["rank"], registry=r)
        self.step_seconds = Histogram("cotrain_step_duration_seconds", "Wall time of one training step.",
                                      ["rank"], buckets=STEP_BUCKETS, registry=r)
        self.data_wait = Histogram("cotrain_data_wait_seconds", "Time a step waited for its batch.",
                                   ["rank"], buckets=STEP_BUCKETS, registry=r)
        self.data_wait_ratio = Gauge("cotrain_data_wait_ratio", f"Fraction of the last {WAIT_WINDOW} steps' wall "
                                     "time spent waiting for batches (0 to 1).", ["rank"], registry=r)
        self.learning_rate = Gauge("cotrain_learning_rate", "Current learning rate.", ["rank"], registry=r)
        self.grad_norm = Gauge("cotrain_gradient_norm", "Global gradient norm of the last optimizer step.",
                               ["rank"], registry=r)
        self.last_step = Gauge("cotrain_last_step_timestamp_seconds", "Unix time of the last finished step.",
                               ["rank"], registry=r)
        self.skipped = Counter("cotrain_skipped_steps", "Training steps skipped, by reason.", ["rank", "reason"],
                               registry=r)
        self.loader_skipped = Counter("cotrain_loader_skipped_samples", "Corrupt samples the loader skipped, "
                                      "by reason.", ["rank", "reason"], registry=r)
        self.checkpoint_seconds = Histogram("cotrain_checkpoint_duration_seconds", "Wall time of one checkpoint.",
                                            ["rank"], buckets=CHECKPOINT_BUCKETS, registry=r)
        self.checkpoint_last = Gauge("cotrain_checkpoint_last_success_timestamp_seconds",
                                     "Unix time of the last complete checkpoint.", ["rank"], registry=r)
        self.checkpoint_interval = Gauge("cotrain_checkpoint_interval_steps", "Optimizer steps between periodic "
                                         "checkpoints (0: only on SIGTERM).", ["rank"], registry=r)
        self.eval_epoch = Gauge("cotrain_eval_epoch", "Epoch of the last evaluation.", ["rank", "split"], registry=r)
        self.eval = {key: Gauge(name, text, ["rank", "branch", "split"], registry=r)
                     for key, (name, text) in EVAL_METRICS.items()}
        Gauge("cotrain_host_memory_bytes", "Resident host memory of this rank's process.", ["rank"],
              registry=r).labels(self.rank).set_function(host_rss_bytes)
        if gpu:
            self._device_memory_gauges()
        for reason in STEP_SKIP_REASONS:
            self.skipped.labels(self.rank, reason)
        for reason in LOADER_SKIP_REASONS:
            self.loader_skipped.labels(self.rank, reason)
        self._loader_seen: dict[str, int] = {}
        self._recent = deque(maxlen=WAIT_WINDOW)  # (wait, step) seconds of the last steps
        self.start_time.labels(self.rank).set(time.time())

    def _device_memory_gauges(self) -> None:
        import torch

        device = int(self.local_rank)
        allocated = Gauge("cotrain_device_memory_allocated_bytes", "GPU memory held by tensors (torch).", ["rank"],
                          registry=self.registry)
        reserved = Gauge("cotrain_device_memory_reserved_bytes", "GPU memory reserved by torch's caching allocator.",
                         ["rank"], registry=self.registry)
        allocated.labels(self.rank).set_function(lambda: float(torch.cuda.memory_allocated(device)))
        reserved.labels(self.rank).set_function(lambda: float(torch.cuda.memory_reserved(device)))

    def describe_run(self, *, version: str, zero_stage: int, world_size: int, mode: str,
                     checkpoint_every: int) -> None:
        self.build_info.labels(self.rank, self.local_rank, version, str(zero_stage), str(world_size), mode).set(1)
        self.checkpoint_interval.labels(self.rank).set(checkpoint_every)

    def record_skip(self, reason: str) -> None:
        self.skipped.labels(self.rank, reason).inc()

    def record_checkpoint(self, seconds: float) -> None:
        self.checkpoint_seconds.labels(self.rank).observe(seconds)
        self.checkpoint_last.labels(self.rank).set(time.time())

    def record_step(self, *, terms: dict[str, float], total: float, batch_size: int, step_seconds: float,
                    wait_seconds: float, lr: float, grad_norm: float | None = None,
                    loader_skipped: dict[str, int] | None = None) -> None:
        r = self.rank
        self.steps.labels(r).inc()
        self.samples.labels(r).inc(batch_size)
        for name, value in terms.items():
            branch, term = name.removesuffix("_loss").rsplit("_", 1)
            self.loss.labels(r, branch, term).set(value)
        self.total_loss.labels(r).set(total)
        self.step_seconds.labels(r).observe(step_seconds)
        self.data_wait.labels(r).observe(wait_seconds)
        self._recent.append((wait_seconds, step_seconds))
        waited = sum(w for w, _ in self._recent)
        self.data_wait_ratio.labels(r).set(waited / max(waited + sum(s for _, s in self._recent), 1e-9))
        self.samples_per_second.labels(r).set(batch_size / max(step_seconds + wait_seconds, 1e-9))
        self.learning_rate.labels(r).set(lr)
        if grad_norm is not None:
            self.grad_norm.labels(r).set(grad_norm)
        self.record_loader_skips(loader_skipped or {})
        self.last_step.labels(r).set(time.time())

    def record_loader_skips(self, skipped: dict[str, int]) -> None:
        """Follow the loader's running Counter of skipped samples: add what is new since the last call."""
        for reason, count in skipped.items():
            new = count - self._loader_seen.get(reason, 0)
            if new > 0:
                self.loader_skipped.labels(self.rank, reason).inc(new)
            self._loader_seen[reason] = count

    def record_eval(self, split: str, scores: dict[str, dict], *, epoch: int) -> None:
        """Per-branch scores of one evaluation (ops/scores.py's keys; unknown keys are ignored)."""
        for branch, score in scores.items():
            for key, value in score.items():
                if key in self.eval and isinstance(value, (int, float)):
                    self.eval[key].labels(self.rank, branch, split).set(value)
        self.eval_epoch.labels(self.rank, split).set(epoch)


def write_scrape_target(run: Path, *, rank: int, host: str, port: int,
                        folder: Path | str | None = None) -> Path | None:
    """FOLDER/<run>-rank-NNNNN.json (FOLDER defaults to RUN/prometheus-targets): this rank's endpoint in
    Prometheus' file_sd format, labelled with the run's directory name.

    Every rank writes its own file (no gathering, so it works across nodes sharing the folder); a wildcard
    bind address is replaced by this host's name, which the Prometheus server must be able to resolve.
    A folder that cannot be written warns (None) and training goes on.
    """
    name = Path(run).resolve().name
    folder = Path(folder) if folder else Path(run) / TARGETS_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return _write_target(folder / f"{name}-rank-{rank:05d}.json", name, host, port)
    except OSError as err:
        warnings.warn(f"metrics: cannot write the Prometheus target file in {folder} ({err}); Prometheus will not "
                      "find this rank: pass --metrics-targets with a writable folder", stacklevel=2)
        return None


def _write_target(path: Path, name: str, host: str, port: int) -> Path:
    address = socket.getfqdn() if host in ("", "0.0.0.0", "::") else host
    address = f"[{address}]" if ":" in address else address
    entry = [{"targets": [f"{address}:{port}"], "labels": {"run": name}}]
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(entry, indent=2) + "\n")
    os.replace(temporary, path)  # Prometheus re-reads on change: never let it see half a file
    return path


class BuildMetrics(_Exporter):
    """`cotrain shards build` progress: samples done and total per split, rejects by reason, bytes written."""

    REJECT_REASONS = ("no_modality", "bad_video", "bad_audio", "bad_text", "bad_depth", "bad_features")

    def __init__(self):
        super().__init__()
        r = self.registry
        self.total = Gauge("cotrain_shard_build_samples", "Manifest samples this build converts, per split.",
                           ["split"], registry=r)
        self.done = Counter("cotrain_shard_build_processed_samples", "Manifest samples handled (stored or "
                            "rejected), per split.", ["split"], registry=r)
        self.rejects = Counter("cotrain_shard_build_rejects", "Manifest samples rejected, by reason.",
                               ["split", "reason"], registry=r)
        self.written = Counter("cotrain_shard_build_written_bytes", "Bytes of sample members written into shards.",
                               ["split"], registry=r)
        self.last_sample = Gauge("cotrain_shard_build_last_sample_timestamp_seconds",
                                 "Unix time the last sample was handled.", registry=r)
        self._kinds: dict[str, str] = {}

    def begin(self, *, totals: dict[str, int], done: dict[str, int], kinds: dict[str, str]) -> None:
        """Before conversion: each split's sample count and how many a resumed build already has."""
        self._kinds = dict(kinds)
        for split, count in totals.items():
            self.total.labels(split).set(count)
            self.done.labels(split).inc(done.get(split, 0))
            self.written.labels(split)
            for reason in self.REJECT_REASONS:
                self.rejects.labels(split, reason)

    def sample(self, split: str, key: str, members: dict[str, bytes] | None, reject: dict | None) -> None:
        self.done.labels(split).inc()
        if reject is not None:
            self.rejects.labels(split, self._reason(reject)).inc()
        else:
            self.written.labels(split).inc(sum(len(data) for data in (members or {}).values()))
        self.last_sample.set(time.time())

    def _reason(self, reject: dict) -> str:
        """A bounded reason: the kind of the failing modality (the free-text reason stays in rejects.jsonl)."""
        modality = reject.get("modality")
        if modality is None:
            return "no_modality"
        return f"bad_{self._kinds.get(modality, 'other')}"
