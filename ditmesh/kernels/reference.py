"""Plain-torch twins of every ditmesh kernel: the CPU path and the ground truth of kernel tests.

Layouts: q, k, v are (batch, heads, seq, head_dim) ("BHSD"); log-sum-exp is (batch, heads, seq)
in float32, natural log, of the scaled scores ``q @ k^T * scale`` over the keys.
"""

from __future__ import annotations

import math

import torch


def attention_lse(
    q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention that also returns the log-sum-exp of each query row.

    Differentiable (autograd through plain ops). Returns (out (B,H,Sq,D) in q's dtype, lse
    (B,H,Sq) float32). A query with no keys gets out = 0 and lse = -inf.
    """
    scale = 1.0 / math.sqrt(q_BHSD.shape[-1]) if scale is None else scale
    scores = torch.matmul(q_BHSD.float(), k_BHSD.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    if k_BHSD.shape[-2] == 0:
        out = torch.zeros_like(q_BHSD[..., : v_BHSD.shape[-1]])
        return out, lse
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs, v_BHSD.float())
    return out.to(q_BHSD.dtype), lse


def merge_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly combine two partial attentions of the same queries over disjoint key sets.

    out_* (B,H,S,D), lse_* (B,H,S) float32. Rows where both lse are -inf (no keys yet) stay 0.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    # exp(lse_x - lse) is the share of keys x in the softmax mass; guard -inf - -inf = nan.
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    out = out_a.float() * w_a + out_b.float() * w_b
    return out.to(out_a.dtype), lse


# ---- Ulysses all-to-all layouts ---------------------------------------------------------------
# Forward (sequence-sharded -> head-sharded), U ranks, h = H/U heads per rank, s = S/U tokens:
#   x (B, s, H, D) --pack(split="heads")--> send (U, B, s, h, D): chunk u holds heads [u*h, (u+1)*h)
#   all_to_all_single(recv, send) over dim 0: recv chunk u = rank u's sequence shard
#   recv (U, B, s, h, D) --unpack(gather="seq")--> (B, U*s, h, D): full sequence, local heads
# Backward (head-sharded -> sequence-sharded):
#   y (B, S, h, D) --pack(split="seq")--> send (U, B, s, h, D): chunk u holds tokens [u*s, (u+1)*s)
#   recv (U, B, s, h, D) --unpack(gather="heads")--> (B, s, U*h, D): local tokens, all heads


def pack_for_all_to_all(
    x_BSHD: torch.Tensor,
    num_ranks: int,
    split: str = "heads",
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Lay out x (B, S, H, D) as the contiguous send buffer (U, B, S', H', D) of `all_to_all_single`.

    split="heads": chunk u holds heads u*H/U.. (S' = S, H' = H/U); split="seq": chunk u holds
    tokens u*S/U.. (S' = S/U, H' = H). With `norm_weight` (D,), an RMSNorm over the head dim
    (QK norm of FLUX/SD3) is applied first, computed in float32.
    """
    batch, seq, heads, dim = x_BSHD.shape
    if norm_weight is not None:
        x_BSHD = rms_norm(x_BSHD, norm_weight, eps)
    if split == "heads":
        return x_BSHD.reshape(batch, seq, num_ranks, heads // num_ranks, dim).permute(2, 0, 1, 3, 4).contiguous()
    if split == "seq":
        return x_BSHD.reshape(batch, num_ranks, seq // num_ranks, heads, dim).transpose(0, 1).contiguous()
    raise ValueError(f"split must be 'heads' or 'seq', got {split!r}")


def unpack_after_all_to_all(buf_UBSHD: torch.Tensor, gather: str = "seq") -> torch.Tensor:
    """Undo the all-to-all layout: recv (U, B, S', H', D) -> (B, U*S', H', D) for gather="seq",
    or (B, S', U*H', D) for gather="heads"."""
    num_ranks, batch, seq, heads, dim = buf_UBSHD.shape
    if gather == "seq":
        return buf_UBSHD.transpose(0, 1).reshape(batch, num_ranks * seq, heads, dim)
    if gather == "heads":
        return buf_UBSHD.permute(1, 2, 0, 3, 4).reshape(batch, seq, num_ranks * heads, dim)
    raise ValueError(f"gather must be 'seq' or 'heads', got {gather!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim in float32, scaled by `weight`, returned in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)
