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
step ms: median of --samples after warm-up (compile) calls.
"""

from __future__ import annotations

import os

os.environ.update(NCCL_NVLS_ENABLE="0")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.multi_gpu import TINY_CPU, build_pipeline  # noqa: E402
from benchmarks.pipefusion_nccl import random_transformer  # noqa: E402
from ditmesh import ParallelConfig, parallelize  # noqa: E402
from ditmesh.models.flux import FLUX_DEV_CONFIG, FLUX_STAGE_PLAN  # noqa: E402
from ditmesh.parallel import fastpath, graphs  # noqa: E402
from ditmesh.parallel.mesh import ParallelMesh  # noqa: E402
from ditmesh.parallel.pipefusion.schedule import build_items  # noqa: E402


def fake_group(rank: int, world: int = 2) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())


def inputs(spec: dict, size: int, text_len: int, device, dtype) -> dict:
    """One transformer call's keyword arguments, as FluxPipeline passes them (packed 2x2 latents)."""
    gen = torch.Generator().manual_seed(1)
    h = w = size // 16
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    return dict(hidden_states=rand(1, h * w, spec["in_channels"]), encoder_hidden_states=rand(1, text_len, spec["joint_attention_dim"]),
                pooled_projections=rand(1, spec["pooled_projection_dim"]), timestep=torch.full((1,), 0.7, device=device, dtype=dtype),
                guidance=torch.full((1,), 3.5, device=device, dtype=dtype) if spec.get("guidance_embeds") else None,
                img_ids=img_ids.reshape(-1, 3).to(device), txt_ids=torch.zeros(text_len, 3, device=device), return_dict=False)


def timed(fn, device, samples: int, warmup: int = 2) -> tuple[float, float]:
    """(median GPU ms by CUDA events, or wall ms on CPU; median host ms to issue `fn`)."""
    for _ in range(warmup):
        fn()
    gpu, host = [], []
    for _ in range(samples):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        tic = time.perf_counter()
        fn()
        host.append((time.perf_counter() - tic) * 1e3)
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            gpu.append(start.elapsed_time(end))
        else:
            gpu.append(host[-1])
    return statistics.median(gpu), statistics.median(host)


