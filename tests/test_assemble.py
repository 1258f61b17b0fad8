"""fusion.assemble: the teacher scored from its parts (each stream, the Transformer) at their own best epochs."""
import json
import math

import pytest
import torch

from model.cotrain import TRANSFORMER
from ops.assemble import ASSEMBLY_FILE, assembled_outputs, choose_assembly, read_assembly
from ops.config import RunConfig, config_hash, hashed_config
from ops.evaluate import evaluate_run, format_scores, read_predictions
from ops.train import train

STREAMS = ["multimodal/a", "multimodal/b"]


def _row(label, a, b, transformer):
    outputs = {TRANSFORMER: transformer}
    outputs.update({s: v for s, v in zip(STREAMS, (a, b)) if v is not None})
    return {"label": label, "outputs": outputs}


def test_the_assembly_is_the_product_of_the_present_streams_plus_w_times_the_transformer():
    rows = {"k1": _row(1, [0.0, 2.0], None, [1.0, 0.0]), "k0": _row(0, [1.0, 0.0], [0.0, 3.0], [0.0, 0.0])}
    keys, outputs, labels = assembled_outputs(rows, STREAMS, 0.5, "class")
    assert keys == ["k0", "k1"] and labels.tolist() == [0, 1]
    log_p = lambda v: torch.log_softmax(torch.tensor(v, dtype=torch.float64), dim=-1)
    k0 = log_p([1.0, 0.0]) + log_p([0.0, 3.0]) + 0.5 * log_p([0.0, 0.0])
    k1 = log_p([0.0, 2.0]) + 0.5 * log_p([1.0, 0.0])  # k1 has no b: its absent stream counts for nothing
    assert torch.allclose(outputs, torch.stack([k0, k1]).float())


def test_the_weight_is_chosen_by_the_assembly_score_and_ties_go_to_the_first():
    # the streams get k0 wrong, the Transformer gets it right: a weight above 2 turns it
    rows = {"k0": _row(0, [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]), "k1": _row(1, [0.0, 1.0], [0.0, 1.0], [0.0, 1.0])}
    weight, score = choose_assembly(rows, STREAMS, (0.0, 0.5, 8.0, 9.0), "class", 2)
    assert (weight, score["accuracy"]) == (8.0, 1.0)
    weight, score = choose_assembly(rows, STREAMS, (0.0, 0.5), "class", 2)
    assert (weight, score["accuracy"]) == (0.0, 0.5)


def test_fusion_assemble_counts_in_the_config_hash_only_when_on():
    """Off is how every run was trained before the option existed: those keep their hash, so grids reuse them."""
    a, b = RunConfig(shards="s", out="o", mode="multimodal"), RunConfig(shards="s", out="o", mode="multimodal")
    assert a.fusion.assemble is False and "assemble" not in hashed_config(a)["fusion"]
    b.fusion.assemble = True
    assert config_hash(a) != config_hash(b)


def test_a_run_keeps_each_parts_weights_and_assembled_at_one_epoch_it_is_the_teacher(tiny_shards, tmp_path):
    """One epoch: every part's best epoch is the teacher's, so the assembly must reproduce the teacher's outputs
    exactly; it ties on validation and is not used until told, and a missing part's weights fall back."""
    out = tmp_path / "mm"
    cfg = RunConfig(shards=str(tiny_shards), out=str(out), mode="multimodal", epochs=1)
    cfg.loader.batch_size, cfg.metrics.port, cfg.fusion.assemble = 4, 0, True
    train(cfg)
    best = out / "best"
    for m in ("rgb", "audio", "text"):  # a stream's file holds its own weights only
        keys = torch.load(best / "multimodal" / f"{m}.pt", weights_only=True).keys()
        assert keys and all(k.startswith((f"shared.{m}.", f"teacher.rests.{m}.", f"teacher.stream_heads.{m}."))
                            for k in keys)
    record = json.loads((best / ASSEMBLY_FILE).read_text())
    assert set(record["parts"].values()) == {1} and record["used"] is False
    assert record["val"]["accuracy"] == record["single_epoch_val"]["accuracy"]
    assert read_assembly(best) is None

    single = evaluate_run(out, split="test")
    alone = read_predictions(out / "predictions-test.jsonl")
    (best / ASSEMBLY_FILE).write_text(json.dumps(dict(record, used=True)))
    assembled = evaluate_run(out, split="test")
    assert assembled["assembly"]["parts"] == record["parts"] and "assembly" not in single
    assert "multimodal: assembled from its parts' best epochs (rgb 1, audio 1, text 1, transformer 1" \
        in format_scores(assembled)
    together = read_predictions(out / "predictions-test.jsonl")
    assert together.keys() == alone.keys()
    for key, row in together.items():
        assert row["outputs"]["multimodal"] == pytest.approx(alone[key]["outputs"]["multimodal"], abs=1e-4)
    assert math.isclose(assembled["branches"]["multimodal"]["accuracy"], single["branches"]["multimodal"]["accuracy"])

    (best / "multimodal" / "audio.pt").unlink()
    assert read_assembly(best) is None and "assembly" not in evaluate_run(out, split="test")
