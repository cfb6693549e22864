"""Per-call cost of ditmesh's eager-inference collectives against the functional-collective path
they replace (what autograd and torch.compile use), on tiny tensors: the host and dispatch cost,
not the transfer.

    torchrun --nproc-per-node 2 benchmarks/collective_overhead.py                 # CPU, gloo
    torchrun --nproc-per-node 2 benchmarks/collective_overhead.py --device cuda   # GPUs, NCCL

Alternates the two paths (--rounds), 1000 calls each per round; prints µs per call (median of the
rounds, rank 0) and writes benchmarks/results/collective_overhead_<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from ditmesh.parallel import comm


def per_call_us(fn, calls: int, device: torch.device) -> float:
    for _ in range(20):
        fn()
    harness.sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    harness.sync(device)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args()
    device = harness.init_torchrun(args.device)
    group, world = dist.group.WORLD, dist.get_world_size()
    x = torch.randn(world, 1, 4, 16, 8, device=device)
    paths = {
        "all_to_all, functional (autograd)": lambda: comm._wait(fc.all_to_all_single_autograd(x, None, None, group)),
        "all_to_all, ditmesh eager inference": lambda: comm.exchange_chunks(x, group),
        "all_gather, functional (autograd)": lambda: comm._wait(comm._all_gather_autograd(x, 2, group)),
        "all_gather, ditmesh eager inference": lambda: comm.all_gather(x, 2, group),
    }
    samples: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        assert torch.equal(paths["all_to_all, functional (autograd)"](), paths["all_to_all, ditmesh eager inference"]())
        assert torch.equal(paths["all_gather, functional (autograd)"](), paths["all_gather, ditmesh eager inference"]())
        for _ in range(args.rounds):
            for name, fn in paths.items():
                samples[name].append(per_call_us(fn, args.calls, device))
    if dist.get_rank() == 0:
        rows = {name: round(statistics.median(values), 1) for name, values in samples.items()}
        for name, us in rows.items():
            print(f"{name:40s} {us:8.1f} µs per call")
        report = {"command": harness.command(), "device": args.device, "world": world, "torch": torch.__version__,
                  "tensor": list(x.shape), "us_per_call": rows}
        harness.write_results(args.out / f"collective_overhead_{args.device}", report)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
