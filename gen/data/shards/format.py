"""WebDataset shards: planned up front, written atomically, recorded, described by a timm manifest.

Layout of a shard set folder (a local path or any fsspec URL: ``file://``, ``s3://``, ``gs://``;
see gen/data/storage.py for how each is published atomically):

    OUT/_job.json                    the job's config and plan (a re-run must match it)
    OUT/{job}-{index:06d}.tar        one shard per ShardSpec, written by one TarWriter
    OUT/_records/{job}-{index:06d}.json   a ShardRecord, written after the shard is in place
    OUT/_info.json                   timm's WebDataset manifest (splits -> name, num_samples,
                                     filenames, shard_lengths, and our shard_sha256) plus
                                     num_classes / class_names and what the job planned

A shard is written to a temporary name, fsynced and renamed (an object store: uploaded in one
PUT); only then is its record written. A shard without a record does not exist for readers and is
redone on the next run; a record is the proof that the shard with that sha256 is complete. Each
sample is

    __key__  {job}-{global_index:09d}
    png      uint8 image (L for one channel, RGB for three)
    cls      the class label as ASCII digits
    json     provenance: sampler settings, sigma/t, seed, model hash, scores (per job kind)

Readers (:func:`shard_pipeline`, :func:`iter_samples`, :func:`read_shard`, the training stream and
``shards verify``) share one validating reader (gen/data/shards/read.py): every manifest field is
checked (counts non-negative integers summing to ``num_samples``, one per shard, no shard listed
twice, file names inside the folder); a shard is read whole and checked before any of its samples
is yielded: tar structure (gen/data/shards/tar.py), member names (absolute paths, ``..`` and links
are refused), the end-of-archive marker, images (decoded under a pixel cap,
gen/core/images.py), labels (decimal integers below ``num_classes``), the sample count against the
manifest and, when asked (``verify=True``), the sha256 against the manifest/record. A bad shard raises a
ShardError naming the shard and the byte offset, or with ``skip_bad_shards=True`` is skipped
whole, logged and counted in a :class:`ShardReadStats`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from tailforge.gen.core.errors import ShardError
from tailforge.gen.core.images import encode_png

INFO_FILE = "_info.json"


JOB_FILE = "_job.json"


RECORDS_DIR = "_records"


IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")  # the image member of a sample, first found wins


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """The plan for one shard: which samples it holds and how they are made."""

    job: str  # job name, the prefix of shard and sample keys
    index: int  # shard number within the job
    start: int  # global index of the shard's first sample
    count: int  # number of samples in the shard
    seed: int  # job seed; sample i's noise comes from (seed, start + i)

    @property
    def name(self) -> str:
        return f"{self.job}-{self.index:06d}.tar"

    @property
    def indices(self) -> range:
        return range(self.start, self.start + self.count)


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """The outcome of writing one shard: proof that it is complete, and what it cost."""

    name: str  # file name of the shard inside the shard set
    index: int  # shard number
    start: int  # global index of its first sample
    count: int  # samples written
    sha256: str  # digest of the whole tar file
    size_bytes: int  # tar file size
    seconds: float  # wall time to produce and write it
    model_evals: int  # denoiser evaluations (batch rows x calls) spent on it
    worker: str  # which actor/process wrote it
    # replicas of the training set the memorization gate dropped and refilled (gen/jobs/gate.py);
    # None: the job has no gate
    replicas_dropped: int | None = None


def sample_key(job: str, index: int) -> str:
    return f"{job}-{index:09d}"


def plan_shards(job: str, num_samples: int, shard_size: int, seed: int) -> list[ShardSpec]:
    """Split `num_samples` into shards of `shard_size` (the last may be smaller)."""
    if num_samples < 1:
        raise ShardError(f"number of samples must be >= 1, got {num_samples}")
    if shard_size < 1:
        raise ShardError(f"shard size must be >= 1, got {shard_size}")
    # No '.': webdataset (and timm) split a member name into key and extension at the first dot,
    # so a dotted job name would cut every sample key short.
    if not job or not all(c.isalnum() or c in "_-" for c in job):
        raise ShardError(f"job name {job!r} must be non-empty and use only letters, digits, '_' and '-'")
    return [ShardSpec(job=job, index=i, start=start, count=min(shard_size, num_samples - start), seed=seed)
            for i, start in enumerate(range(0, num_samples, shard_size))]


def encode_sample(key: str, image_hwc: np.ndarray, label: int, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "__key__": key,
        "png": encode_png(image_hwc),
        "cls": str(int(label)).encode("ascii"),
        "json": json.dumps(meta, sort_keys=True, allow_nan=False).encode("utf-8"),
    }
