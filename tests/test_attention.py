"""The attention entry point: local backends, the LSE merge of ring blocks, ring attention and the
sequence-parallel `attention(ctx=...)` on gloo ranks, all against full softmax attention computed
in one process (fp32, `assert_close(atol=1e-5, rtol=0)`)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ditmesh.config import ParallelConfig
from ditmesh.kernels import merge_lse
from ditmesh.parallel import attention as attn
from ditmesh.parallel.attention import SequenceContext, attention, local_attention, register_backend
from ditmesh.parallel.mesh import ParallelMesh
from ditmesh.parallel import ring
from ditmesh.parallel.ring import plan_groups, ring_attention

TOL = dict(atol=1e-5, rtol=0)
default_costs = ring.RING_COSTS["cpu"]


def _mesh(config: ParallelConfig) -> ParallelMesh:
    return ParallelMesh.build(config)  # per job: the pool destroys a job's groups when it ends


def _qkv(batch, heads, seq, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=gen) for _ in range(3)]


def _full(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


# ---- single process ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_local_backends_match_full_attention(backend):
    q, k, v = _qkv(2, 3, 7, 16)
    torch.testing.assert_close(local_attention(q, k, v, backend), _full(q, k, v), **TOL)


@pytest.mark.parametrize("shape", [(1, 1, 5, 8), (2, 3, 17, 16), (1, 4, 64, 32)])
@pytest.mark.parametrize("blocks", [[1, 1], [3, 9, 1], [10, 0, 4, 7]])
def test_lse_merge_of_uneven_key_blocks_equals_full_attention(shape, blocks):
    batch, heads, num_queries, dim = shape
    q, _, _ = _qkv(batch, heads, num_queries, dim, seed=1)
    k, v, _ = _qkv(batch, heads, sum(blocks), dim, seed=2)
    acc = None
    for kb, vb in zip(k.split(blocks, dim=2), v.split(blocks, dim=2)):
        if kb.shape[2] == 0:
            continue
        out, lse = local_attention(q, kb, vb, "math", return_lse=True)
        acc = (out, lse) if acc is None else merge_lse(*acc, out, lse)
    torch.testing.assert_close(acc[0], _full(q, k, v), **TOL)
    torch.testing.assert_close(acc[1], torch.logsumexp(q @ k.transpose(-1, -2) / dim**0.5, dim=-1), **TOL)


def test_register_backend_and_errors():
    calls = []

    def counting(q, k, v, scale):
        calls.append(q.shape)
        return local_attention(q, k, v, "math", scale=scale, return_lse=True)

    register_backend("test-counting", counting, returns_lse=True)
    try:
        q, k, v = _qkv(1, 2, 4, 8)
        torch.testing.assert_close(local_attention(q, k, v, "test-counting"), _full(q, k, v), **TOL)
        assert calls == [q.shape]
    finally:
        attn._BACKENDS.pop("test-counting")
    with pytest.raises(ValueError, match="log-sum-exp"):
        local_attention(q, k, v, "sdpa", return_lse=True)
    with pytest.raises(ValueError, match="not registered"):
        local_attention(q, k, v, "nope")


# ---- on gloo ranks ----------------------------------------------------------------------------


def check_ring_attention(num_keys_per_rank, valid_keys):
    """Each rank holds a block of queries and keys; ring attention must equal full attention of
    its queries over all (valid) keys of every rank."""
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    q_all, k_all, v_all = _qkv(2, 3, num_keys_per_rank * world, 16, seed=3)
    q, k, v = (t.chunk(world, dim=2)[rank] for t in (q_all, k_all, v_all))
    q.requires_grad_(True)

    def attend(q_, k_, v_):
        return local_attention(q_, k_, v_, "math", return_lse=True)

    out, _ = ring_attention(q, k, v, group, attend, valid_keys=valid_keys)
    keep = torch.cat([kb[:, :, : (valid_keys or [num_keys_per_rank] * world)[r]] for r, kb in enumerate(k_all.chunk(world, 2))], 2)
    keep_v = torch.cat([vb[:, :, : (valid_keys or [num_keys_per_rank] * world)[r]] for r, vb in enumerate(v_all.chunk(world, 2))], 2)
    torch.testing.assert_close(out, _full(q.detach(), keep, keep_v), **TOL)
    out.sum().backward()  # the P2P shift is differentiable and pairs up on every rank
    assert q.grad is not None and torch.isfinite(q.grad).all()
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_equals_full_attention(pools, world):
    assert all(pools(world).run(check_ring_attention, 6, None))


def test_ring_attention_skips_padded_keys(pools):
    assert all(pools(4).run(check_ring_attention, 5, [5, 5, 2, 0]))


def check_grouped_ring_attention(num_keys_per_rank, valid_keys, group_sizes):
    """The grouped (inference) schedule: blocks gathered in place, runs attended per launch ==
    full attention over all valid keys."""
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    q_all, k_all, v_all = _qkv(2, 3, num_keys_per_rank * world, 16, seed=3)
    q, k, v = (t.chunk(world, dim=2)[rank] for t in (q_all, k_all, v_all))
    calls = []

    def attend(q_, k_, v_):
        calls.append(k_.shape[2])
        return local_attention(q_, k_, v_, "math", return_lse=True)

    with torch.no_grad():
        out, _ = ring_attention(q, k, v, group, attend, valid_keys=valid_keys, group_sizes=group_sizes)
    valid = valid_keys or [num_keys_per_rank] * world
    keep_k = torch.cat([kb[:, :, : valid[r]] for r, kb in enumerate(k_all.chunk(world, 2))], 2)
    keep_v = torch.cat([vb[:, :, : valid[r]] for r, vb in enumerate(v_all.chunk(world, 2))], 2)
    torch.testing.assert_close(out, _full(q, keep_k, keep_v), **TOL)
    return calls


@pytest.mark.parametrize("world,sizes", [(2, [2]), (2, [1, 1]), (4, [1, 3]), (4, [4]), (4, [2, 1, 1])])
def test_grouped_ring_attention_equals_full_attention(pools, world, sizes):
    calls = pools(world).run(check_grouped_ring_attention, 6, None, sizes)
    assert calls[0] == [6 * size for size in sizes]  # one launch per run of blocks


def test_grouped_ring_attention_splits_runs_at_padding(pools):
    # Ring rank 2's block is partly padded and rank 3's empty: a run never spans padding.
    calls = pools(4).run(check_grouped_ring_attention, 5, [5, 5, 2, 0], [1, 3])
    # Rank 0 receives blocks of ranks 0, 3, 2, 1 (valid 5, 0, 2, 5); rank 3 of 3, 2, 1, 0 (0, 2, 5, 5).
    assert calls[0] == [5, 2, 5]
    assert calls[3] == [2, 5 + 5]


@pytest.mark.parametrize("valid", [[5, 5, 2, 0], [5, 0, 2, 5]])
def test_one_run_is_an_all_gather_and_one_launch_over_valid_keys(pools, valid):
    # Padding at the end (how sequence shards pad) or anywhere: every valid key, once.
    calls = pools(4).run(check_grouped_ring_attention, 5, valid, [4])
    assert calls == [[sum(valid)]] * 4


def _simulated_finish(sizes, hop, launch, block):
    """Event simulation of `_grouped`'s stream: hop i+1 starts once the queued compute is done."""
    stream, arrived, end, runs = 0.0, 0.0, 0, iter(sizes)
    run_end = next(runs)
    start = 0
    for i in range(sum(sizes)):
        next_arrival = stream + hop if i + 1 < sum(sizes) else None
        if i + 1 == run_end:
            stream += launch + (i + 1 - start) * block
            start, run_end = i + 1, run_end + next(runs, 0)
        if next_arrival is not None:
            stream = max(stream, next_arrival)
    return stream


