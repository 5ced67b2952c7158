"""The checkpoint directory: everything needed to resume a run or serve its model.

    meta.json                      step, spec, classes, palette, click source, metrics, version
    student_<k>/student.pt         the student's state dict
    student_<k>/teacher.pt         its EMA teacher's state dict
    student_<k>/optimizer.pt       optimizer (and LR schedule) state
    student_<k>/state.json         the step this student's files belong to
    student_<k>/look_ahead.pt      the teacher's prediction of the next batch (for an exact resume)

Everything loads with `torch.load(..., weights_only=True)`. In a distributed run each
worker writes only the students it owns; the directories merge into one checkpoint.
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import torch
from torch import nn

from . import __version__, storage
from .config import TrainConfig
from .data.base import DatasetInfo
from .untrusted import UntrustedJSONError, parse_json

META = "meta.json"
# The teacher predictions of the next step's batch, made before the checkpoint's last EMA
# update: a resumed run starts from them and continues with the same numbers.
LOOK_AHEAD = "look_ahead.pt"


def student_dir(k: int) -> str:
    """Where student k's files live inside a checkpoint."""
    return f"student_{k}"


def write_student(directory: str | Path, k: int, step: int, student: nn.Module, teacher: nn.Module,
                  optimizer_state: dict, look_ahead: dict[str, torch.Tensor] | None = None) -> None:
    d = Path(directory) / student_dir(k)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(student.state_dict(), d / "student.pt")
    torch.save(teacher.state_dict(), d / "teacher.pt")
    torch.save(optimizer_state, d / "optimizer.pt")
    if look_ahead:
        torch.save(look_ahead, d / LOOK_AHEAD)
    (d / "state.json").write_text(json.dumps({"step": step}))


def write_meta(directory: str | Path, cfg: TrainConfig, info: DatasetInfo, step: int,
               metrics: dict[str, float], served: str | None = None) -> None:
    meta = {
        "step": step,
        # the network method.inference resolved to (teacher_<k>, teacher_ensemble, primary_student)
        # at this checkpoint's evaluation; None before any evaluation
        "served": served,
        "spec": cfg.model_dump(mode="json"),
        "classes": list(info.classes),
        "palette": [list(c) for c in info.palette],
        "click_source": info.click_source,
        "metrics": metrics,
        "version": f"{cfg.storage.run_name or 'run'}@{step}",
        "code_version": __version__,
        "num_students": cfg.num_students,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (Path(directory) / META).write_text(json.dumps(meta, indent=1))


def update_meta(directory: str | Path, **fields) -> None:
    """Change fields of a local checkpoint's meta.json (the Ray driver names the served
    network once it has every worker's metrics)."""
    path = Path(directory) / META
    meta = _load_json(path)
    meta.update(fields)
    path.write_text(json.dumps(meta, indent=1))


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, not ours, tampered); names the file."""


def _load_tensors(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own text is a page of advice on loading it unsafely
        raise CheckpointError(f"{path}: not a readable weights file (it holds objects other than tensors; "
                              "refused unread, no code ran)") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ...
        raise CheckpointError(f"{path}: not a readable weights file ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None


def _load_json(path: Path) -> dict:
    try:
        value = parse_json(path.read_bytes(), str(path))
    except UntrustedJSONError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def read_student(directory: str | Path, k: int) -> dict:
    """Everything of student k that a resumed run needs."""
    d = Path(directory) / student_dir(k)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint {directory} has no {student_dir(k)}/")
    load = lambda name: _load_tensors(d / name)  # noqa: E731
    return {"student": load("student.pt"), "teacher": load("teacher.pt"), "optimizer": load("optimizer.pt"),
            "look_ahead": load(LOOK_AHEAD) if (d / LOOK_AHEAD).is_file() else None,
            "step": _load_json(d / "state.json")["step"]}


def weights_file(k: int, network: str) -> str:
    """Where student k's "student" or "teacher" weights live inside a checkpoint."""
    return f"{student_dir(k)}/{network}.pt"


def read_weights(directory: str | Path, k: int, network: str) -> dict:
    """One network's state dict (what inference needs: no optimizer state)."""
    path = Path(directory) / weights_file(k, network)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has no {weights_file(k, network)}")
    return _load_tensors(path)


def local_copy(uri: str, files: list[str] | None = None) -> Path:
    """A local directory holding the checkpoint at `uri`: for S3, downloaded once into a
    cache, either whole (for resuming) or only `files` (paths inside it; for inference,
    which needs neither the optimizer state nor the other students)."""
    if not storage.is_s3(uri):
        path = Path(uri)
        if not (path / META).is_file():
            raise FileNotFoundError(f"{uri} is not a checkpoint (no {META})")
        return path
    cache = storage.cache_dir("checkpoints") / uri.rstrip("/")[len("s3://"):].replace("/", "__")
    if files is None:
        complete = cache / ".complete"
        if not complete.is_file():
            storage.download_dir(uri, cache)
            if not (cache / META).is_file():
                raise FileNotFoundError(f"{uri} is not a checkpoint (no {META})")
            complete.touch()
        return cache
    for name in [META, *files]:
        if not (cache / name).is_file():
            source = f"{uri.rstrip('/')}/{name}"
            try:
                storage.download_file(source, cache / name)
            except OSError:
                if storage.exists(source):
                    raise  # there, but unreadable: say what the store said
                raise FileNotFoundError(f"{uri} is not a checkpoint (no {META})" if name == META
                                        else f"checkpoint {uri} has no {name}") from None
    return cache


def latest_in_run(run: str) -> str | None:
    """The newest complete checkpoint (one with meta.json) of a run directory, local or
    s3://, in either layout: `checkpoints/step_NNNNNNN` (in-process) or `checkpoint_<time>`
    (Ray Train); None when the run has none yet."""
    import pyarrow.fs as pafs

    run = run.rstrip("/")
    candidates = []
    for parent, prefix in ((f"{run}/checkpoints", "step_"), (run, "checkpoint_")):
        fs, path = storage.filesystem(parent)
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            if info.type == pafs.FileType.Directory and info.base_name.startswith(prefix):
                candidates.append(f"{parent}/{info.base_name}")
    # Names sort by step (zero-padded) or by time; a half-written one has no meta.json yet.
    for uri in sorted(candidates, key=lambda u: u.rsplit("/", 1)[1], reverse=True):
        if storage.exists(f"{uri}/{META}"):
            return uri
    return None


def resolve(uri: str) -> str:
    """A checkpoint directory for a checkpoint or a run directory (its latest checkpoint)."""
    if storage.exists(f"{uri.rstrip('/')}/{META}"):
        return uri
    latest = latest_in_run(uri)
    if latest is None:
        raise FileNotFoundError(f"{uri} is not a checkpoint (no {META}) nor a run with a complete checkpoint")
    return latest


def read_meta(uri: str) -> dict:
    return _load_json(local_copy(uri, []) / META)
