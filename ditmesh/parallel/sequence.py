"""Sequence parallelism (Ulysses, ring, and both: USP) for a transformer, applied from its plan.

A model's `SequencePlan` (data on its adapter, like diffusers' `_cp_plan`) says where its image
and text tokens are split into per-rank shards and where the output is gathered back. `apply`
installs:

1. split hooks: contiguous shards of each stream's tokens (image; text) in the order of the
   "sequence" mesh axis (ring-major, ulysses-minor), zero-padded at the end to a multiple of the
   sequence degree;
2. `SequenceParallelProcessor`s around the model's own attention processors (attention.py does
   the Ulysses all-to-all / ring exchange of the joint [text, image] sequence);
3. gather hooks: the output is all-gathered and the padding dropped, so every rank returns the
   full output.

Every rank then runs 1/N of the image stream and 1/N of the text stream of every block: no
token's work is repeated on two ranks.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist

from ditmesh.parallel.attention import SequenceContext, SequenceParallelProcessor, resolve_backend
from ditmesh.parallel.comm import gather_replicated, pad_dim
from ditmesh.plans import Gather, SequencePlan, Split

_HANDLE_ATTR = "_ditmesh_sequence_parallel"


class SequenceParallel:
    """Handle of sequence parallelism applied to one model; `remove()` restores the model."""

    def __init__(self, model: torch.nn.Module, ctx: SequenceContext, processors: dict[str, Any], hooks: list):
        self.model, self.ctx = model, ctx
        self._processors, self._hooks = processors, hooks

    def remove(self) -> None:
        """Remove the hooks and put the original attention processors back."""
        for hook in self._hooks:
            hook.remove()
        self.model.set_attn_processor(self._processors)
        delattr(self.model, _HANDLE_ATTR)


def apply(target: torch.nn.Module, mesh: Any, adapter: Any, config: Any) -> SequenceParallel:
    """Shard `target`'s image tokens over the mesh's ring x ulysses ranks following
    ``adapter.sequence_plan``. Call on every rank of the sequence group (the forward is collective)."""
    plan: SequencePlan | None = adapter.sequence_plan
    if plan is None:
        raise ValueError(f"model family {adapter.name!r} has no sequence plan; use ring_degree=1 and ulysses_degree=1 for it")
    if getattr(target, _HANDLE_ATTR, None) is not None:
        raise ValueError("sequence parallelism is already applied to this model; call .remove() on its handle before applying again")
    resolve_backend(config.attention_backend, need_lse=mesh.size("ring") > 1, device_type=mesh.device.type)
    ctx = SequenceContext(
        sequence_group=mesh.group("sequence"),
        ulysses_group=mesh.group("ulysses"),
        ring_group=mesh.group("ring"),
        joint_text=adapter.joint_text,
        backend=config.attention_backend,
        head_groups=config.ulysses_head_groups,
    )
    processors = _wrap_processors(target, ctx, plan)
    hooks = [target.register_forward_pre_hook(lambda module, args: _begin_forward(ctx), prepend=True)]
    hooks += _install_splits(target, plan.splits, ctx)
    hooks += [_submodule(target, g.module).register_forward_hook(_gather_hook(g, ctx)) for g in plan.gathers]
    handle = SequenceParallel(target, ctx, processors, hooks)
    setattr(target, _HANDLE_ATTR, handle)
    return handle


def _wrap_processors(model: torch.nn.Module, ctx: SequenceContext, plan: SequencePlan) -> dict[str, Any]:
    originals = dict(model.attn_processors)
    for name, processor in originals.items():
        if getattr(processor, "_parallel_config", None) is not None:
            raise ValueError(f"{name} uses diffusers' own context parallelism; disable it (do not call enable_parallelism) with ditmesh")
        if getattr(processor, "_attention_backend", None) not in (None, "native"):
            raise ValueError(f"{name} uses attention backend {processor._attention_backend!r}; call model.set_attention_backend('native') first")
    model.set_attn_processor({
        name: SequenceParallelProcessor(p, ctx, cross=plan.is_cross_attention(name.removesuffix(".processor")))
        for name, p in originals.items()
    })
    return originals


def _begin_forward(ctx: SequenceContext) -> None:
    # The first split of each stream in this forward sets its counts.
    ctx.num_tokens = ctx.local_len = ctx.num_text = ctx.text_len = None


# Split.stream -> the context's (tokens in the whole sequence, tokens per rank) attributes.
_COUNTS = {"image": ("num_tokens", "local_len"), "text": ("num_text", "text_len")}


def _shard(x: torch.Tensor, split: Split, ctx: SequenceContext) -> torch.Tensor:
    """This rank's contiguous, end-padded shard of `x` along `split.dim`."""
    if split.ndim is not None and x.ndim != split.ndim:
        raise ValueError(f"{split.input or split.module} must have {split.ndim} dims for sequence parallelism, got shape {tuple(x.shape)}")
    rank, size = dist.get_rank(ctx.sequence_group), dist.get_world_size(ctx.sequence_group)
    total_attr, local_attr = _COUNTS[split.stream]
    num_tokens = x.shape[split.dim]
    if getattr(ctx, total_attr) is None:
        setattr(ctx, total_attr, num_tokens)
        setattr(ctx, local_attr, -(-num_tokens // size))
    elif num_tokens != getattr(ctx, total_attr):
        raise ValueError(
            f"{split.input or split.module} has {num_tokens} tokens but the {split.stream} has "
            f"{getattr(ctx, total_attr)}; they must match"
        )
    local_len = getattr(ctx, local_attr)
    return pad_dim(x, split.dim, local_len * size).narrow(split.dim, rank * local_len, local_len)


def _install_splits(model: torch.nn.Module, splits: tuple[Split, ...], ctx: SequenceContext) -> list:
    hooks = []
    for path in dict.fromkeys(s.module for s in splits):  # one hook per module, plan order kept
        module = _submodule(model, path)
        inputs = [s for s in splits if s.module == path and s.input is not None]
        outputs = [s for s in splits if s.module == path and s.input is None]
        if inputs:
            hooks.append(module.register_forward_pre_hook(_split_inputs_hook(module, inputs, ctx), with_kwargs=True))
        for split in outputs:
            hooks.append(module.register_forward_hook(lambda m, args, out, s=split: _shard_output(out, s, ctx)))
    return hooks


def _shard_output(out: Any, split: Split, ctx: SequenceContext) -> Any:
    """`_shard` of a module's output, or of each tensor of a tuple output (Wan's RoPE: cos, sin)."""
    if isinstance(out, tuple):
        return tuple(_shard(x, split, ctx) for x in out)
    return _shard(out, split, ctx)


def _split_inputs_hook(module: torch.nn.Module, splits: list[Split], ctx: SequenceContext):
    params = list(inspect.signature(module.forward).parameters)

    def hook(mod, args, kwargs):
        args = list(args)
        for split in splits:
            index = params.index(split.input) if split.input in params else len(args)
            if kwargs.get(split.input) is not None:
                kwargs[split.input] = _shard(kwargs[split.input], split, ctx)
            elif index < len(args) and args[index] is not None:
                args[index] = _shard(args[index], split, ctx)
            else:
                raise ValueError(f"sequence parallelism splits {split.input!r}; pass it to {type(mod).__name__}")
        return tuple(args), kwargs

    return hook


def _gather_hook(gather: Gather, ctx: SequenceContext):
    def hook(module, args, out):
        full = gather_replicated(out, gather.dim, ctx.sequence_group)
        return full.narrow(gather.dim, 0, ctx.num_tokens)

    return hook


def _submodule(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return model.get_submodule(path) if path else model


def reduce_sequence_grads(model: torch.nn.Module, mesh: Any) -> None:
    """Sum parameter gradients over the sequence group after backward.

    Each sequence rank's gradients are partial (its image and text shards' share); their sum is
    the serial model's gradient. Call this (or reduce over
    the sequence axis yourself) before the optimizer step. Collective over the sequence group."""
    group = mesh.group("sequence")
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)
