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
from ditmesh.parallel.ring import ring_attention

TOL = dict(atol=1e-5, rtol=0)
_MESHES: dict[str, ParallelMesh] = {}


def _mesh(config: ParallelConfig) -> ParallelMesh:
    if str(config) not in _MESHES:
        _MESHES[str(config)] = ParallelMesh.build(config)
    return _MESHES[str(config)]


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


def check_sequence_attention(degrees, joint_text, num_heads, num_tokens, num_text):
    """`attention(ctx=...)` on [text, image shard] (or [image shard, text]) == full joint attention."""
    config = ParallelConfig(**degrees)
    mesh = _mesh(config)
    size, rank = mesh.size("sequence"), mesh.rank("sequence")
    local_len = -(-num_tokens // size)
    qi, ki, vi = _qkv(2, num_heads, num_tokens, 8, seed=4)
    qt, kt, vt = _qkv(2, num_heads, num_text, 8, seed=5)

    def joint(image, text):
        return torch.cat([text, image] if joint_text == "first" else [image, text], dim=2)

    expected = _full(joint(qi, qt), joint(ki, kt), joint(vi, vt))
    pad = local_len * size - num_tokens
    shard = [torch.nn.functional.pad(t, (0, 0, 0, pad)).narrow(2, rank * local_len, local_len) for t in (qi, ki, vi)]
    ctx = SequenceContext(mesh.group("sequence"), mesh.group("ulysses"), mesh.group("ring"), joint_text,
                          num_tokens=num_tokens, local_len=local_len)
    out = attention(joint(shard[0], qt), joint(shard[1], kt), joint(shard[2], vt), ctx=ctx)
    expected_image = expected[:, :, num_text:] if joint_text == "first" else expected[:, :, :num_tokens]
    expected_text = expected[:, :, :num_text] if joint_text == "first" else expected[:, :, num_tokens:]
    out_text = out[:, :, :num_text] if joint_text == "first" else out[:, :, local_len:]
    out_image = out[:, :, num_text:] if joint_text == "first" else out[:, :, :local_len]
    valid = max(0, min(local_len, num_tokens - rank * local_len))
    torch.testing.assert_close(out_text, expected_text, **TOL)
    torch.testing.assert_close(out_image[:, :, :valid], expected_image[:, :, rank * local_len : rank * local_len + valid], **TOL)
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
    # 3 heads (not a multiple of 2 or 4), 13 image tokens (not a multiple of 2 or 4), 4 text tokens.
    assert all(pools(world).run(check_sequence_attention, degrees, joint_text, 3, 13, 4))


def test_sequence_attention_image_only(pools):
    assert all(pools(4).run(check_sequence_attention, dict(ring_degree=2, ulysses_degree=2), None, 4, 10, 0))
