"""model/: encoders, the co-trained model, and the transfer loss's value and gradient flow."""
import math

import pytest
import torch

from model.cotrain import TEACHER, CoTrainModel, ModalitySpec
from model.losses import TransferConfig, cotrain_losses, decision_transfer, total_loss

SPECS = [
    ModalitySpec("rgb", "video", {"widths": (8, 8, 16)}),
    ModalitySpec("audio", "audio", {"in_channels": 10, "widths": (8, 16, 16)}),
    ModalitySpec("text", "text", {"vocab_size": 20, "widths": (8, 16, 16)}),
]


def _batch(b=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 20, (b, 6), generator=g)
    ids[:, 4:] = 0  # padding
    inputs = {"rgb": torch.randn(b, 3, 4, 16, 16, generator=g), "audio": torch.randn(b, 10, 20, generator=g), "text": ids}
    present = {m: torch.ones(b, dtype=torch.bool) for m in inputs}
    return inputs, present, torch.randint(0, 5, (b,), generator=g)


def test_cotrain_model_returns_every_branch():
    model = CoTrainModel(SPECS, 5, mode="cotrain")
    inputs, present, _ = _batch()
    logits = model(inputs, present)
    assert model.branches == ["rgb", "audio", "text", TEACHER]
    assert set(logits) == {"rgb", "audio", "text", TEACHER, f"{TEACHER}/rgb", f"{TEACHER}/audio", f"{TEACHER}/text",
                           f"{TEACHER}/transformer", f"{TEACHER}/late_fusion"}
    assert all(v.shape == (4, 5) and torch.isfinite(v).all() for v in logits.values())


def test_modes_build_the_right_branches():
    assert CoTrainModel(SPECS[:1], 5, mode="unimodal").branches == ["rgb"]
    assert CoTrainModel(SPECS, 5, mode="multimodal").branches == [TEACHER]
    with pytest.raises(ValueError, match="one modality"):
        CoTrainModel(SPECS, 5, mode="unimodal")


def test_missing_modality_is_ignored_by_the_teacher():
    torch.manual_seed(0)
    model = CoTrainModel(SPECS, 5, mode="multimodal").eval()
    inputs, present, _ = _batch()
    present["audio"] = torch.tensor([True, False, True, False])
    ref = model(inputs, present)[TEACHER]
    scrambled = dict(inputs, audio=torch.randn_like(inputs["audio"]) * 100)
    out = model(scrambled, present)[TEACHER]
    assert torch.allclose(out[1], ref[1], atol=1e-5) and torch.allclose(out[3], ref[3], atol=1e-5)
    assert not torch.allclose(out[0], ref[0], atol=1e-3)  # present samples do see the change


def test_decision_transfer_matches_hand_computed_value():
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0]])
    t = 2.0
    p_t = torch.softmax(teacher / t, -1)[0].tolist()
    p_s = torch.softmax(student / t, -1)[0].tolist()
    by_hand = t * t * sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s))
    got = decision_transfer(student, teacher, t, torch.tensor([True]))
    assert got.item() == pytest.approx(by_hand, rel=1e-6)
    assert decision_transfer(teacher, teacher, t, torch.tensor([True])).item() == pytest.approx(0.0, abs=1e-7)


def test_transfer_gives_no_gradient_to_teacher_but_shared_gets_both_paths():
    torch.manual_seed(0)
    model = CoTrainModel(SPECS, 5, mode="cotrain")
    inputs, present, labels = _batch()
    logits = model(inputs, present)
    terms = cotrain_losses(logits, labels, present, TransferConfig(alpha=1.0, gate="none"))
    transfer = sum(v for k, v in terms.items() if k.endswith("_transfer_loss"))
    transfer.backward()
    teacher_grads = [p.grad for p in model.teacher.parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in teacher_grads)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.shared.parameters())

    # the teacher's own objective (fused and stream losses) also reaches the shared stages: both paths feed them
    model.zero_grad()
    logits = model(inputs, present)
    terms = cotrain_losses(logits, labels, present, TransferConfig(alpha=0.0))
    sum(v for k, v in terms.items() if k.startswith(TEACHER)).backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.shared.parameters())


def test_total_loss_sums_named_terms_and_alpha_zero_drops_transfer():
    model = CoTrainModel(SPECS, 5, mode="cotrain")
    inputs, present, labels = _batch()
    logits = model(inputs, present)
    terms = cotrain_losses(logits, labels, present, TransferConfig(alpha=0.0))
    assert not any(k.endswith("_transfer_loss") for k in terms)
    assert torch.isclose(total_loss(terms), sum(v for k, v in terms.items() if k.endswith("_loss")))
    assert "multimodal_teacher" in terms  # logged, not summed


