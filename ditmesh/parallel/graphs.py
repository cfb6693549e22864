"""CUDA graphs: a denoiser step issued as one graph replay instead of thousands of launches.

A compiled FLUX.1 step is ~60 compiled block graphs of dozens of kernels each; issuing them
takes the host 30-50 ms (measured on an H200, benchmarks/results/scaling_h200_cuda_graphs.md).
At one GPU's share of a large parallel run (ulysses=8: 22 ms of GPU work) the GPU then waits
for the host. `GraphedDenoiser` captures the whole denoiser forward (compiled blocks, hooks and
the collectives inside them) once per input signature and replays it: the host issues one
graph launch per step.

Per signature (the shapes, dtypes and devices of the tensor arguments and the values of the
others) the first call runs the denoiser twice on a side stream (the compile happens there;
the collectives run for real), then captures a third run into a graph whose inputs are static
buffers; every call copies its tensors into those buffers, replays, and returns a copy of the
outputs (the next replay overwrites the graph's own). Calls that record autograd, carry
arguments that are not plain values, or run off CUDA go to the denoiser unchanged.

The key of a graph also holds the denoiser's LoRA state (`lora.adapter_state`: adapter layers,
active adapters, scales, merged or not), so loading, switching, fusing or unloading a LoRA
captures a new graph once per adapter set instead of replaying one that does not see it.
At most `max_graphs` graphs are kept (least recently used dropped first): each holds its
activations' memory, and a server taking any size would otherwise grow without bound.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ditmesh.parallel import lora
from ditmesh.parallel.data import DenoiserWrapper

WARMUP_CALLS = 2  # before capture: the first compiles, the second runs what will be captured
MAX_GRAPHS = 8  # default bound of the graphs one denoiser keeps (shapes x adapter sets)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # the static buffers every call copies its tensors into
    output: Any


class GraphedDenoiser(DenoiserWrapper):
    """Wraps a denoiser so each forward on CUDA replays a captured CUDA graph; same signature.

    Every attribute other than the wrapper's own reaches the wrapped denoiser (config, dtype,
    cache_context, ...), so pipelines and later strategies use it as the denoiser itself.
    Collective: under a process group, every rank must make the same calls with the same shapes
    (as ditmesh's strategies do), so that all ranks capture and replay together.
    """

    def __init__(self, denoiser: nn.Module, max_graphs: int = MAX_GRAPHS):
        super().__init__(denoiser)
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1 (got {max_graphs}); to replay no graphs pass cuda_graphs=False")
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[Any, _Graph] = OrderedDict()  # least recently used first
        self._pool = None  # one memory pool shared by this denoiser's graphs (one per signature)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = graph_key(self.inner, leaves, spec)
        if key is None or not _graphable(leaves):
            return self.inner(*args, **kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)  # its memory returns to the pool for the next capture
            entry = self._capture(key, leaves, spec)
        self._graphs.move_to_end(key)
        for static, value in zip(entry.inputs, (x for x in leaves if isinstance(x, torch.Tensor))):
            static.copy_(value)
        entry.graph.replay()
        return pytree.tree_map_only(torch.Tensor, torch.clone, entry.output)

    def _capture(self, key: Any, leaves: list, spec: Any) -> _Graph:
        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = pytree.tree_unflatten(static, spec)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_CALLS):
                self.inner(*args, **kwargs)
            # "thread_local": the NCCL watchdog thread keeps querying events while this thread
            # captures; in the default global mode that query would invalidate the capture.
            with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                output = self.inner(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        entry = self._graphs[key] = _Graph(graph, [x for x in static if isinstance(x, torch.Tensor)], output)
        return entry


def graph_key(denoiser: nn.Module, leaves: list, spec: Any) -> Any:
    """The key a call's graph is kept under: its arguments' signature and the LoRA state of
    `denoiser` (None: not graphable)."""
    signature = _signature(leaves, spec)
    return None if signature is None else (signature, lora.adapter_state(denoiser))


def _signature(leaves: list, spec: Any) -> Any:
    """A hashable key of a call's arguments (tensors by shape, dtype and device, the rest by
    value), or None if one is an object whose state a graph could not follow."""
    key = [spec]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append((tuple(leaf.shape), leaf.dtype, leaf.device))
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            key.append(leaf)
        else:
            return None
    return tuple(key)


def _graphable(leaves: list) -> bool:
    """CUDA tensors, no autograd recording, not already inside a capture."""
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return False
    return any(x.is_cuda for x in tensors) and not torch.cuda.is_current_stream_capturing()


def apply(pipe: Any, adapter: Any, max_graphs: int = MAX_GRAPHS) -> Any:
    """Replace `pipe`'s denoiser (or `pipe`, a bare denoiser) by a `GraphedDenoiser`; returns
    what the caller should use as `pipe` from now on."""
    denoiser = getattr(pipe, adapter.denoiser_attr, None)
    if denoiser is None:
        return GraphedDenoiser(pipe, max_graphs)
    setattr(pipe, adapter.denoiser_attr, GraphedDenoiser(denoiser, max_graphs))
    return pipe
