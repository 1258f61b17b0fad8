"""GPU paths shown on the CPU: collectives' devices under NCCL, the evaluation copy's dtype, decoding on the GPU
where NVDEC can, the torch build chosen from nvidia-smi, the refusal to train on the CPU beside a GPU, device
read-back once per interval, and the GPU check's and the loop benchmark's CPU modes."""
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

from ops.config import RunConfig
from subprocesses import clean_env

ROOT = Path(__file__).resolve().parents[1]


# -- 1. collectives live on the backend's device ---------------------------------------------------------------

@pytest.fixture
def fake_world(monkeypatch):
    """A 2-rank world whose backend reports `backend`; records where collective tensors were sent and which
    device broadcast_object_list was told, without communicating (the CPU build cannot make CUDA tensors)."""
    seen = {"to": [], "all_reduce": 0, "broadcast_device": []}

    def world(backend: str):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
        original_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            target = torch.device(args[0] if args else kwargs["device"])
            seen["to"].append(target)
            return tensor if target.type == "cuda" else original_to(tensor, *args, **kwargs)

        def all_reduce(tensor, *args, **kwargs):
            seen["all_reduce"] += 1

        def broadcast_object_list(box, src=0, group=None, device=None):
            seen["broadcast_device"].append(torch.device(device) if device is not None else None)
            box[0] = ["audio"]  # what rank 0 decided

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(dist, "all_reduce", all_reduce)
        monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
        return seen

    return world


def test_the_loop_s_collectives_put_their_tensors_on_the_gpu_under_nccl(fake_world):
    from ops.train import LoopState, Trainer

    seen = fake_world("nccl")
    trainer = SimpleNamespace(_signalled=True, cfg=RunConfig(shards="s", out="o"), task="class", state=LoopState(), rank=1, world=2)
    assert Trainer._agree(trainer, torch.tensor(False)) == (False, True)
    assert seen["all_reduce"] == 1 and seen["to"] and set(seen["to"]) == {torch.device("cuda", 1)}
    Trainer._guard(trainer, None)  # rank 1 follows rank 0's decision
    assert seen["broadcast_device"] == [torch.device("cuda", 1)] and trainer.state.muted == ["audio"]


def test_collectives_stay_on_the_cpu_under_gloo(fake_world):
    from ops.device import all_reduce_flags, broadcast_object, collective_device

    seen = fake_world("gloo")
    assert collective_device() == torch.device("cpu")
    assert all_reduce_flags([True, False]) == [True, False] and seen["all_reduce"] == 1
    assert broadcast_object(None) == ["audio"] and seen["broadcast_device"] == [torch.device("cpu")]


# -- 2 and 3. the evaluation copy's dtype; loaders decode on the GPU when there is one --------------------------

def test_validation_decodes_on_the_gpu_and_the_zero3_copy_has_the_engine_dtype(tiny_shards, monkeypatch):
    from ops.train import Trainer
    from pipeline.dataset import load_dataset_info

    import pipeline.dali_loader

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pipeline.dali_loader, "_warned_small", set())
    cfg = RunConfig(shards=str(tiny_shards), out="unused")
    cfg.optim.zero_stage = 3
    info = load_dataset_info(tiny_shards)
    trainer = SimpleNamespace(cfg=cfg, rank=0, local_rank=0, device_id=0, info=info, modalities=info.select(None),
                              engine=SimpleNamespace(device=torch.device("cpu")), dtype=torch.bfloat16)
    from ops.train import _specs
    trainer.specs, trainer.task = _specs(cfg, trainer.modalities), "class"
    trainer._build_model = lambda **kw: Trainer._build_model(trainer, **kw)
    with pytest.warns(UserWarning, match="NVDEC"):  # 32x32 clips: decoded on the CPU, then copied to the GPU
        loader, copy = Trainer._make_validation(trainer)
    assert loader.device_id == 0
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    from pipeline import make_loader
    on_the_cpu = make_loader(info, "val", cfg.loader, training=False)  # this machine cannot run the GPU pipeline
    batch = Trainer._cast(trainer, next(iter(on_the_cpu)))  # the inputs validation feeds that copy
    assert all(x.dtype == torch.bfloat16 for m, x in batch.inputs.items() if m != "text")


