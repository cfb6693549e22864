"""PipeFusion: patch-level pipeline parallelism with stale activations, pipelined across steps.

The transformer's blocks are split into `pipefusion_degree` stages (one per rank of the
"pipefusion" mesh axis, balanced by the adapter's `StagePlan` block costs); each rank keeps only
its own blocks' weights. The image is cut into `num_patches` bands of token rows that flow
stage -> stage by point-to-point send/recv. In each attention a patch's own keys/values are fresh;
the other patches' come from a per-layer buffer holding their most recent values (this step if
that patch already passed the stage, else the previous step), as in PipeFusion (xDiT).

PipeFusion owns the denoising loop: the last stage applies the flow-matching Euler update to each
finished patch and sends it straight back to stage 0, so the pipeline stays full across
diffusion steps. To reuse the pipeline's own code around the loop (prompt encoding, latents,
scheduler set-up, callbacks, VAE decode), the transformer is replaced by `PipeFusionTransformer`,
a module wrapper with the transformer's forward signature: at the first step it runs the whole
pipelined trajectory, then answers each of the pipeline's per-step calls with the prediction
that trajectory used, so the pipeline's own scheduler retraces it exactly.

Text tokens travel with each patch through the stages (the patch's text stream sees fresh text
K/V and the [stale + fresh] image K/V), so with only warm-up steps the result is exact.

Composes with cfg (each cfg rank runs a pipeline on one guidance branch; the last stages
all-gather per patch to combine guidance) and with Ulysses inside each stage (the patch's tokens
are sharded; the stale K/V are spliced in after the all-to-all, on this rank's heads).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from ditmesh.config import ParallelConfig
from ditmesh.parallel.attention import RedirectSDPA
from ditmesh.plans import Grid, Patch, StagePlan
from ditmesh.parallel.sequence import _HANDLE_ATTR as SEQUENCE_HANDLE

__all__ = ["StagePlan", "PipeFusionTransformer", "apply_pipefusion", "split_stages", "patch_rows", "StaleKVProcessor"]

# P2P streams: activations stage -> stage+1, latents last -> 0. Each directed pair of ranks carries
# one stream only (for 2 stages: 0 -> 1 activations, 1 -> 0 latents), so FIFO order per pair is
# enough where tags are ignored (NCCL); gloo matches the tags too.
_HIDDEN_TAG, _LATENT_TAG = 1, 2


# ---- planning: stages and patches -----------------------------------------------------------


def split_stages(costs: list[float], num_stages: int) -> list[range]:
    """Contiguous split of blocks with `costs` into `num_stages` ranges minimising the costliest stage."""
    n = len(costs)
    if n < num_stages:
        raise ValueError(f"the model has {n} blocks, fewer than pipefusion={num_stages} stages; use pipefusion <= {n}")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    # best[k][j]: smallest max-stage cost splitting blocks [0, j) into k stages; cut[k][j] the last cut.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    bounds, j = [n], n
    for k in range(num_stages, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    bounds.reverse()
    return [range(bounds[k], bounds[k + 1]) for k in range(num_stages)]


def patch_rows(num_rows: int, num_patches: int, height: int | None = None) -> list[tuple[int, int]]:
    """Split `num_rows` token rows into `num_patches` bands as even as possible: [(start, stop)]."""
    if num_patches > num_rows:
        where = f"height {height} gives" if height else "the image has"
        raise ValueError(
            f"{where} {num_rows} token rows; pipefusion_patches must be <= {num_rows} (got {num_patches})"
        )
    base, extra = divmod(num_rows, num_patches)
    bounds, start = [], 0
    for p in range(num_patches):
        stop = start + base + (1 if p < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _block_costs(model: nn.Module, plan: StagePlan) -> list[float]:
    costs = []
    for attr, cost in zip(plan.blocks, plan.block_costs):
        costs += [cost] * len(getattr(model, attr))
    return costs


def keep_stage(model: nn.Module, plan: StagePlan, stage: int, num_stages: int) -> list[nn.Module]:
    """Drop every block (and embedder/head) this stage does not run; return its blocks in order.

    Afterwards the model holds only this stage's weights: `nn.ModuleList`s of the local blocks.
    """
    local = split_stages(_block_costs(model, plan), num_stages)[stage]
    blocks, index = [], 0
    for attr in plan.blocks:
        kept = []
        for block in getattr(model, attr):
            if index in local:
                kept.append(block)
            index += 1
        setattr(model, attr, nn.ModuleList(kept))
        blocks += kept
    dropped = (plan.first_stage_modules if stage > 0 else ()) + (plan.last_stage_modules if stage < num_stages - 1 else ())
    for name in dropped:
        setattr(model, name, None)
    return blocks


# ---- stale K/V: the attention seam ----------------------------------------------------------


@dataclass
class PatchContext:
    """Live state shared by one stage's attention wrappers: the patch being computed."""

    patch: Patch | None = None
    text_side: str | None = None  # "first" (FLUX), "last" (SD3) or None


