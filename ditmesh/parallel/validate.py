"""Which parallel configs work for a model: the composition rules, checked before anything runs.

`check(pipe, config, world_size)` raises a `ValueError` saying why a config cannot run and what
would, before `parallelize` builds the mesh or touches a weight: every rank sees the same config
and pipeline, so every rank raises the same error and the process group stays usable.
`valid_configs(pipe, world_size)` lists every config that passes, for a world size.

The rules (per axis, then per pair):

- world: the product of the degrees is the number of processes.
- data, cfg, pipefusion split pipeline calls (images, guidance branches, the denoising loop), so
  they need the pipeline, not a bare denoiser.
- ring / ulysses / tensor / pipefusion need the model family's sequence / tensor / stage plan
  (SDXL's U-Net has none: data and cfg only).
- tensor: the degree divides the heads and every sharded width (`tensor.valid_degrees`).
- ulysses: any degree runs (heads are zero-padded to a multiple of it), but only degrees
  dividing the heads per tensor rank waste no attention compute; `valid_configs(...,
  allow_head_padding=False)` keeps those only.
- ring: the attention backend must return log-sum-exp (`attention.resolve_backend`).
- pipefusion (`pipefusion.composition_problems`, the strategy's own rules): at most one stage
  per block; a deterministic flow-matching Euler scheduler; composes with data, cfg and ulysses
  (Ulysses inside each stage), not (yet) with ring/tensor; cfg only for pipelines with batched
  guidance (SD3), not FLUX's two sequential calls; any backend (its P2P order is NCCL-safe). Patches vs image
  height (`pipefusion.patch_rows`) and token columns vs the ulysses degree are checked at call time by the
  pipefusion package; `valid_configs`
  applies them too when given a height/width.

Checked at call time by the strategies, not here: cfg=2 without guidance in the call
(`cfg.py`), the image size against the model (`data.check_size`), patches vs height
(`pipefusion/`).
"""

from __future__ import annotations

from typing import Any

from torch.distributed.tensor import DTensor

from ditmesh.config import AXES, ParallelConfig
from ditmesh.models import ModelAdapter, adapter_for
from ditmesh.parallel.attention import resolve_backend
from ditmesh.parallel.data import check_size
from ditmesh.parallel.pipefusion import composition_problems, patch_rows
from ditmesh.parallel.tensor import check_degree


def check(pipe: Any, config: ParallelConfig, world_size: int, device_type: str = "cpu") -> None:
    """Raise `ValueError` (the first problem, naming the fix) unless `config` can run `pipe`
    (a diffusers pipeline or a bare denoiser) on `world_size` processes. Local: no collective."""
    config.check_world_size(world_size)
    problems = config_problems(pipe, config, device_type=device_type)
    if problems:
        raise ValueError(problems[0])


def config_problems(pipe: Any, config: ParallelConfig, *, device_type: str = "cpu") -> list[str]:
    """Every reason `config` cannot run `pipe` (empty when it can), world size aside."""
    adapter = adapter_for(pipe)
    denoiser = getattr(pipe, adapter.denoiser_attr, pipe)
    is_pipeline = denoiser is not pipe
    problems = _needs_pipeline(config, adapter, is_pipeline)
    problems += _needs_plans(config, adapter)
    if problems:
        return problems  # the rules below read the plans
    problems += _tensor_problems(config, adapter, denoiser)
    problems += _ring_problems(config, device_type)
    problems += _setting_problems(config)
    problems += composition_problems(pipe, config, adapter)
    return problems


def _setting_problems(config: ParallelConfig) -> list[str]:
    """Settings that would do nothing under this config's degrees."""
    problems = []
    if config.ulysses_head_groups > 1 and config.ulysses_degree == 1:
        problems.append("ulysses_head_groups > 1 has nothing to overlap without Ulysses; set ulysses_degree > 1 or drop it")
    if config.reorder_comms and config.sequence_degree == 1:
        problems.append("reorder_comms reorders the compiled blocks' sequence exchanges; set ulysses_degree or "
                        "ring_degree > 1, or drop it")
    return problems