class _Stop(Exception):
    pass


def test_eval_and_predict_decode_on_the_gpu_when_there_is_one(tiny_shards, monkeypatch):
    import nvidia.dali

    import ops.evaluate
    from ops.predict import _dali_decode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = {}

    def make_loader(*args, **kwargs):
        asked["eval"] = kwargs.get("device_id")
        raise _Stop

    monkeypatch.setattr(ops.evaluate, "load_run", lambda run: (torch.nn.Linear(1, 1), {
        "config": {"shards": str(tiny_shards), "loader": {}}, "specs": [{"name": "audio"}]}))
    monkeypatch.setattr(ops.evaluate, "make_loader", make_loader)
    with pytest.raises(_Stop):
        ops.evaluate.evaluate_run("unused")

    def pipeline_def(*args, **kwargs):
        asked["predict"] = kwargs.get("device_id")
        raise _Stop

    monkeypatch.setattr(nvidia.dali, "pipeline_def", pipeline_def)
    with pytest.raises(_Stop):
        _dali_decode("audio", b"\0" * 64, {"kind": "audio", "sample_rate": 16000, "samples": 16000}, {})
    assert asked == {"eval": 0, "predict": 0}


# -- 4. NVDEC's minimum size ------------------------------------------------------------------------------------

def test_video_below_nvdec_s_minimum_decodes_on_the_cpu_with_one_warning(tiny_shards, monkeypatch):
    import pipeline.dali_loader as dali_loader
    from pipeline import LoaderConfig, load_dataset_info, make_loader

    vp9 = {"kind": "video", "codec": "vp9", "ext": "rgb.webm"}
    h264 = {"kind": "video", "codec": "h264", "ext": "rgb.mp4"}
    decoder = dali_loader.video_decoder
    assert decoder(dict(vp9, width=32, height=32), gpu=True) == "cpu"
    assert decoder(dict(vp9, width=128, height=128), gpu=True) == "mixed"
    assert decoder(dict(h264, width=32, height=32), gpu=True) == "feed"  # DALI's CPU decoder cannot read H.264
    assert decoder(dict(h264, width=64, height=64), gpu=True) == "mixed"
    assert decoder(dict(vp9, width=128, height=128), gpu=False) == "cpu"

    monkeypatch.setattr(dali_loader, "_warned_small", set())
    info = load_dataset_info(tiny_shards)  # 32x32 VP9
    with pytest.warns(UserWarning, match=r"rgb: 32x32 clips are below NVDEC's minimum .*128x128.*--size 128x128"):
        loader = make_loader(info, "train", LoaderConfig(), training=True, device_id=0, backend="dali")
    assert loader.video_decoders == {"rgb": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the validation loader of the same run does not repeat it
        make_loader(info, "val", LoaderConfig(), training=False, device_id=0, backend="dali")


def test_the_dali_feed_reads_batches_ahead_of_dali(tiny_shards):
    from pipeline import LoaderConfig, load_dataset_info, make_loader
    from pipeline.dali_loader import READ_AHEAD_BATCHES, _Feed

    loader = make_loader(load_dataset_info(tiny_shards), "train", LoaderConfig(batch_size=4), training=True,
                         backend="dali")
    feed = _Feed(loader, iter([(0, s) for s in range(5)]))
    first = feed()
    assert len(first[0]) == 4 and len(feed._ahead) == READ_AHEAD_BATCHES  # batches 1 and 2 are being read
    assert feed.pending_tags() == [(0, 0), (0, 1), (0, 2)]
    feed.close()


# -- 5. the torch build for the driver; refusing a GPU torch cannot use -----------------------------------------

NVIDIA_SMI = """#!/bin/sh
if [ "$1" = "--query-gpu=name,driver_version" ]; then echo "NVIDIA H100 80GB HBM3, {driver}"; exit 0; fi
echo "+-----------------------------------------------------------------------------------------+"
echo "| NVIDIA-SMI {driver}             Driver Version: {driver}     CUDA Version: {cuda}     |"
echo "|-----------------------------------------+------------------------+----------------------+"
"""


def _fake_nvidia_smi(folder: Path, driver: str, cuda: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(NVIDIA_SMI.format(driver=driver, cuda=cuda))
    script.chmod(0o755)
    return folder


def _setup_torch(path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "ops/setup_torch.py"), *args], capture_output=True, text=True,
                          env={"PATH": str(path), **env}, check=False)


