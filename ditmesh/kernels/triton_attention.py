"""Triton flash-attention forward that returns the log-sum-exp, with an optional fused LSE merge.

`triton_attention_lse(q, k, v)` is the twin of `reference.attention_lse`. Passing a running
partial result ``prev=(out, lse)`` (the attention of the same queries over other keys, e.g. the
earlier ring steps) merges it in the kernel's epilogue, the twin of
``reference.merge_lse(*prev, *reference.attention_lse(q, k, v))``: a ring step then costs one
launch instead of an attention plus a merge.

Supported: CUDA (or ``TRITON_INTERPRET=1`` on CPU tensors), fp16/bf16/fp32, head dim 16..256 a
power of two (64 and 128 are the tuned ones), non-causal, any lengths (tails are masked), any
strides (a BSHD tensor viewed as BHSD with ``.transpose(1, 2)`` needs no copy). Forward only.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 8, 3),
            (128, 128, 8, 3),
            (128, 64, 4, 3),
            (64, 64, 4, 3),
            (64, 128, 4, 3),
            (64, 64, 4, 2),
            (64, 32, 4, 4),
            (32, 64, 4, 2),
        ]
    ]


@triton.jit
def _attend_tile(q_blk, k_base, v_base, sks, svs, start_n, SEQ_K, m_i, l_i, acc, scale_log2, offs_n, offs_d,
                 MASKED: tl.constexpr):
    """Online-softmax update of (m_i, l_i, acc) with key tile [start_n, start_n + BLOCK_N)."""
    cols = start_n + offs_n
    if MASKED:
        mask_n = cols < SEQ_K
        k_blk = tl.load(k_base + cols[:, None] * sks + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v_blk = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        s = tl.dot(q_blk, tl.trans(k_blk)) * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(mask_n[None, :], s, float("-inf"))
    else:
        k_blk = tl.load(k_base + cols[:, None] * sks + offs_d[None, :])
        v_blk = tl.load(v_base + cols[:, None] * svs + offs_d[None, :])
        s = tl.dot(q_blk, tl.trans(k_blk)) * scale_log2
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v_blk.dtype), v_blk)
    return m_new, l_i, acc


@triton.autotune(configs=_configs(), key=["SEQ_Q", "SEQ_K", "HEAD_DIM", "HAS_PREV"])
@triton.jit
def _attention_fwd(
    q, k, v, out, lse, prev_out, prev_lse,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos, slb, slh, spb, sph, sps, splb, splh,
    num_heads, scale_log2,
    SEQ_Q, SEQ_K,
    HEAD_DIM: tl.constexpr, HAS_PREV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: BLOCK_M queries of one (batch, head). Scores are kept in base 2
    # (scale_log2 = scale * log2(e)) so the inner loop uses exp2; lse is returned in natural log.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < SEQ_Q

    q_ptrs = q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :]
    q_blk = tl.load(q_ptrs, mask=mask_m[:, None], other=0.0)
    k_base = k + b * skb + h * skh
    v_base = v + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Whole key tiles without masks (the hot loop), then the ragged tail with them.
    full = (SEQ_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q_blk, k_base, v_base, sks, svs, start_n, SEQ_K, m_i, l_i, acc, scale_log2,
                                     offs_n, offs_d, False)
    if full < SEQ_K:
        m_i, l_i, acc = _attend_tile(q_blk, k_base, v_base, sks, svs, full, SEQ_K, m_i, l_i, acc, scale_log2,
                                     offs_n, offs_d, True)

    # SEQ_K == 0 leaves m_i = -inf, l_i = 0: out = 0, lse = -inf (as the reference).
    has_keys = l_i > 0
    acc = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse_i = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) / 1.4426950408889634, float("-inf"))

    if HAS_PREV:
        # Fused merge with the running partial (out_prev, lse_prev) of the same queries.
        p_lse = tl.load(prev_lse + b * splb + h * splh + offs_m, mask=mask_m, other=float("-inf"))
        p_out = tl.load(
            prev_out + b * spb + h * sph + offs_m[:, None] * sps + offs_d[None, :], mask=mask_m[:, None], other=0.0
        ).to(tl.float32)
        new_lse = tl.maximum(p_lse, lse_i)
        finite = new_lse > float("-inf")
        safe = tl.where(finite, new_lse, 0.0)
        new_lse = tl.where(finite, safe + tl.log(tl.exp(p_lse - safe) + tl.exp(lse_i - safe)), float("-inf"))
        safe = tl.where(finite, new_lse, 0.0)
        w_prev = tl.where(finite, tl.exp(p_lse - safe), 0.0)
        w_new = tl.where(finite, tl.exp(lse_i - safe), 0.0)
        acc = p_out * w_prev[:, None] + acc * w_new[:, None]
        lse_i = new_lse

    tl.store(out + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], acc.to(out.dtype.element_ty), mask=mask_m[:, None])
    tl.store(lse + b * slb + h * slh + offs_m, lse_i, mask=mask_m)


def triton_attention_lse(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    scale: float | None = None,
    prev: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention (B,H,Sq,D) x (B,H,Sk,D) -> (out (B,H,Sq,D) in q's dtype, lse (B,H,Sq) float32).

    With ``prev=(out_prev, lse_prev)`` the result is merged with that partial attention of the
    same queries (exactly as `merge_lse`), in the same launch.
    """
    batch, heads, seq_q, head_dim = q_BHSD.shape
    seq_k = k_BHSD.shape[-2]
    if head_dim not in (16, 32, 64, 128, 256) or v_BHSD.shape[-1] != head_dim:
        raise ValueError(f"triton attention needs equal q/k/v head dims in 16..256, a power of two; got {head_dim}")
    for t in (q_BHSD, k_BHSD, v_BHSD):
        # The kernel assumes the head dim is the contiguous one; a permuted view keeps that.
        if t.stride(-1) != 1:
            raise ValueError("triton attention needs the head dim contiguous (stride 1); call .contiguous()")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(q_BHSD)
    lse = torch.empty(batch, heads, seq_q, device=q_BHSD.device, dtype=torch.float32)
    prev_out, prev_lse = prev if prev is not None else (out, lse)  # dummies when HAS_PREV is off
    if prev is not None and prev_out.stride(-1) != 1:
        prev_out = prev_out.contiguous()

    if prev is not None and prev_lse.stride(-1) != 1:
        prev_lse = prev_lse.contiguous()
    args = (
        q_BHSD, k_BHSD, v_BHSD, out, lse, prev_out, prev_lse,
        *q_BHSD.stride()[:3], *k_BHSD.stride()[:3], *v_BHSD.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
        *prev_out.stride()[:3], *prev_lse.stride()[:2],
        heads, scale * _LOG2E,
        seq_q, seq_k,
    )
    _launch(args, seq_q, seq_k, batch * heads, head_dim, prev is not None)
    return out, lse


# Tuned config per (seq_q, seq_k, head_dim, has_prev, device). After the first (autotuned) call of
# a shape, launches go straight to the jitted kernel: the autotuner's per-call bookkeeping costs
# host time comparable to the whole kernel at ring-block sizes (tens of microseconds).
_TUNED: dict[tuple, triton.Config] = {}


def _launch(args: tuple, seq_q: int, seq_k: int, num_bh: int, head_dim: int, has_prev: bool) -> None:
    key = (seq_q, seq_k, head_dim, has_prev, args[0].device)
    config = _TUNED.get(key)
    if config is None:
        _attention_fwd[lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), num_bh)](*args, HEAD_DIM=head_dim, HAS_PREV=has_prev)
        _TUNED[key] = _attention_fwd.best_config
        return
    grid = (triton.cdiv(seq_q, config.kwargs["BLOCK_M"]), num_bh)
    _attention_fwd.fn[grid](
        *args, HEAD_DIM=head_dim, HAS_PREV=has_prev, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
    )
