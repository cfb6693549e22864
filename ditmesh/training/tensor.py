"""Tensor parallelism in training: the model's tensor plan (`ditmesh.parallel.tensor`), with gradients.

`ditmesh.parallel.tensor.apply` shards every block's linears over the "tensor" ranks as DTensors
(colwise q/k/v and MLP up projections, rowwise output projections, sharded AdaLN); DTensor's
backward puts the all-reduces where the gradients need them, and the per-head norm weights'
partial gradients are summed by the hooks `apply` installs. Each rank's optimizer updates its
own shards. Every rank of a tensor group trains on the same examples and computes the same
loss.

With data (or fsdp) ranks as well, FSDP2 wraps the sharded model over the (data, fsdp) mesh:
HSDP over replicas that are themselves tensor-parallel (torch's 2-D composition: one root mesh).
Full fine-tune only: LoRA adapters would need a sharding plan of their own.
"""

from __future__ import annotations

from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ditmesh.models import adapter_for
from ditmesh.parallel import tensor as tp
from ditmesh.parallel.tensor import ShardSpec
from ditmesh.training.fsdp import gather_full, shard
from ditmesh.training.strategy import Strategy, trainable


class TensorStrategy(Strategy):
    """The transformer sharded by its tensor plan; FSDP2 over the data axes when there are any."""

    def __init__(self, model: nn.Module, config: Any, mesh: Any, recipe: Any, device: torch.device):
        super().__init__(model, config, mesh, recipe, device)
        adapter = adapter_for(model)
        self.specs = tp.shard_specs(model, adapter.tensor_plan, config.tensor_degree)  # raises before sharding
        tp.apply(model, mesh.parallel, adapter, mesh.parallel.config)
        self.fsdp = config.batch_ranks > 1
        replicated = _replicated_in_attention(model, adapter.tensor_plan)
        if self.fsdp:
            shard(model, mesh)
        self.replicated = [model.get_parameter(name) for name in replicated]  # FSDP's parameter objects

    def no_sync(self, last: bool) -> ContextManager:
        if self.fsdp:
            self.module.set_requires_gradient_sync(last)
        return super().no_sync(last)

    def finish_gradients(self) -> None:
        # The per-head norm weights see only this rank's heads: `apply`'s hooks sum their
        # gradients over the tensor group, but FSDP2 replaces the parameter objects those hooks
        # sit on, so under FSDP the sum is done here, on the reduced (sharded) gradients.
        if not self.fsdp:
            return
        group = self.mesh.group("tensor")
        for param in self.replicated:
            if param.grad is not None:
                dist.all_reduce(param.grad.to_local(), group=group)

    @property
    def owns_loss(self) -> bool:
        return self.mesh.rank("tensor") == 0

    def full_state(self) -> dict[str, torch.Tensor]:
        degree = self.config.tensor_degree
        return gather_full(trainable(self.base), fix=lambda name, full: checkpoint_order(full, self.specs.get(name), degree))


def _replicated_in_attention(model: nn.Module, plan: Any) -> list[str]:
    """Names of the trainable parameters of the planned attention modules that tensor parallelism leaves whole."""
    return [f"{prefix}.{name}" for prefix, module in plan.attention_modules(model).items()
            for name, param in module.named_parameters() if param.requires_grad and not isinstance(param, DTensor)]


def checkpoint_order(full: torch.Tensor, spec: ShardSpec | None, degree: int) -> torch.Tensor:
    """A gathered tensor-parallel weight in the checkpoint's (serial model's) layout.

    A packed-rowwise weight's global DTensor view is in rank order ([a_0, b_0, a_1, b_1, ...]
    along its split dim); the serial layout is [a_0, a_1, ..., b_0, b_1, ...]. Others are unchanged.
    """
    if spec is None or spec.dim is None or len(spec.blocks) < 2:
        return full
    sizes = [size // degree for _ in range(degree) for size in spec.blocks]
    chunks = full.split(sizes, dim=spec.dim)  # chunks[rank * num_blocks + block]
    blocks = len(spec.blocks)
    return torch.cat([chunks[rank * blocks + block] for block in range(blocks) for rank in range(degree)], dim=spec.dim)
