"""Hostile-input table, readers: crafted shard sets (tar members, pax headers, manifests, labels,
PNGs) through every reader of shards, and crafted result files through `eval report`.

A shard case builds one shard set and runs it through the three readers, which share one
validating reader (gen/data/shards/read.py): `tailforge shards verify DIR` (a bad set is not ok,
exit status 1, or for a bad manifest a one-line error, exit status 2), `tailforge eval accuracy
--dataset shards:DIR` (the one-line error of :func:`hostile.check_outcome`) and the training
stream (train/streams.py: the same one-line ShardError; a few cases also through `tailforge
train classifier --mix real=1,x=1 --shards x=DIR`). A report case writes result files and runs
`tailforge eval report`. Every case checks that nothing outside the command's own output changed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hostile import Hostile, assert_untouched, check_outcome, run_command, snapshot

from tailforge.eval.results import tag_result
from tailforge.gen.core.errors import ShardError
from tailforge.gen.core.images import encode_png
from tailforge.gen.data.shards.read import iter_samples
from tailforge.gen.models.classifiers import create_classifier, save_classifier
from tailforge.train.streams import MixedStream, ShardSet

SHAPE = (1, 8, 8)
NUM_CLASSES = 10
PER_SHARD = 4

# ------------------------------------------------------------------------------------------------
# crafting shard sets


def image(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (8, 8, 1), dtype=np.uint8)


def members(start: int, count: int = PER_SHARD, **override: dict[str, bytes | None]) -> list[tuple[str, bytes]]:
    """(member name, bytes) of `count` good samples from global index `start`; ``override["s2"]``
    replaces (or with None drops) members of the shard's third sample, e.g. {"cls": b"three"}."""
    out = []
    for i in range(start, start + count):
        sample = {"png": encode_png(image(i)), "cls": str(i % NUM_CLASSES).encode(), "json": b"{}"}
        sample.update(override.get(f"s{i - start}", {}))
        out += [(f"x-{i:09d}.{ext}", data) for ext, data in sample.items() if data is not None]
    return out


def tar_bytes(entries: list[tuple[str, bytes]], format: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_set(root: Path, shards: list[bytes], edit: Callable[[dict], None] | None = None) -> Path:
    """A shard set of these tar files with a timm manifest (counts and sha256 from the files as
    parsed by tarfile, as an honest writer would give them), then `edit` applied to the manifest."""
    root.mkdir(parents=True)
    names, lengths = [], []
    for index, data in enumerate(shards):
        name = f"x-{index:06d}.tar"
        (root / name).write_bytes(data)
        names.append(name)
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                lengths.append(len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()}))
        except tarfile.TarError:
            lengths.append(PER_SHARD)
    info = {"num_classes": NUM_CLASSES, "class_names": [str(c) for c in range(NUM_CLASSES)],
            "splits": {"train": {"name": "train", "num_samples": sum(lengths), "filenames": names,
                                 "shard_lengths": lengths,
                                 "shard_sha256": [hashlib.sha256(d).hexdigest() for d in shards]}}}
    if edit:
        edit(info)
    (root / "_info.json").write_text(json.dumps(info))
    return root


def good_set(root: Path, edit: Callable[[dict], None] | None = None) -> Path:
    return write_set(root, [tar_bytes(members(0)), tar_bytes(members(PER_SHARD))], edit)


def one_bad_shard(root: Path, **override: dict[str, bytes | None]) -> Path:
    return write_set(root, [tar_bytes(members(0)), tar_bytes(members(PER_SHARD, **override))])


def set_field(key: str, value) -> Callable[[dict], None]:
    """A manifest edit: the train split's `key` set to `value`."""
    return lambda info: info["splits"]["train"].__setitem__(key, value)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, idat: bytes, depth: int = 8) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def zlib_bomb(rows: bytes, extra: int) -> bytes:
    """`rows` then `extra` zero bytes, deflated (a 64 MiB tail deflates to about 64 KiB)."""
    deflate = zlib.compressobj(9)
    out = [deflate.compress(rows)]
    block = bytes(1 << 20)
    out += [deflate.compress(block) for _ in range(extra >> 20)]
    return b"".join(out) + deflate.flush()


