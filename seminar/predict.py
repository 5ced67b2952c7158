"""Inference from a checkpoint: what `seminar evaluate` and the endpoint run."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import checkpoint
from .config import TrainConfig
from .data.transforms import normalize
from .models import build_model

WHICH = ("primary_teacher", "primary_student", "teacher_ensemble")


class Segmenter:
    """The served model: the primary student's EMA teacher by default (EMA weights
    generalise better), the primary student, or the mean of all teachers' probabilities."""

    def __init__(self, models: list[nn.Module], meta: dict, which: str, device: str | torch.device = "cpu"):
        self.models = [m.to(device).eval() for m in models]
        self.meta = meta
        self.which = which
        self.device = torch.device(device)
        self.classes: list[str] = list(meta["classes"])
        self.palette: list[tuple[int, int, int]] = [tuple(c) for c in meta["palette"]]
        self.version: str = meta["version"]

    @property
    def metadata(self) -> dict:
        return {k: self.meta[k] for k in ("version", "classes", "palette", "click_source", "metrics", "step",
                                          "code_version", "created")} | {"which": self.which}

    @classmethod
    def load(cls, uri: str, which: str | None = None, device: str | torch.device = "cpu") -> "Segmenter":
        meta = checkpoint.read_meta(uri)
        cfg = TrainConfig.model_validate(meta["spec"])
        which = which or cfg.method.inference
        if which not in WHICH:
            raise ValueError(f"which must be one of {WHICH}, got {which!r}")
        ks = range(cfg.num_students) if which == "teacher_ensemble" else [0]
        network = "student" if which == "primary_student" else "teacher"
        # Only the weights that answer (from S3, the optimizer state and the other students stay there).
        directory = checkpoint.local_copy(uri, [checkpoint.weights_file(k, network) for k in ks])
        models = []
        for k in ks:
            spec = cfg.students[k]
            net = build_model(spec.model, len(meta["classes"]), spec.output_stride, decoder_channels=spec.decoder_channels)
            net.load_state_dict(checkpoint.read_weights(directory, k, network))
            models.append(net)
        return cls(models, meta, which, device)

    @torch.no_grad()
    def predict_probs(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] normalised images -> [B,C,H,W] class probabilities."""
        images = images.to(self.device)
        probs = self.models[0](images).softmax(1)
        for m in self.models[1:]:
            probs += m(images).softmax(1)
        return probs / len(self.models)

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [H,W,3] RGB -> (uint8 label map [H,W], float32 confidence [H,W])."""
        probs = self.predict_probs(normalize(image).unsqueeze(0))[0]
        confidence, label = probs.max(0)
        return label.to(torch.uint8).cpu().numpy(), confidence.float().cpu().numpy()
