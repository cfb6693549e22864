"""`Trainer`: one rank's live training state (model under its strategy, optimizer, step) and the loop.

    trainer = Trainer(config, transformer, dataset, mesh=mesh, output="lora/")
    trainer.resume()                 # from the latest checkpoint in lora/checkpoints, if any
    trainer.train(on_step=print)     # to config.steps, checkpointing every config.checkpoint_every
    trainer.save("lora/")            # diffusers LoRA (or the full transformer) from rank 0

Serial training (every degree 1) needs no process group: mesh=None. With a mesh, every rank
builds its `Trainer` from the same model and data and calls the same methods in the same order
(they are collective).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ditmesh.models import adapter_for
from ditmesh.parallel import tensor as tp
from ditmesh.training import checkpoint, data
from ditmesh.training.config import TrainConfig
from ditmesh.training.ddp import DDPStrategy
from ditmesh.training.fsdp import FSDPStrategy
from ditmesh.training.lora import add_lora, check_targets, save_full, save_lora
from ditmesh.training.objective import recipe_for
from ditmesh.training.pipeline import PipelineStrategy
from ditmesh.training.sequence import SequenceStrategy
from ditmesh.training.strategy import Strategy
from ditmesh.training.tensor import TensorStrategy


class Trainer:
    """Trains `model` (a diffusers transformer, same weights on every rank) on `dataset`
    (`data.CachedLatents`) with `config`'s strategy over `mesh` (a `TrainMesh`; None when serial).
    `strategy` overrides the class `strategy_class(config)` picks (e.g. DDP at one rank, to measure it)."""

    def __init__(self, config: TrainConfig, model: nn.Module, dataset: Any, *, mesh: Any = None,
                 device: torch.device | str | None = None, output: str | Path | None = None,
                 strategy: type[Strategy] | None = None):
        self.config, self.mesh, self.dataset = config, mesh, dataset
        self.device = torch.device(device) if device is not None else (mesh.device if mesh else torch.device("cpu"))
        self.output = Path(output) if output is not None else None
        if mesh is None and config.world_size > 1:
            raise ValueError(f"training with {config.parallel_str()} needs a TrainMesh over {config.world_size} processes")
        check_model(config, model)
        data.check_dataset_size(len(dataset), config.batch_size)
        prepare_model(model, config, self.device)
        self.strategy = (strategy or strategy_class(config))(model, config, mesh, recipe_for(model), self.device)
        self.optimizer = make_optimizer(self.strategy.parameters(), config)
        self.step = 0
        """Optimizer steps done."""
        self._batches: Iterator | None = None

    # ---- the loop ---------------------------------------------------------------------------

    def train(self, on_step: Callable[[dict[str, Any]], None] | None = None) -> list[float]:
        """Run optimizer steps up to ``config.steps``; return their losses. `on_step` gets each
        step's progress: step, of, loss (mean over the global batch), seconds, steps_per_s, examples_per_s."""
        losses = []
        while self.step < self.config.steps:
            started = time.perf_counter()
            loss = self.train_step()
            seconds = time.perf_counter() - started
            losses.append(loss)
            if self._checkpoint_due():
                self.save_checkpoint()
            if on_step is not None:
                examples = self.config.batch_size * self.config.gradient_accumulation
                on_step(dict(step=self.step, of=self.config.steps, loss=loss, seconds=seconds,
                             steps_per_s=1.0 / seconds, examples_per_s=examples / seconds))
        return losses

    def train_step(self) -> float:
        """One optimizer step over `gradient_accumulation` micro-steps; returns the global mean loss."""
        batches = self._batch_iterator()
        total = torch.zeros((), device=self.device)
        for micro in range(self.config.gradient_accumulation):
            micro_step, batch = next(batches)
            total += self.strategy.forward_backward(batch, micro_step, last=micro == self.config.gradient_accumulation - 1)
        self.strategy.finish_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return self._global_mean(total / self.config.gradient_accumulation)

    def _batch_iterator(self) -> Iterator:
        if self._batches is None:  # created here, not in __init__: resume() may move the start
            self._batches = data.batches(
                self.dataset, batch_size=self.config.batch_size, batch_rank=self.mesh.batch_rank if self.mesh else 0,
                batch_ranks=self.config.batch_ranks, seed=self.config.seed,
                start=self.step * self.config.gradient_accumulation)
        return self._batches

    def _global_mean(self, loss: torch.Tensor) -> float:
        # Each example's loss is held by exactly one "owner" rank per batch share (the others
        # hold copies, or none): the sum over owners / shares is the mean over the global batch.
        # Hazard: a collective every step; every rank gets here.
        if not dist.is_initialized() or self.mesh is None:
            return loss.item()
        value = loss.detach().float().reshape(1) if self.strategy.owns_loss else torch.zeros(1, device=self.device)
        dist.all_reduce(value)
        return value.item() / self.config.batch_ranks

    # ---- checkpoints and output -------------------------------------------------------------

    def _checkpoint_due(self) -> bool:
        every = self.config.checkpoint_every
        return self.output is not None and every > 0 and (self.step % every == 0 or self.step == self.config.steps)

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint of this step under ``output/checkpoints`` (collective)."""
        return checkpoint.save(self._need_output(), self.step, self.strategy, self.optimizer, self.config)

    def start_over(self) -> None:
        """Delete the output folder's checkpoints, so no later `resume` picks one up (collective)."""
        checkpoint.clear(self._need_output())

    def resume(self) -> int:
        """Continue from the latest complete checkpoint under the output folder, if there is one;
        return the step it restores (0: none). Collective; call before `train`."""
        self.step = checkpoint.load_latest(self._need_output(), self.strategy, self.optimizer, self.config)
        self._batches = None
        return self.step

    def full_state(self) -> dict[str, torch.Tensor]:
        """The trained parameters as full CPU tensors under the transformer's own names, on rank 0
        (what a serial run holds; LoRA adapters only, for LoRA). Collective."""
        return self.strategy.full_state()

    def save(self, folder: str | Path | None = None) -> Path:
        """Write the result (collective; rank 0 writes): a diffusers LoRA folder
        (``pipe.load_lora_weights(folder)``), or for a full fine-tune a model folder
        (``FluxTransformer2DModel.from_pretrained(folder)``). Returns the folder."""
        folder = Path(folder) if folder is not None else self._need_output()
        state = self.full_state()
        if not dist.is_initialized() or dist.get_rank() == 0:
            (save_lora if self.config.lora else save_full)(folder, self.strategy.base, state)
        if dist.is_initialized():
            dist.barrier()
        return folder

    def _need_output(self) -> Path:
        if self.output is None:
            raise ValueError("this Trainer has no output folder; pass output=... to write checkpoints")
        return self.output


