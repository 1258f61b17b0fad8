"""ops/ observability: the exporter's metrics, the shard build's metrics, file_sd targets, alert rules,
dashboards, and a real Prometheus scraping a real 2-rank run."""
import importlib.util
import json
import os
import signal
import socket
import urllib.parse
import re
import shutil
import subprocess
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from ops.engine import free_port
from ops.metrics import EVAL_METRICS, BuildMetrics, TrainingMetrics, read_grad_norm, write_scrape_target
from shards.build import build_shards
from subprocesses import VENV_BIN, clean_env

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "ops" / "prometheus"
GRAFANA_DIR = ROOT / "ops" / "grafana"
ALLOWED_LABELS = {"rank", "local_rank", "branch", "term", "reason", "split"}
INFO_LABELS = {"version", "zero_stage", "world_size", "mode"}  # cotrain_build_info only: constant per run


def _samples(text: str) -> dict:
    """{(sample name, frozenset of label items): value} of an exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(text: str, name: str, **labels) -> float:
    return _samples(text)[(name, frozenset({k: str(v) for k, v in labels.items()}.items()))]


def _promtool(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is missing: run `make system-deps` as root (installs Debian's prometheus)")
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True, timeout=120)


def _recorded_metrics() -> TrainingMetrics:
    metrics = TrainingMetrics(rank=1, local_rank=1)
    metrics.describe_run(version="0.1.0", zero_stage=2, world_size=2, mode="cotrain", checkpoint_every=5)
    for step in range(4):
        metrics.record_step(terms={"rgb_task_loss": 1.5, "rgb_transfer_loss": 0.25, "multimodal_task_loss": 1.0},
                            total=2.75, batch_size=4, step_seconds=0.3, wait_seconds=0.1, lr=1e-3,
                            grad_norm=2.0 + step, loader_skipped={"bad_member": step})
    metrics.record_skip("nonfinite_loss")
    metrics.record_checkpoint(1.25)
    metrics.record_eval("val", {"rgb": {"accuracy": 0.5, "macro_f1": 0.4, "samples": 5}}, epoch=3)
    return metrics


# --- 1. metrics ----------------------------------------------------------------------------------------------
def test_training_metrics_record_what_the_loop_reports():
    text = _recorded_metrics().exposition()
    assert _value(text, "cotrain_steps_total", rank=1) == 4
    assert _value(text, "cotrain_samples_total", rank=1) == 16
    assert _value(text, "cotrain_loss", rank=1, branch="rgb", term="transfer") == 0.25
    assert _value(text, "cotrain_gradient_norm", rank=1) == 5.0
    assert _value(text, "cotrain_data_wait_ratio", rank=1) == pytest.approx(0.25)
    assert _value(text, "cotrain_loader_skipped_samples_total", rank=1, reason="bad_member") == 3
    assert _value(text, "cotrain_loader_skipped_samples_total", rank=1, reason="truncated_shard") == 0
    assert _value(text, "cotrain_skipped_steps_total", rank=1, reason="nonfinite_loss") == 1
    assert _value(text, "cotrain_eval_accuracy_ratio", rank=1, branch="rgb", split="val") == 0.5
    assert _value(text, "cotrain_eval_epoch", rank=1, split="val") == 3
    assert _value(text, "cotrain_checkpoint_interval_steps", rank=1) == 5
    assert _value(text, "cotrain_build_info", rank=1, local_rank=1, version="0.1.0", zero_stage=2,
                  world_size=2, mode="cotrain") == 1
    assert _value(text, "cotrain_checkpoint_duration_seconds_count", rank=1) == 1
    rss = _value(text, "cotrain_host_memory_bytes", rank=1)
    assert 10e6 < rss < 1e12  # a Python process with torch loaded holds tens of MB at least
    assert "cotrain_device_memory" not in text  # GPU only


def test_labels_are_bounded_and_names_follow_the_conventions():
    families = list(text_string_to_metric_families(_recorded_metrics().exposition()))
    for family in families:
        assert family.name.startswith("cotrain_")
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        allowed = ALLOWED_LABELS | (INFO_LABELS if family.name == "cotrain_build_info" else set())
        assert labels <= allowed, (family.name, labels)


def test_promtool_accepts_the_exposition():
    done = _promtool("check", "metrics", stdin=_recorded_metrics().exposition())
    assert done.returncode == 0 and not done.stdout.strip() and "error" not in done.stderr.lower(), \
        done.stdout + done.stderr


@pytest.mark.parametrize("task,labels", [
    ("class", torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])),
    ("multilabel", (torch.rand(8, 7) > 0.5).float()),
    ("regression", torch.randn(8, 7)),
])
def test_every_score_of_every_task_becomes_a_gauge(task, labels):
    from ops.scores import make_scorer

    scorer = make_scorer(task, 7)
    scorer.update(torch.randn(8, 7), labels, torch.ones(8, dtype=torch.bool))
    scores = {k: v for k, v in scorer.result().items() if k not in ("samples", "confusion")}
    metrics = TrainingMetrics()
    metrics.record_eval("val", {"audio": scores}, epoch=1)
    text = metrics.exposition()
    for key, value in scores.items():
        name = EVAL_METRICS[key][0]
        assert _value(text, name, rank=0, branch="audio", split="val") == pytest.approx(value)


def test_grad_norm_is_read_where_the_engine_has_it():
    class Engine:
        def __init__(self, value):
            self.value = value

        def get_global_grad_norm(self):
            return self.value

    assert read_grad_norm(Engine(torch.tensor(3.5))) == 3.5
    assert read_grad_norm(Engine(None)) is None
    assert read_grad_norm(Engine(float("nan"))) is None
    assert read_grad_norm(object()) is None


def test_a_busy_port_warns_and_does_not_raise():
    first = TrainingMetrics()
    port = free_port()
    assert first.serve(host="127.0.0.1", port=port) == f"http://127.0.0.1:{port}/metrics"
    try:
        with pytest.warns(UserWarning, match="cannot serve"):
            assert TrainingMetrics().serve(host="127.0.0.1", port=port) is None
        with pytest.warns(UserWarning, match="--metrics-host"):
            assert TrainingMetrics().serve(host="no-such-host.invalid", port=free_port()) is None
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "cotrain_build_info" in body
    finally:
        first.close()


def test_each_rank_writes_its_own_file_sd_target(tmp_path):
    run = tmp_path / "run-a"
    for rank in range(3):
        write_scrape_target(run, rank=rank, host="127.0.0.1", port=9400 + rank)
    files = sorted((run / "prometheus-targets").glob("run-a-rank-*.json"))
    entries = [json.loads(f.read_text())[0] for f in files]
    assert [e["targets"] for e in entries] == [["127.0.0.1:9400"], ["127.0.0.1:9401"], ["127.0.0.1:9402"]]
    assert all(e["labels"] == {"run": "run-a"} for e in entries)
    wildcard = json.loads(write_scrape_target(run, rank=0, host="0.0.0.0", port=9400).read_text())
    assert not wildcard[0]["targets"][0].startswith("0.0.0.0")
    shared = write_scrape_target(tmp_path / "run-b", rank=0, host="127.0.0.1", port=9500, folder=tmp_path / "all")
    assert shared == tmp_path / "all" / "run-b-rank-00000.json"


def test_an_unwritable_targets_folder_warns_and_does_not_raise(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the targets folder should be")
    with pytest.warns(UserWarning, match="--metrics-targets"):
        assert write_scrape_target(tmp_path / "run", rank=0, host="127.0.0.1", port=9400, folder=blocker) is None


def _small_manifest(synthetic_manifest: Path, count: int = 4) -> Path:
    """The first `count` samples of the synthetic corpus plus one whose video file does not exist."""
    lines = synthetic_manifest.read_text().splitlines()[:count]
    broken = dict(json.loads(lines[0]), key="broken_video", rgb="video/missing.mp4")
    path = synthetic_manifest.with_name("manifest-observability.jsonl")
    path.write_text("".join(line + "\n" for line in lines) + json.dumps(broken) + "\n")
    return path


def test_shard_build_metrics_count_samples_rejects_and_bytes(synthetic_manifest, tmp_path):
    manifest = _small_manifest(synthetic_manifest)
    metrics = BuildMetrics()
    description = build_shards(manifest, out=tmp_path / "shards", workers=1, progress=False, observer=metrics)
    text = metrics.exposition()
    splits = description["splits"]
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    for split in splits:
        in_manifest = sum(r["split"] == split for r in records)
        assert _value(text, "cotrain_shard_build_samples", split=split) == in_manifest
        assert _value(text, "cotrain_shard_build_processed_samples_total", split=split) == in_manifest
        stored = sum(s["bytes"] for s in splits[split]["shards"])
        written = _value(text, "cotrain_shard_build_written_bytes_total", split=split)
        assert 0 < written <= stored  # members only; tar headers and padding are the difference
    broken_split = records[-1]["split"]
    assert _value(text, "cotrain_shard_build_rejects_total", split=broken_split, reason="bad_video") == 1
    assert description["rejects"] == 1
    assert _promtool("check", "metrics", stdin=text).returncode == 0



def test_shards_build_command_serves_metrics_and_a_busy_port_only_warns(synthetic_manifest, tmp_path):
    from click.testing import CliRunner

    from shards.cli import build_command

    manifest = _small_manifest(synthetic_manifest, count=2)
    port = free_port()
    result = CliRunner().invoke(build_command, [str(manifest), "--out", str(tmp_path / "a"),
                                                                "--workers", "1", "--metrics-port", str(port)])
    assert result.exit_code == 0, result.output + result.stderr
    assert f"metrics at http://127.0.0.1:{port}/metrics" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.warns(UserWarning, match="cannot serve"):
            result = CliRunner().invoke(build_command, [
                str(manifest), "--out", str(tmp_path / "b"), "--workers", "1",
                "--metrics-port", str(busy.getsockname()[1])])
    assert result.exit_code == 0 and (tmp_path / "b" / "dataset.json").is_file(), result.output


# --- 2. Prometheus config and alert rules ---------------------------------------------------------------------
def test_promtool_accepts_the_scrape_config_and_the_rules():
    config = _promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = _promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert rules.returncode == 0 and "5 rules found" in rules.stdout, rules.stdout + rules.stderr


def test_each_alert_fires_on_its_case_and_stays_quiet_otherwise():
    done = _promtool("test", "rules", str(PROMETHEUS_DIR / "tests" / "alerts.test.yml"))
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS_DIR / "tests" / "alerts.test.yml").read_text()))
    defined = set(re.findall(r"- alert: (\w+)", (PROMETHEUS_DIR / "alerts.yml").read_text()))
    assert tested == defined == {"CotrainTrainingStalled", "CotrainNonFiniteLoss", "CotrainThroughputDrop",
                                 "CotrainDataStarvation", "CotrainCheckpointsFailing"}


def test_a_broken_rule_test_fails(tmp_path):
    """Negative control: the rule tests can fail (an alert expected where the data says quiet)."""
    text = (PROMETHEUS_DIR / "tests" / "alerts.test.yml").read_text()
    broken = text.replace("eval_time: 10m\n        alertname: CotrainTrainingStalled\n        exp_alerts: []",
                          "eval_time: 10m\n        alertname: CotrainTrainingStalled\n        exp_alerts:\n"
                          "          - exp_labels: {severity: critical, job: cotrain, run: a, rank: \"1\"}")
    assert broken != text
    (tmp_path / "tests").mkdir()
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "tests" / "alerts.test.yml").write_text(broken)
    assert _promtool("test", "rules", str(tmp_path / "tests" / "alerts.test.yml")).returncode != 0


# --- 4. Grafana dashboards (structure; their queries are checked against a real Prometheus below) -----------
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
# Metrics that a CPU run of a classification task cannot produce; they must still be defined by the exporter.
GPU_ONLY = {"cotrain_device_memory_allocated_bytes", "cotrain_device_memory_reserved_bytes"}
TASK_SPECIFIC = {"cotrain_eval_micro_f1_ratio", "cotrain_eval_subset_accuracy_ratio",
                 "cotrain_eval_mean_absolute_error", "cotrain_eval_pearson_correlation",
                 "cotrain_eval_concordance_correlation"}
METRIC_NAME = re.compile(r"\bcotrain_[a-z0-9_]+")


def _panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _dashboard_queries() -> list[tuple[str, str, list[str]]]:
    """(dashboard file, panel title, [expr]) of every panel."""
    return [(path.name, panel["title"], [t["expr"] for t in panel["targets"]])
            for path in DASHBOARDS for panel in _panels(json.loads(path.read_text()))]


def _named_metrics() -> set[str]:
    """Every cotrain_* metric a dashboard query or an alert rule names (histogram series by their base name)."""
    text = (PROMETHEUS_DIR / "alerts.yml").read_text() + "".join(
        expr for _, _, exprs in _dashboard_queries() for expr in exprs)
    return set(METRIC_NAME.findall(text))


def test_three_dashboards_with_datasource_and_rank_variables():
    assert {p.stem for p in DASHBOARDS} == {"training", "evaluation", "data"}
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["schemaVersion"] >= 36 and dashboard["uid"].startswith("cotrain-")
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        if path.stem != "evaluation":  # validation runs on rank 0 only
            assert "rank" in variables["rank"]["definition"] and variables["rank"]["includeAll"]
        for panel in _panels(dashboard):
            assert panel["datasource"]["uid"] == "${datasource}", (path.name, panel["title"])


def test_every_panel_has_a_title_a_description_a_unit_and_a_query():
    units = set()
    for path in DASHBOARDS:
        for panel in _panels(json.loads(path.read_text())):
            where = (path.name, panel.get("title"))
            assert panel.get("title") and len(panel.get("description", "")) > 20, where
            units.add(panel["fieldConfig"]["defaults"]["unit"])
            assert panel["fieldConfig"]["defaults"]["unit"], where
            assert panel["targets"] and all(METRIC_NAME.search(t["expr"]) for t in panel["targets"]), where
    assert {"s", "bytes", "percentunit"} <= units


def test_training_dashboard_covers_the_issue():
    titles = {title for name, title, _ in _dashboard_queries() if name == "training.json"}
    exprs = " ".join(e for name, _, es in _dashboard_queries() if name == "training.json" for e in es)
    for needed in ('term="task"', 'term="transfer"', "cotrain_samples_total", "histogram_quantile(0.99",
                   "cotrain_data_wait_ratio", "cotrain_host_memory_bytes", "cotrain_device_memory"):
        assert needed in exprs
    assert any("per rank" in t for t in titles)


def test_dashboard_and_rule_metrics_are_defined_by_the_exporters():
    source = (ROOT / "ops" / "metrics.py").read_text()
    exposition = _recorded_metrics().exposition()
    build = BuildMetrics()
    build.begin(totals={"train": 1}, done={}, kinds={"rgb": "video"})
    exposition += build.exposition()
    for name in _named_metrics():
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name in GPU_ONLY | TASK_SPECIFIC:
            assert f'"{name}"' in source, name
        else:
            assert re.search(rf"^{name}[{{ ]", exposition, re.M) or f"# TYPE {base} " in exposition, name


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards():
    import yaml

    datasource = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "cotrain.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load((ROOT / "ops" / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts
    assert any(m.startswith("./prometheus/alerts.yml:") for m in compose["services"]["prometheus"]["volumes"])


def test_dashboards_are_the_generator_output():
    spec = importlib.util.spec_from_file_location("make_dashboards", GRAFANA_DIR / "make_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, text in module.render().items():
        assert (GRAFANA_DIR / "dashboards" / name).read_text() == text, \
            f"{name} is stale: run `python ops/grafana/make_dashboards.py`"


# --- 3. a real Prometheus scraping a real 2-rank run ----------------------------------------------------------
RATE_WINDOW = "20s"  # stands for Grafana's $__rate_interval at a 1 s scrape interval



def _prometheus_config(tmp: Path, *, targets: Path, build_port: int) -> Path:
    """ops/prometheus/prometheus.yml with test paths, a 1 s scrape interval and the build exporter's port."""
    import yaml

    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["cotrain"]["file_sd_configs"][0].update(files=[str(targets / "*.json")], refresh_interval="1s")
    jobs["cotrain-shards"]["static_configs"] = [{"targets": [f"127.0.0.1:{build_port}"]}]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _query(api: str, expr: str) -> list:
    url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def _grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("$run", ".*").replace("$rank", ".*")


