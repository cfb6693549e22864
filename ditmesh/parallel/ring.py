"""Ring attention: every rank keeps its queries; key/value blocks travel round the ring.

With R ranks, step i attends this rank's queries to the K/V block of ring rank (rank - i) mod R
while the block for step i+1 is already in flight (P2P posted before the compute). Partial
results are combined exactly with the log-sum-exp merge, so the output equals full attention.
Autograd gives exact gradients: the block attention and the merge are differentiable and the
P2P shift sends gradients back the opposite way.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ditmesh.kernels import merge_lse
from ditmesh.parallel.comm import ring_shift_start, ring_shift_wait

# (q, k, v) -> (out, lse fp32): a local attention that returns log-sum-exp.
LseAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (q, k, v, prev_out, prev_lse) -> merged (out, lse): one ring step in one call (fused kernels).
LseStep = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def ring_attention(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    group: dist.ProcessGroup,
    attend: LseAttention,
    *,
    valid_keys: Sequence[int] | None = None,
    extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    step: LseStep | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of this rank's queries over the K/V blocks of every rank of the ring `group`.

    Every rank's k/v must have the same shape (pad them). `valid_keys[r]` is how many leading
    keys of ring rank r's block are real (the rest is padding and is ignored); None = all.
    `extra_kv` is one more local block (e.g. replicated text tokens) attended once. `step`, if
    given, attends a block and merges it into the running result in one call (e.g.
    `ditmesh.kernels.attention_merge_lse`, which fuses the merge into the kernel on GPUs).
    Returns (out (B,H,Sq,D), lse (B,H,Sq) fp32).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    acc = _attend_block(None, q_BHSD, *extra_kv, attend, step) if extra_kv is not None else None
    kv = torch.stack([k_BHSD, v_BHSD])  # one transfer per step for K and V together
    for i in range(world):
        # Post the next block's transfer before computing this one (overlap). Each rank does
        # the same number of shifts in the same order, so sends and receives always pair up.
        nxt, works = ring_shift_start(kv, group) if i + 1 < world else (None, [])
        source = (rank - i) % world
        num_valid = kv.shape[-2] if valid_keys is None else valid_keys[source]
        if num_valid > 0:
            acc = _attend_block(acc, q_BHSD, kv[0, :, :, :num_valid], kv[1, :, :, :num_valid], attend, step)
        ring_shift_wait(works)
        kv = nxt
    assert acc is not None, "ring attention saw no keys at all"
    return acc


def _attend_block(acc, q, k, v, attend: LseAttention, step: LseStep | None):
    if acc is None:
        return attend(q, k, v)
    if step is not None:
        return step(q, k, v, *acc)
    return merge_lse(acc[0], acc[1], *attend(q, k, v))
