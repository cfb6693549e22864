"""Every strategy at degree 2 against one GPU, eager and compiled: the table of issue 31.

    python3 benchmarks/strategies.py                         # one GPU: each row as rank 0 of 2 (fake process group)
    python3 benchmarks/strategies.py --real                  # >= 2 GPUs: one process per GPU (torch.multiprocessing)
    python3 benchmarks/strategies.py --device cpu --quick    # CPU: the code path of every row, tiny models
    python3 benchmarks/strategies.py --configs ulysses=2,cfg=2 --modes eager

Rows (`--configs`): ulysses=2, ring=2, tensor=2, pipefusion=2, data=2 on a FLUX.1-dev-sized
FluxPipeline and cfg=2 on an SD3.5-large-sized StableDiffusion3Pipeline with guidance (random bf16
weights, 1024², tiny text encoders and VAE: `harness.build_pipeline`), each in every
`--modes` (eager: `compile=False, cuda_graphs=False`; compiled: parallelize's default;
eager-graphs: `compile=False, cuda_graphs=True`, which is also what `compile=False` alone does
now). Every row is just `parallelize(pipe, ParallelConfig.parse(config), compile=...,
cuda_graphs=...)`, so a strategy that raises is a row with its error, not a crash. Per row:

- step_ms: denoising loop / steps (prompt embeddings given), median of --loops, max over ranks;
  data=2 makes one image per rank, so its step_ms is per image (loop / steps / 2);
- serial_step_ms: the same pipeline on one GPU in the same mode (eager: the pipeline as diffusers
  runs it; compiled: parallelize's one-GPU path, compiled blocks + CUDA graphs); for cfg=2 it is
  serial SD3 with guidance (the batch [uncond, cond] in one call);
- diffusers_step_ms: diffusers' own `enable_parallelism` (ulysses, ring; `_native_cudnn`) in the
  same mode (compiled: `compile_repeated_blocks(fullgraph=True)`);
- gpu_busy_ms (eager rows on CUDA): GPU kernel time per step under torch.profiler. On a fake rank
  step_ms - gpu_busy_ms is the time the GPU waited for the host (host-bound share).

kind `fake-rank`: this process is rank 0 of 2 in torch's fake process group, on one GPU. Its
collectives return at once and move nothing: the row measures one rank's compute and host issue
time at its real shapes, not the exchange, nor how two ranks wait on each other (a 2-GPU eager
step can be slower than the fake rank by the NCCL time plus the lock-step waits of two hosts).
kind `real`: `--real` spawns one process per visible GPU (two used) over NCCL.
Writes benchmarks/results/strategies_<tag>.{json,md} (tag: h200, h200_x2, cpu...).
"""

from __future__ import annotations

import harness  # noqa: I001  first: the repository on sys.path, NVLink multicast off

import argparse
import json
import os
import statistics
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ditmesh import ParallelConfig, parallelize
from ditmesh.models.flux import FLUX_DEV_CONFIG
from ditmesh.models.sd3 import SD35_LARGE_CONFIG
from ditmesh.parallel import fastpath
from ditmesh.parallel.mesh import ParallelMesh

OUT_DIR = harness.RESULTS
CONFIGS = ("ulysses=2", "ring=2", "cfg=2", "tensor=2", "pipefusion=2", "data=2")
MODES = ("eager", "compiled", "eager-graphs")
DIFFUSERS_HAS = ("ulysses", "ring")  # strategies diffusers' enable_parallelism offers
FLUX_GUIDANCE, SD3_GUIDANCE = 3.5, 5.0


# ---- models and inputs ----------------------------------------------------------------------


def family_of(config: str) -> str:
    return "sd3" if config.startswith("cfg") else "flux"


def spec_of(family: str, args: argparse.Namespace) -> dict:
    if args.device == "cpu":
        return dict(harness.TINY_CPU[family])
    full = FLUX_DEV_CONFIG if family == "flux" else SD35_LARGE_CONFIG
    return dict(full, **(harness.QUICK_GPU[family] if args.quick else {}))


