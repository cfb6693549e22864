"""LoRA on the single-GPU fast path, the memory of fused Q/K/V, and the cost of a new graph shape.

    NCCL_NVLS_ENABLE=0 python benchmarks/lora_fastpath.py --json benchmarks/results/lora_fastpath_h200.json

Three questions, one GPU, each written to the JSON as soon as it is answered:
1. tiny FLUX in bf16, `parallelize(pipe, ParallelConfig())` (compiled blocks, fused Q/K/V, CUDA
   graphs): a LoRA loaded after it, then re-scaled with `set_adapters`, gives the plain
   pipeline's latents (relative error), and what each switch costs (ms to switch, s of the next
   call: recompile + recapture, once per adapter set; a set seen before replays its graph);
2. a FLUX.1-dev-sized transformer (random bf16 weights): GiB allocated after diffusers'
   `fuse_qkv_projections` (what main kept: fused + unfused copies) and after ditmesh's
   `fuse_qkv` (unfused weights are views), and the peak of one 1024x1024 forward in each state;
3. the cost of a new input shape under `GraphedDenoiser` (FLUX.1-dev size, eager): first call
   (2 warm-up forwards + capture) against a replay.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch

from harness import FLUX_DEV, GIB, flux_inputs, rel_err as _rel


def _make_lora(folder: str) -> str:
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from ditmesh.models.tiny import tiny_flux_transformer

    transformer = tiny_flux_transformer()
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights=False))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return folder


def _latents(pipe, size: int = 128, steps: int = 4) -> torch.Tensor:
    with torch.no_grad():
        out = pipe(prompt="a red cube", num_inference_steps=steps, height=size, width=size, output_type="latent",
                   guidance_scale=3.5, generator=torch.Generator("cuda").manual_seed(0))
    torch.cuda.synchronize()
    return out.images.float()


def _timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    return value, time.perf_counter() - start


def lora_after_parallelize(path: str) -> dict:
    from ditmesh import ParallelConfig, parallelize
    from ditmesh.models.tiny import tiny_pipeline

    plain = tiny_pipeline("tiny-flux").to("cuda", torch.bfloat16)
    base = _latents(plain)
    plain.load_lora_weights(path, adapter_name="a")
    full = _latents(plain)
    plain.set_adapters(["a"], [0.5])
    half = _latents(plain)

    pipe = parallelize(tiny_pipeline("tiny-flux").to("cuda", torch.bfloat16), ParallelConfig())
    _, first_s = _timed(lambda: _latents(pipe))
    _, steady_s = _timed(lambda: _latents(pipe))
    _, load_s = _timed(lambda: pipe.load_lora_weights(path, adapter_name="a"))
    after, after_load_s = _timed(lambda: _latents(pipe))
    _, switch_s = _timed(lambda: pipe.set_adapters(["a"], [0.5]))
    switched, after_switch_s = _timed(lambda: _latents(pipe))
    _, back_s = _timed(lambda: pipe.set_adapters(["a"], [1.0]))
    back, after_back_s = _timed(lambda: _latents(pipe))
    return dict(
        lora_effect=_rel(full, base), after_vs_lora=_rel(after, full), after_vs_base=_rel(after, base),
        half_vs_plain_half=_rel(switched, half), back_vs_lora=_rel(back, full),
        first_call_s=first_s, steady_call_s=steady_s, load_lora_ms=load_s * 1e3, first_call_after_load_s=after_load_s,
        set_adapters_ms=switch_s * 1e3, first_call_after_switch_s=after_switch_s,
        switch_back_ms=back_s * 1e3, call_after_switch_back_s=after_back_s,
        graphs=len(pipe.transformer._graphs),
    )


def _flux_inputs(size: int) -> dict:
    return flux_inputs(h=size // 16, w=size // 16)


def _peak_forward(model, inputs) -> float:
    harness.reset_peak("cuda")
    with torch.no_grad():
        model(**inputs)
    torch.cuda.synchronize()
    return harness.peak_gib("cuda")


def fused_memory_and_new_shape() -> tuple[dict, dict]:
    from diffusers import FluxTransformer2DModel

    from ditmesh.parallel import graphs, lora

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = FluxTransformer2DModel(**FLUX_DEV).eval()
    finally:
        torch.set_default_dtype(default)
    inputs = _flux_inputs(1024)
    unfused = torch.cuda.memory_allocated() / GIB
    model.fuse_qkv_projections()  # diffusers' fusion alone: what main kept
    kept = torch.cuda.memory_allocated() / GIB
    peak_kept = _peak_forward(model, inputs)
    for attn in [m for m in model.modules() if getattr(m, "fused_projections", False)]:
        lora.share_fused_storage(attn)
    shared = torch.cuda.memory_allocated() / GIB
    peak_shared = _peak_forward(model, inputs)
    memory = dict(params_unfused_gib=unfused, after_diffusers_fuse_gib=kept, after_ditmesh_fuse_gib=shared,
                  forward_peak_diffusers_fuse_gib=peak_kept, forward_peak_ditmesh_fuse_gib=peak_shared)

    graphed = graphs.GraphedDenoiser(model, max_graphs=2)
    shape = {}
    with torch.no_grad():
        for size in (512, 768):
            small = _flux_inputs(size)
            _, shape[f"first_call_{size}px_s"] = _timed(lambda: graphed(**small))
            _, shape[f"replay_{size}px_s"] = _timed(lambda: graphed(**small))
        _, shape["eager_768px_s"] = _timed(lambda: model(**_flux_inputs(768)))
    shape["graphs_kept"] = len(graphed._graphs)
    return memory, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "lora_fastpath.json"))
    args = parser.parse_args()
    report = dict(gpu=harness.device_name(), torch=torch.__version__)

    def save():
        harness.write_results(Path(args.json).with_suffix(""), report)

    with tempfile.TemporaryDirectory() as folder:
        report["lora"] = lora_after_parallelize(_make_lora(folder))
    save()
    report["memory"], report["new_shape"] = fused_memory_and_new_shape()
    save()
    print("| question | figure | value |\n|---|---|---:|")
    for section in ("lora", "memory", "new_shape"):
        for key, value in report[section].items():
            print(f"| {section} | {key} | {value:.4g} |")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
