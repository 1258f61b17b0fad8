"""model/cotrain.py options: teacher-only modalities, CLS pooling, cross-attention, features with lengths, extras."""
import pytest
import torch

from model.cotrain import LATE_FUSION, TEACHER, TRANSFORMER, CoTrainModel, FusionConfig, ModalitySpec
from model.encoders import masked_max, tokens_of
from model.losses import TransferConfig, cotrain_losses, total_loss
from model.tasks import TaskConfig
from ops.train import choose_transformer_weight

SPECS = [
    ModalitySpec("rgb", "video", {"widths": (8, 8, 16)}),
    ModalitySpec("depth", "depth", {"in_channels": 1, "stem_width": 4, "widths": (4, 8, 8, 8)}, 2, "resnet3d"),
    ModalitySpec("words", "text", {"vocab_size": 20, "dim": 16, "layers": 2, "heads": 2, "dropout": 0.0}, 1,
                 "transformer"),
    ModalitySpec("au", "features", {"in_channels": 5, "widths": (8, 8)}, 1, "tcn", pool="attention"),
]


def _batch(b=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 20, (b, 6), generator=g)
    ids[:, 4:] = 0
    lengths = {"au": torch.tensor([7, 3, 5, 7])}
    feats = torch.randn(b, 7, 5, generator=g) * (torch.arange(7)[None] < lengths["au"][:, None])[..., None]
    inputs = {"rgb": torch.randn(b, 3, 4, 16, 16, generator=g), "depth": torch.rand(b, 1, 4, 16, 16, generator=g),
              "words": ids, "au": feats}
    present = {m: torch.ones(b, dtype=torch.bool) for m in inputs}
    return inputs, present, lengths


@pytest.mark.parametrize("fusion", [FusionConfig(), FusionConfig(pooling="cls", cross_layers=2, dropout=0.0),
                                    FusionConfig(modality_embedding=False, position_embedding=False, late_fusion=False,
                                                 stream_loss=False)])
def test_every_option_runs_and_ignores_missing_modalities(fusion):
    torch.manual_seed(0)
    model = CoTrainModel(SPECS, 3, fusion=fusion).eval()
    inputs, present, lengths = _batch()
    present["words"] = torch.tensor([True, False, True, False])
    ref = model(inputs, present, lengths)
    assert all(torch.isfinite(v).all() and v.shape == (4, 3) for v in ref.values())
    out = model(dict(inputs, words=(inputs["words"] * 7) % 19 + 1), present, lengths)
    assert torch.allclose(out[TEACHER][1], ref[TEACHER][1], atol=1e-5)
    assert torch.allclose(out[TEACHER][3], ref[TEACHER][3], atol=1e-5)
    assert not torch.allclose(out[TEACHER][0], ref[TEACHER][0], atol=1e-4)


def test_a_sample_with_every_modality_missing_stays_finite():
    model = CoTrainModel(SPECS, 3, fusion=FusionConfig(pooling="cls", cross_layers=1)).eval()
    inputs, present, lengths = _batch()
    present = {m: torch.tensor([True, False, False, False]) for m in present}
    assert all(torch.isfinite(v).all() for v in model(inputs, present, lengths).values())


def test_teacher_only_modalities_get_no_student():
    model = CoTrainModel(SPECS, 3, students=["rgb", "words"])
    inputs, present, lengths = _batch()
    logits = model(inputs, present, lengths)
    assert model.branches == ["rgb", "words", TEACHER]
    assert f"{TEACHER}/depth" in logits and "depth" not in logits
    with pytest.raises(ValueError, match=r"students \['sound'\] are not among"):
        CoTrainModel(SPECS, 3, students=["sound"])


def test_feature_padding_is_masked_by_lengths():
    model = CoTrainModel(SPECS, 3).eval()
    inputs, present, lengths = _batch()
    ref = model(inputs, present, lengths)
    noisy = inputs["au"].clone()
    noisy[1, 3:] = 100.0  # beyond sample 1's length
    out = model(dict(inputs, au=noisy), present, lengths)
    assert torch.allclose(out["au"][1], ref["au"][1], atol=1e-5)
    assert torch.allclose(out[TEACHER][1], ref[TEACHER][1], atol=1e-5)