def sixteen_bit_png(pixels: np.ndarray) -> bytes:
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    return png_bytes(pixels.shape[1], pixels.shape[0], zlib.compress(rows), depth=16)


SIXTEEN_BIT = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000 + 7)  # up to 63007: > 255 almost everywhere


def long_name_shard(patch: Callable[[bytes], bytes]) -> bytes:
    """A pax-format shard whose first sample's members have names over 100 characters (so each
    has a pax header with a "path" record), with `patch` applied to the whole file."""
    folder = "d" * 110
    entries = [(f"{folder}/{n}" if i < 3 else n, d) for i, (n, d) in enumerate(members(PER_SHARD))]
    return patch(tar_bytes(entries, tarfile.PAX_FORMAT))


def pax_length(new: bytes) -> Callable[[bytes], bytes]:
    """Replace the length of the first pax record ("NNN path=...") by `new` (as many bytes)."""
    def patch(data: bytes) -> bytes:
        at = data.index(b" path=")
        start = data.rindex(b"\0", 0, at) + 1
        assert len(new) == at - start
        return data[:start] + new + data[at:]

    return patch


def pax_size_overrides_header(data: bytes) -> bytes:
    """Every member with a pax "size" record gets 0 in its ustar size field (checksum fixed): the
    pax record is what tarfile and webdataset read, so it is what every reader must read."""
    out = bytearray(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if "size" in member.pax_headers:
                header = member.offset_data - 512
                out[header + 124:header + 136] = b"00000000000\0"
                out[header + 148:header + 156] = b" " * 8
                out[header + 148:header + 156] = f"{sum(out[header:header + 512]):06o}\0 ".encode()
    return bytes(out)


def pax_sized_shard(root: Path) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members(PER_SHARD):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = {"size": str(len(data))}
            tar.addfile(info, io.BytesIO(data))
    return write_set(root, [tar_bytes(members(0)), pax_size_overrides_header(buf.getvalue())])


def link_shard(root: Path) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("x-000000004.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        for name, data in members(PER_SHARD)[1:]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return write_set(root, [tar_bytes(members(0)), buf.getvalue()])


def duplicate_key_shard(root: Path) -> Path:
    entries = members(PER_SHARD)
    return write_set(root, [tar_bytes(members(0)), tar_bytes(entries + entries[:3])])


def truncated_shard(root: Path) -> Path:
    root = good_set(root)
    shard = root / "x-000001.tar"
    shard.write_bytes(shard.read_bytes()[:2500])
    return root


# ------------------------------------------------------------------------------------------------
# the shard cases: (row, how its set is made)

SHARD_CASES: dict[str, tuple[Hostile, Callable[[Path], Path]]] = {case.name: (case, build) for case, build in [
    (Hostile("pax record of length 0", "hang", "error", r"x-000001.tar: malformed pax extended header at byte offset 0"),
     lambda root: write_set(root, [tar_bytes(members(0)), long_name_shard(pax_length(b"000"))])),
    (Hostile("pax record length not a number", "traceback", "error", r"x-000001.tar: malformed pax extended header"),
     lambda root: write_set(root, [tar_bytes(members(0)), long_name_shard(pax_length(b"1x1"))])),
    (Hostile("pax size record disagrees with the header", "silent-wrong-data", "accept"), pax_sized_shard),
    (Hostile("zlib bomb in a small PNG's IDAT", "hang", "accept"),
     lambda root: one_bad_shard(root, s1={"png": png_bytes(8, 8, zlib_bomb(b"\0" * 72, 64 << 20))})),
    (Hostile("decompression bomb PNG (IHDR 100000 x 100000)", "traceback", "error",
             r"x-000001.tar: sample 'x-000000005' at byte offset \d+: .*100000 x 100000 pixels exceeds the cap"),
     lambda root: one_bad_shard(root, s1={"png": png_bytes(100000, 100000, zlib.compress(b"\0" * 1000))})),
    (Hostile("decompression bomb JPEG-free PIL path (palette PNG 5000 x 5000)", "traceback", "error",
             r"x-000001.tar: sample 'x-000000006' .*5000 x 5000 pixels exceeds the cap"),
     lambda root: one_bad_shard(root, s2={"png": b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
         ">IIBBBBB", 5000, 5000, 8, 3, 0, 0, 0)) + chunk(b"PLTE", bytes(3)) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
         + chunk(b"IEND", b"")})),
    (Hostile("16-bit grayscale PNG", "silent-wrong-data", "accept"),
     lambda root: one_bad_shard(root, s0={"png": sixteen_bit_png(SIXTEEN_BIT)})),
    (Hostile("a non-PNG file named .png", "traceback", "error", r"sample 'x-000000007' .*cannot decode its png"),
     lambda root: one_bad_shard(root, s3={"png": b"#!/bin/sh\necho not an image\n"})),
    (Hostile("label -1", "silent-wrong-data", "error", r"sample 'x-000000005' .*label b'-1' is not an integer"),
     lambda root: one_bad_shard(root, s1={"cls": b"-1"})),
    (Hostile("label 3_0", "silent-wrong-data", "error", r"sample 'x-000000005' .*label b'3_0' is not an integer"),
     lambda root: one_bad_shard(root, s1={"cls": b"3_0"})),
    (Hostile("label with a leading space", "silent-wrong-data", "error", r"label b' 3' is not an integer"),
     lambda root: one_bad_shard(root, s1={"cls": b" 3"})),
    (Hostile("label three", "traceback", "error", r"x-000001.tar: sample 'x-000000005' at byte offset \d+: "
                                                  r"label b'three' is not an integer"),
     lambda root: one_bad_shard(root, s1={"cls": b"three"})),
    (Hostile("label 99 of 10 classes", "silent-wrong-data", "error", r"label 99 is not below num_classes 10"),
     lambda root: one_bad_shard(root, s1={"cls": b"99"})),
    (Hostile("label of 5000 digits", "traceback", "error", r"label b'9999.*' is not an integer"),
     lambda root: one_bad_shard(root, s1={"cls": b"9" * 5000})),
    (Hostile("sample without a label", "traceback", "error", r"sample 'x-000000005' .*lacks \['cls'\]"),
     lambda root: one_bad_shard(root, s1={"cls": None})),
    (Hostile("sample json not valid", "traceback", "error", r"sample 'x-000000005' .*its json is not valid"),
     lambda root: one_bad_shard(root, s1={"json": b"{" * 100000})),
    (Hostile("one key twice in a shard", "silent-wrong-data", "error", r"x-000001.tar: key 'x-000000004' appears twice"),
     duplicate_key_shard),
    (Hostile("truncated shard", "traceback", "error", r"x-000001.tar: unreadable tar data at byte offset 2500"),
     truncated_shard),
    (Hostile("tar member that is a link to /etc/passwd", "disclosure", "error",
             r"x-000001.tar: member 'x-000000004.png' at byte offset 0 is a link"), link_shard),
    (Hostile("tar member named ../x.png", "disclosure", "error", r"member '../x-000000004.png' .* contains '..'"),
     lambda root: write_set(root, [tar_bytes(members(0)), tar_bytes(
         [(("../" + n) if i == 0 else n, d) for i, (n, d) in enumerate(members(PER_SHARD))])])),
    (Hostile("negative shard_lengths", "silent-wrong-data", "error",
             r"_info.json: split 'train': 'shard_lengths' of 'x-000001.tar' is -4; expected an integer >= 0"),
     lambda root: good_set(root, set_field("shard_lengths", [12, -4]))),
    (Hostile("non-integer shard_lengths", "traceback", "error", r"'shard_lengths' of 'x-000000.tar' is 4.5"),
     lambda root: good_set(root, set_field("shard_lengths", [4.5, 3.5]))),
    (Hostile("shard_lengths as strings", "traceback", "error", r"'shard_lengths' of 'x-000000.tar' is '4'"),
     lambda root: good_set(root, set_field("shard_lengths", ["4", "4"]))),
    (Hostile("shard_lengths shorter than filenames", "traceback", "error",
             r"'shard_lengths' must list one entry per file name \(2\)"),
     lambda root: good_set(root, set_field("shard_lengths", [8]))),
    (Hostile("num_samples not the sum of shard_lengths", "silent-wrong-data", "error",
             r"'num_samples' is 9 but 'shard_lengths' sum to 8"),
     lambda root: good_set(root, set_field("num_samples", 9))),
    (Hostile("manifest lists one shard twice", "silent-wrong-data", "error", r"shard 'x-000000.tar' is listed twice"),
     lambda root: good_set(root, set_field("filenames", ["x-000000.tar", "x-000000.tar"]))),
    (Hostile("manifest names /etc/passwd", "disclosure", "error",
             r"names a shard outside the folder: 'filenames' entry 1 is '/etc/passwd'"),
     lambda root: good_set(root, set_field("filenames", ["x-000000.tar", "/etc/passwd"]))),
    (Hostile("manifest names ../neighbour.tar", "disclosure", "error",
             r"names a shard outside the folder: 'filenames' entry 0 is '../neighbour.tar'"),
     lambda root: good_set(root, set_field("filenames", ["../neighbour.tar", "x-000001.tar"]))),
    (Hostile("manifest file name not a string", "traceback", "error", r"'filenames' entry 1 is 7; expected a file name"),
     lambda root: good_set(root, set_field("filenames", ["x-000000.tar", 7]))),
    (Hostile("manifest split without num_samples", "traceback", "error", r"split 'train' lacks \['num_samples'\]"),
     lambda root: good_set(root, lambda info: info["splits"]["train"].pop("num_samples"))),
    (Hostile("manifest num_classes not a number", "traceback", "error", r"'num_classes' is 'ten'"),
     lambda root: good_set(root, lambda info: info.__setitem__("num_classes", "ten"))),
    (Hostile("manifest sha256 not a digest", "traceback", "error", r"'shard_sha256' of 'x-000001.tar' is 'abc'"),
     lambda root: good_set(root, lambda info: info["splits"]["train"]["shard_sha256"].__setitem__(1, "abc"))),
    (Hostile("manifest not JSON", "traceback", "error", r"_info.json"),
     lambda root: (good_set(root), (root / "_info.json").write_text('{"splits": {'))[0]),
]}

