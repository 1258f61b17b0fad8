"""torchvision video backbones as encoders: every registered one builds, trains, splits by name, reloads and
exports; pretrained weights from a local file or a (fake) hub cache, depth's averaged first convolution, the
weights' normalisation inside exported models, frame-size checks, and a short co-training run that learns."""
import json

import pytest
import torch

from model.backbones import BACKBONES, LOADER_NORMALIZATION, InputNormalization, WeightsUnavailable, \
    hub_checkpoint_path
from model.cotrain import CoTrainModel, ModalitySpec, seeded
from model.export import ExportedModel, export_model, unimodal_model
from model.presets import PRESETS, modality_specs
from pipeline.decode import DEPTH_MEAN, DEPTH_STD, VIDEO_MEAN, VIDEO_STD

CLIP = (8, 32, 32)  # frames, height, width: the smallest clip s3d takes (it pools 32x down in space, 8x in time)
SMALL_CLIP = (4, 16, 16)  # the others' (the 3D ResNets cost 8x less here)


def _clip(name: str) -> tuple[int, int, int]:
    return CLIP if name == "s3d" else SMALL_CLIP


def _options(name: str, in_channels: int = 3, **extra) -> dict:
    options = {"in_channels": in_channels, **extra}
    if name == "mvit_v2_s":
        options["input_size"] = list(_clip(name))
    if name.startswith("frames_"):
        options["temporal_widths"] = [16, 16]
    return options


def _second_stage(name: str) -> str:
    with torch.device("meta"):
        return ModalitySpec("rgb", "video", _options(name), encoder_name=name).build_encoder().stage_names[1]


def _meta(spec: ModalitySpec, classes: int = 4, clip: tuple[int, int, int] = CLIP) -> dict:
    return {"spec": vars(spec), "num_classes": classes, "task": "class", "modality": spec.name, "loader": {},
            "source": {"frames": clip[0], "height": clip[1], "width": clip[2]}}


