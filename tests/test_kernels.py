"""Kernels vs their plain-torch twins in `ditmesh/kernels/reference.py`, and the single-GPU fast path.

On CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, fp32/fp16: the
interpreter mishandles bf16) at small sizes; with CUDA they run compiled, and the `gpu` tests
check real FLUX sizes in bf16. Triton tests skip when triton is not installed.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

from ditmesh.kernels import reference, select  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton not installed (pip install 'ditmesh[triton]')"
)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
SMALL_DTYPES = [torch.float32, torch.float16] if not HAS_CUDA else [torch.float16, torch.bfloat16]
# fp32 accumulation in both; fp16 outputs round at ~5e-4 relative.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _qkv(batch, heads, seq_q, seq_k, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, s, dim, generator=gen).to(DEVICE, dtype) for s in (seq_q, seq_k, seq_k)]


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- Triton attention --------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("seq_q,seq_k", [(37, 29), (16, 50)])
def test_triton_attention_matches_reference(dtype, dim, seq_q, seq_k):
    from ditmesh.kernels.triton_attention import triton_attention_lse

    for seed in (0, 1):  # the second call of a shape skips the autotuner: check that path too
        q, k, v = _qkv(2, 3, seq_q, seq_k, dim, dtype, seed=seed)
        out, lse = triton_attention_lse(q, k, v)
        ref_out, ref_lse = reference.attention_lse(q, k, v)
        torch.testing.assert_close(out.float(), ref_out.float(), **TOL[dtype])
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_attention_reads_strided_bshd_view_and_custom_scale():
    from ditmesh.kernels.triton_attention import triton_attention_lse

    dtype = SMALL_DTYPES[0]
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(1, 4, 33, 21, 64, dtype, seed=1))
    assert not q.is_contiguous()  # (B,S,H,D) memory seen as (B,H,S,D)
    out, lse = triton_attention_lse(q, k, v, scale=0.3)
    ref_out, ref_lse = reference.attention_lse(q, k, v, scale=0.3)
    torch.testing.assert_close(out.float(), ref_out.float(), **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_ring_steps_with_fused_merge_equal_full_attention():
    # A ring of 3 steps over disjoint key blocks, each merged in the kernel epilogue, must equal
    # attention over all keys at once. The first step starts from "no keys yet" (lse = -inf).
    from ditmesh.kernels.triton_attention import triton_attention_lse

    dtype = SMALL_DTYPES[0]
    q, k, v = _qkv(1, 2, 40, 57, 64, dtype, seed=2)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
    for chunk in (slice(0, 20), slice(20, 31), slice(31, 57)):
        out, lse = triton_attention_lse(q, k[:, :, chunk], v[:, :, chunk], prev=(out, lse))
    ref_out, ref_lse = reference.attention_lse(q, k, v)
    torch.testing.assert_close(out.float(), ref_out.float(), **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_merge_matches_reference_including_empty_rows():
    from ditmesh.kernels.triton_merge import triton_merge_lse

    gen = torch.Generator().manual_seed(3)
    out_a, out_b = (torch.randn(2, 3, 19, 64, generator=gen).to(DEVICE) for _ in range(2))
    lse_a, lse_b = (torch.randn(2, 3, 19, generator=gen).to(DEVICE) * 3 for _ in range(2))
    lse_a[0, 0, :5] = float("-inf")  # a partial with no keys for these queries
    lse_a[1, 2, 3] = lse_b[1, 2, 3] = float("-inf")  # no keys at all: stays 0 / -inf
    out_a[1, 2, 3] = out_b[1, 2, 3] = 0
    out, lse = triton_merge_lse(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = reference.merge_lse(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert lse[1, 2, 3] == float("-inf") and out[1, 2, 3].abs().sum() == 0


# ---- Ulysses pack/unpack -----------------------------------------------------------------------


def _simulated_all_to_all(sends):
    # all_to_all_single over dim 0: rank r receives chunk r of every rank's send buffer, in rank order.
    return [torch.stack([send[r] for send in sends]) for r in range(len(sends))]


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_reference_pack_unpack_realise_ulysses_layout(num_ranks):
    gen = torch.Generator().manual_seed(4)
    full = torch.randn(2, 8 * num_ranks, 4 * num_ranks, 16, generator=gen)  # (B, S, H, D)
    seq_shards = full.chunk(num_ranks, dim=1)
    recvs = _simulated_all_to_all([reference.pack_for_all_to_all(x, num_ranks, "heads") for x in seq_shards])
    head_shards = [reference.unpack_after_all_to_all(recv, "seq") for recv in recvs]
    for rank, got in enumerate(head_shards):  # full sequence, this rank's heads
        torch.testing.assert_close(got, full.chunk(num_ranks, dim=2)[rank], rtol=0, atol=0)
    back = _simulated_all_to_all([reference.pack_for_all_to_all(y, num_ranks, "seq") for y in head_shards])
    for rank, recv in enumerate(back):  # this rank's tokens, all heads
        torch.testing.assert_close(reference.unpack_after_all_to_all(recv, "heads"), seq_shards[rank], rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("split", ["heads", "seq"])
@pytest.mark.parametrize("with_norm", [False, True])
def test_triton_pack_matches_reference(split, with_norm):
    from ditmesh.kernels.triton_pack import triton_pack_for_all_to_all

    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 12, 3, 4, 64, generator=gen).to(DEVICE)  # fused QKV output (B, S, 3, H, D)
    x = qkv[:, :, 0]  # strided view: q without a copy
    weight = torch.randn(64, generator=gen).to(DEVICE) if with_norm else None
    got = triton_pack_for_all_to_all(x, 2, split, weight, eps=1e-6)
    want = reference.pack_for_all_to_all(x, 2, split, weight, eps=1e-6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pack_refuses_indivisible_heads_with_the_fix():
    with pytest.raises(ValueError, match="pad to a multiple of 4"):
        select.pack_for_all_to_all(torch.randn(1, 8, 6, 16), 4, "heads")


# ---- dispatch ------------------------------------------------------------------------------------


def test_attention_lse_dispatch_on_cpu_matches_reference_and_keeps_grad():
    import ditmesh.kernels as kernels

    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, s, 32, generator=gen) for s in (45, 31, 31))
    assert select.choose_backend(q, k, v) == "cpu_flash"
    out, lse = kernels.attention_lse(q, k, v)
    ref_out, ref_lse = reference.attention_lse(q, k, v)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    q.requires_grad_(True)
    assert select.choose_backend(q, k, v) == "reference"  # the LSE must carry gradients
    out, lse = kernels.attention_lse(q, k, v)
    (out.sum() + lse.sum()).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_attention_merge_lse_equals_attention_then_merge():
    import ditmesh.kernels as kernels

    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, s, 32, generator=gen) for s in (24, 17, 17))
    prev_out, prev_lse = torch.randn(1, 2, 24, 32, generator=gen), torch.randn(1, 2, 24, generator=gen)
    out, lse = kernels.attention_merge_lse(q, k, v, prev_out, prev_lse)
    ref_out, ref_lse = reference.merge_lse(prev_out, prev_lse, *reference.attention_lse(q, k, v))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


# ---- single-GPU fast path ----------------------------------------------------------------------


def test_fastpath_eager_matches_plain_model_and_finds_repeated_blocks():
    from ditmesh.models.tiny import flux_transformer_inputs, sd3_transformer_inputs, tiny_flux_transformer, tiny_sd3_transformer
    from ditmesh.parallel.fastpath import apply_fastpath, repeated_blocks

    for build, inputs, num_blocks, fused in [
        (tiny_flux_transformer, flux_transformer_inputs, 2 + 4, True),
        (tiny_sd3_transformer, sd3_transformer_inputs, 4, False),  # diffusers' fused SD3 processor drops QK norm
    ]:
        model, kwargs = build(), inputs()
        assert len(repeated_blocks(model)) == num_blocks
        with torch.no_grad():
            want = model(**kwargs)[0]
            got = apply_fastpath(model, compile=False)(**kwargs)[0]
        assert any(getattr(m, "fused_projections", False) for m in model.modules()) == fused
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_parallelize_serial_on_cpu_returns_pipe_unchanged():
    from ditmesh import ParallelConfig, parallelize
    from ditmesh.models.tiny import tiny_flux_transformer

    model = tiny_flux_transformer()
    assert parallelize(model, ParallelConfig()) is model
    assert not any(getattr(m, "fused_projections", False) for m in model.modules())


# ---- GPU, real sizes -----------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("seq_q,seq_k", [(576, 576), (4608, 4608), (1000, 777)])
@pytest.mark.parametrize("dim,heads", [(128, 24), (64, 38)])
def test_gpu_attention_backends_at_flux_sizes(seq_q, seq_k, dim, heads):
    # FLUX (24 x 128) and SD3.5-large (38 x 64) heads, bf16; reference in fp32 of the same inputs.
    from ditmesh.kernels.triton_attention import triton_attention_lse

    q, k, v = _qkv(1, heads, seq_q, seq_k, dim, torch.bfloat16, seed=7)
    ref_out, ref_lse = reference.attention_lse(q.float(), k.float(), v.float())
    prev_out, prev_lse = select.BACKENDS["cudnn"](q, k.roll(1, 2), v.roll(1, 2))
    ring_ref = reference.merge_lse(prev_out.float(), prev_lse, ref_out, ref_lse)
    ring_out, ring_lse = select.attention_merge_lse(q, k, v, prev_out, prev_lse)
    assert _rel_err(ring_out, ring_ref[0]) <= 1e-2
    torch.testing.assert_close(ring_lse, ring_ref[1], atol=2e-2, rtol=2e-3)
    for name, fn in [("triton", triton_attention_lse), ("cudnn", select.BACKENDS["cudnn"]), ("auto", select.attention_lse)]:
        out, lse = fn(q, k, v)
        assert _rel_err(out, ref_out) <= 1e-2, name
        torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-3, msg=name)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("sizes, pad", [([8], 0), ([1, 7], 0), ([1, 3, 3, 1], 0), ([3, 5], 40)])
def test_gpu_grouped_ring_runs_read_gather_buffers_in_place(sizes, pad):
    # The ring's sequence-major gather buffers (8 blocks of [text share, image share], padding
    # last in the last block) attended run by run: cuDNN and the Triton step read the strided
    # views directly (select.CUDNN_READS_HEADS_ADJACENT). Reference: all real keys at once.
    from ditmesh.parallel import ring

    heads, dim, block = 24, 128, 64 + 512  # a rank's joint tokens at ring=8: 512/8 text + 4096/8 image
    q, _, _ = _qkv(1, heads, block, 1, dim, torch.bfloat16, seed=8)
    _, k, v = _qkv(1, heads, 1, 8 * block, dim, torch.bfloat16, seed=9)
    k_buf, v_buf = (t.permute(2, 0, 1, 3).contiguous() for t in (k, v))
    view = k_buf[100:1400].permute(1, 2, 0, 3)
    assert not view.is_contiguous() and select._cudnn_reads(view) == select.CUDNN_READS_HEADS_ADJACENT
    real = 8 * block - pad
    ref_out, ref_lse = reference.attention_lse(q.float(), k[:, :, :real].float(), v[:, :, :real].float())
    valid = [block] * 7 + [block - pad]
    out, lse = ring.attend_runs(q, k_buf, v_buf, block, valid, sizes, select.attention_lse, select.attention_merge_lse)
    assert _rel_err(out, ref_out) <= 1e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-3)


@pytest.mark.gpu
@needs_cuda
def test_gpu_fastpath_compiled_matches_eager_tiny_flux():
    from ditmesh import ParallelConfig, parallelize
    from ditmesh.models.tiny import flux_transformer_inputs, tiny_flux_transformer

    model = tiny_flux_transformer(num_heads=2, head_dim=64).to("cuda", torch.bfloat16)
    kwargs = {k: v.to("cuda", torch.bfloat16) if torch.is_tensor(v) else v for k, v in flux_transformer_inputs().items()}
    with torch.no_grad():
        want = model(**kwargs)[0].float()
        got = parallelize(model, ParallelConfig())(**kwargs)[0].float()
    assert _rel_err(got, want) <= 2e-2
