"""`Strategy`: how one rank runs its share of a training step. Serial training is this base class;
each parallel strategy is a subclass in its own file (ddp, fsdp, tensor, sequence, pipeline).

Per optimizer step the `Trainer` calls, on every rank:

    for each of the gradient_accumulation micro-steps:
        strategy.forward_backward(batch, micro_step, last=...)   # this rank's examples
    strategy.finish_gradients()                                  # reductions the engines do not do
    optimizer.step()                                             # over strategy.parameters()

Every strategy starts from the same model (same seed, same LoRA init) on every rank, so the
engines' wrapping (DDP, FSDP2, DTensor, pipelining) is all that differs from the serial run.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditmesh.training.config import TrainConfig
from ditmesh.training.objective import Recipe, flow_matching_example, flow_matching_loss


# SDPA kernels for training. Not cuDNN: its backward fails on an H200 at FLUX.1-dev's shapes
# (torch 2.11: "mha_graph.execute(...).is_good()" in backward; benchmarks/training.py), and the
# backward runs whichever kernel the forward chose.
TRAINING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Strategy:
    """Serial training in one process; the base of the parallel strategies."""

    def __init__(self, model: nn.Module, config: TrainConfig, mesh: Any, recipe: Recipe, device: torch.device):
        self.base = model
        """The transformer itself (unwrapped), under its own parameter names."""
        self.module: nn.Module = model
        """What runs the forward: the transformer or its engine wrapper (DDP, ...)."""
        self.config, self.mesh, self.recipe, self.device = config, mesh, recipe, device

    # ---- the step ---------------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates on this rank (its shards where sharded)."""
        return [param for param in self.module.parameters() if param.requires_grad]

    def forward_backward(self, batch: dict[str, torch.Tensor], micro_step: int, last: bool) -> torch.Tensor:
        """Forward and backward of this rank's `batch`; `last` marks the optimizer step's last
        micro-step (where gradients are synchronised). Returns the loss (mean over the batch), detached."""
        inputs, target = flow_matching_example(self.recipe, self.base.config, batch, micro_step, self.config.seed,
                                               self.config.guidance, self.device)
        with self.no_sync(last), sdpa_kernel(TRAINING_ATTENTION):
            with self.autocast():
                loss = flow_matching_loss(self.module(**inputs)[0], target)
            (loss / self.config.gradient_accumulation).backward()
        return loss.detach()

    def no_sync(self, last: bool) -> ContextManager:
        """Context of a micro-step's backward: engines skip their gradient reduction unless `last`."""
        return nullcontext()

    def autocast(self) -> ContextManager:
        """bf16 autocast of the forward under ``mixed_precision="bf16"``."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.mixed_precision == "bf16")

    def finish_gradients(self) -> None:
        """Reduce what the engines leave partial, after the last micro-step's backward (collective)."""

    @property
    def owns_loss(self) -> bool:
        """Whether this rank's loss counts once in the reported mean (False on ranks that hold a
        copy of another rank's loss, or none)."""
        return True

    # ---- state ------------------------------------------------------------------------------

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every trained parameter as a full tensor on the CPU, under the transformer's own names
        (what a serial run holds). Collective; complete on rank 0 at least."""
        return {name: param.detach().cpu().clone() for name, param in trainable(self.base).items()}

    def checkpoint_module(self) -> nn.Module:
        """The module whose state dict (with the optimizer's) a checkpoint saves."""
        return self.module

    @property
    def checkpoint_prefix(self) -> str:
        """Prefix of this rank's keys in a checkpoint: "" where ranks with the same key hold the
        same tensor (or shards of one DTensor); pipeline stages hold different ones under one name."""
        return ""


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter of every parameter that requires grad."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}
