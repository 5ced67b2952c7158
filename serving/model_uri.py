"""What `seminar serve MODEL` accepts, turned into a checkpoint to load.

MODEL is any of
  - a checkpoint directory, local or `s3://` (one holding meta.json, as training wrote it):
    `Segmenter.load` reads it where it is (from S3 only the weights that answer);
  - a run directory (its latest complete checkpoint, in-process or Ray layout);
  - a registry version `<registry-prefix>/<model>/<version>`, or `<registry-prefix>/<model>`
    for its latest version (local or `s3://`);
  - `<model>` or `<model>/<version>` in the default registry ($SEMINAR_REGISTRY);
  - a graph written by `seminar models export` (`*.onnx`, local or `s3://`).

Registry versions go through `seminar.registry.resolve_model`, which verifies checksums and
caches S3 downloads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from seminar.registry import resolve_model
from seminar import checkpoint, export, storage

REGISTRY_METADATA = "metadata.json"  # present in a registry version, next to meta.json


@dataclass
class ResolvedModel:
    requested: str  # what the user wrote
    checkpoint: str  # a checkpoint directory: local, or s3:// for a plain checkpoint there
    version: str  # what X-Model-Version says: "<model>/<version>" from a registry, else the checkpoint's
    registry_metadata: dict = field(default_factory=dict)


def resolve_model_uri(uri: str, registry: str | None = None) -> ResolvedModel:
    if uri.endswith(".onnx"):  # a graph from `seminar models export`: everything is inside
        meta = export.read_metadata(storage.read_bytes(uri), uri)
        return ResolvedModel(uri, uri, str(meta.get("version")))
    if not storage.exists(f"{uri.rstrip('/')}/{REGISTRY_METADATA}"):
        try:  # a checkpoint, or a run directory (its latest checkpoint)
            found = checkpoint.resolve(uri)
            return ResolvedModel(uri, found, str(checkpoint.read_meta(found)["version"]))
        except FileNotFoundError:
            pass  # a registry name or path
    local = Path(resolve_model(uri, registry=registry))
    metadata_file = local / REGISTRY_METADATA
    registry_metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    if registry_metadata.get("model") and registry_metadata.get("version") is not None:
        version = f"{registry_metadata['model']}/{registry_metadata['version']}"
    else:
        version = str(checkpoint.read_meta(str(local))["version"])
    return ResolvedModel(uri, str(local), version, registry_metadata)
