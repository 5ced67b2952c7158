"""Checks of a job spec that go beyond its schema, run before anything reaches a cluster.

`seminar.config.load_spec` already checks types, ranges and unknown fields. A job that
passes it can still fail minutes later on the cluster, so before a submission we also
check, naming the spec field each time:

  - the students' models are known;
  - local paths: the dataset root, SBD root, click files and pretrained weights exist;
  - a student started from a trained model (`init_from`) fits it: same network, same classes;
  - classes: the dataset's classes fit (VOC has 21, CamVid 11; a click file's classes lie
    inside the dataset's; a folder dataset names at least two classes);
  - the datasets build: every image and mask decodes, masks hold known classes;
  - the sweep: every swept field exists in the spec and every value it can take is valid.

A remote dataset root (s3://...) is checked too, with this machine's credentials: listed
once, its split files and click tables read, its images left to the workers that read
them. Other remote paths (pretrained weights, click files) are left to the dataset build.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .config import SpecError, TrainConfig, load_spec, set_field
from .storage import is_uri
from .data.datasets import CAMVID_CLASSES, VOC_CLASSES

BUILTIN_NUM_CLASSES = {"voc": len(VOC_CLASSES), "camvid": len(CAMVID_CLASSES)}


def load_checked_spec(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """load_spec, then every check below; one SpecError lists all problems."""
    cfg = load_spec(path, overrides)
    check_spec(cfg, source=str(path) if path else "(default)")
    return cfg


def check_spec(cfg: TrainConfig, source: str = "spec") -> None:
    path_problems = check_paths(cfg)
    # Classes are read from the click files, the datasets from their files: only once
    # those are known to exist.
    problems = check_models(cfg) + path_problems
    if not path_problems:
        class_problems = check_classes(cfg)
        problems += class_problems or check_init(cfg) + check_datasets(cfg)
    if cfg.sweep is not None:
        problems += check_search_space(cfg)
    if problems:
        raise SpecError("\n".join([f"invalid spec {source}:"] + [f"  {p}" for p in problems]))


def check_models(cfg: TrainConfig) -> list[str]:
    from .models import MODEL_NAMES

    return [f"students.{k}.model: unknown model {s.model!r} (known: {', '.join(MODEL_NAMES)})"
            for k, s in enumerate(cfg.students) if s.model not in MODEL_NAMES]


def check_paths(cfg: TrainConfig) -> list[str]:
    """Every local path in the spec exists (as a directory or a file, as the field needs)."""
    data = cfg.data
    wanted: list[tuple[str, str | None, str]] = [
        ("data.root", data.root, "dir"),
        ("data.sbd_root", data.sbd_root, "dir"),
        ("data.clicks", data.clicks, "file"),
        *[(f"data.extra_clicks.{i}", p, "file") for i, p in enumerate(data.extra_clicks)],
        *[(f"students.{k}.pretrained", s.pretrained, "file") for k, s in enumerate(cfg.students)
          if s.pretrained != "imagenet"],
    ]
    problems = []
    for field, value, kind in wanted:
        if value is None or is_uri(value):
            continue
        p = Path(value).expanduser()
        if kind == "dir" and not p.is_dir():
            problems.append(f"{field}: no such directory: {value}")
        elif kind == "file" and not p.is_file():
            problems.append(f"{field}: no such file: {value}")
    if problems:
        return problems

    # The split files the loaders will read (cheap to check, costly to find out on a cluster).
    if data.root and not is_uri(data.root):
        root = Path(data.root).expanduser()
        for field, split in (("data.train_split", data.train_split), ("data.val_split", data.val_split)):
            if data.dataset == "voc":
                split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
                if not split_file.is_file():
                    problems.append(f"{field}: no split file {split_file}")
            elif data.dataset == "camvid" and not (root / f"{split}.txt").is_file():
                problems.append(f"{field}: no split file {root / f'{split}.txt'}")
        if data.dataset == "voc" and not (root / "JPEGImages").is_dir():
            problems.append(f"data.root: {root} has no JPEGImages/ (expected VOCdevkit/VOC2012)")
        if data.dataset == "folder" and not (root / "images").is_dir():
            problems.append(f"data.root: {root} has no images/ folder")
    return problems


def spec_num_classes(cfg: TrainConfig) -> int:
    data = cfg.data
    if data.dataset == "synthetic":
        return data.synthetic.num_classes
    return BUILTIN_NUM_CLASSES.get(data.dataset, len(data.classes or []))


def check_classes(cfg: TrainConfig) -> list[str]:
    """The classes named or implied by the spec agree with each other and with the click files."""
    data = cfg.data
    num_classes = spec_num_classes(cfg)
    if data.dataset not in ("synthetic", *BUILTIN_NUM_CLASSES) and num_classes < 2:
        return ["data.classes: a folder dataset needs at least 2 classes (background first)"]
    problems = []
    if data.classes is not None and len(data.classes) != num_classes:
        problems.append(f"data.classes: names {len(data.classes)} classes but the {data.dataset} dataset has "
                        f"{num_classes}")
    if num_classes > 255:
        problems.append(f"data.classes: {num_classes} classes do not fit in uint8 labels (at most 255)")

    from .data.clicks import ClickFileError, load_clicks, validate_clicks

    click_files = [("data.clicks", data.clicks)] + [(f"data.extra_clicks.{i}", p) for i, p in enumerate(data.extra_clicks)]
    for field, path in click_files:
        if path is None or is_uri(path):
            continue
        try:
            validate_clicks(load_clicks(path), num_classes, path=path)
        except ClickFileError as e:
            problems.append(f"{field}: {e}")
    return problems


def check_init(cfg: TrainConfig) -> list[str]:
    """A student that starts from a trained model (`init_from`) has that teacher's network
    and classes, so that its weights load."""
    from .registry import RegistryError, teacher_weights

    problems = []
    for k, student in enumerate(cfg.students):
        if student.init_from is None or is_uri(student.init_from):
            continue
        field = f"students.{k}.init_from"
        try:
            _, meta = teacher_weights(student.init_from, k)  # weights that do not load are refused here, not in training
        except (RegistryError, FileNotFoundError, ValueError) as e:
            problems.append(f"{field}: {' '.join(str(e).split())}")
            continue
        theirs = meta["spec"]["students"][k]
        differs = [f"{key} {theirs.get(key)!r} (this student: {getattr(student, key)!r})"
                   for key in ("model", "decoder_channels") if theirs.get(key) != getattr(student, key)]
        if len(meta["classes"]) != spec_num_classes(cfg):
            differs.append(f"{len(meta['classes'])} classes (this dataset: {spec_num_classes(cfg)})")
        if differs:
            problems.append(f"{field}: teacher {k} of {student.init_from} differs: {', '.join(differs)}")
    return problems


def check_datasets(cfg: TrainConfig) -> list[str]:
    """The training and validation sets build: the splits list images that exist, the
    clicks name them; every image and mask decodes (a local root; a remote one is listed
    once, its split files and click tables read, its images checked as workers read them:
    see `seminar.data.datasets`)."""
    from .data import ClickFileError, DatasetError, build_dataset

    problems = []
    for field, split, clicks in (("data.train_split", cfg.data.train_split, True),
                                 ("data.val_split", cfg.data.val_split, False)):
        try:
            build_dataset(cfg.data, split, clicks=clicks)
        except (DatasetError, ClickFileError) as e:
            problems.append(f"{field} ({split}): {e}")
    return problems


# --------------------------------------------------------------------------------------
# The sweep's search space (jobs.sweep turns it into Tune's)
# --------------------------------------------------------------------------------------


def candidate_values(dist: dict[str, Any]) -> list[Any]:
    """The values that decide whether a distribution is valid for its field: all of a grid
    or choice, the ends of a range."""
    kind, values = next(iter(dist.items()))
    if kind in ("grid", "choice"):
        return list(values)
    if kind == "randint":
        return [values[0], values[1] - 1]  # high is exclusive
    return list(values)


def check_search_space(cfg: TrainConfig) -> list[str]:
    """Every swept field exists and accepts every value the sweep can give it."""
    problems: list[str] = []
    if cfg.sweep is None:
        return problems
    base = cfg.model_dump(mode="json")
    for name, dist in cfg.sweep.params.items():
        for value in candidate_values(dist):
            raw = copy.deepcopy(base)
            try:
                set_field(raw, name, value)
                TrainConfig.model_validate(raw)
            except (SpecError, ValueError, TypeError) as e:
                problems.append(f"sweep.params.{name}: value {value!r}: {_first_error(e, name)}")
                break
    return problems


def _first_error(e: Exception, name: str) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = "not a field of the spec" if err["type"] == "extra_forbidden" else err["msg"]
        return msg if where == name else f"{where}: {msg}"
    return f"not a field of the spec ({e})"
