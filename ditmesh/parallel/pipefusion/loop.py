"""PipeFusion's denoising loop: one rank's stage running its part of the static schedule, and the
transformer wrapper that hands the pipeline's per-step calls the pipelined trajectory.

PipeFusion owns the denoising loop: the last stage applies the flow-matching Euler update to each
finished patch and sends it straight back to stage 0, so the pipeline stays full across
diffusion steps. To reuse the pipeline's own code around the loop (prompt encoding, latents,
scheduler set-up, callbacks, VAE decode), the transformer is replaced by `PipeFusionTransformer`,
a module wrapper with the transformer's forward signature: at the first step it runs the whole
pipelined trajectory, then answers each of the pipeline's per-step calls with the prediction
that trajectory used, so the pipeline's own scheduler retraces it exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from ditmesh.config import ParallelConfig
from ditmesh.parallel import lora
from ditmesh.parallel.pipefusion.cache import StageCache
from ditmesh.parallel.pipefusion.exchange import StageExchange
from ditmesh.parallel.pipefusion.schedule import HIDDEN, Item, Schedule, Tick, build_items, build_schedule
from ditmesh.parallel.pipefusion.stages import keep_stage
from ditmesh.parallel.pipefusion.stale_kv import PatchContext, install_stale_kv
from ditmesh.plans import Grid, Patch, StagePlan


@dataclass
class StageTimes:
    """Where one stage's time went in one trajectory, item by item."""

    items: list[tuple[int, int, float, float]] = field(default_factory=list)
    """Per item: (step, first token row, seconds waiting for its input, seconds computing)."""


@dataclass
class _Posted:
    """A posted batch and the tensors it reads or fills (kept alive until it completes)."""

    works: list[dist.Work]
    tensors: tuple[torch.Tensor, ...]

    def wait(self) -> None:
        for work in self.works:
            work.wait()

    def done(self) -> bool:
        return all(work.is_completed() for work in self.works)