@pytest.mark.parametrize("driver,cuda,torch_args,dali", [
    (None, None, "torch==2.14.1 torchvision==0.29.1", "nvidia-dali-cuda120==2.4.0"),
    ("580.65.06", "13.0", "torch==2.14.1 torchvision==0.29.1", "nvidia-dali-cuda130==2.4.0"),
    ("570.124.06", "12.8", "torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128",
     "nvidia-dali-cuda120==2.4.0"),
    ("535.183.01", "12.2", "torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126",
     "nvidia-dali-cuda120==2.4.0"),
])
def test_set_up_installs_the_torch_and_dali_the_driver_runs(tmp_path, driver, cuda, torch_args, dali):
    path = _fake_nvidia_smi(tmp_path / "bin", driver, cuda) if driver else tmp_path
    assert _setup_torch(path, "--pip", "torch").stdout.strip() == torch_args
    assert _setup_torch(path, "--pip", "dali").stdout.strip() == dali
    assert (driver or "no NVIDIA GPU") in _setup_torch(path, "--explain").stdout


def test_set_up_refuses_a_driver_too_old_and_can_be_overridden(tmp_path):
    path = _fake_nvidia_smi(tmp_path / "bin", "470.256.02", "11.4")
    refused = _setup_torch(path, "--pip", "torch")
    assert refused.returncode == 2 and "driver 470.256.02 runs CUDA 11.4" in refused.stderr
    assert "COTRAIN_CUDA=cpu" in refused.stderr
    assert _setup_torch(path, "--pip", "torch", COTRAIN_CUDA="cpu").stdout.strip() == "torch==2.14.1 torchvision==0.29.1"
    assert _setup_torch(path, "--pip", "dali", COTRAIN_CUDA="13.0").stdout.strip() == "nvidia-dali-cuda130==2.4.0"


def test_training_refuses_the_cpu_when_nvidia_smi_sees_a_gpu_torch_cannot_use(tmp_path, tiny_shards, monkeypatch):
    from ops.cli import main
    from ops.device import GpuUnusableError, check_torch_sees_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a CUDA 13 build does on a 12.x driver
    monkeypatch.setenv("PATH", f"{_fake_nvidia_smi(tmp_path / 'bin', '550.54.15', '12.4')}:{os.environ['PATH']}")
    with pytest.raises(GpuUnusableError, match=r"NVIDIA H100.*driver 550\.54\.15.*torch " + re.escape(torch.__version__) + ".*--device cpu"):
        check_torch_sees_gpu("auto")
    check_torch_sees_gpu("cpu")  # the CPU on purpose
    result = CliRunner().invoke(main, ["train", "--shards", str(tiny_shards), "--out", str(tmp_path / "run"),
                                       "--metrics-port", "0"])
    assert result.exit_code == 1 and "driver 550.54.15" in result.output and "make setup" in result.output
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_without_nvidia_smi_training_goes_on_on_the_cpu(tmp_path, monkeypatch):
    from ops.device import check_torch_sees_gpu

    monkeypatch.setenv("PATH", str(tmp_path))
    check_torch_sees_gpu("auto")


# -- 6. read-back once per interval; pinned copies; the loop's overhead -----------------------------------------

