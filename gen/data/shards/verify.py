"""`tailforge shards verify DIR`: check a shard set end to end.

For every shard the manifest lists: the file is read whole and parsed with the same checks every
reader applies (the manifest's fields, tar structure, member names, end-of-archive marker, decodable
images under the pixel cap, labels that are decimal integers below num_classes), its sample
count is compared with the manifest, and its sha256 with the manifest and with its record (the
record's size too). Across the set: every key is unique, a recorded shard holds exactly the keys
``{job}-{index:09d}`` of its planned range, the manifest's totals match the samples found and the
job's plan, and no record is missing from the manifest (which means the job did not finish).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from tailforge.gen.core.errors import ShardError
from tailforge.gen.data.shards.format import INFO_FILE, sample_key
from tailforge.gen.data.shards.read import decode_sample, read_manifest, read_shard_bytes
from tailforge.gen.data.shards.tar import tar_samples
from tailforge.gen.data.shards.write import load_records
from tailforge.gen.data.storage import Storage


def _expected_keys(name: str, start: int, count: int) -> list[str]:
    job = name[:-len(".tar")].rsplit("-", 1)[0]
    return [sample_key(job, i) for i in range(start, start + count)]


def verify_shard_set(root: str | os.PathLike) -> dict[str, Any]:
    """Check the shard set at `root` (a path or URL). Returns a report whose ``problems`` list is
    empty when the set is whole; each problem names the shard (and byte offset where it applies)."""
    storage = Storage(root)
    info = read_manifest(root)
    num_classes = info.get("num_classes")
    records = {r.name: r for r in load_records(root).values()}
    problems: list[str] = []
    warnings: list[str] = []
    owner: dict[str, str] = {}  # key -> shard holding it
    splits: dict[str, dict[str, int]] = {}
    listed: set[str] = set()
    for split_name, split in info["splits"].items():
        names = split["filenames"]
        lengths = split.get("shard_lengths") or [None] * len(names)
        digests = split.get("shard_sha256") or [None] * len(names)
        found = 0
        for name, length, digest in zip(names, lengths, digests):
            listed.add(name)
            url = storage.url(name)
            record = records.get(name)
            try:
                data = read_shard_bytes(url)
                samples = [decode_sample(url, raw, num_classes) for raw in tar_samples(url, data)]
            except ShardError as err:
                problems.append(str(err))
                continue
            found += len(samples)
            actual = hashlib.sha256(data).hexdigest()
            if length is not None and len(samples) != length:
                problems.append(f"shard {url}: holds {len(samples)} samples, the manifest says {length}")
            if digest is not None and actual != digest:
                problems.append(f"shard {url}: sha256 {actual[:16]}... differs from the manifest's {digest[:16]}...")
            if record is None:
                if digest is None:
                    warnings.append(f"shard {url}: no record and no sha256 in the manifest; its bytes cannot be verified")
            else:
                if actual != record.sha256:
                    problems.append(f"shard {url}: sha256 {actual[:16]}... differs from its record's "
                                    f"{record.sha256[:16]}...")
                if len(data) != record.size_bytes:
                    problems.append(f"shard {url}: {len(data)} bytes, its record says {record.size_bytes}")
                keys = [s["key"] for s in samples]
                if keys != _expected_keys(name, record.start, record.count):
                    problems.append(f"shard {url}: keys are not {record.count} consecutive samples from "
                                    f"{record.start} (first {keys[:1]}, {len(keys)} keys)")
            for sample in samples:
                other = owner.setdefault(sample["key"], url)
                if other != url:
                    problems.append(f"key {sample['key']!r} is in both {other} and {url}")
        if found != split["num_samples"]:
            problems.append(f"{storage.url(INFO_FILE)}: split {split_name!r} declares {split['num_samples']} samples, "
                            f"its shards hold {found}")
        splits[split_name] = {"shards": len(names), "samples": found}
    unlisted = sorted(set(records) - listed)
    if unlisted:
        problems.append(f"{len(unlisted)} recorded shard(s) are not in the manifest ({', '.join(unlisted[:3])}"
                        f"{' ...' if len(unlisted) > 3 else ''}): the job did not finish; re-run it to complete the set")
    planned = info.get("planned")
    total = sum(s["samples"] for s in splits.values())
    if isinstance(planned, dict) and planned.get("samples") is not None and total != planned["samples"]:
        problems.append(f"the job planned {planned['samples']} samples, the set holds {total}")
    temporaries = storage.stale_temporaries()
    if temporaries:
        warnings.append(f"{len(temporaries)} temporary file(s) of interrupted writers ({temporaries[0]} ...); "
                        "the next run of the job removes them")
    return {"root": storage.url(), "ok": not problems, "shards": sum(s["shards"] for s in splits.values()),
            "samples": total, "unique_keys": len(owner), "splits": splits, "problems": problems, "warnings": warnings}
