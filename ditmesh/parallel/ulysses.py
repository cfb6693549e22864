"""Ulysses sequence parallelism: trade the sequence shard for a head shard around attention.

Before attention every rank holds all heads of its S/U tokens; one all-to-all over the ulysses
group gives it H/U heads of all S tokens, attention runs locally per head, and the inverse
all-to-all restores the token shard. Heads that do not divide by U are zero-padded (a zero
query/key/value head attends to nothing that matters and is dropped afterwards).

A sequence may hold several streams sharded alike (joint attention's text and image tokens):
their shards travel in the same all-to-all and come out as one tensor per stream, each the
stream's tokens of the whole group in group-rank order.

The heads may travel in groups (`head_groups`): each group is its own all-to-all, started
separately (`start_heads_to_sequence`, `start_sequence_to_heads`), so the caller can attend one
group while the next one's exchange is in flight.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ditmesh.parallel.comm import pad_dim, start_exchange


def padded_heads(num_heads: int, degree: int) -> int:
    """Heads rounded up to a multiple of the ulysses degree (38 heads at degree 4 -> 40)."""
    return -(-num_heads // degree) * degree


def head_groups(heads_per_rank: int, groups: int) -> list[tuple[int, int]]:
    """[start, end) of `groups` near-equal groups of a rank's heads (no more groups than heads):
    12 heads in 3 groups -> (0, 4), (4, 8), (8, 12)."""
    groups = max(1, min(groups, heads_per_rank))
    bounds = [round(g * heads_per_rank / groups) for g in range(groups + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def start_heads_to_sequence(streams_BHSD: list[torch.Tensor], group: dist.ProcessGroup,
                            heads: tuple[int, int] | None = None) -> Callable[[], list[torch.Tensor]]:
    """Token shards (B, H, S_i/U, D) of each stream -> head shards over all the group's tokens of
    that stream (rank r's shard at [r*S_i/U, (r+1)*S_i/U)), in one all-to-all: the heads
    [start, end) of every rank's share (all Hp/U of them when None), H zero-padded to Hp, a
    multiple of U. Started, not waited: returns ``finish()`` -> per stream (B, end - start, S_i, D)."""
    degree = dist.get_world_size(group)
    lengths = [x.shape[2] for x in streams_BHSD]
    joint = pad_dim(torch.cat(streams_BHSD, dim=2), 1, padded_heads(streams_BHSD[0].shape[1], degree))
    per_rank = joint.unflatten(1, (degree, -1))  # (B, U, Hp/U, sum S_i/U, D): rank r's heads at [:, r]
    if heads is not None:
        per_rank = per_rank[:, :, heads[0]:heads[1]]
    # (U, B, h, sum S_i/U, D): chunk r holds rank r's heads of this rank's tokens.
    finish_exchange = start_exchange(per_rank.transpose(0, 1), group)

    def finish() -> list[torch.Tensor]:
        # received[r]: this rank's heads of rank r's tokens -> per stream (B, h, U * S_i/U, D).
        received = finish_exchange()
        return [part.permute(1, 2, 0, 3, 4).flatten(2, 3) for part in received.split(lengths, dim=3)]

    return finish


def start_sequence_to_heads(streams_BhSD: list[torch.Tensor], group: dist.ProcessGroup) -> Callable[[], torch.Tensor]:
    """Start the inverse exchange of one head group (B, h, S_i, D) per stream, back to token
    shards; ``finish()`` -> (U, B, h, sum S_i/U, D): [r] is rank r's heads of the group for this
    rank's tokens (`join_head_groups` assembles the groups)."""
    degree = dist.get_world_size(group)
    lengths = [x.shape[2] // degree for x in streams_BhSD]
    # (U, B, h, sum S_i/U, D): chunk r holds rank r's tokens of each stream, this rank's heads.
    send = torch.cat([x.unflatten(2, (degree, n)).permute(2, 0, 1, 3, 4) for x, n in zip(streams_BhSD, lengths)], dim=3)
    return start_exchange(send, group)


def join_head_groups(received: list[torch.Tensor], lengths: list[int], num_heads: int) -> list[torch.Tensor]:
    """The finished inverse exchanges of a rank's head groups, in head order -> token shards
    (B, num_heads, S_i/U, D) of each stream (`lengths`: S_i/U), padding heads dropped."""
    joint = torch.cat(received, dim=2) if len(received) > 1 else received[0]  # (U, B, Hp/U, sum S_i/U, D)
    joint = joint.permute(1, 0, 2, 3, 4).flatten(1, 2)[:, :num_heads]  # (B, H, sum S_i/U, D)
    return list(joint.split(lengths, dim=2))


# ---- unpadded joint sequences: one pack, no unpack ----------------------------------------------
#
# Where no stream has padding and the heads divide by U, a rank's joint tokens (whatever their
# stream order) can travel as they are: attention does not care in which order the keys come,
# and each query's output goes back to where the query came from. The q/k/v of a head group are
# packed once as (U, S/U, B, 3, h, D); what arrives, (U, S/U, B, 3, h, D) from rank 0..U-1, is
# already (S, B, 3, h, D) for attention (strided views, no copy), and the attention output
# (B, h, S, D) goes back as it lies when it is sequence-major (B = 1 with flash/cuDNN layouts).


def start_packed_exchange(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, group: dist.ProcessGroup,
                          heads: tuple[int, int]) -> Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Start sending heads [start, end) of every rank's share (H/U each) of this rank's S/U tokens
    to that rank; ``finish()`` -> q, k, v (B, end - start, S, D) over the group's tokens, rank
    r's at [r*S/U, (r+1)*S/U) (strided views of the receive buffer)."""
    degree = dist.get_world_size(group)

    def per_rank(x):  # (B, H, S/U, D) -> (U, S/U, B, h, D) view
        return x.permute(2, 0, 1, 3).unflatten(2, (degree, -1))[:, :, :, heads[0]:heads[1]].permute(2, 0, 1, 3, 4)

    finish_exchange = start_exchange(torch.stack([per_rank(x) for x in (q_BHSD, k_BHSD, v_BHSD)], dim=3), group)

    def finish():
        received = finish_exchange().flatten(0, 1)  # (S, B, 3, h, D): rank r's tokens at [r*S/U, (r+1)*S/U)
        return tuple(received[:, :, i].permute(1, 2, 0, 3) for i in range(3))

    return finish


def start_packed_return(out_BhSD: torch.Tensor, group: dist.ProcessGroup) -> Callable[[], torch.Tensor]:
    """Send each rank the attention output of its tokens, (B, h, S, D) -> ``finish()`` ->
    (U, S/U, B, h, D): [r] is rank r's heads of the group for this rank's tokens."""
    degree = dist.get_world_size(group)
    return start_exchange(out_BhSD.permute(2, 0, 1, 3).unflatten(0, (degree, -1)), group)


def join_packed(received: list[torch.Tensor]) -> torch.Tensor:
    """Finished returns of a rank's head groups, in head order -> (B, H, S/U, D), laid out
    sequence-major (B, S/U, H, D) in memory: the processor's own output layout."""
    parts = [r.permute(2, 1, 0, 3, 4) for r in received]  # (B, S/U, U, h, D) each
    joint = torch.cat(parts, dim=3) if len(parts) > 1 else parts[0].contiguous()  # (B, S/U, U, H/U, D)
    return joint.flatten(2, 3).permute(0, 2, 1, 3)
