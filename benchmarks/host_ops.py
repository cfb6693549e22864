"""What one rank's eager forward asks of the host: kernels launched and host time, ditmesh vs diffusers CP.

    python benchmarks/host_ops.py            # CPU, one process as rank 0 of 2 (fake process group)

A FLUX-shaped transformer with FLUX.1-dev's 19 + 38 blocks at tiny widths (4 heads x 16), so the
compute is negligible and what is counted is per-op work: every non-view aten op of one forward
(each launches at least one kernel on a GPU) and the median host time of a forward. Rows: serial,
diffusers `enable_parallelism(ContextParallelConfig(ulysses_degree=2))`, ditmesh ulysses=2 (64
image + 8 text tokens: the packed layout) and ulysses=2 with 5 text tokens (padding: the general
layout). The process is rank 0 of 2 in torch's fake process group: collectives return at once.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
from torch.utils._python_dispatch import TorchDispatchMode

CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=16,
              num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
              axes_dims_rope=(4, 6, 6))


class CountOps(TorchDispatchMode):
    """Counts the non-view aten ops that run while active."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.startswith("aten::") and not func.is_view:
            self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def inputs(text: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 64, 64, generator=gen), encoder_hidden_states=torch.randn(1, text, 32, generator=gen),
                pooled_projections=torch.randn(1, 16, generator=gen), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.5]), img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(text, 3), return_dict=False)


def build(which: str) -> torch.nn.Module:
    from diffusers import ContextParallelConfig, FluxTransformer2DModel

    from ditmesh import ParallelConfig, parallelize
    from ditmesh.parallel.mesh import ParallelMesh

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG).eval()
    if which == "diffusers":
        model.set_attention_backend("native")
        with harness.one_accelerator_on_cpu():
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    elif which != "serial":
        config = ParallelConfig.parse(which)
        model = parallelize(model, config, mesh=ParallelMesh.build(config), compile=False, cuda_graphs=False)
    return model


def measure(model: torch.nn.Module, text: int, calls: int = 20) -> tuple[int, float]:
    x = inputs(text)
    with torch.no_grad():
        with CountOps() as counter:
            model(**x)
        times = []
        for _ in range(calls):
            tic = time.perf_counter()
            model(**x)
            times.append(time.perf_counter() - tic)
    return sum(counter.ops.values()), 1e3 * statistics.median(times)


def main() -> None:
    harness.init_fake(2)
    torch.set_num_threads(1)
    rows = [("serial", "serial", 8), ("diffusers CP ulysses=2", "diffusers", 8),
            ("ditmesh ulysses=2 (packed)", "ulysses=2", 8), ("ditmesh ulysses=2, 5 text tokens (general)", "ulysses=2", 5)]
    print("| forward | non-view aten ops | host ms (median of 20) |\n|---|---:|---:|")
    for name, which, text in rows:
        ops, ms = measure(build(which), text)
        print(f"| {name} | {ops} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