def test_transfer_config_rules():
    with pytest.raises(ValueError, match="transfer.alpha"):
        TransferConfig(alpha=-1)
    with pytest.raises(ValueError, match="transfer.temperature"):
        TransferConfig(temperature=0)
    assert TransferConfig(alpha=2.0, start_fraction=0.0, warmup_fraction=0.5).scale_at(0.25) == pytest.approx(1.0)
    held = TransferConfig(alpha=2.0, start_fraction=0.4, warmup_fraction=0.2)
    assert held.scale_at(0.3) == 0.0 and held.scale_at(0.5) == pytest.approx(1.0) and held.scale_at(0.9) == 2.0
    with pytest.raises(ValueError, match="transfer.start_fraction"):
        TransferConfig(start_fraction=1.0)


def test_teacher_correct_gate_transfers_only_where_the_teacher_is_right():
    teacher = torch.tensor([[5.0, 0.0], [5.0, 0.0]])  # predicts class 0 for both
    student = torch.tensor([[0.0, 5.0], [0.0, 5.0]])
    labels = torch.tensor([0, 1])  # right on the first sample only
    present = {"a": torch.tensor([True, True])}
    logits = {"a": student, TEACHER: teacher}
    gated = cotrain_losses(logits, labels, present, TransferConfig(gate="teacher_correct"))["a_transfer_loss"]
    first_only = decision_transfer(student[:1], teacher[:1], 2.0, torch.tensor([True]))
    assert gated.item() == pytest.approx(first_only.item())
    ungated = cotrain_losses(logits, labels, present, TransferConfig(gate="none"))["a_transfer_loss"]
    assert ungated.item() == pytest.approx(decision_transfer(student, teacher, 2.0, present["a"]).item())


def test_stream_correct_gate_also_asks_the_students_own_modality_to_show_the_class():
    teacher = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])  # right, right, wrong
    own_stream = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 3.0]])  # the student's modality: right, wrong, wrong
    student = torch.tensor([[0.0, 5.0], [0.0, 5.0], [0.0, 5.0]])
    labels = torch.tensor([0, 0, 0])
    present = {"a": torch.ones(3, dtype=torch.bool)}
    logits = {"a": student, TEACHER: teacher, f"{TEACHER}/a": own_stream}
    gated = cotrain_losses(logits, labels, present, TransferConfig(gate="stream_correct"))["a_transfer_loss"]
    assert gated.item() == pytest.approx(decision_transfer(student[:1], teacher[:1], 2.0, present["a"][:1]).item())
    del logits[f"{TEACHER}/a"]
    with pytest.raises(ValueError, match="fusion.stream_loss"):
        cotrain_losses(logits, labels, present, TransferConfig(gate="stream_correct"))


