"""Step caching: skip all blocks but the first on denoising steps that change little, with one
decision per step for every rank of the mesh.

A cached step runs the first block, then adds the residual the remaining blocks produced at the
last computed step (``output of the last block - output of the first``) instead of running them
(First Block Cache, ParaAttention; diffusers' `apply_first_block_cache`). Policies
(`ditmesh.config.CacheConfig`): ``fbcache`` computes a step when the first block's residual
changed by more than a threshold since the last computed step; ``static`` follows a fixed
schedule; ``taylor=1`` extrapolates the cached residual linearly from the last two computed steps
(TaylorSeer, first order) under either.

One decision for the whole mesh. The statistic is two sums, ``sum |r - r_prev|`` and
``sum |r_prev|`` of the first block's residual r over this rank's image tokens (padding
excluded), all-reduced over the ranks that share an image (cfg, ring x ulysses, tensor) before
the ratio is taken: the decision a serial run takes on the whole image, the same on every rank.
A ratio of local ratios, or a rank deciding on its own shard, would let one rank skip the rest
blocks (and their all-to-alls) while another runs them: a hang. Guidance: the decision of a step
is taken by its first branch (the cond call of FLUX's true CFG, the whole [uncond, cond] batch of
SD3), and the other branch follows it; under cfg=2 the follower rank joins the all-reduce with
zeros. Data replicas decide for their own images (as a serial run called once per replica).

Compile and CUDA graphs. The blocks keep their compiled bodies; the cache takes the block
calls over through the seam `Module.compile` itself uses (`_compiled_call_impl`), so its host
logic stays out of the compiled graphs. The step runs as three pieces of captured work: the
first block with the statistic and its all-reduce, then either the remaining blocks or the
residual add. The host reads the decision once per step (fbcache: one 8-byte device-to-host
copy after the first block, which waits for it; static: nothing).

PipeFusion (`pipefusion/cache.py`) takes the static policy only: its stages run the blocks,
each keeps its own part of the residual per patch (they telescope to the serial one), and the
schedule is known before the trajectory, so every stage agrees without a message. fbcache is
refused there: its decision for step t needs the first block over the whole image before any
later block of step t runs, but PipeFusion's patches of step t reach stage 0 one by one while
earlier patches already run on later stages, so waiting would drain the pipeline every step.

Each call of a wrapped pipeline records the steps it computed: ``out.computed_steps`` and
``pipe.computed_steps`` (this rank's replica under data parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn

from ditmesh.config import CacheConfig
from ditmesh.parallel.data import PipelineWrapper
from ditmesh.parallel.pipefusion.cache import CACHE_HANDLE, StageCache

_HANDLE_ATTR = CACHE_HANDLE  # "_ditmesh_step_cache"
# Mesh axes whose ranks share one image (data replicas decide alone); PipeFusion decides by schedule.
_IMAGE_AXES = ("cfg", "sequence", "tensor")


def check(pipe: Any, config: Any, cache: CacheConfig, adapter: Any) -> None:
    """Raise `ValueError` (before anything changes) if `cache` cannot run on `pipe` under `config`."""
    if not cache.enabled:
        return
    if not adapter.cache_blocks:
        raise ValueError(f"step caching has no block plan for {adapter.name} models; drop --cache (cache=off) for them")
    if config is not None and config.pipefusion_degree > 1 and cache.policy != "static":
        # fbcache decides step t from the first block over the whole image, before any later block
        # of step t; PipeFusion's patches of step t reach stage 0 one by one (pipefusion/cache.py).
        raise ValueError(f"step caching under pipefusion takes the static policy (e.g. 'static,warmup=2,every=2' or "
                         f"'static,mask=...'), not {cache.policy!r}: its decision needs the first block over the whole "
                         "image before the later blocks of that step run, which would drain PipeFusion's pipeline "
                         "of patches at every step")


def apply(pipe: Any, adapter: Any, cache: CacheConfig, mesh: Any = None, *, cuda_graphs: bool = False) -> Any:
    """Install step caching on `pipe`'s denoiser (or on `pipe`, a bare denoiser); returns what the
    caller uses as `pipe` from now on (a pipeline comes back wrapped, to track steps per call).

    Call on every rank after the strategies that shard the blocks (tensor, sequence) and their
    compile, and before cfg/data wrap the pipeline. `mesh` None: one process (no reduction).
    `cuda_graphs`: each piece of the step replays as a CUDA graph (`graphs.GraphedDenoiser`)."""
    check(pipe, getattr(mesh, "config", None), cache, adapter)
    denoiser = getattr(pipe, adapter.denoiser_attr, pipe)
    if getattr(denoiser, _HANDLE_ATTR, None) is not None:
        raise ValueError("step caching is already applied to this model; call .remove() on its handle first")
    if mesh is not None and mesh.config.pipefusion_degree > 1:
        # PipeFusion's stages run the blocks (parallelize step 3): they take the schedule from this
        # handle and keep their residuals per stage and patch; no block takeover here.
        handle = StageCache(cache)
        setattr(denoiser, _HANDLE_ATTR, handle)
        return CachedPipeline(pipe, handle)
    blocks = [block for attr in adapter.cache_blocks for block in getattr(denoiser, attr)]
    groups = [mesh.group(axis) for axis in _IMAGE_AXES if mesh.size(axis) > 1] if mesh is not None else []
    # FLUX's true CFG (two calls per step) with cfg=2: this rank only sees the calls of branch cfg-rank.
    sequential_cfg = mesh is not None and mesh.size("cfg") > 1 and adapter.cfg_mode == "sequential"
    handle = StepCache(denoiser, blocks, cache, groups, branch_offset=mesh.rank("cfg") if sequential_cfg else 0,
                       cuda_graphs=cuda_graphs)
    setattr(denoiser, _HANDLE_ATTR, handle)
    return CachedPipeline(pipe, handle) if hasattr(pipe, adapter.denoiser_attr) else pipe


# ---- state ----------------------------------------------------------------------------------


@dataclass
class _Branch:
    """What one guidance branch keeps between steps (its tensors are this rank's shards)."""

    first_residual: torch.Tensor | None = None  # first block's output - input at the last computed step
    residual: tuple | None = None  # (image, text) residual of the remaining blocks, last computed step
    residual_step: int = -1
    older: tuple | None = None  # taylor=1: the residual of the computed step before
    older_step: int = -1


@dataclass
class _Calls:
    """Per pipeline call: step counter, branch counter within the step, decisions."""

    step: int = 0
    calls: int = 0  # denoiser calls so far in this step on this rank
    decided: bool | None = None  # this step's decision, once known on this rank
    cached_run: int = 0  # cached steps in a row
    computed: list[int] = field(default_factory=list)
    stats: list[tuple[float, float, float, float]] = field(default_factory=list)
    """Per decided step: (local diff, local prev, global diff, global prev) sums (fbcache)."""


class StepCache:
    """Step caching installed on one denoiser's blocks; `remove()` restores them."""

    def __init__(self, denoiser: nn.Module, blocks: list[nn.Module], cache: CacheConfig, groups: list,
                 branch_offset: int = 0, cuda_graphs: bool = False):
        from diffusers.hooks._helpers import TransformerBlockRegistry

        self.denoiser, self.cache, self.groups, self.branch_offset = denoiser, cache, groups, branch_offset
        self.layout = [TransformerBlockRegistry.get(type(block)) for block in blocks]
        self.blocks = blocks
        # What `block(...)` ran until now: its compiled body (regional compile) or its eager call.
        self._bodies = [block._compiled_call_impl or block._call_impl for block in blocks]
        self._saved = [block._compiled_call_impl for block in blocks]
        self.calls = _Calls()
        self.in_pipeline = False  # a CachedPipeline call is running: steps advance at its callback
        self.branches: dict[int, _Branch] = {}
        # Only fbcache reads a statistic; the static schedule needs no reduction.
        head = _First(self._bodies[0], self.layout[0], groups if cache.policy == "fbcache" else [])
        rest = _Rest(self._bodies[1:], self.layout[1:])
        skip = _AddResidual()
        if cuda_graphs:
            from ditmesh.parallel.graphs import GraphedDenoiser

            head, rest, skip = GraphedDenoiser(head), GraphedDenoiser(rest), GraphedDenoiser(skip)
        self._head, self._rest, self._skip = head, rest, skip
        # Take the block calls over: `Module.__call__` runs `_compiled_call_impl` when it is set.
        blocks[0]._compiled_call_impl = self._step
        for block, layout in zip(blocks[1:], self.layout[1:]):
            block._compiled_call_impl = _pass_through(layout)

    @property
    def computed(self) -> list[int]:
        """Steps the current (or last) pipeline call computed in full."""
        return self.calls.computed

    def remove(self) -> None:
        """Give the blocks back their own calls (compiled or not)."""
        for block, saved in zip(self.blocks, self._saved):
            block._compiled_call_impl = saved
        delattr(self.denoiser, _HANDLE_ATTR)

    # ---- step bookkeeping (CachedPipeline) ---------------------------------------------------

    def start(self) -> None:
        """A pipeline call begins: forget the previous call's residuals and decisions."""
        self.calls, self.branches, self.in_pipeline = _Calls(), {}, True

    def end_step(self) -> None:
        """The pipeline finished a step (its step-end callback)."""
        self.calls.step, self.calls.calls, self.calls.decided = self.calls.step + 1, 0, None

    # ---- the first block's call: the whole step's blocks --------------------------------------

    def _step(self, *args: Any, **kwargs: Any) -> tuple:
        calls = self.calls
        branch_index = self.branch_offset + calls.calls
        calls.calls += 1
        branch = self.branches.setdefault(branch_index, _Branch())
        layout = self.layout[0]
        hidden = layout._get_parameter_from_args_kwargs(layout.hidden_states_argument_name, args, kwargs)
        prev = branch.first_residual if branch.first_residual is not None else torch.zeros_like(hidden)
        # Branch 0 decides; a later branch follows a decision taken on this rank, or (cfg=2, FLUX)
        # joins the all-reduce with zeros to learn the decision branch 0 took on the other cfg rank.
        lead = torch.ones((), dtype=torch.float32, device=hidden.device) * (branch_index == 0)
        first_h, first_e, residual, stats = self._head(prev, lead, self._valid_tokens(hidden), *args, **kwargs)
        compute = self._decide(stats, branch, calls)
        if compute:
            branch.first_residual = residual
            out_h, out_e, res_h, res_e = self._rest(first_h, first_e, *args[2:], **_rest_kwargs(kwargs, layout))
            branch.older, branch.older_step = branch.residual, branch.residual_step
            branch.residual, branch.residual_step = (res_h, res_e), calls.step
        else:
            out_h, out_e = self._skip(first_h, first_e, *self._cached_residual(branch, calls.step))
        if not self.in_pipeline:  # a bare denoiser: every call is one step
            self.end_step()
        return _as_output(self.layout[-1], out_h, out_e)

    def _decide(self, stats: torch.Tensor, branch: _Branch, calls: _Calls) -> bool:
        """This step's decision: taken at the step's first call on this rank, followed by later
        calls of the same step (FLUX's uncond call). Identical on every rank of the image."""
        if calls.decided is None:
            if self.cache.policy == "static":
                compute = calls.step == 0 or self.cache.scheduled(calls.step)
            else:
                compute = self._fbcache(stats, calls)
            calls.decided = compute
            calls.cached_run = 0 if compute else calls.cached_run + 1
            if compute:
                calls.computed.append(calls.step)
        # A branch with nothing cached yet computes (only a call pattern the pipelines do not make).
        return calls.decided or branch.residual is None

    def _fbcache(self, stats: torch.Tensor, calls: _Calls) -> bool:
        # The host read of the step: 4 floats (local and reduced sums), after the first block.
        local_diff, local_prev, diff, prev = stats.tolist()
        calls.stats.append((local_diff, local_prev, diff, prev))
        cache = self.cache
        if calls.step < cache.warmup or prev == 0 or (cache.max_cached and calls.cached_run >= cache.max_cached):
            return True
        return diff / prev > cache.threshold

    def _cached_residual(self, branch: _Branch, step: int) -> tuple:
        res_h, res_e = branch.residual
        if not self.cache.taylor or branch.older is None:
            return res_h, res_e, None, None, torch.zeros((), device=res_h.device)
        # First-order Taylor: r(step) ~ r(s1) + (r(s1) - r(s0)) (step - s1) / (s1 - s0).
        factor = (step - branch.residual_step) / (branch.residual_step - branch.older_step)
        return res_h, res_e, branch.older[0], branch.older[1], torch.full((), factor, device=res_h.device)

    def _valid_tokens(self, hidden: torch.Tensor) -> int:
        """Tokens of this rank's image shard that are not sequence-parallel padding."""
        handle = getattr(self.denoiser, "_ditmesh_sequence_parallel", None)
        if handle is None or handle.ctx.num_tokens is None:
            return hidden.shape[1]
        import torch.distributed as dist

        ctx = handle.ctx
        rank = dist.get_rank(ctx.sequence_group)
        return max(0, min(ctx.local_len, ctx.num_tokens - rank * ctx.local_len))


# ---- the three pieces of a step (each one CUDA graph when graphed) ----------------------------


class _First(nn.Module):
    """The first block, its residual and the reduced statistic. Returns (image, text, residual,
    stats = [local diff, local prev, global diff, global prev] sums)."""

    def __init__(self, body: Callable, layout: Any, groups: list):
        super().__init__()
        self.body, self.layout, self.groups = body, layout, groups

    def forward(self, prev: torch.Tensor, lead: torch.Tensor, valid: int, *args: Any, **kwargs: Any) -> tuple:
        layout = self.layout
        hidden = layout._get_parameter_from_args_kwargs(layout.hidden_states_argument_name, args, kwargs)
        out = self.body(*args, **kwargs)
        image, text = _split_output(layout, out)
        residual = image - hidden  # (B, S_local, D)
        local = torch.stack([(residual - prev)[:, :valid].abs().sum(), prev[:, :valid].abs().sum()]).float() * lead
        total = local
        for group in self.groups:  # functional collectives: captured with the graph
            total = funcol.wait_tensor(funcol.all_reduce(total, "sum", group))
        return image, text, residual, torch.cat([local, total])


class _Rest(nn.Module):
    """Blocks 2..N from the first block's output; returns (image, text, image residual, text residual)."""

    def __init__(self, bodies: list[Callable], layouts: list[Any]):
        super().__init__()
        self.bodies, self.layouts = bodies, layouts

    def forward(self, image: torch.Tensor, text: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple:
        first_image, first_text = image, text
        for body, layout in zip(self.bodies, self.layouts):
            names = dict(zip((layout.hidden_states_argument_name, layout.encoder_hidden_states_argument_name), (image, text)))
            image, text = _split_output(layout, body(*args, **names, **kwargs))
        text_residual = None if text is None or first_text is None else text - first_text
        return image, text, image - first_image, text_residual


class _AddResidual(nn.Module):
    """A cached step: first block's output + the cached residual (+ its extrapolation)."""

    def forward(self, image, text, res_image, res_text, older_image, older_text, factor) -> tuple:
        if older_image is not None:
            res_image = res_image + factor * (res_image - older_image)
            res_text = None if res_text is None else res_text + factor * (res_text - older_text)
        return image + res_image, None if text is None or res_text is None else text + res_text


def _split_output(layout: Any, out: Any) -> tuple:
    if not isinstance(out, tuple):
        return out, None
    text = out[layout.return_encoder_hidden_states_index] if layout.return_encoder_hidden_states_index is not None else None
    return out[layout.return_hidden_states_index], text


def _as_output(layout: Any, image: torch.Tensor, text: torch.Tensor | None) -> Any:
    if layout.return_encoder_hidden_states_index is None:
        return image
    out = [None, None]
    out[layout.return_hidden_states_index], out[layout.return_encoder_hidden_states_index] = image, text
    return tuple(out)


def _rest_kwargs(kwargs: dict, layout: Any) -> dict:
    """The first block's keyword arguments without the two streams (the rest get them from it)."""
    drop = (layout.hidden_states_argument_name, layout.encoder_hidden_states_argument_name)
    return {key: value for key, value in kwargs.items() if key not in drop}


def _pass_through(layout: Any) -> Callable:
    """A skipped block's call: its inputs back, in its output layout (the first block's call
    already ran the whole step, so the model's own loop just carries the result through)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        image = layout._get_parameter_from_args_kwargs(layout.hidden_states_argument_name, args, kwargs)
        text = None
        if layout.return_encoder_hidden_states_index is not None:
            text = layout._get_parameter_from_args_kwargs(layout.encoder_hidden_states_argument_name, args, kwargs)
        return _as_output(layout, image, text)

    return call


# ---- the pipeline wrapper: steps per call, the computed-step report --------------------------


class CachedPipeline(PipelineWrapper):
    """A pipeline whose calls reset the cache, advance its step at each step end, and report
    ``computed_steps`` (on the output when it is an object, and as ``pipe.computed_steps``)."""

    def __init__(self, pipe: Any, cache: StepCache | StageCache):
        super().__init__(pipe)
        self._cache = cache
        self._computed: list[int] = []

    @property
    def computed_steps(self) -> list[int]:
        """Steps (0-based) the last call computed in full; the others were cached."""
        return self._computed

    @property
    def step_cache(self) -> StepCache | StageCache:
        return self._cache

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        user_callback = kwargs.get("callback_on_step_end")

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            self._cache.end_step()
            return user_callback(pipe, step, timestep, callback_kwargs) if user_callback else callback_kwargs

        self._cache.start()
        try:
            out = self._pipe(*args, **{**kwargs, "callback_on_step_end": on_step_end})
        finally:
            self._cache.in_pipeline = False
        self._computed = list(self._cache.computed)
        if not isinstance(out, tuple):
            out.computed_steps = self._computed
        return out

