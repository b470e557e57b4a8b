"""Shard-set folders at any fsspec URL: a local path, ``file://``, ``s3://``, ``gs://``, ...

Every write is published atomically, so a reader or a re-run never sees a partial object:

* local file systems: write a temporary file in the same folder, fsync it, ``os.replace`` it over
  the final name, fsync the folder (a rename within one file system is atomic);
* object stores (s3, gcs, ...): write a local temporary file, then upload it with one
  ``put_file``. An object store publishes an object only when its upload completes (a single PUT,
  or the final CompleteMultipartUpload of a multipart upload), so the object is either absent or
  whole. A crashed upload leaves at most an invisible incomplete multipart upload; a bucket
  lifecycle rule (AbortIncompleteMultipartUpload) removes those.

Credentials and endpoints come from the usual places of each fsspec backend (for s3: the AWS
environment variables and config files, ``AWS_ENDPOINT_URL`` for an S3-compatible server, or
fsspec's ``FSSPEC_S3_<KWARG>`` variables), so the same URL works on a laptop and on every node of
a cluster. Object-store backends are optional installs (``pip install -e ".[cloud]"`` adds s3fs and
gcsfs); an unknown or uninstalled protocol is a one-line error naming the URL.

fsspec is used instead of hand-written clients because it is the common layer that webdataset,
timm and Ray Data already speak; this module only adds the atomic publish and one-line errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tailforge.gen.core.errors import StorageError


def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations (``file://`` included); plain paths are False."""
    return isinstance(location, str) and "://" in location


class Storage:
    """A folder at a URL or local path, with atomic writes and the few reads shard sets need.

    Names passed to the methods are relative to the folder ("x.tar", "_records/x.json").
    """

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)
        try:
            self.fs, path = fsspec.core.url_to_fs(self.location)
        except (ImportError, ValueError) as err:
            raise StorageError(f"cannot open storage {self.location!r}: {err} "
                               "(object stores need their fsspec backend: pip install -e \".[cloud]\")") from None
        self.local = isinstance(self.fs, LocalFileSystem)
        # A plain local path is kept as given (relative paths stay relative), so shard locations of
        # local sets are ordinary file names that timm and webdataset open directly.
        self.root = str(Path(self.location).expanduser()) if not is_url(self.location) else path.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"Storage({self.location!r})"

    # --------------------------------------------------------------------------------------------
    # names and URLs

    def path(self, name: str = "") -> str:
        """The backend path of `name` (what self.fs methods take)."""
        if not name:
            return self.root
        return os.path.join(self.root, name) if self.local else posixpath.join(self.root, name)

    def url(self, name: str = "") -> str:
        """A location for `name` that fsspec, webdataset (local) and users can open: a plain path for
        local folders, ``protocol://path`` otherwise."""
        if self.local:
            return self.path(name)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{self.path(name)}"

    # --------------------------------------------------------------------------------------------
    # reads

    def exists(self, name: str = "") -> bool:
        return self.fs.exists(self.path(name))

    def is_file(self, name: str) -> bool:
        return self.fs.isfile(self.path(name))

    def size(self, name: str) -> int | None:
        """Size in bytes, or None when there is no such object."""
        try:
            return int(self.fs.size(self.path(name)))
        except FileNotFoundError:
            return None

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            raise StorageError(f"not found: {self.url(name)}") from None
        except IsADirectoryError:
            raise StorageError(f"{self.url(name)} is a folder, not a file") from None

    def read_json(self, name: str, what: str = "JSON file") -> Any:
        if not self.is_file(name):
            raise StorageError(f"{what} not found: {self.url(name)}")
        data = self.read_bytes(name)
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StorageError(f"{what} {self.url(name)} is not valid JSON: {err}") from None

    def list(self, folder: str = "", suffix: str = "") -> list[str]:
        """File names (not paths) directly inside `folder` ending with `suffix`, sorted."""
        target = self.path(folder)
        self.fs.invalidate_cache(target)  # object stores: see files other processes wrote
        try:
            entries = self.fs.ls(target, detail=True)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file"]
        return sorted(n for n in names if n.endswith(suffix))

    # --------------------------------------------------------------------------------------------
    # writes (all atomic)

    def makedirs(self, folder: str = "") -> None:
        """Create the folder (a no-op on object stores, which have no folders)."""
        target = self.path(folder)
        if self.local:
            if os.path.exists(target) and not os.path.isdir(target):
                raise StorageError(f"{self.url(folder)} exists and is not a folder")
            os.makedirs(target, exist_ok=True)

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass

    def publish(self, name: str, write: Callable[[BinaryIO], Any]) -> tuple[str, int, Any]:
        """Create object `name` atomically from ``write(f)`` (which writes the bytes to the binary
        file f). Returns (sha256 hex digest, size in bytes, write's return value). On any error
        nothing is published and the temporary file is removed."""
        if self.local:
            folder = os.path.dirname(self.path(name))
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{os.path.basename(name)}.{uuid.uuid4().hex}.tmp")
        else:
            fd, tmp = tempfile.mkstemp(prefix="tailforge-", suffix=".tmp")
            os.close(fd)
        try:
            with open(tmp, "wb") as f:
                result = write(f)
                f.flush()
                os.fsync(f.fileno())
            digest, size = file_digest(tmp)
            if self.local:
                os.replace(tmp, self.path(name))
                _fsync_dir(os.path.dirname(self.path(name)))
            else:
                self.fs.put_file(tmp, self.path(name))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return digest, size, result

    def write_bytes(self, name: str, data: bytes) -> tuple[str, int]:
        digest, size, _ = self.publish(name, lambda f: f.write(data))
        return digest, size

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def stale_temporaries(self, folder: str = "") -> list[str]:
        """Names of temporary files left in `folder` by crashed local writers (object stores leave none)."""
        target = self.path(folder)
        if not self.local or not os.path.isdir(target):
            return []
        return sorted(os.path.join(folder, n) if folder else n for n in os.listdir(target)
                      if n.startswith(".") and n.endswith(".tmp"))


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[str, int]:
    """(sha256 hex digest, size) of a local file."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
