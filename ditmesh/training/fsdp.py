"""Fully sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Every parameter, its gradient and its optimizer state are split over the "fsdp" ranks (each
holds 1/F of every tensor, as a DTensor ``Shard(0)``), so a full fine-tune of a model too big
for one GPU's optimizer state fits; the ranks also split each batch, like data parallelism.
Each transformer block (the stage plan's block lists) is its own FSDP unit: its weights are
all-gathered just before its forward and backward and freed after, its gradients
reduce-scattered as backward leaves it. With ``data_degree > 1`` as well, the mesh is 2-D and
FSDP2 runs HSDP: sharded over fsdp inside each replica, gradients all-reduced across replicas.

The optimizer, built over the sharded parameters, keeps only this rank's shard of its state.
"""

from __future__ import annotations

from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ditmesh.models import adapter_for
from ditmesh.training.strategy import Strategy, trainable


class FSDPStrategy(Strategy):
    """The transformer sharded with FSDP2 over the data x fsdp ranks."""

    def __init__(self, model: nn.Module, config: Any, mesh: Any, recipe: Any, device: torch.device):
        super().__init__(model, config, mesh, recipe, device)
        shard(model, mesh)

    def no_sync(self, last: bool) -> ContextManager:
        # Gradient accumulation: keep unsharded gradients until the last micro-step, then reduce once.
        self.module.set_requires_gradient_sync(last)
        return super().no_sync(last)

    def full_state(self) -> dict[str, torch.Tensor]:
        return gather_full(trainable(self.base))


def shard(model: nn.Module, mesh: Any, root: nn.Module | None = None) -> None:
    """`fully_shard` each block of `model` (its stage plan's block lists), then the rest at the
    root (`model`, or a module holding it: a pipeline stage).

    Over the "fsdp" axis, or over the 2-D (data, fsdp) mesh (HSDP) when there are replicas; with
    fsdp=1 that is plain replication (DDP's semantics) run by FSDP2, which composes with DTensor
    tensor parallelism (one root mesh) and with torch.distributed.pipelining.
    """
    dp_mesh = mesh.submesh("data", "fsdp") if mesh.size("data") > 1 else mesh.submesh("fsdp")
    for attr in adapter_for(model).stage_plan.blocks:
        for block in getattr(model, attr):
            fully_shard(block, mesh=dp_mesh)
    fully_shard(root if root is not None else model, mesh=dp_mesh)


def gather_full(params: dict[str, nn.Parameter], fix: Any = None, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """Full CPU tensors of (possibly DTensor) `params`, kept on rank 0 (others return {} unless `everywhere`).

    Collective: every rank gathers every parameter, in the same (named_parameters) order.
    `fix(name, full)` may reorder a gathered tensor (tensor parallelism's packed layers).
    """
    keep = everywhere or not dist.is_initialized() or dist.get_rank() == 0
    state = {}
    for name, param in params.items():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        full = fix(name, full) if fix is not None else full
        if keep:
            state[name] = full.detach().cpu().clone()
    return state
