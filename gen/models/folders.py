"""Publishing a model folder so that a crash leaves the previous model or the new one, never a mix.

A model folder (diffusion model, classifier, guidance folder) is usually also the run folder of
the training that made it: ``checkpoints/`` and ``train_log.jsonl`` sit next to the model's own
entries, so the folder cannot be swapped by one rename. Its entries are therefore published as a
*versioned folder with an atomic pointer*:

    OUT/.versions/v-XXXX/    a complete copy of the model's entries, written and fsynced first
    OUT/.versions/current -> v-XXXX     the pointer, replaced in one rename (os.replace of a symlink)
    OUT/unet -> .versions/current/unet  one fixed link per entry, made once

Readers open the entries through the links (diffusers' ``from_pretrained(OUT)`` keeps working)
and tailforge's loaders resolve the version once (:func:`read_published`), so a load that races
a publish also sees one version (and starts over on the new one if its version was removed). After the pointer moved, every version but the new one
and the one it replaced is removed (so a load that resolved the previous version can finish).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, TypeVar

from tailforge.gen.core.files import fsync_dir

T = TypeVar("T")

VERSIONS = ".versions"
CURRENT = "current"


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under `folder`, then every folder, deepest first (a file's name is only
    durable once the folder holding it is)."""
    folders = []
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        folders.append(root)
    for root in reversed(folders):
        fsync_dir(root)


def _replace_with_link(path: Path, target: str) -> None:
    """Make `path` a symlink to `target` in one rename (a real folder there is removed first)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    tmp = path.with_name(f".{path.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def publish_folder(folder: str | os.PathLike, entries: tuple[str, ...], write: Callable[[Path], None]) -> None:
    """Publish `entries` of `folder`: ``write(staging)`` writes them into a new version folder,
    which is fsynced, then made current by one rename of the pointer.

    ``entries[0]`` is the one the folder's loader needs before it reads anything else (the U-Net,
    the classifier weights, guidance.json). A folder written before versions existed holds real
    entries; they become links once, with ``entries[0]`` removed first and linked last, so a
    crash during that one-time change leaves a folder the loader refuses, never one whose parts
    disagree.
    """
    folder = Path(folder)
    versions = folder / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    version = versions / f"v-{secrets.token_hex(6)}"
    version.mkdir()  # with the umask's permissions (mkdtemp's 0700 would hide a shared model)
    pointer = versions / CURRENT
    previous = os.readlink(pointer) if pointer.is_symlink() else None
    published = False
    try:
        write(version)
        fsync_tree(version)
        fsync_dir(versions)
        _replace_with_link(pointer, version.name)
        fsync_dir(versions)
        published = True
    finally:
        if not published:
            shutil.rmtree(version, ignore_errors=True)
    first = folder / entries[0]
    if first.exists() and not first.is_symlink():
        shutil.rmtree(first) if first.is_dir() else first.unlink()
    for name in (*entries[1:], entries[0]):
        path, link = folder / name, f"{VERSIONS}/{CURRENT}/{name}"
        if not (path.is_symlink() and os.readlink(path) == link):
            _replace_with_link(path, link)
    fsync_dir(folder)
    # the previous version stays (a load that resolved it may still be reading), and so does
    # whatever the pointer names now; two exports into one folder at once are not supported
    keep = {CURRENT, version.name, previous, os.readlink(pointer)}
    for old in versions.iterdir():
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def published_version(folder: str | os.PathLike, first_entry: str) -> Path:
    """The folder to read a model's entries from: the current version when `folder` is published
    by :func:`publish_folder` (resolved once, so every entry comes from the same version), else
    `folder` itself (a plain diffusers folder, or a copy made with the links followed)."""
    folder = Path(folder)
    if (folder / first_entry).is_symlink():
        return Path(os.path.realpath(folder / first_entry)).parent
    return folder


def read_published(folder: str | os.PathLike, first_entry: str, read: Callable[[Path], T]) -> T:
    """``read(version)`` of :func:`published_version`; read again from the new version when the
    folder was published anew while it read (its version may have been removed meanwhile)."""
    while True:
        version = published_version(folder, first_entry)
        try:
            return read(version)
        except Exception:
            if published_version(folder, first_entry) == version:
                raise