def reset(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# ---- rows -----------------------------------------------------------------------------------------


def serial_row(s: dict) -> dict:
    fake_group(0, 1)  # (unused by the fast path; keeps every row under one kind of group set-up)
    model = random_transformer(s["spec"], s["device"], s["dtype"])
    model = fastpath.apply_fastpath(model, compile=True, cuda_graphs=s["device"].type == "cuda")
    reset(s["device"])
    tic = time.perf_counter()
    with torch.no_grad():
        gpu, host = timed(lambda: model(**s["inputs"]), s["device"], s["samples"], warmup=3)
    return dict(config="serial", mode="compiled+graphs", step_ms=gpu, host_ms=host, peak_gib=peak_gib(s["device"]),
                warmup_s=time.perf_counter() - tic)


def tensor_rows(s: dict) -> list[dict]:
    fake_group(0)
    rows = []
    for mode in ("eager", "compiled"):
        model = random_transformer(s["spec"], s["device"], s["dtype"])
        config = ParallelConfig(tensor_degree=2)
        # The mesh on the GPU: a fake group's backend is not NCCL, which build() would take for CPU.
        mesh = ParallelMesh.build(config, s["device"].type)
        model = parallelize(model, config, mesh, compile=mode == "compiled", cuda_graphs=False)
        reset(s["device"])
        tic = time.perf_counter()
        with torch.no_grad():
            gpu, host = timed(lambda: model(**s["inputs"]), s["device"], s["samples"], warmup=2)
        rows.append(dict(config="tensor=2", mode=mode, step_ms=gpu, host_ms=host, peak_gib=peak_gib(s["device"]),
                         warmup_s=time.perf_counter() - tic))
        if mode == "compiled" and s["device"].type == "cuda":
            graphed = graphs.GraphedDenoiser(model)  # what parallelize's cuda_graphs=None adds when compiled
            tic = time.perf_counter()
            with torch.no_grad():
                gpu, host = timed(lambda: graphed(**s["inputs"]), s["device"], s["samples"], warmup=1)
            rows.append(dict(config="tensor=2", mode="compiled+graphs", step_ms=gpu, host_ms=host,
                             peak_gib=peak_gib(s["device"]), warmup_s=time.perf_counter() - tic))
            del graphed
        del model
        s["emit"](rows[-1])
    return rows


def pipefusion_rows(s: dict, compile: bool) -> list[dict]:
    """Each stage of pipefusion=2 on its patches of one step (rank 0, then rank 1)."""
    rows = []
    for rank in (0, 1):
        fake_group(rank)
        transformer = random_transformer(s["spec"], s["device"], s["dtype"])
        pipe = build_pipeline("flux", s["spec"], s["device"], s["dtype"], transformer=transformer)
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

        reset(s["device"])
        tic = time.perf_counter()
        with torch.no_grad():
            with torch.compiler.set_stance("force_eager"):  # as the stage loop's first item: sizes the stale-K/V buffers
                one_step()
            gpu, host = timed(one_step, s["device"], s["samples"], warmup=2)
        rows.append(dict(config=f"pipefusion=2,pipefusion_patches={s['patches']}", mode="compiled" if compile else "eager",
                         stage=rank, blocks=len(stage.blocks), step_ms=gpu, host_ms=host, peak_gib=peak_gib(s["device"]),
                         warmup_s=time.perf_counter() - tic))
        del pipe, stage, transformer
        s["emit"](rows[-1])
    return rows


# ---- report ---------------------------------------------------------------------------------------


def markdown(rows: list[dict], env: dict) -> str:
    serial = next((r["step_ms"] for r in rows if r["config"] == "serial"), None)
    lines = [f"# One rank of tensor=2 / pipefusion=2 on {env['device']} (fake process group)", "",
             f"Command: `{env['command']}`", "",
             f"torch {env['torch']}; FLUX.1-dev-architecture transformer ({env['layers']}), random {env['dtype']} weights, "
             f"{env['size']}x{env['size']}, {env['text_len']} text tokens. step: one transformer forward (pipefusion: one "
             "stage's patches of one step), median; host: time to issue it; x serial: step / serial compiled step.", "",
             "| config | mode | stage (blocks) | step ms | host ms | x serial compiled | peak GiB | warm-up s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['step_ms'] / serial:.2f}" if serial else ""
        stage = f"{r['stage']} ({r['blocks']})" if "stage" in r else ""
        peak = "" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['config']} | {r['mode']} | {stage} | {r['step_ms']:.1f} | {r['host_ms']:.1f} | {ratio} | {peak} "
                     f"| {r['warmup_s']:.1f} |")
    lines += ["", *[f"- {n}" for n in env["notes"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny FLUX (2+6 blocks), 64 px: proves the script")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--patches", type=int, default=2, help="pipefusion_patches (default 2)")
    parser.add_argument("--rows", default="serial,tensor,pipefusion,pipefusion-eager")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no row group after this many seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    elif args.quick:  # the CPU proof runs the same code; dynamo alone (inductor would take minutes)
        fastpath.compile_repeated_blocks.__kwdefaults__["backend"] = "eager"
    spec = dict(TINY_CPU["flux"]) if args.quick else dict(FLUX_DEV_CONFIG)
    size, text_len = (64, 16) if args.quick else (1024, 512)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tag = "cpu_quick" if device.type == "cpu" else torch.cuda.get_device_name(device).split()[-1].lower()
    stem = args.out / f"tp_step_{tag}"
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", torch=torch.__version__,
               layers=f"{spec['num_layers']}+{spec['num_single_layers']} blocks", dtype=str(dtype).split(".")[-1],
               size=size, text_len=text_len, command=" ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:]),
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
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
        stem.with_suffix(".md").write_text(markdown(rows, env))

    s = dict(spec=spec, device=device, dtype=dtype, size=size, samples=args.samples, patches=args.patches, emit=emit,
             inputs=inputs(spec, size, text_len, device, dtype))
    started, wanted = time.time(), args.rows.split(",")
    groups = dict(serial=lambda: [emit(serial_row(s))], tensor=lambda: tensor_rows(s),
                  pipefusion=lambda: pipefusion_rows(s, True), **{"pipefusion-eager": lambda: pipefusion_rows(s, False)})
    for name in wanted:
        if time.time() - started > args.budget_s:
            env["notes"].append(f"{name}: not started within --budget-s {args.budget_s:.0f}")
            continue
        groups[name]()
        torch._dynamo.reset()
    if rows:
        print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
