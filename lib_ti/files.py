"""Writing files the way the hosts' own files are written: atomically, with the permissions the
umask gives (not mkstemp's 0600), through temp files the hosts never load and that are cleaned up;
and which names a host would load, so a new file never shadows or is shadowed by another."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

# what A1111's embedding db loads (textual_inversion.py load_from_file); `*.preview.*` are card pictures
HOST_EXTS = (".pt", ".bin", ".safetensors", ".png", ".webp", ".jxl", ".avif")
TEMP_SUFFIX = ".ti-tmp"  # no host reads this extension, so a temp file is never half-loaded
STALE_S = 600  # a temp file older than this belongs to a killed run, not to a write in progress

_umask_lock = threading.Lock()


def file_mode() -> int:
    """0666 less the process umask: 0644 under the usual 022, as the hosts' own files get."""
    with _umask_lock:  # reading the umask means setting it; keep other writers out meanwhile
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


class Exists(FileExistsError):
    """The target exists and overwrite was not asked for."""


def atomic_write(jobs: list[tuple[str, Callable[[Any], None]]], overwrite: bool) -> list[str]:
    """Write every (path, write(fileobj)) through a temp file in the target folder, then rename:
    a reader (or the host's reload) sees the old file or the new one, never half of one, and the
    rename bumps the folder's mtime so the host notices."""
    if not overwrite:
        for path, _ in jobs:
            if os.path.exists(path):
                raise Exists(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    temps: list[str] = []
    mode = file_mode()
    try:
        for path, write in jobs:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX,
                                       dir=os.path.dirname(os.path.abspath(path)))
            temps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
        for (path, _), tmp in zip(jobs, temps):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
    return [os.fspath(p) for p, _ in jobs]


def clean_stale_temps(folder: str, max_age_s: float = STALE_S) -> list[str]:
    """Remove temp files a killed run left behind (any depth); a write in progress is younger."""
    removed = []
    if not folder or not os.path.isdir(folder):
        return removed
    now = time.time()
    for root, _dirs, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            stale = n.startswith(".") and n.endswith((TEMP_SUFFIX, ".tmp")) and "." in n[1:-4]
            try:
                if stale and now - os.path.getmtime(p) > max_age_s:
                    os.remove(p)
                    removed.append(p)
            except OSError:
                pass
    return removed


def loadable_stem(filename: str) -> str | None:
    """The name a host loads `filename` under, or None when it does not load it."""
    stem, ext = os.path.splitext(filename)
    if ext.lower() not in HOST_EXTS or stem.lower().endswith(".preview"):
        return None
    return stem


def files_named(folder: str, name: str, recursive: bool = True) -> list[str]:
    """Every file in `folder` (and its subfolders) that a host would load as `name`, compared
    case-insensitively: the hosts keep one embedding per name (and case-insensitive file systems
    exist), so any of them would shadow or be shadowed by a new file."""
    found: list[str] = []
    if not os.path.isdir(folder):
        return found
    want = name.lower()
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        for n in sorted(names):
            stem = loadable_stem(n)
            if stem is not None and stem.lower() == want:
                found.append(os.path.join(root, n))
        if not recursive:
            break
    return found


def same_file(a: str, b: str) -> bool:
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


class Reservations:
    """Names held by queued or running runs, across the tab and the API, from submit to the end."""

    def __init__(self) -> None:
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(folder: str, name: str) -> str:
        return os.path.normcase(os.path.abspath(folder)) + os.sep + name.lower()

    def take(self, folder: str, name: str, owner: str) -> str | None:
        """None when taken now for `owner`; else the owner holding it."""
        k = self.key(folder, name)
        with self._lock:
            if k in self._held and self._held[k] != owner:
                return self._held[k]
            self._held[k] = owner
            return None

    def release(self, folder: str, name: str, owner: str) -> None:
        k = self.key(folder, name)
        with self._lock:
            if self._held.get(k) == owner:
                del self._held[k]


RESERVED = Reservations()
