"""ops/scores.py: each metric on a hand-computed case."""
import math

import pytest
import torch

from ops.scores import is_better, make_scorer


def _onehot_logits(predicted: list[int], k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), k).float() * 5


def test_classification_accuracy_macro_f1_and_confusion_by_hand():
    scorer = make_scorer("class", 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = [0, 1, 1, 1, 2, 0]
    mask = torch.tensor([True] * 6)
    scorer.update(_onehot_logits(predicted[:3], 3), labels[:3], mask[:3])  # two batches accumulate
    scorer.update(_onehot_logits(predicted[3:], 3), labels[3:], mask[3:])
    result = scorer.result()
    assert result["accuracy"] == pytest.approx(4 / 6)
    # per class F1: 0: tp1 fp1 fn1 -> 0.5; 1: tp2 fp1 fn0 -> 0.8; 2: tp1 fp0 fn1 -> 2/3
    assert result["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert result["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert "top5" not in result and result["samples"] == 6


def test_masked_samples_are_not_scored_and_top5_appears_above_five_classes():
    scorer = make_scorer("class", 7)
    logits = torch.arange(7.0).repeat(3, 1)  # ranking 6 > 5 > 4 > 3 > 2 > 1 > 0 for every sample
    scorer.update(logits, torch.tensor([6, 2, 0]), torch.tensor([True, True, False]))
    result = scorer.result()
    assert result["samples"] == 2 and result["accuracy"] == pytest.approx(0.5)
    assert result["top5"] == pytest.approx(1.0)  # class 2 is 5th


def test_regression_mae_pearson_and_ccc_by_hand():
    scorer = make_scorer("regression", 1)
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    prediction = 2 * target + 1  # perfectly correlated, biased and scaled
    scorer.update(prediction[:, None], target, torch.ones(4, dtype=torch.bool))
    result = scorer.result()
    assert result["mae"] == pytest.approx(float((prediction - target).abs().mean()))
    assert result["pearson"] == pytest.approx(1.0)
    pm, tm, pv, tv = prediction.mean(), target.mean(), prediction.var(unbiased=False), target.var(unbiased=False)
    cov = ((prediction - pm) * (target - tm)).mean()
    assert result["ccc"] == pytest.approx(float(2 * cov / (pv + tv + (pm - tm) ** 2)))
    assert result["ccc"] < 1


def test_multilabel_f1_and_subset_accuracy_by_hand():
    scorer = make_scorer("multilabel", 2)
    truth = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    logits = torch.tensor([[3.0, -3.0], [3.0, -3.0]])  # second sample misses label 1
    scorer.update(logits, truth, torch.ones(2, dtype=torch.bool))
    result = scorer.result()
    assert result["subset_accuracy"] == pytest.approx(0.5)
    assert result["macro_f1"] == pytest.approx((1.0 + 0.0) / 2)
    assert result["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))


def test_best_is_judged_by_the_primary_metric_in_its_direction():
    assert is_better("class", {"accuracy": 0.6}, {"accuracy": 0.5})
    assert not is_better("regression", {"mae": 0.6}, {"mae": 0.5})
    assert is_better("regression", {"mae": 0.4}, {"mae": 0.5}) and is_better("class", {"accuracy": 0}, None)
    with pytest.raises(ValueError, match="valid: class"):
        make_scorer("ranking", 2)
    assert math.isnan(make_scorer("regression", 1).result()["mae"])
