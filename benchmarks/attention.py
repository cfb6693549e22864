"""Attention latency: local backends, and Ulysses / ring / USP over several ranks.

    python benchmarks/attention.py                       # CPU: small shapes, 2 and 4 gloo ranks
    python benchmarks/attention.py --device cuda --world 2,4,8 --dtype bfloat16 --shapes large

Local rows time one call of each registered backend on the whole sequence (one process).
Parallel rows time one `ditmesh.parallel.attention.attention(ctx=...)` call per rank on that
rank's shard of the image tokens (joint attention, text first, text replicated), i.e. the
attention work plus the all-to-all / ring exchanges, slowest rank, median of the iterations.
Processes: gloo on CPU, NCCL (one GPU each) on CUDA. Prints a table and writes
benchmarks/results/attention_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ditmesh.config import ParallelConfig
from ditmesh.parallel.attention import SequenceContext, attention, available_backends, local_attention, resolve_backend
from ditmesh.parallel.mesh import ParallelMesh

# (batch, heads, image tokens, text tokens, head_dim)
SHAPES = {
    "small": [(1, 8, 1024, 64, 64), (1, 8, 4096, 64, 64)],
    # FLUX.1 at 1024^2 (4096 image + 512 text tokens, 24 heads x 128) and 2048^2 (16384 image).
    "large": [(1, 24, 4096, 512, 128), (1, 24, 16384, 512, 128)],
}


def _time(fn, iters: int, device: str) -> float:
    """Seconds: median of `iters` calls after one warm-up."""
    return harness.median_ms(fn, device, iters, warmup=1) / 1e3


def _inputs(shape, device, dtype, seed=0):
    batch, heads, tokens, text, dim = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(batch, heads, tokens + text, dim, generator=gen, device=device, dtype=dtype) for _ in range(3)]


def backends_on(device: str) -> tuple[str, ...]:
    """The registered local backends that run on `device` (triton: CUDA only)."""
    usable = []
    for name in available_backends():
        try:
            resolve_backend(name, need_lse=False, device_type=device)
        except ValueError:
            continue
        usable.append(name)
    return tuple(usable)


def bench_local(shape, device, dtype, iters) -> list[dict]:
    q, k, v = _inputs(shape, device, dtype)
    rows = []
    for backend in ("auto",) + backends_on(device):
        with torch.no_grad():
            seconds = _time(lambda: local_attention(q, k, v, backend), iters, device)
        rows.append(dict(kind="local", mode=backend, world=1, shape=shape, ms=seconds * 1e3))
        if backend == "auto":  # auto + LSE: what every ring block calls
            with torch.no_grad():
                seconds = _time(lambda: local_attention(q, k, v, "auto", return_lse=True), iters, device)
            rows.append(dict(kind="local", mode="auto+lse", world=1, shape=shape, ms=seconds * 1e3))
    return rows


def _rank_main(rank, world, port, device, dtype, shapes, iters, queue):
    harness.init_rank(rank, world, port, device, bind_device=False)
    dtype = getattr(torch, dtype)
    modes = {f"ulysses={world}": dict(ulysses_degree=world), f"ring={world}": dict(ring_degree=world)}
    if world >= 4:
        modes[f"ring=2,ulysses={world // 2}"] = dict(ring_degree=2, ulysses_degree=world // 2)
    rows = []
    for name, degrees in modes.items():
        config = ParallelConfig(**degrees)
        mesh = ParallelMesh.build(config, device)
        for shape in shapes:
            rows.append(dict(kind="parallel", mode=name, world=world, shape=shape,
                             ms=_time_parallel(mesh, shape, device, dtype, iters) * 1e3))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def _time_parallel(mesh, shape, device, dtype, iters) -> float:
    batch, heads, tokens, text, dim = shape
    size, rank = mesh.size("sequence"), mesh.rank("sequence")
    local_len = -(-tokens // size)
    q, k, v = (t[:, :, : text + local_len].contiguous() for t in _inputs(shape, device, dtype, seed=rank))
    ctx = SequenceContext(mesh.group("sequence"), mesh.group("ulysses"), mesh.group("ring"), "first",
                          num_tokens=tokens, local_len=local_len)
    with torch.no_grad():
        seconds = _time(lambda: attention(q, k, v, ctx=ctx), iters, device)
    slowest = torch.tensor([seconds], device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item()


def bench_parallel(world, device, dtype, shapes, iters) -> list[dict]:
    queue = mp.get_context("spawn").Queue()
    harness.spawn(_rank_main, world, device, dtype, shapes, iters, queue)
    return queue.get(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--world", default="2,4", help="comma-separated rank counts for the parallel rows")
    parser.add_argument("--shapes", default="small", choices=sorted(SHAPES))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention_<device>.json)")
    args = parser.parse_args()

    shapes = SHAPES[args.shapes]
    dtype = getattr(torch, args.dtype)
    rows = [row for shape in shapes for row in bench_local(shape, args.device, dtype, args.iters)]
    for world in (int(w) for w in args.world.split(",") if w):
        if args.device == "cuda" and world > torch.cuda.device_count():
            print(f"skipping world {world}: only {torch.cuda.device_count()} GPUs")
            continue
        rows += bench_parallel(world, args.device, args.dtype, shapes, args.iters)

    print(f"{'kind':9} {'mode':22} {'world':>5} {'shape (B,H,S_img,S_txt,D)':>28} {'ms':>10}")
    for row in rows:
        print(f"{row['kind']:9} {row['mode']:22} {row['world']:>5} {str(tuple(row['shape'])):>28} {row['ms']:>10.2f}")
    name = harness.tag_from(harness.device_name(args.device))
    out = Path(args.out or harness.RESULTS / f"attention_{name}.json")
    meta = dict(device=name, dtype=args.dtype, torch=torch.__version__, host=platform.node(), cpu_count=os.cpu_count(), iters=args.iters)
    harness.write_results(out.with_suffix(""), dict(meta=meta, rows=rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