def valid_configs(
    pipe: Any,
    world_size: int,
    height: int | None = None,
    width: int | None = None,
    *,
    allow_head_padding: bool = True,
    **settings: Any,
) -> list[ParallelConfig]:
    """Every config that runs `pipe` (pipeline or bare denoiser) on `world_size` processes.

    Enumerates the factorisations of `world_size` over the axes data, cfg, pipefusion, ring,
    ulysses, tensor (cfg 1 or 2) and keeps those `check` accepts. With a `height`, PipeFusion's
    patches must fit the image's token rows; `height`/`width` must be valid image sizes.
    `allow_head_padding=False` drops Ulysses degrees that pad heads (wasted attention compute).
    `settings` (e.g. ``pipefusion_patches=4``, ``attention_backend="math"``) go into every config.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    adapter = adapter_for(pipe)
    check_size(adapter, height, width)
    configs = []
    for degrees in _factorisations(world_size, len(AXES)):
        if degrees[AXES.index("cfg")] > 2:
            continue
        config = ParallelConfig(**{f"{axis}_degree": d for axis, d in zip(AXES, degrees)}, **settings)
        if config_problems(pipe, config) or not _fits_image(config, adapter, height, width):
            continue
        if not allow_head_padding and pads_heads(config, getattr(pipe, adapter.denoiser_attr, pipe)):
            continue
        configs.append(config)
    return configs


def pads_heads(config: ParallelConfig, denoiser: Any) -> bool:
    """Whether Ulysses pads this denoiser's heads per tensor rank (local heads % ulysses != 0)."""
    heads = getattr(getattr(denoiser, "config", None), "num_attention_heads", None)
    if config.ulysses_degree == 1 or not isinstance(heads, int):
        return False
    return (heads // config.tensor_degree) % config.ulysses_degree != 0


# ---- the rules --------------------------------------------------------------------------------


def _needs_pipeline(config: ParallelConfig, adapter: ModelAdapter, is_pipeline: bool) -> list[str]:
    if is_pipeline:
        return []
    return [
        f"{axis}={config.degrees[axis]} splits pipeline calls; pass the {adapter.name} pipeline to parallelize, "
        f"not its {adapter.denoiser_attr} (a bare denoiser takes ring, ulysses and tensor only)"
        for axis in ("data", "cfg", "pipefusion")
        if config.degrees[axis] > 1
    ]


def _needs_plans(config: ParallelConfig, adapter: ModelAdapter) -> list[str]:
    # (axes, degree, plan): an axis with degree > 1 needs the family's plan for it.
    needs = (
        ("ring/ulysses", config.sequence_degree, adapter.sequence_plan),
        ("tensor", config.tensor_degree, adapter.tensor_plan),
        ("pipefusion", config.pipefusion_degree, adapter.stage_plan),
    )
    supported = ", ".join(["data", "cfg"] + [axis for axis, _, plan in needs if plan is not None])
    return [
        f"{axes} parallelism has no plan for {adapter.name} models (got {config}); use {supported} for them"
        for axes, degree, plan in needs
        if degree > 1 and plan is None
    ]


def _tensor_problems(config: ParallelConfig, adapter: ModelAdapter, denoiser: Any) -> list[str]:
    if config.tensor_degree == 1 or _is_sharded(denoiser):
        # Sharded already (`tensor.load_sharded`): its attention modules count local heads, and
        # `tensor.apply` checks it was sharded over the same ranks.
        return []
    try:
        check_degree(denoiser, adapter.tensor_plan, config.tensor_degree)
    except ValueError as error:
        return [str(error)]
    return []


def _is_sharded(denoiser: Any) -> bool:
    return any(isinstance(p, DTensor) for p in denoiser.parameters())


def _ring_problems(config: ParallelConfig, device_type: str) -> list[str]:
    if config.ring_degree == 1:
        return []
    try:
        resolve_backend(config.attention_backend, need_lse=True, device_type=device_type)
    except ValueError as error:
        return [str(error)]
    return []


def _fits_image(config: ParallelConfig, adapter: ModelAdapter, height: int | None, width: int | None) -> bool:
    """PipeFusion's call-time size rules (the pipefusion package raises them), for listing configs."""
    if config.pipefusion_degree == 1:
        return True
    # One token row/column is `size_multiple` pixels for FLUX and SD3 (VAE 8 x patch/packing 2).
    if width is not None and (width // adapter.size_multiple) % config.ulysses_degree:
        return False  # each stage's ulysses ranks split a patch's token columns evenly
    if height is None:
        return True
    try:
        patch_rows(height // adapter.size_multiple, config.num_patches, height)
    except ValueError:
        return False
    return True


def _factorisations(n: int, parts: int) -> list[tuple[int, ...]]:
    """Ordered tuples of `parts` positive integers whose product is `n`."""
    if parts == 1:
        return [(n,)]
    return [
        (d, *rest)
        for d in range(1, n + 1)
        if n % d == 0
        for rest in _factorisations(n // d, parts - 1)
    ]


__all__ = ["check", "config_problems", "valid_configs", "pads_heads"]
