"""The Ray cluster layer: seminar learning on Ray Train (one student per worker group).

`run_training(cfg, address)` is what `seminar train` calls; `build_trainer(cfg, run_name)`
is the `TorchTrainer` itself (Tune sweeps build it inside a function trainable);
`RayExchange` carries the students' teacher predictions through the object store.

Names are imported on first use (PEP 562): `seminar jobs ...` needs only `cluster.preflight`,
and should not pay for importing torch and Ray Train (~3 s) to list a cluster's jobs.
"""

import importlib

_WHERE = {
    "ExchangeBoard": "object_store", "ExchangeTimeout": "object_store", "RayExchange": "object_store",
    "PreflightError": "preflight", "ClusterUnreachable": "preflight", "InsufficientResources": "preflight",
    "StorageNotWritable": "preflight",
    "RunSummary": "trainer", "build_trainer": "trainer", "run_training": "trainer", "train_fn_per_worker": "trainer",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
