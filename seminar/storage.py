"""Local paths and `s3://` URIs behind one small API.

pyarrow's filesystems move directories (what Ray's storage uses too); S3 credentials and
the endpoint come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL`, `AWS_REGION`), never from specs or logs.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def is_uri(path: str) -> bool:
    """A URI for a pyarrow filesystem (s3://, gs://, file://, ...), not a local path."""
    return "://" in str(path)


CACHE_ENV = "SEMINAR_CACHE"


def cache_dir(kind: str) -> Path:
    """This machine's copies of remote things, one folder per kind (`checkpoints` from S3,
    registry `models`, exported `onnx` graphs): $SEMINAR_CACHE/KIND, default ~/.cache/seminar/KIND."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "seminar") / kind


# An S3 server that stops answering must become an error, not a hang: each request (of
# pyarrow's 3 attempts) gives up after this many seconds.
S3_TIMEOUT_ENV = "SEMINAR_S3_TIMEOUT_S"


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    timeout = float(os.environ.get(S3_TIMEOUT_ENV) or 30)
    kwargs = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
              "connect_timeout": min(timeout, 10), "request_timeout": timeout}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or endpoint, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, an s3:// URI, or another URI pyarrow
    knows (gs://, hdfs://, or s3:// with its own ?endpoint_override=... options)."""
    if is_s3(uri) and "?" not in str(uri):
        return s3_filesystem(), str(uri)[len("s3://"):].rstrip("/")
    if is_uri(uri):
        return pafs.FileSystem.from_uri(str(uri))
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str) -> list[str]:
    """The names of the files directly in a directory or under an s3:// prefix, sorted."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such directory")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(Path(i.path).name for i in infos if i.type == pafs.FileType.File)


def join(uri: str, name: str) -> str:
    return f"{str(uri).rstrip('/')}/{name}"


def upload_dir(local: str | Path, uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download_dir(uri: str, local: str | Path) -> Path:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no directory at {uri}")
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(Path(local).resolve()), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return Path(local)


def upload_file(local: str | Path, uri: str) -> None:
    """Copy one local file to uri, streamed (a checkpoint's weights need not fit in memory twice)."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download_file(uri: str, local: str | Path) -> Path:
    """Copy one file, streamed; it appears at `local` complete or not at all (written under a
    name of its own and renamed: processes filling one cache at once never see half a file).
    Two requests on S3 (pyarrow's HEAD for the size, one GET; `copy_files` makes three)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(f".{local.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path, compression=None) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.replace(local)
    finally:
        partial.unlink(missing_ok=True)
    return local


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file, all or nothing: locally through a temporary file and a rename, on S3
    as one object (which cannot be appended to: callers rewrite it)."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        partial = Path(f"{path}.{secrets.token_hex(4)}.partial")
        partial.write_bytes(data)
        partial.replace(path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


class NotWritable(ValueError):
    """A run's storage that cannot take its checkpoints."""


def check_writable(uri: str, run_name: str) -> None:
    """Write and delete a probe object where a run's checkpoints will go, so that an
    unwritable `storage.path` fails before the first step, not at the first checkpoint."""
    try:
        _probe_dir(f"{uri.rstrip('/')}/{run_name}")
    except (OSError, ValueError) as e:
        raise NotWritable(
            f"storage.path {uri!r} is not writable ({type(e).__name__}: {' '.join(str(e).split())}); checkpoints "
            "could not be saved there. Use a writable local directory or an s3://bucket/prefix whose bucket "
            "exists (credentials and endpoint come from AWS_* environment variables)") from None


def _probe_dir(uri: str) -> None:
    """Create the directory `uri` (local or s3://), then write and delete a probe object in it."""
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    probe = f"{path}/.write-probe-{secrets.token_hex(4)}"
    with fs.open_output_stream(probe) as f:
        f.write(b"ok")
    fs.delete_file(probe)


def check_output(uri: str | os.PathLike, option: str, is_file: bool = True) -> None:
    """An output a command will write (a file, or a folder), checked before the command's work,
    so that `--grid /proc/nope/grid.png` fails at once, not after the evaluation."""
    uri = str(uri)
    where = (uri.rsplit("/", 1)[0] if "/" in uri.rstrip("/") else ".") if is_file else uri
    try:
        if is_file and not is_s3(uri) and Path(uri).is_dir():
            raise IsADirectoryError("it is a directory")
        _probe_dir(where)
    except (OSError, ValueError) as e:
        reason = " ".join(str(getattr(e, "strerror", None) or e).split())[:160]
        raise NotWritable(f"{option} {uri}: cannot be written ({reason})") from None
