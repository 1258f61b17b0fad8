"""Prometheus metrics of a training rank, served over HTTP from an isolated registry.

Names follow one scheme: prefix `cotrain_`, base units, counters ending in `_total`, and only
bounded labels (rank, branch, term) so sums over labels make sense.
"""
from __future__ import annotations

import time
import warnings

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

__all__ = ["TrainingMetrics"]

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TrainingMetrics:
    """The metrics one rank exports; `serve()` starts the HTTP endpoint, `close()` stops it."""

    def __init__(self, *, rank: int = 0):
        self.registry = CollectorRegistry()
        self.rank = str(rank)
        r = self.registry
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
        self.learning_rate = Gauge("cotrain_learning_rate", "Current learning rate.", ["rank"], registry=r)
        self.last_step = Gauge("cotrain_last_step_timestamp_seconds", "Unix time of the last finished step.",
                               ["rank"], registry=r)
        self.skipped = Counter("cotrain_skipped_steps", "Training steps skipped, by reason.", ["rank", "reason"],
                               registry=r)
        self.checkpoint_seconds = Histogram("cotrain_checkpoint_duration_seconds", "Wall time of one checkpoint.",
                                            ["rank"], buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.checkpoint_last = Gauge("cotrain_checkpoint_last_success_timestamp_seconds",
                                     "Unix time of the last complete checkpoint.", ["rank"], registry=r)
        self._server = None

    def record_skip(self, reason: str) -> None:
        self.skipped.labels(self.rank, reason).inc()

    def record_checkpoint(self, seconds: float) -> None:
        self.checkpoint_seconds.labels(self.rank).observe(seconds)
        self.checkpoint_last.labels(self.rank).set(time.time())

    def serve(self, *, host: str, port: int) -> str | None:
        """Start the endpoint; a busy port or bad address warns and training goes on without it."""
        if port <= 0:
            return None
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            warnings.warn(f"metrics: cannot serve on {host}:{port} ({err}); training continues without "
                          "the exporter; pass --metrics-port with a free port to get it back", stacklevel=2)
            return None
        return f"http://{host}:{port}/metrics"

    def record_step(self, *, terms: dict[str, float], total: float, batch_size: int, step_seconds: float,
                    wait_seconds: float, lr: float) -> None:
        r = self.rank
        self.steps.labels(r).inc()
        self.samples.labels(r).inc(batch_size)
        for name, value in terms.items():
            branch, term = name.removesuffix("_loss").rsplit("_", 1)
            self.loss.labels(r, branch, term).set(value)
        self.total_loss.labels(r).set(total)
        self.step_seconds.labels(r).observe(step_seconds)
        self.data_wait.labels(r).observe(wait_seconds)
        self.samples_per_second.labels(r).set(batch_size / max(step_seconds + wait_seconds, 1e-9))
        self.learning_rate.labels(r).set(lr)
        self.last_step.labels(r).set(time.time())

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
