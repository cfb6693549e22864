"""Stale K/V: the attention seam of PipeFusion.

In each attention a patch's own keys/values are fresh; the other patches' come from a per-layer
buffer holding the most recent values this stage computed for them (this step if that patch
already passed the stage, else the previous step), as in PipeFusion (xDiT).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ditmesh.parallel.attention import RedirectSDPA
from ditmesh.plans import Patch


@dataclass
class PatchContext:
    """Live state shared by one stage's attention wrappers: the patch being computed."""

    patch: Patch | None = None
    text_side: str | None = None  # "first" (FLUX), "last" (SD3) or None
    token_index: torch.Tensor | None = None
    """The patch's image token positions (long, on the model's device): what the compiled blocks
    read instead of the patch's Python ints, so patches of one size share one graph."""
    _indices: dict = field(default_factory=dict)

    def enter(self, patch: Patch, device: torch.device) -> None:
        """Make `patch` the one being computed (its index tensor made once per patch and device)."""
        key = (patch.tokens.start, patch.tokens.stop, device)
        if key not in self._indices:
            self._indices[key] = torch.arange(patch.tokens.start, patch.tokens.stop, device=device)
        self.patch, self.token_index = patch, self._indices[key]


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
        # Under torch.compile only tensors vary here (the patch's index, the buffers): the
        # patch's ints would specialise a graph per patch; its grid size is the same for all.
        index, side, grid = self.context.token_index, self.context.text_side, self.context.patch.grid
        n, seq = index.shape[0], fresh_BHSD.shape[2]
        image_at = seq - n if side == "first" else 0
        text_BHTD = fresh_BHSD[:, :, :image_at] if side == "first" else fresh_BHSD[:, :, n:]
        buffer = self._buffer(name, fresh_BHSD, grid.rows * grid.cols)
        buffer.index_copy_(2, index, fresh_BHSD[:, :, image_at : image_at + n])
        parts = (text_BHTD, buffer) if side == "first" else (buffer, text_BHTD)
        return torch.cat(parts, dim=2)

    def _buffer(self, name: str, like: torch.Tensor, num_tokens: int) -> torch.Tensor:
        # Allocated once per resolution/batch; rows are overwritten in place after that. The
        # stage runs the item that allocates them eagerly (loop.py), so compiled blocks find
        # them in place and every layer's processor guards alike.
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
