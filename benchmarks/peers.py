"""torchrun --nproc-per-node 2 benchmarks/peers.py --out benchmarks/results                   # 2 GPUs -> peers_h200_x2.{json,md}
   torchrun --nproc-per-node 2 benchmarks/peers.py --device cpu --tiny --out /tmp/peers      # CPU/gloo proof, tiny FLUX

ditmesh against its peers on W GPUs (W = the world size), one torchrun, one seeded FLUX.1-dev-sized
pipeline. The xDiT rows need xfuser 0.7.0 and its dependencies (`pip install --no-deps
xfuser==0.7.0 yunchang==0.6.4 distvae==0.1.0`); without them those rows say why. The full list
(17 rows, every compile cold) is estimated at 6-9 minutes on 2 H200s; `--frameworks`, `--modes` and
`--append` split it into calls that fit a time limit, into one results file (e.g. `--frameworks
diffusers,ditmesh`, then `--frameworks xfuser --append`; the serial diffusers eager row, the error
reference, runs every time).

What is timed: the denoising loop of a `FluxPipeline` whose transformer has FLUX.1-dev's architecture
(19 + 38 blocks, 24 heads x 128) with random weights from one seed (`harness.random_transformer`:
the same weights on every rank and in every row), from prompt embeddings (random, seeded: 512 text
tokens, the pooled vector and the initial latents are the same on every rank and in every row),
--steps steps (8) at --height x --width (1024²), guidance 3.5, `output_type="latent"`.
step ms = loop / steps, median of --loops loops (CUDA events; max over ranks) after one warm-up loop,
whose wall time is warm-up s (compile, graph capture, communicators). peak GiB:
torch.cuda.max_memory_allocated, reset per row, max over ranks (weights included). rel err =
||x - x_serial|| / ||x_serial|| of the final latents on rank 0 against the serial diffusers eager row.

Rows (framework, config in ParallelConfig's string form; `serial` = one GPU):
* diffusers serial, eager and compiled (`compile_repeated_blocks(fullgraph=True)`), diffusers' default
  attention backend. Every rank runs the same serial loop on its own GPU at the same time.
* ditmesh serial: the single-GPU fast path (`fastpath.apply_fastpath`: fused QKV, cuDNN attention,
  regional compile, each step one CUDA graph), what `parallelize(pipe, ParallelConfig())` does in one
  process (this run has W, so it is called directly), on every rank like the diffusers serial rows.
* diffusers `enable_parallelism(config=ContextParallelConfig(ulysses_degree=W))` and ring_degree=W,
  eager and compiled (`compile_repeated_blocks(fullgraph=True)` after it), attention backend
  `_native_cudnn` on CUDA (its docs' choice; it returns the LSE ring attention needs), `native` on CPU.
* xDiT: `xFuserFluxPipeline` with ulysses_degree=W and ring_degree=W, eager and compiled
  (`use_torch_compile`: its own `torch.compile` of the whole transformer forward), its groups made by its
  own `init_distributed_environment` / `initialize_model_parallel`. xfuser picks its attention backend:
  flash-attn 4 or 3 when installed, else cuDNN (torch's aten op) when torch has cuDNN, else flash-attn 2,
  else torch SDPA; the row's attention column says which it picked.
* ditmesh `parallelize(pipe, ParallelConfig.parse("ulysses=W"), ...)` and ring=W: compiled (the
  default), compiled + `cuda_graphs=True`, eager (`compile=False`); `--ditmesh-configs` adds configs
  with settings (e.g. `ulysses=W,ulysses_head_groups=2`), compared with diffusers CP at their degrees.

On CPU (--device cpu --tiny, fp32, gloo) the rows prove the logic, not speed. Two peer limits show
there: diffusers 0.42.1 puts CP on device `rank % torch.accelerator.device_count()`, which divides by
zero on a CPU-only host, so its CP rows count one accelerator while `enable_parallelism` runs (the row
says so); its `native` attention returns no LSE, so its ring rows fail there (the row says why).

Speed-ups: each row's step against the best single-GPU compiled step (the fastest serial compiled row)
and, for parallel rows, against diffusers CP compiled at the same config.

A row that raises becomes a row with its error and the run goes on: every rank reports to the others
(over a gloo group) after each row, so all ranks skip or go on together. A rank stuck in a collective is
ended by the NCCL watchdog after --nccl-timeout; the results (rewritten after every row, with the row
in progress marked) keep the finished rows. Rows not started before --budget-s are recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
import torch.distributed as dist

from ditmesh import ParallelConfig, parallelize
from ditmesh.parallel import fastpath
from ditmesh.parallel.mesh import ParallelMesh
from harness import FLUX_DEV, GUIDANCE, TINY_CPU, first_line as _first_line, fresh_flux_pipeline as fresh_pipeline
from harness import free as _free, rel_err, timed_ms

harness.cold_compiles()  # every compile cold: warm-up is what a user waits, whatever ran before
FRAMEWORKS = ("diffusers", "xfuser", "ditmesh")
RUNNING = "did not finish: the run ended while this row was running (a hang ended by the watchdog, or a crash)"


@dataclass(frozen=True)
class Row:
    """One measured configuration."""

    framework: str
    config: str  # ParallelConfig string form; "serial" = one GPU
    compiled: bool
    cuda_graphs: bool = False

    @property
    def key(self) -> tuple:
        return (self.framework, self.config, self.compiled, self.cuda_graphs)

    @property
    def mode(self) -> str:
        return "graphs" if self.cuda_graphs else "compiled" if self.compiled else "eager"

    def label(self) -> str:
        mode = {"graphs": "compiled + CUDA graphs"}.get(self.mode, self.mode)
        return f"{self.framework} {self.config} {mode}"


def planned_rows(world: int, cuda: bool, extra: tuple[str, ...] = ()) -> list[Row]:
    """The rows in the order they run: the serial reference first, then the comparisons the issue
    judges (ditmesh vs diffusers CP compiled), xfuser last (the least known, most likely to fail).
    `extra`: more ditmesh configs (e.g. with settings such as ulysses_head_groups), each compiled,
    compiled + CUDA graphs and eager, after ditmesh's own rows of each mode."""
    rows = [Row("diffusers", "serial", False), Row("diffusers", "serial", True), Row("ditmesh", "serial", True, cuda)]
    if world == 1:
        return rows
    ulysses, ring = f"ulysses={world}", f"ring={world}"
    return rows + [
        Row("ditmesh", ulysses, True), Row("diffusers", ulysses, True),
        Row("ditmesh", ring, True), Row("diffusers", ring, True),
        *[Row("ditmesh", config, True) for config in extra],
        Row("ditmesh", ulysses, True, True), Row("ditmesh", ring, True, True),
        *[Row("ditmesh", config, True, True) for config in extra],
        Row("ditmesh", ulysses, False), Row("ditmesh", ring, False),
        *[Row("ditmesh", config, False) for config in extra],
        Row("diffusers", ulysses, False), Row("diffusers", ring, False),
        Row("xfuser", ulysses, False), Row("xfuser", ring, False),
        Row("xfuser", ulysses, True), Row("xfuser", ring, True),
    ]


