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
