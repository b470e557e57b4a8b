"""The strict tar parser against hand-crafted pax headers: it never hangs, and it reads what
tarfile (and so webdataset and timm) reads."""

from __future__ import annotations

import io
import tarfile

import pytest

from tailforge.gen.core.errors import ShardError
from tailforge.gen.data.shards.tar import tar_members


def _block(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _archive(*members: bytes) -> bytes:
    return b"".join(members) + b"\0" * 1024


def _record(key: str, value: bytes) -> bytes:
    """One pax record "LEN KEY=VALUE\n", LEN counting the whole record including its own digits."""
    body = f" {key}=".encode() + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def _pax(records: bytes) -> bytes:
    return _header("././@PaxHeader", len(records), tarfile.XHDTYPE) + _block(records)


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("records, what", [
    (b"0 path=a.png\n", "zero length"),
    (b"x path=a.png\n", "non-numeric length"),
    (b"3 path=a.png\n", "length shorter than its own prefix"),
    (b"99 path=a.png\n", "length past the header"),
    (b"13 path-a.png\n", "no '='"),
    (b"13 path=a.pngX", "no newline"),
])
def test_malformed_pax_records_are_errors_not_hangs(records, what):
    data = _archive(_pax(records), _header("a.png", 3), _block(b"abc"))
    with pytest.raises(ShardError, match="malformed pax extended header at byte offset 0"):
        list(tar_members("s.tar", data))


def test_pax_size_overrides_the_header_as_tarfile_reads_it():
    # the ustar header says 0 bytes, the pax record says 5: tarfile reads 5, so must we
    data = _archive(_pax(_record("size", b"5")), _header("a.txt", 0), _block(b"hello"), _header("b.txt", 2), _block(b"ok"))
    ours = [(name, payload) for name, _, payload in tar_members("s.tar", data)]
    assert ours == _tarfile_members(data) == [("a.txt", b"hello"), ("b.txt", b"ok")]


def test_pax_path_and_size_together_name_the_member_at_its_pax_header():
    records = _record("path", b"long.png") + _record("size", b"3")
    data = _archive(_header("pad.txt", 1), _block(b"p"), _pax(records), _header("short", 0), _block(b"png"))
    members = list(tar_members("s.tar", data))
    assert [(n, p) for n, _, p in members] == _tarfile_members(data) == [("pad.txt", b"p"), ("long.png", b"png")]
    assert members[1][1] == 1024  # the pax header's offset, where the member begins


@pytest.mark.parametrize("size", [b"-1", b"five", b""])
def test_a_pax_size_that_is_not_a_byte_count_is_an_error(size):
    data = _archive(_pax(_record("size", size)), _header("a.txt", 0))
    with pytest.raises(ShardError, match="not a decimal byte count"):
        list(tar_members("s.tar", data))