class StaleKVProcessor:
    """Wraps an attention module's processor: image K/V of the other patches come from a buffer.

    Each SDPA call sees (B, H, S, D) keys/values whose image part is the current patch's n tokens
    (text before it for text_side "first", after it for "last"). The fresh rows are written into
    the (B, H, N, D) buffer of the whole image and attention runs on [text, buffer], so
    the other rows are whatever this layer computed for them most recently.
    """

    def __init__(self, inner: Any, context: PatchContext):
        self.inner = inner
        self.context = context
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, attn: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Modes entered after this one (the sequence-parallel routing) run first, so under
        # Ulysses this sees the whole patch with this rank's heads.
        redirect = RedirectSDPA(self._attention)
        with redirect:
            out = self.inner(attn, *args, **kwargs)
        if redirect.calls == 0:  # attention ran on the patch alone: the result would be wrong
            raise ValueError(
                f"{type(self.inner).__name__} computed attention without torch SDPA; PipeFusion needs "
                "attention_backend 'auto' or 'sdpa' and diffusers' native attention backend"
            )
        return out

    def _attention(self, sdpa: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        key = self._splice("key", key)
        value = self._splice("value", value)
        return sdpa(query, key, value, *args, **kwargs)

    def _splice(self, name: str, fresh_BHSD: torch.Tensor) -> torch.Tensor:
        patch, side = self.context.patch, self.context.text_side
        n, seq = patch.num_tokens, fresh_BHSD.shape[2]
        image_at = seq - n if side == "first" else 0
        text_BHTD = fresh_BHSD[:, :, :image_at] if side == "first" else fresh_BHSD[:, :, n:]
        buffer = self._buffer(name, fresh_BHSD, patch.grid.rows * patch.grid.cols)
        buffer[:, :, patch.tokens] = fresh_BHSD[:, :, image_at : image_at + n]
        parts = (text_BHTD, buffer) if side == "first" else (buffer, text_BHTD)
        return torch.cat(parts, dim=2)

    def _buffer(self, name: str, like: torch.Tensor, num_tokens: int) -> torch.Tensor:
        # Allocated once per resolution/batch; rows are overwritten in place after that.
        shape = (like.shape[0], like.shape[1], num_tokens, like.shape[3])
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype:
            buffer = self.buffers[name] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return buffer


def install_stale_kv(blocks: list[nn.Module], context: PatchContext) -> int:
    """Wrap the processor of every attention module in `blocks`; return how many were wrapped."""
    count = 0
    for block in blocks:
        for module in block.modules():
            if hasattr(module, "set_processor") and hasattr(module, "processor"):
                module.set_processor(StaleKVProcessor(module.processor, context))
                count += 1
    return count


# ---- the pipelined denoising loop -----------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One unit of stage work: a patch (or the whole image, in warm-up) at one diffusion step."""

    step: int
    patch: Patch


def _schedule(steps: range, warmup_steps: int, grid: Grid, num_patches: int, height: int | None) -> list[_Item]:
    bands = patch_rows(grid.rows, num_patches, height)
    whole = Patch(0, grid.rows, grid)
    items = []
    for step in steps:
        if step - steps.start < warmup_steps:
            items.append(_Item(step, whole))
        else:
            items += [_Item(step, Patch(start, stop, grid)) for start, stop in bands]
    return items


@dataclass
class StageTimes:
    """Where one stage's time went in one trajectory, item by item."""

    items: list[tuple[int, int, float, float]] = field(default_factory=list)
    """Per item: (step, first token row, seconds waiting for its input, seconds computing)."""


class _Stage:
    """One rank's stage: its blocks, the P2P neighbours, and the loop over scheduled items."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], plan: StagePlan, group: dist.ProcessGroup,
                 context: PatchContext, sequence: Any = None, return_group: dist.ProcessGroup | None = None):
        self.model, self.blocks, self.plan, self.group, self.context = model, blocks, plan, group, context
        # Latents going back from the last stage to stage 0 travel on their own group (same ranks):
        # see ParallelMesh.build for the NCCL ordering hazard this avoids.
        self.return_group = return_group or group
        self.sequence = sequence  # the sequence-parallel context (Ulysses inside each stage) or None
        self.num_shards = dist.get_world_size(sequence.sequence_group) if sequence else 1
        self.shard = dist.get_rank(sequence.sequence_group) if sequence else 0
        ranks = dist.get_process_group_ranks(group)
        self.stage, self.num_stages = ranks.index(dist.get_rank()), len(ranks)
        self.first, self.last = self.stage == 0, self.stage == self.num_stages - 1
        self.prev_rank, self.next_rank = ranks[self.stage - 1], ranks[(self.stage + 1) % self.num_stages]
        self.last_rank = ranks[-1]
        self._connected = False

    def _connect(self, device: torch.device) -> None:
        # Every P2P call of the stages is a batch (`_p2p`), which NCCL runs on its group's
        # communicator. The first batch on a group must involve all of the group's ranks
        # (torch's rule for batch_isend_irecv). So one ring exchange per group, on every rank and
        # in the same order, makes both communicators before any stage posts its own calls.
        if self._connected:
            return
        self._connected = True
        for group in (self.group, self.return_group):
            token, inbox = torch.zeros(1, device=device), torch.empty(1, device=device)
            ops = [dist.P2POp(dist.isend, token, self.next_rank, group), dist.P2POp(dist.irecv, inbox, self.prev_rank, group)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def run(self, items: list[_Item], step_kwargs: Callable[[int], dict], latent: torch.Tensor,
            update: Callable[[torch.Tensor, int, _Item, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
            hidden_shape: Callable[[Patch], tuple[int, ...]], times: StageTimes) -> list[tuple[_Item, torch.Tensor]]:
        """Run `items` in order; the last stage returns [(item, raw prediction)], the others [].

        `latent` is the model-input latent at the first step (every stage holds a copy; stage 0
        and the last stage keep theirs up to date); `update(prediction, step, item, x_patch)`
        returns (prediction to record, updated x_patch); `hidden_shape(patch)` is the shape of
        the [text, image] tokens a patch carries between stages.
        """
        self._connect(latent.device)
        latent = latent.clone()
        dtype = self.model.dtype
        inbox = self._latent_inbox(items, latent) if self.first else self._hidden_inbox(items, dtype, hidden_shape)
        sends: list[dist.Work] = []
        outputs = []
        text = self.plan.embed_text(self.model, step_kwargs(items[0].step)) if self.first else None
        for item in items:
            tic = time.perf_counter()
            received = next(inbox)  # stage 0: its latent patch; others: [text, image] tokens
            tac = time.perf_counter()
            result = self._compute(item, step_kwargs(item.step), received, latent, text)
            if self.last:
                region = item.patch.latent(self.plan.latent_row_dim)
                prediction, latent[region] = update(result, item.step, item, latent[region])
                outputs.append((item, prediction))
                if item.step < items[-1].step:  # back to stage 0 for the next step
                    sends.append(_p2p(dist.isend, latent[region].contiguous(), self.next_rank, self.return_group, _LATENT_TAG))
            else:
                sends.append(_p2p(dist.isend, result.contiguous(), self.next_rank, self.group, _HIDDEN_TAG))
            # Drop finished sends without blocking: waiting here could close a cycle of ranks
            # each waiting for the next to post a receive.
            sends = [work for work in sends if not work.is_completed()]
            times.items.append((item.step, item.patch.row_start, tac - tic, time.perf_counter() - tac))
        for work in sends:  # every send has a matching receive posted by its neighbour
            work.wait()
        return outputs

    def _compute(self, item: _Item, kwargs: dict, received: torch.Tensor, latent: torch.Tensor,
                 text: torch.Tensor | None) -> torch.Tensor:
        plan, patch = self.plan, self.local(item.patch)
        self.context.patch = patch
        if self.sequence:  # what the sequence-parallel split hook sets for a whole forward
            self.sequence.num_tokens, self.sequence.local_len = patch.num_tokens, patch.num_tokens // self.num_shards
        if self.first:
            image = plan.embed_image(self.model, received, kwargs, patch)[:, patch.shard_slice]
        else:
            num_text = received.shape[1] - patch.num_tokens // self.num_shards
            text, image = received[:, :num_text], received[:, num_text:]
        block_kwargs = plan.block_kwargs(self.model, kwargs, patch)
        for block in self.blocks:
            text, image = block(hidden_states=image, encoder_hidden_states=text, **block_kwargs)
        if self.last:  # under Ulysses, the sequence plan's gather hook on the head collects the patch
            return plan.head(self.model, image, block_kwargs, tuple(latent[patch.latent(plan.latent_row_dim)].shape))
        return torch.cat([text, image], dim=1)  # (B, T + n, D): the text stream travels with the patch

    def local(self, patch: Patch) -> Patch:
        """`patch` as this rank holds it: its shard of the tokens under sequence parallelism."""
        return dataclasses.replace(patch, shard=self.shard, num_shards=self.num_shards)

    def _hidden_inbox(self, items: list[_Item], dtype: torch.dtype, shape: Callable[[Patch], tuple[int, ...]]):
        # Yield each item's [text, image] tokens. The last stage posts the next item's receive
        # before computing this one, so the transfer overlaps the compute. A middle stage posts it
        # only after sending this item (when the generator resumes): on NCCL one group's P2P calls
        # run in order on one stream, and a receive queued ahead of that send could be waiting for
        # a patch that needs the send (a warm-up step is one item, so the next item is the next step's).
        device = next(self.model.parameters()).device

        def post(index: int):
            return self._post(shape(self.local(items[index].patch)), self.prev_rank, _HIDDEN_TAG, dtype, device)

        pending = post(0)
        for index in range(len(items)):
            buf, work = pending
            work.wait()
            more = index + 1 < len(items)
            if more and self.last:
                pending = post(index + 1)
            yield buf
            if more and not self.last:
                pending = post(index + 1)

    def _latent_inbox(self, items: list[_Item], latent: torch.Tensor):
        # The last stage sends back, in item order, each updated region for the next step. Stage 0
        # takes them in the same order, writing them into its copy of the latent.
        dim = self.plan.latent_row_dim
        messages = [(it.step + 1, it.patch) for it in items if it.step < items[-1].step]
        posted = iter(messages)
        pending = self._post_latent(next(posted, None), latent)
        done_rows = {items[0].step: items[0].patch.grid.rows}  # step -> rows known up to date
        for item in items:
            while done_rows.get(item.step, 0) < item.patch.row_stop:
                (step, patch), buf, work = pending
                work.wait()
                latent[patch.latent(dim)] = buf
                done_rows[step] = patch.row_stop
                pending = self._post_latent(next(posted, None), latent)
            yield latent[item.patch.latent(dim)].clone()

    def _post_latent(self, message, latent: torch.Tensor):
        if message is None:
            return None
        step, patch = message
        shape = latent[patch.latent(self.plan.latent_row_dim)].shape
        buf, work = self._post(shape, self.last_rank, _LATENT_TAG, latent.dtype, latent.device, self.return_group)
        return (step, patch), buf, work

    def _post(self, shape, src: int, tag: int, dtype, device, group: dist.ProcessGroup | None = None):
        buf = torch.empty(shape, dtype=dtype, device=device)
        return buf, _p2p(dist.irecv, buf, src, group or self.group, tag)


def _p2p(op: Callable, tensor: torch.Tensor, peer: int, group: dist.ProcessGroup, tag: int) -> dist.Work:
    """One isend/irecv, posted as a batch of one. On NCCL a batch uses its group's communicator,
    which `_Stage._connect` makes on every rank up front. A lone isend/irecv would make a separate
    two-rank communicator at its first call and block until the peer makes the same one. Stage
    0's first lone call is on the return group, the others' on the forward group, so each would
    block in a different creation: the hang seen with pipefusion=2 on two H200s."""
    return dist.batch_isend_irecv([dist.P2POp(op, tensor, peer, group, tag)])[0]



# ---- the transformer wrapper ----------------------------------------------------------------


class PipeFusionTransformer(nn.Module):
    """Stand-in for a FLUX/SD3 transformer that runs this rank's PipeFusion stage.

    Keeps the forward signature: ``wrapper(hidden_states=..., timestep=..., ...)``. The call of
    a trajectory's first step runs the whole pipelined denoising (all steps) from its latent;
    each call returns the prediction that trajectory applied at that step, so the pipeline's own
    flow-matching Euler scheduler reproduces it. Every rank of the pipefusion group must make the
    same calls (same pipeline arguments and seed).
    """

    def __init__(self, model: nn.Module, plan: StagePlan, group: dist.ProcessGroup, config: ParallelConfig,
                 scheduler: Any, text_side: str | None, guidance_scale: Callable[[], float | None] = lambda: None,
                 cfg_group: dist.ProcessGroup | None = None, sequence: Any = None,
                 return_group: dist.ProcessGroup | None = None):
        super().__init__()
        ranks = dist.get_process_group_ranks(group)
        # Sequence-parallel attention always hands the local kernel [text, image].
        self.context = PatchContext(text_side="first" if sequence else text_side)
        self.model = model
        blocks = keep_stage(model, plan, ranks.index(dist.get_rank()), len(ranks))
        install_stale_kv(blocks, self.context)
        self._stage = _Stage(model, blocks, plan, group, self.context, sequence, return_group)
        self._plan, self._config, self._scheduler, self._guidance_scale = plan, config, scheduler, guidance_scale
        self._cfg_group = cfg_group  # set when cfg=2 runs the other guidance branch on a peer pipeline
        self._predictions: dict[int, torch.Tensor] = {}
        self._last_step: int | None = None
        self._last_text: torch.Tensor | None = None
        self.times = StageTimes()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)  # config, dtype, device, cache_context, ...

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True, **kwargs):
        step = self._step_of(timestep)
        text = kwargs.get("encoder_hidden_states")
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
        items = _schedule(steps, self._config.warmup_steps, grid, self._config.num_patches, height=grid.rows * 16)
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


# ---- parallelize step 3 ---------------------------------------------------------------------


def _on_nccl() -> bool:
    return dist.is_initialized() and dist.get_backend() == "nccl"


def composition_problems(pipe: Any, config: ParallelConfig, adapter: Any) -> list[str]:
    """Every reason PipeFusion cannot run `config` on `pipe` (a pipeline with a stage plan).

    Pure: no collective, no change, so `validate` calls it before anything is touched."""
    if config.pipefusion_degree == 1:
        return []
    problems = []
    denoiser = getattr(pipe, adapter.denoiser_attr, pipe)
    num_blocks = sum(len(getattr(denoiser, attr)) for attr in adapter.stage_plan.blocks)
    if config.pipefusion_degree > num_blocks:
        problems.append(
            f"pipefusion={config.pipefusion_degree} needs a block per stage but the model has {num_blocks} blocks; "
            f"use pipefusion <= {num_blocks} and put the other GPUs on data or cfg"
        )
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None and (
        type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler" or scheduler.config.get("stochastic_sampling")
    ):
        problems.append(
            f"PipeFusion updates patches with the deterministic flow-matching Euler step; the pipeline's scheduler is "
            f"{type(scheduler).__name__}; use FlowMatchEulerDiscreteScheduler (stochastic_sampling=False) or pipefusion=1"
        )
    if config.ring_degree > 1 or config.tensor_degree > 1:
        problems.append(
            f"pipefusion x ring/tensor is not supported yet (got {config}); PipeFusion composes with ulysses, cfg and "
            "data: use e.g. 'pipefusion=2,ulysses=2,cfg=2'"
        )
    if _on_nccl() and os.environ.get("DITMESH_PIPEFUSION_NCCL") != "1":
        problems.append(
            "PipeFusion's patch pipeline hangs on NCCL (measured on 2 H200s: a stage waits for a patch its neighbour "
            "never sends; see docs/pipefusion.md); on GPUs use ulysses, ring, cfg or data for now "
            "(DITMESH_PIPEFUSION_NCCL=1 runs it anyway, to debug)"
        )
    if config.cfg_degree > 1 and adapter.cfg_mode != "batched":
        problems.append(
            f"pipefusion x cfg supports batched guidance (SD3); {adapter.name} runs CFG as two sequential calls, "
            "which PipeFusion's one-call-per-step loop cannot pair; drop cfg=2 (e.g. use pipefusion or ulysses for those GPUs)"
        )
    return problems


def apply_pipefusion(pipe: Any, mesh: Any, adapter: Any) -> Any:
    """Replace the pipeline's transformer by this rank's `PipeFusionTransformer` stage (step 3)."""
    config = mesh.config
    if not hasattr(pipe, adapter.denoiser_attr):
        raise ValueError(
            f"PipeFusion runs the denoising loop of pipeline calls; pass the {adapter.name} pipeline to "
            f"parallelize, not its {adapter.denoiser_attr}"
        )
    if adapter.stage_plan is None:
        raise ValueError(f"PipeFusion does not support {adapter.name} yet (no stage plan); use pipefusion=1")
    problems = composition_problems(pipe, config, adapter)
    if problems:
        raise ValueError(problems[0])
    scheduler = pipe.scheduler
    guidance = (lambda: pipe.guidance_scale if pipe.do_classifier_free_guidance else None) \
        if adapter.cfg_mode == "batched" else (lambda: None)
    model = getattr(pipe, adapter.denoiser_attr)
    cfg_group = mesh.group("cfg") if config.cfg_degree > 1 else None
    # Ulysses inside each stage: step 2 installed the sequence-parallel processors (which the
    # stale-K/V wrappers wrap) and the head's gather hook; the stage loop shards each patch.
    sequence = getattr(model, SEQUENCE_HANDLE).ctx if config.ulysses_degree > 1 else None
    wrapper = PipeFusionTransformer(model, adapter.stage_plan, mesh.group("pipefusion"), config, scheduler,
                                    adapter.joint_text, guidance, cfg_group, sequence,
                                    mesh.group("pipefusion_return"))
    setattr(pipe, adapter.denoiser_attr, wrapper)
    return pipe
