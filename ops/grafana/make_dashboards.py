"""Writes ops/grafana/dashboards/*.json: edit the panels here, run `python ops/grafana/make_dashboards.py`,
commit both (tests/test_observability.py checks the JSON is this script's output)."""
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
SEL = 'run=~"$run", rank=~"$rank"'
DS = {"type": "prometheus", "uid": "${datasource}"}


def variables(rank_metric="cotrain_steps_total", with_rank=True):
    v = [{"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
          "current": {}, "hide": 0, "refresh": 1},
         {"name": "run", "label": "Run", "type": "query", "datasource": DS,
          "query": {"query": "label_values(cotrain_build_info, run)", "refId": "run"},
          "definition": "label_values(cotrain_build_info, run)", "refresh": 2, "multi": True, "includeAll": True,
          "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "sort": 1}]
    if with_rank:
        v.append({"name": "rank", "label": "Rank", "type": "query", "datasource": DS,
                  "query": {"query": f'label_values({rank_metric}{{run=~"$run"}}, rank)', "refId": "rank"},
                  "definition": f'label_values({rank_metric}{{run=~"$run"}}, rank)', "refresh": 2, "multi": True,
                  "includeAll": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "sort": 3})
    return {"list": v}


class Board:
    def __init__(self):
        self.panels, self.y, self.x = [], 0, 0

    def row(self, title):
        if self.x:
            self.y, self.x = self.y + 8, 0
        self.panels.append({"type": "row", "title": title, "collapsed": False, "id": len(self.panels) + 1,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def panel(self, title, description, unit, targets, kind="timeseries", width=12, **extra):
        if self.x + width > 24:
            self.y, self.x = self.y + 8, 0
        panel = {"id": len(self.panels) + 1, "type": kind, "title": title, "description": description,
                 "datasource": DS, "gridPos": {"h": 8, "w": width, "x": self.x, "y": self.y},
                 "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                 "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                             for i, (expr, legend) in enumerate(targets)], **extra}
        if kind == "table":
            for target in panel["targets"]:
                target.update(format="table", instant=True)
        self.panels.append(panel)
        self.x += width


def dashboard(uid, title, description, board, templating):
    return {"uid": uid, "title": title, "description": description, "tags": ["cotrain"], "schemaVersion": 39,
            "version": 1, "editable": True, "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
            "timezone": "utc", "templating": templating, "annotations": {"list": []}, "panels": board.panels}


def training():
    b = Board()
    b.row("Losses")
    b.panel("Task loss per branch", "Last step's task loss of each branch (students and the multimodal teacher), "
            "averaged over the selected ranks.", "none",
            [(f'avg by (run, branch) (cotrain_loss{{{SEL}, term="task"}})', "{{run}} {{branch}}")])
    b.panel("Transfer loss per student", "Last step's teacher-to-student knowledge-transfer loss of each unimodal "
            "branch (cotrain mode only).", "none",
            [(f'avg by (run, branch) (cotrain_loss{{{SEL}, term="transfer"}})', "{{run}} {{branch}}")])
    b.panel("Total loss", "The objective: the sum of all task and transfer terms, per rank.", "none",
            [(f"cotrain_total_loss{{{SEL}}}", "{{run}} rank {{rank}}")])
    b.panel("Learning rate and gradient norm", "Learning rate of the schedule (left) and the global gradient norm "
            "of the last optimizer step (where DeepSpeed reports it).", "none",
            [(f"max by (run) (cotrain_learning_rate{{{SEL}}})", "{{run}} learning rate"),
             (f"max by (run) (cotrain_gradient_norm{{{SEL}}})", "{{run}} gradient norm")])
    b.row("Speed")
    b.panel("Throughput", "Training samples per second summed over the selected ranks.", "suffix: samples/s",
            [(f"sum by (run) (rate(cotrain_samples_total{{{SEL}}}[$__rate_interval]))", "{{run}}")])
    b.panel("Step time quantiles", "Median, 90th and 99th percentile of one training step's wall time "
            "(forward, backward, optimizer), over the selected ranks.", "s",
            [(f"histogram_quantile({q}, sum by (run, le) (rate(cotrain_step_duration_seconds_bucket{{{SEL}}}"
              f"[$__rate_interval])))", f"{{{{run}}}} p{int(q * 100)}") for q in (0.5, 0.9, 0.99)])
    b.panel("Data wait fraction", "Fraction of step wall time spent waiting for the next batch (last 50 steps). "
            "Above 0.5 for long fires CotrainDataStarvation.", "percentunit",
            [(f"cotrain_data_wait_ratio{{{SEL}}}", "{{run}} rank {{rank}}")])
    b.panel("Data wait per step", "90th percentile of the time a step waited for its batch.", "s",
            [(f"histogram_quantile(0.9, sum by (run, rank, le) (rate(cotrain_data_wait_seconds_bucket{{{SEL}}}"
              f"[$__rate_interval])))", "{{run}} rank {{rank}} p90")])
    b.row("Memory")
    b.panel("Memory per rank", "Resident host memory of each rank's process; on GPU also the memory torch "
            "allocated and reserved on the rank's device.", "bytes",
            [(f"cotrain_host_memory_bytes{{{SEL}}}", "{{run}} rank {{rank}} host"),
             (f"cotrain_device_memory_allocated_bytes{{{SEL}}}", "{{run}} rank {{rank}} device allocated"),
             (f"cotrain_device_memory_reserved_bytes{{{SEL}}}", "{{run}} rank {{rank}} device reserved")],
            width=24)
    b.row("Per rank")
    b.panel("Steps per second per rank", "Optimizer steps per second of each rank; ranks should move together "
            "(a slow rank holds every collective).", "suffix: steps/s",
            [(f"rate(cotrain_steps_total{{{SEL}}}[$__rate_interval])", "{{run}} rank {{rank}}")], width=8)
    b.panel("Time since last step", "Seconds since each rank finished a step; over 15 minutes fires "
            "CotrainTrainingStalled.", "s",
            [(f"time() - cotrain_last_step_timestamp_seconds{{{SEL}}}", "{{run}} rank {{rank}}")], width=8)
    b.panel("Skipped steps", "Steps skipped because the loss was NaN or infinite on some rank, by reason.", "none",
            [(f"sum by (run, reason) (cotrain_skipped_steps_total{{{SEL}}})", "{{run}} {{reason}}")], width=8)
    b.panel("Checkpoint duration", "Mean wall time of a checkpoint save, per rank.", "s",
            [(f"cotrain_checkpoint_duration_seconds_sum{{{SEL}}} / cotrain_checkpoint_duration_seconds_count{{{SEL}}}",
              "{{run}} rank {{rank}}")], width=8)
    b.panel("Time since last checkpoint", "Seconds since each rank's last complete checkpoint; over an hour with "
            "checkpointing on fires CotrainCheckpointsFailing.", "s",
            [(f"time() - cotrain_checkpoint_last_success_timestamp_seconds{{{SEL}}}", "{{run}} rank {{rank}}")],
            width=8)
    b.panel("Runs", "Constants of each rank: version, ZeRO stage, world size and mode.", "none",
            [(f"cotrain_build_info{{{SEL}}}", "")], kind="table", width=8)
    return dashboard("cotrain-training", "cotrain: training", "Losses, speed, data wait, memory and a per-rank view "
                     "of cotrain runs.", b, variables())


def evaluation():
    b = Board()
    sel = 'run=~"$run", split="val"'
    b.panel("Validation accuracy per branch", "Accuracy of each branch on the validation split at the last "
            "evaluated epoch (classification).", "percentunit",
            [(f"max by (run, branch) (cotrain_eval_accuracy_ratio{{{sel}}})", "{{run}} {{branch}}")])
    b.panel("Validation macro-F1 per branch", "Macro-F1 of each branch on the validation split (classification "
            "and multi-label).", "percentunit",
            [(f"max by (run, branch) (cotrain_eval_macro_f1_ratio{{{sel}}})", "{{run}} {{branch}}")])
    b.panel("Accuracy against the baselines", "Each branch's validation accuracy by run mode: unimodal runs are "
            "the baselines the co-trained students should beat, multimodal runs the teacher alone.", "percentunit",
            [(f"max by (run, mode, branch) (cotrain_eval_accuracy_ratio{{{sel}}} "
              f"* on (job, instance) group_left (mode) cotrain_build_info)", "{{mode}} {{branch}} ({{run}})")],
            width=24)
    b.panel("Other scores", "Top-5 accuracy (more than 5 classes), micro-F1 and subset accuracy (multi-label), "
            "MAE, Pearson and concordance correlation (regression): whichever the task has.", "none",
            [(f"max by (run, branch) (cotrain_eval_top5_accuracy_ratio{{{sel}}})", "{{run}} {{branch}} top-5"),
             (f"max by (run, branch) (cotrain_eval_micro_f1_ratio{{{sel}}})", "{{run}} {{branch}} micro-F1"),
             (f"max by (run, branch) (cotrain_eval_subset_accuracy_ratio{{{sel}}})", "{{run}} {{branch}} subset acc"),
             (f"max by (run, branch) (cotrain_eval_mean_absolute_error{{{sel}}})", "{{run}} {{branch}} MAE"),
             (f"max by (run, branch) (cotrain_eval_pearson_correlation{{{sel}}})", "{{run}} {{branch}} Pearson"),
             (f"max by (run, branch) (cotrain_eval_concordance_correlation{{{sel}}})", "{{run}} {{branch}} CCC")])
    b.panel("Evaluated epoch", "The epoch of the last validation (the x position of the scores above).", "none",
            [(f"max by (run) (cotrain_eval_epoch{{{sel}}})", "{{run}}")])
    return dashboard("cotrain-evaluation", "cotrain: evaluation", "Per-branch validation metrics over epochs, "
                     "co-training against the unimodal baselines.", b, variables(with_rank=False))


def data():
    b = Board()
    b.row("Shard builds (cotrain shards build --metrics-port)")
    b.panel("Build progress", "Fraction of each split's manifest samples handled (stored or rejected).",
            "percentunit", [("sum by (split) (cotrain_shard_build_processed_samples_total) "
                             "/ sum by (split) (cotrain_shard_build_samples)", "{{split}}")], width=8)
    b.panel("Samples handled per second", "Conversion speed of the build, per split.", "suffix: samples/s",
            [("sum by (split) (rate(cotrain_shard_build_processed_samples_total[$__rate_interval]))", "{{split}}")],
            width=8)
    b.panel("Rejects by reason", "Manifest samples rejected, by the kind of the failing modality (rejects.jsonl "
            "has each sample's message).", "none",
            [("sum by (reason) (cotrain_shard_build_rejects_total)", "{{reason}}")], width=8)
    b.panel("Bytes written", "Bytes of sample members written into shards, per split.", "bytes",
            [("sum by (split) (cotrain_shard_build_written_bytes_total)", "{{split}}")])
    b.panel("Write rate", "Bytes of sample members written per second.", "Bps",
            [("sum(rate(cotrain_shard_build_written_bytes_total[$__rate_interval]))", "all splits")])
    b.row("Loader (training)")
    b.panel("Loader skipped samples by reason", "Corrupt samples the training loader skipped (--on-corrupt skip), "
            "by reason, summed over ranks.", "none",
            [(f"sum by (run, reason) (cotrain_loader_skipped_samples_total{{{SEL}}})", "{{run}} {{reason}}")])
    b.panel("Loader skips per second per rank", "Rate of skipped samples on each rank.", "suffix: samples/s",
            [(f"sum by (run, rank) (rate(cotrain_loader_skipped_samples_total{{{SEL}}}[$__rate_interval]))",
              "{{run}} rank {{rank}}")])
    return dashboard("cotrain-data", "cotrain: data", "Shard builds (progress, rejects, bytes) and the training "
                     "loader's skipped samples.", b, variables(rank_metric="cotrain_loader_skipped_samples_total"))


def render() -> dict[str, str]:
    """{file name: JSON text} of every dashboard."""
    return {f"{name}.json": json.dumps(build(), indent=2) + "\n"
            for name, build in (("training", training), ("evaluation", evaluation), ("data", data))}


if __name__ == "__main__":
    for name, text in render().items():
        (OUT / name).write_text(text)
