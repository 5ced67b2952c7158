"""A dataset's files, on local disk or behind a URI (s3://, gs://, any pyarrow filesystem).

Datasets name their files by key, a path relative to the dataset root (`images/a.jpg`).
On local disk a key is a path under the root. Behind a URI:

- the root is listed once per process (one paginated listing, about one request per 1,000
  files, not one per file), which answers every "is there such a file" of the checks;
- a file is fetched on its first read into this node's cache, `$SEMINAR_CACHE/data`, where
  every worker of the node finds it. It is written under a temporary name and renamed, so
  workers filling the cache at once never read half a file; it is named by its URI, size
  and modification time, so a changed object is fetched again; a read marks it used.
- the cache stays under `SEMINAR_CACHE_MAX_GB` (default 20) by removing the least recently
  used files; each process counts what it added and rescans the folder every 5% of the
  cap, so several workers overshoot it by at most 5% each.

Fetches go through `seminar.storage`'s filesystem: its timeout and pyarrow's retries (the
ones checkpoint uploads get) ride out a stalled S3; a file that is gone fails naming its URI.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow.fs as pafs

from seminar import storage
from seminar.data.base import DatasetError

CACHE_MAX_ENV = "SEMINAR_CACHE_MAX_GB"
DEFAULT_CACHE_MAX_GB = 20.0


def _reason(e: BaseException) -> str:
    return " ".join(str(getattr(e, "strerror", None) or e).split())[:200]


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset: `name` (its path or URI) is what messages show; equal names of
    the same version are the same file (so a decode check can be cached by file)."""

    name: str
    version: tuple  # (size, modification time): a rewritten file is another version
    root: DataRoot = field(compare=False, repr=False)
    key: str = field(compare=False, repr=False)

    @property
    def stem(self) -> str:
        return Path(self.key).stem

    @property
    def suffix(self) -> str:
        return Path(self.key).suffix

    def open(self) -> BinaryIO:
        return self.root.open(self.key)


class DataRoot:
    """The files under a dataset root, local or remote; see the module doc."""

    def __init__(self, root: str):
        self.uri = str(root).rstrip("/") or str(root)
        self.remote = storage.is_uri(self.uri)
        if self.remote:
            self._files, self._dirs = _listing(self.uri)
            self._cache = _cache()
        else:
            self._local = Path(self.uri).expanduser()

    def name(self, key: str) -> str:
        """The path or URI that messages show for `key`."""
        return f"{self.uri}/{key}" if self.remote else str(self._local / key)

    def is_file(self, key: str) -> bool:
        return key in self._files if self.remote else (self._local / key).is_file()

    def is_dir(self, key: str) -> bool:
        return key.strip("/") in self._dirs if self.remote else (self._local / key).is_dir()

    def names(self, folder: str = "") -> list[str]:
        """The names of the files directly in `folder` (a key; "" is the root), sorted."""
        if not self.remote:
            return sorted(p.name for p in (self._local / folder).iterdir() if p.is_file())
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        return sorted(k[len(prefix):] for k in self._files if k.startswith(prefix) and "/" not in k[len(prefix):])

    def file(self, key: str) -> DataFile:
        if self.remote:
            info = self._files.get(key)
            if info is None:
                raise DatasetError(f"{self.name(key)}: not found")
            return DataFile(self.name(key), info, self, key)
        path = self._local / key
        try:
            st = path.stat()
        except OSError as e:
            raise DatasetError(f"{path}: {_reason(e)}") from None
        return DataFile(str(path), (st.st_size, st.st_mtime_ns), self, key)

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def open(self, key: str) -> BinaryIO:
        """The file, opened for reading; a remote one from this node's cache (fetched once)."""
        if not self.remote:
            try:
                return open(self._local / key, "rb")
            except OSError as e:
                raise DatasetError(f"{self._local / key}: {_reason(e)}") from None
        for _ in range(2):  # a file evicted between finding it and opening it is fetched again
            try:
                return open(self.cached(key), "rb")
            except FileNotFoundError:
                continue
        raise DatasetError(f"{self.name(key)}: evicted from the cache as soon as fetched; raise {CACHE_MAX_ENV}")

    def cached(self, key: str) -> Path:
        """The local copy of remote file `key`, fetched into the node's cache if not there."""
        if key not in self._files:
            raise DatasetError(f"{self.name(key)}: not found")
        size, mtime = self._files[key]
        digest = hashlib.sha256(f"{self.uri}/{key}|{size}|{mtime}".encode()).hexdigest()[:40]
        path = self._cache.folder / f"{digest}{Path(key).suffix}"
        try:
            os.utime(path)  # a read is a use: least recently used goes first
            return path
        except FileNotFoundError:
            pass
        try:
            storage.download_file(self.name(key), path)
        except OSError as e:
            raise DatasetError(f"{self.name(key)}: cannot be read ({_reason(e)})") from None
        self._cache.added(size)
        return path


