"""Ring attention: every rank keeps its queries; key/value blocks travel round the ring.

With R ranks, ring step i brings the K/V block of ring rank (rank - i) mod R while this rank
attends what it already holds; the transfer for step i+1 is posted before that compute
(overlap). Partial results are combined exactly with the log-sum-exp merge, so the output
equals full attention.

Two schedules of the same exchange:
- step by step (`group_sizes=None`): one attention launch per ring block, each block dropped
  after use. Differentiable (the P2P shift sends gradients back the opposite way); used for
  training and whenever autograd records.
- grouped (`group_sizes=[...]`, inference): blocks land in place in one sequence-major buffer in
  arrival order, and one launch attends a run of consecutive blocks. Small blocks (576 tokens
  at ring=8 for a 1024² FLUX image) leave attention kernels far below their throughput and pay
  a launch each; grouping them keeps the same transfers and overlap with fewer, larger
  launches. `plan_groups` picks the grouping from a cost model. One run over all blocks (the
  plan where transfers gain nothing beside compute, as on H200s) is an all-gather of K/V and
  one launch; it is also the schedule under `torch.compile`, which cannot trace P2P hops.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ditmesh.kernels import merge_lse
from ditmesh.parallel.comm import all_gather, ring_pass_start, ring_shift_start, ring_shift_wait

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
    step: LseStep | None = None,
    group_sizes: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of this rank's queries over the K/V blocks of every rank of the ring `group`.

    Every rank's k/v must have the same shape (pad them). `valid_keys[r]` is how many leading
    keys of ring rank r's block are real (the rest is padding and is ignored); None = all. `step`, if
    given, attends a block and merges it into the running result in one call (e.g.
    `ditmesh.kernels.attention_merge_lse`, which fuses the merge into the kernel on GPUs).
    `group_sizes` (summing to the ring size, the same on every rank) attends runs of that many
    consecutive blocks per launch; it applies when autograd is not recording, else the
    step-by-step schedule runs. Returns (out (B,H,Sq,D), lse (B,H,Sq) fp32).
    """
    world = dist.get_world_size(group)
    records_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHSD, k_BHSD, v_BHSD))
    if torch.compiler.is_compiling():
        group_sizes = [world]  # P2P hops cannot be traced into a graph; the all-gather can
    elif group_sizes is None or records_grad:
        return _step_by_step(q_BHSD, k_BHSD, v_BHSD, group, attend, valid_keys, step)
    if sum(group_sizes) != world or min(group_sizes) < 1:
        raise ValueError(f"group_sizes {list(group_sizes)} must be positive and sum to the ring size {world}")
    if len(group_sizes) == 1:
        return _gathered(q_BHSD, k_BHSD, v_BHSD, group, attend, valid_keys)
    return _grouped(q_BHSD, k_BHSD, v_BHSD, group, attend, valid_keys, step, group_sizes)


def _step_by_step(q, k, v, group, attend, valid_keys, step):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    acc = None
    kv = torch.stack([k, v])  # one transfer per step for K and V together
    for i in range(world):
        # Post the next block's transfer before computing this one (overlap). Each rank does
        # the same number of shifts in the same order, so sends and receives always pair up.
        nxt, works = ring_shift_start(kv, group) if i + 1 < world else (None, [])
        source = (rank - i) % world
        num_valid = kv.shape[-2] if valid_keys is None else valid_keys[source]
        if num_valid > 0:
            acc = _attend_block(acc, q, kv[0, :, :, :num_valid], kv[1, :, :, :num_valid], attend, step)
        ring_shift_wait(works)
        kv = nxt
    assert acc is not None, "ring attention saw no keys at all"
    return acc


def _gathered(q, k, v, group, attend, valid_keys):
    """One run over every block: the hops of that run are an all-gather of K and V, so one
    collective (which NCCL pipelines over its own ring) replaces R - 1 dependent hops, then one
    launch attends all valid keys (key order does not matter to attention)."""
    world, block = dist.get_world_size(group), k.shape[2]
    # (block, 2, B, H, D) sequence-major, so the gather concatenates blocks without a reshuffle.
    kv = all_gather(torch.stack([k, v]).permute(3, 0, 1, 2, 4), dim=0, group=group)
    valid = list(valid_keys) if valid_keys is not None else [block] * world
    total = sum(valid)
    if valid == [min(max(total - r * block, 0), block) for r in range(world)]:
        kv = kv[:total]  # padding only at the end (how sequence shards pad): the valid keys are a prefix
    else:
        kv = torch.cat([kv[r * block : r * block + n] for r, n in enumerate(valid)])
    keys, values = kv.permute(1, 2, 3, 0, 4).unbind(0)  # (B, H, S, D) views
    return attend(q, keys, values)


def _grouped(q, k, v, group, attend, valid_keys, step, group_sizes):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    k_buf, v_buf = gather_buffers(k, v, world)
    block = k.shape[2]

    def hop(i):
        # Forwards the block that arrived at hop i (already waited for) and receives the next.
        # Every rank posts the same hops in the same order, so they pair up.
        def slot(buf, j):
            return buf[j * block : (j + 1) * block]

        return ring_pass_start([slot(k_buf, i), slot(v_buf, i)], [slot(k_buf, i + 1), slot(v_buf, i + 1)], group)

    valid = [block if valid_keys is None else valid_keys[(rank - i) % world] for i in range(world)]
    return attend_runs(q, k_buf, v_buf, block, valid, group_sizes, attend, step, hop)


