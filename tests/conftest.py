"""Shared fixtures: rank pools reused across the whole session (spawning costs seconds)."""

from __future__ import annotations

import pytest

from ditmesh.testing import RankPool

_POOLS: dict[int, RankPool] = {}
# World sizes the suite uses. Their processes are spawned together, in the background, when the
# first test asks for a pool: each imports torch for seconds of CPU, and started together they
# are ready long before most tests need them, instead of one test paying a whole pool's start.
WORLD_SIZES = (2, 4, 8)


def rank_pool(world_size: int) -> RankPool:
    """A gloo pool of `world_size` ranks, shared by every test in the session."""
    if world_size not in _POOLS:
        _POOLS[world_size] = RankPool(world_size)
    return _POOLS[world_size]


@pytest.fixture(scope="session")
def pools():
    """``pools(n)`` -> a shared `RankPool` of n gloo ranks."""
    for world_size in WORLD_SIZES:
        rank_pool(world_size)  # RankPool spawns and returns; the ranks start up meanwhile
    yield rank_pool
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
