"""Ulysses sequence parallelism: trade the sequence shard for a head shard around attention.

Before attention every rank holds all heads of its S/U tokens; one all-to-all over the ulysses
group gives it H/U heads of all S tokens, attention runs locally per head, and the inverse
all-to-all restores the token shard. Heads that do not divide by U are zero-padded (a zero
query/key/value head attends to nothing that matters and is dropped afterwards).

A sequence may hold several streams sharded alike (joint attention's text and image tokens):
their shards travel in the same all-to-all and come out as one tensor per stream, each the
stream's tokens of the whole group in group-rank order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ditmesh.parallel.comm import exchange_chunks, pad_dim


def padded_heads(num_heads: int, degree: int) -> int:
    """Heads rounded up to a multiple of the ulysses degree (38 heads at degree 4 -> 40)."""
    return -(-num_heads // degree) * degree


def heads_to_sequence(streams_BHSD: list[torch.Tensor], group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Token shards (B, H, S_i/U, D) of each stream -> head shards (B, Hp/U, S_i, D) over all the
    group's tokens of that stream (rank r's shard at [r*S_i/U, (r+1)*S_i/U)), in one all-to-all.
    H is zero-padded to Hp, a multiple of U."""
    degree = dist.get_world_size(group)
    lengths = [x.shape[2] for x in streams_BHSD]
    joint = pad_dim(torch.cat(streams_BHSD, dim=2), 1, padded_heads(streams_BHSD[0].shape[1], degree))
    # (U, B, Hp/U, sum S_i/U, D): chunk r holds rank r's heads of this rank's tokens.
    received = exchange_chunks(torch.stack(joint.chunk(degree, dim=1)), group)
    # received[r]: this rank's heads of rank r's tokens -> per stream (B, Hp/U, U * S_i/U, D).
    return [part.permute(1, 2, 0, 3, 4).flatten(2, 3) for part in received.split(lengths, dim=3)]


def sequence_to_heads(streams_BhSD: list[torch.Tensor], group: dist.ProcessGroup, num_heads: int) -> list[torch.Tensor]:
    """Inverse of `heads_to_sequence`: head shards (B, Hp/U, S_i, D) -> token shards
    (B, num_heads, S_i/U, D) of each stream, padding heads dropped."""
    degree = dist.get_world_size(group)
    lengths = [x.shape[2] // degree for x in streams_BhSD]
    # (U, B, Hp/U, sum S_i/U, D): chunk r holds rank r's tokens of each stream, this rank's heads.
    send = torch.cat([x.unflatten(2, (degree, n)).permute(2, 0, 1, 3, 4) for x, n in zip(streams_BhSD, lengths)], dim=3)
    received = exchange_chunks(send, group)
    joint = received.permute(1, 0, 2, 3, 4).flatten(1, 2)[:, :num_heads]  # (B, H, sum S_i/U, D)
    return list(joint.split(lengths, dim=2))
