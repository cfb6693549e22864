"""`TrainMesh`: one torch `DeviceMesh` with the training axes of a `TrainConfig`.

Axes, outer -> inner: pipeline, data, fsdp, ring, ulysses, tensor (every axis exists, degree-1
ones included). The inference strategies that training reuses (`ditmesh.parallel.tensor`,
`ditmesh.parallel.sequence`) take a `ParallelMesh`; `TrainMesh.parallel` is one over the same
`DeviceMesh`, so they run on the very groups of this mesh's ring, ulysses and tensor axes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ditmesh.parallel.mesh import ParallelMesh
from ditmesh.training.config import TRAIN_AXES, TrainConfig


class TrainMesh:
    """The training `DeviceMesh`; ask it for an axis's group, rank and size."""

    def __init__(self, device_mesh: DeviceMesh, config: TrainConfig, parallel: ParallelMesh):
        self.device_mesh = device_mesh
        self.config = config
        self.parallel = parallel
        """A `ParallelMesh` over the same `DeviceMesh` for `ditmesh.parallel` strategies."""

    @classmethod
    def build(cls, config: TrainConfig, device_type: str | None = None) -> TrainMesh:
        """Build the mesh over the initialised default process group (collective: call on every rank)."""
        if not dist.is_initialized():
            raise ValueError("torch.distributed is not initialised; call init_process_group first or use DistributedRunner")
        config.check_world_size(dist.get_world_size())
        device_type = device_type or ("cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu")
        device_mesh = init_device_mesh(device_type, tuple(config.degrees.values()), mesh_dim_names=TRAIN_AXES)
        # Every group is created here, on every rank, in one order: creating one lazily from a
        # strategy that runs on some ranks only would hang.
        sequence = device_mesh[("ring", "ulysses")]._flatten("sequence")
        parallel = ParallelMesh(device_mesh, config.parallel_config(), flat_meshes={"sequence": sequence})
        return cls(device_mesh, config, parallel)

    def group(self, axis: str) -> dist.ProcessGroup:
        """Process group of this rank along `axis`."""
        return self.device_mesh[axis].get_group()

    def rank(self, axis: str) -> int:
        """This rank's coordinate along `axis`."""
        return self.device_mesh[axis].get_local_rank()

    def size(self, axis: str) -> int:
        """Degree of `axis`."""
        return self.device_mesh[axis].size()

    def submesh(self, *axes: str) -> DeviceMesh:
        """The sub-`DeviceMesh` over `axes` containing this rank."""
        return self.device_mesh[axes if len(axes) > 1 else axes[0]]

    @property
    def batch_rank(self) -> int:
        """Which share of each batch this rank trains on: its (data, fsdp) coordinate, flattened."""
        return self.rank("data") * self.size("fsdp") + self.rank("fsdp")

    @property
    def device(self) -> torch.device:
        """This rank's device."""
        return self.parallel.device

    def __repr__(self) -> str:
        return f"TrainMesh({self.config.parallel_str()}, layout={self.device_mesh.mesh.flatten().tolist()})"