# ------------------------------------------------------------------------------------------------
# crafting result folders for `eval report`

SECRET = b"root:x:0:0:the neighbour's secret\n"


def png_file(seed: int) -> bytes:
    return encode_png(image(seed))


def memorization_result(**fields) -> dict:
    body = {"config": {"shards": "set", "dataset": "digits"}, "num_generated": 4, "num_train": 10,
            "memorization_ratio": 0.25, "distinct_train_images_replicated": 1, "median_ratio_d1_d2": 0.5,
            "ratio_histogram": {"edges": [0.0, 0.5, 1.0], "counts": [1, 3]}, "nearest_pairs_png": "nearest_pairs.png"}
    return tag_result("memorization", {**body, **fields})


def write_result(folder: Path, result: dict | str, name: str = "memorization.json", png: bytes | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(result if isinstance(result, str) else json.dumps(result))
    if png is not None:
        (folder / "nearest_pairs.png").write_bytes(png)


def outside_files(root: Path) -> None:
    """What a hostile result tries to pull in: a secret file and a PNG next to the results folder."""
    (root / "secret.txt").write_bytes(SECRET)
    (root / "outside.png").write_bytes(png_file(99))


def names_path(target: str) -> Callable[[Path], None]:
    return lambda root: (outside_files(root), write_result(root / "results" / "mem", memorization_result(
        nearest_pairs_png=target.format(root=root))))


def symlinked_png(root: Path) -> None:
    outside_files(root)
    write_result(root / "results" / "mem", memorization_result())
    (root / "results" / "mem" / "nearest_pairs.png").symlink_to(root / "outside.png")


def symlinked_result(root: Path) -> None:
    outside_files(root)
    (root / "elsewhere").mkdir()
    write_result(root / "elsewhere", memorization_result(config={"shards": SECRET.decode(), "dataset": "digits"}))
    (root / "results").mkdir()
    (root / "results" / "memorization.json").symlink_to(root / "elsewhere" / "memorization.json")


def named(shards: str) -> Callable[[Path], None]:
    return lambda root: write_result(root / "results" / "mem", memorization_result(
        config={"shards": shards, "dataset": "digits"}), png=png_file(1))


REPORT_CASES: dict[str, tuple[Hostile, Callable[[Path], None], Callable[[dict, str], None]]] = {}


def report_case(case: Hostile, build: Callable[[Path], None], check: Callable[[dict, str], None]) -> None:
    REPORT_CASES[case.name] = (case, build, check)


def not_embedded(what: str) -> Callable[[dict, str], None]:
    def check(report: dict, page: str) -> None:
        notes = report["sections"]["memorization"]["notes"]
        assert any(f"not embedded: {what}" in n for n in notes), notes
        assert base64.b64encode(SECRET).decode() not in page and base64.b64encode(png_file(99)).decode() not in page
        assert SECRET.decode().strip() not in page

    return check


def not_recognised(reason: str) -> Callable[[dict, str], None]:
    def check(report: dict, page: str) -> None:
        listed = report["inputs"]["not_recognised"]["first"]
        assert any(re.search(reason, u["reason"]) for u in listed), listed
        assert SECRET.decode().strip() not in page

    return check


def drawn(report: dict, page: str) -> None:
    assert report["inputs"]["not_recognised"]["count"] == 0, report["inputs"]["not_recognised"]
    assert len(report["sections"]["memorization"]["figures"]) == 2  # the d1/d2 plot and the embedded pairs

report_case(Hostile("result names /etc/passwd as its image", "disclosure", "accept"), names_path("/etc/passwd"),
            not_embedded("not a file name inside"))
report_case(Hostile("result names an absolute path to a secret", "disclosure", "accept"),
            names_path("{root}/secret.txt"), not_embedded("not a file name inside"))
report_case(Hostile("result names ../x.png", "disclosure", "accept"), names_path("../../outside.png"),
            not_embedded("not a file name inside"))
report_case(Hostile("result's image is a symlink leaving the folder", "disclosure", "accept"), symlinked_png,
            not_embedded("it leads outside"))
report_case(Hostile("result JSON is a symlink leaving the folder", "disclosure", "accept"), symlinked_result,
            not_recognised("a symlink leading outside"))
report_case(Hostile("a non-PNG file named .png in a result", "silent-wrong-data", "accept"),
            lambda root: write_result(root / "results" / "mem", memorization_result(), png=SECRET),
            not_embedded("not a PNG"))
report_case(Hostile("$\\frac{1}{0}$ as a set name", "silent-wrong-data", "accept"), named("$\\frac{1}{0}$"), drawn)
report_case(Hostile("unparsable mathtext $x^$ as a set name", "traceback", "accept"), named("a $x^$ b"), drawn)
report_case(Hostile("malformed result JSON", "traceback", "accept"),
            lambda root: write_result(root / "results", '{"kind": "memorization", "version": '),
            not_recognised("not readable JSON"))
report_case(Hostile("result JSON nested 100000 deep", "traceback", "accept"),
            lambda root: write_result(root / "results", "[" * 100000 + "]" * 100000), not_recognised("RecursionError"))
report_case(Hostile("NaN in a result JSON", "traceback", "accept"),
            lambda root: write_result(root / "results", json.dumps(memorization_result(memorization_ratio=float("nan")))),
            not_recognised("NaN is not JSON"))
report_case(Hostile("result of the right kind with fields of the wrong type", "traceback", "accept"),
            lambda root: write_result(root / "results", memorization_result(ratio_histogram="many", num_train=None)),
            not_recognised("malformed memorization result"))
report_case(Hostile("result image name not a string", "traceback", "accept"),
            lambda root: write_result(root / "results" / "mem", memorization_result(nearest_pairs_png=["a.png"])),
            not_embedded("not a file name inside"))

# ------------------------------------------------------------------------------------------------
# follow mode (training while a job writes): the records are read instead of the manifest

FOLLOW_CASES: dict[str, tuple[Hostile, dict]] = {case.name: (case, record) for case, record in [
    (Hostile("followed record names ../neighbour.tar", "disclosure", "error",
             r"_records/x-000001.json: not a shard record .*'\.\./neighbour.tar'"), {"name": "../neighbour.tar"}),
    (Hostile("followed record with a negative count", "silent-wrong-data", "error",
             r"_records/x-000001.json: not a shard record .*'count': -4"), {"count": -4}),
]}

LABEL_BEYOND_CLASSIFIER = Hostile("labels beyond the classifier's classes", "silent-wrong-data", "error",
                                  r"--dataset shards:.*: label 15 is not below the classifier's num_classes 10")

CASES = ([case for case, _ in SHARD_CASES.values()] + [case for case, _, _ in REPORT_CASES.values()]
         + [case for case, _ in FOLLOW_CASES.values()] + [LABEL_BEYOND_CLASSIFIER])


# ------------------------------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("clf")
    save_classifier(folder, create_classifier("tinycnn", num_classes=NUM_CLASSES, in_chans=1),
                    {"model": "tinycnn", "num_classes": NUM_CLASSES, "in_chans": 1})
    return str(folder)


def hostile_set(tmp_path: Path, name: str) -> tuple[Hostile, Path]:
    """The case's shard set under tmp_path/set, next to files a manifest could point at."""
    case, build = SHARD_CASES[name]
    (tmp_path / "neighbour.tar").write_bytes(tar_bytes(members(100)))
    (tmp_path / "secret.txt").write_bytes(SECRET)
    return case, build(tmp_path / "set")


def check_verify(case: Hostile, outcome) -> None:
    """`shards verify`: a whole set is ok (0); a bad shard makes the set not ok (1) with the problem
    named on stderr's last line; a bad manifest is a one-line error (2)."""
    if case.expect == "accept" or outcome.code == 2:
        check_outcome(case, outcome)
        return
    assert outcome.code == 1 and json.loads(outcome.stdout)["ok"] is False, (outcome.code, outcome.stderr[-500:])
    assert "Traceback" not in outcome.stderr
    assert re.search(case.message, outcome.stderr.strip().splitlines()[-1]), outcome.stderr[-500:]


#: cases about a member the training stream does not read: a sample's json (provenance) is not training data
STREAM_DOES_NOT_READ = {"sample json not valid"}


@pytest.mark.parametrize("name", SHARD_CASES)
def test_shard_case_through_verify_accuracy_and_the_stream(tmp_path, classifier, name):
    case, root = hostile_set(tmp_path, name)
    before = snapshot(tmp_path)
    check_verify(case, run_command(["shards", "verify", str(root)]))
    accuracy = run_command(["eval", "accuracy", "--classifier", classifier, "--dataset", f"shards:{root}",
                            "--split", "train"])
    check_outcome(case, accuracy)
    stream = MixedStream((ShardSet("x", str(root), 1.0),), batch_size=PER_SHARD, image_shape=SHAPE,
                         num_classes=NUM_CLASSES, resample=False, shuffle_buffer=1)
    if case.expect == "accept":
        assert json.loads(accuracy.stdout)["n"] == 2 * PER_SHARD
    if case.expect == "accept" or name in STREAM_DOES_NOT_READ:
        assert sum(len(b["labels"]) for b in stream.batches()) == 2 * PER_SHARD
    else:
        with pytest.raises(ShardError) as raised:
            list(stream.batches())
        assert "\n" not in str(raised.value) and re.search(case.message, str(raised.value)), str(raised.value)
    assert_untouched(before, snapshot(tmp_path), case)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    _, root = hostile_set(tmp_path, "16-bit grayscale PNG")
    first = next(s for s in iter_samples(root) if s["key"] == "x-000000004")
    assert np.array_equal(first["image"][0], (SIXTEEN_BIT >> 8).astype(np.uint8))


def test_pax_size_record_is_what_every_reader_reads(tmp_path):
    _, root = hostile_set(tmp_path, "pax size record disagrees with the header")
    images = {s["key"]: s["image"] for s in iter_samples(root)}
    assert all(np.array_equal(images[f"x-{i:09d}"], image(i).transpose(2, 0, 1)) for i in range(2 * PER_SHARD))


@pytest.mark.parametrize("name", ["label three", "negative shard_lengths"])
def test_training_command_stops_with_one_line(tmp_path, name):
    case, root = hostile_set(tmp_path, name)
    if name == "label three":  # every label bad: resampled epochs read some shard, whichever it is
        for shard in sorted(root.glob("*.tar")):
            start = int(shard.stem.split("-")[1]) * PER_SHARD
            shard.write_bytes(tar_bytes(members(start, **{f"s{i}": {"cls": b"three"} for i in range(PER_SHARD)})))
        info = json.loads((root / "_info.json").read_text())
        info["splits"]["train"].pop("shard_sha256")
        (root / "_info.json").write_text(json.dumps(info))
        case = Hostile(case.name, case.klass, "error", r"x-00000[01].tar: sample .* label b'three' is not an integer")
    before = snapshot(tmp_path)
    outcome = run_command(["train", "classifier", "--dataset", "digits?n=40", "--mix", "real=1,x=1", "--shards",
                           f"x={root}", "--out", str(tmp_path / "out"), "--epochs", "1", "--quiet", "--device", "cpu"])
    check_outcome(case, outcome)
    after = snapshot(tmp_path, exclude=[tmp_path / "out"])
    assert_untouched({k: v for k, v in before.items() if not k.startswith("out/")}, after, case)


@pytest.mark.parametrize("name", REPORT_CASES)
def test_report_case(tmp_path, name):
    case, build, check = REPORT_CASES[name]
    build(tmp_path)
    before = snapshot(tmp_path)
    outcome = run_command(["eval", "report", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "report")])
    check_outcome(case, outcome)
    assert_untouched(before, snapshot(tmp_path, exclude=[tmp_path / "report"]), case)
    check(json.loads((tmp_path / "report" / "report.json").read_text()),
          (tmp_path / "report" / "report.html").read_text())


