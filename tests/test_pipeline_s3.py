"""pipeline/: shards and dataset.json on `s3://`, served by a moto S3 server on 127.0.0.1.

The DALI loader reads the shards with DALI's own S3 reader (AWS SDK for C++), the DALI-free loader and
dataset.json with boto3; both must give the batches read from local disk. moto runs as its own process:
DALI holds the GIL while it reads S3, so a server thread of the test process could not answer."""
import json
import socket
import subprocess
import sys
import time

import pytest
import torch

from pipeline import LoaderConfig, load_dataset_info, make_loader
from pipeline.s3 import S3AccessError

boto3 = pytest.importorskip("boto3", reason="the s3 tests need boto3 and moto[server] (pip install -e .[test])")
pytest.importorskip("moto.server", reason="the s3 tests need moto[server] (pip install -e .[test])")

BUCKET = "cotrain-test"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"moto server did not listen on 127.0.0.1:{port} within {seconds} s")


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server process; the AWS_* variables both boto3 and DALI's AWS SDK read point at it."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        try:
            _wait_for(port, server)
            yield env
        finally:
            server.terminate()
            server.wait(timeout=30)


@pytest.fixture(scope="module")
def s3_shards(s3_env, tiny_shards):
    """s3://BUCKET/tiny: every file of the tiny shard directory (tars, .idx, dataset.json)."""
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(tiny_shards.iterdir()):
        client.upload_file(str(path), BUCKET, f"tiny/{path.name}")
    return f"s3://{BUCKET}/tiny"


def _batches(info, split, backend, training=False):
    loader = make_loader(info, split, LoaderConfig(batch_size=4, workers=0), modalities=["text", "audio"],
                         training=training, backend=backend)
    return list(loader.epoch()) if training else list(loader)


def _assert_same(batches, expected):
    assert [b.keys for b in batches] == [b.keys for b in expected]
    for got, want in zip(batches, expected):
        assert torch.equal(got.inputs["text"], want.inputs["text"]) and torch.equal(got.labels, want.labels)
        assert torch.equal(got.inputs["audio"], want.inputs["audio"])  # same bytes, same decoder: exact
        assert all(torch.equal(got.present[m], want.present[m]) for m in want.present)


@pytest.mark.parametrize("backend", ["dali", "wds"])
def test_s3_root_reads_the_batches_read_from_local_disk(tiny_shards, s3_shards, backend):
    remote = load_dataset_info(s3_shards)
    assert remote.shards("train")[0].url == f"{s3_shards}/train-000000.tar"
    assert not remote.shards("train")[0].random_access  # streamed by shard, like https://
    _assert_same(_batches(remote, "val", backend), _batches(load_dataset_info(tiny_shards), "val", backend))


@pytest.mark.parametrize("backend", ["dali", "wds"])
def test_s3_brace_urls_train_in_the_order_of_the_same_shards_on_disk(tiny_shards, s3_shards, backend, monkeypatch):
    import pipeline.source

    other = "read_s3_object" if backend == "dali" else "read_s3_objects_with_dali"  # each backend has one client
    monkeypatch.setattr(pipeline.source, other, lambda *args: pytest.fail(f"{backend} loader called {other}"))
    info = load_dataset_info(tiny_shards)
    remote = info.with_shard_urls("train", f"{s3_shards}/train-{{000000..000002}}.tar")
    streamed_local = info.with_shard_urls("train", f"pipe:cat {tiny_shards}/train-{{000000..000002}}.tar")
    batches = _batches(remote, "train", backend, training=True)
    assert len(batches) == 5 and len({k for b in batches for k in b.keys}) == 20
    _assert_same(batches, _batches(streamed_local, "train", backend, training=True))


def test_missing_credentials_name_the_variables_to_set(s3_shards, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(S3AccessError, match="AWS_ACCESS_KEY_ID.*AWS_ENDPOINT_URL"):
        load_dataset_info(s3_shards)


def test_an_endpoint_that_does_not_answer_is_named(s3_shards, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(S3AccessError, match="does not answer.*AWS_ENDPOINT_URL"):
        load_dataset_info(s3_shards)


def test_a_missing_dataset_json_means_an_unfinished_build(s3_shards):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        load_dataset_info(f"s3://{BUCKET}/no-such-build")


def test_dali_reports_a_missing_s3_shard_with_the_url(tiny_shards, s3_shards):
    info = load_dataset_info(tiny_shards)
    gone = info.with_shard_urls("val", f"s3://{BUCKET}/elsewhere/val-000000.tar")
    with pytest.raises(S3AccessError, match="elsewhere/val-000000.tar"):
        _batches(gone, "val", "dali")


def test_dali_webdataset_reader_reads_s3_tars_with_s3_index_files(tiny_shards, s3_shards):
    """What DALI 2.4 reads natively: fn.readers.webdataset takes s3:// `paths` and s3:// `index_paths` (the
    `.idx` beside each tar). The loader does not use this reader (its order is not the loader's plan)."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def _members():
        meta, ids = fn.readers.webdataset(paths=[f"{s3_shards}/val-000000.tar"], ext=["json", "text.ids"],
                                          index_paths=[f"{s3_shards}/val-000000.idx"])
        return meta, ids

    pipe = _members()
    pipe.build()
    meta, ids = pipe.run()
    local = make_loader(load_dataset_info(tiny_shards), "val", LoaderConfig(batch_size=8, workers=0),
                        modalities=["text"], training=False, backend="wds")
    expected = next(iter(local))
    keys = [json.loads(np.asarray(meta[i]).tobytes())["key"] for i in range(len(expected))]
    assert keys == expected.keys
    texts = torch.stack([torch.from_numpy(np.asarray(ids[i]).view("<i4").copy()) for i in range(len(expected))])
    assert torch.equal(texts, expected.inputs["text"])