def _present(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_trains_splits_by_name_reloads_and_exports(name, tmp_path):
    torch.manual_seed(0)
    spec = ModalitySpec("rgb", "video", _options(name), encoder_name=name, share_until=_second_stage(name))
    assert spec.shared_stages == 2
    model = CoTrainModel([spec], 4, mode="unimodal").eval()
    x = torch.randn(2, 3, *_clip(name))
    with seeded(0, "encoder/rgb"):  # the same weights the model's encoder drew
        whole = spec.build_encoder().eval()
    with torch.no_grad():
        split = model.students["rgb"].rest(model.shared["rgb"](x))
        assert split.shape[1] == whole.out_channels[-1]
        assert torch.allclose(split, whole(x), atol=1e-5)  # shared + rest == the whole encoder
        expected = model({"rgb": x}, {"rgb": _present(x)})["rgb"]
    for fmt in ("state_dict", "torchscript"):  # a fresh model with the saved weights; a traced one
        path = export_model(unimodal_model(model, "rgb"), _meta(spec, clip=_clip(name)), fmt, tmp_path / f"m.{fmt}")
        assert torch.allclose(ExportedModel(path)(x), expected, atol=1e-5), fmt

    model.train()
    model({"rgb": x}, {"rgb": _present(x)})["rgb"].logsumexp(dim=1).mean().backward()
    grads = [p.grad for _, _, p in model.encoder_parameters("rgb")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_onnx_export_parity_with_torchvision_operators(tmp_path):
    """ONNX for one backbone (s3d: separable 3D convs, inception branches, 3D max-pools); the others export the
    same way (checked by hand: mc3_18, frames_resnet18, swin3d_t, mvit_v2_s within 1.4e-6), but take 10-90 s each."""
    torch.manual_seed(0)
    spec = ModalitySpec("rgb", "video", _options("s3d"), encoder_name="s3d", share_until="features.3")
    model = CoTrainModel([spec], 4, mode="unimodal").eval()
    x = torch.randn(2, 3, *CLIP)
    with torch.no_grad():
        expected = model({"rgb": x}, {"rgb": _present(x)})["rgb"]
    path = export_model(unimodal_model(model, "rgb"), _meta(spec), "onnx", tmp_path / "m.onnx")
    assert torch.allclose(ExportedModel(path)(x), expected, atol=5e-5)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_takes_one_channel_depth(name):
    """Shapes only, on the meta device (the depth path differs from RGB only in its first convolution)."""
    with torch.device("meta"):
        encoder = ModalitySpec("d", "depth", _options(name, in_channels=1), encoder_name=name).build_encoder()
        out = encoder(torch.empty(2, 1, *_clip(name)))
    first = encoder.stages[0].stage  # depth clips are centred first (CentredInput)
    convs = [m for m in first.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert convs[0].in_channels == 1 and out.shape[:2] == (2, encoder.out_channels[-1])


def _torchvision_state(name: str, seed: int = 1) -> dict:
    import torchvision.models as tv

    torch.manual_seed(seed)
    return tv.get_model(BACKBONES[name].constructor, weights=None).state_dict()


def test_local_weights_load_and_depth_averages_the_rgb_filters(tmp_path):
    state = _torchvision_state("mc3_18")
    path = tmp_path / "mc3.pth"
    torch.save(state, path)
    rgb = ModalitySpec("rgb", "video", {"in_channels": 3, "weights": str(path)}, encoder_name="mc3_18").build_encoder()
    assert torch.equal(rgb.stages[0][0].weight, state["stem.0.weight"])
    assert torch.equal(rgb.stages[4][1].conv1[0].weight, state["layer4.1.conv1.0.weight"])
    assert rgb.pretrained_stages == 5 and rgb.input_normalization is None  # a bare file says nothing of it
    depth = ModalitySpec("d", "depth", {"in_channels": 1, "weights": str(path), "centre": False},
                         encoder_name="mc3_18").build_encoder()
    assert depth.stages[0][0].weight.shape[1] == 1
    assert torch.allclose(depth.stages[0][0].weight, state["stem.0.weight"].mean(dim=1, keepdim=True))


def test_weights_files_that_do_not_fit_are_refused_with_the_keys(tmp_path):
    state = _torchvision_state("mc3_18")
    state.pop("layer1.0.conv1.0.weight")
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, bad)
    with pytest.raises(ValueError, match=r"1 missing keys \['layer1.0.conv1.0.weight'\], 1 unexpected keys "
                                         r"\['extra.weight'\]"):
        ModalitySpec("rgb", "video", {"in_channels": 3, "weights": str(bad)}, encoder_name="mc3_18").build_encoder()
    with pytest.raises(FileNotFoundError, match="not found"):
        ModalitySpec("rgb", "video", {"weights": str(tmp_path / "none.pth")}, encoder_name="mc3_18").build_encoder()
    with pytest.raises(ValueError, match="valid: KINETICS400_V1, DEFAULT"):
        ModalitySpec("rgb", "video", {"weights": "IMAGENET1K_V1"}, encoder_name="mc3_18").build_encoder()
    with pytest.raises(ValueError, match="takes no pretrained weights"):
        ModalitySpec("rgb", "video", {"weights": str(bad)}, encoder_name="cnn3d").build_encoder()


@pytest.fixture
def hub_dir(tmp_path):
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(before)


def test_named_weights_come_from_the_hub_cache_or_say_where_to_put_them(hub_dir, tmp_path):
    from torchvision.models.video import MC3_18_Weights

    entry = MC3_18_Weights.KINETICS400_V1
    spec = ModalitySpec("rgb", "video", {"in_channels": 3, "weights": "KINETICS400_V1"}, encoder_name="mc3_18")
    with pytest.raises(WeightsUnavailable) as missing:
        spec.build_encoder()
    target = hub_dir / "checkpoints" / "mc3_18-a90a0ba3.pth"
    assert entry.url in str(missing.value) and str(target) in str(missing.value)
    assert hub_checkpoint_path(entry) == target

    target.parent.mkdir(parents=True)
    state = _torchvision_state("mc3_18")
    torch.save(state, target)
    encoder = spec.build_encoder()
    norm = encoder.stages[0]
    assert isinstance(norm, InputNormalization) and torch.equal(norm.stage[0].weight, state["stem.0.weight"])
    # a pixel p reaches the loader as (p - 0.45) / 0.225 and the weights as (p - mean) / std
    pixels = torch.rand(1, 3, 1, 2, 2)
    loader_mean, loader_std = LOADER_NORMALIZATION[3]
    assert (loader_mean, loader_std) == (VIDEO_MEAN / 255, VIDEO_STD / 255)
    assert LOADER_NORMALIZATION[1] == (DEPTH_MEAN, DEPTH_STD)
    weights_mean, weights_std = list(entry.transforms().mean), list(entry.transforms().std)
    assert encoder.input_normalization == {"mean": weights_mean, "std": weights_std}
    seen = InputNormalization(torch.nn.Identity(), weights_mean, weights_std, in_channels=3)
    mean, std = torch.tensor(weights_mean).reshape(1, 3, 1, 1, 1), torch.tensor(weights_std).reshape(1, 3, 1, 1, 1)
    assert torch.allclose(seen((pixels - loader_mean) / loader_std), (pixels - mean) / std, atol=1e-6)

    # exported: the normalisation travels inside, and rebuilding needs no weights file
    model = CoTrainModel([spec], 3, mode="unimodal").eval()
    x = torch.randn(2, 3, *CLIP)
    with torch.no_grad():
        expected = model({"rgb": x}, {"rgb": _present(x)})["rgb"]
    paths = [export_model(unimodal_model(model, "rgb"), _meta(spec, 3), fmt, tmp_path / f"m.{fmt}")
             for fmt in ("torchscript", "state_dict")]
    target.unlink()
    for path in paths:
        exported = ExportedModel(path)
        assert exported.meta["spec"]["encoder"]["weights"] == "KINETICS400_V1"
        assert torch.allclose(exported(x), expected, atol=1e-5)


def _video_modality(size: int, frames: int = 8) -> dict:
    return {"kind": "video", "frames": frames, "height": size, "width": size}


def test_the_weights_frame_size_is_checked_against_the_shards_and_mvit_gets_the_clip_size():
    encoders = {"video": {"name": "r3d_18", "weights": "KINETICS400_V1"}}
    shapes = {"rgb": {"in_channels": 3}}
    with pytest.raises(ValueError, match=r"trained on 112x112 frames, but the shards store rgb at 32x32.*"
                                         r"--size 112x112.*check_frame_size: false"):
        modality_specs({"rgb": _video_modality(32)}, shapes, shared_stages=1, encoders=encoders)
    assert modality_specs({"rgb": _video_modality(112)}, shapes, shared_stages=1, encoders=encoders)
    encoders["video"]["check_frame_size"] = False
    (spec,) = modality_specs({"rgb": _video_modality(32)}, shapes, shared_stages=1, encoders=encoders)
    assert "check_frame_size" not in spec.encoder
    (mvit,) = modality_specs({"rgb": _video_modality(32, frames=12)}, shapes, shared_stages=1, video_frames=8,
                             encoders={"video": {"name": "mvit_v2_s", "share_until": "blocks.1"}})
    assert mvit.encoder["input_size"] == [8, 32, 32] and mvit.shared_stages == 3
    with torch.device("meta"):
        encoder = mvit.build_encoder()
    with pytest.raises(ValueError, match=r"set encoders.<modality>.input_size to \[8, 64, 64\]"):
        encoder.stages[0](torch.zeros(1, 3, 8, 64, 64))


def test_share_until_names_the_valid_stages():
    with pytest.raises(ValueError, match="valid names: stem, layer1, layer2, layer3, layer4"):
        ModalitySpec("rgb", "video", {"in_channels": 3}, encoder_name="r2plus1d_18", share_until="layer5")


def test_cotraining_with_a_torchvision_backbone_learns(tiny_shards, synthetic_manifest, tmp_path):
    """mc3_18 for rgb (random weights), split after layer3, stem to layer2 frozen (which also keeps the backward
    pass short), 4 of the 8 frames; 3 epochs of 3 steps. Measured: rgb task loss 1.82, 1.47, 1.03. Then the rgb
    branch is exported and predicts on raw clips as the loader fed it."""
    from click.testing import CliRunner

    from ops.cli import main

    run = tmp_path / "run"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"encoders": {"video": {"name": "mc3_18", "share_until": "layer3",
                                                         "freeze": "layer2"}},
                                  "fusion": {"dim": 16, "heads": 2}, "loader": {"video_frames": 4}}))
    result = CliRunner().invoke(main, ["train", "--shards", str(tiny_shards), "--out", str(run), "--config",
                                       str(config), "--modalities", "rgb,audio", "--epochs", "3", "--batch-size",
                                       "8", "--metrics-port", "0", "--set", "optim.lr=1e-3"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    losses = [epoch["train"]["rgb_task_loss"] for epoch in json.loads((run / "history.json").read_text())]
    assert losses[-1] < 1.4 < losses[0], losses  # ln 6 = 1.79 at chance
    payload = torch.load(run / "model.pt", weights_only=False)
    assert {s["name"]: s["shared_stages"] for s in payload["specs"]}["rgb"] == 4
    _exported_branch_predicts_raw_clips(main, run, tiny_shards, synthetic_manifest, tmp_path)


def _exported_branch_predicts_raw_clips(main, run, shards, manifest, tmp_path):
    """`cotrain export` then `cotrain predict` on raw clips: the probabilities are the exported branch's on the
    clips the loader decodes (the backbone's input normalisation and the run's frame count travel with it)."""
    from click.testing import CliRunner

    from ops.predict import preprocess
    from pipeline.dali_loader import DaliLoader, LoaderConfig
    from pipeline.dataset import load_dataset_info

    out = tmp_path / "rgb.pt"
    result = CliRunner().invoke(main, ["export", "--run", str(run), "--modality", "rgb", "--format", "torchscript",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    records = {r["key"]: r for r in map(json.loads, manifest.read_text().splitlines())}
    batch = next(iter(DaliLoader(load_dataset_info(shards), "test", LoaderConfig(batch_size=2, video_frames=4),
                                 training=False, modalities=["rgb"])))
    files = [str(manifest.parent / records[key]["rgb"]) for key in batch.keys]
    exported = ExportedModel(out)
    (x,) = preprocess(exported.meta, files[0])
    assert torch.allclose(x, batch.inputs["rgb"][:1], atol=1e-4)
    result = CliRunner().invoke(main, ["predict", str(out), *files, "--json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    probabilities = torch.tensor([list(a["probabilities"].values()) for a in json.loads(result.output)])
    expected = torch.softmax(exported(batch.inputs["rgb"]).float(), dim=-1)
    assert torch.allclose(probabilities, expected, atol=1e-4), (probabilities - expected).abs().max()


def test_the_gesture_preset_loads_kinetics_weights_into_rgb_and_depth(hub_dir):
    """The preset's weights are not downloadable here: random weights of the same architecture in a fake hub."""
    from model.presets import preset
    from torchvision.models.video import R3D_18_Weights

    encoders = preset("gesture")["encoders"]
    assert all(encoders[k]["name"] == "r3d_18" and encoders[k]["weights"] == "KINETICS400_V1" for k in encoders)
    state = _torchvision_state("r3d_18")
    target = hub_checkpoint_path(R3D_18_Weights.KINETICS400_V1)
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    clip = {"frames": 16, "height": 112, "width": 112}
    specs = modality_specs({"rgb": {"kind": "video", **clip}, "depth": {"kind": "depth", **clip}},
                           {"rgb": {"in_channels": 3}, "depth": {"in_channels": 1}}, shared_stages=1,
                           encoders=encoders)
    model = CoTrainModel(specs, 5)
    assert [model.stage_layout[m].split for m in ("rgb", "depth")] == [3, 3]
    stems = {m: [p for s, _, p in model.encoder_parameters(m) if s == 0][0] for m in ("rgb", "depth")}
    assert torch.equal(stems["rgb"], state["stem.0.weight"])
    assert torch.allclose(stems["depth"], state["stem.0.weight"].mean(dim=1, keepdim=True))
    teacher_layer4 = model.teacher.rests["depth"][1][1].conv2[0].weight  # the teacher's own pretrained copy
    assert torch.equal(teacher_layer4, state["layer4.1.conv2.0.weight"])


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_freeze_and_learning_rate_multipliers_reach_the_deepspeed_optimizer(tmp_path, zero_stage):
    from ops.config import OptimConfig, RunConfig, deepspeed_config
    from ops.engine import build_engine, init_distributed
    from ops.finetune import param_groups

    path = tmp_path / "r.pth"
    torch.save(_torchvision_state("frames_resnet18"), path)
    spec = ModalitySpec("rgb", "video", _options("frames_resnet18", weights=str(path)), encoder_name="frames_resnet18",
                        share_until="layer1", freeze="stem", lr_mult=0.1)
    model = CoTrainModel([spec], 3, mode="cotrain")
    layout = model.stage_layout["rgb"]
    assert layout.pretrained == 5 and layout.names[5:] == ["temporal1", "temporal2"]
    optim = OptimConfig(lr=1e-3, layer_decay=0.5, zero_stage=zero_stage)
    groups = param_groups(model, [spec], optim)
    stages = {id(p): s for s, _, p in model.encoder_parameters("rgb")}
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for param_id, stage in stages.items():
        if stage == 0:
            assert param_id not in lr_of  # frozen
        else:  # pretrained layer1..layer4: 0.1 * 0.5 ** (5 - stage); the new temporal stages: lr
            expected = 1e-3 * (0.1 * 0.5 ** (5 - stage) if stage < 5 else 1)
            assert lr_of[param_id] == pytest.approx(expected)
    assert not any(p.requires_grad for s, _, p in model.encoder_parameters("rgb") if s == 0)
    assert lr_of[id(model.teacher.head.weight)] == pytest.approx(1e-3)

    init_distributed(1)
    cfg = RunConfig(shards="x", out=str(tmp_path), optim=optim)
    engine, _ = build_engine(model, deepspeed_config(cfg, total_steps=10, bf16=False), groups)
    x = torch.randn(2, 3, *SMALL_CLIP)
    frozen = [p.detach().clone() for s, _, p in model.encoder_parameters("rgb") if s == 0]
    for _ in range(2):
        loss = sum(v.logsumexp(dim=1).mean() for v in engine({"rgb": x}, {"rgb": _present(x)}).values())
        engine.backward(loss)
        engine.step()
    rates = sorted(g["lr"] for g in engine.optimizer.param_groups)
    initial = sorted({g["lr"] for g in groups})
    assert len(rates) == len(initial)
    ratios = [r / rates[-1] for r in rates]  # the schedule scales every group alike
    assert ratios == pytest.approx([lr / initial[-1] for lr in initial])
    assert all(torch.equal(a, p) for a, (s, _, p) in zip(frozen, [e for e in model.encoder_parameters("rgb")
                                                                  if e[0] == 0]))


def test_fine_tuning_settings_are_checked():
    from ops.config import OptimConfig
    from ops.finetune import frozen_stages

    with pytest.raises(ValueError, match="pretrained_lr_mult must be > 0"):
        OptimConfig(pretrained_lr_mult=0)
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
        OptimConfig(layer_decay=1.5)
    spec = ModalitySpec("rgb", "video", {}, freeze=["layer1", "layer9"])
    layout_names = ["stem", "layer1", "layer2"]
    from model.cotrain import StageLayout

    with pytest.raises(ValueError, match="layer9 not among the encoder's stages; valid names: stem, layer1, layer2"):
        frozen_stages(spec, StageLayout(layout_names, 0, 1))
    spec.freeze = ["layer2", "stem"]
    assert frozen_stages(spec, StageLayout(layout_names, 0, 1)) == {0, 2}
    spec.freeze = 2
    assert frozen_stages(spec, StageLayout(layout_names, 0, 1)) == {0, 1}


def test_without_fine_tuning_the_optimizer_gets_one_group_in_the_model_order():
    from ops.config import OptimConfig
    from ops.finetune import param_groups

    specs = [ModalitySpec("rgb", "video", {"in_channels": 3}), ModalitySpec("d", "depth", {"in_channels": 1})]
    model = CoTrainModel(specs, 3)
    (group,) = param_groups(model, specs, OptimConfig(lr=0.01, pretrained_lr_mult=0.1, layer_decay=0.5))
    assert group["lr"] == 0.01 and [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_the_backbone_benchmark_runs_quick(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench/backbones.py"
    spec = importlib.util.spec_from_file_location("bench_backbones", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick"])
    assert json.loads(capsys.readouterr().out) == result
    assert set(bench.SPLITS) == set(BACKBONES)  # every backbone is benchmarked
    measured = result["backbones"]["mc3_18"]
    assert measured["cotrain"]["params_m"] > measured["multimodal"]["params_m"]  # the students' own stages
    assert measured["cotrain_vs_multimodal"] > 0 and measured["multimodal"]["peak_rss_mb"] > 0


def test_one_command_line_setting_picks_a_backbone_and_its_weights():
    from ops.config import resolve_config

    cfg = resolve_config(cli={"shards": "s", "out": "o"}, assignments=[
        "encoders.video.name=r3d_18", "encoders.video.weights=KINETICS400_V1", "encoders.rgb.share_until=layer2",
        'encoders.video.freeze=["stem", "layer1"]', "encoders.video.lr_mult=0.1", "optim.layer_decay=0.8"])
    assert cfg.encoders == {"video": {"name": "r3d_18", "weights": "KINETICS400_V1", "freeze": ["stem", "layer1"],
                                      "lr_mult": 0.1}, "rgb": {"share_until": "layer2"}}
    assert cfg.optim.layer_decay == 0.8
