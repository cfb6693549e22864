"""Parallel strategies, the mesh they run on, and `parallelize` which composes them."""

from ditmesh.parallel.mesh import ParallelMesh
from ditmesh.parallel.parallelize import parallelize

__all__ = ["ParallelMesh", "parallelize"]
