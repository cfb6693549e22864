"""Which attention-with-LSE backend runs a given call: the fastest one measured for its shape.

Backends (all return (out (B,H,Sq,D), lse (B,H,Sq) float32, natural log)):
  reference  plain torch (`reference.attention_lse`), differentiable, any device/dtype
  cpu_flash  `aten._scaled_dot_product_flash_attention_for_cpu` (returns the LSE; ~3x reference)
  cudnn      `aten._scaled_dot_product_cudnn_attention(compute_log_sumexp=True)` (bf16/fp16, CUDA)
  flash      `aten._scaled_dot_product_flash_attention` (bf16/fp16, CUDA)
  triton     `triton_attention.triton_attention_lse` (bf16/fp16, CUDA, head dim 64/128)

The rules come from benchmarks/gpu_step.py on an H200 (docs/kernels.md has the table). Plain
attention: cuDNN at every length (fastest from 4608 tokens down; at 576x576 the Triton kernel is
~10% faster in GPU time but its host launch cost is higher, which decides eager ring loops). A
ring step (attention + merge into the running result): the Triton kernel with the merge fused
into its epilogue for blocks up to `TRITON_MAX_SCORES` (one launch instead of two: 15-17 us vs
19-20 us of GPU time at 576x576, and no slower launched eagerly), else cuDNN then the Triton merge. Every rank picks by
the same rule from the same shapes, so ranks agree (no timing-based choice that could differ).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ditmesh.kernels import reference

# Largest (query tokens x key tokens) for which the fused Triton ring step beats cuDNN + merge on
# an H200 (bf16, 24 heads x 128, batch 1): measured faster at 576x576, slower at 576x4608.
TRITON_MAX_SCORES = 1024 * 1024

LseFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def triton_available() -> bool:
    """Whether the Triton kernels can be imported (the `ditmesh[triton]` extra)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cpu_flash(q, k, v, scale=None):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, lse


# Whether cuDNN (through aten) reads K/V views with heads adjacent -- (B,S,H,D) or (S,B,H,D)
# memory seen as BHSD, e.g. the ring's gather buffers -- without a copy. Checked against the fp32
# reference on the H200 (benchmarks/ring_schedule.py: rel err 2.2e-3, and 25 us instead of 51 us
# with the copy at 576 x 1400 keys) and by tests/test_kernels.py on every GPU run. Other layouts
# are copied (aten's cuDNN path gave wrong results on some non-contiguous inputs).
CUDNN_READS_HEADS_ADJACENT = True


def _cudnn_reads(t: torch.Tensor) -> bool:
    if t.is_contiguous():
        return True
    return CUDNN_READS_HEADS_ADJACENT and t.stride(-1) == 1 and t.stride(1) == t.shape[-1]


def _cudnn(q, k, v, scale=None):
    q, k, v = (t if _cudnn_reads(t) else t.contiguous() for t in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False, scale=scale
    )[:2]
    if lse.dim() == 4:  # (B, H, S, 1) on torch >= 2.9
        lse = lse.squeeze(-1)
    return out, lse


def _flash(q, k, v, scale=None):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse


def _triton(q, k, v, scale=None):
    from ditmesh.kernels.triton_attention import triton_attention_lse

    return triton_attention_lse(q, k, v, scale)


BACKENDS: dict[str, LseFn] = {
    "reference": reference.attention_lse,
    "cpu_flash": _cpu_flash,
    "cudnn": _cudnn,
    "flash": _flash,
    "triton": _triton,
}


