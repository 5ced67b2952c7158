"""The job spec: one validated pydantic model for everything a run needs.

A spec is a YAML file (see `jobs/configs/`), overridden by `--set key=value` flags,
validated in full before anything trains: an unknown field, a wrong type or an
out-of-range value fails with the dotted name of the field.

Baselines are the same spec with switches off (docs/results.md compares them):
  pCE only          method.w_ts=0 method.w_ss=0
  mean teacher      method.w_ss=0
  CPS-like          method.w_ts=0 method.pseudo_from=student
  full supervision  method.supervision=dense method.w_ts=0 method.w_ss=0
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .untrusted import value_error_reason


class Strict(BaseModel):
    # inf and nan are never a sensible setting (`optim.poly_power=.inf` must not train)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SyntheticConfig(Strict):
    """Shapes on textured backgrounds, generated from a seed (the fast default)."""

    num_train: int = Field(512, ge=1, le=1_000_000)  # generated on the fly, but listed by id
    num_val: int = Field(96, ge=1, le=1_000_000)
    image_size: int = Field(96, ge=32, le=1024)
    num_classes: int = Field(4, ge=2, le=32, description="including background (class 0)")
    seed: int = Field(0, description="generator seed of the images (train and val draw different streams)")


class DataConfig(Strict):
    dataset: Literal["synthetic", "voc", "camvid", "folder"] = "synthetic"
    root: str | None = Field(None, description="dataset root: VOCdevkit/VOC2012, camvid/, or an image folder")
    sbd_root: str | None = Field(None, description="SBD root (dataset/cls/*.mat) for VOC train_aug")
    clicks: str | None = Field(None, description="click table (Parquet) or What's the Point JSON; None = simulated")
    extra_clicks: list[str] = Field(default_factory=list, description="more click files merged in (e.g. WTP supp)")
    classes: list[str] | None = Field(None, description="class names for a folder dataset")
    train_split: str = "train"
    val_split: str = "val"
    max_train: int | None = Field(None, ge=1, description="use only the first N training images")
    max_val: int | None = Field(None, ge=1)
    load_scale: float = Field(1.0, ge=0.05, le=1, description="resize images and masks on load (0.5 = half "
                              "resolution; below 0.05 a 480-pixel photo keeps fewer than 24)")
    crop_size: tuple[int, int] = Field((96, 96), description="training crop (height, width)")
    scale_range: tuple[float, float] = (0.75, 1.5)
    click_radius: int = Field(3, ge=0, le=64)
    simulated_min_area: int = Field(16, ge=1, description="smallest connected component that gets a simulated click")
    simulated_clicks_per_class: int | None = Field(
        None, ge=1, description="click budget: clicks only the N largest components of each class per image "
        "(None = every component)")
    simulate_background: bool = Field(True, description="VOC: add simulated background clicks (WTP has none)")
    click_seed: int = 0
    clicked_images: int | float | None = Field(
        None, description="keep the clicks of only this many training images (a count >= 1, or a fraction in "
        "(0, 1]), drawn with click_seed (a smaller count's images are among a larger one's); the others train as "
        "unclicked images. None = every image keeps its clicks. For label-efficiency studies")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @field_validator("scale_range")
    @classmethod
    def _scale_range(cls, v):
        lo, hi = v
        if not 0.1 <= lo <= hi <= 4:  # 8x a 512-pixel image is 16 MB a view, to crop a few pixels from
            raise ValueError("needs 0.1 <= min <= max <= 4")
        return v

    @field_validator("clicked_images", mode="before")
    @classmethod
    def _clicked_images(cls, v):
        if isinstance(v, bool) or (isinstance(v, int) and v < 1) or (isinstance(v, float) and not 0 < v <= 1):
            raise ValueError("a count of images >= 1, or a fraction in (0, 1]")
        return v

    @field_validator("crop_size")
    @classmethod
    def _crop(cls, v):
        if min(v) < 16 or max(v) > 4096:
            raise ValueError("each side must be in [16, 4096]")
        return v

    @model_validator(mode="after")
    def _root_needed(self):
        if self.dataset != "synthetic" and not self.root:
            raise ValueError(f"data.root is required for dataset '{self.dataset}'")
        if self.dataset == "folder" and (not self.clicks or not self.classes):
            raise ValueError("a folder dataset needs data.clicks (a click table) and data.classes")
        return self


class AugmentConfig(Strict):
    """Photometric augmentation of a student's strong view (geometry is shared by all)."""

    color_jitter: float = Field(0.4, ge=0, le=1, description="brightness/contrast/saturation strength")
    hue: float = Field(0.1, ge=0, le=0.5)
    blur_prob: float = Field(0.5, ge=0, le=1)
    grayscale_prob: float = Field(0.2, ge=0, le=1)


