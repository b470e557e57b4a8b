"""Baseline generation on Ray: shard round trips through tarfile, webdataset and timm; determinism
across actor counts; resume."""

from __future__ import annotations

import functools
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tailforge.gen.core.errors import ShardError
from tailforge.gen.core.files import config_dict
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.data.shards.format import plan_shards
from tailforge.gen.data.shards.write import load_records
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.jobs.config import BaselineConfig
from tailforge.gen.jobs.runner import run_job
from tailforge.gen.jobs.sources import BaselineSource

NUM, SHARD, BATCH = 30, 8, 5


def run_baseline(model_dir, out, actors, num=NUM, seed=3):
    config = BaselineConfig(model=str(model_dir), num=num, sampling=SamplingConfig(sampler="ddpm", steps=4),
                            seed=seed, shard_size=SHARD, batch_size=BATCH)
    specs = plan_shards(config.job, config.num, config.shard_size, config.seed)
    return run_job(out, config_dict(config), specs, functools.partial(BaselineSource, config), actors=actors,
                   manifest_extra={"num_classes": 10, "class_names": list("0123456789")}, progress=False)


def tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def two_actor_run(ray_session, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_actors")
    return out, run_baseline(tiny_model_dir, out, actors=2)


def test_shards_read_back_with_tarfile(two_actor_run):
    out, records = two_actor_run
    assert [r.count for r in records] == [8, 8, 8, 6]
    keys = []
    for record in records:
        members = tar_members(out / record.name)
        stems = sorted({name.rsplit(".", 1)[0] for name in members})
        assert all({f"{s}.png", f"{s}.cls", f"{s}.json"} <= members.keys() for s in stems)
        for stem in stems:
            image = np.asarray(Image.open(io.BytesIO(members[f"{stem}.png"])))
            assert image.shape == (8, 8) and image.dtype == np.uint8
            meta = json.loads(members[f"{stem}.json"])
            assert meta["index"] % 10 == int(members[f"{stem}.cls"]) == meta["label"]
            assert meta["sampler"] == "ddpm" and meta["steps"] == 4 and meta["seed"] == 3 and meta["model_hash"]
        keys += stems
    assert keys == [f"baseline-{i:09d}" for i in range(NUM)]


def test_shards_read_back_with_webdataset(two_actor_run):
    out, records = two_actor_run
    urls = [str(out / r.name) for r in records]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("l").to_tuple("__key__", "png", "cls"))
    assert [k for k, _, _ in samples] == [f"baseline-{i:09d}" for i in range(NUM)]
    assert all(img.shape == (8, 8) for _, img, _ in samples)
    assert [c for _, _, c in samples] == [i % 10 for i in range(NUM)]


def test_shards_read_back_with_timm(two_actor_run):
    from timm.data import create_dataset

    out, _ = two_actor_run
    dataset = create_dataset("wds/", root=str(out), split="train", batch_size=1, input_img_mode="L")
    items = list(iter(dataset))
    assert len(items) == NUM
    assert sorted(int(target) for _, target in items) == sorted(i % 10 for i in range(NUM))
    manifest = json.loads((out / "_info.json").read_text())
    assert manifest["splits"]["train"]["num_samples"] == NUM
    assert manifest["splits"]["train"]["shard_lengths"] == [8, 8, 8, 6]


def test_shards_dataset_spec_loads_generated_set(two_actor_run):
    out, _ = two_actor_run
    data = load_dataset(f"shards:{out}")
    assert data.images.shape == (NUM, 1, 8, 8) and data.labels.tolist() == [i % 10 for i in range(NUM)]
    assert data.info.num_classes == 10


def test_one_and_two_actors_write_identical_samples(two_actor_run, tiny_model_dir, tmp_path):
    out2, records2 = two_actor_run
    records1 = run_baseline(tiny_model_dir, tmp_path, actors=1)
    for r1, r2 in zip(records1, records2):
        assert tar_members(tmp_path / r1.name) == tar_members(out2 / r2.name)
        assert r1.sha256 == r2.sha256  # fixed tar mtime: whole files are identical too


def test_in_process_run_matches_actor_pool(two_actor_run, tiny_model_dir, tmp_path):
    _, records2 = two_actor_run
    records0 = run_baseline(tiny_model_dir, tmp_path, actors=0)
    assert [r.sha256 for r in records0] == [r.sha256 for r in records2]


def test_rerun_skips_recorded_shards_and_redoes_missing_ones(tiny_model_dir, tmp_path):
    first = run_baseline(tiny_model_dir, tmp_path, actors=0)
    (tmp_path / first[1].name).unlink()  # a lost shard is redone
    (tmp_path / ".baseline-000002.tar.deadbeef.tmp").write_bytes(b"partial")  # a crashed write is cleaned
    second = run_baseline(tiny_model_dir, tmp_path, actors=0)
    assert [r.sha256 for r in second] == [r.sha256 for r in first]
    assert [r.worker for r in second][0] == first[0].worker and second[0].seconds == first[0].seconds
    assert not list(tmp_path.glob(".*.tmp"))
    assert len(load_records(tmp_path)) == 4


def test_rerun_with_other_settings_is_refused(tiny_model_dir, tmp_path):
    run_baseline(tiny_model_dir, tmp_path, actors=0, num=8)
    with pytest.raises(ShardError, match="different job.*num"):
        run_baseline(tiny_model_dir, tmp_path, actors=0, num=9)
