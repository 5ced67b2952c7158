"""A model registry: published checkpoints, versioned, with their metadata and checksums.

A registry is a prefix, local (`models/`) or on S3 (`s3://bucket/models`), laid out as

    <prefix>/<model>/<version>/meta.json              the checkpoint, as training wrote it
                              /student_<k>/*.pt
                              /metadata.json          written last: the version's commit mark

`metadata.json` holds the metrics, the spec, the classes and palette, the click source,
the code version, the creation time and the sha256 of every other file. Versions are
1, 2, 3, ... per model; a version without `metadata.json` is unfinished and invisible.
Reading a version checks every file against its checksum, so a tampered or truncated
file fails loudly, by name, instead of loading wrong weights.

Files are written and read through `seminar.storage` (local, or S3 with the endpoint from
`AWS_ENDPOINT_URL` and credentials from the environment as usual); claiming a version number
on S3 is a conditional write through boto3. The serving layer loads models through `resolve_model`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from . import checkpoint, export, storage
from .checkpoint import local_copy
from .untrusted import UntrustedJSONError, parse_json

METADATA_FILE = "metadata.json"
RESUME_ONLY = ("optimizer.pt", checkpoint.LOOK_AHEAD)  # checkpoint files serving never reads
CHECKPOINT_META = checkpoint.META  # written by training; marks a checkpoint dir
DEFAULT_REGISTRY_ENV = "SEMINAR_REGISTRY"
DEFAULT_REGISTRY = "runs/registry"
REPO_ROOT = Path(__file__).resolve().parents[1]


class RegistryError(Exception):
    """A registry that cannot be read or written, or a model/version that is not there."""


class IntegrityError(RegistryError):
    """A registered file that does not match the checksum recorded when it was published."""


def default_registry() -> str:
    return os.environ.get(DEFAULT_REGISTRY_ENV) or DEFAULT_REGISTRY


CODE_VERSION_ENV = "SEMINAR_CODE_VERSION"  # set by `seminar submit`: the submitter's git describe


def code_version() -> str:
    """`git describe` of this checkout (or of the one a job was submitted from), else the
    package version."""
    if os.environ.get(CODE_VERSION_ENV):
        return os.environ[CODE_VERSION_ENV]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return importlib.metadata.version("seminar")
    except importlib.metadata.PackageNotFoundError:
        from seminar import __version__

        return __version__


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# Where bytes live: a local directory or an S3 prefix, behind the same five operations.
# --------------------------------------------------------------------------------------


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise RegistryError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
    return bucket, key.strip("/")


class _Store:
    """A registry's files, local or on S3, through `seminar.storage` (pyarrow's filesystems).
    Only claiming a version number needs S3's own conditional write, through boto3."""

    def __init__(self, uri: str):
        self.is_s3 = storage.is_s3(uri)
        if self.is_s3:
            bucket, prefix = _split_s3(uri)
            self.uri = f"s3://{bucket}/{prefix}".rstrip("/")
        else:
            self.uri = str(Path(uri).expanduser())
        self.fs, self.root = storage.filesystem(self.uri)

    def join(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _entries(self, parts: tuple[str, ...], recursive: bool) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(self._path(*parts), recursive=recursive, allow_not_found=True))

    def list_dirs(self, *parts: str) -> list[str]:
        return sorted(i.base_name for i in self._entries(parts, False) if i.type == pafs.FileType.Directory)

    def list_files(self, *parts: str) -> list[str]:
        """Relative paths of every file under parts (recursively)."""
        base = self._path(*parts)
        return sorted(i.path[len(base) + 1:] for i in self._entries(parts, True) if i.type == pafs.FileType.File)

    def read_bytes(self, *parts: str) -> bytes | None:
        try:
            return storage.read_bytes(self.join(*parts))
        except (FileNotFoundError, IsADirectoryError):  # one request, not a lookup and then a read
            return None

    def put_file(self, local: Path, *parts: str) -> None:
        storage.upload_file(local, self.join(*parts))

    def put_bytes(self, data: bytes, *parts: str) -> None:
        storage.write_bytes(self.join(*parts), data)  # whole or not at all: readers never see half a file

    def claim(self, *parts: str) -> bool:
        """Take a version directory if nobody has: how two publishers get distinct versions."""
        if not self.is_s3:
            d = Path(self._path(*parts))
            d.parent.mkdir(parents=True, exist_ok=True)
            try:
                d.mkdir()
                return True
            except FileExistsError:
                return False
        # A conditional write (If-None-Match: *) succeeds for exactly one publisher.
        import boto3
        from botocore.exceptions import ClientError

        bucket, key = _split_s3(self.join(*parts, ".claim"))
        try:
            boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None).put_object(
                Bucket=bucket, Key=key, Body=b"", IfNoneMatch="*")
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise

    def fetch(self, rel_files: list[str], parts: tuple[str, ...], dest: Path) -> None:
        for rel in rel_files:
            storage.download_file(self.join(*parts, rel), dest / rel)