def test_teacher_better_gate_also_asks_the_teacher_to_beat_the_student_on_the_sample():
    from model.tasks import TaskConfig

    teacher = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    student = torch.tensor([[0.5, 0.0], [6.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 0])  # teacher right and surer / right but less sure / wrong
    present = {"a": torch.ones(3, dtype=torch.bool)}
    logits = {"a": student, TEACHER: teacher}
    gated = cotrain_losses(logits, labels, present, TransferConfig(gate="teacher_better"))["a_transfer_loss"]
    assert gated.item() == pytest.approx(decision_transfer(student[:1], teacher[:1], 2.0, present["a"][:1]).item())

    regression = TaskConfig(type="regression")
    target = torch.tensor([1.0, 1.0, -1.0])
    teacher, student = torch.tensor([[0.9], [0.0], [-3.0]]), torch.tensor([[0.0], [0.9], [0.0]])
    terms = cotrain_losses({"a": student, TEACHER: teacher}, target, present,
                           TransferConfig(gate="teacher_better"), task=regression)
    assert terms["a_transfer_loss"].item() == pytest.approx(0.9 ** 2)  # the first sample only
    everyone = cotrain_losses({"a": student, TEACHER: teacher}, target, present,
                              TransferConfig(gate="teacher_correct"), task=regression)["a_transfer_loss"]
    assert everyone.item() == pytest.approx((0.9 ** 2 + 0.9 ** 2 + 3.0 ** 2) / 3)  # no gate for regression


def test_muted_students_get_no_transfer_terms_but_keep_their_task_loss():
    logits = {"a": torch.randn(4, 3), "b": torch.randn(4, 3), TEACHER: torch.randn(4, 3)}
    present = {m: torch.ones(4, dtype=torch.bool) for m in ("a", "b")}
    transfer = TransferConfig(gate="none", feature=0.0)
    terms = cotrain_losses(logits, torch.tensor([0, 1, 2, 0]), present, transfer, muted=frozenset({"a"}))
    assert "a_transfer_loss" not in terms and "b_transfer_loss" in terms and "a_task_loss" in terms


def test_the_guard_mutes_students_the_teacher_does_not_clearly_lead():
    from ops.train import muted_students

    val = {"rgb": 0.70, "depth": 0.87, TEACHER: 0.88}  # errors 0.30, 0.13 against the teacher's 0.12
    assert muted_students(val, "class", 0.1) == ["depth"]  # 0.12 > 0.9 * 0.13
    assert muted_students(val, "class", 0.0) == []
    assert muted_students({"text": 0.91, "rgb": 1.58, TEACHER: 0.97}, "regression", 0.1) == ["text"]
    assert muted_students({"rgb": 0.5}, "class", 0.1) == []  # no teacher (unimodal run)
    with pytest.raises(ValueError, match="transfer.guard_margin"):
        TransferConfig(guard_margin=1.0)


def test_modality_dropout_hides_modalities_but_keeps_one_per_sample():
    from model.cotrain import FusionConfig, MultimodalBranch

    branch = MultimodalBranch({"a": torch.nn.Identity(), "b": torch.nn.Identity()}, {"a": 4, "b": 4}, 3,
                              FusionConfig(modality_dropout=0.9))
    torch.manual_seed(0)
    present = {"a": torch.ones(1000, dtype=torch.bool), "b": torch.tensor([True, False] * 500)}
    kept = branch._drop_modalities(present)
    both = torch.stack([kept["a"], kept["b"]], 1)
    assert both.any(dim=1).all()  # never everything
    assert not (kept["b"] & ~present["b"]).any()  # never resurrects an absent modality
    assert kept["a"].float().mean() < 0.9  # but does hide


def test_teacher_streams_are_trained_by_their_own_loss_only():
    torch.manual_seed(0)
    model = CoTrainModel(SPECS, 5, mode="multimodal")
    inputs, present, labels = _batch()
    logits = model(inputs, present)
    assert set(logits) == {TEACHER, f"{TEACHER}/rgb", f"{TEACHER}/audio", f"{TEACHER}/text",
                           f"{TEACHER}/transformer", f"{TEACHER}/late_fusion"}
    cotrain_losses(logits, labels, present, TransferConfig())[f"{TEACHER}_task_loss"].backward()
    # the Transformer reads the streams' detached tokens: its loss never reaches the stream heads
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.teacher.stream_heads.parameters())


def test_a_branch_starts_from_the_same_weights_in_every_mode():
    """Paired comparisons: the same seed gives each part the same initial weights whatever the mode."""
    co = CoTrainModel(SPECS, 5, mode="cotrain", init_seed=3).state_dict()
    mm = CoTrainModel(SPECS, 5, mode="multimodal", init_seed=3).state_dict()
    uni = CoTrainModel(SPECS[1:2], 5, mode="unimodal", init_seed=3).state_dict()
    assert all(torch.equal(v, co[k]) for k, v in mm.items())  # teacher and shared stages
    assert all(torch.equal(v, co[k]) for k, v in uni.items())  # audio's shared stages and student
    other = CoTrainModel(SPECS, 5, mode="multimodal", init_seed=4).state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in mm.items())


def test_detached_streams_are_trained_by_their_own_losses_only():
    from model.cotrain import FusionConfig

    torch.manual_seed(0)
    model = CoTrainModel(SPECS, 5, mode="multimodal", fusion=FusionConfig(detach_streams=True))
    inputs, present, labels = _batch()
    terms = cotrain_losses(model(inputs, present), labels, present, TransferConfig())
    terms[f"{TEACHER}_task_loss"].backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.teacher.rests.parameters())
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.teacher.blocks.parameters())
    model.zero_grad()
    terms = cotrain_losses(model(inputs, present), labels, present, TransferConfig())
    terms[f"{TEACHER}_rgb_stream_loss"].backward()
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.teacher.rests["rgb"].parameters())


def test_the_command_line_offers_every_transfer_gate():
    from model.losses import GATES
    from ops.cli import RUN_OPTIONS

    assert list(RUN_OPTIONS["transfer-gate"][0]["type"].choices) == list(GATES)  # ops/cli.py does not import torch
