"""bench/: the loader and builder benchmarks' quick modes keep running and print their ratios; the memory probe."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from subprocesses import clean_env

ROOT = Path(__file__).resolve().parents[1]


def _run_quick(script: str, cache: Path) -> dict:
    done = subprocess.run([sys.executable, script, "--quick", "--cache", str(cache)], cwd=ROOT, capture_output=True,
                          text=True, env=clean_env(OMP_NUM_THREADS="1"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


def test_loader_benchmark_quick_measures_both_loaders_against_the_floor(cache):
    result = _run_quick("bench/loader.py", cache)
    (size,) = result["sizes"].values()
    assert size["samples"] == 4 and result["sources"]["codec"] == "h264 + aac"
    for processes in ("1", "2"):
        rates = size["samples_per_s"][processes]
        assert all(r > 0 for name in ("floor", "dali", "wds") for r in rates[name])
        assert size["dali_vs_floor"][processes] == pytest.approx(rates["dali"][0] / rates["floor"][0], rel=1e-2)
        assert size["wds_vs_floor"][processes] == pytest.approx(rates["wds"][0] / rates["floor"][0], rel=1e-2)
        per_cpu = size["samples_per_cpu_s"][processes]
        assert size["wds_vs_floor_per_cpu_s"][processes] == pytest.approx(per_cpu["wds"][0] / per_cpu["floor"][0],
                                                                          rel=1e-2)
        assert all(c > 0 for cores in size["cores_used"][processes].values() for c in cores)  # tiny runs: 10 ms ticks
    assert set(size["scaling_1_to_2"]) == {"floor", "dali", "wds"}
    assert set(result["goals_met"]["32x32x4"]) == {"dali_vs_floor", "wds_vs_floor", "scaling_1_to_2"}
    assert len(list((cache / "sources").rglob("*.mp4"))) == 4  # cached for the builder benchmark below


def test_shards_benchmark_quick_measures_the_builder_against_a_pyav_transcode(cache):
    result = _run_quick("bench/shards.py", cache)
    (size,) = result["sizes"].values()
    assert size["samples"] == 4
    for processes in ("1", "2"):
        rates = size["samples_per_s"][processes]
        assert rates["floor"][0] > 0 and rates["builder"][0] > 0
        assert size["builder_vs_floor"][processes] == pytest.approx(rates["builder"][0] / rates["floor"][0], rel=1e-2)
        assert size["builder_vs_floor_per_cpu_s"][processes] > 0
    assert not (cache / "builds").exists()  # the timed builds are removed, the sources kept


def test_pyav_floor_transcode_gives_the_builders_member_shapes(cache):
    import av
    import io

    sys.path.insert(0, str(ROOT))
    from bench.sources import write_sources
    from bench.shards import pyav_transcode

    manifest = write_sources(1, cache / "sources", width=64, height=48, seconds=0.5, progress=False)
    clip = manifest.parent / json.loads(manifest.read_text().splitlines()[0])["rgb"]
    webm, wav = pyav_transcode((str(clip), 32, 4))
    with av.open(io.BytesIO(webm)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (32, 32, 3)
    assert wav[:4] == b"RIFF" and len(wav) == 44 + 2 * 16000  # 1 s of 16 kHz mono, zero-padded as the builder does


def test_cpu_meter_counts_a_child_that_exits_inside_the_block():
    import time

    sys.path.insert(0, str(ROOT))
    from bench.cpu import CpuMeter

    with CpuMeter() as meter:
        subprocess.run([sys.executable, "-c", "import time; end = time.process_time() + 0.5\n"
                                              "while time.process_time() < end: pass"], check=True)
        time.sleep(0.2)
    assert 0.35 < meter.seconds < 5  # the child's half second of CPU (at most one 0.1 s poll is lost)


def test_memory_probe_reads_the_process_tree_after_every_epoch(tiny_shards):
    sys.path.insert(0, str(ROOT))
    from bench.memory import measure_one

    result = measure_one(str(tiny_shards), "wds", epochs=2, batch_size=4, threads=0)
    assert len(result["rss_after_epoch_mb"]) == len(result["pss_after_epoch_mb"]) == 2
    assert result["peak_rss_mb"] >= min(result["rss_after_epoch_mb"]) > 0
    assert abs(result["growth_last_vs_first"]) < 0.5