def test_step_values_are_read_back_once_per_interval(monkeypatch):
    from ops.readback import StepReadback

    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.numel()) or tolist(t))
    for name in ("item", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, lambda t: pytest.fail("a per-value read"))
    readback, records = StepReadback(every=10), []
    for step in range(25):
        records += readback.add({"a_loss": torch.tensor(float(step)), "b_loss": torch.tensor(2.0 * step)},
                                torch.tensor(3.0 * step), step_seconds=step)
    assert len(records) == 20 and len(reads) == 2
    records += readback.flush()
    assert len(reads) == 3 and [r.host["step_seconds"] for r in records] == list(range(25))
    assert all(r.terms == {"a_loss": s, "b_loss": 2.0 * s} and r.total == 3.0 * s for s, r in enumerate(records))


def test_host_batches_bound_for_a_gpu_are_pinned_first(monkeypatch):
    from pipeline.batch import to_device

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, device, non_blocking=False: calls.append(
        (str(device), non_blocking)) or t)
    to_device(torch.zeros(2), "cuda:0")
    to_device(torch.zeros(2), "cpu")
    assert calls == ["pin", ("cuda:0", True), ("cpu", True)]


def test_the_dali_free_loader_pins_batches_for_a_gpu(tiny_shards, monkeypatch):
    """The DataLoader's pinning thread calls Batch.pin_memory, which pins every tensor of the batch."""
    from pipeline import LoaderConfig, load_dataset_info, make_loader

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t.shape) or t)
    info = load_dataset_info(tiny_shards)
    gpu, cpu = (make_loader(info, "val", LoaderConfig(workers=0), training=False, device_id=d, backend="wds")
                for d in (0, None))
    assert gpu._data_loader(None, []).pin_memory and not cpu._data_loader(None, []).pin_memory
    batch = next(iter(cpu))
    assert batch.pin_memory().keys == batch.keys and len(pinned) == 2 * len(batch.inputs) + 1 + len(batch.lengths)


def test_loop_overhead_benchmark_quick(tiny_shards, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from bench.loop_overhead import measure

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the benchmark's --device cpu hides GPUs: undone after the test
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    result = measure(SimpleNamespace(shards=str(tiny_shards), steps=2, batch_size=4, repeats=1))
    assert result["steps"] == 2 and result["loop_step_s"] > 0 and result["bare_step_s"] > 0
    assert result["ratio"] == pytest.approx(result["loop_step_s_all"][0] / result["bare_step_s_all"][0])


# -- 7. the GPU check's CPU mode --------------------------------------------------------------------------------

def test_gpu_check_cpu_mode_passes_its_stages(tiny_shards, tmp_path):
    """Every stage but train-zero2 (the same code as train-zero3, with fp32 expected: 20 s more on 2 cores)."""
    out = tmp_path / "check.json"
    chosen = "versions,corpus,decode-32,train-zero3"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--shards", str(tiny_shards), "--stages", chosen,
                           "--work", str(tmp_path / "work"), "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, env=clean_env(OMP_NUM_THREADS="1"), timeout=600)
    result = json.loads(out.read_text())
    assert done.returncode == 0 and result["ok"], json.dumps(result, indent=1)
    stages = result["stages"]
    assert set(stages) == {"versions", "corpus", "decode-32", "train-zero3"}
    assert stages["versions"]["torch"] == torch.__version__ and stages["versions"]["dali"]
    assert stages["decode-32"]["clips"] == 5 and stages["decode-32"]["worst_video_mean_abs_diff_levels"] <= 2
    assert stages["train-zero3"]["param_dtypes"] == ["torch.bfloat16"] and stages["train-zero3"]["validated"]
    assert all(s["loader_devices"] == ["cpu"] for n, s in stages.items() if n.startswith("train"))


def test_gpu_check_records_a_failed_or_timed_out_stage(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.gpu_check import _run_stage

    args = SimpleNamespace(work=str(tmp_path), cpu=True, shards=str(tmp_path / "missing"), stage_timeout=60)
    failed = _run_stage("decode-32", ["--size", "32"], args)
    assert not failed["ok"] and not failed["timed_out"] and "missing" in failed["error"]
    args.stage_timeout = 1  # too short to import torch
    timed_out = _run_stage("versions", [], args)
    assert not timed_out["ok"] and timed_out["timed_out"]
