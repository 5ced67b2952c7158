"""Inference from a checkpoint: what `seminar evaluate` and the endpoint run."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, export, storage
from .config import checkpoint_spec
from .data.transforms import model_input
from .models import Ensemble, build_model

# Upsample at most this many probability values at once when restoring a large image.
RESTORE_CHUNK_VALUES = 32 * 2**20
WHICH = ("best_teacher", "primary_teacher", "primary_student", "teacher_ensemble")


def resolve_which(which: str, meta: dict) -> str:
    """The network that answers for `which`: `teacher_<k>`, `teacher_ensemble` or
    `primary_student`; best_teacher reads the checkpoint's choice (`served`, made by
    validation mIoU when it was written)."""
    if which == "best_teacher":
        return meta.get("served") or "teacher_0"
    return "teacher_0" if which == "primary_teacher" else which


def _networks(served: str, num_students: int) -> tuple[list[int], str]:
    """(students, 'teacher' or 'student') whose weights answer for a resolved network."""
    if served == "teacher_ensemble":
        return list(range(num_students)), "teacher"
    if served == "primary_student":
        return [0], "student"
    k = served.removeprefix("teacher_") if isinstance(served, str) else ""
    if not (served.startswith("teacher_") and k.isascii() and k.isdigit() and int(k) < num_students):
        # a meta.json edited by hand, or not ours: refused by name, not an IndexError later
        raise ValueError(f"the checkpoint serves {served!r}, which is not one of its {num_students} students' "
                         f"networks (teacher_0..teacher_{num_students - 1}, teacher_ensemble, primary_student)")
    return [int(k)], "teacher"


RUNTIMES = ("torch", "onnx")
log = logging.getLogger(__name__)


class Segmenter:
    """The served model: by default the teacher (or teachers' ensemble) that scored best on
    validation when the checkpoint was written (EMA weights generalise better); or the
    primary student's teacher, the primary student, or the mean of all teachers.

    It runs on eager PyTorch or, as an exported graph, on ONNX Runtime (`seminar.export`);
    either way `network` maps normalised images to class probabilities."""

    def __init__(self, network: Callable[[torch.Tensor], torch.Tensor], meta: dict, which: str,
                 device: str | torch.device = "cpu", runtime: str = "torch"):
        self.network, self.meta, self.which, self.runtime = network, meta, which, runtime
        spec = checkpoint_spec(meta["spec"])
        # The model's own preprocessing: the scale it was trained and validated at, the long
        # side bounded by the spec's serving.infer_size.
        self.scale, self.max_long_side = spec.data.load_scale, spec.serving.infer_size
        self.device = torch.device(device)
        self.classes: list[str] = list(meta["classes"])
        self.palette: list[tuple[int, int, int]] = [tuple(c) for c in meta["palette"]]
        self.version: str = meta["version"]

    @property
    def metadata(self) -> dict:
        return {k: self.meta[k] for k in ("version", "classes", "palette", "click_source", "metrics", "step",
                                          "code_version", "created")} | {"which": self.which, "runtime": self.runtime}

    @classmethod
    def load(cls, uri: str, which: str | None = None, device: str | torch.device = "cpu",
             runtime: str = "torch", threads: int | None = None) -> "Segmenter":
        """A checkpoint directory, or a run directory (its latest checkpoint); local or s3://;
        or a graph written by `seminar models export` (`.onnx`: runs on ONNX Runtime).

        runtime `onnx` exports the network (cached by its weights) and runs it on ONNX
        Runtime with `threads` intra-op threads; where that cannot be done (the export
        fails, or no CUDA provider for device cuda) it says so in the log and runs eager."""
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if uri.endswith(".onnx"):
            return cls._load_graph(uri, which, device, threads)
        uri = checkpoint.resolve(uri)
        meta = checkpoint.read_meta(uri)
        missing = [key for key in ("spec", "classes", "palette", "version") if key not in meta]
        if missing:
            raise checkpoint.CheckpointError(f"{uri}: {checkpoint.META} has no {', '.join(missing)}")
        cfg = checkpoint_spec(meta["spec"])
        which = which or cfg.method.inference
        teachers = [f"teacher_{k}" for k in range(cfg.num_students)]
        if which not in (*WHICH, *teachers):
            raise ValueError(f"which must be one of {', '.join((*WHICH, *teachers))}; got {which!r}")
        which = resolve_which(which, meta)
        ks, network = _networks(which, cfg.num_students)
        # Only the weights that answer (from S3, the optimizer state and the other students stay there).
        directory = checkpoint.local_copy(uri, [checkpoint.weights_file(k, network) for k in ks])
        models = []
        for k in ks:
            spec = cfg.students[k]
            net = build_model(spec.model, len(meta["classes"]), spec.output_stride, decoder_channels=spec.decoder_channels)
            net.load_state_dict(checkpoint.read_weights(directory, k, network))
            models.append(net.eval())  # exported on the CPU, then moved
        eager = models[0] if len(models) == 1 else Ensemble(models)
        if runtime == "onnx":
            try:
                graph = export.cached_export(eager, export.graph_metadata(meta, which))
                return cls(export.OnnxNetwork(graph, threads, str(device)), meta, which, device, "onnx")
            except Exception as e:  # noqa: BLE001 - any exporter or runtime failure: eager still answers
                log.warning("%s: serving eager PyTorch, the ONNX export failed: %s", uri, " ".join(str(e).split())[:300])
        return cls(export.Probabilities(eager).to(device), meta, which, device)

    @classmethod
    def _load_graph(cls, uri: str, which: str | None, device: str | torch.device, threads: int | None) -> "Segmenter":
        graph = storage.read_bytes(uri)
        meta = export.read_metadata(graph, uri)
        missing = [key for key in ("spec", "classes", "palette", "version", "served") if key not in meta]
        if missing:
            raise export.ExportError(f"{uri}: its '{export.METADATA_KEY}' metadata has no {', '.join(missing)}")
        if which not in (None, "best_teacher", meta["served"]):
            raise ValueError(f"{uri} holds one network ({meta['served']}), not {which}")
        return cls(export.OnnxNetwork(graph, threads, str(device)), meta, meta["served"], device, "onnx")

    @torch.no_grad()
    def predict_probs(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] normalised images -> [B,C,H/4,W/4] class probabilities (the decoder's stride,
        rounded up; `restore_size` takes them to any size)."""
        return self.network(images.to(self.device))

    def model_input(self, image: np.ndarray, max_long_side: int | None = None) -> torch.Tensor:
        """An original uint8 [H,W,3] RGB image as this model takes it: normalised [3,h,w]."""
        return model_input(image, self.scale, max_long_side or self.max_long_side)

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An original uint8 [H,W,3] RGB image -> (uint8 label map [H,W], float32 confidence
        [H,W]) at its own size: what the endpoint answers."""
        probs = self.predict_probs(self.model_input(image).unsqueeze(0))[0]
        return restore_size(probs.cpu(), *image.shape[:2])


@torch.no_grad()
def restore_size(probs: torch.Tensor, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """[C, h, w] probabilities -> (uint8 labels, float32 confidence), both [height, width].

    Upsampled bilinearly as log-probabilities: they differ from the logits by one value per
    pixel, so the labels are the argmax of the upsampled logits, what validation scores (and
    sharper boundaries than upsampled labels); the confidence is their softmax's maximum. A
    few classes at a time, with a running maximum and log-sum-exp, so that a 16-megapixel
    answer never holds all C upsampled planes at once.
    """
    if probs.shape[-2:] == (height, width):
        confidence, labels = probs.max(0)
        return labels.to(torch.uint8).numpy(), confidence.numpy().astype(np.float32, copy=False)
    log_probs = probs.float().clamp_min(1e-30).log()
    chunk = max(1, RESTORE_CHUNK_VALUES // (height * width))
    best = labels = total = None
    for start in range(0, probs.shape[0], chunk):
        part = F.interpolate(log_probs[None, start:start + chunk], size=(height, width), mode="bilinear",
                             align_corners=False)[0]
        part_best, part_labels = part.max(0)
        part_total = part.logsumexp(0)
        if best is None:
            best, labels, total = part_best, part_labels, part_total
        else:
            better = part_best > best  # ties keep the lower class id, as a full argmax would
            best = torch.where(better, part_best, best)
            labels = torch.where(better, part_labels + start, labels)
            total = torch.logaddexp(total, part_total)
    confidence = (best - total).exp()
    return labels.to(torch.uint8).numpy(), confidence.numpy().astype(np.float32, copy=False)
