"""python benchmarks/pipefusion_schedule.py [--steps 6] [--warmup 1] [--worlds 2 4]

Measures how busy each PipeFusion stage is, per diffusion step, on CPU/gloo ranks: the seconds a
stage spends computing vs waiting for its input (activations from the previous stage, or for
stage 0 the updated latent patch coming back from the last stage). After warm-up the pipeline
should stay full across step boundaries: at the first patch of a step no stage should wait
anything like a whole patch-time. Prints a table and writes
benchmarks/results/pipefusion_schedule.json.

A small FLUX-architecture transformer (8 heads x 32, 4 double + 8 single blocks, 1024 image
tokens), one thread per rank. On a shared 2-core machine, ranks > cores contend for CPU, which
shows up as compute time, not as waiting.
"""

from __future__ import annotations

import argparse
import os
import statistics

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch

from ditmesh.testing import RankPool

LATENT = 64  # latent pixels: 32 x 32 packed FLUX tokens


def _rank_schedule(steps: int, warmup: int) -> dict:
    import torch.distributed as dist
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ditmesh.config import ParallelConfig
    from ditmesh.models.tiny import flux_transformer_inputs, tiny_flux_transformer
    from ditmesh.parallel.mesh import ParallelMesh
    from ditmesh.parallel.pipefusion import PipeFusionTransformer
    from ditmesh.models.flux import FLUX_STAGE_PLAN

    world = dist.get_world_size()
    config = ParallelConfig(pipefusion_degree=world, warmup_steps=warmup)
    mesh = ParallelMesh.build(config)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    model = tiny_flux_transformer(num_heads=8, head_dim=32, num_layers=4, num_single_layers=8)
    denoiser = PipeFusionTransformer(model, FLUX_STAGE_PLAN, mesh.group("pipefusion"), config, scheduler, "first")
    inputs = flux_transformer_inputs(height=LATENT, width=LATENT)
    x = inputs.pop("hidden_states")
    inputs.pop("timestep")
    with torch.no_grad():
        for t in scheduler.timesteps:  # the pipeline's own loop, replaying the pipelined trajectory
            v = denoiser(hidden_states=x, timestep=t.expand(1) / 1000, **inputs)[0]
            x = scheduler.step(v, t, x, return_dict=False)[0]
    return {"stage": mesh.rank("pipefusion"), "items": denoiser.times.items}


def _summarise(world: int, results: list[dict], warmup: int) -> dict:
    """Busy fraction per stage per step, and waits at step boundaries in bottleneck patch-times.

    The slowest stage sets the pace (its median patch compute time = one "patch-time"); faster
    stages wait the difference at every patch. Without cross-step pipelining stage 0 would wait
    about (stages - 1) patch-times at every step start for the pipeline to drain; with it, the
    wait at a step's first patch should be no larger than at the other patches.
    """
    stale = [[it for it in result["items"] if it[0] >= warmup] for result in results]
    patch_time = max(statistics.median(c for *_, c in items) for items in stale)
    stages = []
    for result, items in zip(results, stale):
        steps = sorted({step for step, *_ in result["items"]})
        per_step = []
        for step in steps:
            rows = [(w, c) for s, _, w, c in result["items"] if s == step]
            wait, compute = sum(w for w, _ in rows), sum(c for _, c in rows)
            per_step.append({"step": step, "busy": compute / (wait + compute), "wait_s": wait, "compute_s": compute})
        boundary = [w / patch_time for s, r, w, _ in items if r == 0 and s > warmup]
        inner = [w / patch_time for s, r, w, _ in items if r > 0]
        stages.append({
            "stage": result["stage"], "per_step": per_step,
            "median_patch_compute_s": statistics.median(c for *_, c in items),
            "step_start_wait_max": max(boundary, default=0.0),
            "step_start_wait_mean": statistics.mean(boundary) if boundary else 0.0,
            "other_patch_wait_mean": statistics.mean(inner) if inner else 0.0,
        })
    return {"world": world, "warmup_steps": warmup, "patch_time_s": patch_time, "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    report = {"steps": args.steps, "cpu_count": os.cpu_count(), "runs": []}
    for world in args.worlds:
        with RankPool(world) as pool:
            pool.run(_rank_schedule, 2, 1)  # warm the processes (imports, allocator)
            summary = _summarise(world, pool.run(_rank_schedule, args.steps, args.warmup), args.warmup)
        report["runs"].append(summary)
        print(f"\npipefusion={world}, {args.steps} steps, {args.warmup} warm-up: busy fraction per stage per step")
        print(f"patch-time (slowest stage, median) {1000 * summary['patch_time_s']:.1f} ms")
        print("stage | " + " | ".join(f"step {s['step']}" for s in summary["stages"][0]["per_step"])
              + " | wait at step start: mean / max | wait at other patches: mean  (patch-times)")
        for stage in summary["stages"]:
            busy = " | ".join(f"{s['busy']:.2f}" for s in stage["per_step"])
            print(f"{stage['stage']:5d} | {busy} | {stage['step_start_wait_mean']:.2f} / "
                  f"{stage['step_start_wait_max']:.2f} | {stage['other_patch_wait_mean']:.2f}")
    harness.write_results(harness.RESULTS / "pipefusion_schedule", report)
    print(f"\nwrote {harness.RESULTS / 'pipefusion_schedule.json'}")


if __name__ == "__main__":
    main()
