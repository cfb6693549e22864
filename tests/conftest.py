"""Shared fixtures: rank pools reused across the whole session (spawning costs seconds)."""

from __future__ import annotations

import pytest

from ditmesh.testing import RankPool

_POOLS: dict[int, RankPool] = {}


def rank_pool(world_size: int) -> RankPool:
    """A gloo pool of `world_size` ranks, shared by every test in the session."""
    if world_size not in _POOLS:
        _POOLS[world_size] = RankPool(world_size)
    return _POOLS[world_size]


@pytest.fixture(scope="session")
def pools():
    """``pools(n)`` -> a shared `RankPool` of n gloo ranks."""
    yield rank_pool
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
