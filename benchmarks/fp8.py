"""NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD python3 benchmarks/fp8.py --out benchmarks/results   # one H200
   PYTHONPATH=$PWD python benchmarks/fp8.py --device cpu --quick                         # CPU proof (tiny)

Does fp8 (`parallelize(..., quantize="fp8")`) pay on Hopper? One FLUX.1-dev-sized transformer
forward (= one denoising step: 19 + 38 blocks, 24 heads x 128, random bf16 weights, 1024x1024 =
4096 image + 512 text tokens), side by side in one process:

  bf16 eager | bf16 + diffusers compile_repeated_blocks | bf16 ours (fast path: fused QKV, cuDNN,
  regional compile, CUDA graph) | torchao fp8 + diffusers compile | ours fp8 (the same fast path)

serially and as one rank of ulysses=8 (torch's fake process group: that rank's compute and host
cost, collectives move nothing). Per row: step ms (median of CUDA-event timed forwards), compile s
(the first call: compile, for graphed rows also nothing else), peak GiB (max allocated from the
model's creation on, quantisation included), weights GiB after set-up, rel err of the output vs
bf16 eager (serial rows only). Plus a probe of fp8 attention (torch SDPA with float8 q/k/v).

The torchao row uses `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())` with
`set_inductor_config=False`: its default turns on inductor's coordinate-descent tuning process-wide
(the issue's 207 s compile); `--torchao-default-knobs` keeps the default (run last, slow).
Inductor's caches are off, so every row compiles cold. Writes fp8_<tag>.{json,md} to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
import torch.nn.functional as F

from ditmesh import ParallelConfig
from ditmesh.parallel import fastpath, parallelize, quantize
from ditmesh.parallel.mesh import ParallelMesh
from harness import FLUX_DEV, TINY_CPU

harness.cold_compiles()  # every row compiles cold
QUICK_CONFIG = dict(TINY_CPU["flux"], num_layers=1, num_single_layers=2)  # 3 blocks: seconds per row on a busy CPU


# ---- the variants: each takes a fresh bf16 model and returns the callable to time ----------------


def bf16_eager(model, run):
    return model


def bf16_diffusers(model, run):
    if run["compile"]:
        model.compile_repeated_blocks(fullgraph=True)
    return model


def _ours(model, run, quantize_mode):
    if run["world"] == 1:  # parallelize's one-process path (called directly: a fake group may exist)
        return fastpath.apply_fastpath(model, compile=run["compile"], cuda_graphs=run["cuda"], quantize=quantize_mode)
    return parallelize(model, run["config"], mesh=run["mesh"], compile=run["compile"] or None, quantize=quantize_mode)


def bf16_ours(model, run):
    return _ours(model, run, None)


def fp8_ours(model, run):
    return _ours(model, run, "fp8")


def fp8_tensorwise_ours(model, run):
    return _ours(model, run, "fp8-tensorwise")


def fp8_torchao(model, run, default_knobs: bool = False):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=default_knobs))
    if run["compile"]:
        model.compile_repeated_blocks(fullgraph=True)
    return model


# In priority order (rows past --budget-s are skipped): name -> ("serial" | "both" (also one rank of ulysses), build).
VARIANTS: dict[str, tuple[str, Callable]] = {
    "bf16 eager": ("serial", bf16_eager),
    "bf16 ours (fast path)": ("both", bf16_ours),
    "ours fp8": ("both", fp8_ours),
    "ours fp8 tensorwise": ("both", fp8_tensorwise_ours),
    "bf16 + diffusers compile_repeated_blocks": ("serial", bf16_diffusers),
    "torchao fp8 + diffusers compile (knobs off)": ("serial", fp8_torchao),
}


# ---- timing --------------------------------------------------------------------------------------


def loop_ms(fn: Callable, device: torch.device, samples: int, calls: int = 5) -> float:
    """Median over `samples` of the mean time (ms) of `calls` back-to-back calls of `fn()`,
    synchronised at the ends only (so the host issues ahead, as in a denoising loop)."""
    return harness.median_ms(lambda: [fn() for _ in range(calls)], device, samples, warmup=0) / calls


def measure(name: str, build: Callable, run: dict, reference: torch.Tensor | None) -> tuple[dict, torch.Tensor | None]:
    device, cuda = run["device"], run["device"].type == "cuda"
    harness.free()
    harness.reset_peak(device)
    row: dict[str, Any] = dict(variant=name, config=str(run["config"]))
    try:
        started = time.perf_counter()
        model = harness.random_transformer(run["spec"], device, torch.bfloat16).requires_grad_(False)
        fn = build(model, run)
        row["setup_s"] = time.perf_counter() - started
        row["weights_gib"] = quantize.weight_bytes(model) / harness.GIB
        if cuda:  # set-up peak (bf16 model + quantisation), then the peak of the calls alone
            row["setup_peak_gib"] = harness.peak_gib(device)
            harness.reset_peak(device)
        with torch.no_grad():
            # the first call: compile (+ nothing else eager)
            row["compile_s"] = harness.first_call_s(lambda: fn(**run["inputs"]), device)
            for _ in range(3):  # graphed rows: warm, capture, first replay
                fn(**run["inputs"])
            row["step_ms"] = loop_ms(lambda: fn(**run["inputs"]), device, run["samples"], run["calls"])
            out = fn(**run["inputs"])[0].float()
        if cuda:
            row["peak_gib"] = harness.peak_gib(device)
        if reference is not None and run["world"] == 1:
            row["rel_err"] = harness.rel_err(out, reference)
        del model, fn
        return row, (out if run["world"] == 1 else None)
    except Exception as error:  # noqa: BLE001 - recorded per row
        row["error"] = f"{type(error).__name__}: {harness.first_line(error)}"
        return row, None


def fp8_attention_probe(device: torch.device, heads: int, tokens: int, head_dim: int, samples: int) -> dict:
    """torch SDPA with float8_e4m3fn q/k/v (cuDNN first) vs bf16 SDPA at one block's attention shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    result: dict[str, Any] = dict(shape=f"1x{heads}x{tokens}x{head_dim}")
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with torch.no_grad(), sdpa_kernel(backends, set_priority=True):
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        result["bf16_ms"] = loop_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, samples)
        result["bf16_rel_err"] = harness.rel_err(F.scaled_dot_product_attention(q, k, v), reference)
        q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
        try:
            out = F.scaled_dot_product_attention(q8, k8, v8)
            result["fp8_ms"] = loop_ms(lambda: F.scaled_dot_product_attention(q8, k8, v8), device, samples)
            result["fp8_rel_err"] = harness.rel_err(out.float(), reference)
            result["fp8_out_dtype"] = str(out.dtype)
        except Exception as error:  # noqa: BLE001 - the probe's answer
            result["fp8_error"] = f"{type(error).__name__}: {harness.first_line(error)}"
    for module in ("flash_attn_interface", "flash_attn"):  # FA3's fp8 path, if installed
        try:
            __import__(module)
            result[module] = "installed"
        except Exception as error:  # noqa: BLE001
            result[module] = f"absent ({type(error).__name__})"
    return result


