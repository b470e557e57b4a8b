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

A local folder can also be locked (:meth:`Storage.lock`: ``fcntl.flock`` on ``.lock``, which
names its holder), so two drivers never write one job folder at once. Object stores have no lock:
there, one driver per output prefix is the user's to ensure (docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import os
import posixpath
import re
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tailforge.gen.core.errors import StorageError
from tailforge.gen.core.files import fsync_dir, json_text, parse_json

#: the lock file of a local folder (see Storage.lock)
LOCK_FILE = ".lock"


def temporary_name(name: str) -> str:
    """The temporary a local publish of `name` writes first: ``.NAME.<hex>.tmp`` in the same folder."""
    return f".{os.path.basename(name)}.{uuid.uuid4().hex}.tmp"


def is_temporary_of(filename: str, names: Iterable[str] | None) -> bool:
    """True when `filename` is a publish temporary (:func:`temporary_name`) of one of `names`
    (base names; None: of any name)."""
    match = re.fullmatch(r"\.(.+)\.[0-9a-f]+\.tmp", filename)
    return match is not None and (names is None or match.group(1) in names)


def os_error_message(err: OSError, kept: str = "") -> str:
    """One line for a failed read or write: ``PATH: what went wrong (kept: what was kept)``."""
    what = err.strerror or str(err)
    line = f"{err.filename}: {what}" if err.filename else what
    return f"{line} (kept: {kept})" if kept else line


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

    def digest(self, name: str) -> tuple[str, int] | None:
        """(sha256 hex digest, size) of object `name` read whole, or None when there is none."""
        if self.local:
            try:
                return file_digest(self.path(name))
            except FileNotFoundError:
                return None
        try:
            with self.fs.open(self.path(name), "rb") as f:
                return stream_digest(f)
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
        return parse_json(self.read_bytes(name), f"{what} {self.url(name)}", StorageError)

    def entries(self, folder: str = "") -> list[str]:
        """Names of everything (files and folders) directly inside `folder`, sorted."""
        target = self.path(folder)
        self.fs.invalidate_cache(target)
        try:
            return sorted(posixpath.basename(e.rstrip("/")) for e in self.fs.ls(target, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

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

    def publish(self, name: str, write: Callable[[BinaryIO], Any], *, replace: bool = True) -> tuple[str, int, Any]:
        """Create object `name` atomically from ``write(f)`` (which writes the bytes to the binary
        file f). Returns (sha256 hex digest, size in bytes, write's return value). On any error
        nothing is published and the temporary file is removed; an OSError without a file name
        (a full disk inside ``write``) is given `name`'s location. ``replace=False`` never
        replaces an existing `name` (local: a hard link, which fails if the name exists; object
        stores: an existence check before the upload, not atomic): FileExistsError."""
        if self.local:
            folder = os.path.dirname(self.path(name))
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, temporary_name(name))
        else:
            fd, tmp = tempfile.mkstemp(prefix="tailforge-", suffix=".tmp")
            os.close(fd)
        try:
            with open(tmp, "wb") as f:
                result = write(f)
                f.flush()
                os.fsync(f.fileno())
            digest, size = file_digest(tmp)
            if not replace and not self.local and self.exists(name):
                raise FileExistsError(errno.EEXIST, "exists already", self.url(name))
            if self.local:
                (os.replace if replace else os.link)(tmp, self.path(name))
                fsync_dir(os.path.dirname(self.path(name)))
            else:
                self.fs.put_file(tmp, self.path(name))
        except OSError as err:
            if err.filename is None:
                raise OSError(err.errno, err.strerror or str(err), self.url(name)) from err
            raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return digest, size, result

    def write_bytes(self, name: str, data: bytes, *, replace: bool = True) -> tuple[str, int]:
        digest, size, _ = self.publish(name, lambda f: f.write(data), replace=replace)
        return digest, size

    def write_json(self, name: str, obj: Any, *, replace: bool = True) -> None:
        """Publish `obj` as JSON (NaN and Inf refused: a NonFiniteError naming the file and field)."""
        self.write_bytes(name, json_text(obj, self.url(name)).encode("utf-8"), replace=replace)

    def stale_temporaries(self, folder: str = "", of: Iterable[str] | None = None) -> list[str]:
        """Names of publish temporaries left in `folder` by crashed local writers (object stores
        leave none): those of the base names `of`, or of any name when `of` is None."""
        target = self.path(folder)
        if not self.local or not os.path.isdir(target):
            return []
        names = None if of is None else set(of)
        return sorted(os.path.join(folder, n) if folder else n for n in os.listdir(target) if is_temporary_of(n, names))

    # --------------------------------------------------------------------------------------------
    # the driver's lock

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on a local folder for the block (``fcntl.flock`` on ``.lock``,
        which records the holder's PID, host and start time); a StorageError naming the holder
        when another process holds it. Object stores: no lock (one driver per prefix is the user's
        to ensure). A folder where ``.lock`` cannot be created (read-only storage) is not locked
        either: nothing can write there, and any write the job then needs fails with an OSError."""
        if not self.local:
            yield
            return
        path = self.path(LOCK_FILE)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    yield
                    return
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
                os.close(fd)
                raise StorageError(f"{self.url()} is locked by {holder or 'another driver'}; "
                                   "one driver per output folder (wait for it to finish, or use another --out)") from None
            # the holder before us may have removed the file after we opened it: lock the file that is there
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        try:
            started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            os.ftruncate(fd, 0)
            os.write(fd, f"PID {os.getpid()} on {socket.gethostname()} (started {started})".encode())
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # while still holding it, so a waiter re-checks which file is there
            os.close(fd)


def file_digest(path: str | os.PathLike) -> tuple[str, int]:
    """(sha256 hex digest, size) of a local file."""
    with open(path, "rb") as f:
        return stream_digest(f)


def stream_digest(f: BinaryIO, chunk: int = 1 << 20) -> tuple[str, int]:
    """(sha256 hex digest, size) of what is left to read in the binary file `f`."""
    digest, size = hashlib.sha256(), 0
    while block := f.read(chunk):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size
