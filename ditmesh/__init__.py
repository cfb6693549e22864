"""ditmesh: diffusion transformers and U-Nets on many GPUs.

    from ditmesh import ParallelConfig, parallelize
    pipe = parallelize(pipe, ParallelConfig(ulysses_degree=4))
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ditmesh.config import ParallelConfig

__version__ = "0.1.0"

# Heavy or optional pieces load on first use (the runner pulls in pyzmq, strategies diffusers).
_LAZY = {
    "ParallelMesh": "ditmesh.parallel.mesh",
    "parallelize": "ditmesh.parallel.parallelize",
    "valid_configs": "ditmesh.parallel.validate",
    "DistributedRunner": "ditmesh.runner.runner",
    "DistributedWorker": "ditmesh.runner.worker",
    "RemoteError": "ditmesh.runner.protocol",
    "WorkerDied": "ditmesh.runner.protocol",
    "RunnerBroken": "ditmesh.runner.protocol",
    "RanksStuck": "ditmesh.runner.protocol",
    "RequestCancelled": "ditmesh.runner.protocol",
    "DiffusionWorker": "ditmesh.runner.diffusion",
    "XFuserWorker": "ditmesh.runner.xfuser",
    "load_pipeline": "ditmesh.models.loading",
    "tiny_pipeline": "ditmesh.models.tiny",
    "TrainConfig": "ditmesh.training.config",
    "Trainer": "ditmesh.training.loop",
    "TrainingWorker": "ditmesh.training.worker",
}

__all__ = ["ParallelConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ditmesh' has no attribute {name!r}")