@pytest.mark.parametrize("name", FOLLOW_CASES)
def test_followed_records_are_checked_like_a_manifest(tmp_path, name):
    case, override = FOLLOW_CASES[name]
    root = good_set(tmp_path / "set")
    (tmp_path / "neighbour.tar").write_bytes(tar_bytes(members(100)))
    (root / "_records").mkdir()
    for index in range(2):
        shard = f"x-{index:06d}.tar"
        record = {"name": shard, "index": index, "start": index * PER_SHARD, "count": PER_SHARD,
                  "sha256": hashlib.sha256((root / shard).read_bytes()).hexdigest()}
        (root / "_records" / f"{Path(shard).stem}.json").write_text(json.dumps({**record, **(override if index else {})}))
    before = snapshot(tmp_path)
    stream = MixedStream((ShardSet("x", str(root), 1.0, follow=True),), batch_size=PER_SHARD, image_shape=SHAPE,
                         num_classes=NUM_CLASSES, epoch_samples=2 * PER_SHARD, follow_poll=0.01, follow_timeout=1)
    with pytest.raises(ShardError) as raised:
        list(stream.batches())
    assert "\n" not in str(raised.value) and re.search(case.message, str(raised.value)), str(raised.value)
    assert_untouched(before, snapshot(tmp_path), case)


def test_labels_beyond_the_classifier_are_refused_by_eval_accuracy(tmp_path, classifier):
    """A 20-class set is whole (verify: ok), but a 10-class classifier would count its class 15 as
    wrong answers: `eval accuracy` refuses it, naming the label."""
    root = write_set(tmp_path / "set", [tar_bytes(members(0, s1={"cls": b"15"}))],
                     lambda info: info.update(num_classes=20, class_names=[str(c) for c in range(20)]))
    before = snapshot(tmp_path)
    assert run_command(["shards", "verify", str(root)]).code == 0
    check_outcome(LABEL_BEYOND_CLASSIFIER, run_command(["eval", "accuracy", "--classifier", classifier, "--dataset",
                                                        f"shards:{root}", "--split", "train"]))
    assert_untouched(before, snapshot(tmp_path), LABEL_BEYOND_CLASSIFIER)