def degrees_of(config: str) -> str:
    """A config's degrees alone ("ulysses=2,ulysses_head_groups=2" -> "ulysses=2"): the peer
    config it is compared with."""
    if config == "serial":
        return config
    parsed = ParallelConfig.parse(config)
    return str(ParallelConfig(**{f"{axis}_degree": degree for axis, degree in parsed.degrees.items()}))


# ---- shared state of one run ----------------------------------------------------------------------


@dataclass
class Run:
    """What every row needs: settings, device, the fixed inputs, the control group."""

    settings: dict
    device: torch.device
    inputs: dict  # pipeline keyword arguments, identical on every rank and in every row
    control: Any  # gloo group: row outcomes, latents and decisions travel here, apart from NCCL
    fake: bool = False  # --fake-world: this process is rank 0 of a fake process group (one GPU)
    meshes: dict = field(default_factory=dict)  # ditmesh meshes by config, reused by its variants
    reference: torch.Tensor | None = None  # rank 0: final latents of the serial diffusers eager row


def make_inputs(settings: dict, device: torch.device) -> dict:
    """Prompt embeddings and initial latents: random from one CPU seed, so the same on every rank."""
    spec, dtype = settings["spec"], getattr(torch, settings["dtype"])
    gen = torch.Generator().manual_seed(1)
    tokens = (settings["height"] // 16) * (settings["width"] // 16)  # packed 2x2 latents
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    return dict(prompt_embeds=rand(1, settings["text_len"], spec["joint_attention_dim"]),
                pooled_prompt_embeds=rand(1, spec["pooled_projection_dim"]),
                latents=rand(1, tokens, spec["in_channels"]), height=settings["height"], width=settings["width"],
                guidance_scale=GUIDANCE, max_sequence_length=settings["text_len"], output_type="latent")


# ---- the frameworks: each builds its pipeline and returns (loop, info) --------------------------


Loop = Callable[[int], "torch.Tensor | None"]  # steps -> final latents (None on a rank without them)
# A builder returns the row's loop and what to record about it: {"attention": ..., "note": ... (optional)}.


def build_diffusers(row: Row, run: Run) -> tuple[Loop, dict]:
    from diffusers import ContextParallelConfig
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    pipe = fresh_pipeline(run.settings, run.device)
    info = {}
    if row.config == "serial":
        info["attention"] = _AttentionBackendRegistry.get_active_backend()[0].value + " (default)"
    else:
        config = ParallelConfig.parse(row.config)
        info["attention"] = "_native_cudnn" if run.device.type == "cuda" else "native"
        pipe.transformer.set_attention_backend(info["attention"])
        with harness.one_accelerator_on_cpu(run.device) as shimmed:
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(
                ulysses_degree=config.ulysses_degree, ring_degree=config.ring_degree))
        if shimmed:
            info["note"] = ("CPU only: diffusers 0.42.1 puts CP on device rank % torch.accelerator.device_count(), "
                            "0 here (ZeroDivisionError); counted as 1 while enable_parallelism runs")
    if row.compiled:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    return (lambda steps: pipe(**run.inputs, num_inference_steps=steps).images), info