def _wrap_storage_errors(fn):
    """Turn boto/OS errors into one RegistryError naming the registry."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(self, *args, **kwargs)
        except RegistryError:
            raise
        except (ClientError, BotoCoreError, OSError) as e:
            raise RegistryError(f"registry {self.uri}: {e}") from e

    return wrapper


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------


@dataclass
class ModelVersion:
    model: str
    version: int
    uri: str  # <registry>/<model>/<version>
    metadata: dict[str, Any]


def _check_model_name(model: str) -> str:
    """A model name is one path component, so it cannot reach outside its registry."""
    if not model or "/" in model or "\\" in model or model.startswith(".") or _is_version(model):
        raise RegistryError(f"model name {model!r}: use a non-empty name without '/' that is not a number "
                            "and does not start with '.'")
    return model


def _is_model_name(entry: str) -> bool:
    try:
        return bool(_check_model_name(entry))
    except RegistryError:
        return False


def _is_version(entry: str) -> bool:
    """A version directory's name: ASCII digits (str.isdigit() also takes '²', which int() refuses)."""
    return entry.isascii() and entry.isdigit()


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _checked_files(metadata: Any, where: str) -> dict[str, dict]:
    """The `files` of a version's metadata, each a plain relative path inside the version
    with a sha256: checked before any file is read or written, so a crafted metadata.json
    cannot make a fetch write (or a check read) outside the version directory."""
    files = metadata.get("files") if isinstance(metadata, dict) else None
    if not isinstance(files, dict) or not files:
        raise IntegrityError(f"{where}: {METADATA_FILE} lists no files")
    for rel, info in files.items():
        parts = rel.split("/") if isinstance(rel, str) else [""]
        if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts) or ":" in rel:
            raise IntegrityError(f"{where}: {METADATA_FILE} names the file {rel!r}, which is not a plain "
                                 "relative path inside the version; refused, nothing was written")
        if not isinstance(info, dict) or not _SHA256.match(str(info.get("sha256", ""))):
            raise IntegrityError(f"{where}: {METADATA_FILE}: file {rel!r} has no valid sha256")
    return files