class StudentConfig(Strict):
    model: str = "deeplabv3plus_resnet18"
    output_stride: Literal[8, 16] = 16
    decoder_channels: int = Field(256, ge=16, le=1024, description="ASPP/decoder width (smaller = faster on CPU)")
    pretrained: str | None = Field(None, description="'imagenet' (the weights the package ships, for "
                                   "deeplabv3plus_efficientnet_lite0) or a torchvision ImageNet weights file")
    init_from: str | None = Field(None, description="a trained model (checkpoint, run directory, registry name or "
                                  "version): student k starts from its teacher k's weights, the next round of an "
                                  "annotation loop (its pretrained weights are then not loaded)")
    seed: int = 0
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("model")
    @classmethod
    def _known_model(cls, v):
        from seminar.models import MODEL_NAMES

        if v not in MODEL_NAMES:
            raise ValueError(f"unknown model {v!r}; known models: {', '.join(MODEL_NAMES)}")
        return v

    @model_validator(mode="after")
    def _packaged_weights(self):
        from seminar.models import IMAGENET, MODEL_PREFIX, PACKAGED_WEIGHTS

        if self.pretrained == IMAGENET and self.model.removeprefix(MODEL_PREFIX) not in PACKAGED_WEIGHTS:
            raise ValueError(f"pretrained: imagenet ships only for "
                             f"{', '.join(MODEL_PREFIX + b for b in PACKAGED_WEIGHTS)}; for {self.model} name a file")
        return self


def _default_students() -> list[StudentConfig]:
    # Diverse by default: different architectures, seeds and augmentation strength.
    return [
        StudentConfig(model="deeplabv3plus_resnet18", seed=0, decoder_channels=64),
        StudentConfig(model="deeplabv3plus_mobilenetv2", seed=1, decoder_channels=64,
                      augment=AugmentConfig(color_jitter=0.3, hue=0.05, blur_prob=0.3, grayscale_prob=0.1)),
    ]


class MethodConfig(Strict):
    supervision: Literal["clicks", "dense"] = "clicks"
    sup_norm: Literal["image_class", "pixel"] = Field(
        "image_class", description="loss_sup: each (image, class) weighs the same, or each labelled pixel "
        "(clicks, or the masks of full supervision)")
    ema_decay: float = Field(0.99, ge=0, lt=1)
    ema_warmup_steps: int = Field(
        100, ge=0, description="the teacher's decay climbs linearly from 0 to ema_decay over these steps")
    w_ts: float = Field(1.0, ge=0, le=100, description="weight of the teacher-student consistency loss")
    w_ss: float = Field(1.0, ge=0, le=100, description="weight of the student-student pseudo-label loss")
    ts_loss: Literal["kl", "mse"] = Field(
        "kl", description="kl gives loss_ts a gradient comparable to loss_sup's; mse ~15x smaller")
    tau: float = Field(0.8, ge=0, le=1, description="fused confidence from which a pseudo-label is kept")
    ss_class_fraction: float = Field(
        0.0, ge=0, le=1, description="also keep each predicted class's most confident fraction of pixels "
        "below tau (0 = the fixed tau only)")
    w_pair: float = Field(0.0, ge=0, le=100, description="weight of the label-free pairwise colour-affinity "
                          "loss (0 = off)")
    pair_color_tol: float = Field(0.05, gt=0, le=2, description="RGB distance (in [0, 1] units) below which "
                                  "neighbouring pixels should share a class")
    ss_norm: Literal["pixel", "image_class"] = Field(
        "pixel", description="loss_ss: each pseudo-labelled pixel weighs the same, or each (image, class) "
        "does (as loss_sup's image_class), scaled by the coverage")
    cutmix_prob: float = Field(
        0.0, ge=0, le=1, description="share of the unclicked images whose strong view gets a box cut from another "
        "unclicked image of the batch (CutMix); the teacher's target and the peers' pseudo-label are mixed with "
        "the same box (0 = off)")
    feature_dropout: float = Field(
        0.0, ge=0, lt=1, description="share of the decoder's input channels dropped while a student trains "
        "(a feature perturbation; teachers and the served model never drop)")
    ss_start: int = Field(50, ge=0, description="step at which loss_ss starts ramping up")
    rampup_steps: int = Field(100, ge=0, description="length L of the sigmoid ramp-up")
    pseudo_from: Literal["teacher", "student"] = Field(
        "teacher", description="whose predictions peers exchange; 'student' is the CPS-like baseline")
    inference: Literal["best_teacher", "primary_teacher", "primary_student", "teacher_ensemble"] = Field(
        "best_teacher", description="the served network; best_teacher = the teacher or teachers' ensemble "
        "with the highest val mIoU at the last evaluation")


