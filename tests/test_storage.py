"""Shard sets at fsspec URLs: an S3-compatible server (moto) on loopback, file:// URLs, and the
atomic publish on both kinds of storage."""

from __future__ import annotations

import functools
import logging
import os
import socket

import fsspec
import pytest

from tailforge.gen.core.errors import ShardError, StorageError
from tailforge.gen.core.files import config_dict
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.data.shards.format import plan_shards
from tailforge.gen.data.shards.read import ShardReadStats, iter_samples, read_manifest
from tailforge.gen.data.shards.verify import verify_shard_set
from tailforge.gen.data.shards.write import load_records
from tailforge.gen.data.storage import Storage
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.jobs.config import BaselineConfig
from tailforge.gen.jobs.runner import run_job
from tailforge.gen.jobs.sources import BaselineSource

BUCKET = "tailforge-test"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port; the AWS variables point s3fs (botocore) at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET)
    yield fsspec.filesystem("s3", skip_instance_cache=True)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def run(model_dir, root, num=10):
    config = BaselineConfig(model=str(model_dir), num=num, sampling=SamplingConfig(sampler="ddim", steps=2), seed=7,
                            shard_size=4, batch_size=4)
    return run_job(root, config_dict(config), plan_shards(config.job, num, 4, 7),
                   functools.partial(BaselineSource, config), actors=0, progress=False,
                   manifest_extra={"num_classes": 10, "class_names": list("0123456789")})


@pytest.fixture(scope="module")
def local_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    return root, run(tiny_model_dir, root)


def test_job_on_s3_writes_the_same_shards_as_on_disk(s3, tiny_model_dir, local_run):
    _, local_records = local_run
    url = f"s3://{BUCKET}/baseline"
    records = run(tiny_model_dir, url)
    assert [r.sha256 for r in records] == [r.sha256 for r in local_records]
    assert sorted(s3.ls(f"{BUCKET}/baseline")) == sorted(
        [f"{BUCKET}/baseline/{n}" for n in ("_info.json", "_job.json", "_records")]
        + [f"{BUCKET}/baseline/{r.name}" for r in records])
    report = verify_shard_set(url)
    assert report["ok"] and report["samples"] == 10 and report["root"] == url
    assert read_manifest(url)["splits"]["train"]["shard_sha256"] == [r.sha256 for r in records]


def test_s3_rerun_redoes_only_the_lost_shard(s3, tiny_model_dir):
    url = f"s3://{BUCKET}/resume"
    first = run(tiny_model_dir, url)
    s3.rm_file(f"{BUCKET}/resume/{first[1].name}")  # lost object: its record no longer proves anything
    second = run(tiny_model_dir, url)
    assert [r.sha256 for r in second] == [r.sha256 for r in first]
    assert second[0].seconds == first[0].seconds and second[2].seconds == first[2].seconds  # kept, not redone
    assert len(load_records(url)) == 3 and verify_shard_set(url)["ok"]


def test_s3_shards_read_as_a_dataset_and_damage_names_the_object(s3, tiny_model_dir, local_run):
    local_root, _ = local_run
    url = f"s3://{BUCKET}/reader"
    records = run(tiny_model_dir, url)
    data = load_dataset(f"shards:{url}")
    assert data.keys == [f"baseline-{i:09d}" for i in range(10)] and data.images.shape == (10, 1, 8, 8)
    assert data.read_report == {"shards_read": 3, "shards_skipped": 0, "samples": 10, "skipped": []}
    path = f"{BUCKET}/reader/{records[1].name}"
    s3.pipe_file(path, s3.cat_file(path)[:1500])  # truncated in the middle of a member
    with pytest.raises(ShardError, match=rf"shard s3://{BUCKET}/reader/baseline-000001.tar: .*byte offset"):
        list(iter_samples(url))
    stats = ShardReadStats()
    keys = [s["key"] for s in iter_samples(url, skip_bad_shards=True, stats=stats)]
    assert len(keys) == 6 and stats.as_dict()["shards_skipped"] == 1
    assert stats.skipped[0]["shard"] == f"s3://{BUCKET}/reader/baseline-000001.tar"
    assert not verify_shard_set(url)["ok"]


def test_object_store_publish_is_all_or_nothing(s3):
    storage = Storage(f"s3://{BUCKET}/atomic")

    def half_then_fail(f):
        f.write(b"x" * 1000)
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        storage.publish("part.bin", half_then_fail)
    assert not s3.exists(f"{BUCKET}/atomic/part.bin")
    digest, size = storage.write_bytes("whole.bin", b"abc")
    assert s3.cat_file(f"{BUCKET}/atomic/whole.bin") == b"abc" and size == 3
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")


def test_local_publish_leaves_no_temporary_on_failure(tmp_path):
    storage = Storage(tmp_path)
    with pytest.raises(RuntimeError):
        storage.publish("part.bin", lambda f: (f.write(b"x"), (_ for _ in ()).throw(RuntimeError("died"))))
    assert list(tmp_path.iterdir()) == []


def test_file_url_is_the_same_shard_set(tiny_model_dir, local_run, tmp_path):
    _, local_records = local_run
    records = run(tiny_model_dir, f"file://{tmp_path}/set")
    assert [r.sha256 for r in records] == [r.sha256 for r in local_records]
    assert verify_shard_set(str(tmp_path / "set"))["ok"]


def test_unknown_protocol_is_a_one_line_error():
    with pytest.raises(StorageError, match="nosuchproto://bucket/x"):
        Storage("nosuchproto://bucket/x")


def test_s3_prefix_is_owned_and_never_locked(s3, tiny_model_dir):
    url = f"s3://{BUCKET}/owned"
    s3.pipe_file(f"{BUCKET}/owned/notes.txt", b"a user's object")
    with pytest.raises(ShardError, match=rf"s3://{BUCKET}/owned is not empty and holds no _job\.json \(notes\.txt\)"):
        run(tiny_model_dir, url)
    assert s3.ls(f"{BUCKET}/owned") == [f"{BUCKET}/owned/notes.txt"]
    with Storage(url).lock():  # object stores have no lock: nothing is created
        assert s3.ls(f"{BUCKET}/owned") == [f"{BUCKET}/owned/notes.txt"]
