"""Text encoders run once per image, not once per rank.

Every rank that works on an image (the `vae.image_mesh` group: cfg x pipefusion x ring x ulysses
x tensor) needs the same prompt embeddings. `apply` wraps the pipeline's `encode_prompt` (the seam
every diffusers pipeline calls, FLUX's twice with true CFG) so that the group's first rank encodes
and broadcasts what it returns (a tuple of tensors, some None: FLUX (embeds, pooled, text ids),
SD3 and SDXL (embeds, negative, pooled, negative pooled)). The other ranks never run the encoders,
so they drop them (the adapter's `text_encoder_attrs` become None): T5-XXL alone is 8.9 GiB of
bf16 weights per GPU (docs/vae.md). Under data parallelism each data group has its own prompts,
and its own encoding rank.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ditmesh.parallel.mesh import ParallelMesh
from ditmesh.parallel.vae import image_mesh


def apply(pipe: Any, mesh: ParallelMesh, adapter: Any) -> None:
    """Encode prompts of `pipe` on one rank per image group and broadcast; free the encoders elsewhere."""
    group = image_mesh(mesh).get_group()
    if not adapter.text_encoder_attrs or not hasattr(pipe, "encode_prompt") or dist.get_world_size(group) == 1:
        return
    source = dist.get_process_group_ranks(group)[0]
    encodes = dist.get_rank() == source
    encode = pipe.encode_prompt

    @functools.wraps(encode)
    def encode_once(*args: Any, **kwargs: Any) -> Any:
        # Every rank of the group calls encode_prompt at the same point of the pipeline call, so
        # the broadcasts pair up; only the source runs the encoders.
        return broadcast_tree(encode(*args, **kwargs) if encodes else None, source, group)

    pipe.encode_prompt = encode_once
    if not encodes:
        for attr in adapter.text_encoder_attrs:
            setattr(pipe, attr, None)  # the pipelines read the encoders only inside encode_prompt


@dataclass(frozen=True)
class _TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device_type: str


def broadcast_tree(tree: Any, source: int, group: dist.ProcessGroup) -> Any:
    """`tree` (tuples, lists, dicts of tensors and plain values) of global rank `source`, on every
    rank of `group`: its layout as one pickled object, then each tensor by `dist.broadcast`,
    received on this rank's device of the tensor's kind."""
    tensors: list[torch.Tensor] = []
    layout = [_layout(tree, tensors) if dist.get_rank() == source else None]
    dist.broadcast_object_list(layout, src=source, group=group)
    if dist.get_rank() != source:
        tensors = [torch.empty(spec.shape, dtype=spec.dtype, device=_device(spec.device_type)) for spec in _specs(layout[0])]
    for tensor in tensors:
        dist.broadcast(tensor, src=source, group=group)
    return _rebuild(layout[0], iter(tensors))


def _layout(tree: Any, tensors: list[torch.Tensor]) -> Any:
    """`tree` with each tensor replaced by its spec (collected into `tensors`, in order)."""
    if isinstance(tree, torch.Tensor):
        tensors.append(tree.contiguous())
        return _TensorSpec(tuple(tree.shape), tree.dtype, tree.device.type)
    if isinstance(tree, (tuple, list)):
        return type(tree)(_layout(item, tensors) for item in tree)
    if isinstance(tree, dict):
        return {key: _layout(item, tensors) for key, item in tree.items()}
    return tree


def _specs(layout: Any) -> list[_TensorSpec]:
    if isinstance(layout, _TensorSpec):
        return [layout]
    items = layout.values() if isinstance(layout, dict) else layout if isinstance(layout, (tuple, list)) else ()
    return [spec for item in items for spec in _specs(item)]


def _rebuild(layout: Any, tensors: Any) -> Any:
    if isinstance(layout, _TensorSpec):
        return next(tensors)
    if isinstance(layout, (tuple, list)):
        return type(layout)(_rebuild(item, tensors) for item in layout)
    if isinstance(layout, dict):
        return {key: _rebuild(item, tensors) for key, item in layout.items()}
    return layout


def _device(device_type: str) -> torch.device:
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type)