def build_ditmesh(row: Row, run: Run) -> tuple[Loop, dict]:
    pipe = fresh_pipeline(run.settings, run.device)
    cuda = run.device.type == "cuda"
    if row.config == "serial":
        # parallelize's one-process path; called directly because this process group has W ranks.
        pipe = fastpath.apply_fastpath(pipe, compile=row.compiled, cuda_graphs=row.cuda_graphs and cuda)
        attention = "SDPA, cuDNN first" if cuda else "SDPA"
    else:
        config = ParallelConfig.parse(row.config)
        if row.config not in run.meshes:  # collective: every rank builds the same meshes in the same order
            run.meshes[row.config] = ParallelMesh.build(config)
        pipe = parallelize(pipe, config, mesh=run.meshes[row.config], compile=row.compiled, cuda_graphs=row.cuda_graphs)
        attention = "auto (cuDNN)" if cuda else "auto (CPU flash)"
    info = {"attention": attention}
    if row.cuda_graphs and not cuda:
        info["note"] = "CPU: no CUDA graphs, runs as compiled"
    return (lambda steps: pipe(**run.inputs, num_inference_steps=steps).images), info


def build_xfuser(row: Row, run: Run) -> tuple[Loop, dict]:
    try:
        from xfuser import xFuserArgs, xFuserFluxPipeline
        from xfuser.core.distributed import get_runtime_state, init_distributed_environment, initialize_model_parallel
        from xfuser.core.distributed import parallel_state
    except Exception as exc:  # noqa: BLE001 - any import failure means: no xDiT row (same on every rank)
        raise RuntimeError(f"`import xfuser` fails ({type(exc).__name__}: {_first_line(exc)})") from exc
    config, world = ParallelConfig.parse(row.config), dist.get_world_size()
    # xDiT's own groups over the process group this script made (its init reuses it); its groups are
    # module globals, so the previous xDiT row's go first.
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed_environment(rank=dist.get_rank(), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    initialize_model_parallel(sequence_parallel_degree=world, ulysses_degree=config.ulysses_degree,
                              ring_degree=config.ring_degree)
    settings = run.settings
    engine_config, _ = xFuserArgs(model="random-flux-dev", ulysses_degree=config.ulysses_degree,
                                  ring_degree=config.ring_degree, use_torch_compile=row.compiled,
                                  height=settings["height"], width=settings["width"],
                                  num_inference_steps=settings["steps"], max_sequence_length=settings["text_len"],
                                  output_type="latent").create_config()
    pipe = xFuserFluxPipeline(fresh_pipeline(settings, run.device), engine_config)
    attention = get_runtime_state().attention_backend.name
    if attention == "SDPA":
        attention += " (flash-attn and cuDNN absent)"

    def loop(steps: int) -> torch.Tensor | None:
        out = pipe(**run.inputs, num_inference_steps=steps)
        return None if out is None else out.images  # latents on the ranks of xDiT's last data-parallel group

    return loop, {"attention": attention}


BUILDERS = {"diffusers": build_diffusers, "ditmesh": build_ditmesh, "xfuser": build_xfuser}


# ---- one row --------------------------------------------------------------------------------------


def measure(row: Row, run: Run) -> tuple[dict, torch.Tensor | None]:
    """This rank's numbers for `row` and its final latents (collective: every rank calls it)."""
    device, steps = run.device, run.settings["steps"]
    begin = time.perf_counter()
    loop, info = BUILDERS[row.framework](row, run)
    setup_s = time.perf_counter() - begin
    last: list = [None]

    def once() -> None:
        last[0] = loop(steps)

    _barrier(run)
    warmup_s = timed_ms(once, device) / 1e3
    times = []
    for _ in range(run.settings["loops"]):
        _barrier(run)  # the ranks start each loop together
        times.append(timed_ms(once, device))
    out = last[0]
    del loop, last
    local = dict(info, step_ms=statistics.median(times) / steps, warmup_s=warmup_s, setup_s=setup_s,
                 peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    return local, (None if out is None else out.detach().float().cpu())


def run_row(row: Row, run: Run, skip: str | None) -> dict:
    """`row` measured on every rank, as rank 0 records it; an error on any rank becomes the row's
    `error` on all of them, so every rank goes on to the next row."""
    record = _blank(row)
    local, latents, error = None, None, skip
    if run.device.type == "cuda":
        record["resident_gib_before"] = round(torch.cuda.memory_allocated(run.device) / 2**30, 2)  # leak check
        torch.cuda.reset_peak_memory_stats(run.device)
    if skip is None:
        try:
            with torch.no_grad():
                local, latents = measure(row, run)
        except Exception as exc:  # noqa: BLE001 - a failing framework must not end the run
            error = f"{type(exc).__name__}: {_first_line(exc)}"
            print(f"[rank {dist.get_rank()}] {row.label()} failed:\n{traceback.format_exc()}", flush=True)
    _free()
    outcomes: list = [None] * dist.get_world_size()
    _gather_objects(outcomes, (error, local, latents is not None), run)
    errors = [(rank, e) for rank, (e, _, _) in enumerate(outcomes) if e is not None]
    if errors:
        rank, message = errors[0]
        return dict(record, error=message if skip else f"rank {rank}: {message}")
    ranks = [o[1] for o in outcomes]
    record.update({k: ranks[0][k] for k in ("attention", "note") if k in ranks[0]})
    record.update(step_ms=max(r["step_ms"] for r in ranks),
                  warmup_s=max(r["warmup_s"] for r in ranks), setup_s=max(r["setup_s"] for r in ranks),
                  step_ms_ranks=[round(r["step_ms"], 3) for r in ranks])
    peaks = [r["peak_gib"] for r in ranks]
    record.update(peak_gib=max(peaks) if None not in peaks else None, peak_gib_ranks=peaks if None not in peaks else None)
    # The final latents reach rank 0 from the first rank that holds them.
    holder = next((rank for rank, o in enumerate(outcomes) if o[2]), None)
    shared: list = [None] * dist.get_world_size()
    _gather_objects(shared, latents if dist.get_rank() == holder else None, run)
    final = shared[holder] if holder is not None else None
    if row == Row("diffusers", "serial", False):
        run.reference = final
    record["rel_err"] = rel_err(final, run.reference)
    return record


def _barrier(run: Run) -> None:
    if not run.fake:
        dist.barrier(group=run.control)


def _gather_objects(out: list, obj: Any, run: Run) -> None:
    """all_gather_object over the control group; under --fake-world every rank is taken to be
    this one (the fake group moves no data)."""
    if run.fake:
        out[:] = [obj] * len(out)
    else:
        dist.all_gather_object(out, obj, group=run.control)


def init_fake(args: argparse.Namespace) -> torch.device:
    """--fake-world W: this process is rank 0 of W in torch's fake process group (`harness.init_fake`):
    every row runs one rank's whole code path on one GPU, without the exchanges' time."""
    harness.init_fake(args.fake_world)
    if args.device == "cuda":
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _blank(row: Row) -> dict:
    """A row's record before it has numbers (the keys every row has)."""
    return dict(framework=row.framework, config=row.config, compiled=row.compiled, cuda_graphs=row.cuda_graphs,
                step_ms=None, warmup_s=None, peak_gib=None, rel_err=None)


# ---- report ---------------------------------------------------------------------------------------


def add_speedups(rows: list[dict]) -> dict | None:
    """Each row's step against the best single-GPU compiled step and, for parallel rows, against
    diffusers CP compiled at the same config; returns the row of that best single-GPU step."""
    done = [r for r in rows if r.get("step_ms") and not r.get("error")]
    single = [r for r in done if r["config"] == "serial" and r["compiled"]]
    best_row = min(single, key=lambda r: r["step_ms"]) if single else None
    best = best_row["step_ms"] if best_row else None
    cp = {r["config"]: r["step_ms"] for r in done if r["framework"] == "diffusers" and r["config"] != "serial" and r["compiled"]}
    for r in done:
        r["speedup_vs_best_1gpu"] = round(best / r["step_ms"], 3) if best else None
        if r["config"] != "serial":
            peer = degrees_of(r["config"])
            r["speedup_vs_diffusers_cp"] = round(cp[peer] / r["step_ms"], 3) if peer in cp else None
    return best_row


def ordered(rows: list[dict]) -> list[dict]:
    """Display order: diffusers, xfuser, ditmesh; serial, ulysses, ring; eager, compiled, graphs."""
    def key(r):
        kind = 0 if r["config"] == "serial" else 1 if r["config"].startswith("ulysses") else 2
        return FRAMEWORKS.index(r["framework"]), kind, r["config"], r["compiled"], r["cuda_graphs"]
    return sorted(rows, key=key)


def markdown(rows: list[dict], env: dict, best: dict | None) -> str:
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    where = f"one {env['device']}, fake process group of {env['world']}" if env.get("fake") else f"{env['device']} x{env['world']}"
    lines = [f"# ditmesh and its peers on {where}", "",
             f"Command: `{env['command']}`", "",
             f"torch {env['torch']}, diffusers {env['diffusers']}, xfuser {env['xfuser']}; FLUX.1-dev-architecture "
             f"transformer ({env['layers']} blocks, {env['heads']}), random {env['dtype']} weights, "
             f"{env['height']}x{env['width']}, {env['text_len']} text tokens, {env['steps']} steps from prompt "
             f"embeddings. step: loop / steps, median of {env['loops']} loops after one warm-up loop (warm-up s), "
             "max over ranks; peak: max_memory_allocated, max over ranks; rel err: final latents vs diffusers "
             "serial eager (rank 0).", "",
             "| framework | config | compiled | CUDA graphs | attention | step ms | warm-up s | peak GiB | rel err "
             "| vs best 1-GPU compiled | vs diffusers CP compiled | error / note |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        x = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
        lines.append(
            f"| {r['framework']} | {r['config']} | {'yes' if r['compiled'] else 'no'} | {'yes' if r['cuda_graphs'] else 'no'} "
            f"| {r.get('attention', '')} | {fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('warmup_s'), '.1f')} "
            f"| {fmt(r.get('peak_gib'), '.1f')} | {fmt(r.get('rel_err'), '.1e')} | {x(r.get('speedup_vs_best_1gpu'))} "
            f"| {x(r.get('speedup_vs_diffusers_cp'))} | {r.get('error') or r.get('note', '')} |")
    lines += ["", f"Best single-GPU compiled step: {best['step_ms']:.1f} ms ({best['framework']} serial"
              f"{' + CUDA graphs' if best['cuda_graphs'] else ''})." if best else "No single-GPU compiled step.", ""]
    for r in rows:  # the comparison the issue judges: ditmesh vs diffusers CP compiled, same config
        if r["framework"] == "ditmesh" and r["config"] != "serial" and r["compiled"] and r.get("speedup_vs_diffusers_cp"):
            mode = " + CUDA graphs" if r["cuda_graphs"] else ""
            lines.append(f"- ditmesh {r['config']} compiled{mode} vs diffusers CP {degrees_of(r['config'])} compiled: "
                         f"{r['speedup_vs_diffusers_cp']:.2f}x")
    lines += ["", *[f"- {note}" for note in env["notes"]]]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], env: dict, stem: Path) -> None:
    rows = ordered(rows)
    best = add_speedups(rows)
    harness.write_results(stem, rows, markdown(rows, env, best))


def environment(settings: dict, device: torch.device, world: int) -> dict:
    """What the report says about the run: machine, versions, sizes, command, notes."""
    versions = harness.versions()
    spec = settings["spec"]
    notes = ["Serial rows: every rank runs the same serial loop on its own GPU at the same time (max over ranks).",
             "diffusers CP attention: `_native_cudnn` on CUDA (`native` cannot return the LSE ring needs); serial "
             "diffusers rows keep diffusers' default backend.",
             "xDiT: groups from its own init_distributed_environment / initialize_model_parallel; it picks its "
             "attention backend (flash-attn 4/3 if installed, else cuDNN when torch has it, else flash-attn 2, else "
             "torch SDPA): see the attention column. Compiled = its use_torch_compile (whole transformer forward).",
             "Inductor caches off (TORCHINDUCTOR_FX_GRAPH_CACHE=0 ...): every warm-up compiles cold."]
    if device.type == "cpu":
        notes.insert(0, "CPU/gloo: proves the script's logic; the times mean nothing (shared cores, tiny model); "
                        "there are no CUDA graphs on CPU (those rows run as compiled).")
    return dict(device=harness.device_name(device, "CPU (gloo)"), world=world,
                torch=versions["torch"], diffusers=versions["diffusers"], xfuser=versions["xfuser"], dtype=settings["dtype"],
                layers=f"{spec['num_layers']}+{spec['num_single_layers']}",
                heads=f"{spec['num_attention_heads']} heads x {spec['attention_head_dim']}", height=settings["height"],
                width=settings["width"], text_len=settings["text_len"], steps=settings["steps"], loops=settings["loops"],
                command=f"torchrun --nproc-per-node {world} " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                notes=notes + (["world size 1: serial rows only (run with torchrun --nproc-per-node 2 or more)"]
                               if world == 1 else []))


# ---- main -----------------------------------------------------------------------------------------


def settings_from(args: argparse.Namespace) -> dict:
    tiny = args.tiny
    spec = dict(TINY_CPU["flux"]) if tiny else dict(FLUX_DEV)
    size = 128 if tiny else 1024
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    return dict(spec=spec, height=args.height or size, width=args.width or size, steps=args.steps, loops=args.loops,
                text_len=16 if tiny else 512, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny FLUX (2+6 blocks, 4 heads x 16), 128x128: proves the script")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per loop (default 8)")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default 1024; 128 with --tiny)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default 1024; 128 with --tiny)")
    parser.add_argument("--loops", type=int, default=3, help="timed loops per row after the warm-up loop (median)")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                        help="rows of these frameworks (comma-separated); the serial diffusers eager row always runs")
    parser.add_argument("--modes", default="eager,compiled,graphs",
                        help="rows of these modes: eager, compiled, graphs (compiled + CUDA graphs)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="start no row after this many seconds (default 480; skipped rows say so)")
    parser.add_argument("--nccl-timeout", type=float, default=120.0,
                        help="seconds before the watchdog ends a stuck collective (default 120)")
    parser.add_argument("--ditmesh-configs", default="",
                        help="more ditmesh configs, ';'-separated, e.g. 'ulysses=2,ulysses_head_groups=2;ulysses=2,"
                             "ulysses_head_groups=4' (compared with diffusers CP at the same degrees)")
    parser.add_argument("--fake-world", type=int, default=0, metavar="W",
                        help="one process, rank 0 of W in torch's fake process group: one rank's compute and host cost "
                             "on one GPU, exchanges left out (outputs are not the model's: rel err means nothing)")
    parser.add_argument("--append", action="store_true", help="keep the rows of an earlier peers_<tag>.json not run now")
    parser.add_argument("--tag", default=None,
                        help="results file name peers_<tag>.{json,md} (default: h200_x2, cpu_tiny, ...)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args()
    started = time.time()
    fake = args.fake_world > 0
    # NCCL on CUDA (device set, no device_id: xfuser's groups need that), gloo on CPU; or the fake group.
    device = init_fake(args) if fake else harness.init_torchrun(args.device, args.nccl_timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    control = None if fake else dist.new_group(backend="gloo", timeout=timedelta(seconds=args.nccl_timeout))
    settings = settings_from(args)
    run = Run(settings, device, make_inputs(settings, device), control, fake)
    rows = selected_rows(args, world, device.type == "cuda")
    tag = args.tag or harness.machine_tag(device, None if device.type == "cpu" and not fake else world, args.tiny, fake)
    stem = args.out / f"peers_{tag}"
    env = environment(settings, device, world)
    if fake:
        env["fake"] = True
        env["command"] = " ".join(["python3", os.path.relpath(sys.argv[0])] + sys.argv[1:])
        env["notes"].insert(0, f"FAKE PROCESS GROUP: one process on one GPU as rank 0 of {world}; collectives return at "
                               "once and move no data. Each parallel row is one rank's compute and host cost at its "
                               "shapes, the exchanges' time left out; rel err means nothing for parallel rows; serial "
                               "rows are real.")
    done = kept_rows(stem, rows, env) if args.append else []
    for row in rows:
        # Rank 0 decides whether there is time for the row; every rank follows.
        late = time.time() - started > args.budget_s
        verdict = [f"skipped: not started within --budget-s {args.budget_s:.0f}" if late else None]
        if not fake:
            dist.broadcast_object_list(verdict, src=0, group=control)
        if rank == 0:
            write(done + [dict(_blank(row), error=RUNNING)], env, stem)
        tic = time.perf_counter()
        done.append(run_row(row, run, verdict[0]))
        if rank == 0:
            print(f"== {row.label():40s} {_summary(done[-1])} ({time.perf_counter() - tic:.0f} s)", flush=True)
            write(done, env, stem)
    if rank == 0:
        print(stem.with_suffix(".md").read_text())
        print(f"wrote {stem}.json and .md", flush=True)
    dist.destroy_process_group()


def selected_rows(args: argparse.Namespace, world: int, cuda: bool) -> list[Row]:
    """The planned rows of --frameworks and --modes, and always the serial diffusers eager reference."""
    frameworks, modes = set(args.frameworks.split(",")), set(args.modes.split(","))
    extra = tuple(c.strip() for c in args.ditmesh_configs.split(";") if c.strip())
    return [r for r in planned_rows(world, cuda, extra)
            if r.framework in frameworks and r.mode in modes or r == Row("diffusers", "serial", False)]


def kept_rows(stem: Path, rows: list[Row], env: dict) -> list[dict]:
    """--append: the earlier results' rows that this run does not measure again."""
    path = stem.with_suffix(".json")
    if not path.exists():
        return []
    now = {r.key for r in rows}
    kept = [r for r in json.loads(path.read_text()) if (r["framework"], r["config"], r["compiled"], r["cuda_graphs"]) not in now]
    env["notes"].append(f"{len(kept)} rows kept from the earlier {path.name} (--append)")
    return kept


def _summary(record: dict) -> str:
    if record.get("error"):
        return record["error"]
    err = "" if record["rel_err"] is None else f", rel err {record['rel_err']:.1e}"
    return f"step {record['step_ms']:.2f} ms, warm-up {record['warmup_s']:.1f} s{err}"

if __name__ == "__main__":
    main()
