"""Data parallelism with torch's `DistributedDataParallel`: LoRA or full fine-tune.

Every rank of the "data" axis holds the whole transformer and trains on its share of each
batch; DDP averages the gradients over the data group during backward (bucketed all-reduces
overlapping the backward pass), so after the optimizer step every replica holds the weights a
serial run on the whole batch would. With LoRA only the adapters have gradients: DDP reduces
just those (a few MB for FLUX), the frozen base is never communicated.
"""

from __future__ import annotations

from typing import Any, ContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ditmesh.training.strategy import Strategy


class DDPStrategy(Strategy):
    """The transformer wrapped in `DistributedDataParallel` over the mesh's data axis."""

    def __init__(self, model: nn.Module, config: Any, mesh: Any, recipe: Any, device: torch.device):
        super().__init__(model, config, mesh, recipe, device)
        self.module = wrap_ddp(model, mesh, device)

    def no_sync(self, last: bool) -> ContextManager:
        # Gradient accumulation: reduce once, in the optimizer step's last backward.
        return super().no_sync(last) if last else self.module.no_sync()


def wrap_ddp(module: nn.Module, mesh: Any, device: torch.device) -> DistributedDataParallel:
    """`module` in DDP over the data axis (its replicas start equal: DDP broadcasts from the group's first rank)."""
    return DistributedDataParallel(
        module,
        process_group=mesh.group("data"),
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )
