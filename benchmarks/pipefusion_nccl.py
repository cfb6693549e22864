"""PipeFusion on NCCL: ditmesh pipefusion=W (patches 2, 4, 8; warm-up 1) vs serial vs xDiT, FLUX.1-dev sized.

    torchrun --nproc-per-node 2 benchmarks/pipefusion_nccl.py --out benchmarks/results      # 2 GPUs
    torchrun --nproc-per-node 2 benchmarks/pipefusion_nccl.py --device cpu --tiny           # CPU/gloo, tiny model

To debug a hang, add NCCL's own tracing to the command's environment, e.g.
`TORCH_NCCL_TRACE_BUFFER_SIZE=2000 TORCH_NCCL_DUMP_ON_TIMEOUT=1 NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=P2P`;
`--nccl-timeout` (default 60 s) is the watchdog's limit.

Every rank builds the same pipeline: a FluxPipeline whose transformer has FLUX.1-dev's architecture
(19 + 38 blocks, 24 heads x 128; `ditmesh.models.flux.FLUX_DEV_CONFIG`) with random bf16 weights
(built on the meta device, materialised on the GPU, filled from one seed), and tiny text encoders
and VAE (`harness.build_pipeline`; the prompt is encoded once, the loop gets
the embeddings). All runs start from the same initial latents (1024x1024, 28 steps, guidance 3.5)
and return the final latents (`output_type="latent"`). Rows:

* serial: the plain diffusers pipeline, every rank alone on its own GPU (rank 0's time);
* ditmesh pipefusion=W, pipefusion_patches 2, 4, 8, warmup_steps 1: `parallelize(pipe, config)`;
* xDiT (xfuser) pipefusion_parallel_degree=W with the same patches and warm-up, its groups made by
  its own `init_distributed_environment` / `initialize_model_parallel`; a row saying why when
  `import xfuser` fails (it needs xfuser 0.7.0 and its dependencies yunchang and distvae).

Each row: step ms (the denoising loop / steps, median of --loops after a 2-step warm-up call; CUDA
events, max over ranks) and PSNR of its final latents vs serial (peak = the serial latents' range).
All eager: no torch.compile in any row. Writes benchmarks/results/pipefusion_<machine>.json and
.md (machine e.g. h200_x2; --tag overrides) and prints the table.
"""

from __future__ import annotations

import argparse
import faulthandler
import math
import statistics
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
import torch.distributed as dist

from ditmesh import ParallelConfig, parallelize
from harness import FLUX_DEV, TINY_CPU, flux_call_inputs as call_inputs, fresh_flux_pipeline as fresh_pipeline
# ---- timing and comparison --------------------------------------------------------------------


def loop_ms(run: Callable[[int], Any], device: torch.device, steps: int, loops: int) -> tuple[float, Any]:
    """Median wall time of `run(steps)` over `loops` calls after a 2-step warm-up call, max over
    ranks (every rank calls this: the runs are collective); and the last call's output."""
    run(2)
    times, out = [], None
    for _ in range(loops):
        harness.sync(device)
        dist.barrier()
        begin = time.perf_counter()
        out = run(steps)
        harness.sync(device)
        times.append((time.perf_counter() - begin) * 1e3)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest.item()), out


def psnr(latents: torch.Tensor | None, reference: torch.Tensor) -> float | None:
    """PSNR (dB) of `latents` vs `reference`, peak = the reference's range; None if absent or
    of another shape; inf if equal."""
    if latents is None or tuple(latents.shape) != tuple(reference.shape):
        return None
    latents, reference = latents.float().cpu(), reference.float().cpu()
    mse = torch.mean((latents - reference) ** 2).item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def shared_row(row: dict, holder: bool) -> dict:
    """The row as the rank holding the output (`holder`) filled it, on every rank."""
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row if holder else None)
    return next(r for r in rows if r is not None)


# ---- the rows ---------------------------------------------------------------------------------


def serial_row(settings: dict, device: torch.device) -> tuple[dict, torch.Tensor]:
    pipe = fresh_pipeline(settings, device)
    inputs = call_inputs(pipe, settings, device)
    ms, out = loop_ms(lambda steps: pipe(**inputs, num_inference_steps=steps).images, device,
                      settings["steps"], settings["loops"])
    reference = out.float().cpu()
    _free(pipe)
    return {"impl": "serial (diffusers, one device)", "config": "serial", "step_ms": ms / settings["steps"],
            "psnr_db": math.inf}, reference


def ditmesh_row(settings: dict, device: torch.device, patches: int, reference: torch.Tensor) -> dict:
    world = dist.get_world_size()
    text = f"pipefusion={world},pipefusion_patches={patches},warmup_steps=1"
    row = {"impl": "ditmesh", "config": text}
    pipe = fresh_pipeline(settings, device)
    inputs = call_inputs(pipe, settings, device)
    pipe = parallelize(pipe, ParallelConfig.parse(text))
    ms, out = loop_ms(lambda steps: pipe(**inputs, num_inference_steps=steps).images, device,
                      settings["steps"], settings["loops"])
    row.update(step_ms=ms / settings["steps"], psnr_db=psnr(out, reference))  # every rank holds the latents
    _free(pipe)
    return row


def xdit_row(settings: dict, device: torch.device, patches: int, reference: torch.Tensor) -> dict:
    world = dist.get_world_size()
    row = {"impl": "xDiT (xfuser)", "config": f"pipefusion_parallel_degree={world},num_pipeline_patch={patches},"
                                              "warmup_steps=1"}
    try:
        from xfuser import xFuserArgs, xFuserFluxPipeline
        from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel
        from xfuser.core.distributed import model_parallel_is_initialized
    except Exception as exc:  # noqa: BLE001 - any import failure means: no xDiT row
        return dict(row, skipped=f"`import xfuser` fails ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
    row["impl"] = f"xDiT (xfuser {version('xfuser')})"
    # xDiT's own groups, over the process group this script made (its init reuses it).
    init_distributed_environment(rank=dist.get_rank(), world_size=world)
    if not model_parallel_is_initialized():
        initialize_model_parallel(pipeline_parallel_degree=world)
    engine_config, _ = xFuserArgs(model="random-flux-dev", pipefusion_parallel_degree=world,
                                  num_pipeline_patch=patches, warmup_steps=1, height=settings["size"],
                                  width=settings["size"], num_inference_steps=settings["steps"],
                                  max_sequence_length=settings["text_len"], output_type="latent").create_config()
    plain = fresh_pipeline(settings, device)
    inputs = call_inputs(plain, settings, device)
    pipe = xFuserFluxPipeline(plain, engine_config)
    ms, out = loop_ms(lambda steps: _images(pipe(**inputs, num_inference_steps=steps)), device,
                      settings["steps"], settings["loops"])
    holder = out is not None  # xDiT returns the latents on its last pipeline stage only
    row.update(step_ms=ms / settings["steps"], psnr_db=psnr(out, reference) if holder else None)
    _free(pipe, plain)
    return shared_row(row, holder)


def _images(output: Any) -> torch.Tensor | None:
    return None if output is None else output.images


def _free(*objects: Any) -> None:
    del objects
    harness.free()


def safely(make_row: Callable[[], dict], name: str, errors: tuple = (ValueError,)) -> dict:
    """A row, or a row saying why it failed. Only errors every rank raises alike belong in
    `errors` (a refused config, xDiT not fitting this diffusers), so the ranks stay in step; a
    hang is ended by the NCCL watchdog."""
    try:
        return make_row()
    except errors as exc:
        return {"impl": name, "config": "", "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


# ---- report -----------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    env = report["env"]
    serial_ms = report["rows"][0]["step_ms"]
    lines = [f"# PipeFusion on {env['device']} x{env['world']} ({env['backend']}; torch {env['torch']})", "",
             f"Command: `{env['command']}`", "",
             f"FLUX.1-dev-architecture transformer ({env['layers']} blocks, {env['width']}), random {env['dtype']} weights, "
             f"{env['size']}x{env['size']}, {env['steps']} steps, eager. step: denoising loop / steps (median of "
             f"{env['loops']}, max over ranks); PSNR of the final latents vs serial (peak: the serial latents' range).",
             "", *harness.table(("implementation", "config", "step ms", "speed-up vs serial", "PSNR vs serial (dB)"),
                                [_cells(row, serial_ms) for row in report["rows"]], "llrrr")]
    return "\n".join(lines + [""] + [f"- {note}" for note in report["notes"]]) + "\n"


def _cells(row: dict, serial_ms: float) -> tuple:
    if row.get("skipped"):
        return row["impl"], row["config"], f"skipped: {row['skipped']}", "", ""
    speedup = serial_ms / row["step_ms"] if row["step_ms"] else None
    value = row["psnr_db"]
    shown = "" if value is None else ("exact" if math.isinf(value) else f"{value:.1f}")
    return row["impl"], row["config"], f"{row['step_ms']:.1f}", harness.fmt(speedup, ".2f") + ("x" if speedup else ""), shown


# ---- main -------------------------------------------------------------------------------------


def settings_from(args: argparse.Namespace) -> dict:
    if args.tiny:
        spec = dict(TINY_CPU["flux"])
        return dict(spec=spec, size=args.size or 128, steps=args.steps or 4, text_len=16, loops=args.loops,
                    dtype="float32" if args.device == "cpu" else "bfloat16")
    return dict(spec=dict(FLUX_DEV), size=args.size or 1024, steps=args.steps or 28, text_len=512,
                loops=args.loops, dtype="bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny widths, 128x128, 4 steps: proves the script runs")
    parser.add_argument("--patches", default="2,4,8", help="pipefusion_patches to run, comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; 4 with --tiny)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; 128 with --tiny)")
    parser.add_argument("--loops", type=int, default=3, help="timed denoising loops per row (median)")
    parser.add_argument("--no-xdit", action="store_true", help="leave out the xDiT rows")
    parser.add_argument("--no-ditmesh", action="store_true", help="leave out the ditmesh rows (e.g. xDiT alone)")
    parser.add_argument("--row-timeout-s", type=float, default=0.0,
                        help="a PipeFusion row running longer than this: every rank prints its stacks and exits "
                             "(the report then marks the row as not finished)")
    parser.add_argument("--stack-dump-s", type=float, default=0.0,
                        help="every this many seconds, each rank prints its Python stacks (faulthandler): where a hang sits")
    parser.add_argument("--nccl-timeout", type=float, default=60.0, help="seconds before the watchdog aborts a stuck collective")
    parser.add_argument("--tag", default=None, help="results file name: pipefusion_<tag>.{json,md}")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args()
    if args.stack_dump_s > 0:
        faulthandler.dump_traceback_later(args.stack_dump_s, repeat=True)
    device = harness.init_torchrun(args.device, args.nccl_timeout)  # no device_id: xDiT's groups need lazy NCCL set-up
    world, rank = dist.get_world_size(), dist.get_rank()
    settings = settings_from(args)
    patches = [int(p) for p in args.patches.split(",")]
    notes = []
    if device.type == "cpu":
        notes.append("CPU/gloo: proves the script and the schedule run; the times mean nothing (shared cores)")
    serial, reference = serial_row(settings, device)
    rows = [serial]
    if world == 1:
        notes.append("world size 1: no PipeFusion rows (run with torchrun --nproc-per-node 2 or more)")
    runs = ([("ditmesh", count) for count in patches if not args.no_ditmesh]
            + [("xDiT", count) for count in patches if not args.no_xdit])
    for impl, count in runs if world > 1 else []:
        if rank == 0:  # the row as it stands if the process ends inside it (a hang ended by a limit)
            write_report(args, settings, device, world, rows + [dict(impl=impl, config=f"{count} patches", skipped=(
                "did not finish: the process ended while this row ran (a hang or a time limit; "
                "--stack-dump-s shows where)"))], notes)
        if args.row_timeout_s > 0:  # every rank: print the stacks and exit if the row takes longer
            faulthandler.dump_traceback_later(args.row_timeout_s, exit=True)
        if impl == "ditmesh":
            rows.append(safely(lambda: ditmesh_row(settings, device, count, reference), impl))
        else:
            rows.append(safely(lambda: xdit_row(settings, device, count, reference), impl, (Exception,)))
        if args.row_timeout_s > 0:
            faulthandler.cancel_dump_traceback_later()
            if args.stack_dump_s > 0:
                faulthandler.dump_traceback_later(args.stack_dump_s, repeat=True)
        if rank == 0:
            print(f"{impl} pipefusion={world}, {count} patches: {rows[-1]}", flush=True)
            write_report(args, settings, device, world, rows, notes)  # after every row: a later hang keeps these
        if rows[-1].get("skipped", "").startswith("`import xfuser` fails"):
            break  # one row says it
    if rank == 0:
        write_report(args, settings, device, world, rows, notes)
    dist.destroy_process_group()


def write_report(args, settings: dict, device: torch.device, world: int, rows: list[dict], notes: list[str]) -> None:
    spec, versions = settings["spec"], harness.versions()
    env = dict(device=harness.device_name(device, "CPU"), world=world,
               backend=dist.get_backend(), torch=versions["torch"], diffusers=versions["diffusers"],
               dtype=settings["dtype"], size=settings["size"], steps=settings["steps"], loops=settings["loops"],
               layers=f"{spec['num_layers']}+{spec['num_single_layers']}",
               width=f"{spec['num_attention_heads']} heads x {spec['attention_head_dim']}",
               command=harness.command())
    report = {"env": env, "rows": rows, "notes": notes}
    stem = args.out / f"pipefusion_{args.tag or harness.machine_tag(device, world, args.tiny)}"
    finite = [{k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()} for row in rows]
    harness.write_results(stem, dict(report, rows=finite), markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json and .md", flush=True)


if __name__ == "__main__":
    main()