class ModelRegistry:
    """Published models under one prefix. `ModelRegistry("s3://bucket/models").publish(...)`."""

    def __init__(self, uri: str | None = None):
        self.store = _Store(uri or default_registry())
        self.uri = self.store.uri

    # ---- reading -------------------------------------------------------------------

    @_wrap_storage_errors
    def models(self) -> list[str]:
        """Models with a committed version; entries that are no model (`stray_entries`) left out."""
        return [m for m in self.store.list_dirs() if _is_model_name(m) and self.versions(m)]

    @_wrap_storage_errors
    def stray_entries(self) -> list[str]:
        """What the registry holds that cannot be a model (a name like '..'), for listings to name."""
        return [m for m in self.store.list_dirs() if not _is_model_name(m)]

    @_wrap_storage_errors
    def versions(self, model: str) -> list[int]:
        """Committed versions of model (those with metadata.json), oldest first."""
        _check_model_name(model)
        numbered = sorted(int(v) for v in self.store.list_dirs(model) if _is_version(v))
        return [v for v in numbered if self.store.read_bytes(model, str(v), METADATA_FILE) is not None]

    @_wrap_storage_errors
    def get(self, model: str, version: int | None = None) -> ModelVersion:
        """A version's metadata (the latest version when version is None)."""
        versions = self.versions(model)
        if not versions:
            known = ", ".join(self.models()) or "none"
            raise RegistryError(f"no model '{model}' in registry {self.uri} (models: {known})")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise RegistryError(f"model '{model}' has no version {version} in {self.uri} "
                                f"(versions: {', '.join(map(str, versions))})")
        raw = self.store.read_bytes(model, str(version), METADATA_FILE)
        where = self.store.join(model, str(version), METADATA_FILE)
        try:
            metadata = parse_json(raw, where)
        except UntrustedJSONError as e:
            raise IntegrityError(str(e)) from None
        _checked_files(metadata, where)
        return ModelVersion(model, version, self.store.join(model, str(version)), metadata)

    @_wrap_storage_errors
    def fetch(self, model: str, version: int | None = None) -> Path:
        """A local, checksum-verified checkpoint directory of model/version.

        Local registries are verified and read in place; S3 versions are downloaded once
        into the cache (`storage.cache_dir("models")`) and
        verified after every download and on every later use.
        """
        mv = self.get(model, version)
        files = mv.metadata["files"]  # checked by get(): plain relative paths
        if not self.store.is_s3:
            local = Path(mv.uri)
        else:
            key = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
            local = storage.cache_dir("models") / key / model / str(mv.version)
            try:
                verify_files(local, files, where=str(local))
            except IntegrityError:
                # Not cached yet, or a previous download broke off: fetch into a fresh dir.
                tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=_mkdir(local.parent)))
                self.store.fetch(list(files), (model, str(mv.version)), tmp)
                (tmp / METADATA_FILE).write_text(json.dumps(mv.metadata, indent=2))
                shutil.rmtree(local, ignore_errors=True)
                os.replace(tmp, local)
        verify_files(local, files, where=mv.uri)
        return local

    # ---- writing -------------------------------------------------------------------

    @_wrap_storage_errors
    def publish(self, checkpoint: str | Path, model: str, *, metrics: dict[str, float] | None = None,
                spec: dict | None = None, extra: dict[str, Any] | None = None,
                include_optimizer: bool = False) -> ModelVersion:
        """Copy a checkpoint (local dir or s3:// prefix) in as the next version of model.

        `metrics` (e.g. the sweep's) are merged over those the checkpoint recorded. Weights
        only by default (what serving needs; the optimizer state is most of a checkpoint's
        bytes); `include_optimizer=True` keeps the resume state too (optimizer, look-ahead),
        so that the version can be trained on.
        """
        _check_model_name(model)
        try:
            local = local_copy(str(checkpoint).rstrip("/"))
        except FileNotFoundError:
            raise RegistryError(f"{checkpoint}: not a checkpoint (no {CHECKPOINT_META})") from None
        try:
            meta = parse_json((local / CHECKPOINT_META).read_bytes(), str(local / CHECKPOINT_META))
        except UntrustedJSONError as e:
            raise IntegrityError(str(e)) from None
        rel_files = sorted(  # not the download cache's own marks (dot files)
            str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")
            and p.name != METADATA_FILE and (include_optimizer or p.name not in RESUME_ONLY))
        files = {rel: {"sha256": sha256_file(local / rel), "bytes": (local / rel).stat().st_size}
                 for rel in rel_files}

        version = self._claim_next_version(model)
        for rel in rel_files:
            self.store.put_file(local / rel, model, str(version), rel)
        metadata = {
            "model": model,
            "version": version,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metrics": {**(meta.get("metrics") or {}), **(metrics or {})},
            "spec": spec if spec is not None else meta.get("spec"),
            "classes": meta.get("classes"),
            "palette": meta.get("palette"),
            "click_source": meta.get("click_source"),
            "num_students": meta.get("num_students"),
            "step": meta.get("step"),
            "code_version": code_version(),
            "training_code_version": meta.get("code_version"),
            "source_checkpoint": str(checkpoint),
            "files": files,
            **(extra or {}),
        }
        # metadata.json last: until it exists the version is not listed.
        self.store.put_bytes(json.dumps(metadata, indent=2).encode(), model, str(version), METADATA_FILE)
        return ModelVersion(model, version, self.store.join(model, str(version)), metadata)

    def _claim_next_version(self, model: str) -> int:
        taken = [int(v) for v in self.store.list_dirs(model) if _is_version(v)]
        version = max(taken, default=0) + 1
        while not self.store.claim(model, str(version)):
            version += 1
        return version


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def verify_files(local: Path, files: dict[str, dict], where: str) -> None:
    """Every recorded file exists under local, inside it (no symlink out), with its recorded sha256."""
    files = _checked_files({"files": files}, where)
    root = local.resolve()
    for rel, info in files.items():
        path = local / rel
        if path.is_file() and not path.resolve().is_relative_to(root):
            raise IntegrityError(f"{where}: file {rel} is a link to outside the version; refused")
        if not path.is_file():
            raise IntegrityError(f"{where}: file {rel} is missing")
        if sha256_file(path) != info["sha256"]:
            raise IntegrityError(f"{where}: file {rel} does not match its recorded sha256 "
                                 "(modified or corrupted after publishing)")