def test_extras_give_features_and_attention_distributions():
    model = CoTrainModel(SPECS, 3, feature_transfer=True, fusion=FusionConfig(dim=32)).eval()
    inputs, present, lengths = _batch()
    plain = model(inputs, present, lengths)
    logits, extras = model(inputs, present, lengths, extras=True)
    assert all(torch.allclose(plain[k], logits[k], atol=1e-6) for k in plain)
    assert set(extras["feature"]) == {"rgb", "depth", "words", "au", TEACHER}
    assert all(v.shape == (4, 32) for v in extras["feature"].values())
    # students with attention: the text Transformer (self-attention) and the attention-pooled features branch
    assert set(extras["attention"]) == {"words", "au"} | {f"{TEACHER}/{m}" for m in ("rgb", "depth", "words", "au")}
    for m in ("words", "au"):
        s, t = extras["attention"][m], extras["attention"][f"{TEACHER}/{m}"]
        assert s.shape == t.shape
        assert torch.allclose(s.sum(-1), torch.ones(4), atol=1e-5)
        assert torch.allclose(t.sum(-1), torch.ones(4), atol=1e-5)
    assert torch.all(extras["attention"]["au"][1, 3:] == 0)  # padding gets no attention
    assert torch.all(extras["attention"]["words"][:, 4:] < 1e-6)


def test_fusion_config_rules():
    with pytest.raises(ValueError, match="fusion.pooling"):
        FusionConfig(pooling="max")
    with pytest.raises(ValueError, match="fusion.cross_layers"):
        FusionConfig(cross_layers=-1)


def test_teacher_stages_make_the_teachers_streams_shallower():
    specs = [ModalitySpec("rgb", "video", {"widths": (8, 8, 16)}),
             ModalitySpec("au", "audio", {"in_channels": 5, "widths": (8, 12, 16)})]
    deep = CoTrainModel(specs, 3)
    shallow = CoTrainModel(specs, 3, fusion=FusionConfig(teacher_stages=1))
    assert len(deep.teacher.rests["au"]) == 2 and len(shallow.teacher.rests["au"]) == 1
    assert shallow.teacher.proj["au"].in_features == 12  # the width after stage 2 (1 shared + 1 own)
    inputs = {"rgb": torch.randn(2, 3, 4, 16, 16), "au": torch.randn(2, 5, 20)}
    out = shallow(inputs, {m: torch.ones(2, dtype=torch.bool) for m in inputs})
    assert out[TEACHER].shape == (2, 3)
    with pytest.raises(ValueError, match="fusion.teacher_stages=3"):
        CoTrainModel(specs, 3, fusion=FusionConfig(teacher_stages=3))


def test_sharing_nothing_leaves_the_branches_linked_only_by_transfer():
    from model.losses import TransferConfig, cotrain_losses

    specs = [ModalitySpec("au", "audio", {"in_channels": 5, "widths": (8, 8, 8)}, 0),
             ModalitySpec("words", "text", {"vocab_size": 20, "widths": (8, 8, 8)}, 0)]
    model = CoTrainModel(specs, 3)
    assert sum(p.numel() for p in model.shared.parameters()) == 0
    ids = torch.randint(1, 20, (2, 5))
    inputs = {"au": torch.randn(2, 5, 16), "words": ids}
    present = {"au": torch.ones(2, dtype=torch.bool), "words": torch.ones(2, dtype=torch.bool)}
    terms = cotrain_losses(model(inputs, present), torch.tensor([0, 2]), present, TransferConfig(alpha=0.0))
    sum(v for k, v in terms.items() if k.startswith(TEACHER)).backward()
    assert all(p.grad is None for p in model.students.parameters())  # the teacher's losses never reach a student


def _late_term(model, present=None):
    """The teacher's late-fusion term and its streams (M, B, K)."""
    inputs, all_present, lengths = _batch()
    out = model(inputs, present or all_present, lengths)
    streams = torch.stack([out[f"{TEACHER}/{m}"] for m in model.teacher.order])  # (M, B, K)
    return out[LATE_FUSION], streams


