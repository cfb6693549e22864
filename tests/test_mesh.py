import pytest
import torch
import torch.distributed as dist

from ditmesh import ParallelConfig
from ditmesh.config import AXES
from ditmesh.parallel.mesh import ParallelMesh
from ditmesh.testing import RankError


def _mesh_report(text):
    mesh = ParallelMesh.build(ParallelConfig.parse(text))
    return {
        "layout": mesh.layout.tolist(),
        "ranks": {axis: mesh.group_ranks(axis) for axis in AXES + ("sequence",)},
        "coords": {axis: mesh.rank(axis) for axis in AXES},
        "sizes": {axis: mesh.size(axis) for axis in AXES + ("sequence",)},
    }


def test_layout_data2_cfg2_ulysses2(pools):
    reports = pools(8).run(_mesh_report, "data=2,cfg=2,ulysses=2")
    expected = torch.arange(8).reshape(2, 2, 1, 1, 2, 1)
    print("\nrank layout (data, cfg, pipefusion, ring, ulysses, tensor):\n", expected.squeeze())
    for rank, report in enumerate(reports):
        assert report["layout"] == expected.tolist()
        assert report["sizes"] == {"data": 2, "cfg": 2, "pipefusion": 1, "ring": 1, "ulysses": 2, "tensor": 1, "sequence": 2}
        d, c, _, _, u, _ = (int(i) for i in (expected == rank).nonzero()[0])
        assert report["coords"]["data"] == d and report["coords"]["cfg"] == c and report["coords"]["ulysses"] == u
        # innermost axis: neighbouring ranks; cfg: stride 2; data: stride 4
        assert report["ranks"]["ulysses"] == expected[d, c, 0, 0, :, 0].tolist()
        assert report["ranks"]["cfg"] == expected[d, :, 0, 0, u, 0].tolist()
        assert report["ranks"]["data"] == expected[:, c, 0, 0, u, 0].tolist()
        assert report["ranks"]["tensor"] == [rank]


def test_sequence_axis_flattens_ring_and_ulysses(pools):
    reports = pools(4).run(_mesh_report, "ring=2,ulysses=2")
    assert [r["ranks"]["sequence"] for r in reports] == [[0, 1, 2, 3]] * 4
    assert [r["ranks"]["ring"] for r in reports] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_world_size_mismatch_on_build(pools):
    with pytest.raises(RankError, match="needs 8 processes but the world has 2"):
        pools(2).run(_mesh_report, "ulysses=8")
    # the pool survives a ValueError on every rank
    assert pools(2).run(dist.get_rank) == [0, 1]