def _compositions(n):
    if n == 0:
        yield []
        return
    for first in range(1, n + 1):
        for rest in _compositions(n - first):
            yield [first] + rest


@pytest.mark.parametrize("hop,launch,block", [(20, 6, 7), (5, 6, 7), (0, 6, 7), (30, 1, 1), (9, 3, 4)])
def test_plan_groups_is_the_fastest_grouping(hop, launch, block):
    for n in range(1, 7):
        plan = plan_groups(n, hop, launch, block)
        assert sum(plan) == n
        best = min(_simulated_finish(c, hop, launch, block) for c in _compositions(n))
        assert _simulated_finish(plan, hop, launch, block) == pytest.approx(best)


def test_plan_groups_without_overlap_is_one_run():
    # Transfers that gain nothing beside compute: every launch after the first only adds cost.
    for hop in (0.0, 5.0, 100.0):
        assert plan_groups(8, hop, 6.0, 7.0, overlap=False) == [8]


def test_plan_groups_extremes():
    assert plan_groups(8, 0.0, 6.0, 7.0) == [8]  # free transfers: one launch
    # Slow transfers: the compute of the first 7 blocks hides under the last hop; only one small
    # launch is left exposed at the end.
    assert plan_groups(8, 100.0, 6.0, 7.0) == [7, 1]


