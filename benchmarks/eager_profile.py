"""Where an eager sequence-parallel FLUX.1-dev step spends its time: torch.profiler over a few
denoising steps of `parallelize(pipe, ParallelConfig.parse(CONFIG), compile=False)`, every rank.

    torchrun --nproc-per-node 2 benchmarks/eager_profile.py ulysses=2 --out benchmarks/results
    torchrun --nproc-per-node 2 benchmarks/eager_profile.py ulysses=2 --device cpu --tiny

`--compiled` profiles the compiled blocks instead (parallelize's default, CUDA graphs off so the
kernels stay visible; `serial` is then the one-GPU fast path), and the GPU time by kernel kind says
where one rank's step exceeds 1/W of the serial step:

    python3 benchmarks/eager_profile.py serial --compiled --fake-world 2
    python3 benchmarks/eager_profile.py ulysses=2 --compiled --fake-world 2

Prints, for rank 0: step wall ms, GPU busy ms per step (sum of kernel time), the host's time per
step spent in Python/dispatch, GPU time by kernel kind (GEMM, attention, fused, copy, collective),
and the top operators by host time and by device time; writes eager_profile_<config>.txt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
import torch.distributed as dist

from ditmesh import ParallelConfig, parallelize
from ditmesh.parallel import fastpath
from harness import FLUX_DEV, TINY_CPU, flux_call_inputs as call_inputs, fresh_flux_pipeline as fresh_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="ParallelConfig string, e.g. ulysses=2")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--nccl-timeout", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--fake-world", type=int, default=0, metavar="W",
                        help="one process as rank 0 of W in torch's fake process group (benchmarks/peers.py): "
                             "one rank's compute and host cost on one GPU, no exchange")
    parser.add_argument("--cprofile", action="store_true", help="also print the top Python functions of one step (cProfile)")
    parser.add_argument("--compiled", action="store_true",
                        help="compile the blocks as parallelize does by default (no CUDA graphs, so the kernels stay "
                             "visible); `serial` then runs the one-GPU fast path (fastpath.apply_fastpath)")
    parser.add_argument("--kernels", default=None, metavar="KIND", choices=[k for k, _ in KINDS] + ["other"],
                        help="also list every kernel of this kind, e.g. 'fused (inductor triton)'")
    parser.add_argument("--graphs", action="store_true", help="with --compiled: replay the denoiser as CUDA graphs")
    parser.add_argument("--gaps", action="store_true",
                        help="list where the GPU sat idle during the profiled steps (from the trace) and what the "
                             "host was running then")
    args = parser.parse_args()
    if args.fake_world:
        harness.init_fake(args.fake_world)
        device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        device = harness.init_torchrun(args.device, args.nccl_timeout)
    tiny = args.tiny
    settings = dict(spec=dict(TINY_CPU["flux"]) if tiny else dict(FLUX_DEV), size=128 if tiny else 1024,
                    text_len=16 if tiny else 512, dtype="float32" if device.type == "cpu" else "bfloat16")
    pipe = fresh_pipeline(settings, device)
    inputs = call_inputs(pipe, settings, device)
    if args.config == "serial" and args.compiled:
        pipe = fastpath.apply_fastpath(pipe, compile=True, cuda_graphs=args.graphs)
    elif args.config != "serial":
        pipe = parallelize(pipe, ParallelConfig.parse(args.config), compile=args.compiled, cuda_graphs=args.graphs)
    pipe(**inputs, num_inference_steps=2)  # warm-up (and compile)
    sync = lambda: harness.sync(device)  # noqa: E731
    sync()
    start = time.perf_counter()
    pipe(**inputs, num_inference_steps=args.steps)
    sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        pipe(**inputs, num_inference_steps=args.steps)
        sync()
    if args.cprofile and dist.get_rank() == 0:
        python_profile(lambda: (pipe(**inputs, num_inference_steps=1), sync()))
    if dist.get_rank() == 0:
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        world = f"fake{args.fake_world}" if args.fake_world else f"x{dist.get_world_size()}"
        mode = ("compiled" + (" + CUDA graphs" if args.graphs else "")) if args.compiled else "eager"
        lines = [f"{args.config} {mode} on {device.type} {world}: step wall {wall_ms:.1f} ms, "
                 f"GPU kernels {device_us / 1e3 / args.steps:.1f} ms per step (sum over kernels)", "",
                 "GPU kernel time per step by kind (ms; count = kernels per step):",
                 kernel_kinds(events, args.steps, args.kernels), "",
                 *([idle_gaps(prof, args.steps), ""] if args.gaps and device.type == "cuda" else []),
                 "top by host (self CPU) time:", events.table(sort_by="self_cpu_time_total", row_limit=25), "",
                 "top by device time:", events.table(sort_by="self_device_time_total", row_limit=25)
                 if device.type == "cuda" else ""]
        text = "\n".join(lines)
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        name = (args.config.replace('=', '').replace(',', '_') + ("_compiled" if args.compiled else "")
                + ("_graphs" if args.graphs else "")
                + (f"_fake{args.fake_world}" if args.fake_world else ""))
        (args.out / f"eager_profile_{name}.txt").write_text(text)
    dist.destroy_process_group()


# Kernel name fragments per kind, first match wins (cuBLAS on Hopper: nvjet/sm90 xmma; cuDNN SDPA: cudnn).
KINDS = (("collective", ("nccl",)),
         ("fused (inductor triton)", ("triton",)),
         ("attention", ("cudnn", "flash", "fmha", "attention", "sdpa")),
         ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "sm90_")),
         ("copy", ("memcpy", "copy", "cat", "memset")))


def kernel_kinds(events, steps: int, listed: str | None = None) -> str:
    """GPU self time per step summed by kernel kind (KINDS), with each kind's biggest kernel;
    every kernel of kind `listed` is listed after the table."""
    totals: dict[str, list] = {}
    listing: list[tuple[float, float, str]] = []
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CUDA or not event.self_device_time_total:
            continue
        name = event.key.lower()
        kind = next((k for k, frags in KINDS if any(f in name for f in frags)), "other")
        entry = totals.setdefault(kind, [0.0, 0, ("", 0.0)])
        entry[0] += event.self_device_time_total
        entry[1] += event.count
        if event.self_device_time_total > entry[2][1]:
            entry[2] = (event.key[:70], event.self_device_time_total)
        if kind == listed:
            listing.append((event.self_device_time_total / 1e3 / steps, event.count / steps, event.key[:110]))
    rows = [f"  {kind:<24} {us / 1e3 / steps:8.2f} ms  count {n / steps:7.0f}  top: {top[0]} ({top[1] / 1e3 / steps:.2f} ms)"
            for kind, (us, n, top) in sorted(totals.items(), key=lambda kv: -kv[1][0])]
    total = sum(v[0] for v in totals.values())
    rows.append(f"  {'total':<24} {total / 1e3 / steps:8.2f} ms")
    if listed:
        rows += [f"kernels of kind {listed!r} (ms per step, calls per step):"]
        rows += [f"  {ms:7.3f} ms {n:5.0f}x  {name}" for ms, n, name in sorted(listing, reverse=True)]
    return "\n".join(rows)


def idle_gaps(prof, steps: int, top: int = 12) -> str:
    """GPU idle time per step between the first and the last kernel of the profiled calls, and
    the longest idle spans with the kernels around them and the host ops running meanwhile."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())["traceEvents"]
    gpu = sorted((e for e in trace if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    host = [e for e in trace if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e]
    gaps, end, before = [], gpu[0]["ts"], gpu[0]["name"]
    for e in gpu:
        if e["ts"] > end:
            gaps.append((e["ts"] - end, end, before, e["name"]))
        if e["ts"] + e["dur"] >= end:
            end, before = e["ts"] + e["dur"], e["name"]
    idle = sum(g[0] for g in gaps)
    lines = [f"GPU idle between kernels: {idle / 1e3 / steps:.2f} ms per step ({len(gaps) / steps:.0f} gaps per step); "
             f"spans over 50 us: {sum(g[0] for g in gaps if g[0] > 50) / 1e3 / steps:.2f} ms per step. Longest:"]
    for length, start, left, right in sorted(gaps, reverse=True)[:top]:
        mid = start + length / 2
        running = sorted((e for e in host if e["ts"] <= mid <= e["ts"] + e["dur"]), key=lambda e: -e["dur"])
        lines.append(f"  {length:8.0f} us after {left[:40]!r} before {right[:40]!r}; host in: "
                     + " > ".join(e["name"][:40] for e in running[:5]))
    return "\n".join(lines)


def python_profile(step) -> None:
    """Top Python functions of one call of `step` by own time and by cumulative time (host side)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(step)
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(30)
        print(f"cProfile, one step, by {order}:\n" + text.getvalue(), flush=True)


if __name__ == "__main__":
    main()