# --------------------------------------------------------------------------------------
# One function for loaders: whatever the user wrote -> what Segmenter.load reads
# --------------------------------------------------------------------------------------


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """'name' -> (name, None); 'name/3' -> (name, 3)."""
    head, _, tail = ref.strip("/").rpartition("/")
    if head and _is_version(tail):
        return _check_model_name(head), int(tail)
    if head:
        raise RegistryError(f"model reference {ref!r}: expected NAME or NAME/VERSION")
    return _check_model_name(tail), None


@dataclass
class ResolvedModel:
    requested: str  # what the user wrote
    checkpoint: str  # a checkpoint directory (local, or s3:// for a plain checkpoint there), or a .onnx graph
    version: str  # what X-Model-Version says: "<model>/<version>" from a registry, else the checkpoint's
    registry_metadata: dict = field(default_factory=dict)


def resolve_model(uri: str, registry: str | None = None) -> ResolvedModel:
    """The one way to turn a model reference into something `Segmenter.load` reads:
      - a checkpoint directory, local or `s3://` (one holding meta.json, as training wrote it;
        read where it is: from S3 only the weights that answer);
      - a run directory (its latest complete checkpoint, in-process or Ray layout);
      - a registry version `<registry-prefix>/<model>/<version>`, or `<registry-prefix>/<model>`
        for its latest version (local or `s3://`; verified, S3 downloads cached);
      - `<model>` or `<model>/<version>` in `registry` (default: $SEMINAR_REGISTRY, else runs/registry);
      - a graph written by `seminar models export` (`*.onnx`, local or `s3://`).
    """
    if uri.endswith(".onnx"):  # everything is inside the graph
        meta = export.read_metadata(storage.read_bytes(uri), uri)
        return ResolvedModel(uri, uri, str(meta.get("version")))
    if not storage.exists(f"{uri.rstrip('/')}/{METADATA_FILE}"):
        try:  # a checkpoint, or a run directory (its latest checkpoint)
            found = checkpoint.resolve(uri)
            return ResolvedModel(uri, found, str(checkpoint.read_meta(found)["version"]))
        except FileNotFoundError:
            pass  # a registry name or path
    local = fetch_reference(uri, registry)
    metadata_file = local / METADATA_FILE
    registry_metadata = parse_json(metadata_file.read_bytes(), str(metadata_file)) if metadata_file.is_file() else {}
    if registry_metadata.get("model") and registry_metadata.get("version") is not None:
        version = f"{registry_metadata['model']}/{registry_metadata['version']}"
    else:
        version = str(checkpoint.read_meta(str(local))["version"])
    return ResolvedModel(uri, str(local), version, registry_metadata)