@pytest.mark.parametrize("task", ["class", "regression", "multilabel"])
def test_learned_late_fusion_weights_start_as_the_equal_ones(task):
    equal, streams = _late_term(CoTrainModel(SPECS, 3, fusion=FusionConfig(), task=task, init_seed=1).eval())
    learned, _ = _late_term(CoTrainModel(SPECS, 3, fusion=FusionConfig(late_fusion_weights="learned"), task=task,
                                         init_seed=1).eval())
    expected = {"class": torch.log_softmax(streams, dim=-1).sum(dim=0), "multilabel": streams.sum(dim=0),
                "regression": streams.mean(dim=0)}[task]
    assert torch.allclose(equal, expected, atol=1e-5)
    assert torch.allclose(learned, expected, atol=1e-5)


@pytest.mark.parametrize("task", ["class", "regression"])
def test_a_trusted_gate_hands_late_fusion_to_its_stream_unless_the_stream_is_missing(task):
    inputs, present, lengths = _batch()
    present = dict(present, words=torch.tensor([True, False, True, True]))
    model = CoTrainModel(SPECS, 3, fusion=FusionConfig(late_fusion_weights="learned"), task=task).eval()
    with torch.no_grad():
        model.teacher.stream_gates["words"].bias.fill_(30.0)
    late, streams = _late_term(model, present)
    if task == "class":
        streams = torch.log_softmax(streams, dim=-1)
    order = model.teacher.order
    words, count = order.index("words"), (len(order) if task == "class" else 1)
    for sample in (0, 2, 3):  # words present: the late term is the words stream alone
        assert torch.allclose(late[sample], count * streams[words, sample], atol=1e-4)
    others = [i for i in range(len(order)) if i != words]  # words missing: the other streams, equally weighted
    rest = streams[others, 1].sum(dim=0) if task == "class" else streams[others, 1].mean(dim=0)
    assert torch.allclose(late[1], rest, atol=1e-4)


def test_the_gates_learn_from_the_late_fusions_loss_and_leave_the_streams_alone():
    model = CoTrainModel(SPECS, 3, fusion=FusionConfig(late_fusion_weights="learned"), task="regression")
    inputs, present, lengths = _batch()
    out = model(inputs, present, lengths)
    model.zero_grad()
    terms = cotrain_losses(out, torch.zeros(4, 3), present, TransferConfig(), task=TaskConfig("regression"))
    assert "multimodal_gates_loss" in terms  # equal weights have nothing to learn, so no such term (below)
    terms["multimodal_gates_loss"].backward()
    assert all(gate.weight.grad.abs().sum() > 0 for gate in model.teacher.stream_gates.values())
    # stream predictions and the gates' inputs are detached: the teacher's loss never reaches the stream heads
    heads = model.teacher.stream_heads
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in heads.parameters())
    with pytest.raises(ValueError, match="fusion.late_fusion_weights"):
        FusionConfig(late_fusion_weights="attention")


@pytest.mark.parametrize("task", ["class", "regression", "multilabel"])
def test_the_teacher_is_late_fusion_plus_the_chosen_weight_times_the_transformer(task):
    model = CoTrainModel(SPECS, 3, fusion=FusionConfig(transformer_weights=(0.0, 0.5, 2.0)), task=task).eval()
    inputs, present, lengths = _batch()
    out = model(inputs, present, lengths)
    assert torch.equal(out[TEACHER], out[LATE_FUSION])  # before any validation: the first weight, 0
    model.set_transformer_weight(2.0)
    out = model(inputs, present, lengths)
    part = {"class": torch.log_softmax(out[TRANSFORMER], dim=-1), "multilabel": out[TRANSFORMER],
            "regression": out[TRANSFORMER]}[task]
    expected = (out[LATE_FUSION] + 2 * part) / (3 if task == "regression" else 1)
    assert torch.allclose(out[TEACHER], expected, atol=1e-6)
    candidates = model.teacher_candidates(out)
    assert list(candidates) == [0.0, 0.5, 2.0] and torch.allclose(candidates[2.0], out[TEACHER], atol=1e-6)
    assert model.state_dict()["teacher.transformer_weight"] == 2.0  # the best weights carry the choice


