"""PYTHONPATH=$PWD python3 benchmarks/gpu_step.py --out benchmarks/results   # on one GPU (H200), needs diffusers

One run times, on the same GPU and in the same process:
  * the kernels (attention with LSE by backend, ring step = attention + merge, LSE merge, Ulysses
    pack with QK RMSNorm) against their plain-torch twins and torch's SDPA backends, at
    24 heads x 128 bf16 and 4608 / 576 tokens, with each one's error against the fp32 reference;
  * one transformer forward (one denoising step) of FLUX.1-dev-sized (batch 1, 4096 image + 512
    text tokens, 1024x1024) and SD3.5-large-sized (batch 2 = CFG, 4096 image + 333 text tokens)
    transformers with random bf16 weights: diffusers eager, diffusers + torch.compile (whole model,
    fullgraph), ditmesh's single-GPU path eager (fused QKV + cuDNN attention) and compiled
    (+ regional compile + inductor knobs), i.e. what `parallelize(pipe, ParallelConfig())` does.
Timing: CUDA events after warm-up, median of >= 5 samples. Writes gpu_step_h200.{json,md} to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch

from ditmesh.kernels import reference, select
from ditmesh.kernels.triton_attention import triton_attention_lse
from ditmesh.kernels.triton_merge import triton_merge_lse
from ditmesh.kernels.triton_pack import triton_pack_for_all_to_all
from ditmesh.parallel.fastpath import apply_fastpath, compile_repeated_blocks
from harness import FLUX_DEV, SD35_LARGE, bench_ms, flux_inputs, rel_err, seeded_model

RESULTS: dict = {"env": {}, "kernels": [], "models": []}
OUT_DIR = Path("benchmarks/results")


def bench_both(fn) -> tuple[float, float | None]:
    """(eager-launch ms, CUDA-graph-replay ms or None where capture fails)."""
    ms = bench_ms(fn)
    try:
        return ms, bench_ms(fn, graph=True)
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot be captured keeps its eager time
        print(f"graph capture failed: {exc!r}"[:200], flush=True)
        torch.cuda.synchronize()
        return ms, None


def save(out_dir: Path) -> None:
    harness.write_results(out_dir / "gpu_step_h200", RESULTS, markdown())


# ---- kernels -------------------------------------------------------------------------------------


def kernel_rows(heads: int = 24, dim: int = 128) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    for seq_q, seq_k in [(4608, 4608), (576, 576), (576, 4608)]:
        q, k, v = (torch.randn(1, heads, s, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for s in (seq_q, seq_k, seq_k))
        flop = 4 * heads * seq_q * seq_k * dim
        ref_out, ref_lse = reference.attention_lse(q.float(), k.float(), v.float())
        sdpa = torch.nn.functional.scaled_dot_product_attention
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def in_backend(backend):
            def run():
                with sdpa_kernel(backend):
                    return sdpa(q, k, v), None
            return run

        cases = {
            "reference (plain torch, LSE)": lambda: reference.attention_lse(q, k, v),
            "cuDNN + LSE (aten)": lambda: select.BACKENDS["cudnn"](q, k, v),
            "flash + LSE (aten)": lambda: select.BACKENDS["flash"](q, k, v),
            "triton + LSE (ditmesh)": lambda: triton_attention_lse(q, k, v),
            "auto (ditmesh.kernels.attention_lse)": lambda: select.attention_lse(q, k, v),
            "SDPA default (no LSE)": lambda: (sdpa(q, k, v), None),
            "SDPA cuDNN (no LSE)": in_backend(SDPBackend.CUDNN_ATTENTION),
            "SDPA flash (no LSE)": in_backend(SDPBackend.FLASH_ATTENTION),
            "SDPA efficient (no LSE)": in_backend(SDPBackend.EFFICIENT_ATTENTION),
        }
        for name, fn in cases.items():
            try:
                out, lse = fn()
                err = rel_err(out, ref_out)
                lse_err = (lse - ref_lse).abs().max().item() if lse is not None else None
                ms, graph_ms = bench_both(fn)
            except Exception as exc:  # a backend refusing a shape is a result, not a crash
                add_kernel("attention", f"{seq_q}x{seq_k}", name, None, None, error=repr(exc)[:200])
                continue
            add_kernel("attention", f"{seq_q}x{seq_k}", name, ms, flop / ms / 1e9, err=err, lse_err=lse_err,
                       graph_ms=graph_ms, graph_tflops=flop / graph_ms / 1e9 if graph_ms else None)
        add_kernel("attention", f"{seq_q}x{seq_k}", "(auto picks)", None, None, note=select.choose_backend(q, k, v))
        ring_step_rows(q, k, v, flop)


def ring_step_rows(q, k, v, flop) -> None:
    # One ring step: attention over a key block merged into the running (out, lse).
    shape = f"{q.shape[-2]}x{k.shape[-2]}"
    prev_out, prev_lse = select.BACKENDS["cudnn"](q, k.roll(1, 2), v.roll(1, 2))
    ref_out, ref_lse = reference.merge_lse(prev_out.float(), prev_lse, *reference.attention_lse(q.float(), k.float(), v.float()))
    cases = {
        "ring step: cuDNN + reference merge": lambda: reference.merge_lse(prev_out, prev_lse, *select.BACKENDS["cudnn"](q, k, v)),
        "ring step: cuDNN + triton merge": lambda: triton_merge_lse(prev_out, prev_lse, *select.BACKENDS["cudnn"](q, k, v)),
        "ring step: triton fused merge": lambda: triton_attention_lse(q, k, v, prev=(prev_out, prev_lse)),
    }
    for name, fn in cases.items():
        out, lse = fn()
        ms, graph_ms = bench_both(fn)
        add_kernel("ring step", shape, name, ms, flop / ms / 1e9, err=rel_err(out, ref_out), graph_ms=graph_ms,
                   graph_tflops=flop / graph_ms / 1e9 if graph_ms else None,
                   lse_err=(lse - ref_lse).abs().max().item())


def merge_and_pack_rows(heads: int = 24, dim: int = 128, seq: int = 4608) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    out_a, out_b = (torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    lse_a, lse_b = (torch.randn(1, heads, seq, device="cuda", generator=gen) for _ in range(2))
    ref = reference.merge_lse(out_a.float(), lse_a, out_b.float(), lse_b)[0]
    nbytes = 3 * out_a.numel() * 2 + 3 * lse_a.numel() * 4
    for name, fn in [("reference", lambda: reference.merge_lse(out_a, lse_a, out_b, lse_b)),
                     ("triton", lambda: triton_merge_lse(out_a, lse_a, out_b, lse_b))]:
        ms, graph_ms = bench_both(fn)
        add_kernel("LSE merge", f"{seq} tok", name, ms, None, err=rel_err(fn()[0], ref), gbps=nbytes / ms / 1e6, graph_ms=graph_ms)
    # Ulysses pack of q from a fused QKV projection (strided view), with QK RMSNorm, U = 4.
    qkv = torch.randn(1, seq, 3, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    x, weight = qkv[:, :, 0], torch.randn(dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    want = reference.pack_for_all_to_all(x.float(), 4, "heads", weight.float())
    nbytes = 2 * x.numel() * 2
    for name, fn in [("reference (norm + permute copy)", lambda: reference.pack_for_all_to_all(x, 4, "heads", weight)),
                     ("triton fused", lambda: triton_pack_for_all_to_all(x, 4, "heads", weight))]:
        ms, graph_ms = bench_both(fn)
        add_kernel("ulysses pack+RMSNorm", f"{seq} tok U=4", name, ms, None, err=rel_err(fn(), want), gbps=nbytes / ms / 1e6,
                   graph_ms=graph_ms)


def add_kernel(kernel, shape, impl, ms, tflops, **extra) -> None:
    row = {"kernel": kernel, "shape": shape, "impl": impl, "ms": ms, "tflops": tflops, **extra}
    RESULTS["kernels"].append(row)
    print(json.dumps(row), flush=True)


# ---- models --------------------------------------------------------------------------------------



def sd3_inputs(batch: int = 2) -> dict:
    bf = dict(device="cuda", dtype=torch.bfloat16)
    return dict(hidden_states=torch.randn(batch, 16, 128, 128, **bf), encoder_hidden_states=torch.randn(batch, 333, 4096, **bf),
                pooled_projections=torch.randn(batch, 2048, **bf), timestep=torch.full((batch,), 700.0, **bf), return_dict=False)


def count_tflop(model, inputs) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops() / 1e12


def time_variant(name: str, fn, ref_out: torch.Tensor | None, tflop: float, family: str, deadline: float) -> torch.Tensor | None:
    if time.time() > deadline:
        RESULTS["models"].append({"model": family, "variant": name, "skipped": "time budget"})
        return None
    t0 = time.time()
    with torch.no_grad():
        out = fn()[0]
        torch.cuda.synchronize()
        first_s = time.time() - t0
        ms = bench_ms(fn, samples=7, min_sample_ms=0)
    row = {"model": family, "variant": name, "ms": ms, "tflops": tflop / ms * 1e3, "first_call_s": first_s,
           "finite": bool(torch.isfinite(out).all()), "rel_err_vs_eager": rel_err(out.float(), ref_out.float()) if ref_out is not None else 0.0}
    RESULTS["models"].append(row)
    print(json.dumps(row), flush=True)
    save(OUT_DIR)
    return out


def kernel_breakdown(fn) -> dict:
    """GPU time of one call by kernel kind (ms), from torch.profiler: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        name = event.key.lower()
        if us <= 0 or name.startswith(("profilerstep", "cudastreamsynchronize")):
            continue
        if any(t in name for t in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul")):
            kind = "matmul"
        elif any(t in name for t in ("cudnn", "fmha", "flash", "attention", "sdpa")):
            kind = "attention"
        elif name.startswith("triton"):
            kind = "triton (fused elementwise)"
        else:
            kind = "other"
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e3
        top.append((us / 1e3, event.key[:90], event.count))
    top.sort(reverse=True)
    return {"by_kind_ms": kinds, "top": top[:12]}


def model_rows(family: str, cls_name: str, config: dict, inputs: dict, deadline: float, out_dir: Path) -> None:
    model = seeded_model(cls_name, config)
    tflop = count_tflop(model, inputs)
    RESULTS["env"][f"{family}_tflop_per_step"] = tflop
    eager = time_variant("diffusers eager", lambda: model(**inputs), None, tflop, family, deadline)
    compiled = torch.compile(model, fullgraph=True)
    time_variant("diffusers + torch.compile", lambda: compiled(**inputs), eager, tflop, family, deadline)
    if time.time() < deadline:
        RESULTS.setdefault("breakdown", {})[f"{family}: diffusers + torch.compile"] = kernel_breakdown(lambda: compiled(**inputs))
    save(out_dir)
    apply_fastpath(model, compile=False)  # what parallelize(pipe, ParallelConfig()) does, minus compile
    time_variant("ditmesh eager (fast path, no compile)", lambda: model(**inputs), eager, tflop, family, deadline)
    compile_repeated_blocks(model)  # ... plus regional compile + inductor knobs = the full fast path
    time_variant("ditmesh compiled (fast path)", lambda: model(**inputs), eager, tflop, family, deadline)
    if time.time() < deadline:
        RESULTS.setdefault("breakdown", {})[f"{family}: ditmesh compiled"] = kernel_breakdown(lambda: model(**inputs))
    save(out_dir)
    del model, compiled
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def matmul_ceiling() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = bench_ms(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


# ---- report --------------------------------------------------------------------------------------


def markdown() -> str:
    env = RESULTS["env"]
    lines = [f"# gpu_step on {env.get('device')} (torch {env.get('torch')}, diffusers {env.get('diffusers')}, triton {env.get('triton')})", "",
             f"bf16 8192^3 matmul: {env.get('matmul_tflops', 0):.0f} TFLOP/s. Command: `{env.get('command')}`", "",
             *([f"Kept (not re-run, the 10-minute per-call limit): {env['kept']}", ""] if env.get("kept") else []),
             "## One transformer forward (one denoising step) at 1024x1024, random bf16 weights", "",
             "| model | variant | ms | TFLOP/s | vs diffusers eager | vs diffusers+compile | first call s | rel err vs eager |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for family in ("flux", "sd3"):
        rows = [r for r in RESULTS["models"] if r["model"] == family and "ms" in r]
        base = {r["variant"]: r["ms"] for r in rows}
        for r in rows:
            eager, comp = base.get("diffusers eager"), base.get("diffusers + torch.compile")
            lines.append(f"| {family} | {r['variant']} | {r['ms']:.1f} | {r['tflops']:.0f} | "
                         f"{eager / r['ms'] if eager else float('nan'):.2f}x | {comp / r['ms'] if comp else float('nan'):.2f}x | "
                         f"{r['first_call_s']:.0f} | {r['rel_err_vs_eager']:.1e} |")
    lines += ["", f"FLUX: {env.get('flux_tflop_per_step', 0):.1f} TFLOP/step (batch 1); SD3.5-large: "
              f"{env.get('sd3_tflop_per_step', 0):.1f} TFLOP/step (batch 2, CFG), counted by torch's FlopCounterMode.", "",
              "## Kernels (bf16, batch 1, 24 heads x 128 unless stated)", "",
              "us: eager launches back to back (host overhead included); graph us: CUDA-graph replay (GPU time).", "",
              "| kernel | shape | impl | us | TFLOP/s | graph us | graph TFLOP/s | GB/s | rel err vs fp32 ref | max lse err |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in RESULTS["kernels"]:
        if r["ms"] is None:
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['impl']} | {r.get('note') or r.get('error', '')} | | | | | | |")
            continue
        fmt = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
        graph_us = r["graph_ms"] * 1e3 if r.get("graph_ms") else None
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['impl']} | {r['ms'] * 1e3:.1f} | {fmt(r['tflops'], '.0f')} | "
                     f"{fmt(graph_us, '.1f')} | {fmt(r.get('graph_tflops'), '.0f')} | "
                     f"{fmt(r.get('gbps'), '.0f')} | {fmt(r.get('err'), '.1e')} | {fmt(r.get('lse_err'), '.1e')} |")
    for label, b in RESULTS.get("breakdown", {}).items():
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(b["by_kind_ms"].items(), key=lambda kv: -kv[1]))
        lines += ["", f"GPU time by kernel kind, {label} (ms, one step, profiler): {kinds}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--budget-s", type=float, default=480, help="skip remaining model variants after this")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: kernels,flux,sd3")
    parser.add_argument("--keep", help="earlier results JSON whose rows of the skipped models are kept (marked)")
    args = parser.parse_args()
    deadline = time.time() + args.budget_s
    global OUT_DIR
    out_dir = OUT_DIR = Path(args.out)
    import diffusers
    import triton

    RESULTS["env"].update(device=harness.device_name(), torch=torch.__version__, diffusers=diffusers.__version__,
                          triton=triton.__version__, command=harness.command())
    RESULTS["env"]["matmul_tflops"] = matmul_ceiling()
    skip = set(args.skip.split(","))
    if args.keep:
        earlier = json.loads(Path(args.keep).read_text())
        for row in earlier["models"]:
            if row["model"] in skip:
                RESULTS["models"].append({**row, "from_earlier_run": earlier["env"]["command"]})
        for family in skip:
            if f"{family}_tflop_per_step" in earlier["env"]:
                RESULTS["env"][f"{family}_tflop_per_step"] = earlier["env"][f"{family}_tflop_per_step"]
        RESULTS["env"]["kept"] = f"rows of {sorted(skip)} from an earlier run on the same kind of machine: {earlier['env']['command']}"
    if "kernels" not in skip:
        kernel_rows()
        merge_and_pack_rows()
        save(out_dir)
    if "flux" not in skip:
        model_rows("flux", "FluxTransformer2DModel", FLUX_DEV, flux_inputs(), deadline, out_dir)
    if "sd3" not in skip:
        model_rows("sd3", "SD3Transformer2DModel", SD35_LARGE, sd3_inputs(), deadline, out_dir)
    save(out_dir)
    print(markdown())


if __name__ == "__main__":
    main()
