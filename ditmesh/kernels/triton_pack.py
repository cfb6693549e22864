"""Triton all-to-all pack for Ulysses, with the QK RMSNorm fused in.

Twin of `reference.pack_for_all_to_all` (layout documented there). Plain torch needs a norm
kernel (read + write) and a permute-copy (read + write); this kernel reads x once and writes the
send buffer once, normalising each (token, head) row of D values on the way. Any input strides
with a contiguous head dim (so q from a fused QKV projection, viewed, needs no copy).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _pack_fwd(
    x, w, out, sxb, sxs, sxh, num_rows, batch, seq, heads, out_seq, out_heads, eps,
    SPLIT_HEADS: tl.constexpr, HAS_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Input rows are (b, s, h) in row-major order; each row is HEAD_DIM contiguous values.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, HEAD_DIM)
    mask_r = rows < num_rows
    h = rows % heads
    s = (rows // heads) % seq
    b = rows // (heads * seq)
    vals = tl.load(x + (b * sxb + s * sxs + h * sxh)[:, None] + cols[None, :], mask=mask_r[:, None], other=0.0)
    if HAS_NORM:
        vf = vals.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(vf * vf, 1) / HEAD_DIM + eps)
        vf = vf * inv[:, None] * tl.load(w + cols).to(tl.float32)[None, :]
        vals = vf.to(vals.dtype)
    if SPLIT_HEADS:  # chunk u = h // out_heads; out (U, B, seq, out_heads, D)
        u = h // out_heads
        row_out = ((u * batch + b) * out_seq + s) * out_heads + (h % out_heads)
    else:  # chunk u = s // out_seq; out (U, B, out_seq, heads, D)
        u = s // out_seq
        row_out = ((u * batch + b) * out_seq + (s % out_seq)) * out_heads + h
    tl.store(out + row_out[:, None] * HEAD_DIM + cols[None, :], vals, mask=mask_r[:, None])


def triton_pack_for_all_to_all(
    x_BSHD: torch.Tensor,
    num_ranks: int,
    split: str = "heads",
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """x (B, S, H, D) -> contiguous send buffer (U, B, S', H', D); see `reference.pack_for_all_to_all`."""
    batch, seq, heads, dim = x_BSHD.shape
    if split not in ("heads", "seq"):
        raise ValueError(f"split must be 'heads' or 'seq', got {split!r}")
    if x_BSHD.stride(-1) != 1 or dim & (dim - 1):
        raise ValueError(f"triton pack needs a contiguous power-of-two head dim, got {dim} with stride {x_BSHD.stride(-1)}")
    out_seq, out_heads = (seq, heads // num_ranks) if split == "heads" else (seq // num_ranks, heads)
    out = torch.empty(num_ranks, batch, out_seq, out_heads, dim, device=x_BSHD.device, dtype=x_BSHD.dtype)
    num_rows = batch * seq * heads
    block_r = 16 if _INTERPRET else max(1, 8192 // dim)
    weight = norm_weight if norm_weight is not None else x_BSHD  # dummy pointer when HAS_NORM is off
    _pack_fwd[(triton.cdiv(num_rows, block_r),)](
        x_BSHD, weight, out, *x_BSHD.stride()[:3], num_rows, batch, seq, heads, out_seq, out_heads, eps,
        SPLIT_HEADS=split == "heads", HAS_NORM=norm_weight is not None, HEAD_DIM=dim, BLOCK_R=block_r, num_warps=4,
    )
    return out
