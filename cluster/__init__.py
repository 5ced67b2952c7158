"""The Ray cluster layer: seminar learning on Ray Train (one student per worker group).

`run_training(cfg, address)` is what `seminar train` calls; `build_trainer(cfg, run_name)`
is the `TorchTrainer` itself (Tune sweeps build it inside a function trainable);
`RayExchange` carries the students' teacher predictions through the object store.
"""

from .object_store import ExchangeBoard, ExchangeTimeout, RayExchange
from .preflight import ClusterUnreachable, InsufficientResources, PreflightError, StorageNotWritable
from .trainer import RunSummary, build_trainer, run_training, train_fn_per_worker

__all__ = [
    "ExchangeBoard", "ExchangeTimeout", "RayExchange", "PreflightError", "ClusterUnreachable",
    "InsufficientResources", "StorageNotWritable", "RunSummary", "build_trainer",
    "run_training", "train_fn_per_worker",
]
