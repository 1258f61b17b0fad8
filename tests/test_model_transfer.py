"""model/losses.py, model/tasks.py, model/objective.py: every transfer term's value by hand, gradient isolation
(the teacher gets nothing from transfer; the shared stages get both paths), the tasks' losses, the one call."""
import math
from types import SimpleNamespace

import pytest
import torch

from model.cotrain import TEACHER, CoTrainModel, ModalitySpec
from model.losses import (TransferConfig, attention_transfer, cotrain_losses, feature_transfer, multilabel_transfer,
                          regression_transfer, total_loss)
from model.objective import step_loss
from model.tasks import TaskConfig, ccc, task_loss

SPECS = [
    ModalitySpec("words", "text", {"vocab_size": 20, "dim": 16, "layers": 2, "heads": 2, "dropout": 0.0}, 1,
                 "transformer"),
    ModalitySpec("au", "audio", {"in_channels": 6, "widths": (8, 8, 8)}, 1, pool="attention"),
]


def _batch(labels):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 20, (4, 6), generator=g)
    ids[:, 4:] = 0
    inputs = {"words": ids, "au": torch.randn(4, 6, 16, generator=g)}
    return SimpleNamespace(inputs=inputs, present={m: torch.ones(4, dtype=torch.bool) for m in inputs},
                           labels=labels, lengths={})


def _kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def test_regression_transfer_by_hand():
    s, t = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 4.0], [3.0, 3.0]])
    present = torch.tensor([True, False])
    assert regression_transfer(s, t, "l2", present).item() == pytest.approx((1 + 4) / 2)
    assert regression_transfer(s, t, "l1", present).item() == pytest.approx((1 + 2) / 2)


def test_multilabel_transfer_by_hand():
    s, t, temp = torch.tensor([[0.0, 2.0]]), torch.tensor([[2.0, -2.0]]), 2.0
    sig = lambda x: 1 / (1 + math.exp(-x / temp))  # noqa: E731
    by_hand = temp ** 2 * sum(_kl([sig(b), 1 - sig(b)], [sig(a), 1 - sig(a)]) for a, b in [(0.0, 2.0), (2.0, -2.0)]) / 2
    assert multilabel_transfer(s, t, temp, torch.tensor([True])).item() == pytest.approx(by_hand, rel=1e-5)


def test_feature_transfer_by_hand():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 3.0], [2.0, 2.0]])
    assert feature_transfer(s, t, torch.tensor([True, True])).item() == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)
    assert feature_transfer(s, -s, torch.tensor([True, False])).item() == pytest.approx(2.0, abs=1e-6)


def test_attention_transfer_by_hand():
    s = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    t = torch.tensor([[0.25, 0.25, 0.5, 0.0]])  # the last position is padding for both
    got = attention_transfer(s, t, torch.tensor([True]))
    assert got.item() == pytest.approx(_kl([0.25, 0.25, 0.5], [0.5, 0.25, 0.25]), rel=1e-5)
    assert attention_transfer(t, t, torch.tensor([True])).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same tokens"):
        attention_transfer(s, t[:, :3], torch.tensor([True]))


def _grads(params):
    return [p.grad for p in params]


@pytest.mark.parametrize("level", ["decision", "feature", "attention"])
def test_each_transfer_term_gives_the_teacher_no_gradient_and_reaches_shared_stages(level):
    torch.manual_seed(0)
    model = CoTrainModel(SPECS, 3, feature_transfer=True)
    weights = {"decision": dict(alpha=1.0), "feature": dict(alpha=0.0, feature=1.0),
               "attention": dict(alpha=0.0, attention=1.0)}[level]
    transfer = TransferConfig(gate="none", start_fraction=0.0, warmup_fraction=0.0, **weights)
    loss, terms = step_loss(model, _batch(torch.tensor([0, 1, 2, 0])), transfer=transfer, task=TaskConfig(),
                            progress=0.5)
    suffix = {"decision": "_transfer_loss", "feature": "_feature_transfer_loss",
              "attention": "_attention_transfer_loss"}[level]
    transfer_terms = [v for k, v in terms.items() if k.endswith(suffix) and (level != "decision" or "_" not in
                                                                               k[:-len(suffix)])]
    assert len(transfer_terms) == 2 and all(v > 0 for v in transfer_terms)  # both students (text has self-attention)
    sum(transfer_terms).backward()
    assert all(g is None or torch.count_nonzero(g) == 0 for g in _grads(model.teacher.parameters()))
    for m in ("words", "au"):
        assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.shared[m].parameters())
    # and the teacher's own losses reach the same shared stages: they get both paths
    model.zero_grad()
    _, terms = step_loss(model, _batch(torch.tensor([0, 1, 2, 0])), transfer=TransferConfig(alpha=0.0),
                         task=TaskConfig(), progress=0.5)
    sum(v for k, v in terms.items() if k.startswith(TEACHER)).backward()
    for m in ("words", "au"):
        assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.shared[m].parameters())


