"""Multi-GPU latency of every ditmesh strategy, FLUX.1-dev and SD3.5-large sized, random weights.

    python benchmarks/multi_gpu.py --worlds 1,2,4,8                       # 8 GPUs, bf16, NCCL, 1024x1024, 28 steps
    python benchmarks/multi_gpu.py --worlds 1 --quick                     # one GPU smoke run (few layers, 4 steps)
    python benchmarks/multi_gpu.py --worlds 1                             # one GPU, full size: the world-1 baseline
    python benchmarks/multi_gpu.py --device cpu --quick --worlds 1,2,4    # CPU + gloo, tiny models: the multi-rank logic
    python benchmarks/multi_gpu.py --worlds 8 --baseline benchmarks/results/multi_gpu_h200.json  # add a world to a report

For each world size W in --worlds (sizes above the visible GPU count are skipped with a note)
the script spawns W processes (no torchrun), initialises torch.distributed (NCCL on CUDA, gloo on
CPU) and runs every case of that size, one after the other, each on a fresh pipeline:

    W=1  serial (FLUX), serial (SD3.5, the cfg baseline)
    W>1  data=W, ulysses=W, ring=W, ulysses=W/2 x ring=2, tensor=W, pipefusion=W (FLUX);
         cfg=2 (SD3.5, W=2), cfg=2 x ulysses=W/2 and cfg=2 x pipefusion=W/2 (SD3.5, W>=4)

Each case builds a real diffusers pipeline (`FluxPipeline` / `StableDiffusion3Pipeline`) whose
transformer has the full-size architecture (FLUX.1-dev: 19+38 blocks, 24 heads x 128; SD3.5-large:
38 blocks, 38 heads x 64) with random bf16 weights made on the GPU from the same seed on every
rank, and tiny random text encoders / VAE sized to fit it (so text lengths, latent shapes and the
scheduler are the real ones; encoders and VAE cost next to nothing), and goes through
`ditmesh.parallelize(pipe, config)`. Measured per case:

* step: one transformer forward (CUDA events, 2 warm-ups, median of --samples >= 5), where the
  wrapped transformer can be called alone (serial, data, ulysses, ring, tensor); cfg and
  pipefusion act across a pipeline call, so their step is loop / steps;
* loop: the denoising loop, `pipe(prompt_embeds=..., output_type="latent")`, --steps steps
  (transformer + scheduler; prompts encoded beforehand), median of --loops;
* e2e: the whole pipeline call from a text prompt to PIL images (tiny encoders and VAE: this is
  the loop plus small overheads, not real-encoder time);
* speed-up vs the world-1 serial run of the same model, efficiency = speed-up / W; data
  parallelism makes W images, so its speed-up is throughput (W images vs one);
* communication share at the largest world: torch.profiler over --profile-steps forwards; NCCL
  kernel time by collective (ulysses' all-to-all shows as SendRecv/AllToAll kernels) / step time;
* rel err of the image-0 latents against the serial run (bf16; pipefusion is approximate by design).

xfuser side by side is not implemented (see docs/multi_gpu.md); the script notes whether it imports.
Writes benchmarks/results/multi_gpu_<tag>.json, .md and .png (matplotlib if present, else a
plain PIL chart).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
import torch.distributed as dist

from harness import FLUX_DEV, PROMPT, QUICK_GPU, SD35_LARGE, TINY_CPU, build_pipeline, median_ms, prompt_embeds


@dataclass(frozen=True)
class Settings:
    """What every rank needs to run the cases (picklable: sent to the spawned ranks)."""

    device_type: str
    dtype: str
    size: int
    steps: int
    samples: int
    loops: int
    profile_steps: int
    text_len: dict[str, int]
    specs: dict[str, dict]
    compile: bool | None = None  # parallelize's `compile` (None: its default, compiled on CUDA)


def settings_from(args: argparse.Namespace) -> Settings:
    if args.device == "cpu":
        specs = TINY_CPU
        size, steps, text_len, dtype = args.size or 128, args.steps or 4, {"flux": 16, "sd3": 16}, "float32"
    else:
        extra = QUICK_GPU if args.quick else {"flux": {}, "sd3": {}}
        specs = {"flux": dict(FLUX_DEV, **extra["flux"]), "sd3": dict(SD35_LARGE, **extra["sd3"])}
        size, steps, text_len, dtype = args.size or 1024, args.steps or (4 if args.quick else 28), {"flux": 512, "sd3": 256}, "bfloat16"
    return Settings(args.device, dtype, size, steps, args.samples, args.loops, args.profile_steps, text_len, specs,
                    compile=False if args.eager else None)


# ---- cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One measured configuration: a strategy name, the model family and the parallel config string."""

    strategy: str
    family: str
    parallel: str