def gather_buffers(k_BHSD, v_BHSD, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence-major K and V buffers (world * block, B, H, D) for the grouped schedule.

    The ring blocks in arrival order: position i holds ring rank (rank - i)'s block; this rank's
    own is copied in at position 0. Each block, and each run of consecutive blocks, is one
    contiguous piece: receives land in place (no copies) and a run is one strided (B, H, n, D)
    view for a single attention launch."""
    batch, heads, block, dim = k_BHSD.shape
    bufs = []
    for local in (k_BHSD, v_BHSD):
        buf = local.new_empty(world * block, batch, heads, dim)
        buf[:block].copy_(local.permute(2, 0, 1, 3))
        bufs.append(buf)
    return bufs[0], bufs[1]


def attend_runs(q_BHSD, k_buf, v_buf, block: int, valid: Sequence[int], group_sizes: Sequence[int], attend, step, hop=None):
    """The launches of the grouped schedule over `gather_buffers`' buffers.

    `valid[i]`: real keys of the block arriving at hop i. `hop(i)`, if given, posts the transfer
    that brings block i+1 and returns its works (waited before block i+1 is used); without it
    the buffers are taken as already full (a one-GPU measurement of the compute alone)."""
    world = len(valid)
    ends = set(itertools.accumulate(group_sizes))
    acc, start = None, 0  # start: key position where the current run begins
    for i in range(world):
        works = hop(i) if hop is not None and i + 1 < world else []
        # A run must be contiguous real keys: a padded block closes it.
        if i + 1 in ends or valid[i] < block:
            stop = i * block + valid[i]
            if stop > start:
                keys = (k_buf[start:stop].permute(1, 2, 0, 3), v_buf[start:stop].permute(1, 2, 0, 3))
                acc = _attend_block(acc, q_BHSD, *keys, attend, step)
            start = (i + 1) * block
        ring_shift_wait(works)
    assert acc is not None, "ring attention saw no keys at all"
    return acc


def _attend_block(acc, q, k, v, attend: LseAttention, step: LseStep | None):
    if acc is None:
        return attend(q, k, v)
    if step is not None:
        return step(q, k, v, *acc)
    return merge_lse(acc[0], acc[1], *attend(q, k, v))


def plan_groups(num_blocks: int, hop_s: float, launch_s: float, block_s: float, overlap: bool = True) -> list[int]:
    """Grouping of `num_blocks` ring blocks into attention launches that finishes soonest.

    Cost model of `_grouped` on one stream: a launch over g blocks takes `launch_s + g * block_s`;
    a hop takes `hop_s` and, as NCCL orders it after the compute already queued, overlaps only the launch
    queued right after it. So a run of g blocks that is not the last costs
    `(g - 1) * hop_s + max(launch, hop_s)` and the last one `(g - 1) * hop_s + launch`: runs stay
    single blocks while transfers dominate and grow while launch overheads do. With
    `overlap=False` (hardware where a transfer running beside compute gains nothing) every run
    costs `g * hop_s + launch` minus the hop the last block does not need, so one run is best.
    Exact dynamic programme over contiguous runs; among equally fast groupings, fewer launches.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    return list(_plan(num_blocks, hop_s, launch_s, block_s, overlap))


@functools.lru_cache(maxsize=256)  # asked per attention layer, always for the same few shapes
def _plan(num_blocks, hop_s, launch_s, block_s, overlap) -> tuple[int, ...]:
    # best[j]: (time, launches, sizes) to finish blocks [0, j).
    best: list[tuple[float, int, list[int]]] = [(0.0, 0, [])]
    for j in range(1, num_blocks + 1):
        options = []
        for i in range(j):
            size = j - i
            launch = launch_s + size * block_s
            if overlap:
                run = (size - 1) * hop_s + (launch if j == num_blocks else max(launch, hop_s))
            else:
                run = (size - (j == num_blocks)) * hop_s + launch
            done, launches, sizes = best[i]
            options.append((round(done + run, 12), launches + 1, sizes + [size]))
        best.append(min(options, key=lambda o: (o[0], o[1])))
    return tuple(best[num_blocks][2])


# Costs behind `ring_group_sizes`, per device type: (fixed seconds per launch, attention FLOP/s
# on long key runs, P2P bytes/s, seconds of latency per hop, whether hops overlap compute).
# CUDA, measured on H200s with NVLink by benchmarks/ring_schedule.py: ring layers run eagerly,
# so a launch costs what the host spends on it (40-75 us per attention + merge launch; the GPU's
# own fixed cost is ~6-20 us); cuDNN reaches ~500 TFLOP/s on long key runs; a hop of K+V moved
# 144-266 GB/s; and a hop running beside attention made both slower than back to back (2 GPUs,
# 4096 image tokens: one launch per block 797-822 us, one launch after the hop 445 us), so no
# overlap is counted. CPU: gloo between processes.
RING_COSTS: dict[str, tuple[float, float, float, float, bool]] = {
    "cuda": (4e-5, 5.0e14, 2.0e11, 1.0e-5, False),
    "cpu": (2e-5, 5.0e10, 5.0e9, 5.0e-5, True),
}


def ring_group_sizes(q_BHSD: torch.Tensor, k_block: torch.Tensor, world: int) -> list[int]:
    """`plan_groups` for these shapes with `RING_COSTS` of their device (same on every rank)."""
    launch_s, flops, bandwidth, latency, overlap = RING_COSTS.get(q_BHSD.device.type, RING_COSTS["cpu"])
    batch, heads, num_q, dim = q_BHSD.shape
    block = k_block.shape[2]
    block_s = 4 * batch * heads * num_q * block * dim / flops
    hop_s = latency + 2 * k_block.numel() * k_block.element_size() / bandwidth
    return plan_groups(world, hop_s, launch_s, block_s, overlap=overlap)