def _shard(x_BHSD, rank, size):
    """(this rank's end-padded contiguous shard, its number of real tokens, its first token)."""
    share = -(-x_BHSD.shape[2] // size)
    padded = torch.nn.functional.pad(x_BHSD, (0, 0, 0, share * size - x_BHSD.shape[2]))
    return padded.narrow(2, rank * share, share), max(0, min(share, x_BHSD.shape[2] - rank * share)), rank * share


def check_sequence_attention(degrees, joint_text, num_heads, num_tokens, num_text, costs=None, text="sharded"):
    """`attention(ctx=...)` on [text shard, image shard] (or [image shard, text shard]) == full
    joint attention, for this rank's tokens. text="replicated": every rank holds the whole text
    (PipeFusion's stages) and gets the whole text output."""
    if costs is not None:  # steer ring_group_sizes to another schedule on this rank
        ring.RING_COSTS["cpu"] = costs
    config = ParallelConfig(**degrees)
    mesh = _mesh(config)
    size, rank = mesh.size("sequence"), mesh.rank("sequence")
    qi, ki, vi = _qkv(2, num_heads, num_tokens, 8, seed=4)
    qt, kt, vt = _qkv(2, num_heads, num_text, 8, seed=5)

    def joint(image, text_):
        return torch.cat([text_, image] if joint_text == "first" else [image, text_], dim=2)

    expected = _full(joint(qi, qt), joint(ki, kt), joint(vi, vt))
    expected_image = expected[:, :, num_text:] if joint_text == "first" else expected[:, :, :num_tokens]
    expected_text = expected[:, :, :num_text] if joint_text == "first" else expected[:, :, num_tokens:]
    qi, ki, vi = (_shard(x, rank, size)[0] for x in (qi, ki, vi))
    if text == "sharded":
        qt, kt, vt = (_shard(x, rank, size)[0] for x in (qt, kt, vt))
    ctx = SequenceContext(mesh.group("sequence"), mesh.group("ulysses"), mesh.group("ring"), joint_text,
                          num_tokens=num_tokens, local_len=qi.shape[2])
    if text == "sharded":
        ctx.num_text, ctx.text_len = num_text, qt.shape[2]
    out = attention(joint(qi, qt), joint(ki, kt), joint(vi, vt), ctx=ctx)
    out_text = out[:, :, : qt.shape[2]] if joint_text == "first" else out[:, :, qi.shape[2] :]
    out_image = out[:, :, qt.shape[2] :] if joint_text == "first" else out[:, :, : qi.shape[2]]
    _, valid, start = _shard(expected_image, rank, size)
    torch.testing.assert_close(out_image[:, :, :valid], expected_image[:, :, start : start + valid], **TOL)
    if text == "replicated":
        torch.testing.assert_close(out_text, expected_text, **TOL)
    else:
        _, valid, start = _shard(expected_text, rank, size)
        torch.testing.assert_close(out_text[:, :, :valid], expected_text[:, :, start : start + valid], **TOL)
    if costs is not None:
        ring.RING_COSTS["cpu"] = default_costs
    return True


SEQ_MODES = [
    (2, dict(ulysses_degree=2)),
    (2, dict(ring_degree=2)),
    (4, dict(ulysses_degree=4)),
    (4, dict(ring_degree=4)),
    (4, dict(ring_degree=2, ulysses_degree=2)),
]


@pytest.mark.parametrize("joint_text", ["first", "last"])
@pytest.mark.parametrize("world,degrees", SEQ_MODES, ids=[str(ParallelConfig(**d)) for _, d in SEQ_MODES])
def test_sequence_attention_equals_full_joint_attention(pools, world, degrees, joint_text):
    # 3 heads (not a multiple of 2 or 4), 13 image tokens and 7 text tokens (not multiples of 2 or 4).
    assert all(pools(world).run(check_sequence_attention, degrees, joint_text, 3, 13, 7))


@pytest.mark.parametrize("world,degrees", SEQ_MODES[::2], ids=["ulysses2", "ulysses4", "usp2x2"])
def test_replicated_text_equals_full_joint_attention(pools, world, degrees):
    # Text whole on every rank (as PipeFusion's stages carry it): each rank gets the whole text output.
    assert all(pools(world).run(check_sequence_attention, degrees, "first", 3, 13, 5, text="replicated"))


# Launch overheads dominate (grouped runs) / transfers dominate (one block per launch).
GROUPED, STEPPED = (1.0, 1e15, 1e15, 0.0, True), (0.0, 1e15, 1.0, 1.0, True)


@pytest.mark.parametrize("costs", [GROUPED, STEPPED], ids=["grouped", "stepped"])
@pytest.mark.parametrize("world,degrees", SEQ_MODES[1::2] + SEQ_MODES[4:], ids=["ring2", "ring4", "usp2x2"])
def test_ring_schedules_equal_full_joint_attention(pools, world, degrees, costs):
    # 5 text tokens: not a multiple of the ring degree (the last ring block holds text padding).
    assert all(pools(world).run(check_sequence_attention, degrees, "first", 3, 13, 5, costs))


def test_sequence_attention_image_only(pools):
    assert all(pools(4).run(check_sequence_attention, dict(ring_degree=2, ulysses_degree=2), None, 4, 10, 0))