def cases_for(world: int) -> list[Case]:
    """The configurations run at world size `world` (see the module docstring)."""
    if world == 1:
        return [Case("serial", "flux", "serial"), Case("serial", "sd3", "serial")]
    cases = [Case("data", "flux", f"data={world}"), Case("ulysses", "flux", f"ulysses={world}"),
             Case("ring", "flux", f"ring={world}")]
    if world >= 4:
        cases.append(Case("ulysses x ring", "flux", f"ulysses={world // 2},ring=2"))
    cases.append(Case("tensor", "flux", f"tensor={world}"))
    cases.append(Case("cfg", "sd3", "cfg=2") if world == 2 else Case("cfg x ulysses", "sd3", f"cfg=2,ulysses={world // 2}"))
    # PipeFusion last: it hung on NCCL on 2 H200s before its P2P order was made NCCL-safe (issue
    # 14, docs/pipefusion.md); not yet measured on GPUs since, and a hang would end this world's
    # run after --nccl-timeout.
    cases.append(Case("pipefusion", "flux", f"pipefusion={world}"))
    if world >= 4:
        cases.append(Case("cfg x pipefusion", "sd3", f"cfg=2,pipefusion={world // 2}"))
    return cases


def is_hybrid(parallel: str) -> bool:
    return parallel.count("=") > 1


# ---- inputs -------------------------------------------------------------------------------------


