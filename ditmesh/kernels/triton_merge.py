"""Triton LSE merge: the twin of `reference.merge_lse`, one pass over both partial outputs.

The reference reads each partial output twice in float32 and writes temporaries; this kernel
reads out_a, out_b, lse_a, lse_b once and writes (out, lse) once. Ring attention uses the merge
fused into the attention epilogue (`triton_attention_lse(..., prev=...)`) where it can; this is
for partials produced by another backend (cuDNN).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _merge_fwd(out_a, lse_a, out_b, lse_b, out, lse, num_rows, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    # Rows are (batch, head, query) flattened; each row holds HEAD_DIM contiguous values.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, HEAD_DIM)
    mask_r = rows < num_rows
    la = tl.load(lse_a + rows, mask=mask_r, other=float("-inf"))
    lb = tl.load(lse_b + rows, mask=mask_r, other=float("-inf"))
    m = tl.maximum(la, lb)
    finite = m > float("-inf")
    safe = tl.where(finite, m, 0.0)
    ea = tl.where(finite, tl.exp(la - safe), 0.0)
    eb = tl.where(finite, tl.exp(lb - safe), 0.0)
    total = ea + eb
    new_lse = tl.where(finite, safe + tl.log(tl.where(finite, total, 1.0)), float("-inf"))
    wa = ea / tl.where(finite, total, 1.0)
    wb = eb / tl.where(finite, total, 1.0)
    offs = rows[:, None] * HEAD_DIM + cols[None, :]
    a = tl.load(out_a + offs, mask=mask_r[:, None], other=0.0).to(tl.float32)
    b = tl.load(out_b + offs, mask=mask_r[:, None], other=0.0).to(tl.float32)
    merged = a * wa[:, None] + b * wb[:, None]
    tl.store(out + offs, merged.to(out.dtype.element_ty), mask=mask_r[:, None])
    tl.store(lse + rows, new_lse, mask=mask_r)


def triton_merge_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly combine two partial attentions of the same queries over disjoint key sets.

    out_* (B,H,S,D) (any float dtype), lse_* (B,H,S) float32 -> (out in out_a's dtype, lse).
    """
    head_dim = out_a.shape[-1]
    if head_dim & (head_dim - 1):
        raise ValueError(f"triton merge needs a power-of-two head dim, got {head_dim}")
    out_a, out_b, lse_a, lse_b = (t.contiguous() for t in (out_a, out_b, lse_a, lse_b))
    out = torch.empty_like(out_a)
    lse = torch.empty_like(lse_a)
    num_rows = lse_a.numel()
    block_r = 16 if _INTERPRET else max(1, 4096 // head_dim)
    _merge_fwd[(triton.cdiv(num_rows, block_r),)](
        out_a, lse_a, out_b, lse_b, out, lse, num_rows, HEAD_DIM=head_dim, BLOCK_R=block_r, num_warps=4
    )
    return out, lse
