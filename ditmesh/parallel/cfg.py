"""CFG parallelism: the two classifier-free-guidance branches run on the two ranks of the cfg axis.

The denoiser is replaced by `CFGDenoiser`, a module wrapper that keeps the forward signature and
forwards every other attribute (``config``, ``dtype``, ``cache_context``, ...) to the wrapped model,
so hooks and attention processors installed on the model by other strategies (sequence, tensor)
keep working inside it. How the pipeline runs guidance is the adapter's `cfg_mode`:

- "batched" (SD3, SDXL): each step makes one denoiser call on the batch [uncond, cond]. cfg rank r
  runs half r; the halves are all-gathered over the cfg group, so every rank returns the full
  prediction the pipeline expects. A call with an odd batch (SD3.5's skip-layer-guidance call on
  the cond rows) runs whole on both ranks.
- "sequential" (FLUX true CFG): each step makes two calls, cond then uncond, and combines them
  after the second. cfg rank 0 runs the cond call, rank 1 the uncond call; each returns a
  placeholder for the call it skips and, at the second call, the two exchange results and the
  placeholder is filled in place (the pipeline still holds it: it only reads it after call two).

`CFGPipeline` (the pipeline-level wrapper) checks per call that guidance is on, and raises a
`ValueError` naming the fix when it is not: cfg=2 without guidance would leave a rank idle.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ditmesh.models.base import denoisers
from ditmesh.parallel.comm import all_gather
from ditmesh.parallel.data import DenoiserWrapper, PipelineWrapper
from ditmesh.parallel.mesh import ParallelMesh

CFG_MODES = ("batched", "sequential")


def apply(pipe: Any, mesh: ParallelMesh, adapter: Any, config: Any) -> Any:
    """Run the guidance branches of `pipe` on the cfg axis; returns the wrapped pipeline."""
    if not hasattr(pipe, adapter.denoiser_attr):
        raise ValueError(
            "cfg parallelism needs the whole pipeline (it splits guidance branches of pipeline calls); "
            f"pass the {adapter.name} pipeline to parallelize, not its {adapter.denoiser_attr}"
        )
    if adapter.cfg_mode not in CFG_MODES:
        raise ValueError(f"{adapter.name} has cfg_mode {adapter.cfg_mode!r}; cfg parallelism supports {CFG_MODES}")
    wrappers = []
    for attr, denoiser in denoisers(pipe, adapter).items():  # each expert (Wan 2.2) its own wrapper
        wrappers.append(CFGDenoiser(denoiser, mesh, adapter.cfg_mode))
        setattr(pipe, attr, wrappers[-1])
    return CFGPipeline(pipe, wrappers, adapter)


class CFGDenoiser(DenoiserWrapper):
    """Wraps a denoiser so each cfg rank computes one guidance branch; same forward signature.

    Inactive (a plain pass-through) outside `CFGPipeline` calls with guidance on.
    """

    def __init__(self, denoiser: nn.Module, mesh: ParallelMesh, mode: str):
        super().__init__(denoiser)
        self._group = mesh.group("cfg")
        self._cfg_rank = mesh.rank("cfg")
        self._mode = mode
        self._batch_arg = _batch_arg(denoiser)  # hidden_states / sample
        self.active = False
        self._calls = 0  # sequential mode: call parity within a step (even = cond, odd = uncond)
        self._placeholder: torch.Tensor | None = None  # sequential: the skipped cond call's result, filled later
        self._own: torch.Tensor | None = None  # sequential: this rank's branch result of the current step

    def start(self) -> None:
        """Begin a guided pipeline call (set by `CFGPipeline`)."""
        self.active, self._calls, self._placeholder = True, 0, None

    def stop(self) -> None:
        self.active, self._placeholder = False, None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return self.inner(*args, **kwargs)
        if self._mode == "batched":
            return self._batched(args, kwargs)
        return self._sequential(args, kwargs)

    # ---- batched: [uncond, cond] in one call ------------------------------------------------

    def _batched(self, args: tuple, kwargs: dict) -> Any:
        batch = self._reference(args, kwargs).shape[0]
        if batch % 2:
            # Not an [uncond, cond] batch (e.g. SD3's extra skip-layer-guidance call on the cond
            # rows): both ranks run it whole, which keeps them in step.
            return self.inner(*args, **kwargs)
        args, kwargs = _take_half((args, kwargs), batch, self._cfg_rank)
        out = self.inner(*args, **kwargs)
        # Every cfg rank must reach this all-gather in every step, or the group hangs.
        return _map_first(out, lambda half: self._all_gather(half))

    # ---- sequential: cond call, then uncond call ---------------------------------------------

    def _sequential(self, args: tuple, kwargs: dict) -> Any:
        branch = self._calls % 2  # 0: cond call, 1: uncond call (FluxPipeline's order)
        self._calls += 1
        mine = branch == self._cfg_rank  # cfg rank 0 runs the cond calls, rank 1 the uncond calls
        if mine:
            out = self.inner(*args, **kwargs)
            self._own = _first(out)
        if branch == 0:
            if mine:
                return out
            # Filled in place at the uncond call; the pipeline reads it only after that call.
            self._placeholder = torch.empty_like(self._reference(args, kwargs))
            return _wrap_like(self._placeholder, kwargs)
        # Both cfg ranks make the same calls in the same order, so this exchange always pairs up;
        # a rank that skipped it (e.g. an exception between the calls) would hang the other.
        cond, uncond = self._all_gather(self._own).chunk(2)
        self._own = None
        if mine:
            assert self._placeholder is not None, "the cond call left a placeholder"
            # Same shape as the input, unless the model's output has fewer channels (Wan I2V: the
            # image latents and mask ride on the input's channels): then it takes the output's.
            self._placeholder.resize_(cond.shape).copy_(cond)
            return out
        return _wrap_like(uncond, kwargs)

    # ---- helpers -----------------------------------------------------------------------------

    def _reference(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs[self._batch_arg]

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_gather(tensor, 0, self._group)  # cfg rank order: [rank 0's, rank 1's]


def _batch_arg(denoiser: nn.Module) -> str:
    """The name of the model's first forward argument (its latents), looked up through wrappers
    whose forward takes ``*args`` (a CUDA-graphed denoiser, another strategy's wrapper)."""
    module = denoiser
    while True:
        first = next(iter(inspect.signature(module.forward).parameters.values()))
        if first.kind is not inspect.Parameter.VAR_POSITIONAL or not isinstance(module, DenoiserWrapper):
            return first.name
        module = module.inner


class CFGPipeline(PipelineWrapper):
    """A pipeline whose calls run the two guidance branches on the two cfg ranks."""

    def __init__(self, pipe: Any, denoisers: list[CFGDenoiser], adapter: Any):
        super().__init__(pipe)
        self._denoisers = denoisers
        self._adapter = adapter

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _check_guidance(self._adapter, self._defaults(), kwargs)
        for denoiser in self._denoisers:
            denoiser.start()
        try:
            return self._pipe(*args, **kwargs)
        finally:
            for denoiser in self._denoisers:
                denoiser.stop()

    def _defaults(self) -> dict[str, Any]:
        params = inspect.signature(self._pipe.__call__).parameters
        return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def _check_guidance(adapter: Any, defaults: dict[str, Any], kwargs: dict[str, Any]) -> None:
    # cfg_mode says which call arguments switch guidance on (the pipelines' own rules).
    value = {**defaults, **kwargs}.get
    if (adapter.guidance_rule or ("guidance_scale" if adapter.cfg_mode == "batched" else "true_cfg")) == "guidance_scale":
        if value("guidance_scale") is not None and value("guidance_scale") <= 1:
            raise ValueError(
                f"cfg=2 needs classifier-free guidance but guidance_scale is {value('guidance_scale')}; "
                "pass guidance_scale > 1, or drop cfg=2 from the parallel config"
            )
        return
    has_negative = value("negative_prompt") is not None or (
        value("negative_prompt_embeds") is not None and value("negative_pooled_prompt_embeds") is not None
    )
    if not (value("true_cfg_scale", 1.0) > 1 and has_negative):
        raise ValueError(
            f"cfg=2 needs true classifier-free guidance, which {adapter.name} runs only with true_cfg_scale > 1 "
            f"(got {value('true_cfg_scale', 1.0)}) and a negative_prompt; pass both, or drop cfg=2 from the "
            "parallel config (e.g. use ulysses=2 for the second GPU)"
        )


def _take_half(tree: Any, batch: int, half: int) -> Any:
    """Half `half` of every tensor with `batch` rows in a nest of tuples/lists/dicts."""
    if isinstance(tree, torch.Tensor):
        return tree.chunk(2)[half] if tree.dim() > 0 and tree.shape[0] == batch else tree
    if isinstance(tree, (tuple, list)):
        return type(tree)(_take_half(item, batch, half) for item in tree)
    if isinstance(tree, dict):
        return {key: _take_half(item, batch, half) for key, item in tree.items()}
    return tree


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _map_first(out: Any, fn: Any) -> Any:
    """`out` (tuple or output dataclass) with its first tensor (the prediction) replaced by fn(it)."""
    if isinstance(out, tuple):
        return (fn(out[0]), *out[1:])
    out.sample = fn(out.sample)
    return out


def _wrap_like(sample: torch.Tensor, kwargs: dict[str, Any]) -> Any:
    """The prediction in the form the denoiser returns: a tuple with return_dict=False, else an output."""
    if not kwargs.get("return_dict", True):
        return (sample,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)
