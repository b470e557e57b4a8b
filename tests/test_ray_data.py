"""Ray Data: shard sets read through ray.data.read_webdataset with every sample, label and json field
intact (against tarfile reading), and Ray Datasets as the classifier trainer's source."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tailforge.gen.core.errors import ConfigError, ShardError
from tailforge.gen.data.shards.format import ShardRecord, encode_sample, plan_shards
from tailforge.gen.data.shards.write import save_record, write_manifest, write_shard
from tailforge.train.config import ClassifierTrainConfig
from tailforge.train.streams import write_real_shards

DATASET = "digits?n=40"


def varied_json_set(root: Path) -> Path:
    """A shard set written by our writer whose samples' json differ in keys and number types: an
    Arrow struct column would add the missing keys as None and turn the ints beside floats into floats."""
    root.mkdir()
    records = []
    for spec in plan_shards("varied", 12, 5, seed=0):
        rng = np.random.default_rng(spec.index)
        samples = [encode_sample(f"varied-{i:09d}", rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), i % 10,
                                 {"i": i, "score": i if i % 2 else i + 0.5,
                                  **({"extra": [1, "a", None]} if i % 3 else {})})
                   for i in spec.indices]
        sha, size = write_shard(root, spec, samples)
        records.append(ShardRecord(spec.name, spec.index, spec.start, spec.count, sha, size, 0.0, 0, "test"))
        save_record(root, records[-1])
    write_manifest(root, records, extra={"num_classes": 10})
    return root


def tarfile_samples(root: Path) -> dict[str, tuple[np.ndarray, int, str]]:
    """key -> (image C x H x W, label, json text) of the manifest's shards, read with tarfile and PIL."""
    info = json.loads((root / "_info.json").read_text())
    members: dict[str, dict[str, bytes]] = {}
    for name in info["splits"]["train"]["filenames"]:
        with tarfile.open(root / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    samples = {}
    for key, m in members.items():
        image = np.asarray(Image.open(io.BytesIO(m["png"])))
        image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
        samples[key] = (image, int(m["cls"]), m["json"].decode())
    return samples


def add_files_no_reader_may_read(root: Path) -> None:
    """A publish temporary and a shard without a record: only the manifest's shards are the set."""
    shard = next(root.glob("*.tar"))
    (root / f".{shard.name}.tmp-1234").write_bytes(shard.read_bytes())
    (root / "stray-000099.tar").write_bytes(shard.read_bytes())


@pytest.mark.parametrize("kind", ["real", "varied"])
def test_read_shard_set_returns_every_sample_label_and_json_field(tmp_path, ray_session, kind):
    from tailforge.train.ray_data import read_shard_set

    root = write_real_shards(DATASET, tmp_path / "set", shard_size=16) if kind == "real" else \
        varied_json_set(tmp_path / "set")
    add_files_no_reader_may_read(root)
    expected = tarfile_samples(root)
    rows = read_shard_set(root).take_all()
    assert sorted(row["key"] for row in rows) == sorted(expected)
    for row in rows:
        image, label, text = expected[row["key"]]
        assert row["image"].dtype == np.uint8 and np.array_equal(row["image"], image)
        assert row["label"] == label
        # the same dict with the same types: the text json.dumps writes of it is the shard's own
        assert json.dumps(row["json"], sort_keys=True) == text and row["json"] == json.loads(text)


def test_read_shard_set_reads_a_set_in_manifest_order_and_refuses_an_empty_one(tmp_path, ray_session):
    from tailforge.train.ray_data import read_shard_set

    root = varied_json_set(tmp_path / "set")
    assert [row["key"] for row in read_shard_set(root).take_all()] == [f"varied-{i:09d}" for i in range(12)]
    write_manifest(root, [])
    with pytest.raises(ShardError, match="lists no shards"):
        read_shard_set(root)


def test_ray_data_stream_yields_mixed_stream_batches_one_pass_per_epoch(tmp_path, ray_session):
    from tailforge.train.ray_data import RayDataStream, read_shard_set

    root = write_real_shards(DATASET, tmp_path / "set", shard_size=16)
    expected = tarfile_samples(root)
    stream = RayDataStream(read_shard_set(root), batch_size=16, image_shape=(1, 8, 8), num_classes=10,
                           end_epoch=2, shuffle_buffer=40, seed=3)
    assert stream.steps_per_epoch == 3 and [s.name for s in stream.sets] == ["ray_data"]
    batches = list(stream.batches())
    assert [b["step"] for b in batches] == list(range(6)) and [len(b["keys"]) for b in batches] == [16, 16, 8] * 2
    orders = []
    for epoch in (batches[:3], batches[3:]):
        keys = [k for b in epoch for k in b["keys"]]
        assert sorted(keys) == sorted(expected)  # every sample once per epoch
        orders.append(keys)
        for b in epoch:
            assert b["images"].dtype == torch.uint8 and b["labels"].dtype == torch.long
            assert torch.equal(b["images"], torch.from_numpy(np.stack([expected[k][0] for k in b["keys"]])))
            assert b["labels"].tolist() == [expected[k][1] for k in b["keys"]] and not b["source"].any()
    assert orders[0] != orders[1]  # reshuffled every epoch ...
    resumed = [k for b in stream.at(1, 2).batches() for k in b["keys"]]
    assert resumed == orders[1]  # ... by (seed, epoch): a resumed run sees the same batches


def test_ray_data_stream_refuses_rows_the_trainer_cannot_use(ray_session):
    import ray.data

    from tailforge.train.ray_data import RayDataStream

    def stream(rows):
        return RayDataStream(ray.data.from_items(rows), batch_size=4, image_shape=(1, 8, 8), num_classes=10)

    image = np.zeros((1, 8, 8), np.uint8)
    for rows, message in (([{"image": image}], r"lack the columns \['label'\]"),
                          ([{"image": image.astype(np.float32), "label": 1}], "float32 images of shape"),
                          ([{"image": np.zeros((1, 4, 4), np.uint8), "label": 1}], r"shape \(1, 4, 4\)"),
                          ([{"image": image, "label": 10, "key": "k-1"}], "row 'k-1': label 10 is not in")):
        with pytest.raises(ShardError, match=message) as raised:
            list(stream(rows).batches())
        assert "\n" not in str(raised.value)


def test_train_classifier_on_a_ray_dataset_resumes_exactly(tmp_path, ray_session):
    from tailforge.gen.models.classifiers import load_classifier
    from tailforge.train.classifier import train_classifier
    from tailforge.train.ray_data import read_shard_set

    root = write_real_shards(DATASET, tmp_path / "set", shard_size=16)
    config = ClassifierTrainConfig(dataset=DATASET, epochs=2, batch_size=16, shuffle_buffer=40, warmup=0.0)
    dataset = read_shard_set(root)
    with pytest.raises(ConfigError, match="workers 1"):
        train_classifier(ClassifierTrainConfig(dataset=DATASET, workers=2, batch_size=16), tmp_path / "x",
                         ray_dataset=dataset)
    train_classifier(config, tmp_path / "whole", progress=False, ray_dataset=dataset)
    log = [json.loads(line) for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [3, 6] and all(e["mix"] == {"ray_data": 1.0} and e["samples"] == 40 for e in log)

    class Interrupted(Exception):
        pass

    def interrupt(entry):  # after epoch 1's checkpoint and log entry
        raise Interrupted

    with pytest.raises(Interrupted):
        train_classifier(config, tmp_path / "resumed", progress=False, ray_dataset=dataset, report=interrupt)
    train_classifier(config, tmp_path / "resumed", progress=False, ray_dataset=dataset)
    whole, _ = load_classifier(tmp_path / "whole")
    resumed, _ = load_classifier(tmp_path / "resumed")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
