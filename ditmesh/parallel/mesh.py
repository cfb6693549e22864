"""`ParallelMesh`: one torch `DeviceMesh` with the named axes of a `ParallelConfig`.

Strategies receive the mesh and ask it for an axis's group, rank and size. There is no
module-level process-group state anywhere in ditmesh.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ditmesh.config import AXES, ParallelConfig

# Flattened groups over several adjacent axes, built once in `build` (every rank must take part
# in creating a group, so creating them lazily from one strategy on some ranks would hang).
FLAT_AXES = {"sequence": ("ring", "ulysses")}


class ParallelMesh:
    """A `DeviceMesh` with axes data, cfg, pipefusion, ring, ulysses, tensor (outer -> inner).

    Every axis exists, degree-1 axes included, so strategy code never special-cases "off".
    `mesh.group("ulysses")`, `mesh.rank("cfg")`, `mesh.size("ring")`; the flattened
    ``"sequence"`` axis is ring x ulysses.
    """

    def __init__(self, device_mesh: DeviceMesh, config: ParallelConfig,
                 flat_meshes: dict[str, DeviceMesh] | None = None):
        self.device_mesh = device_mesh
        self.config = config
        self._flat_meshes = flat_meshes or {}  # kept: torch deprecates re-slicing them from the root

    @classmethod
    def build(cls, config: ParallelConfig, device_type: str | None = None) -> ParallelMesh:
        """Build the mesh over the initialised default process group (collective: call on every rank)."""
        if not dist.is_initialized():
            raise ValueError("torch.distributed is not initialised; call init_process_group first or use DistributedRunner")
        config.check_world_size(dist.get_world_size())
        device_type = device_type or ("cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu")
        shape = tuple(config.degrees.values())
        device_mesh = init_device_mesh(device_type, shape, mesh_dim_names=AXES)
        flat_meshes = {name: device_mesh[axes]._flatten(name) for name, axes in FLAT_AXES.items()}
        return cls(device_mesh, config, flat_meshes)

    def _axis_mesh(self, axis: str) -> DeviceMesh:
        if axis in self._flat_meshes:
            return self._flat_meshes[axis]
        if axis not in AXES:
            raise KeyError(f"unknown mesh axis {axis!r}; axes are {AXES + tuple(FLAT_AXES)}")
        return self.device_mesh[axis]

    def group(self, axis: str) -> dist.ProcessGroup:
        """Process group of this rank along `axis`."""
        return self._axis_mesh(axis).get_group()

    def rank(self, axis: str) -> int:
        """This rank's coordinate along `axis` (0..size-1)."""
        return self._axis_mesh(axis).get_local_rank()

    def size(self, axis: str) -> int:
        """Degree of `axis`."""
        return self._axis_mesh(axis).size()

    def submesh(self, *axes: str) -> DeviceMesh:
        """The sub-`DeviceMesh` over `axes` containing this rank (e.g. ``("ring", "ulysses")``)."""
        return self.device_mesh[axes if len(axes) > 1 else axes[0]]

    def group_ranks(self, axis: str) -> list[int]:
        """Global ranks in this rank's group along `axis`, in axis order."""
        return dist.get_process_group_ranks(self.group(axis))

    def ranks_by(self, axis: str) -> list[list[int]]:
        """Global ranks grouped by their coordinate along `axis`, one list per coordinate: for
        ``"data"``, the ranks of each data group (those that work on the same images)."""
        index = AXES.index(axis)
        return [self.layout.select(index, i).flatten().tolist() for i in range(self.size(axis))]

    @property
    def layout(self) -> torch.Tensor:
        """Global rank at each mesh coordinate: shape (data, cfg, pipefusion, ring, ulysses, tensor)."""
        return self.device_mesh.mesh

    @property
    def device(self) -> torch.device:
        """This rank's device."""
        if self.device_mesh.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.device_mesh.device_type)

    def __repr__(self) -> str:
        return f"ParallelMesh({self.config}, layout={self.layout.flatten().tolist()})"