def test_the_transformer_learns_from_its_own_loss_whatever_its_weight():
    """With weight 0 the teacher is late fusion alone, yet the Transformer still trains: its loss is its own,
    and the teacher's combined output is only logged."""
    model = CoTrainModel(SPECS, 3, fusion=FusionConfig())
    inputs, present, lengths = _batch()
    labels = torch.tensor([0, 1, 2, 1])
    out = model(inputs, present, lengths)
    terms = cotrain_losses(out, labels, present, TransferConfig(alpha=0))
    assert set(terms) >= {"multimodal_task_loss", "multimodal_teacher"} and "multimodal_gates_loss" not in terms
    assert torch.allclose(terms["multimodal_task_loss"], torch.nn.functional.cross_entropy(out[TRANSFORMER], labels))
    model.zero_grad()
    total_loss(terms).backward()
    assert model.teacher.head.weight.grad.abs().sum() > 0
    assert not terms["multimodal_teacher"].requires_grad


def test_validation_chooses_the_best_weight_and_the_first_of_equals():
    scores = {"rgb": {"accuracy": 0.6}, "multimodal@0": {"accuracy": 0.7}, "multimodal@0.5": {"accuracy": 0.8},
              "multimodal@1": {"accuracy": 0.8}, "multimodal@2": {"accuracy": 0.5}}
    assert choose_transformer_weight(scores, "class") == 0.5
    assert scores == {"rgb": {"accuracy": 0.6}, TEACHER: {"accuracy": 0.8}}
    errors = {"multimodal@0": {"mae": 0.4}, "multimodal@1": {"mae": 0.3}}
    assert choose_transformer_weight(errors, "regression") == 1.0  # lower is better
    assert choose_transformer_weight({"rgb": {"accuracy": 0.6}}, "class") is None
    with pytest.raises(ValueError, match="transformer_weights"):
        FusionConfig(transformer_weights=(-1.0,))


def test_max_pooling_reads_only_valid_tokens_and_is_the_cnn3d_default():
    tokens = torch.tensor([[[1.0, -5.0], [3.0, -1.0], [9.0, 9.0]], [[-2.0, 4.0], [0.0, 0.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, False], [False, False, False]])
    assert masked_max(tokens, valid).tolist() == [[3.0, -1.0], [0.0, 0.0]]  # padding ignored; an empty row is 0
    assert masked_max(tokens, None).tolist() == [[9.0, 9.0], [0.0, 4.0]]
    assert ModalitySpec("rgb", "video", {}).pool == "max"  # small objects: a mean dilutes their evidence
    assert ModalitySpec("rgb", "video", {}, encoder_name="resnet3d").pool == "mean"
    assert ModalitySpec("rgb", "video", {}, pool="mean").pool == "mean"
    with pytest.raises(ValueError, match="pool must be one of mean, max, attention"):
        CoTrainModel([ModalitySpec("rgb", "video", {"widths": (4, 4, 8)}, pool="sum")], 3, mode="unimodal")


def test_the_teachers_stream_pools_like_its_student():
    torch.manual_seed(0)
    specs = [ModalitySpec("rgb", "video", {"widths": (8, 8, 16)}), SPECS[3]]  # rgb by max, au by attention
    model = CoTrainModel(specs, 3).eval()
    inputs, present, lengths = _batch()
    inputs, present = {m: inputs[m] for m in ("rgb", "au")}, {m: present[m] for m in ("rgb", "au")}
    logits = model(inputs, present, lengths)
    teacher = model.teacher
    with torch.no_grad():
        rgb = tokens_of(teacher.rests["rgb"](model.shared["rgb"](inputs["rgb"]), None))
        student = model.students["rgb"]
        student_tokens = tokens_of(student.rest(model.shared["rgb"](inputs["rgb"]), None))
    assert torch.allclose(logits[f"{TEACHER}/rgb"], teacher.stream_heads["rgb"](masked_max(rgb, None)), atol=1e-5)
    assert torch.allclose(logits["rgb"], student.head(student.norm(masked_max(student_tokens, None))), atol=1e-5)
    assert teacher.stream_pools == {"rgb": "max", "au": "mean"}  # the attention-pooled features stream: mean
