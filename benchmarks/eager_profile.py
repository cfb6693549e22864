"""Where an eager sequence-parallel FLUX.1-dev step spends its time: torch.profiler over a few
denoising steps of `parallelize(pipe, ParallelConfig.parse(CONFIG), compile=False)`, every rank.

    torchrun --nproc-per-node 2 benchmarks/eager_profile.py ulysses=2 --out benchmarks/results
    torchrun --nproc-per-node 2 benchmarks/eager_profile.py ulysses=2 --device cpu --tiny

Prints, for rank 0: step wall ms, GPU busy ms per step (sum of kernel time), the host's time per
step spent in Python/dispatch, and the top operators by host time and by device time; writes
eager_profile_<config>.txt.
"""

from __future__ import annotations

import os

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.multi_gpu import TINY_CPU  # noqa: E402
from benchmarks.peers import init_fake  # noqa: E402
from benchmarks.pipefusion_nccl import call_inputs, fresh_pipeline, init  # noqa: E402
from ditmesh import ParallelConfig, parallelize  # noqa: E402
from ditmesh.models.flux import FLUX_DEV_CONFIG  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="ParallelConfig string, e.g. ulysses=2")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--nccl-timeout", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--fake-world", type=int, default=0, metavar="W",
                        help="one process as rank 0 of W in torch's fake process group (benchmarks/peers.py): "
                             "one rank's compute and host cost on one GPU, no exchange")
    parser.add_argument("--cprofile", action="store_true", help="also print the top Python functions of one step (cProfile)")
    args = parser.parse_args()
    device = init_fake(args) if args.fake_world else init(args)
    tiny = args.tiny
    settings = dict(spec=dict(TINY_CPU["flux"]) if tiny else dict(FLUX_DEV_CONFIG), size=128 if tiny else 1024,
                    text_len=16 if tiny else 512, dtype="float32" if device.type == "cpu" else "bfloat16")
    pipe = fresh_pipeline(settings, device)
    inputs = call_inputs(pipe, settings, device)
    if args.config != "serial":
        pipe = parallelize(pipe, ParallelConfig.parse(args.config), compile=False)
    pipe(**inputs, num_inference_steps=2)  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
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
        lines = [f"{args.config} on {device.type} {world}: step wall {wall_ms:.1f} ms, "
                 f"GPU kernels {device_us / 1e3 / args.steps:.1f} ms per step (sum over kernels)", "",
                 "top by host (self CPU) time:", events.table(sort_by="self_cpu_time_total", row_limit=25), "",
                 "top by device time:", events.table(sort_by="self_device_time_total", row_limit=25)
                 if device.type == "cuda" else ""]
        text = "\n".join(lines)
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        name = args.config.replace('=', '').replace(',', '_') + (f"_fake{args.fake_world}" if args.fake_world else "")
        (args.out / f"eager_profile_{name}.txt").write_text(text)
    dist.destroy_process_group()


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