def forward_inputs(family: str, spec: dict, settings: Settings, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Keyword inputs of one transformer forward at the benchmark's image size (same on every rank)."""
    gen = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    text = settings.text_len[family] + (0 if family == "flux" else 77)  # SD3: CLIP tokens ++ T5 tokens
    latent = settings.size // 8
    if family == "flux":
        h = w = latent // 2  # packed 2x2
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"), -1)
        return dict(hidden_states=rand(batch, h * w, spec["in_channels"]),
                    encoder_hidden_states=rand(batch, text, spec["joint_attention_dim"]),
                    pooled_projections=rand(batch, spec["pooled_projection_dim"]),
                    timestep=torch.full((batch,), 0.7, device=device, dtype=dtype),
                    guidance=torch.full((batch,), 3.5, device=device, dtype=dtype),
                    img_ids=ids.reshape(-1, 3).to(device), txt_ids=torch.zeros(text, 3, device=device), return_dict=False)
    return dict(hidden_states=rand(batch, spec["in_channels"], latent, latent),
                encoder_hidden_states=rand(batch, text, spec["joint_attention_dim"]),
                pooled_projections=rand(batch, spec["pooled_projection_dim"]),
                timestep=torch.full((batch,), 700.0, device=device, dtype=dtype), return_dict=False)


# ---- timing -------------------------------------------------------------------------------------


def comm_share(fn, device: torch.device, calls: int, step_ms: float) -> dict[str, float]:
    """Fraction of one call's time spent in each kind of collective (profiled over `calls` calls).

    CUDA: NCCL kernel time (it includes waiting for slower peers). CPU/gloo: CPU time of the
    collective as gloo's worker thread records it, enqueue to completion (approximate)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        on_gpu = "cuda" in str(getattr(event, "device_type", "")).lower()
        name = event.name.lower()
        if device.type == "cuda" and not (on_gpu and "nccl" in name):
            continue
        if device.type != "cuda" and not name.startswith("gloo:"):  # gloo's own op spans, on its thread
            continue
        kind = _collective_kind(name)
        if kind:
            totals[kind] = totals.get(kind, 0.0) + event.time_range.elapsed_us() / 1e3
    return {kind: round(ms / calls / step_ms, 4) for kind, ms in sorted(totals.items())}


def _collective_kind(name: str) -> str | None:
    # NCCL runs all-to-all as grouped send/recv: in a ulysses-only case "send_recv" is the all-to-all.
    for kind, keys in (("all_to_all", ("alltoall", "all_to_all")), ("send_recv", ("sendrecv", "send", "recv")),
                       ("all_gather", ("allgather", "all_gather")), ("all_reduce", ("allreduce", "all_reduce")),
                       ("reduce_scatter", ("reducescatter", "reduce_scatter")), ("broadcast", ("broadcast",))):
        if any(key in name for key in keys):
            return kind
    return None


# ---- one rank -------------------------------------------------------------------------------------


@dataclass
class Result:
    """What rank 0 measured for one case."""

    world: int
    strategy: str
    family: str
    parallel: str
    step_ms: float | None = None
    step_source: str = ""
    loop_ms: float | None = None
    e2e_ms: float | None = None
    images: int = 1
    peak_gb: float | None = None
    comm_share: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None
    latent: Any = None  # image 0's latents (CPU fp32), compared with the serial run by the parent


def run_case(case: Case, world: int, settings: Settings, device: torch.device, profile: bool, meshes: dict) -> Result:
    from ditmesh import ParallelConfig, parallelize
    from ditmesh.parallel.mesh import ParallelMesh

    config = ParallelConfig.parse(case.parallel)
    dtype = getattr(torch, settings.dtype)
    spec = settings.specs[case.family]
    result = Result(world, case.strategy, case.family, case.parallel, images=config.data_degree)
    pipe = build_pipeline(case.family, spec, device, dtype)
    embeds = prompt_embeds(pipe, case.family, settings.text_len[case.family], device)
    try:
        # parallelize validates before any collective, so a refused config raises the same
        # ValueError on every rank and all of them move on to the next case together.
        if str(config) not in meshes:
            meshes[str(config)] = ParallelMesh.build(config)
        pipe = parallelize(pipe, config, mesh=meshes[str(config)], compile=settings.compile)
    except ValueError as exc:
        result.skipped = str(exc)
        return result
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    call = dict(height=settings.size, width=settings.size, num_images_per_prompt=config.data_degree,
                max_sequence_length=settings.text_len[case.family])

    outputs = []

    def loop(steps: int = settings.steps):
        outputs[:] = [pipe(**embeds, **call, num_inference_steps=steps, output_type="latent",
                           generator=torch.Generator().manual_seed(0))]

    with torch.no_grad():
        if config.cfg_degree == 1 and config.pipefusion_degree == 1:
            # Per rank: one image (data), the CFG batch of 2 (SD3), the whole sequence (sharded by hooks).
            batch = 2 if case.family == "sd3" else 1
            inputs = forward_inputs(case.family, spec, settings, batch, device, dtype)
            forward = lambda: pipe.transformer(**inputs)  # noqa: E731
            result.step_ms, result.step_source = median_ms(forward, device, settings.samples), "forward"
            if profile:
                result.comm_share = comm_share(forward, device, settings.profile_steps, result.step_ms)
        loop(2)  # warm-up: communicators, kernels, PipeFusion buffers
        result.loop_ms = median_ms(loop, device, settings.loops, warmup=0)
        if result.step_ms is None:
            result.step_ms, result.step_source = result.loop_ms / settings.steps, "loop / steps"
        result.e2e_ms = median_ms(lambda: pipe(prompt=PROMPT, **call, num_inference_steps=settings.steps,
                                               generator=torch.Generator().manual_seed(0)), device, 1, warmup=0)
    if dist.get_rank() == 0:
        result.latent = outputs[0].images[0:1].float().cpu()
    if device.type == "cuda":
        result.peak_gb = harness.peak_gib(device, 2)
    return result


def rank_main(rank: int, world: int, port: int, out_path: str, settings: Settings, timeout_s: float) -> None:
    """Body of each spawned rank: init torch.distributed, run this world's cases; rank 0 saves
    the results after every case (a later crash or hang keeps the earlier ones)."""
    # timeout: NCCL's watchdog aborts a collective stuck this long (a hang ends the world's run).
    device = harness.init_rank(rank, world, port, settings.device_type, timeout_s)
    results, meshes = [], {}
    try:
        for case in cases_for(world):
            if rank == 0:
                Path(out_path + ".running").write_text(f"{case.strategy} ({case.family}, {case.parallel})")
            started = time.perf_counter()
            result = run_case(case, world, settings, device, profile=settings.profile_steps > 0, meshes=meshes)
            if rank == 0:
                print(f"[world {world}] {case.strategy:18s} {case.parallel:22s} {_summary(result)} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
            results.append(result)
            if rank == 0:
                torch.save([asdict(r) for r in results], out_path)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if rank == 0:
            os.remove(out_path + ".running")
    finally:
        dist.destroy_process_group()


def _summary(r: Result) -> str:
    if r.skipped:
        return f"skipped: {r.skipped[:100]}"
    share = f" comm {r.comm_share}" if r.comm_share else ""
    return f"step {r.step_ms:.1f} ms ({r.step_source}), loop {r.loop_ms:.0f} ms, e2e {r.e2e_ms:.0f} ms{share}"


def run_world(world: int, settings: Settings, profile: bool, timeout_s: float, notes: list[str]) -> list[dict]:
    """Spawn `world` ranks, run this world's cases; returns rank 0's results (those finished
    before a failure, which is added to `notes`)."""
    settings = Settings(**{**asdict(settings), "profile_steps": settings.profile_steps if profile else 0})
    rows, error, running = harness.spawn_rows(rank_main, world, settings, timeout_s)
    if error:
        notes.append(f"world {world}: FAILED in {running or 'start-up'}: {error}")
    return rows


# ---- report ---------------------------------------------------------------------------------------


def add_speedups(rows: list[dict]) -> None:
    """Speed-up and efficiency of each row vs the world-1 serial run of its model (per image)."""
    base = {r["family"]: r for r in rows if r["world"] == 1 and not r["skipped"]}
    for row in rows:
        ref = base.get(row["family"])
        ref_latent = ref.get("latent") if ref else None
        if row["world"] > 1 and row.get("latent") is not None and ref_latent is not None and row["latent"].shape == ref_latent.shape:
            diff = (row["latent"] - ref_latent).norm() / ref_latent.norm().clamp_min(1e-12)
            row["rel_err_vs_serial"] = float(diff)
        for metric in ("step_ms", "loop_ms", "e2e_ms"):
            if ref is None or row["skipped"] or not row[metric] or not ref[metric]:
                continue
            # Per image: data parallelism makes `images` images in one call (throughput).
            speedup = ref[metric] * row["images"] / row[metric]
            row[f"speedup_{metric[:-3]}"] = round(speedup, 3)
            row[f"efficiency_{metric[:-3]}"] = round(speedup / row["world"], 3)
    for world in {r["world"] for r in rows}:
        for family in ("flux", "sd3"):
            hybrids = [r for r in rows if r["world"] == world and r["family"] == family and is_hybrid(r["parallel"])
                       and not r["skipped"] and r["loop_ms"]]
            if hybrids:
                min(hybrids, key=lambda r: r["loop_ms"])["best_hybrid"] = True


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# multi_gpu on {env['device']} (torch {env['torch']}, diffusers {env['diffusers']})", "",
             f"Command: `{env['command']}`", "",
             f"{env['size']}x{env['size']}, {env['steps']} steps, {env['dtype']}, random weights; "
             f"FLUX layers {env['flux_layers']}, SD3 layers {env['sd3_layers']}. "
             "step: one transformer forward (median; CUDA events on GPUs) or loop/steps for cfg and pipefusion; "
             "loop: denoising loop from prompt embeddings; e2e: prompt to PIL image with tiny text encoders and "
             "VAE. Speed-up per image vs the world-1 serial run of the same model (data: throughput of W images); "
             "efficiency = speed-up / GPUs.", "",
             "| GPUs | strategy | model | config | step ms | loop s | e2e s | speed-up (loop) | efficiency | "
             "speed-up (step) | comm share of step | rel err vs serial | peak GiB |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in report["results"]:
        if r["skipped"]:
            lines.append(f"| {r['world']} | {r['strategy']} | {r['family']} | {r['parallel']} | skipped: {r['skipped']} |||||||||")
            continue
        best = " (best hybrid)" if r.get("best_hybrid") else ""
        share = ", ".join(f"{k} {v:.0%}" for k, v in r["comm_share"].items())
        lines.append(
            f"| {r['world']} | {r['strategy']}{best} | {r['family']} | {r['parallel']} | {r['step_ms']:.1f} "
            f"({r['step_source']}) | {r['loop_ms'] / 1e3:.2f} | {r['e2e_ms'] / 1e3:.2f} | {_fmt(r.get('speedup_loop'), 'x')} | "
            f"{_fmt(r.get('efficiency_loop'), '%')} | {_fmt(r.get('speedup_step'), 'x')} | {share} | "
            f"{_fmt(r.get('rel_err_vs_serial'), 'e')} | {r['peak_gb'] if r['peak_gb'] is not None else ''} |")
    lines += ["", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return ""
    return {"x": f"{value:.2f}x", "%": f"{value:.0%}", "e": f"{value:.1e}"}[kind]


def plot(report: dict, path: Path) -> str:
    """Speed-up (loop) vs GPUs per strategy and model; returns a note on how it was drawn."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in report["results"]:
        if r.get("speedup_loop"):
            key = "serial" if r["world"] == 1 else f"{r['strategy']} ({r['family']})"
            series.setdefault(key, []).append((r["world"], r["speedup_loop"]))
    for key, points in series.items():
        if key != "serial":
            points.insert(0, (1, 1.0))
    series.pop("serial", None)
    worlds = sorted({r["world"] for r in report["results"]})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_pil(series, worlds, path)
        return "plot drawn with PIL (matplotlib is not installed)"
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(worlds, worlds, "k--", label="ideal")
    for key, points in series.items():
        ax.plot(*zip(*sorted(points)), marker="o", label=key)
    ax.set(xlabel="GPUs", ylabel="speed-up of the denoising loop vs 1 GPU", xticks=worlds, title=report["env"]["tag"])
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return "plot drawn with matplotlib"


def _plot_pil(series: dict[str, list[tuple[int, float]]], worlds: list[int], path: Path) -> None:
    from PIL import Image, ImageDraw

    width, height, pad = 800, 500, 60
    top = max([max(worlds)] + [s for points in series.values() for _, s in points])
    image = Image.new("RGB", (width + 220, height), "white")
    draw = ImageDraw.Draw(image)
    x = lambda w: pad + (w - 1) / max(max(worlds) - 1, 1) * (width - 2 * pad)  # noqa: E731
    y = lambda s: height - pad - s / top * (height - 2 * pad)  # noqa: E731
    draw.line([(pad, height - pad), (width - pad, height - pad)], fill="black")
    draw.line([(pad, pad), (pad, height - pad)], fill="black")
    for w in worlds:
        draw.text((x(w) - 3, height - pad + 8), str(w), fill="black")
    draw.text((width // 2 - 40, height - 25), "GPUs", fill="black")
    draw.text((5, 10), f"speed-up of the denoising loop (max {top:.1f}x)", fill="black")
    draw.line([(x(1), y(1)), (x(max(worlds)), y(max(worlds)))], fill="gray")
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    for i, (key, points) in enumerate(series.items()):
        color = colors[i % len(colors)]
        coords = [(x(w), y(s)) for w, s in sorted(points)]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        for cx, cy in coords:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        draw.text((width + 10, pad + 18 * i), key, fill=color)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="1,2,4,8", help="world sizes, comma-separated (default 1,2,4,8)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="few transformer blocks (GPU) and 4 steps: a smoke run")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; 4 with --quick or on CPU)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; 128 on CPU)")
    parser.add_argument("--samples", type=int, default=5, help="timed transformer forwards per case (median)")
    parser.add_argument("--loops", type=int, default=2, help="timed denoising loops per case (median)")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled forwards at the largest world (0: none)")
    parser.add_argument("--eager", action="store_true",
                        help="no regional compile (parallelize compiles the blocks on CUDA where the layers stay "
                             "whole; the first forward of each case then takes minutes)")
    parser.add_argument("--tag", default=None, help="results file name: multi_gpu_<tag>.{json,md,png}")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--nccl-timeout", type=float, default=300.0,
                        help="seconds a collective may wait before the run of that world is aborted (a hang)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="an earlier multi_gpu_<tag>.json (same sizes) whose rows of the worlds not run now are "
                             "kept (world 1: the baseline), so world sizes can run in separate calls")
    args = parser.parse_args()
    if args.samples < 5:
        parser.error("--samples must be >= 5 (the step time is a median)")
    settings = settings_from(args)
    notes: list[str] = []
    worlds = sorted({int(w) for w in args.worlds.split(",")})
    if args.device == "cuda":
        available = torch.cuda.device_count()
        for world in [w for w in worlds if w > available]:
            print(f"note: world {world} skipped: {available} GPU(s) visible", flush=True)
            notes.append(f"world {world} skipped: only {available} GPU(s) visible")
        worlds = [w for w in worlds if w <= available]
    rows: list[dict] = []
    for world in worlds:
        rows += run_world(world, settings, profile=world == max(worlds) and world > 1, timeout_s=args.nccl_timeout,
                          notes=notes)
    if args.baseline is not None:
        kept = load_baseline(args.baseline, skip_worlds=worlds)
        rows = sorted(kept + rows, key=lambda r: r["world"])
        notes.append(f"rows of worlds {sorted({r['world'] for r in kept})} taken from {args.baseline}")
    notes.append(_xfuser_note())
    add_speedups(rows)
    device_name = harness.device_name(args.device, "CPU (gloo)")
    tag = args.tag or harness.machine_tag(args.device) + ("_quick" if args.quick else "")
    versions = harness.versions()
    env = dict(tag=tag, device=device_name, torch=versions["torch"], diffusers=versions["diffusers"], dtype=settings.dtype,
               size=settings.size, steps=settings.steps, worlds=worlds, command=harness.command(),
               flux_layers=f"{settings.specs['flux']['num_layers']}+{settings.specs['flux']['num_single_layers']}",
               sd3_layers=settings.specs["sd3"]["num_layers"], compiled=settings.compile is not False and args.device == "cuda")
    report = {"env": env, "results": [{k: v for k, v in r.items() if k != "latent"} for r in rows], "notes": notes}
    stem = args.out / f"multi_gpu_{tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    serial_latents = {r["family"]: r["latent"] for r in rows if r["world"] == 1 and r.get("latent") is not None}
    if serial_latents and 1 in worlds:
        torch.save(serial_latents, stem.with_suffix(".latents.pt"))  # for --baseline's error column
    report["notes"].append(plot(report, stem.with_suffix(".png")))
    harness.write_results(stem, report, markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json, .md, .png")


def load_baseline(path: Path, skip_worlds: list[int]) -> list[dict]:
    """Rows of an earlier report for the worlds not run now; world 1's latents when saved next to it."""
    rows = [r for r in json.loads(path.read_text())["results"] if r["world"] not in skip_worlds]
    latents_path = path.with_suffix(".latents.pt")
    latents = torch.load(latents_path) if latents_path.exists() else {}
    for row in rows:
        row["latent"] = latents.get(row["family"]) if row["world"] == 1 else None
    return rows


def _xfuser_note() -> str:
    try:
        import xfuser  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: no side-by-side
        return f"xfuser side by side: skipped, `import xfuser` fails ({type(exc).__name__}: {exc})"
    return "xfuser side by side: xfuser imports, but the side-by-side run is not implemented in this script yet"


if __name__ == "__main__":
    main()
