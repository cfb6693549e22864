"""python benchmarks/tp_step.py --out benchmarks/results                 # one H200 -> tp_step_h200.{json,md}
   python benchmarks/tp_step.py --device cpu --quick --out /tmp/tp      # CPU: proves the script (tiny FLUX)

One rank of tensor=2 and of pipefusion=2, compiled, against the serial compiled step, on ONE GPU:
the process is rank r of torch's fake process group of 2, whose collectives return at once and move
no data (and which cannot do P2P). So each row is one rank's compute and host cost at its shapes,
the exchanges' time left out (tensor=2: ~28 MB all-reduced per row-wise layer, a few ms per step
on NVLink; docs/tensor.md). Outputs of fake-group rows are not the model's.

Rows (FLUX.1-dev architecture, random bf16 weights, 1024², 512 text tokens, one transformer forward):
* serial compiled + CUDA graphs: what `parallelize(pipe, ParallelConfig())` does on one GPU;
* tensor=2 rank 0: `parallelize(transformer, tensor=2)` with compile=False (eager), then compiled
  (the default) without and with CUDA graphs (`graphs.GraphedDenoiser`, what cuda_graphs=None
  adds), with peak GiB (max_memory_allocated during the forwards, weights included);
* pipefusion=2, stage 0 and stage 1 (rank 0, then rank 1 of a new fake group): the stage's own
  compiled blocks (`parallelize(pipe, pipefusion=2)`) run through `Stage.compute` on each patch of
  one denoising step (--patches), as the stage loop calls them; per step: the patches' GPU time
  (CUDA events) and the host time to issue them. A stage's step in the full pipeline adds its
  P2P transfers (not measured here) to the slower stage's compute.
step ms: median of --samples after warm-up (compile) calls (`harness.median_ms`); host ms: median of
--samples more calls, each issued after a sync (`harness.host_ms`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch

from ditmesh import ParallelConfig, parallelize
from ditmesh.models.flux import FLUX_STAGE_PLAN
from ditmesh.parallel import fastpath, graphs
from ditmesh.parallel.mesh import ParallelMesh
from ditmesh.parallel.pipefusion.schedule import build_items
from harness import FLUX_DEV, TINY_CPU


def timed(fn, device, samples: int, warmup: int = 2) -> tuple[float, float]:
    """(median ms of `fn` by CUDA events, or wall ms on CPU; median host ms to issue it)."""
    return harness.median_ms(fn, device, samples, warmup), harness.host_ms(fn, device, samples)


def flux_call(spec: dict, size: int, text_len: int, device, dtype) -> dict:
    """One transformer call's keyword arguments at `size`² (packed 2x2 latents), seeded."""
    torch.manual_seed(1)
    return harness.flux_inputs(1, size // 16, size // 16, text_len, spec, device, dtype)


def fresh(device) -> None:
    """Before a row's timed calls: what earlier rows left dropped, peak memory counted from here."""
    harness.free()
    harness.reset_peak(device)


# ---- rows -----------------------------------------------------------------------------------------


def serial_row(s: dict) -> dict:
    with harness.fake_group(1):  # (unused by the fast path; keeps every row under one kind of group set-up)
        model = harness.random_transformer(s["spec"], s["device"], s["dtype"])
        model = fastpath.apply_fastpath(model, compile=True, cuda_graphs=s["device"].type == "cuda")
        fresh(s["device"])
        tic = time.perf_counter()
        with torch.no_grad():
            gpu, host = timed(lambda: model(**s["inputs"]), s["device"], s["samples"], warmup=3)
    return dict(config="serial", mode="compiled+graphs", step_ms=gpu, host_ms=host, peak_gib=harness.peak_gib(s["device"], 2),
                warmup_s=time.perf_counter() - tic)


def tensor_rows(s: dict) -> None:
    with harness.fake_group(2):
        for mode in ("eager", "compiled"):
            for row in tensor_mode_rows(s, mode):
                s["emit"](row)


def tensor_mode_rows(s: dict, mode: str) -> list[dict]:
    """tensor=2 rank 0 in `mode` (eager | compiled; compiled on CUDA also through CUDA graphs)."""
    model = harness.random_transformer(s["spec"], s["device"], s["dtype"])
    config = ParallelConfig(tensor_degree=2)
    # The mesh on the GPU: a fake group's backend is not NCCL, which build() would take for CPU.
    mesh = ParallelMesh.build(config, s["device"].type)
    model = parallelize(model, config, mesh, compile=mode == "compiled", cuda_graphs=False)
    fresh(s["device"])
    tic = time.perf_counter()
    with torch.no_grad():
        gpu, host = timed(lambda: model(**s["inputs"]), s["device"], s["samples"], warmup=2)
    rows = [dict(config="tensor=2", mode=mode, step_ms=gpu, host_ms=host, peak_gib=harness.peak_gib(s["device"], 2),
                 warmup_s=time.perf_counter() - tic)]
    if mode == "compiled" and s["device"].type == "cuda":
        graphed = graphs.GraphedDenoiser(model)  # what parallelize's cuda_graphs=None adds when compiled
        tic = time.perf_counter()
        with torch.no_grad():
            gpu, host = timed(lambda: graphed(**s["inputs"]), s["device"], s["samples"], warmup=1)
        rows.append(dict(config="tensor=2", mode="compiled+graphs", step_ms=gpu, host_ms=host,
                         peak_gib=harness.peak_gib(s["device"], 2), warmup_s=time.perf_counter() - tic))
    return rows


def pipefusion_rows(s: dict, compile: bool) -> None:
    """Each stage of pipefusion=2 on its patches of one step (rank 0, then rank 1)."""
    for rank in (0, 1):
        with harness.fake_group(2, rank):
            row = stage_row(s, rank, compile)
        s["emit"](row)


def stage_row(s: dict, rank: int, compile: bool) -> dict:
    """Stage `rank` of pipefusion=2 (this process being rank `rank` of a fake group of 2)."""
    transformer = harness.random_transformer(s["spec"], s["device"], s["dtype"])
    pipe = harness.build_pipeline("flux", s["spec"], s["device"], s["dtype"], transformer=transformer)
    config = ParallelConfig(pipefusion_degree=2, pipefusion_patches=s["patches"], warmup_steps=0)
    pipe = parallelize(pipe, config, ParallelMesh.build(config, s["device"].type), compile=compile)
    stage = pipe.transformer._stage
    kwargs = {k: v for k, v in s["inputs"].items() if k != "return_dict"}
    latent = kwargs["hidden_states"]
    grid = FLUX_STAGE_PLAN.grid(stage.model, latent, kwargs)
    items = build_items(range(1), 0, grid, s["patches"], height=s["size"])
    with torch.no_grad():
        text = FLUX_STAGE_PLAN.embed_text(stage.model, kwargs) if stage.first else None
    width = s["spec"]["num_attention_heads"] * s["spec"]["attention_head_dim"]

    def received(item):
        if stage.first:
            return latent[item.patch.latent(FLUX_STAGE_PLAN.latent_row_dim)].clone()
        return torch.randn(1, kwargs["encoder_hidden_states"].shape[1] + item.patch.num_tokens, width,
                           device=s["device"], dtype=s["dtype"])

    ins = [received(item) for item in items]

    def one_step():
        for item, x in zip(items, ins):
            stage.compute(item, kwargs, x, latent, text)

    fresh(s["device"])
    tic = time.perf_counter()
    with torch.no_grad():
        with torch.compiler.set_stance("force_eager"):  # as the stage loop's first item: sizes the stale-K/V buffers
            one_step()
        gpu, host = timed(one_step, s["device"], s["samples"], warmup=2)
    return dict(config=f"pipefusion=2,pipefusion_patches={s['patches']}", mode="compiled" if compile else "eager",
                stage=rank, blocks=len(stage.blocks), step_ms=gpu, host_ms=host, peak_gib=harness.peak_gib(s["device"], 2),
                warmup_s=time.perf_counter() - tic)


# ---- report ---------------------------------------------------------------------------------------


def markdown(rows: list[dict], env: dict) -> str:
    serial = next((r["step_ms"] for r in rows if r["config"] == "serial"), None)
    lines = [f"# One rank of tensor=2 / pipefusion=2 on {env['device']} (fake process group)", "",
             f"Command: `{env['command']}`", "",
             f"torch {env['torch']}; FLUX.1-dev-architecture transformer ({env['layers']}), random {env['dtype']} weights, "
             f"{env['size']}x{env['size']}, {env['text_len']} text tokens. step: one transformer forward (pipefusion: one "
             "stage's patches of one step), median; host: time to issue it; x serial: step / serial compiled step.", "",
             *harness.table(
                 ("config", "mode", "stage (blocks)", "step ms", "host ms", "x serial compiled", "peak GiB", "warm-up s"),
                 [(r["config"], r["mode"], f"{r['stage']} ({r['blocks']})" if "stage" in r else "", f"{r['step_ms']:.1f}",
                   f"{r['host_ms']:.1f}", f"{r['step_ms'] / serial:.2f}" if serial else "", harness.fmt(r.get("peak_gib"), ".2f"),
                   f"{r['warmup_s']:.1f}") for r in rows], "lllrrrrr"),
             "", *[f"- {n}" for n in env["notes"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny FLUX (2+6 blocks), 64 px: proves the script")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--patches", type=int, default=2, help="pipefusion_patches (default 2)")
    parser.add_argument("--rows", default="serial,tensor,pipefusion,pipefusion-eager")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no row group after this many seconds")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    elif args.quick:  # the CPU proof runs the same code; dynamo alone (inductor would take minutes)
        fastpath.compile_repeated_blocks.__kwdefaults__["backend"] = "eager"
    spec = dict(TINY_CPU["flux"]) if args.quick else dict(FLUX_DEV)
    size, text_len = (64, 16) if args.quick else (1024, 512)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    stem = args.out / f"tp_step_{'cpu_quick' if device.type == 'cpu' else harness.machine_tag(device)}"
    env = dict(device=harness.device_name(device, "CPU"), torch=torch.__version__,
               layers=f"{spec['num_layers']}+{spec['num_single_layers']} blocks", dtype=str(dtype).split(".")[-1],
               size=size, text_len=text_len, command=harness.command(),
               notes=["FAKE PROCESS GROUP of 2: collectives return at once, no data moves; a row is one rank's compute and "
                      "host cost, the exchanges left out.",
                      "tensor=2 peak GiB: this rank's half of the weights plus its activations (serial: all weights)."])
    if device.type == "cpu":
        env["notes"].insert(0, "CPU proof: dynamo-only compile (backend eager), shared cores; the times mean nothing.")
    rows: list[dict] = []

    def emit(row: dict) -> None:
        print(f"== {row['config']:36s} {row['mode']:16s} stage {row.get('stage', '-')}: step {row['step_ms']:.1f} ms, "
              f"host {row['host_ms']:.1f} ms, peak {row.get('peak_gib')}, warm-up {row['warmup_s']:.1f} s", flush=True)
        if row not in rows:
            rows.append(row)
        harness.write_results(stem, dict(env=env, rows=rows), markdown(rows, env))

    s = dict(spec=spec, device=device, dtype=dtype, size=size, samples=args.samples, patches=args.patches, emit=emit,
             inputs=flux_call(spec, size, text_len, device, dtype))
    started, wanted = time.time(), args.rows.split(",")
    groups = dict(serial=lambda: emit(serial_row(s)), tensor=lambda: tensor_rows(s),
                  pipefusion=lambda: pipefusion_rows(s, True), **{"pipefusion-eager": lambda: pipefusion_rows(s, False)})
    for name in wanted:
        if time.time() - started > args.budget_s:
            env["notes"].append(f"{name}: not started within --budget-s {args.budget_s:.0f}")
            continue
        groups[name]()
        harness.free()
    if rows:
        print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
