"""Pipeline parallelism with `torch.distributed.pipelining`: blocks split into stages, microbatches.

The transformer's blocks are split over the "pipeline" ranks by the model's stage plan (the
same balanced split PipeFusion uses: `keep_stage`); each rank keeps only its stage's blocks
(plus the embedders on the first stage and the output head on the last). A `PipelineStage`
wraps the stage and a GPipe or 1F1B schedule from torch runs each rank's batch as
`microbatches` microbatches: stage k's activations go to stage k+1 by point-to-point sends,
gradients come back the same way.

Between stages travel (image tokens, text tokens, the conditioning inputs); every stage rebuilds
its block arguments (time embedding, RoPE) with the stage plan's `block_kwargs`, so the
modules that compute them sit on every stage and their gradients are summed over the pipeline
group in `finish_gradients` (as Megatron does for embeddings tied across stages).

Composes with data: each stage is replicated over the data axis by FSDP2 (HSDP with one
shard per replica), whose gradient reduction the schedule runs on the last microbatch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.nn.attention import sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ditmesh.models import adapter_for
from ditmesh.parallel.pipefusion import keep_stage
from ditmesh.plans import Patch, StagePlan
from ditmesh.training.fsdp import gather_full, shard
from ditmesh.training.objective import flow_matching_example, flow_matching_loss
from ditmesh.training.strategy import TRAINING_ATTENTION, Strategy

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class PipelineStrategy(Strategy):
    """This rank's pipeline stage, driven by a torch.distributed.pipelining schedule."""

    def __init__(self, model: nn.Module, config: Any, mesh: Any, recipe: Any, device: torch.device):
        super().__init__(model, config, mesh, recipe, device)
        plan = adapter_for(model).stage_plan
        index, num_stages = mesh.rank("pipeline"), mesh.size("pipeline")
        global_names = {id(param): name for name, param in model.named_parameters()}
        blocks = keep_stage(model, plan, index, num_stages)  # drops the other stages' weights
        self.stage_module = StageModule(model, blocks, plan, recipe, first=index == 0, last=index == num_stages - 1,
                                        checkpointing=config.gradient_checkpointing, autocast=self.autocast)
        self.names = {local: global_names[id(param)] for local, param in self.stage_module.named_parameters()}
        shared = [local for local, param in self.stage_module.named_parameters()
                  if param.requires_grad and _on_every_stage(self.names[local], plan)]
        self.module = self.stage_module
        if mesh.size("data") > 1:
            # Replicas of each stage: FSDP2 with a shard degree of 1 (HSDP), which the schedule
            # syncs on the last microbatch. (DDP's reducer miscounts a stage's microbatch backwards.)
            shard(model, mesh, root=self.stage_module)
        self.shared = [self.stage_module.get_parameter(local) for local in shared]  # FSDP's parameter objects
        self.stage = PipelineStage(self.module, index, num_stages, device, group=mesh.group("pipeline"))
        # Each microbatch's mean loss, scaled so that the gradients add up to the mean over the
        # step's examples. Not the schedule's scale_grads: it divides every gradient the stage
        # holds after each run, so it would shrink the earlier micro-steps' again.
        self.loss_scale = config.num_microbatches * config.gradient_accumulation
        self.schedule = SCHEDULES[config.pipeline_schedule](
            self.stage, config.num_microbatches, scale_grads=False,
            loss_fn=lambda out, target: flow_matching_loss(out, target) / self.loss_scale)

    def forward_backward(self, batch: dict[str, torch.Tensor], micro_step: int, last: bool) -> torch.Tensor:
        inputs, target = flow_matching_example(self.recipe, self.base.config, batch, micro_step, self.config.seed,
                                               self.config.guidance, self.device)
        args = [inputs[name] for name in self.recipe.batch_inputs if inputs.get(name) is not None]
        self.stage_module.set_inputs(self.recipe, inputs)  # ids: no batch dim, so not split into microbatches
        losses: list[torch.Tensor] = []
        with sdpa_kernel(TRAINING_ATTENTION):  # the schedule runs the forwards and the backwards
            if self.stage.is_first:
                self.schedule.step(*args)  # every rank of the data group holds the same batch; stage 0 feeds it
            elif self.stage.is_last:
                self.schedule.step(target=target, losses=losses)
            else:
                self.schedule.step()
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack(losses).mean().detach() * self.loss_scale

    def finish_gradients(self) -> None:
        # Modules every stage runs (the time/text embedder) got a partial gradient on each stage.
        group = self.mesh.group("pipeline")
        for param in self.shared:
            if param.grad is not None:
                grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
                dist.all_reduce(grad, group=group)

    @property
    def owns_loss(self) -> bool:
        return self.stage.is_last

    def full_state(self) -> dict[str, torch.Tensor]:
        params = {self.names[local]: param for local, param in self.stage_module.named_parameters() if param.requires_grad}
        mine = gather_full(params, everywhere=True)  # collective over the data replicas of this stage
        # Collective over the pipeline group; the data replicas hold copies, so each gathers its own.
        stages: list[Any] = [None] * self.mesh.size("pipeline")
        dist.all_gather_object(stages, mine, group=self.mesh.group("pipeline"))
        return {name: tensor for stage in stages for name, tensor in stage.items()}

    def checkpoint_module(self) -> nn.Module:
        return self.stage_module

    @property
    def checkpoint_prefix(self) -> str:
        # keep_stage renumbers the kept blocks from 0 on every stage: keep the stages' keys apart.
        return f"stage{self.stage.stage_index}."