def teacher_weights(ref: str, k: int) -> tuple[dict, dict]:
    """(state dict, meta) of teacher k in the model `ref` names (as `resolve_model` takes it):
    where student k of the next round starts (`students.K.init_from`). The teacher, not the
    student: its EMA weights are what the model serves."""
    found = resolve_model(ref)
    if found.checkpoint.endswith(".onnx"):
        raise RegistryError(f"{ref}: an exported graph holds no trainable weights; name the checkpoint it came from")
    meta = checkpoint.read_meta(found.checkpoint)
    students = meta.get("num_students", len(meta.get("spec", {}).get("students", [])))
    if k >= students:
        raise RegistryError(f"{ref}: has {students} student(s), no teacher {k}")
    local = local_copy(found.checkpoint, [checkpoint.weights_file(k, "teacher")])
    return checkpoint.read_weights(local, k, "teacher"), meta


def fetch_reference(uri_or_name: str, registry: str | None = None) -> Path:
    """A local, verified checkpoint directory for a checkpoint or registry reference
    (`resolve_model` also takes run directories and exported graphs).

    Accepted:
      - a checkpoint directory (local or s3://) - one holding meta.json, as training wrote it
        (from S3 downloaded whole, through `seminar.checkpoint.local_copy`);
      - a registry version `<registry>/<model>/<version>` or a model `<registry>/<model>`
        (its latest version), local or s3://;
      - `model` or `model/version` in `registry` (default: $SEMINAR_REGISTRY, else runs/registry).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    ref = uri_or_name.rstrip("/")
    # a path (also `runs/registry/seminar`, a registry's model named by its directory)
    explicit_path = ref.startswith(("s3://", ".", "/", "~")) or ("/" in ref and Path(ref).expanduser().is_dir())
    is_local_dir = not ref.startswith("s3://") and (
        (Path(ref).expanduser() / METADATA_FILE).is_file() or (Path(ref).expanduser() / CHECKPOINT_META).is_file())
    try:
        if explicit_path or is_local_dir:
            return _resolve_path(ref)
        model, version = parse_model_ref(ref)
        return ModelRegistry(registry).fetch(model, version)
    except (ClientError, BotoCoreError, OSError) as e:
        raise RegistryError(f"{ref}: {e}") from e


def _resolve_path(ref: str) -> Path:
    store = _Store(ref)
    if store.read_bytes(METADATA_FILE) is not None:  # <registry>/<model>/<version>
        parent, _, version = ref.rpartition("/")
        reg, _, model = parent.rpartition("/")
        if not _is_version(version):
            raise RegistryError(f"{ref}: has {METADATA_FILE} but is not <registry>/<model>/<version>")
        return ModelRegistry(reg or ".").fetch(model, int(version))
    if store.read_bytes(CHECKPOINT_META) is not None:  # a checkpoint as training wrote it
        return Path(store.uri) if not store.is_s3 else checkpoint.local_copy(ref)
    reg, _, model = ref.rpartition("/")
    if reg and any(_is_version(v) for v in store.list_dirs()):  # <registry>/<model>: its latest version
        return ModelRegistry(reg).fetch(model, None)
    raise RegistryError(f"{ref}: neither a checkpoint (no {CHECKPOINT_META}) nor a registered model")
