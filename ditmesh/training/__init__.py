"""Training diffusion transformers on many GPUs: LoRA or full fine-tune, serial or parallel.

    from ditmesh.training import TrainConfig, Trainer, TrainingWorker, train_on_runner

`TrainConfig` (frozen) picks the strategy by its degrees: data (DDP), fsdp (FSDP2, HSDP with
data), tensor (the model's tensor plan; x data/fsdp), ring/ulysses (sequence parallelism; x data),
pipeline (torch.distributed.pipelining over the stage plan; x data). One file per strategy:
ddp.py, fsdp.py, tensor.py, sequence.py, pipeline.py; `Trainer` (loop.py) runs them;
`TrainingWorker` (worker.py) runs a `Trainer` per rank behind a `DistributedRunner`, as
``ditmesh train`` does. Data: data.py (a folder of images + captions, encoded once across the
ranks and cached); objective.py (rectified flow with per-example seeded noise); lora.py (peft
adapters saved for ``pipe.load_lora_weights``); checkpoint.py (resumable, torch.distributed.checkpoint).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ditmesh.training.config import TrainConfig

# Torch-heavy pieces load on first use: the config stays importable in a CLI before any process starts.
_LAZY = {
    "Trainer": "ditmesh.training.loop",
    "TrainMesh": "ditmesh.training.mesh",
    "TrainingWorker": "ditmesh.training.worker",
    "train_on_runner": "ditmesh.training.worker",
    "write_shapes_dataset": "ditmesh.training.shapes",
}

__all__ = ["TrainConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ditmesh.training' has no attribute {name!r}")
