"""Attention with log-sum-exp, LSE merge and layout kernels, each with a plain-torch twin.

Strategies call the functions exported here; on CPU (and wherever no faster kernel applies)
they are the plain-torch versions in `reference.py`.
"""

from ditmesh.kernels.reference import attention_lse, merge_lse

__all__ = ["attention_lse", "merge_lse"]
