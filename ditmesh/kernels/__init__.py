"""Attention with log-sum-exp, LSE merge and layout kernels, each with a plain-torch twin.

Strategies call the functions exported here. Each picks the fastest exact implementation for
the call (`select.py`): on CPU plain torch (`reference.py`) or torch's CPU flash kernel; on CUDA
cuDNN or the Triton kernels (`triton_*.py`, the `ditmesh[triton]` extra) by shape.
"""

from ditmesh.kernels.reference import unpack_after_all_to_all
from ditmesh.kernels.select import attention_lse, attention_merge_lse, choose_backend, merge_lse, pack_for_all_to_all

__all__ = ["attention_lse", "attention_merge_lse", "choose_backend", "merge_lse", "pack_for_all_to_all", "unpack_after_all_to_all"]
