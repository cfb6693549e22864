"""`parallelize(pipe, config)`: the one place strategies are composed, in one fixed order."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ditmesh.config import CacheConfig, ParallelConfig
from ditmesh.models import adapter_for, denoisers
from ditmesh.parallel import cache as step_cache
from ditmesh.parallel import cfg, data, fastpath, graphs, quantize as fp8, sequence, tensor, text, validate, vae
from ditmesh.parallel.mesh import ParallelMesh
from ditmesh.parallel.pipefusion import apply_pipefusion


def parallelize(pipe: Any, config: ParallelConfig, mesh: ParallelMesh | None = None, *, compile: bool | None = None,
                autotune: bool = False, cuda_graphs: bool | None = None, max_graphs: int = graphs.MAX_GRAPHS,
                cache: CacheConfig | str | None = None, quantize: str | None = None) -> Any:
    """Make a diffusers pipeline (or a bare transformer) run under `config` on this rank.

    Call it on every rank, after torch.distributed is initialised (`DistributedRunner` does
    that), with the same pipeline and config. The ordinary call ``pipe(prompt=...)`` then runs
    in parallel; rank 0 holds the complete result. With a serial config and no process group
    the pipeline is returned as it is (on CUDA, with the single-GPU fast path).

    On CUDA the fast path's steps apply under every config: fused Q/K/V (on each rank's heads
    under tensor parallelism; not under PipeFusion), cuDNN attention first and regional
    `torch.compile` of the repeated blocks, collectives included. `compile` overrides the last
    (None: compile on CUDA only, and there not yet under PipeFusion degree > 1, whose compiled
    stages are proven on CPU but not yet measured in its full loop on GPUs; the first forward
    then compiles, for seconds). `autotune=True`
    adds inductor's coordinate-descent kernel tuning to the compile (many times slower to
    compile; `benchmarks/scaling.py` measures what it gains). `cuda_graphs` replays each denoiser
    step as one captured CUDA graph, the collectives of compiled blocks inside it (`graphs.py`;
    None: on CUDA, compiled or eager, except under PipeFusion, whose P2P schedule runs inside
    the call; False: off). Eager, a rank's host issuing every op is the step's bottleneck
    under a process group, and each collective waits for the slower host: a graph removes that
    issue time (one rank of tensor=2, FLUX.1-dev: 324.5 ms eager, 98.2 ms eager + graphs,
    serial eager 198.6 ms; benchmarks/results/strategies_h200.md).
    Issuing a compiled FLUX step takes the host 30-50 ms, more than one rank's GPU work at 4 or
    8 GPUs (one rank of ulysses=8: 38.1 ms issued block by block, 23.4 ms as one graph;
    benchmarks/results/peers_h200_fake8.md). `max_graphs` bounds the graphs kept
    (one per input shape and LoRA adapter set, least recently used dropped).

    `cache` (a `CacheConfig` or its string form, e.g. "fbcache,threshold=0.1") skips all blocks
    but the first on steps that change little, with one decision per step for every rank
    (`cache.py`); each call then reports ``computed_steps``.

    `quantize="fp8"` runs the denoiser's block linears as fp8 matmuls with rowwise scales
    (torchao; `quantize.py`: bf16 weights in, needs compute capability >= 8.9 on CUDA); it
    composes with every strategy, compile, CUDA graphs and `cache`.
    """
    cache = cache if isinstance(cache, CacheConfig) else CacheConfig.parse(cache)
    quantize = fp8.normalize(quantize)
    if config.world_size == 1 and not dist.is_initialized():
        # One process: on CUDA the single-GPU fast path; on CPU the pipeline as it is. The step
        # cache graphs its own pieces (first block | the rest | the residual add), not the whole step.
        if quantize:
            fp8.check(pipe, adapter_for(pipe), quantize, "cuda" if _on_cuda(pipe) else "cpu")
        if _on_cuda(pipe):
            pipe = fastpath.apply_fastpath(pipe, compile=compile is not False, autotune=autotune,
                                           cuda_graphs=cuda_graphs is not False and not cache.enabled,
                                           max_graphs=max_graphs, quantize=quantize)
        elif quantize:
            for denoiser in denoisers(pipe, adapter_for(pipe)).values():
                fp8.apply(denoiser, adapter_for(pipe), quantize)
        if cache.enabled:
            pipe = step_cache.apply(pipe, adapter_for(pipe), cache, cuda_graphs=_on_cuda(pipe) and cuda_graphs is not False)
        return pipe
    if cuda_graphs and config.pipefusion_degree > 1:
        # PipeFusion's trajectory interleaves host-driven P2P batches (polled, not awaited) with its
        # compute, inside one denoiser call: no single graph can hold it (docs/pipefusion.md).
        raise ValueError("cuda_graphs=True cannot capture PipeFusion's P2P stage schedule; with pipefusion_degree > 1 "
                         "pass cuda_graphs=None or False (its blocks are still compiled)")
    adapter = adapter_for(pipe)
    # 0. validate: every rule that can refuse this config (validate.py), before the mesh's
    #    collectives and any weight change, so all ranks raise the same ValueError and stay usable.
    _validate(pipe, config, mesh)
    step_cache.check(pipe, config, cache, adapter)
    fp8.check(pipe, adapter, quantize, "cuda" if _on_cuda(pipe) else "cpu", config.tensor_degree)
    mesh = mesh or ParallelMesh.build(config)
    # 0b. text encoders and VAE on the ranks that share an image (every axis but data): the prompt
    #    is encoded on one of them and broadcast, the VAE splits each image's rows over them. They
    #    touch only `encode_prompt` and the VAE, which no later step wraps, so they go first, on the
    #    bare pipeline (every rank here: making the group is collective).
    if hasattr(pipe, adapter.denoiser_attr):
        vae.apply(pipe, mesh, adapter)
        text.apply(pipe, mesh, adapter)
    # Order matters: inner strategies first, each later step wraps what the earlier ones produced,
    # so any combination of degrees composes (the rank layout of the axes is mesh.py's business):
    # 1. tensor: shard the denoiser's weights in place (innermost: `parallelize_module` needs the
    #    plain nn.Linear modules, before anything wraps or drops them; attention modules then see
    #    their local head count, which Ulysses in step 2 splits further).
    # A pipeline holds the denoiser under `denoiser_attr` (Wan 2.2 a second expert too: every
    # step below applies to each); a bare transformer is the denoiser.
    experts = list(denoisers(pipe, adapter).values())
    for denoiser in experts:
        tensor.apply(denoiser, mesh, adapter, config)
    # 1b. CUDA fast path: fused Q/K/V before step 2 wraps the processors; under tensor parallelism
    #    on the local shards of each rank's heads (diffusers' fusion would gather them). Not under
    #    PipeFusion: LoRAs switched after parallelize (set_adapters) act only on unfused projections,
    #    and its stage loop calls the blocks, not the forward whose pre-hook re-syncs them.
    cuda, pipefusion = _on_cuda(pipe), config.pipefusion_degree > 1
    # Compiled by default where measured on GPUs (tensor=2: one rank 71.1 ms against the serial
    # compiled 134.1, strategies_h200.md); PipeFusion compiles (CPU-proven with aot_eager, its
    # stages measured alone in tp_step_h200.md) only when asked for with compile=True.
    compiled = bool((cuda and not pipefusion) if compile is None else compile)
    for denoiser in experts if cuda else ():
        fastpath.prefer_cudnn_attention(denoiser)
        if config.tensor_degree > 1:
            if compiled:
                tensor.fuse_qkv(denoiser, mesh, adapter)
        elif not pipefusion:
            fastpath.fuse_qkv(denoiser)
    # 1c. fp8: quantise the linears as step 1b left them (a fused Q/K/V weight is quantised once,
    #    its parts become views of it), before step 2b compiles the blocks and 2c captures them.
    #    Local to each rank (tensor parallelism is refused with it in step 0).
    for denoiser in experts:
        fp8.apply(denoiser, adapter, quantize)
    # 2. sequence (ulysses, ring): split/gather hooks and sequence-parallel attention processors,
    #    on the denoiser itself: before step 3 replaces it (PipeFusion's stale-K/V processors wrap
    #    these, and its stage loop shards each patch with their context) and before step 4 wraps it
    #    (the cfg wrapper halves the batch, then the hooks split that half's tokens).
    for denoiser in experts if config.sequence_degree > 1 else ():
        sequence.apply(denoiser, mesh, adapter, config)
    # 2b. regional compile of the blocks as steps 1-2 left them (Ulysses all-to-alls, the ring's
    #    all-gather and tensor parallelism's DTensor all-reduces are functional collectives: they sit
    #    inside the graphs, no graph break; DTensor's dispatch is traced away). PipeFusion's stages
    #    call these same block modules (step 3 keeps them), so its blocks are compiled too.
    if compiled:
        # Head groups need the reordering too: inductor's default schedule starts each group's
        # exchange only after the previous group's attention, which leaves nothing to overlap.
        reorder = config.reorder_comms or config.ulysses_head_groups > 1
        for denoiser in experts:
            fastpath.compile_repeated_blocks(denoiser, autotune=autotune, reorder_comms=reorder)
    # 2c. CUDA graphs around the whole denoiser as steps 1-2b left it (hooks, compiled blocks and
    #    their collectives are captured; cfg and data, which wrap it, stay outside).
    #    Every rank captures and replays the same calls (the strategies make them alike), so the
    #    captured collectives pair up on replay as they did when captured.
    graphed = (cuda_graphs is not False) and cuda and not pipefusion
    # 2d. step cache: takes over the calls of the blocks as steps 1-2b left them (sharded, with the
    #    sequence hooks, compiled) and graphs its three pieces itself instead of 2c's whole step,
    #    since its host decision sits between the first block and the rest. Before cfg/data
    #    (steps 4-5), which wrap it: it reduces its statistic over the cfg ranks itself.
    if cache.enabled:
        pipe = step_cache.apply(pipe, adapter, cache, mesh, cuda_graphs=graphed)
    elif graphed:
        pipe = graphs.apply(pipe, adapter, max_graphs)
    # 3. pipefusion: split the blocks into stages; takes over the denoising loop. Inside cfg: each
    #    guidance branch runs its own pipeline of stages, exchanging predictions per patch.
    if config.pipefusion_degree > 1:
        pipe = apply_pipefusion(pipe, mesh, adapter)
    # 4. cfg: each cfg rank computes one guidance branch; predictions are gathered every step.
    #    It wraps whatever denoiser steps 1-3 left (plain, sharded, sequence-parallel or a stage).
    if config.cfg_degree > 1:
        pipe = cfg.apply(pipe, mesh, adapter, config)
    # 5. data: split the batch of prompts/images across data replicas; rank 0 collects the images.
    #    A pipeline always gets this outermost wrapper (data degree 1 included): it checks the image
    #    size and makes every rank that works on an image (its cfg x pipefusion x ring x ulysses x
    #    tensor ranks) draw the same noise.
    if hasattr(pipe, adapter.denoiser_attr):
        pipe = data.apply(pipe, mesh, adapter, config)
    assert config.data_degree == 1 or hasattr(pipe, adapter.denoiser_attr), "validate refuses data>1 on a bare denoiser"
    return pipe


def _validate(pipe: Any, config: ParallelConfig, mesh: ParallelMesh | None) -> None:
    if not dist.is_initialized():
        return  # ParallelMesh.build raises, saying how to initialise
    # The device the mesh is (or will be) on: ring attention's backend must run there.
    nccl = torch.cuda.is_available() and dist.get_backend() == "nccl"
    device_type = mesh.device.type if mesh is not None else ("cuda" if nccl else "cpu")
    validate.check(pipe, config, dist.get_world_size(), device_type)


def _on_cuda(pipe: Any) -> bool:
    # The denoiser's device decides (a pipeline's `.device` is its first module's).
    device = getattr(pipe, "device", None)
    return device is not None and torch.device(device).type == "cuda"