class Stage:
    """One rank's stage: its blocks, its end of the P2P exchange, and its part of the schedule."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], plan: StagePlan, group: dist.ProcessGroup,
                 context: PatchContext, sequence: Any = None, cache: StageCache | None = None):
        self.model, self.blocks, self.plan, self.group, self.context = model, blocks, plan, group, context
        self.cache = cache  # static step caching (cache.py) or None
        self.exchange = StageExchange(group)
        self.sequence = sequence  # the sequence-parallel context (Ulysses inside each stage) or None
        self.num_shards = dist.get_world_size(sequence.sequence_group) if sequence else 1
        self.shard = dist.get_rank(sequence.sequence_group) if sequence else 0
        self.stage, self.num_stages = self.exchange.stage, len(self.exchange.ranks)
        self.first, self.last = self.stage == 0, self.stage == self.num_stages - 1
        self.last_rank = self.exchange.ranks[-1]
        self.sized_for: tuple | None = None  # the latent signature the stale-K/V buffers were sized for

    def run(self, items: list[Item], step_kwargs: Callable[[int], dict], latent: torch.Tensor,
            update: Callable[[torch.Tensor, int, Item, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
            hidden_shape: Callable[[Patch], tuple[int, ...]], times: StageTimes) -> list[tuple[Item, torch.Tensor]]:
        """Run this stage's ticks of the schedule of `items`; the last stage returns [(item, raw
        prediction)], the others [].

        `latent` is the model-input latent at the first step (every stage holds a copy; stage 0
        and the last stage keep theirs up to date); `update(prediction, step, item, x_patch)`
        returns (prediction to record, updated x_patch); `hidden_shape(patch)` is the shape of
        the [text, image] tokens a patch carries between stages.
        """
        schedule = build_schedule(items, self.num_stages)
        self.exchange.connect(latent.device)
        run = _Run(self, schedule, step_kwargs, latent.clone(), update, hidden_shape, times)
        # A new latent size or batch: the first item (re)allocates the stale-K/V buffers of every
        # layer, eagerly, so that the compiled blocks never trace an allocation.
        signature = (tuple(latent.shape), latent.dtype, latent.device)
        run.eager_first, self.sized_for = signature != self.sized_for, signature
        # A lone whole-image warm-up item per trajectory (warmup_steps=1, the default) runs eagerly
        # in every call: compiled, its shape would first be compiled in the second call (the first
        # call runs it eagerly, above), a compile the user meets after the "first call". Two or
        # more whole items compile theirs in the first call.
        whole = [item for item in items if item.patch.num_tokens == item.patch.grid.rows * item.patch.grid.cols]
        run.eager_whole = len(whole) == 1 and len(whole) < len(items)
        for tick in schedule.program(self.stage):
            run.tick(tick)
        run.finish()
        return run.outputs

    def compute(self, item: Item, kwargs: dict, received: torch.Tensor, latent: torch.Tensor,
                text: torch.Tensor | None) -> torch.Tensor:
        """Run this stage's blocks on one item: stage 0 embeds its latent patch, the others take the
        [text, image] tokens from the previous stage; the last stage returns the prediction."""
        plan, patch = self.plan, self.local(item.patch)
        self.context.enter(patch, received.device)
        if self.sequence:  # what the sequence-parallel split hook sets for a whole forward
            self.sequence.num_tokens, self.sequence.local_len = patch.num_tokens, patch.num_tokens // self.num_shards
        if self.first:
            image = plan.embed_image(self.model, received, kwargs, patch)[:, patch.shard_slice]
        else:
            num_text = received.shape[1] - patch.num_tokens // self.num_shards
            text, image = received[:, :num_text], received[:, num_text:]
        # Contiguous streams: a slice of the embedding or of the received [text, image] tokens has
        # other strides than a whole tensor, and each stride pattern is a recompile of the blocks.
        image, text = image.contiguous(), None if text is None else text.contiguous()
        block_kwargs = plan.block_kwargs(self.model, kwargs, patch)

        def call(blocks: list[nn.Module], text: torch.Tensor | None, image: torch.Tensor) -> tuple:
            for block in blocks:
                text, image = block(hidden_states=image, encoder_hidden_states=text, **block_kwargs)
            return text, image

        if self.cache is None:
            text, image = call(self.blocks, text, image)
        else:  # a cached step adds the stage's saved residual instead of running (most of) its blocks
            group = self.sequence.sequence_group if self.sequence else None
            text, image = self.cache.run(item.step, patch, self.first, self.blocks, text, image, call, group)
        if self.last:  # under Ulysses, the sequence plan's gather hook on the head collects the patch
            return plan.head(self.model, image, block_kwargs, tuple(latent[patch.latent(plan.latent_row_dim)].shape))
        return torch.cat([text, image], dim=1)  # (B, T + n, D): the text stream travels with the patch

    def local(self, patch: Patch) -> Patch:
        """`patch` as this rank holds it: its shard of the tokens under sequence parallelism."""
        return dataclasses.replace(patch, shard=self.shard, num_shards=self.num_shards)


class _Run:
    """One trajectory on one stage: the state between ticks (received tensors, posted batches)."""

    def __init__(self, stage: Stage, schedule: Schedule, step_kwargs, latent: torch.Tensor, update, hidden_shape,
                 times: StageTimes):
        self.stage, self.schedule, self.items = stage, schedule, schedule.items
        self.step_kwargs, self.latent, self.update, self.hidden_shape, self.times = step_kwargs, latent, update, hidden_shape, times
        self.dtype, self.device = stage.model.dtype, next(stage.model.parameters()).device
        self.text = stage.plan.embed_text(stage.model, step_kwargs(self.items[0].step)) if stage.first else None
        self.inbox: dict[int, tuple[torch.Tensor, _Posted]] = {}  # item -> its [text, image] tokens, on their way
        self.returning: list[tuple[int, torch.Tensor, _Posted]] = []  # stage 0: latent patches on their way back
        self.in_flight: list[_Posted] = []  # batches with a send not known to be complete
        self.outputs: list[tuple[Item, torch.Tensor]] = []
        self.eager_first = False  # run the first computed item eagerly (Stage.run sets it)
        self.eager_whole = False  # run whole-image items eagerly (Stage.run sets it)

    def tick(self, tick: Tick) -> None:
        """Compute this tick's item (if any), then post the tick's transfers as one batch."""
        result = self._compute(tick.compute) if tick.compute is not None else None
        send = (tick.send, result) if tick.send is not None else None
        recv = (tick.recv, self._receive_buffer(tick.recv)) if tick.recv is not None else None
        tensors = tuple(tensor for _, tensor in filter(None, (send, recv)))
        posted = _Posted(self.stage.exchange.post(send, recv), tensors)
        if recv is not None:
            self._expect(tick.recv, recv[1], posted)
        if send is not None:
            self.in_flight.append(posted)
        # Drop finished sends without blocking: nothing here waits on a batch whose data this
        # stage does not need yet (a wait only ever targets a batch of an earlier tick).
        self.in_flight = [posted for posted in self.in_flight if not posted.done()]

    def finish(self) -> None:
        for posted in self.in_flight:  # every send has its receive posted at the same tick by its peer
            posted.wait()

    def _compute(self, index: int) -> torch.Tensor:
        """Compute item `index`; return what this stage sends on (activations, or the updated latent patch)."""
        stage, item = self.stage, self.items[index]
        tic = time.perf_counter()
        received = self._input(index)
        tac = time.perf_counter()
        whole = item.patch.num_tokens == item.patch.grid.rows * item.patch.grid.cols
        eager = self.eager_first or (whole and self.eager_whole)
        self.eager_first = False
        eager = torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()
        with eager:
            result = stage.compute(item, self.step_kwargs(item.step), received, self.latent, self.text)
        if stage.last:
            region = item.patch.latent(stage.plan.latent_row_dim)
            prediction, self.latent[region] = self.update(result, item.step, item, self.latent[region])
            self.outputs.append((item, prediction))
            result = self.latent[region].clone()  # the send must not see later updates of these rows
        self.times.items.append((item.step, item.patch.row_start, tac - tic, time.perf_counter() - tac))
        return result.contiguous()

    def _input(self, index: int) -> torch.Tensor:
        """Item `index`'s input: stage 0 its latent patch (rows back from the last stage first), the
        others the [text, image] tokens the previous stage sent (waiting for the batch that brings them)."""
        if not self.stage.first:
            tokens, posted = self.inbox.pop(index)
            posted.wait()
            return tokens
        source = self.schedule.sources[index]
        while self.returning and source is not None and self.returning[0][0] <= source:
            item, rows, posted = self.returning.pop(0)
            posted.wait()
            self.latent[self.items[item].patch.latent(self.stage.plan.latent_row_dim)] = rows
        return self.latent[self.items[index].patch.latent(self.stage.plan.latent_row_dim)].clone()

    def _receive_buffer(self, move) -> torch.Tensor:
        patch = self.items[move.item].patch
        if move.kind == HIDDEN:
            return torch.empty(self.hidden_shape(self.stage.local(patch)), dtype=self.dtype, device=self.device)
        return torch.empty_like(self.latent[patch.latent(self.stage.plan.latent_row_dim)])

    def _expect(self, move, tensor: torch.Tensor, posted: _Posted) -> None:
        if move.kind == HIDDEN:
            self.inbox[move.item] = (tensor, posted)
        else:
            self.returning.append((move.item, tensor, posted))


# ---- the transformer wrapper ----------------------------------------------------------------

# A stage keeps its blocks renumbered from 0, so a LoRA's keys would name other blocks.
LORA_FIX = ("PipeFusion keeps only this rank's blocks; load LoRAs before parallelize (set_adapters, fuse_lora, "
            "unfuse_lora and unload_lora_weights also work after)")


class PipeFusionTransformer(nn.Module):
    """Stand-in for a FLUX/SD3 transformer that runs this rank's PipeFusion stage.

    Keeps the forward signature: ``wrapper(hidden_states=..., timestep=..., ...)``. The call of
    a trajectory's first step runs the whole pipelined denoising (all steps) from its latent;
    each call returns the prediction that trajectory applied at that step, so the pipeline's own
    flow-matching Euler scheduler reproduces it. Every rank of the pipefusion group must make the
    same calls (same pipeline arguments and seed). `cache`: static step caching inside the
    stages (`cache.py`), or None.
    """

    def __init__(self, model: nn.Module, plan: StagePlan, group: dist.ProcessGroup, config: ParallelConfig,
                 scheduler: Any, text_side: str | None, guidance_scale: Callable[[], float | None] = lambda: None,
                 cfg_group: dist.ProcessGroup | None = None, sequence: Any = None, cache: StageCache | None = None):
        super().__init__()
        ranks = dist.get_process_group_ranks(group)
        # Sequence-parallel attention always hands the local kernel [text, image].
        self.context = PatchContext(text_side="first" if sequence else text_side)
        self.model = model
        blocks = keep_stage(model, plan, ranks.index(dist.get_rank()), len(ranks))
        lora.mark_seen(model)  # LoRAs loaded before stay; later ones would land on renumbered blocks
        lora.refuse_loads(model, f"PipeFusion cannot apply LoRA adapters loaded after parallelize: {LORA_FIX}")
        install_stale_kv(blocks, self.context)
        self._stage = Stage(model, blocks, plan, group, self.context, sequence, cache)
        self._plan, self._config, self._scheduler, self._guidance_scale = plan, config, scheduler, guidance_scale
        self._cfg_group = cfg_group  # set when cfg=2 runs the other guidance branch on a peer pipeline
        self._predictions: dict[int, torch.Tensor] = {}
        self._last_step: int | None = None
        self._last_text: torch.Tensor | None = None
        self._timesteps: torch.Tensor | None = None  # the schedule of the pipeline call being served
        self.times = StageTimes()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)  # config, dtype, device, cache_context, ...

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True, **kwargs):
        step = self._step_of(timestep)
        text = kwargs.get("encoder_hidden_states")
        if self._scheduler.timesteps is not self._timesteps:
            # A new pipeline call (set_timesteps made a new schedule): the last call may have ended
            # at this step (one step, or cancelled after its first), which is not a second call.
            self._last_step, self._timesteps = None, self._scheduler.timesteps
        if self._last_step is not None and step == self._last_step and not _same(text, self._last_text):
            raise ValueError(
                "PipeFusion runs one denoiser call per step, but this pipeline called it twice at one step "
                "(FLUX true CFG: true_cfg_scale > 1 with a negative prompt); set true_cfg_scale=1"
            )
        if self._last_step is None or step <= self._last_step:
            self._run_trajectory(step, dict(kwargs, hidden_states=hidden_states, timestep=timestep))
        self._last_step, self._last_text = step, text
        out = self._predictions[step]
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)

    def _step_of(self, timestep: torch.Tensor) -> int:
        timesteps = self._scheduler.timesteps.to(timestep.device, torch.float64) / self._plan.timestep_divisor
        value = timestep.reshape(-1)[0].to(torch.float64)
        index = int(torch.argmin((timesteps - value).abs()))
        if not torch.isclose(timesteps[index], value, rtol=1e-2, atol=1e-6):  # bf16 timesteps round
            raise ValueError(
                f"timestep {value.item()} is not in the scheduler's schedule; PipeFusion needs the pipeline's "
                "FlowMatchEulerDiscreteScheduler after set_timesteps"
            )
        return index

    def _run_trajectory(self, start: int, kwargs: dict) -> None:
        lora.refuse_new_loras(self.model, "PipeFusion", LORA_FIX)  # every rank loaded the same: all raise
        plan, scheduler = self._plan, self._scheduler
        steps = range(start, len(scheduler.timesteps))
        latent_in = kwargs["hidden_states"]
        scale = self._guidance_scale()
        # Batched CFG in one pipeline: the model input is [x, x]. With cfg=2 this rank's pipeline
        # gets one branch (x) and the peer pipeline on the cfg axis the other.
        batched_cfg = scale is not None and self._cfg_group is None
        latent = latent_in.chunk(2)[0] if batched_cfg else latent_in
        grid = plan.grid(self.model, latent, kwargs)
        shards = self._stage.num_shards
        if grid.cols % shards:
            raise ValueError(
                f"width {grid.cols * 16} gives {grid.cols} token columns, which the {shards} sequence-parallel ranks "
                f"of each PipeFusion stage must divide; use a width that is a multiple of {16 * shards}"
            )
        # One token row is 16 image pixels for FLUX (VAE 8 x packing 2) and SD3 (VAE 8 x patch 2).
        items = build_items(steps, self._config.warmup_steps, grid, self._config.num_patches, height=grid.rows * 16)
        if self._stage.cache is not None:
            self._stage.cache.begin(steps, [item.patch for item in items])
        sigmas = scheduler.sigmas.to(latent.device)
        captured_t = kwargs["timestep"]

        def step_kwargs(step: int) -> dict:
            t = (scheduler.timesteps[step].to(captured_t.device, captured_t.dtype) / plan.timestep_divisor)
            return dict(kwargs, timestep=t.expand_as(captured_t).clone())

        def update(prediction, step, item, x_patch):
            if scale is not None and not batched_cfg:
                # The peer last stage is at the same item (identical schedules); both must reach
                # this all-gather for every patch, or the cfg group hangs.
                prediction_both = funcol.wait_tensor(funcol.all_gather_tensor(prediction.contiguous(), 0, self._cfg_group))
                v = _combine_cfg(prediction_both, scale)
            else:
                v = prediction if scale is None else _combine_cfg(prediction, scale)
            # Same arithmetic as FlowMatchEulerDiscreteScheduler.step (fp32 update, cast back).
            new = x_patch.to(torch.float32) + (sigmas[step + 1] - sigmas[step]) * v
            return prediction, new.to(x_patch.dtype)

        batch, text_len = latent_in.shape[0], kwargs["encoder_hidden_states"].shape[1]
        width = self.model.config.num_attention_heads * self.model.config.attention_head_dim

        def hidden_shape(patch: Patch) -> tuple[int, ...]:
            return (batch, text_len + patch.num_tokens // patch.num_shards, width)

        self.times = StageTimes()
        # With batched CFG the model input is [x, x]: each patch goes through the stages twice
        # batched, and the last stage updates both halves with the combined prediction.
        outputs = self._stage.run(items, step_kwargs, latent_in, _cfg_update(update, batched_cfg), hidden_shape, self.times)
        self._predictions = self._share_predictions(outputs, steps, latent_in, grid)

    def _share_predictions(self, outputs, steps: range, latent_in: torch.Tensor, grid: Grid) -> dict[int, torch.Tensor]:
        """Assemble the last stage's per-patch predictions per step; broadcast them to the group."""
        stage, dim = self._stage, self._plan.latent_row_dim
        out_shape = (len(steps),) + tuple(latent_in.shape)
        table = torch.empty(out_shape, dtype=latent_in.dtype, device=latent_in.device)
        for item, prediction in outputs:
            table[(item.step - steps.start,) + item.patch.latent(dim)] = prediction
        dist.broadcast(table, stage.last_rank, group=stage.group)
        return {step: table[step - steps.start] for step in steps}


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))


def _combine_cfg(prediction: torch.Tensor, scale: float) -> torch.Tensor:
    uncond, cond = prediction.chunk(2)  # batched CFG order of the diffusers pipelines: [negative, positive]
    return uncond + scale * (cond - uncond)


def _cfg_update(update, batched_cfg: bool):
    """With batched CFG the last stage keeps the [x, x] model input: update both halves alike."""
    if not batched_cfg:
        return update

    def cfg_update(prediction, step, item, x_patch_2B):
        raw, new = update(prediction, step, item, x_patch_2B.chunk(2)[0])
        return raw, torch.cat([new, new])

    return cfg_update