# ---- set-up steps ---------------------------------------------------------------------------


def check_model(config: TrainConfig, model: nn.Module) -> None:
    """`ValueError` naming the fix if `config` cannot train `model` (no process group needed)."""
    recipe_for(model)
    adapter = adapter_for(model)
    if config.lora:
        check_targets(model, config.lora_targets)
    if config.tensor_degree > 1:
        if adapter.tensor_plan is None:
            raise ValueError(f"{adapter.name} has no tensor plan; set tensor=1")
        tp.check_degree(model, adapter.tensor_plan, config.tensor_degree)
    if config.pipeline_degree > 1:
        num_blocks = sum(len(getattr(model, attr)) for attr in adapter.stage_plan.blocks)
        if config.pipeline_degree > num_blocks:
            raise ValueError(f"pipeline={config.pipeline_degree} needs a block per stage but the model has "
                             f"{num_blocks} blocks; use pipeline <= {num_blocks}")


def prepare_model(model: nn.Module, config: TrainConfig, device: torch.device) -> None:
    """Add LoRA (or unfreeze everything), set dtypes (trained fp32, frozen bf16 under bf16 mixed
    precision), move to `device`, train mode. The same on every rank and in every strategy."""
    model.train()
    if config.lora:
        add_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets, config.seed)
    else:
        model.requires_grad_(True)
    frozen = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    for param in model.parameters():
        param.data = param.data.to(device=device, dtype=torch.float32 if param.requires_grad else frozen)
    for buffer in model.buffers():
        buffer.data = buffer.data.to(device)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()


def strategy_class(config: TrainConfig) -> type[Strategy]:
    """The strategy that runs `config`'s layout (hybrids: the outermost one composes the rest)."""
    if config.pipeline_degree > 1:
        return PipelineStrategy  # x data
    if config.tensor_degree > 1:
        return TensorStrategy  # x data / fsdp
    if config.sequence_degree > 1:
        return SequenceStrategy  # x data
    if config.fsdp_degree > 1:
        return FSDPStrategy  # x data: HSDP
    if config.data_degree > 1:
        return DDPStrategy
    return Strategy


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over this rank's trained parameters (shards where sharded)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