def fresh_pipeline(family: str, args: argparse.Namespace, device: torch.device) -> Any:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    spec = spec_of(family, args)
    cls = "FluxTransformer2DModel" if family == "flux" else "SD3Transformer2DModel"
    transformer = harness.random_transformer(spec, device, dtype, cls=cls)  # the same weights on every rank
    return harness.build_pipeline(family, spec, device, dtype, transformer=transformer)


def call_inputs(family: str, args: argparse.Namespace, device: torch.device, images: int = 1) -> dict:
    """Prompt embeddings (+ negative ones for SD3's guidance) and initial latents, random from one
    CPU seed (the same on every rank); `images` per call (data=2: one per rank)."""
    spec, size = spec_of(family, args), args.size
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    text = args.text_len
    if family == "flux":
        return dict(prompt_embeds=rand(images, text, spec["joint_attention_dim"]),
                    pooled_prompt_embeds=rand(images, spec["pooled_projection_dim"]),
                    latents=rand(images, (size // 16) ** 2, spec["in_channels"]), height=size, width=size,
                    guidance_scale=FLUX_GUIDANCE, max_sequence_length=text, output_type="latent")
    text = min(text, 256) + 77  # SD3: CLIP tokens ++ T5 tokens (T5 at most 256, as SD3.5 runs it)
    return dict(prompt_embeds=rand(images, text, spec["joint_attention_dim"]),
                negative_prompt_embeds=rand(images, text, spec["joint_attention_dim"]),
                pooled_prompt_embeds=rand(images, spec["pooled_projection_dim"]),
                negative_pooled_prompt_embeds=rand(images, spec["pooled_projection_dim"]),
                latents=rand(images, spec["in_channels"], size // 8, size // 8), height=size, width=size,
                guidance_scale=SD3_GUIDANCE, output_type="latent")


# ---- the three ways a row builds its pipeline ---------------------------------------------------


def build_serial(family: str, mode: str, args, device) -> Any:
    pipe = fresh_pipeline(family, args, device)
    if mode == "eager":
        return pipe  # as diffusers runs it
    # parallelize's one-process path, called directly (this process group has 2 ranks)
    graphs = device.type == "cuda"
    return fastpath.apply_fastpath(pipe, compile=mode == "compiled", cuda_graphs=graphs)


def build_ditmesh(config: str, mode: str, args, device, meshes: dict) -> Any:
    pipe = fresh_pipeline(family_of(config), args, device)
    parsed = ParallelConfig.parse(config)
    if config not in meshes:  # collective: every rank builds the same meshes in the same order
        # the device type given: a fake process group's backend does not say (a CPU mesh would put
        # tensor parallelism's DTensors on the CPU)
        meshes[config] = ParallelMesh.build(parsed, device.type)
    graphs = {"eager": False, "compiled": None, "eager-graphs": True}[mode]  # None: parallelize's default (graphs on CUDA)
    return parallelize(pipe, parsed, mesh=meshes[config], compile=mode == "compiled", cuda_graphs=graphs)


def build_diffusers(config: str, mode: str, args, device) -> Any:
    from diffusers import ContextParallelConfig

    pipe = fresh_pipeline("flux", args, device)
    parsed = ParallelConfig.parse(config)
    pipe.transformer.set_attention_backend("_native_cudnn" if device.type == "cuda" else "native")
    with harness.one_accelerator_on_cpu(device):
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(
            ulysses_degree=parsed.ulysses_degree, ring_degree=parsed.ring_degree))
    if mode == "compiled":
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    return pipe


# ---- timing ---------------------------------------------------------------------------------------


def loop_step_ms(pipe: Any, inputs: dict, args, device: torch.device) -> float:
    """Median over --loops of one call of --steps steps, / steps, after a 2-step warm-up call
    (compile, graph capture), max over ranks (every rank calls this: the calls are collective)."""
    pipe(**inputs, num_inference_steps=2)
    times = []
    for _ in range(args.loops):
        harness.sync(device)
        dist.barrier()
        begin = time.perf_counter()
        pipe(**inputs, num_inference_steps=args.steps)
        harness.sync(device)
        times.append((time.perf_counter() - begin) * 1e3 / args.steps)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest.item())


def gpu_busy_ms(pipe: Any, inputs: dict, args, device: torch.device) -> float | None:
    """GPU kernel time per step (sum over kernels) of one profiled call, or None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pipe(**inputs, num_inference_steps=args.steps)
        harness.sync(device)
    busy_us = sum(e.self_device_time_total for e in prof.key_averages()
                  if e.device_type == torch.autograd.DeviceType.CUDA)
    return busy_us / 1e3 / args.steps


def timed(build: Callable[[], Any], inputs: dict, args, device, busy: bool) -> dict:
    """step_ms (and gpu_busy_ms) of the pipeline `build()` makes, or its error; frees it after."""
    pipe = None
    try:
        pipe = build()
        out = {"step_ms": loop_step_ms(pipe, inputs, args, device)}
        if busy:
            out["gpu_busy_ms"] = gpu_busy_ms(pipe, inputs, args, device)
        return out
    except Exception as exc:  # a strategy that raises is a row with its error, not a crash
        if os.environ.get("STRATEGIES_TRACEBACK"):
            traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {harness.first_line(exc)}"}
    finally:
        del pipe
        harness.free()


# ---- the rows ---------------------------------------------------------------------------------


def run_rows(args: argparse.Namespace, device: torch.device, kind: str, emit: Callable[[dict], None]) -> list[dict]:
    """Every (config, mode) row in order, each with its serial (and diffusers) reference of the same
    mode, measured once per family and mode. Every rank runs the same rows in the same order."""
    rows, serial, meshes = [], {}, {}
    for mode in args.modes:
        busy = mode != "compiled" and device.type == "cuda" and not args.no_busy
        for config in args.configs:
            family = family_of(config)
            images = 2 if config.startswith("data") else 1
            inputs = call_inputs(family, args, device, images)
            if (family, mode) not in serial and mode != "eager-graphs":
                serial[family, mode] = timed(lambda: build_serial(family, mode, args, device),
                                             call_inputs(family, args, device), args, device, busy)
                emit(dict(config=f"serial ({family})", mode=mode, kind=kind, model=family, **serial[family, mode]))
            reference = serial.get((family, "eager" if mode == "eager-graphs" else mode), {})
            row = dict(config=config, mode=mode, kind=kind, model=family, serial_step_ms=reference.get("step_ms"))
            if kind == "fake-rank" and config.startswith("data"):
                # data parallelism gathers the ranks' outputs as pickled objects, which a fake group
                # returns as garbage; its ranks share nothing inside the loop: measure it --real.
                row["error"] = "not measurable as a fake rank (the image gather is an object collective); run --real"
                rows.append(row)
                emit(row)
                continue
            row.update(timed(lambda: build_ditmesh(config, mode, args, device, meshes), inputs, args, device, busy))
            if images > 1 and "step_ms" in row:
                row["step_ms"] /= images  # one image per rank: per-image step
            if config.split("=")[0] in DIFFUSERS_HAS and mode != "eager-graphs" and not args.no_diffusers:
                peer = timed(lambda: build_diffusers(config, mode, args, device), inputs, args, device, busy)
                row["diffusers_step_ms"] = peer.get("step_ms")
                row["diffusers_gpu_busy_ms"] = peer.get("gpu_busy_ms")
                if "error" in peer:
                    row["diffusers_error"] = peer["error"]
            if row.get("step_ms") and row.get("serial_step_ms"):
                row["speedup_vs_serial"] = row["serial_step_ms"] / row["step_ms"]
            rows.append(row)
            emit(row)
    return rows


# ---- process groups ---------------------------------------------------------------------------


def fake_rank(args: argparse.Namespace) -> None:
    harness.init_fake(2)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    done: list[dict] = []

    def emit(row: dict) -> None:  # rows are written as they come: a run cut short keeps them
        print(summary(row), flush=True)
        done.append(row)
        write(done, args, device, tag_of(args, device, real=False), quiet=True)

    run_rows(args, device, "fake-rank", emit)
    write(done, args, device, tag_of(args, device, real=False))
    dist.destroy_process_group()


def real_rank(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    device = harness.init_rank(rank, world, port, args.device)
    done: list[dict] = []

    def emit(row: dict) -> None:
        if rank == 0:
            print(summary(row), flush=True)
            done.append(row)
            write(done, args, device, tag_of(args, device, real=True), quiet=True)

    run_rows(args, device, "real", emit)
    if rank == 0:
        write(done, args, device, tag_of(args, device, real=True))
    dist.destroy_process_group()


def tag_of(args, device: torch.device, real: bool) -> str:
    return harness.machine_tag(device, 2 if real else None) + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")


# ---- output -------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def summary(row: dict) -> str:
    text = f"{row['config']:<14} {row['mode']:<12} {row['kind']:<9} step {_ms(row.get('step_ms')):>7} ms"
    for key in ("serial_step_ms", "diffusers_step_ms", "gpu_busy_ms", "diffusers_gpu_busy_ms"):
        if row.get(key) is not None:
            text += f"  {key.removesuffix('_ms')} {row[key]:.1f}"
    for key in ("error", "diffusers_error"):
        if row.get(key):
            text += f"  {key}: {row[key]}"
    return text


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"# Strategies at degree 2 vs one GPU ({env['device']}, {env['kind']})", "",
             f"Command: `{env['command']}`", "",
             f"torch {env['torch']}, diffusers {env['diffusers']}; {env['models']}; {env['steps']} steps from prompt "
             f"embeddings, step = loop / steps (median of {env['loops']}, max over ranks).", "",
             "| config | mode | kind | step ms | serial step ms | vs serial | diffusers ms | vs diffusers "
             "| GPU busy ms (ours / diffusers) | error |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if r["config"].startswith("serial"):
            continue
        vs_serial = f"{r['speedup_vs_serial']:.2f}x" if r.get("speedup_vs_serial") else ""
        peer = r.get("diffusers_step_ms")
        vs_peer = f"{peer / r['step_ms']:.2f}x" if peer and r.get("step_ms") else ""
        busy = " / ".join(_ms(r.get(k)) for k in ("gpu_busy_ms", "diffusers_gpu_busy_ms") if r.get(k) is not None)
        error = "; ".join(f"{k}: {r[k]}" for k in ("error", "diffusers_error") if r.get(k)).replace("|", "/")
        lines.append(f"| {r['config']} | {r['mode']} | {r['kind']} | {_ms(r.get('step_ms'))} | {_ms(r.get('serial_step_ms'))} "
                     f"| {vs_serial} | {_ms(peer)} | {vs_peer} | {busy} | {error} |")
    serial = [r for r in rows if r["config"].startswith("serial")]
    lines += ["", "Serial references: " + "; ".join(
        f"{r['config']} {r['mode']} {_ms(r.get('step_ms'))} ms" + (f" (GPU busy {r['gpu_busy_ms']:.1f})" if r.get("gpu_busy_ms") else "")
        + (f" ({r['error']})" if r.get("error") else "") for r in serial), ""]
    lines += [f"- {note}" for note in env["notes"]]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], args, device: torch.device, tag: str, quiet: bool = False) -> None:
    """strategies_<tag>.json (rows and environment) and .md, every row (serial references included)."""
    import diffusers

    kind = rows[0]["kind"] if rows else ""
    env = dict(device=harness.device_name(device), kind=kind, command=harness.command(),
               torch=torch.__version__, diffusers=diffusers.__version__, steps=args.steps, loops=args.loops,
               models=("tiny CPU models" if device.type == "cpu" else
                       f"FLUX.1-dev / SD3.5-large-architecture transformers{' (few blocks: --quick)' if args.quick else ''}, "
                       f"random bf16 weights, {args.size}x{args.size}, {args.text_len} text tokens"),
               notes=NOTES_FAKE if kind == "fake-rank" else NOTES_REAL)
    harness.write_results(args.out / f"strategies_{tag}", {"env": env, "rows": rows}, markdown(rows, env))
    if not quiet:
        print(f"wrote {args.out / f'strategies_{tag}.md'}", flush=True)


def merge(paths: list[Path], out_stem: Path) -> None:
    """One table from several runs' JSON files (e.g. the eager rows and the compiled rows, run
    separately to fit a GPU session): rows in file order, the first file's environment, the
    commands joined."""
    reports = [json.loads(p.read_text()) for p in paths]
    env = dict(reports[0]["env"], command="`; `".join(r["env"]["command"] for r in reports))
    rows = [row for r in reports for row in r["rows"]]
    harness.write_results(out_stem, {"env": env, "rows": rows, "merged_from": [p.name for p in paths]}, markdown(rows, env))
    print(f"wrote {out_stem}.md")


NOTES_FAKE = [
    "fake-rank: one process as rank 0 of 2 in torch's fake process group on one GPU. Collectives return at once and "
    "move nothing, so step ms is one rank's compute + host issue time without the exchange; the 2-GPU step adds the "
    "transfers and, in eager, the waits of two hosts in lock-step. It shows whether one rank's work is below the "
    "serial step, not the 2-GPU speed-up.",
    "GPU busy: kernel time per step under torch.profiler; where step ms is well above it the rank is host-bound "
    "(the GPU waits for the Python issue of each op), which on two GPUs turns every collective into a rendezvous "
    "of the two hosts.",
    "data=2: one image per rank, step ms per image (the rank's loop over its image / 2). cfg=2: SD3.5-large with "
    "guidance; its serial reference runs the batch [uncond, cond] in one call.",
]
NOTES_REAL = [
    "real: one process per GPU over NCCL, step = max over ranks.",
    "data=2: one image per rank, step ms per image (loop / steps / 2). cfg=2: SD3.5-large with guidance; its serial "
    "reference (one GPU) runs the batch [uncond, cond] in one call.",
]


def main() -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules ... kept in float32" per built model
    warnings.filterwarnings("ignore", category=UserWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated rows (default {','.join(CONFIGS)})")
    parser.add_argument("--modes", default=None, help="comma-separated of eager, compiled, eager-graphs "
                                                      "(default eager,compiled on CUDA, eager on CPU)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="few blocks (GPU) / tiny models (CPU), 2 steps")
    parser.add_argument("--real", action="store_true", help="one process per GPU (needs >= 2 GPUs; CPU: 2 gloo ranks)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--loops", type=int, default=3)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--text-len", type=int, default=None)
    parser.add_argument("--no-busy", action="store_true", help="skip the profiled call that measures GPU busy time")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers CP rows")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="no run: merge these result files into --out/strategies_<--tag>.{json,md}")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out / f"strategies_{args.tag}")
        return
    cpu = args.device == "cpu"
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.modes = [m.strip() for m in (args.modes or ("eager" if cpu else "eager,compiled")).split(",")]
    if bad := [m for m in args.modes if m not in MODES]:
        raise ValueError(f"unknown mode(s) {bad}; use {', '.join(MODES)}")
    args.steps = args.steps or (2 if args.quick or cpu else 4)
    args.size = args.size or (64 if cpu else 1024)
    args.text_len = args.text_len or (8 if cpu else 512)
    if not args.real:
        fake_rank(args)
        return
    world = 2
    if not cpu and torch.cuda.device_count() < world:
        raise ValueError(f"--real needs 2 GPUs, {torch.cuda.device_count()} visible; drop --real for the fake-rank rows")
    harness.spawn(real_rank, world, args)


if __name__ == "__main__":
    main()
