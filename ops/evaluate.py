"""Per-branch evaluation: every branch of a run scored on one split, each unimodal branch alone."""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch

from model.cotrain import TEACHER, CoTrainModel
from model.export import model_from_payload
from pipeline.config import LoaderConfig
from pipeline.loader import BaseLoader, make_loader
from pipeline.dataset import load_dataset_info

from .assemble import assembled_outputs, part_outputs, read_assembly, score_outputs, stream_parts
from .device import loader_device_id
from .progress import progress_bar
from .scores import is_better, make_scorer, primary_metric

__all__ = ["MODEL_FILE", "BEST_DIR", "build_run_model", "load_run", "score_branches", "evaluate_run", "format_scores",
           "teacher_warning", "task_of", "plot_confusions", "record_predictions", "write_predictions",
           "read_predictions"]

MODEL_FILE = "model.pt"
BEST_DIR = "best"


def build_run_model(payload: dict) -> CoTrainModel:
    """Rebuild the model a checkpoint payload describes (without weights)."""
    return model_from_payload(payload)


def load_run(run: str | Path) -> tuple[CoTrainModel, dict]:
    """The trained model of RUN and its checkpoint payload."""
    path = Path(run) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train first with `cotrain train --out {run}`, "
                                "or point --run at a finished run directory")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model = build_run_model(payload)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


def task_of(info) -> tuple[str, int]:
    """(task type, classes or target dimension) of a dataset, from dataset.json's "label"."""
    label = getattr(info, "label", None) or {"type": "class", "num_classes": info.num_classes}
    task = label.get("type", "class")
    return task, int(label.get("dim", label.get("num_classes", info.num_classes)))


@torch.no_grad()
def score_branches(model: CoTrainModel, loader: BaseLoader, *, branches: list[str] | None = None,
                   prepare=lambda batch: batch, task: str = "class", size: int | None = None,
                   predictions: dict | None = None, candidates: bool = False,
                   progress: bool = False) -> dict[str, dict]:
    """The metrics of each branch over one pass of `loader` (ops/scores.py). A unimodal branch sees
    only its own input and is scored on the samples that have it. With a `predictions` dict, also records
    each sample's outputs there (record_predictions). With candidates=True, also scores the teacher under each
    Transformer weight it may choose (model.teacher_candidates), as branches "multimodal@<weight>". With
    progress=True, a bar over the batches on stderr (the caller decides: ops.progress)."""
    was_training = model.training
    model.eval()
    branches = branches or model.branches
    scorers = {}
    bar = progress_bar(loader, enabled=progress, total=getattr(loader, "steps_per_epoch", None), unit="batch",
                       desc=f"scoring {', '.join(branches)}", leave=False)
    for batch in bar:
        batch = prepare(batch)
        logits = model(batch.inputs, batch.present, getattr(batch, "lengths", None) or None)  # lengths mask padded sequences
        if candidates:
            logits.update({f"{TEACHER}@{w:g}": v for w, v in model.teacher_candidates(logits).items()})
        scored = branches + [b for b in logits if b.startswith(f"{TEACHER}@")]
        if not scorers:  # sized by the heads' outputs unless told
            scorers = {b: make_scorer(task, size or logits[b].shape[-1]) for b in scored}
        everyone = torch.ones(len(batch), dtype=torch.bool, device=batch.labels.device)
        for branch in scored:
            mask = input_present(batch, branch, everyone)
            scorers[branch].update(logits[branch].float().cpu(), batch.labels.cpu(), mask.cpu())  # bf16 on GPU
        if predictions is not None:
            record_predictions(predictions, batch, {b: logits[b] for b in branches})
    model.train(was_training)
    return {b: scorer.result() for b, scorer in scorers.items()}


def input_present(batch, branch: str, default):
    """Which samples of `batch` have the input `branch` sees: a student's or a teacher stream's modality
    ("rgb", "multimodal/rgb"); `default` for the teacher and its Transformer, which see every sample."""
    return batch.present.get(branch.removeprefix(f"{TEACHER}/"), default)