@functools.lru_cache(maxsize=None)
def _listing(uri: str) -> tuple[dict[str, tuple[int, int]], frozenset[str]]:
    """(file key -> (size, mtime in ns), folder keys) under a remote root: one listing per
    process, shared by the datasets (train, val) and the checks built on the same root."""
    fs, base = storage.filesystem(uri)
    try:
        top = fs.get_file_info(base)
        if top.type == pafs.FileType.NotFound:
            bucket = base.split("/", 1)[0]
            if isinstance(fs, pafs.S3FileSystem) and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise DatasetError(f"{uri}: no such bucket '{bucket}'")
            raise DatasetError(f"{uri}: not found (no object under this prefix)")
        if top.type != pafs.FileType.Directory:
            raise DatasetError(f"{uri}: a file, not a folder (a dataset root is a prefix)")
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as e:  # no such bucket, bad credentials, an endpoint that does not answer
        raise DatasetError(f"{uri}: cannot be listed ({_reason(e)})") from None
    files, dirs = {}, set()
    for info in infos:
        key = info.path[len(base):].lstrip("/")
        if info.type == pafs.FileType.File:
            files[key] = (info.size, info.mtime_ns or 0)
        elif info.type == pafs.FileType.Directory:
            dirs.add(key)
    return files, frozenset(dirs)


class _Cache:
    """This node's folder of fetched dataset files, kept under its cap (see the module doc)."""

    def __init__(self, folder: Path, cap: int):
        self.folder, self.cap = folder, cap
        self.folder.mkdir(parents=True, exist_ok=True)
        self.unscanned = 0  # bytes this process added since it last looked at the folder
        self.evict()

    def added(self, size: int) -> None:
        self.unscanned += size
        if self.unscanned > 0.05 * self.cap:
            self.evict()

    def evict(self) -> None:
        """Remove the least recently used files until the folder holds at most the cap."""
        self.unscanned = 0
        entries = []
        with os.scandir(self.folder) as it:
            for entry in it:
                if entry.name.startswith("."):  # another process's fill in progress
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime_ns, st.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.cap:
                break
            Path(path).unlink(missing_ok=True)
            total -= size


def _cache() -> _Cache:
    folder = storage.cache_dir("data")
    value = os.environ.get(CACHE_MAX_ENV) or str(DEFAULT_CACHE_MAX_GB)
    try:
        cap = int(float(value) * 1e9)
    except (ValueError, OverflowError):  # not a number; inf
        cap = -1
    if not 0 <= cap < 1e18:
        raise DatasetError(f"{CACHE_MAX_ENV}={value!r}: not a size in GB (e.g. 20 or 0.5)")
    return _cache_at(folder, cap)


@functools.lru_cache(maxsize=None)
def _cache_at(folder: Path, cap: int) -> _Cache:
    return _Cache(folder, cap)


def local_file(path: str | os.PathLike) -> DataFile:
    """A file on local disk, outside any dataset (a photo to predict, a fixture)."""
    path = Path(path)
    return DataRoot(str(path.parent)).file(path.name)
