"""PipeFusion: patch-level pipeline parallelism with stale activations, pipelined across steps.

The transformer's blocks are split into `pipefusion_degree` stages (one per rank of the
"pipefusion" mesh axis, balanced by the adapter's `StagePlan` block costs); each rank keeps only
its own blocks' weights. The image is cut into `num_patches` bands of token rows that flow
stage -> stage by point-to-point send/recv. In each attention a patch's own keys/values are fresh;
the other patches' come from a per-layer buffer holding their most recent values (this step if
that patch already passed the stage, else the previous step), as in PipeFusion (xDiT).

Text tokens travel with each patch through the stages (the patch's text stream sees fresh text
K/V and the [stale + fresh] image K/V), so with only warm-up steps the result is exact.

Composes with the `static` step cache (`cache`: each stage adds its own saved residual on a
cached step; the fbcache policy is refused, its whole-image decision would drain the pipeline),
and with cfg (each cfg rank runs a pipeline on one guidance branch; the last stages
all-gather per patch to combine guidance) and with Ulysses inside each stage (the patch's tokens
are sharded; the stale K/V are spliced in after the all-to-all, on this rank's heads).

The package, by seam:

- `stages`: blocks into stages, image rows into patches (planning);
- `stale_kv`: the attention-processor wrapper that splices the buffered K/V in;
- `schedule`: the static tick schedule every rank derives alike (which stage computes which
  item when, and which tensors move at each tick), and why its P2P order cannot deadlock on NCCL;
- `exchange`: posting each tick's transfers as one batch on the pipefusion group;
- `cache`: static step caching per stage (residuals per patch, saved at computed steps);
- `loop`: a stage running its ticks, and `PipeFusionTransformer`, which owns the denoising loop;
- here: `composition_problems` (checked by `validate`) and `apply_pipefusion` (parallelize's step 3).
"""

from __future__ import annotations

from typing import Any

from ditmesh.config import ParallelConfig
from ditmesh.parallel.pipefusion.cache import CACHE_HANDLE, StageCache
from ditmesh.parallel.pipefusion.loop import PipeFusionTransformer, Stage, StageTimes
from ditmesh.parallel.pipefusion.schedule import Item, Schedule, build_items, build_schedule
from ditmesh.parallel.pipefusion.stages import keep_stage, patch_rows, split_stages
from ditmesh.parallel.pipefusion.stale_kv import PatchContext, StaleKVProcessor, install_stale_kv
from ditmesh.parallel.sequence import _HANDLE_ATTR as SEQUENCE_HANDLE
from ditmesh.plans import StagePlan

__all__ = ["StagePlan", "PipeFusionTransformer", "apply_pipefusion", "composition_problems", "split_stages",
           "patch_rows", "keep_stage", "StaleKVProcessor", "PatchContext", "install_stale_kv", "Stage",
           "StageTimes", "StageCache", "Item", "Schedule", "build_items", "build_schedule"]


# ---- parallelize step 3 ---------------------------------------------------------------------


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
    if config.cfg_degree > 1 and adapter.cfg_mode != "batched":
        problems.append(
            f"pipefusion x cfg supports batched guidance (SD3); {adapter.name} runs CFG as two sequential calls, "
            "which PipeFusion's one-call-per-step loop cannot pair; drop cfg=2 (e.g. use pipefusion or ulysses for those GPUs)"
        )
    return problems


def apply_pipefusion(pipe: Any, mesh: Any, adapter: Any) -> Any:
    """Replace the pipeline's transformer by this rank's `PipeFusionTransformer` stage (step 3).

    A static step cache that `cache.apply` (step 2d) left on the transformer runs inside the stages."""
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
                                    adapter.joint_text, guidance, cfg_group, sequence, getattr(model, CACHE_HANDLE, None))
    setattr(pipe, adapter.denoiser_attr, wrapper)
    return pipe