class StageModule(nn.Module):
    """One pipeline stage of a transformer, as the plain tensor-in, tensor-out module
    `PipelineStage` needs. Inputs and outputs, per microbatch:

    - first stage: the model's batch inputs (latent tokens, text embeddings, conditioning);
    - other stages: (image tokens (B, N, D), text tokens (B, T, D), conditioning...);
    - last stage returns the prediction in the target's layout.
    """

    def __init__(self, model: nn.Module, blocks: list[nn.Module], plan: StagePlan, recipe: Any, *, first: bool,
                 last: bool, checkpointing: bool, autocast: Any):
        super().__init__()
        self.model = model  # holds only this stage's blocks now (and its embedders / head)
        self._blocks = blocks  # a plain list: the model registers them already
        self.plan, self.first, self.last = plan, first, last
        self.checkpointing, self.autocast = checkpointing, autocast
        self.conditioning_names: tuple[str, ...] = ()
        self.static: dict[str, torch.Tensor] = {}

    def set_inputs(self, recipe: Any, inputs: dict[str, Any]) -> None:
        """Record which batch inputs are conditioning and this step's static ones (positional ids)."""
        names = [name for name in recipe.batch_inputs if inputs.get(name) is not None]
        self.image_name, self.text_name, *conditioning = names
        self.conditioning_names = tuple(conditioning)
        self.static = {name: inputs[name] for name in recipe.static_inputs}

    def forward(self, image: torch.Tensor, text: torch.Tensor, *conditioning: torch.Tensor):
        kwargs = {**self.static, **dict(zip(self.conditioning_names, conditioning)), self.text_name: text}
        with self.autocast():
            grid = self.plan.grid(self.model, image, kwargs)
            patch = Patch(0, grid.rows, grid)  # the whole image: training runs every token
            if self.first:
                image, text = self.plan.embed_image(self.model, image, kwargs, patch), self.plan.embed_text(self.model, kwargs)
            else:
                image, text = _ContiguousGrad.apply(image), _ContiguousGrad.apply(text)
            block_kwargs = self.plan.block_kwargs(self.model, kwargs, patch)
            for block in self._blocks:
                text, image = self._run(block, image, text, block_kwargs)
            if self.last:
                return self.plan.head(self.model, image, block_kwargs, tuple(image.shape))
        # Sent to the next stage: P2P needs contiguous tensors (a single-stream block returns slices).
        return (image.contiguous(), text.contiguous(), *conditioning)

    def _run(self, block: nn.Module, image: torch.Tensor, text: torch.Tensor, block_kwargs: dict) -> tuple:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(lambda i, t: block(hidden_states=i, encoder_hidden_states=t, **block_kwargs),
                              image, text, use_reentrant=False)
        return block(hidden_states=image, encoder_hidden_states=text, **block_kwargs)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    Hazard: the schedule receives this gradient on the previous stage into a buffer laid out
    like the gradient computed here; the blocks produce slices of bigger tensors (text and image
    split off one sequence), and a strided buffer cannot be received into."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _on_every_stage(name: str, plan: StagePlan) -> bool:
    owned = plan.blocks + plan.first_stage_modules + plan.last_stage_modules
    return not any(name == prefix or name.startswith(prefix + ".") for prefix in owned)
