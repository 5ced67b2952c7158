"""What `seminar serve MODEL` accepts, turned into a checkpoint to load.

MODEL is any of
  - a checkpoint directory, local or `s3://` (one holding meta.json, as training wrote it);
  - a registry version `<registry-prefix>/<model>/<version>`, or `<registry-prefix>/<model>`
    for its latest version (local or `s3://`);
  - `<model>` or `<model>/<version>` in the default registry ($SEMINAR_REGISTRY).

The registry (`jobs.registry`) does the work through its `resolve_model` hook, which
also verifies checksums and caches S3 downloads. Without `jobs` installed, plain
checkpoints still work: they go straight to `seminar.checkpoint`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY_METADATA = "metadata.json"  # present in a registry version, next to meta.json


@dataclass
class ResolvedModel:
    requested: str  # what the user wrote
    checkpoint: str  # a local checkpoint directory (or an s3:// one, without the registry)
    version: str  # what X-Model-Version says: "<model>/<version>" from a registry, else the checkpoint's
    registry_metadata: dict = field(default_factory=dict)


def resolve_model_uri(uri: str, registry: str | None = None) -> ResolvedModel:
    try:
        from jobs.registry import resolve_model  # the registry hook
    except ModuleNotFoundError:
        resolve_model = None
    if resolve_model is not None:
        local = Path(resolve_model(uri, registry=registry))
    else:
        local = Path(uri) if not uri.startswith("s3://") else None
        if local is None:
            return ResolvedModel(uri, uri, _checkpoint_version(uri))
    metadata_file = local / REGISTRY_METADATA
    registry_metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    if registry_metadata.get("model") and registry_metadata.get("version") is not None:
        version = f"{registry_metadata['model']}/{registry_metadata['version']}"
    else:
        version = _checkpoint_version(str(local))
    return ResolvedModel(uri, str(local), version, registry_metadata)


def _checkpoint_version(uri: str) -> str:
    from seminar.checkpoint import read_meta

    return str(read_meta(uri)["version"])