def record_predictions(predictions: dict, batch, outputs: dict[str, torch.Tensor]) -> None:
    """predictions[key] = {"key", "label", "outputs": {branch: list}}: each sample's raw outputs (logits for
    classes and labels, values for regression), for branches whose input the sample has (the teacher always)."""
    labels = batch.labels.cpu().tolist()
    present = {b: input_present(batch, b, None) for b in outputs}
    present = {b: None if p is None else p.cpu() for b, p in present.items()}
    values = {b: o.float().cpu() for b, o in outputs.items()}
    for i, key in enumerate(batch.keys):
        row = predictions.setdefault(key, {"key": key, "label": labels[i], "outputs": {}})
        for branch, output in values.items():
            if present[branch] is None or bool(present[branch][i]):
                row["outputs"][branch] = [round(v, 6) for v in output[i].tolist()]


def write_predictions(path: Path, predictions: dict) -> None:
    """One JSON line per sample, in key order (a padded last batch repeats no sample)."""
    lines = [json.dumps(predictions[key]) for key in sorted(predictions)]
    path.write_text("".join(line + "\n" for line in lines))


def read_predictions(path: Path) -> dict[str, dict]:
    """key -> {"key", "label", "outputs": {branch: list}}, as write_predictions wrote them."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `cotrain eval --run {path.parent} --split "
                                f"{path.stem.removeprefix('predictions-')}` to write it")
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {row["key"]: row for row in rows}


def _best_weights(run: Path, branch: str) -> Path:
    return run / BEST_DIR / f"{branch}.pt"


def evaluate_run(run: str | Path, *, split: str = "test", shards: str | None = None, which: str = "best",
                 save_scores: bool = True, progress: bool = False) -> dict:
    """Score RUN on `split` and write RUN/eval-<split>.json and RUN/predictions-<split>.jsonl (each sample's
    key, label and every branch's outputs). With which='best', each branch is scored with the weights of its
    own best validation epoch (a student's best epoch may differ from the teacher's); 'last' scores the final
    weights. save_scores=False writes the predictions alone (training already wrote eval-val.json, with the
    best epochs in it). progress=True draws a bar over each pass's batches (`cotrain eval` on a terminal)."""
    run = Path(run)
    model, payload = load_run(run)
    info = load_dataset_info(shards or payload["config"]["shards"])
    if shards:
        from .shards_match import check_shards_match
        check_shards_match(payload, info)
    device_id = loader_device_id()  # decode on the GPU where training did, with the same colour conversion
    loader = make_loader(info, split, LoaderConfig(**payload["config"]["loader"]),
                         modalities=[s["name"] for s in payload["specs"]], training=False, device_id=device_id)
    device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
    model.to(device)
    assembly = read_assembly(run / BEST_DIR) if which == "best" else None
    # branches that share weights (all of them with which='last') are scored in one pass
    sources: dict[Path | None, list[str]] = {}
    for branch in model.branches:
        if branch == TEACHER and assembly is not None:
            continue  # scored from its parts, below
        best = _best_weights(run, branch)
        sources.setdefault(best if which == "best" and best.is_file() else None, []).append(branch)
    task, size = task_of(info)
    scores, predictions = {}, {}
    scoring = dict(task=task, size=size, prepare=lambda batch: batch.to(device), progress=progress)
    for source, branches in sources.items():
        state = payload["state_dict"] if source is None else torch.load(source, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        scores.update(score_branches(model, loader, branches=branches, predictions=predictions, **scoring))
    if assembly is not None:
        scores[TEACHER] = _score_assembled(model, loader, run / BEST_DIR, assembly, predictions, scoring)
    scores = {b: scores[b] for b in model.branches}
    result = {"split": split, "mode": payload["mode"], "which": which, "task": task, "branches": scores}
    if assembly is not None:
        result["assembly"] = {k: assembly[k] for k in ("parts", "transformer_weight")}
    write_predictions(run / f"predictions-{split}.jsonl", predictions)
    if not save_scores:
        return result
    (run / f"eval-{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    if task == "class":
        plot_confusions(result, run / "plots", names=getattr(info, "label", {}).get("names"))
    return result


def _score_assembled(model: CoTrainModel, loader, folder: Path, assembly: dict, predictions: dict,
                     scoring: dict) -> dict:
    """The assembled teacher's scores (ops/assemble.py); its outputs join each sample's predictions."""
    base = torch.load(_best_weights(folder.parent, TEACHER), map_location="cpu", weights_only=True)
    rows = part_outputs(model, loader, folder, base, **scoring)
    keys, outputs, labels = assembled_outputs(rows, stream_parts(model), assembly["transformer_weight"],
                                              scoring["task"])
    for key, output in zip(keys, outputs):
        row = predictions.setdefault(key, {"key": key, "label": rows[key]["label"], "outputs": {}})
        row["outputs"][TEACHER] = [round(v, 6) for v in output.tolist()]
    return score_outputs(outputs, labels, scoring["task"], scoring["size"])


def plot_confusions(result: dict, folder: Path, names: list[str] | None = None) -> list[Path]:
    """One confusion-matrix PNG per branch (rows: true class, columns: predicted), counts in the cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for branch, score in result["branches"].items():
        matrix = torch.tensor(score["confusion"])
        k = len(matrix)
        fig, ax = plt.subplots(figsize=(1.2 + 0.45 * k, 1.0 + 0.45 * k))
        ax.imshow(matrix, cmap="Blues")
        labels = names or [str(i) for i in range(k)]
        ax.set_xticks(range(k), labels, rotation=90 if names else 0)
        ax.set_yticks(range(k), labels)
        for (i, j), count in ((ij, int(matrix[ij])) for ij in itertools.product(range(k), range(k))):
            if count:
                ax.text(j, i, count, ha="center", va="center", fontsize=7,
                        color="white" if count > matrix.max() / 2 else "black")
        ax.set(xlabel="predicted", ylabel="true",
               title=f"{branch} on {result['split']}: accuracy {100 * score['accuracy']:.1f}%")
        fig.tight_layout()
        path = folder / f"confusion-{result['split']}-{branch.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def format_scores(result: dict) -> str:
    """A plain-text table, one row per branch, the task's scalar metrics as columns."""
    rows = result["branches"]
    columns = [k for k, v in next(iter(rows.values())).items() if isinstance(v, (int, float)) and k != "samples"]
    lines = [f"{'branch':<14}" + "".join(f" {c:>10}" for c in columns) + f" {'samples':>8}"]
    for branch, score in rows.items():
        lines.append(f"{branch:<14}" + "".join(f" {score[c]:>10.4f}" for c in columns) + f" {score['samples']:>8}")
    if "assembly" in result:
        parts, weight = result["assembly"]["parts"], result["assembly"]["transformer_weight"]
        lines.append(f"{TEACHER}: assembled from its parts' best epochs ("
                     + ", ".join(f"{p.removeprefix(TEACHER + '/')} {e}" for p, e in parts.items())
                     + f"; Transformer weight {weight:g})")
    return "\n".join(lines)


def teacher_warning(result: dict) -> str | None:
    """Transfer only helps when the teacher is the strongest branch: say so when it is not."""
    branches, task = result["branches"], result.get("task", "class")
    if TEACHER not in branches or len(branches) < 2:
        return None
    teacher = branches[TEACHER]
    stronger = [b for b, s in branches.items() if b != TEACHER and is_better(task, s, teacher)]
    if not stronger:
        return None
    metric = primary_metric(task)
    return (f"warning: on {result['split']}, student(s) {', '.join(stronger)} beat the multimodal teacher "
            f"({metric} {teacher[metric]:.3f}); transfer from a weaker teacher hurts students: give the teacher more capacity "
            "or train longer, or lower --alpha")


def print_warning(result: dict) -> None:
    message = teacher_warning(result)
    if message:
        print(message, file=sys.stderr)
