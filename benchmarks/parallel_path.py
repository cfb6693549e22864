"""PYTHONPATH=$PWD python3 benchmarks/parallel_path.py --out benchmarks/results   # one GPU, needs diffusers

What a rank of a sequence-parallel run spends besides the model and the collectives, on one GPU.
A FLUX.1-dev-sized transformer (random bf16 weights, 512 text tokens) runs in a 1-rank NCCL group
with ditmesh's sequence-parallel hooks and attention processors installed at degree 1: every
piece of the Ulysses / ring path except the exchanges themselves. Variants, in one process:

  diffusers eager                     the model as diffusers runs it
  sequence wrappers, eager            + ditmesh's split/gather hooks and attention processors
  sequence wrappers, compiled         + what `parallelize` now adds on CUDA (cuDNN first, fused
                                        QKV, regional compile of the blocks around the wrappers)

at 2048 image tokens (the tokens each rank of ulysses=2 / ring=2 runs its linear layers on; its
attention covers all keys, so this understates its attention) and at 4096 (1024², serial).
Per variant: GPU ms per step (CUDA events; a host-bound loop shows as GPU time too), host ms to
issue one step without waiting, and the error against diffusers eager. Writes
parallel_path_h200.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
import torch.distributed as dist

from ditmesh import ParallelConfig, ParallelMesh
from ditmesh.models.base import adapter_for
from ditmesh.parallel import fastpath, sequence
from harness import FLUX_DEV, bench_ms, flux_inputs, host_ms, rel_err, seeded_model

ROWS: list[dict] = []


def measure(name: str, tokens: int, fn, reference: torch.Tensor | None) -> torch.Tensor:
    start = time.time()
    with torch.no_grad():
        out = fn()[0]
        torch.cuda.synchronize()
        first_s = time.time() - start
        row = dict(variant=name, image_tokens=tokens, gpu_ms=bench_ms(fn, samples=5, min_sample_ms=0), host_ms=host_ms(fn),
                   first_call_s=first_s, rel_err_vs_diffusers=rel_err(out.float(), reference.float()) if reference is not None else 0.0)
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    return out


def markdown() -> str:
    lines = ["# Sequence-parallel path on one GPU (degree 1): wrappers and compile vs diffusers", "",
             f"{harness.device_name()}, torch {torch.__version__}; FLUX.1-dev-sized transformer, bf16, 512 text tokens.",
             "", *harness.table(("image tokens", "variant", "GPU ms/step", "host ms/step", "first call s", "rel err"), [
                 (r["image_tokens"], r["variant"], f"{r['gpu_ms']:.1f}", f"{r['host_ms']:.1f}", f"{r['first_call_s']:.1f}",
                  f"{r['rel_err_vs_diffusers']:.1e}") for r in ROWS], "rlrrrr")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant (minutes of compile)")
    parser.add_argument("--tokens", default="2048,4096", help="image token counts (multiples of 64)")
    parser.add_argument("--merge", action="store_true", help="keep the rows of --out's existing JSON (other token counts)")
    parser.add_argument("--deadline-s", type=float, default=300.0, help="start no compiled shape after this many seconds")
    args = parser.parse_args()
    started = time.time()
    torch.cuda.set_device(0)
    harness.init_single(torch.device("cuda", 0))
    model = seeded_model("FluxTransformer2DModel", FLUX_DEV)
    inputs = {tokens: flux_inputs(h=64, w=tokens // 64) for tokens in map(int, args.tokens.split(","))}
    saved = args.out / "parallel_path_h200.json"
    if args.merge and saved.exists():
        ROWS.extend(r for r in json.loads(saved.read_text())["rows"] if r["image_tokens"] not in inputs)
    refs = {t: measure("diffusers eager", t, lambda t=t: model(**inputs[t]), None) for t in inputs}
    config = ParallelConfig()
    sequence.apply(model, ParallelMesh.build(config), adapter_for(model), config)
    for t in inputs:
        measure("sequence wrappers, eager", t, lambda t=t: model(**inputs[t]), refs[t])
    if not args.no_compile:
        fastpath.prefer_cudnn_attention(model)
        fastpath.fuse_qkv(model)
        fastpath.compile_repeated_blocks(model)
        for t in inputs:  # the second shape recompiles (minutes): skipped past the deadline
            if time.time() - started < args.deadline_s:
                measure("sequence wrappers, compiled (parallelize on CUDA)", t, lambda t=t: model(**inputs[t]), refs[t])
    ROWS.sort(key=lambda r: r["image_tokens"])
    harness.write_results(args.out / "parallel_path_h200", {"rows": ROWS, "device": harness.device_name()}, markdown())
    print(markdown())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