class OptimConfig(Strict):
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(2e-3, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    batch_size: int = Field(8, ge=1, le=1024, description="clicked images per step and student, split over its "
                            "replicas")
    unlabelled_batch_size: int | None = Field(
        None, ge=1, le=1024, description="unclicked images per step beside them (None = batch_size), drawn from "
        "their own stream when the training set has unclicked images and w_ts or w_ss uses them")
    steps: int = Field(300, ge=1, le=10_000_000)
    poly_power: float = Field(0.9, ge=0)
    seed: int = 0


class ScheduleConfig(Strict):
    eval_every: int = Field(100, ge=1, le=10_000_000)
    checkpoint_every: int = Field(100, ge=1, le=10_000_000)
    log_every: int = Field(10, ge=1, le=10_000_000)


class ResourcesConfig(Strict):
    replicas_per_student: int = Field(1, ge=1, le=64)
    gpus_per_worker: float = Field(0, ge=0, le=8)
    cpus_per_worker: float = Field(1, gt=0, le=256)
    torch_threads: int | None = Field(None, ge=1, le=1024, description="intra-op threads per worker (None = the CPUs "
                                      "the process may use: its affinity, cgroup quota and Ray's allotment)")
    loader_workers: int = Field(1, ge=0, le=64, description="data-loading processes per worker (0 = in the loop)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="--in-process: where the students train (auto = cuda when there is one); on Ray, "
                            "gpus_per_worker decides")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: forwards under bfloat16 autocast "
                                                                   "(weights, optimizer and EMA stay fp32)")
    channels_last: bool = Field(False, description="networks in channels-last memory format (faster convolutions "
                                                   "on GPUs with tensor cores)")
    max_failures: int = Field(2, ge=0, description="worker failures a run survives (resumes from checkpoint)")
    exchange_lookahead: bool = Field(True, description="on Ray: publish a step's pseudo-labels for the peers "
                                                       "while the step computes; off holds each publish back "
                                                       "until it is collected (the exchange then costs wall time: "
                                                       "bench/exchange.py measures the difference)")


class StorageConfig(Strict):
    path: str = Field("runs", description="local directory or s3://bucket/prefix for runs and checkpoints")
    run_name: str | None = Field(None, description="None = a new unique name; an existing name resumes it")
    tensorboard: bool = Field(False, description="also write every report as TensorBoard scalars in "
                                                 "<run>/tensorboard (`tensorboard --logdir runs`)")

    @field_validator("run_name")
    @classmethod
    def _name(cls, v):
        if v is not None and (not v or "/" in v or v.startswith(".")):
            raise ValueError("a run name is a non-empty string without '/' that does not start with '.'")
        return v


SWEEP_DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


def _number_or_self(v):
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