# ---- report --------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# fp8 vs bf16 on {env['device']}", "", f"Command: `{env['command']}`", "",
             f"torch {env['torch']}, torchao {env['torchao']}, diffusers {env['diffusers']}; {env['model']}; one forward = one "
             f"step; step: median of {env['samples']} samples of {env.get('calls', 1)} back-to-back forwards; compile s: the first call; "
             "peak: max allocated during the calls (compile, capture, timed steps); set-up peak: while the bf16 model was made "
             "and quantised; rel err: output vs bf16 eager (serial).", ""]
    cell = lambda row, key, spec: harness.fmt(row.get(key), spec)  # noqa: E731
    cells = []
    for row in report["rows"]:
        base = next((r.get("step_ms") for r in report["rows"]
                     if r["config"] == row["config"] and r["variant"] == "bf16 + diffusers compile_repeated_blocks"), None)
        base = base or next((r.get("step_ms") for r in report["rows"] if r["config"] == row["config"]
                             and r["variant"] == "bf16 ours (fast path)"), None)
        speedup = base / row["step_ms"] if base and row.get("step_ms") else None
        cells.append((row["config"], row["variant"], cell(row, "step_ms", ".1f"), harness.times(speedup),
                      cell(row, "compile_s", ".1f"), cell(row, "peak_gib", ".1f"), cell(row, "setup_peak_gib", ".1f"),
                      cell(row, "weights_gib", ".1f"), cell(row, "rel_err", ".1e"), row.get("error", "")))
    lines += harness.table(("config", "variant", "step ms", "vs bf16 compiled (diffusers)", "compile s", "peak GiB",
                            "set-up peak GiB", "weights GiB", "rel err", "error"), cells, "llrrrrrrrl")
    probe = report.get("fp8_attention")
    if probe:
        lines += ["", "## fp8 attention probe (torch SDPA, float8_e4m3fn q/k/v, cuDNN first)", "", "```", json.dumps(probe, indent=1), "```"]
    lines += ["", *[f"- {note}" for note in report.get("notes", [])]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="a tiny FLUX, 8x8 tokens: proves the script (CPU)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--tag", default=None, help="file stem fp8_<tag> (default: h200, or cpu_quick)")
    parser.add_argument("--samples", type=int, default=5, help="timed samples (median)")
    parser.add_argument("--calls", type=int, default=5, help="forwards per sample, back to back")
    parser.add_argument("--ulysses", type=int, default=8, help="fake-group degree of the one-rank rows (0: none)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip the rows left after this many seconds")
    parser.add_argument("--torchao-default-knobs", action="store_true",
                        help="also run torchao with its default set_inductor_config=True (last: it changes inductor's config for the process)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    spec = QUICK_CONFIG if args.quick else FLUX_DEV
    grid, text_len = (8, 16) if args.quick else (64, 512)
    compile = device.type == "cuda"  # CPU: inductor compiles C++ for minutes on a busy host: eager only
    import torchao

    versions = harness.versions()
    stem = args.out / f"fp8_{args.tag or ('cpu_quick' if args.quick else 'h200')}"
    report: dict[str, Any] = dict(env=dict(device=harness.device_name(device), torch=versions["torch"],
                                           torchao=torchao.__version__, diffusers=versions["diffusers"], samples=args.samples, calls=args.calls,
                                           model=("tiny FLUX (quick)" if args.quick else "FLUX.1-dev-sized transformer") +
                                           f", {grid * grid} image + {text_len} text tokens, random bf16 weights",
                                           command=harness.command()), rows=[], notes=[])
    if device.type == "cpu":
        report["notes"].append("CPU: eager only (no compile, no CUDA graphs); fp8 runs through torch's CPU _scaled_mm; torchao's quantize_ refuses the CPU")
    save = lambda: harness.write_results(stem, report, markdown(report))  # noqa: E731
    torch.manual_seed(1)  # the inputs, the same for every row
    inputs = harness.flux_inputs(1, grid, grid, text_len, spec, device, torch.bfloat16)
    run = dict(device=device, spec=spec, world=1, config=ParallelConfig(), mesh=None, compile=compile, cuda=device.type == "cuda",
               samples=args.samples, calls=args.calls, inputs=inputs)
    report["fp8_attention"] = fp8_attention_probe(device, spec["num_attention_heads"], grid * grid + text_len,
                                                  spec["attention_head_dim"], args.samples)
    print(json.dumps(report["fp8_attention"]), flush=True)
    reference = None
    plan = [(name, build, 1) for name, (where, build) in VARIANTS.items()]
    if args.ulysses > 1:
        plan += [(name, build, args.ulysses) for name, (where, build) in VARIANTS.items() if where == "both"]
    for name, build, world in plan:
        if time.perf_counter() - started > args.budget_s:
            report["notes"].append(f"skipped (budget {args.budget_s:.0f} s): {name} at world {world}")
            continue
        if world > 1 and not torch.distributed.is_initialized():
            harness.init_fake(world)
            config = ParallelConfig(ulysses_degree=world)
            run.update(world=world, config=config, mesh=ParallelMesh.build(config))
        row, out = measure(name, build, run, reference)
        reference = out if reference is None and name == "bf16 eager" else reference
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()
    if args.torchao_default_knobs and time.perf_counter() - started < args.budget_s:
        run.update(world=1, config=ParallelConfig(), mesh=None)
        row, _ = measure("torchao fp8 + diffusers compile (default knobs)", lambda m, r: fp8_torchao(m, r, True), run, reference)
        report["rows"].append(row)
    if args.ulysses > 1:
        report["notes"].append(f"ulysses={args.ulysses} rows: one process as rank 0 of a fake process group (collectives move nothing): "
                               "that rank's compute and host cost; rel err is not meaningful there")
    report["notes"].append(f"total {time.perf_counter() - started:.0f} s")
    save()
    print(markdown(report))


if __name__ == "__main__":
    main()
