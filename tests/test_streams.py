"""Training input streams: tar reading, mixing ratios, rank/worker splitting, exact epochs, follow mode."""

from __future__ import annotations

import io
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from webdataset.tariterators import tarfile_samples

from tailforge.gen.core.errors import ConfigError, ShardError
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.data.shards.format import ShardRecord, encode_sample, plan_shards
from tailforge.gen.data.shards.write import save_record, write_manifest, write_shard
from tailforge.train.config import MixSource
from tailforge.train.streams import (
    PIPE_MAX_BYTES,
    MixedStream,
    ShardSet,
    _for_pipe,
    _from_pipe,
    parse_mix,
    stream_samples,
    write_real_shards,
)

SHAPE = (1, 8, 8)


def publish(root: Path, job: str, spec, label: int) -> ShardRecord:
    """Write one shard the way a generation job does (atomic tar, then its record)."""
    rng = np.random.default_rng(spec.index)
    samples = (encode_sample(f"{job}-{i:09d}", rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), label, {"i": i})
               for i in spec.indices)
    sha, size = write_shard(root, spec, samples)
    record = ShardRecord(spec.name, spec.index, spec.start, spec.count, sha, size, 0.0, 0, "test")
    save_record(root, record)
    return record


def make_set(root: Path, job: str, num: int, shard_size: int, label: int) -> ShardSet:
    root.mkdir(parents=True)
    records = [publish(root, job, spec, label) for spec in plan_shards(job, num, shard_size, seed=0)]
    write_manifest(root, records, extra={"num_classes": 10})
    return ShardSet(job, str(root), 1.0)


def all_batches(stream: MixedStream) -> list[dict]:
    return list(stream.batches())