class SweepConfig(Strict):
    """Ray Tune search space: dotted spec field -> one distribution.

        params:
          method.ema_decay: {grid: [0.99, 0.999]}       # every value, in every sample
          method.w_ss: {choice: [0.5, 1.0, 2.0]}        # one value drawn per trial
          method.tau: {uniform: [0.5, 0.95]}            # [low, high]
          optim.lr: {loguniform: [1.0e-4, 1.0e-2]}      # low > 0
          method.ss_start: {randint: [0, 100]}          # integers, high excluded

    Trials = num_samples x the product of the grid sizes. Whether each field exists and
    each value is valid for it is checked against the spec by `seminar.checks`.
    """

    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    num_samples: int = Field(4, ge=1)
    metric: str = "val/miou"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1, description="ASHA: evaluations before a trial may be stopped")
    reduction_factor: int = Field(2, ge=2)
    max_concurrent: int = Field(2, ge=1)
    registry: str | None = Field(None, description="model registry prefix (local or s3://) to publish the best to")
    model_name: str = Field("seminar", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    name: str | None = Field(None, description="experiment name; None = a new unique one")

    @field_validator("params")
    @classmethod
    def _params(cls, params):
        for field, dist in params.items():
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in SWEEP_DISTRIBUTIONS:
                raise ValueError(f"{field}: expected one of {{{', '.join(SWEEP_DISTRIBUTIONS)}: ...}}, got {dist!r}")
            kind, values = next(iter(dist.items()))
            if kind in ("grid", "choice"):
                if not isinstance(values, list) or not values:
                    raise ValueError(f"{field}: {kind} needs a non-empty list of values")
                continue
            if isinstance(values, list):  # YAML reads 1e-4 (no dot) as a string
                values = dist[kind] = [_number_or_self(v) for v in values]
            if (not isinstance(values, list) or len(values) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
                raise ValueError(f"{field}: {kind} needs [low, high], got {values!r}")
            low, high = values
            if not low < high:
                raise ValueError(f"{field}: {kind} needs low < high, got {values!r}")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"{field}: loguniform needs low > 0, got {values!r}")
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise ValueError(f"{field}: randint needs integer bounds, got {values!r}")
        return params


class ServingConfig(Strict):
    """The endpoint's knobs (`serving/`): input limits, batching, scaling, admission."""

    max_bytes: int = Field(10 * 2**20, ge=1024, description="largest accepted image file (413 above)")
    max_pixels: int = Field(16 * 2**20, ge=1024, description="largest accepted image, width x height (413 above)")
    max_batch_size: int = Field(8, ge=1, description="most images in one batched forward")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill "
                                                                "(only while other requests are in the replica)")
    batch_pixel_budget: int = Field(4 * 2**20, ge=1024,
                                    description="most pixels in one batched forward (after resize and padding)")
    infer_size: int = Field(512, ge=32, description="long side images are resized to for the forward")
    num_replicas: int | None = Field(None, ge=1, description="a fixed replica count; None = autoscale")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0, description="autoscaling target per replica")
    max_ongoing_requests: int = Field(32, ge=1, description="requests a replica holds at once")
    max_queued_requests: int = Field(64, ge=-1, description="requests queued beyond those (-1 = unbounded); "
                                                            "more get 503 with Retry-After")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with a 503 when overloaded")
    body_timeout_s: float = Field(10.0, gt=0, description="a request body must arrive within this time (408 "
                                  "after): a slow client cannot hold a replica's slot longer")
    max_slow_uploads: int = Field(8, ge=1, description="uploads in flight per replica that get "
                                  "body_timeout_s; past this, a new body must arrive within 1 s or gets 503 with "
                                  "Retry-After, so slow senders cannot hold every slot in turn")
    runtime: Literal["onnx", "torch"] = Field(
        "onnx", description="onnx: the network exported and run on ONNX Runtime (on 2 CPU cores 1.6x faster "
                            "than eager at batch 1, 1.65x batched: docs/performance.md); torch: eager PyTorch (also the fallback if the export fails)")
    suggest_clicks: int = Field(0, ge=0, le=100, description="where to click next: this many suggested clicks per "
                                "answer where the students' teachers disagree (> 0 runs every teacher; free when "
                                "teacher_ensemble is served, else one forward per teacher)")
    clicks_store: str | None = Field(None, description="a folder or s3:// prefix where POST /v1/clicks (and the "
                                     "page) store correction clicks as Parquet parts, for data.clicks or "
                                     "data.extra_clicks of the next training run; None = not collected")
    label_studio_url: str | None = Field(None, description="Label Studio's address (http://host:8080), for task "
                                         "images given as its own paths (/data/upload/...); the API key is read from "
                                         "LABEL_STUDIO_API_KEY in the replica's environment (serving.label_studio)")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per replica, of either runtime "
                                                             "(None = all cores)")
    num_cpus: float = Field(1, ge=0, description="logical CPUs a replica reserves")
    omp_wait_policy: Literal["passive", "active"] | None = Field(
        "passive", description="OMP_WAIT_POLICY of replicas: passive stops idle intra-op threads from spinning "
                               "on cores the replica's decoding and encoding need (None = OpenMP's default)")
    device: Literal["cpu", "cuda"] = "cpu"
    overlay_alpha: float = Field(0.5, ge=0, le=1, description="default opacity of the mask in overlays")

    @model_validator(mode="after")
    def _consistent(self):
        if self.infer_size**2 > self.batch_pixel_budget:
            raise ValueError(f"batch_pixel_budget ({self.batch_pixel_budget}) must hold at least one "
                             f"infer_size x infer_size image ({self.infer_size**2} pixels)")
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class TrainConfig(Strict):
    """A whole job spec."""

    data: DataConfig = Field(default_factory=DataConfig)
    students: list[StudentConfig] = Field(default_factory=_default_students)
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    sweep: SweepConfig | None = None
    serving: ServingConfig = Field(default_factory=ServingConfig)

    @field_validator("students")
    @classmethod
    def _students(cls, v):
        if not v:
            raise ValueError("at least one student")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.method.w_ss > 0 and len(self.students) < 2:
            raise ValueError("method.w_ss > 0 needs at least 2 students (peers to exchange pseudo-labels with)")
        if self.optim.batch_size % self.resources.replicas_per_student:
            raise ValueError("optim.batch_size must be divisible by resources.replicas_per_student")
        if (self.optim.unlabelled_batch_size or 0) % self.resources.replicas_per_student:
            raise ValueError("optim.unlabelled_batch_size must be divisible by resources.replicas_per_student")
        return self

    @property
    def num_students(self) -> int:
        return len(self.students)

    @property
    def num_workers(self) -> int:
        return self.num_students * self.resources.replicas_per_student