def choose_backend(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> str:
    """Name of the fastest backend in `BACKENDS` that computes this call exactly."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHSD, k_BHSD, v_BHSD))
    if needs_grad or 0 in (q_BHSD.shape[-2], k_BHSD.shape[-2]) or q_BHSD.shape[-1] != v_BHSD.shape[-1]:
        return "reference"
    if q_BHSD.device.type == "cpu":
        return "cpu_flash" if q_BHSD.dtype in (torch.float32, torch.bfloat16, torch.float16) else "reference"
    if q_BHSD.device.type != "cuda" or q_BHSD.dtype not in (torch.bfloat16, torch.float16) or q_BHSD.shape[-1] % 8:
        return "reference"
    return "cudnn" if q_BHSD.shape[-1] <= 128 else "flash"


def attention_lse(
    q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention with log-sum-exp, on the fastest backend for this shape.

    Same contract as `reference.attention_lse`: (out (B,H,Sq,D) in q's dtype, lse (B,H,Sq) float32).
    """
    scale = 1.0 / math.sqrt(q_BHSD.shape[-1]) if scale is None else scale
    return BACKENDS[choose_backend(q_BHSD, k_BHSD, v_BHSD)](q_BHSD, k_BHSD, v_BHSD, scale)


def merge_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly combine two partial attentions (same contract as `reference.merge_lse`);
    the Triton kernel on CUDA when available, else plain torch."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (out_a, lse_a, out_b, lse_b))
    head_dim = out_a.shape[-1]
    if out_a.device.type == "cuda" and not needs_grad and head_dim & (head_dim - 1) == 0 and triton_available():
        from ditmesh.kernels.triton_merge import triton_merge_lse

        return triton_merge_lse(out_a, lse_a, out_b, lse_b)
    return reference.merge_lse(out_a, lse_a, out_b, lse_b)


def pack_for_all_to_all(
    x_BSHD: torch.Tensor,
    num_ranks: int,
    split: str = "heads",
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Ulysses send buffer (U, B, S', H', D) from x (B, S, H, D); layout in `reference.pack_for_all_to_all`.

    The fused Triton kernel on CUDA (one pass, RMSNorm included), plain torch elsewhere."""
    batch, seq, heads, dim = x_BSHD.shape
    if split == "heads" and heads % num_ranks or split == "seq" and seq % num_ranks:
        size = heads if split == "heads" else seq
        raise ValueError(f"cannot split {size} {split} over {num_ranks} ranks; pad to a multiple of {num_ranks} first")
    needs_grad = torch.is_grad_enabled() and (x_BSHD.requires_grad or norm_weight is not None and norm_weight.requires_grad)
    fits = x_BSHD.stride(-1) == 1 and dim & (dim - 1) == 0
    if x_BSHD.device.type == "cuda" and fits and not needs_grad and triton_available():
        from ditmesh.kernels.triton_pack import triton_pack_for_all_to_all

        return triton_pack_for_all_to_all(x_BSHD, num_ranks, split, norm_weight, eps)
    return reference.pack_for_all_to_all(x_BSHD, num_ranks, split, norm_weight, eps)


def attention_merge_lse(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    prev_out: torch.Tensor,
    prev_lse: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ring step: attention of q over this key block, merged into the running (out, lse).

    Equals ``merge_lse(prev_out, prev_lse, *attention_lse(q, k, v, scale))``; where the Triton
    kernel is the fastest attention for the shape, the merge runs in its epilogue (one launch).
    """
    if _fused_ring_step(q_BHSD, k_BHSD, v_BHSD, prev_out, prev_lse):
        from ditmesh.kernels.triton_attention import triton_attention_lse

        return triton_attention_lse(q_BHSD, k_BHSD, v_BHSD, scale, prev=(prev_out, prev_lse))
    return merge_lse(prev_out, prev_lse, *attention_lse(q_BHSD, k_BHSD, v_BHSD, scale))


def _fused_ring_step(q_BHSD, k_BHSD, v_BHSD, prev_out, prev_lse) -> bool:
    if choose_backend(q_BHSD, k_BHSD, v_BHSD) != "cudnn" or q_BHSD.shape[-1] not in (64, 128):
        return False  # CPU, fp32, autograd or an odd head dim: the plain path
    needs_grad = torch.is_grad_enabled() and (prev_out.requires_grad or prev_lse.requires_grad)
    small = q_BHSD.shape[-2] * k_BHSD.shape[-2] <= TRITON_MAX_SCORES
    return small and not needs_grad and triton_available()