class _Processes:
    """Processes this test starts, each in its own session, killed (group and all) at the end."""

    def __init__(self):
        self.started: list[subprocess.Popen] = []

    def start(self, cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                                **kwargs)
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _wait_for(check, *, seconds: float, what: str, logs: list[Path]):
    deadline = time.time() + seconds
    while time.time() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
    pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}\n{tails}")


def _missing(api: str, names: set[str]) -> set[str]:
    present = set(json.loads(urllib.request.urlopen(f"{api}/api/v1/label/__name__/values", timeout=10)
                             .read())["data"])
    return {n for n in names if n not in present}


def _start_prometheus(processes: _Processes, tmp: Path, *, targets: Path, build_port: int) -> str:
    """Prometheus on a free loopback port with a temporary storage folder; returns its base URL."""
    api = f"http://127.0.0.1:{free_port()}"
    config = _prometheus_config(tmp, targets=targets, build_port=build_port)
    processes.start(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                     f"--web.listen-address={api.removeprefix('http://')}"], tmp / "prometheus.log")
    return api


def _start_two_rank_run(processes: _Processes, tmp: Path, *, shards: Path, targets: Path) -> None:
    """2 CPU ranks under the deepspeed launcher, checkpointing every 2 steps and validating every epoch.

    ZeRO-2, because only its optimizer reports the gradient norm on CPU (stage 0 fp32 clips without it);
    transfer from the first step (by default it starts at 40% of training), so its loss is exported."""
    processes.start([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                     str(VENV_BIN / "cotrain"), "train", "--shards", str(shards), "--out", str(tmp / "run"),
                     "--epochs", "40", "--batch-size", "4", "--save-every", "2", "--zero-stage", "2",
                     "--set", "transfer.start_fraction=0", "--metrics-port", str(free_port()),
                     "--metrics-targets", str(targets)],
                    tmp / "train.log", env=dict(clean_env(), DS_ACCELERATOR="cpu"))


