"""Ulysses sequence parallelism: trade the sequence shard for a head shard around attention.

Before attention every rank holds all heads of its S/U tokens; one all-to-all over the ulysses
group gives it H/U heads of all S tokens, attention runs locally per head, and the inverse
all-to-all restores the token shard. Heads that do not divide by U are zero-padded (a zero
query/key/value head attends to nothing that matters and is dropped afterwards).

Replicated tokens (the text stream of joint attention) need no exchange: each rank slices its
heads locally and the outputs are all-gathered over heads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ditmesh.parallel.comm import all_gather, all_to_all, pad_dim


def padded_heads(num_heads: int, degree: int) -> int:
    """Heads rounded up to a multiple of the ulysses degree (38 heads at degree 4 -> 40)."""
    return -(-num_heads // degree) * degree


def heads_to_sequence(x_BHSD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, H, S/U, D) token shard -> (B, Hp/U, S, D) head shard over all tokens of the group,
    tokens concatenated in group-rank order. H is zero-padded to Hp, a multiple of U."""
    degree = dist.get_world_size(group)
    x_BHSD = pad_dim(x_BHSD, 1, padded_heads(x_BHSD.shape[1], degree))
    return all_to_all(x_BHSD, scatter_dim=1, gather_dim=2, group=group)


def sequence_to_heads(x_BhSD: torch.Tensor, group: dist.ProcessGroup, num_heads: int) -> torch.Tensor:
    """Inverse of `heads_to_sequence`: (B, Hp/U, S, D) -> (B, num_heads, S/U, D), padding heads dropped."""
    x_BHsD = all_to_all(x_BhSD, scatter_dim=2, gather_dim=1, group=group)
    return x_BHsD[:, :num_heads]


def local_heads(x_BHSD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's head slice of a tensor every rank holds whole (no communication):
    (B, H, S, D) -> (B, Hp/U, S, D), matching `heads_to_sequence`'s head split."""
    degree, rank = dist.get_world_size(group), dist.get_rank(group)
    x_BHSD = pad_dim(x_BHSD, 1, padded_heads(x_BHSD.shape[1], degree))
    return x_BHSD.chunk(degree, dim=1)[rank]


def gather_heads(x_BhSD: torch.Tensor, group: dist.ProcessGroup, num_heads: int) -> torch.Tensor:
    """Inverse of `local_heads`: all-gather head slices -> (B, num_heads, S, D) on every rank."""
    return all_gather(x_BhSD, dim=1, group=group)[:, :num_heads]
