"""Sequence parallelism in training (Ulysses, ring, or both), for long sequences.

`ditmesh.parallel.sequence.apply` splits each example's image tokens over the ring x ulysses
ranks (attention runs on all tokens through the all-to-all / ring exchange, which carry
gradients) and gathers the output, so every sequence rank computes the same full loss. Each
rank's parameter gradients are then its tokens' share; `reduce_sequence_grads` sums them into
the serial gradient.

With data ranks as well, DDP over the data axis averages the (partial) gradients across
replicas during backward, and the sequence sum follows: both are linear, so the order does not
matter.
"""

from __future__ import annotations

from typing import Any, ContextManager

import torch
from torch import nn

from ditmesh.models import adapter_for
from ditmesh.parallel import sequence
from ditmesh.training.ddp import wrap_ddp
from ditmesh.training.strategy import Strategy


class SequenceStrategy(Strategy):
    """Image tokens split over the sequence ranks; DDP over the data axis when there are replicas."""

    def __init__(self, model: nn.Module, config: Any, mesh: Any, recipe: Any, device: torch.device):
        super().__init__(model, config, mesh, recipe, device)
        sequence.apply(model, mesh.parallel, adapter_for(model), mesh.parallel.config)
        if config.data_degree > 1:
            self.module = wrap_ddp(model, mesh, device)

    def no_sync(self, last: bool) -> ContextManager:
        if last or self.module is self.base:
            return super().no_sync(last)
        return self.module.no_sync()

    def finish_gradients(self) -> None:
        sequence.reduce_sequence_grads(self.base, self.mesh.parallel)

    @property
    def owns_loss(self) -> bool:
        return self.mesh.parallel.rank("sequence") == 0
