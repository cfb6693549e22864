"""The few collectives the strategies share, each taking an explicit process group.

All of them are differentiable. Gradient convention (see docs/sequence.md): a tensor sharded over
a group carries the exact gradient of its shard; a tensor replicated over a group carries a
*partial* gradient (the true gradient is the sum over the group's ranks). The standard autograd
rules of the functional collectives implement exactly that (all-gather's backward is a
reduce-scatter); `gather_replicated` is the one boundary that differs (see its docstring).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

# torch renamed all_gather_tensor[_autograd] -> all_gather_single[_autograd] (2.10+).
_all_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
_all_gather_autograd = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Split `x` into group-size chunks along `scatter_dim`, send chunk i to rank i, and
    concatenate what arrives along `gather_dim` in rank order (the Ulysses exchange).

    `x.shape[scatter_dim]` must divide by the group size. Differentiable (backward is the inverse
    all-to-all)."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    # (..., W*c, ...) -> (W, ...) so one exchange swaps the chunks along dim 0.
    received = exchange_chunks(torch.stack(x.chunk(world, dim=scatter_dim)), group)
    return torch.cat(received.unbind(0), dim=gather_dim)


def exchange_chunks(x_W: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Send ``x_W[i]`` to group rank i; return what arrives, ``out[i]`` from rank i (same shape).

    The all-to-all at its plainest: callers lay out the chunks (and read them back) themselves,
    so a layout change costs no extra copy. Differentiable (backward is the same exchange)."""
    return start_exchange(x_W, group)()


def start_exchange(x_W: torch.Tensor, group: dist.ProcessGroup) -> Callable[[], torch.Tensor]:
    """`exchange_chunks` started, not waited for: returns ``finish()``, which waits and returns
    what arrived. Work issued in between (another exchange, another head group's attention) runs
    while the transfer does: on NCCL the transfer runs on the communicator's own stream, which the
    compute stream joins only at ``finish()``; compiled graphs keep the wait where ``finish()`` is.

    Ordering hazard: one group's collectives run in the order they are started, so every rank
    must start them in the same order (a rank finishing them in another order is fine)."""
    if dist.get_world_size(group) == 1:
        return lambda: x_W
    if _plain_call():
        out = torch.empty_like(x_W, memory_format=torch.contiguous_format)
        work = dist.all_to_all_single(out, x_W.contiguous(), group=group, async_op=True)

        def finish_plain() -> torch.Tensor:
            work.wait()  # NCCL: the compute stream waits for the transfer; the host does not
            return out

        return finish_plain
    pending = fc.all_to_all_single_autograd(x_W.contiguous(), None, None, group)
    return lambda: _wait(pending)


def all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` in rank order. Backward: reduce-scatter (sum), so
    the result's gradient is taken as partial on every rank."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if _plain_call():
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # ranks' tensors along dim 0
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out if dim == 0 else torch.cat(out.chunk(world), dim=dim)
    return _wait(_all_gather_autograd(x.contiguous(), dim, group))


class _GatherReplicated(torch.autograd.Function):
    """all-gather forward; backward keeps this rank's slice of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.size, ctx.rank = dim, x.shape[dim], dist.get_rank(group)
        return _wait(_all_gather(x.contiguous(), dim, group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None, None


def gather_replicated(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's shard along `dim` into a tensor every rank then uses identically
    (the model's output). Backward assumes every rank computed the same loss from it, so the
    gradient is the full one on every rank and each shard takes its own slice (no communication)."""
    if dist.get_world_size(group) == 1:
        return x
    return _GatherReplicated.apply(x, dim, group)


def _plain_call() -> bool:
    """Eager inference (no autograd, no dynamo): call the process group directly. Functional
    collectives are what dynamo traces and what carries gradients, but in eager mode their tensor
    subclass, autograd wrapper and wait cost host time on every call: in an eager Ulysses step on
    two H200s, about 25 ms of host time per step over 114 all-to-alls
    (benchmarks/results/eager_profile_ulysses2_h200_x2.txt); on gloo a tiny all-to-all takes
    390 µs this way against 799 µs (benchmarks/collective_overhead.py). On NCCL the direct call
    is stream-ordered like them: the host does not wait for the transfer."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _wait(x: torch.Tensor) -> torch.Tensor:
    return fc.wait_tensor(x) if isinstance(x, fc.AsyncCollectiveTensor) else x


def _shift(x: torch.Tensor, group: dist.ProcessGroup, step: int) -> tuple[torch.Tensor, list]:
    """Post send of `x` to group rank (rank + step) and receive from (rank - step); returns the
    receive buffer (valid after waiting on the returned works)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    recv = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x, group=group, group_peer=(rank + step) % world),
        dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - step) % world),
    ]
    return recv, dist.batch_isend_irecv(ops)


class _RingShift(torch.autograd.Function):
    """Forward: post the shift to the next ring rank and return the (still filling) receive
    buffer; the caller waits on the works stored in `pending`. Backward: send the gradient the
    opposite way (blocking)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, pending: list) -> torch.Tensor:
        ctx.group = group
        recv, works = _shift(x.contiguous(), group, +1)
        pending.extend(works)
        return recv

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every ring rank runs this node at the same point of an identical graph, so the
        # reversed shifts pair up (no rank waits on a peer that is elsewhere -> no deadlock).
        recv, works = _shift(grad.contiguous(), ctx.group, -1)
        for work in works:
            work.wait()
        return recv, None, None


def ring_shift_start(x: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, list]:
    """Start passing `x` to the next rank of the ring `group` and receiving the previous rank's.

    Returns (buffer, works): the buffer holds the previous rank's `x` once every work in `works`
    is waited on (`ring_shift_wait`). Differentiable: the gradient travels the opposite way.
    The send reads `x` until then: do not modify it in place meanwhile."""
    pending: list = []
    recv = _RingShift.apply(x, group, pending)
    return recv, pending


def ring_pass_start(sends: list[torch.Tensor], recvs: list[torch.Tensor], group: dist.ProcessGroup) -> list:
    """Post sends of `sends` to the next rank of the ring `group` and receives from the previous
    one into `recvs` (contiguous, preallocated: e.g. slots of a gather buffer), as one batch.

    Returns the works (`ring_shift_wait`). Not differentiable (inference schedules). Every rank
    must post the same passes in the same order, or the sends and receives do not pair up."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=(rank + 1) % world) for t in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=(rank - 1) % world) for t in recvs]
    return dist.batch_isend_irecv(ops)


def ring_shift_wait(works: list) -> None:
    """Wait for the transfers started by `ring_shift_start`."""
    for work in works:
        work.wait()


def pad_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`x` zero-padded at the end of `dim` to `size` (returned as is when already that size)."""
    missing = size - x.shape[dim]
    assert missing >= 0, (x.shape, dim, size)
    if missing == 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = missing
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim)


__all__ = [
    "all_to_all",
    "exchange_chunks",
    "start_exchange",
    "all_gather",
    "gather_replicated",
    "ring_shift_start",
    "ring_pass_start",
    "ring_shift_wait",
    "pad_dim",
]