def _check_real_expositions(targets: Path) -> None:
    """Each rank's file_sd entry points at an exporter whose real output passes promtool's lint."""
    endpoints = [json.loads(f.read_text())[0]["targets"][0] for f in sorted(targets.glob("run-rank-*.json"))]
    assert len(endpoints) == 2
    for endpoint in endpoints:
        body = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10).read().decode()
        lint = _promtool("check", "metrics", stdin=body)
        assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr


def _panels_without_data(api: str) -> list[tuple[str, str, str]]:
    """(dashboard, panel, query) of every query that returns nothing, leaving out GPU-only and
    task-specific series a CPU classification run cannot have."""
    return [(name, title, expr) for name, title, exprs in _dashboard_queries() for expr in exprs
            if not set(METRIC_NAME.findall(expr)) <= GPU_ONLY | TASK_SPECIFIC
            and not _query(api, _grafana_to_promql(expr))]


def test_a_real_prometheus_scrapes_a_two_rank_run_and_every_panel_has_data(tiny_shards, synthetic_manifest,
                                                                             tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is missing: run `make system-deps` as root (installs Debian's prometheus)")
    targets, build, processes = tmp_path / "targets", BuildMetrics(), _Processes()
    build_port = free_port()
    assert build.serve(host="127.0.0.1", port=build_port)
    build_shards(_small_manifest(synthetic_manifest), out=tmp_path / "built", workers=1, progress=False,
                 observer=build)
    try:
        api = _start_prometheus(processes, tmp_path, targets=targets, build_port=build_port)
        _start_two_rank_run(processes, tmp_path, shards=tiny_shards, targets=targets)
        # ready: rank 0 validated, both ranks checkpointed, both stepping, as Prometheus sees them
        ready = "count(cotrain_eval_epoch) + count(cotrain_checkpoint_last_success_timestamp_seconds) " \
                "+ count(rate(cotrain_steps_total[10s]) > 0)"
        _wait_for(lambda: _try_query(api, ready) == 5, seconds=300, what="both ranks scraped after a checkpoint "
                  "and a validation", logs=[tmp_path / "prometheus.log", tmp_path / "train.log"])
        time.sleep(3)  # a few more scrapes, so rate() windows hold several points
        _check_real_expositions(targets)
        assert len(_dashboard_queries()) > 20
        assert not _missing(api, _named_metrics() - GPU_ONLY - TASK_SPECIFIC)
        assert not _panels_without_data(api), _panels_without_data(api)
        assert {r["metric"]["rank"] for r in _query(api, "cotrain_steps_total")} == {"0", "1"}
        assert {r["metric"]["job"] for r in _query(api, "up == 1")} == {"cotrain", "cotrain-shards"}
        rules = json.loads(urllib.request.urlopen(f"{api}/api/v1/rules", timeout=10).read())["data"]["groups"]
        assert len(rules[0]["rules"]) == 5 and all(r["health"] == "ok" for r in rules[0]["rules"]), rules
        alerts = json.loads(urllib.request.urlopen(f"{api}/api/v1/alerts", timeout=10).read())["data"]["alerts"]
        assert not [a for a in alerts if a["state"] == "firing"], alerts  # a healthy run raises no alert
    finally:
        processes.stop()
        build.close()


def _try_query(api: str, expr: str) -> float | None:
    try:
        result = _query(api, expr)
    except OSError:
        return None
    return float(result[0]["value"][1]) if result else None