def test_stream_samples_match_webdataset_and_check_shards(tmp_path):
    buf = io.BytesIO()
    long_key = "k" * 120  # needs a pax header
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for key in ("a-000", long_key, "dir/b-001"):
            for ext, data in (("png", b"\x89PNG" + key.encode()), ("cls", b"3")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "x.tar"
    path.write_bytes(buf.getvalue())
    ours = [{k: v for k, v in s.items() if k != "__offset__"} for s in stream_samples([{"url": str(path)}])]
    theirs = list(tarfile_samples([{"url": str(path)}]))
    assert [s["__key__"] for s in ours] == ["a-000", long_key, "dir/b-001"]
    assert ours == theirs
    damaged = bytearray(buf.getvalue())
    damaged[512 + 10] ^= 0xFF  # inside the second header's name (after "dir"): checksum no longer matches
    path.write_bytes(bytes(damaged))
    with pytest.raises(ShardError, match="corrupt or truncated tar header at byte offset 512"):
        list(stream_samples([{"url": str(path)}]))
    path.write_bytes(buf.getvalue()[:1100])
    with pytest.raises(ShardError, match="unreadable tar data at byte offset 1100: unexpected end of data"):
        list(stream_samples([{"url": str(path)}]))
    with tarfile.open(path, mode="w") as tar:  # training streams refuse links like every reader
        link = tarfile.TarInfo("c.png")
        link.type, link.linkname = tarfile.SYMTYPE, "a-000.png"
        tar.addfile(link)
    with pytest.raises(ShardError, match="'c.png' at byte offset 0 is a link"):
        list(stream_samples([{"url": str(path)}]))


def test_mixing_ratios_hold_and_no_rank_starves(tmp_path):
    """Two sources at weights 1.0 / 0.3 over 4,000 samples: the share of the second stays within
    4 standard deviations of 0.3 / 1.3, on every rank and loader worker layout; one shard per set
    is fewer than the 2 ranks x 2 workers, and every rank still gets full batches."""
    a = make_set(tmp_path / "a", "a", 120, 120, label=0)
    b = make_set(tmp_path / "b", "b", 40, 40, label=1)
    sets = (a, ShardSet("b", b.root, 0.3))
    counts: Counter = Counter()
    for rank in range(2):
        stream = MixedStream(sets, batch_size=50, image_shape=SHAPE, num_classes=10, epoch_samples=4000, end_epoch=1,
                             rank=rank, world_size=2, loader_workers=2, shuffle_buffer=100, seed=3)
        batches = all_batches(stream)
        assert len(batches) == stream.steps_per_epoch == 40
        assert [b["step"] for b in batches] == list(range(40))
        assert all(len(b["labels"]) == 50 for b in batches)
        for batch in batches:
            assert torch.equal(batch["labels"], batch["source"])  # every sample tagged with its own source
            assert batch["images"].dtype == torch.uint8 and tuple(batch["images"].shape[1:]) == SHAPE
            counts.update(batch["source"].tolist())
    share, expected = counts[1] / 4000, 0.3 / 1.3
    assert abs(share - expected) < 4 * np.sqrt(expected * (1 - expected) / 4000), share


def test_resampled_epochs_are_seeded_by_epoch_rank_and_worker(tmp_path):
    a = make_set(tmp_path / "a", "a", 60, 20, label=0)

    def keys(rank, start=0, end=2):
        stream = MixedStream((a,), batch_size=10, image_shape=SHAPE, num_classes=10, epoch_samples=60,
                             start_epoch=start, end_epoch=end, rank=rank, world_size=2, shuffle_buffer=20, seed=1)
        return [k for b in all_batches(stream) for k in b["keys"]]

    run = keys(0)
    assert run == keys(0)  # same seed, same stream
    assert run != keys(1)  # another rank reads another stream
    assert run[len(run) // 2:] == keys(0, start=1)  # epoch 1 does not depend on where the run started


def test_exact_epochs_see_every_sample_once(tmp_path):
    a = make_set(tmp_path / "a", "a", 250, 100, label=0)  # shards of 100, 100, 50
    b = make_set(tmp_path / "b", "b", 37, 37, label=1)
    every = {f"a-{i:09d}" for i in range(250)} | {f"b-{i:09d}" for i in range(37)}
    stream = MixedStream((a, b), batch_size=32, image_shape=SHAPE, num_classes=10, resample=False, end_epoch=2,
                         loader_workers=2, shuffle_buffer=64, seed=0)
    batches = all_batches(stream)
    assert len(batches) == 2 * stream.steps_per_epoch == 2 * 9
    epochs = [[k for b in batches[e * 9:(e + 1) * 9] for k in b["keys"]] for e in range(2)]
    for keys in epochs:
        assert len(keys) == len(every) and set(keys) == every  # each sample exactly once
    assert epochs[0] != epochs[1]  # reshuffled every epoch

    # Three ranks: together they cover every sample, each takes the same number of steps, and at
    # most R - 1 = 2 samples are repeated to even out the ranks.
    seen: Counter = Counter()
    for rank in range(3):
        ranked = MixedStream((a, b), batch_size=32, image_shape=SHAPE, num_classes=10, resample=False, rank=rank,
                             world_size=3, loader_workers=2, seed=0)
        rank_batches = all_batches(ranked)
        assert len(rank_batches) == ranked.steps_per_epoch == 3
        assert sum(len(b["keys"]) for b in rank_batches) == 96  # ceil(287 / 3)
        seen.update(k for b in rank_batches for k in b["keys"])
    assert set(seen) == every and sum(seen.values()) - len(every) <= 2


def test_exact_epochs_refuse_weights_and_follow(tmp_path):
    a = make_set(tmp_path / "a", "a", 10, 10, label=0)
    with pytest.raises(ConfigError, match="weights must be 1"):
        MixedStream((ShardSet("a", a.root, 0.5),), batch_size=4, image_shape=SHAPE, num_classes=10, resample=False)
    with pytest.raises(ConfigError, match="resampled"):
        MixedStream((ShardSet("a", a.root, 1.0, follow=True),), batch_size=4, image_shape=SHAPE, num_classes=10,
                    resample=False)


def test_follow_sees_shards_published_after_it_started(tmp_path):
    root = tmp_path / "gen"
    root.mkdir()
    specs = plan_shards("g", 40, 20, seed=0)
    publish(root, "g", specs[0], label=2)  # the job has written one shard so far; no manifest yet
    stream = MixedStream((ShardSet("g", str(root), 1.0, follow=True),), batch_size=5, image_shape=SHAPE,
                         num_classes=10, epoch_samples=100_000, shuffle_buffer=5, seed=0, follow_poll=0.0)
    batches = iter(stream.batches())
    before = {k for _ in range(8) for k in next(batches)["keys"]}
    assert before <= {f"g-{i:09d}" for i in range(20)}
    publish(root, "g", specs[1], label=2)  # the job records its second shard while we read
    later = set()
    for _ in range(200):
        later.update(next(batches)["keys"])
        if any(int(k.split("-")[1]) >= 20 for k in later):
            break
    assert any(int(k.split("-")[1]) >= 20 for k in later), "the shard published after the start was never read"


def test_follow_waits_for_a_first_shard_then_gives_up(tmp_path):
    stream = MixedStream((ShardSet("g", str(tmp_path / "none"), 1.0, follow=True),), batch_size=5, image_shape=SHAPE,
                         num_classes=10, epoch_samples=10, follow_poll=0.05, follow_timeout=0.2)
    with pytest.raises(ShardError, match="no shard recorded"):
        next(iter(stream.batches()))


def test_stream_checks_shapes_and_labels(tmp_path):
    a = make_set(tmp_path / "a", "a", 10, 10, label=7)
    with pytest.raises(ShardError, match="shape") as raised:  # raised in a loader worker process
        all_batches(MixedStream((a,), batch_size=5, image_shape=(3, 8, 8), num_classes=10, epoch_samples=10,
                                loader_workers=1))
    assert "Traceback" not in str(raised.value) and str(raised.value).startswith("shard ")
    assert "sample 'a-" in str(raised.value)
    with pytest.raises(ShardError, match="label 7 is not below num_classes 5"):
        all_batches(MixedStream((a,), batch_size=5, image_shape=SHAPE, num_classes=5, epoch_samples=10))


def damaged_png(png: bytes, fix_crc: bool) -> bytes:
    """`png` with one byte of its compressed pixel data flipped; with `fix_crc` the IDAT chunk's
    CRC is recomputed, so only the zlib stream is wrong (libpng's error path: torchvision 0.29
    crashes the process there instead of raising)."""
    start = png.index(b"IDAT")
    length = int.from_bytes(png[start - 4:start], "big")
    data = bytearray(png)
    data[start + 4 + length // 2] ^= 0xFF
    if fix_crc:
        data[start + 4 + length:start + 8 + length] = zlib.crc32(data[start:start + 4 + length]).to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize("fix_crc", [False, True])
def test_a_damaged_image_is_a_one_line_error_naming_its_sample(tmp_path, fix_crc):
    root = tmp_path / "bad"
    root.mkdir()
    spec = plan_shards("bad", 4, 4, seed=0)[0]
    rng = np.random.default_rng(0)
    samples = [encode_sample(f"bad-{i:09d}", rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), 1, {}) for i in spec.indices]
    samples[2]["png"] = damaged_png(samples[2]["png"], fix_crc)
    sha, size = write_shard(root, spec, samples)
    write_manifest(root, [ShardRecord(spec.name, spec.index, spec.start, spec.count, sha, size, 0.0, 0, "test")],
                   extra={"num_classes": 10})
    stream = MixedStream((ShardSet("bad", str(root), 1.0),), batch_size=4, image_shape=SHAPE, num_classes=10,
                         epoch_samples=4, resample=False)
    with pytest.raises(ShardError, match="cannot decode its png") as raised:
        all_batches(stream)
    assert "sample 'bad-000000002' at byte offset" in str(raised.value) and "\n" not in str(raised.value)


def test_real_shards_round_trip_losslessly(tmp_path):
    root = write_real_shards("digits?n=50", tmp_path / "real", shard_size=16)
    data = load_dataset("digits?n=50", "train")
    stream = MixedStream((ShardSet("real", str(root), 1.0),), batch_size=50, image_shape=SHAPE, num_classes=10,
                         resample=False, shuffle_buffer=1)
    (batch,) = all_batches(stream)
    index = torch.tensor([int(k.split("-")[1]) for k in batch["keys"]])
    assert torch.equal(batch["images"], data.images[index]) and torch.equal(batch["labels"], data.labels[index])
    assert sorted(index.tolist()) == list(range(50))


def test_parse_mix():
    mix = parse_mix("real=1.0, low=0.3,runs/base=0.5", {"low": "/data/low"})
    assert mix == (MixSource("real", 1.0), MixSource("low", 0.3, "/data/low"), MixSource("base", 0.5, "runs/base"))
    for bad, message in (("real", "NAME=WEIGHT"), ("real=x", "not a number"), ("real=0", "> 0"),
                         ("real=1,real=2", "twice"), ("", "no source")):
        with pytest.raises(ConfigError, match=message):
            parse_mix(bad)
    with pytest.raises(ConfigError, match="does not use"):
        parse_mix("real=1", {"low": "/x"})


def test_worker_batches_cross_the_pipe_as_arrays_and_come_back_as_the_same_tensors():
    small = torch.arange(128 * 64, dtype=torch.uint8).view(128, 1, 8, 8)
    large = torch.zeros(PIPE_MAX_BYTES + 1, dtype=torch.uint8)
    sent = _for_pipe({"images": small, "large": large, "keys": ["a"], "step": 3})
    assert isinstance(sent["images"], np.ndarray) and sent["large"] is large  # large: shared memory, no copy
    back = _from_pipe(sent)
    assert torch.equal(back["images"], small) and back["keys"] == ["a"] and back["step"] == 3
