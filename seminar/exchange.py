"""How students hand each other their teachers' predictions.

The training loop (`seminar.engine`) only sees the `Exchange` interface: it publishes the
compact prediction of each student it hosts for a step, and collects its peers'
predictions for the same step. `InProcessExchange` serves all students in one process;
`cluster.object_store.RayExchange` carries the same calls through the Ray object store.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CompactPrediction:
    """A teacher's prediction as sent to peers: 2 bytes per pixel instead of 4·C."""

    label: np.ndarray  # uint8 [B, H, W]
    confidence: np.ndarray  # uint8 [B, H, W], softmax max-probability × 255

    @classmethod
    def from_probs(cls, probs: torch.Tensor) -> "CompactPrediction":
        conf, label = probs.max(dim=1)
        return cls(
            label=label.to(torch.uint8).cpu().numpy(),
            confidence=(conf * 255).round().to(torch.uint8).cpu().numpy(),
        )

    @property
    def nbytes(self) -> int:
        return self.label.nbytes + self.confidence.nbytes


class Exchange(ABC):
    """Publish/collect of compact predictions, keyed by (step, student).

    `collect(step, student)` returns the predictions of every *other* student for that
    step (same data shard), ordered by student index, blocking until they have all been
    published. An entry is dropped once every peer has collected it.
    """

    num_students: int

    @abstractmethod
    def publish(self, step: int, student: int, pred: CompactPrediction) -> None: ...

    @abstractmethod
    def collect(self, step: int, student: int) -> list[CompactPrediction]: ...

    def close(self) -> None:  # pragma: no cover - optional
        pass


class InProcessExchange(Exchange):
    """All students in one process: a dict, with the same drop-after-read rule."""

    def __init__(self, num_students: int):
        self.num_students = num_students
        self._entries: dict[tuple[int, int], CompactPrediction] = {}
        self._reads: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def publish(self, step: int, student: int, pred: CompactPrediction) -> None:
        with self._lock:
            self._entries[(step, student)] = pred
            self._reads[(step, student)] = 0

    def collect(self, step: int, student: int) -> list[CompactPrediction]:
        peers = [j for j in range(self.num_students) if j != student]
        with self._lock:
            missing = [j for j in peers if (step, j) not in self._entries]
            if missing:
                raise RuntimeError(
                    f"in-process exchange: step {step} has no prediction from student(s) {missing}; "
                    "the loop must publish every hosted student before collecting")
            out = []
            for j in peers:
                key = (step, j)
                out.append(self._entries[key])
                self._reads[key] += 1
                if self._reads[key] == self.num_students - 1:
                    del self._entries[key], self._reads[key]
            return out

    def __len__(self) -> int:
        return len(self._entries)