def test_student_shared_grad_scales_what_the_students_send_into_the_shared_stages():
    from model.cotrain import FusionConfig

    def shared_grad(scale):
        torch.manual_seed(0)
        model = CoTrainModel(SPECS, 3, fusion=FusionConfig(student_shared_grad=scale))
        logits = model(_batch(None).inputs, _batch(None).present)
        sum(logits[m].square().sum() for m in ("words", "au")).backward()  # the students' paths only
        return torch.cat([p.grad.flatten() for p in model.shared["au"].parameters()]), logits["au"].detach()

    full, out_full = shared_grad(1.0)
    half, out_half = shared_grad(0.5)
    none, out_none = shared_grad(0.0)
    assert torch.count_nonzero(full) > 0 and torch.allclose(half, 0.5 * full, atol=1e-7)
    assert torch.count_nonzero(none) == 0
    assert torch.equal(out_full, out_half) and torch.equal(out_full, out_none)  # the forward pass is unchanged
    with pytest.raises(ValueError, match="student_shared_grad"):
        FusionConfig(student_shared_grad=2.0)


def test_step_loss_is_cotrain_losses_of_forward_when_only_decision_transfer():
    torch.manual_seed(0)
    model = CoTrainModel(SPECS, 3)
    batch = _batch(torch.tensor([0, 1, 2, 0]))
    transfer = TransferConfig()
    torch.manual_seed(1)
    loss, terms = step_loss(model, batch, transfer=transfer, task=TaskConfig(), progress=0.6,
                            stream_label_smoothing=0.2)
    torch.manual_seed(1)
    ref = cotrain_losses(model(batch.inputs, batch.present), batch.labels, batch.present, transfer,
                         transfer_scale=transfer.scale_at(0.6), stream_label_smoothing=0.2)
    assert terms.keys() == ref.keys() and all(torch.equal(terms[k], ref[k]) for k in ref)
    assert torch.equal(loss, total_loss(ref))  # the terms ending in _loss; the teacher's combined output is logged


def test_terms_follow_the_schedule_and_students_without_attention_have_no_attention_term():
    torch.manual_seed(0)
    specs = [SPECS[0], ModalitySpec("au", "audio", {"in_channels": 6, "widths": (8, 8, 8)}, 1)]
    model = CoTrainModel(specs, 3, feature_transfer=True)
    transfer = TransferConfig(feature=1.0, attention=1.0, start_fraction=0.5, warmup_fraction=0.0)
    _, early = step_loss(model, _batch(torch.tensor([0, 1, 2, 0])), transfer=transfer, task=TaskConfig(),
                         progress=0.1)
    assert not any("transfer" in k for k in early)
    _, late = step_loss(model, _batch(torch.tensor([0, 1, 2, 0])), transfer=transfer, task=TaskConfig(),
                        progress=0.9)
    assert {"words_attention_transfer_loss", "words_feature_transfer_loss", "au_feature_transfer_loss"} <= set(late)
    assert "au_attention_transfer_loss" not in late


def test_regression_and_multilabel_objectives_run_end_to_end():
    for task, labels, dim in [(TaskConfig(type="regression", ccc_weight=0.5), torch.randn(4, 2), 2),
                              (TaskConfig(type="multilabel"), torch.tensor([[1., 0, 1], [0, 0, 0], [1, 1, 1],
                                                                            [0, 1, 0]]), 3)]:
        torch.manual_seed(0)
        model = CoTrainModel(SPECS, dim, task=task.type, feature_transfer=True)
        loss, terms = step_loss(model, _batch(labels), task=task, progress=1.0,
                                transfer=TransferConfig(feature=0.5, attention=0.5, gate="teacher_correct"))
        assert torch.isfinite(loss) and "words_transfer_loss" in terms
        loss.backward()


def test_task_losses_by_hand():
    present = torch.tensor([True, True])
    pred, target = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [1.0]])
    assert task_loss(pred, target, present, TaskConfig(type="regression")).item() == pytest.approx((1 + 4) / 2)
    assert task_loss(pred, target, present, TaskConfig(type="regression", regression_loss="l1")).item() == \
        pytest.approx(1.5)
    # CCC of (1, 3) vs (2, 1): means 2, 1.5; variances 1, 0.25; covariance -0.5
    assert ccc(pred, target).item() == pytest.approx(2 * -0.5 / (1 + 0.25 + 0.25))
    with_ccc = task_loss(pred, target, present, TaskConfig(type="regression", ccc_weight=2.0)).item()
    assert with_ccc == pytest.approx(2.5 + 2 * (1 - (-1 / 1.5)))
    logits, multi = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    by_hand = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert task_loss(logits, multi, torch.tensor([True]), TaskConfig(type="multilabel")).item() == \
        pytest.approx(by_hand, rel=1e-6)
    smooth = task_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([0]), torch.tensor([True]),
                       TaskConfig(label_smoothing=0.1))
    assert smooth.item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="task.regression_loss"):
        TaskConfig(regression_loss="huber")

