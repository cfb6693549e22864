"""Single-GPU fast path: what `parallelize(pipe, ParallelConfig())` does on one CUDA device.

Four steps, each through a public seam, none changing the model's outputs beyond bf16 rounding:
1. fuse the Q/K/V projections (diffusers' `fuse_qkv_projections()`, where the model's own
   processors support it: FLUX yes, SD3 no): one wide matmul, not three; the unfused weights
   become views of the fused one (no second copy), and LoRAs on them switch a module back to
   its unfused projections (`ditmesh.parallel.lora`);
2. give cuDNN attention priority for the denoiser's forward (`sdpa_kernel(..., set_priority=True)`
   entered by a forward pre-hook, left by an always-called forward hook): the fastest SDPA kernel
   on Hopper at these lengths; others stay as fallbacks for shapes cuDNN refuses;
3. regional compilation: each repeated block compiled with `fullgraph=True`; blocks of one class
   share one compiled graph (parameters are graph inputs), so FLUX compiles two graphs, not 57;
4. only with `autotune=True`: inductor's coordinate-descent tuning of every generated kernel
   (and no epilogue fusion into cuBLAS matmuls). It benchmarks each kernel's launch configs
   while compiling, which multiplies the compile time; benchmarks/scaling.py measures both
   (on one H200: 131.52 vs 131.56 ms per step, compile 114 vs 5 s: no gain; nor from
   `max_autotune_gemm`, 131.35 ms, compile 114 s).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditmesh.models import adapter_for
from ditmesh.parallel import graphs, lora
from ditmesh.parallel import quantize as quantize_module
from ditmesh.parallel.data import PipelineWrapper

_SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def apply_fastpath(pipe: Any, *, compile: bool = True, autotune: bool = False, cuda_graphs: bool = True,
                   max_graphs: int = graphs.MAX_GRAPHS, quantize: str | None = None) -> Any:
    """Speed up a diffusers pipeline (or a bare denoiser) on one CUDA GPU; returns it (a bare
    denoiser comes back wrapped when `cuda_graphs`).

    `compile=False` keeps eager execution (fused QKV and cuDNN attention only). `autotune=True`
    adds inductor's coordinate-descent tuning (slow compile, no measured gain).
    `cuda_graphs` replays each step as one captured graph (`ditmesh.parallel.graphs`), keeping
    at most `max_graphs` of them. A pipeline then comes back wrapped (`data.PipelineWrapper`), so
    that its LoRA methods reach the graphed transformer. `quantize="fp8"`: fp8 linears
    (`ditmesh.parallel.quantize`), applied after fusing and before compiling.
    """
    adapter = adapter_for(pipe)
    denoiser = getattr(pipe, adapter.denoiser_attr, pipe)
    fuse_qkv(denoiser)
    quantize_module.apply(denoiser, adapter, quantize)
    prefer_cudnn_attention(denoiser)
    if compile:
        compile_repeated_blocks(denoiser, autotune=autotune)
    if not cuda_graphs:
        return pipe
    pipe = graphs.apply(pipe, adapter, max_graphs)
    # The pipeline's LoRA methods must reach the model inside the graphed wrapper.
    return PipelineWrapper(pipe) if hasattr(pipe, adapter.denoiser_attr) else pipe


def fuse_qkv(denoiser: torch.nn.Module) -> None:
    """Step 1 of `apply_fastpath`: one Q/K/V matmul where the model's own processors support it.

    The unfused projections stay (LoRAs target them) but hold views of the fused weights, so no
    weight is stored twice; a module whose parts carry an active LoRA runs them unfused."""
    if not lora.fusable(denoiser):
        return
    # What `fuse_qkv_projections` does, one module at a time: each module's unfused weights become
    # views of its fused copy before the next module fuses, so the load peaks one block above the
    # model (fusing all first held both copies at once: FLUX.1-dev 26.3 GiB instead of 22.3).
    fused = []
    for attn in lora.fusable_attention(denoiser):
        attn.fuse_projections()
        lora.share_fused_storage(attn)
        fused.append(attn)
    fused = [m for m in fused if getattr(m, "fused_projections", False)]
    # A LoRA on to_q/k/v (loaded before or after) acts only in the unfused path: before every
    # forward, each module takes the fused one only while it equals the unfused ones.
    lora.sync_fused_projections(fused)
    denoiser.register_forward_pre_hook(lambda module, args: lora.sync_fused_projections(fused))


def prefer_cudnn_attention(denoiser: torch.nn.Module) -> None:
    """Step 2 of `apply_fastpath`: cuDNN attention first for every forward of `denoiser`."""
    # Compiled blocks choose their SDPA kernel when traced, which happens inside this context,
    # so compiled and eager forwards both get cuDNN. A stack, so a re-entrant forward nests.
    contexts: list[contextlib.AbstractContextManager] = []

    def enter(module, args):
        ctx = sdpa_kernel(_SDPA_PRIORITY, set_priority=True)
        ctx.__enter__()
        contexts.append(ctx)

    def leave(module, args, output):
        contexts.pop().__exit__(None, None, None)

    denoiser.register_forward_pre_hook(enter)
    denoiser.register_forward_hook(leave, always_call=True)


# `torch._inductor.config` settings of `autotune=True`, given to each block's compile (not process-wide).
AUTOTUNE_KNOBS = dict(coordinate_descent_tuning=True, coordinate_descent_check_all_directions=True, epilogue_fusion=False)
# Settings of `reorder_comms=True` (`ParallelConfig.reorder_comms`): inductor's scheduler moves
# independent compute between each collective's start and its wait, and sinks the waits.
REORDER_COMMS_KNOBS = dict(reorder_for_compute_comm_overlap=True,
                           reorder_for_compute_comm_overlap_passes=["reorder_compute_for_overlap", "sink_waits", "raise_comms"])


def compile_repeated_blocks(denoiser: torch.nn.Module, *, autotune: bool = False, reorder_comms: bool = False,
                            backend: str = "inductor") -> None:
    """Regional compilation (step 3 of `apply_fastpath`); `autotune` adds `AUTOTUNE_KNOBS` and
    `reorder_comms` adds `REORDER_COMMS_KNOBS` to the inductor options of these compiles only.

    Also what `parallelize` compiles under sequence parallelism: the blocks then hold the
    Ulysses all-to-alls and ring all-gathers (functional collectives) in their graphs."""
    options = {**(AUTOTUNE_KNOBS if autotune else {}), **(REORDER_COMMS_KNOBS if reorder_comms else {})}
    for block in repeated_blocks(denoiser):
        # Inductor reads `options` at each graph's compile (first call), patched over its config.
        block.compile(fullgraph=True, backend=backend, options=options if options and backend == "inductor" else None)


def repeated_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's repeated blocks: the classes it names in diffusers' `_repeated_blocks`, else
    the members of its top-level `ModuleList`s (`transformer_blocks`, `single_transformer_blocks`)."""
    names = set(getattr(denoiser, "_repeated_blocks", None) or ())
    if names:
        return [m for m in denoiser.modules() if type(m).__name__ in names]
    return [m for child in denoiser.children() if isinstance(child, torch.nn.ModuleList) for m in child]