class SpecError(ValueError):
    """A spec that does not validate; the message names every bad field."""


def _did_you_mean(loc: tuple) -> str:
    """For an unknown field: the closest field its section has, if one is close."""
    section: Any = TrainConfig
    for part in (p for p in loc[:-1] if not isinstance(p, int)):  # list indices: same section
        field = section.model_fields.get(part)
        if field is None:
            return ""
        section = next((t for t in (field.annotation, *get_args(field.annotation))
                        if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if section is None:
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid spec {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown field" + _did_you_mean(e["loc"]) if e["type"] == "extra_forbidden" else e["msg"]
        got = repr(e.get("input"))
        got = got if len(got) <= 80 else got[:77] + "..."  # a value, not a whole section
        lines.append(f"  {field}: {msg}" if e["type"] == "missing" else f"  {field}: {msg} (got {got})")
    return "\n".join(lines)


# What a spec may be: a small file of plain YAML. PyYAML has no limits of its own, so the
# loader below refuses aliases (a 300-byte alias bomb expands to gigabytes) and nesting
# deeper than any spec needs (50,000 brackets overflow the parser's stack).
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_DEPTH = 32


class _SpecLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:  # a key given twice would silently keep its last value
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in keys:
                raise SpecError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            keys.add(key)
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise SpecError(f"line {mark.line + 1}: YAML aliases (*name) are not allowed in a spec")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_SPEC_DEPTH:
                mark = self.peek_event().start_mark
                raise SpecError(f"line {mark.line + 1}: nested deeper than {MAX_SPEC_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml(text: str, source: str):
    """Plain YAML (no aliases, bounded depth) -> Python values; SpecError naming `source`."""
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise SpecError(f"{source}: {value_error_reason(e)}") from None


def read_spec_file(path: str | os.PathLike) -> dict:
    """A spec file's sections: at most MAX_SPEC_BYTES of UTF-8 plain YAML, a mapping at the top."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file not found: {p}")
    if p.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(f"{p}: {p.stat().st_size:,} bytes; a spec is at most {MAX_SPEC_BYTES:,}")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SpecError(f"{p}: line {line}: not UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    raw = parse_yaml(text, str(p)) or {}
    if not isinstance(raw, dict):
        raise SpecError(f"{p}: the top level must be a mapping of sections")
    return raw


def set_field(raw: dict, dotted: str, value: Any) -> None:
    """raw['a']['b'][0]['c'] = value for dotted 'a.b.0.c' (list items by index, which must
    exist); SpecError naming the path where it does not fit the spec's shape."""
    parts = dotted.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        here = ".".join(parts[:i + 1])
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SpecError(f"{dotted}: {here}: no such item (the list has {len(node)}: "
                                f"0..{len(node) - 1})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise SpecError(f"{dotted}: {'.'.join(parts[:i])} is a value, not a section")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        parsed = parse_yaml(value, f"--set {key}") if value != "" else None
        try:
            set_field(raw, key, parsed)
        except SpecError as e:
            raise SpecError(f"--set {e}") from None
    return raw


def load_spec(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML spec (None = the embedded default), apply overrides, validate in full."""
    source = str(path) if path else "(default)"
    raw: dict = read_spec_file(path) if path else {}
    if overrides:
        if "students" in raw or any(o.startswith("students.") for o in overrides):
            raw.setdefault("students", [s.model_dump() for s in _default_students()])
        raw = apply_overrides(raw, overrides)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_format_errors(e, source)) from None


# Fields earlier versions wrote into checkpoints' specs and this one no longer has.
RETIRED_FIELDS = {"schedule": ("eval_samples",)}


def checkpoint_spec(raw: dict) -> TrainConfig:
    """A checkpoint's recorded spec, validated. Retired fields are dropped, so that checkpoints
    written by earlier versions keep loading; anything else unknown still fails."""
    raw = {**raw, **{section: {k: v for k, v in raw[section].items() if k not in retired}
                     for section, retired in RETIRED_FIELDS.items() if isinstance(raw.get(section), dict)}}
    return TrainConfig.model_validate(raw)


def dump_spec(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
