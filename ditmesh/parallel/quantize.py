"""fp8 compute: the denoiser's big linears run as fp8 (e4m3) matmuls, through torchao.

`parallelize(pipe, config, quantize="fp8")` applies it to every denoiser, after the CUDA fast
path fuses Q/K/V and before the blocks are compiled. It composes with data, cfg, ulysses, ring,
PipeFusion, step caching, compile and CUDA graphs; not yet with tensor parallelism (refused:
torchao 0.18's `Float8Tensor` has no ``addmm``, which a DTensor-sharded linear decomposes into).

Each linear the model's `QuantPlan` names gets torchao's `Float8Tensor` weight (the
`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())` recipe): fp8 weights with one
scale per output row, and each call's activations quantised with one scale per token row, so the
GEMM runs on fp8 tensor cores (`torch._scaled_mm`) with bf16 output. Embedders, norms and the
final layer stay bf16 (the plan leaves them out).

Glue torchao lacks, and only that:
- `quantize_` refuses a process without fp8 hardware: this module builds the same `Float8Tensor`
  per weight with torchao's own constructor (so tests run the real fp8 path on the CPU);
- fused Q/K/V (`fastpath.fuse_qkv`): the fused weight is quantised once and the unfused
  projections become views of the fp8 one (rowwise scales slice with the rows), so no bf16 copy
  survives;
- `set_inductor_config`: torchao's recipe turns on inductor's coordinate-descent tuning for the
  whole process, which made the issue's compile 207 s instead of 19 s (the same knob as
  `parallelize(autotune=True)`, measured there to gain nothing); it stays off here.

On CUDA fp8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell): `check` refuses the
others, and the CLI calls it before any process starts. On the CPU the same weights run through
torch's CPU `_scaled_mm` (real fp8 rounding, slowly): what the tests use to prove the wiring.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ditmesh.models import denoisers
from ditmesh.parallel import lora

MODES = ("fp8", "fp8-tensorwise")
"""Values of `parallelize(quantize=...)` and the CLI's ``--quantize`` (None / "off": no quantisation):
"fp8" scales rowwise (one scale per weight row and per token), "fp8-tensorwise" one scale per
weight and one per activation tensor (cuBLAS's plain fp8 GEMM; coarser, so a larger error)."""

MIN_CAPABILITY = (8, 9)
"""CUDA compute capability of the first fp8 tensor cores (Ada); Hopper is 9.0."""


def normalize(quantize: str | None) -> str | None:
    """`quantize` as `parallelize` takes it: None for "off"/"none"/None, else one of `MODES`."""
    if quantize in (None, "", "off", "none"):
        return None
    if quantize not in MODES:
        raise ValueError(f"quantize={quantize!r} is unknown; use one of {', '.join(MODES)} or None (off)")
    return quantize


def check(pipe: Any, adapter: Any, quantize: str | None, device_type: str, tensor_degree: int = 1) -> None:
    """Raise `ValueError` unless `quantize` can run on `pipe`'s denoisers on `device_type` here
    ("cuda": a GPU with fp8 tensor cores; "cpu": allowed, for tests) at `tensor_degree`.
    `parallelize` calls it before any weight changes."""
    if normalize(quantize) is None:
        return
    if tensor_degree > 1:
        # torchao 0.18's Float8Tensor implements mm and linear but not addmm, which DTensor's
        # sharded linear decomposes into: refuse rather than gather the weights.
        raise ValueError(
            f"quantize={quantize!r} does not compose with tensor parallelism yet (torchao's fp8 weights cannot be "
            "DTensor shards); set tensor_degree=1 and use ulysses, ring, cfg, data or pipefusion, which work with fp8 "
            "(fp8 already halves the weights per GPU)"
        )
    for denoiser in denoisers(pipe, adapter).values():
        _planned_linears(denoiser, adapter)
    _check_device(quantize, device_type)


def _check_device(quantize: str, device_type: str) -> None:
    _import_torchao()
    if device_type == "cuda":
        capability = torch.cuda.get_device_capability()
        if capability < MIN_CAPABILITY:
            raise ValueError(
                f"--quantize {quantize} needs fp8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell); "
                f"this GPU ({torch.cuda.get_device_name()}) has {capability[0]}.{capability[1]}: drop --quantize"
            )


def check_cli(quantize: str | None, device: str, dtype: str) -> None:
    """What `ditmesh generate | bench | serve --quantize fp8` checks before starting processes:
    fp8 is for GPUs with fp8 tensor cores (the CPU would only run it slowly) and bf16 weights."""
    if normalize(quantize) is None:
        return
    if dtype != "bfloat16":
        raise ValueError(f"--quantize {quantize} quantises bfloat16 weights; add --dtype bfloat16 (got {dtype})")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        raise ValueError(
            f"--quantize {quantize} needs a GPU with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper, "
            "Blackwell); this run is on the CPU: drop --quantize"
        )
    _check_device(quantize, "cuda")


def apply(denoiser: nn.Module, adapter: Any, quantize: str | None = "fp8", within: str | None = None) -> list[str]:
    """Quantise `denoiser`'s planned linears to fp8 in place (those under the submodule named
    `within`, or all); return their names. Linears already fp8 (`move_quantized`) stay as they are.

    Call after Q/K/V fusion (it changes which weights exist) and before compiling. Every rank calls it with the same model; it is local (no collective)."""
    if normalize(quantize) is None:
        return []
    names = [name for name in _planned_linears(denoiser, adapter) if within is None or name.startswith(f"{within}.")]
    config = _recipe(quantize)
    parts = _fused_parts(denoiser)  # become views of the quantised fused weight, not quantised twice
    for name in names:
        linear = denoiser.get_submodule(name)
        if name not in parts and not _is_fp8(linear.weight):
            _quantize_linear(linear, config)
    for attn in _fused_attention(denoiser.get_submodule(within) if within else denoiser):
        lora.share_fused_storage(attn)  # the unfused projections now view the fp8 fused weight
    lora.refuse_loads(denoiser, f"LoRAs cannot be loaded into an fp8 model: {LORA_FIX}")
    return names


def move_quantized(denoiser: nn.Module, adapter: Any, quantize: str | None, device: torch.device | str,
                   fuse_qkv: bool = True) -> None:
    """Move `denoiser` from the CPU to `device` one block at a time, fusing Q/K/V (`fuse_qkv`: as
    the CUDA fast path does, not under PipeFusion) and quantising each block as it arrives, so
    the GPU never holds the bf16 model: FLUX.1-dev's 22.2 GiB of bf16 weights arrive as 11.2 GiB
    of fp8 with one bf16 block on top. `parallelize(..., quantize=...)` then finds the work done.
    Refuses (ValueError) what `check` refuses, before anything moves."""
    if normalize(quantize) is None:
        denoiser.to(device)
        return
    _planned_linears(denoiser, adapter)
    _check_device(quantize, torch.device(device).type)
    for name, unit in _units(denoiser):
        unit.to(device)
        if fuse_qkv and lora.fusable(denoiser):
            for attn in lora.fusable_attention(unit):
                attn.fuse_projections()
                lora.share_fused_storage(attn)
        apply(denoiser, adapter, quantize, within=name)
    denoiser.to(device)  # what sits on the denoiser itself (parameters, buffers outside the units)


def _units(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    """The denoiser's parts, moved one at a time: its children, a block list's blocks one by one."""
    units = []
    for name, child in denoiser.named_children():
        if isinstance(child, nn.ModuleList):
            units += [(f"{name}.{index}", block) for index, block in enumerate(child)]
        else:
            units.append((name, child))
    return units


def _is_fp8(weight: torch.Tensor) -> bool:
    return type(weight).__name__ == "Float8Tensor"


LORA_FIX = ("its weights are fp8; bake the LoRAs in before parallelize with pipe.fuse_lora() then "
            "pipe.unload_lora_weights(), or run without --quantize")


def _planned_linears(denoiser: nn.Module, adapter: Any) -> list[str]:
    if adapter.quant_plan is None:
        raise ValueError(f"fp8 has no plan for {adapter.name} models; run it without quantize (supported: flux, sd3)")
    layers = [name for name, _ in lora.tuner_layers(denoiser)]
    if layers:
        raise ValueError(f"LoRA layers on {lora.short_list(layers)}: {LORA_FIX}")
    names = [name for name in adapter.quant_plan.resolve(denoiser) if isinstance(denoiser.get_submodule(name), nn.Linear)]
    wrong = sorted({str(denoiser.get_submodule(name).weight.dtype) for name in names} - {"torch.bfloat16"})
    if wrong:
        raise ValueError(f"fp8 quantises bfloat16 weights; this model's are {', '.join(wrong)}: load it with "
                         "dtype=torch.bfloat16 (--dtype bfloat16)")
    return names


def _recipe(quantize: str) -> Any:
    """torchao's fp8 recipe: rowwise scales (per output row of the weight, per token of the input),
    or one scale per tensor for "fp8-tensorwise"."""
    quantization = _import_torchao().quantization
    granularity = quantization.PerTensor() if quantize == "fp8-tensorwise" else quantization.PerRow()
    return quantization.Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False)


def _quantize_linear(linear: nn.Linear, config: Any) -> None:
    weight = linear.weight.detach()
    if weight.shape[0] % 16 or weight.shape[1] % 16:
        return  # fp8 GEMMs need both dims to be multiples of 16 (torchao skips such layers too)
    if tuple(weight.shape) == (128, 128) and isinstance(config.granularity[1], type(_import_torchao().quantization.PerTensor())):
        # torchao 0.18 tells a tensorwise weight from a 128x128-block one by its block size alone,
        # which a 128x128 weight's tensorwise scale also has: its matmul then asserts. Only tiny
        # models have such layers; keep them bf16.
        return
    linear.weight = nn.Parameter(_fp8_tensor(weight, config), requires_grad=False)  # drops the bf16 weight


def _fp8_tensor(weight: torch.Tensor, config: Any) -> torch.Tensor:
    # What torchao's Float8DynamicActivationFloat8WeightConfig handler builds, minus its hardware
    # assertion (the CPU runs it through torch's CPU _scaled_mm) and its process-wide inductor knobs.
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor, QuantizeTensorToFloat8Kwargs

    activation, granularity = config.granularity
    return Float8Tensor.from_hp(
        weight, float8_dtype=config.weight_dtype, granularity=granularity, mm_config=config.mm_config,
        kernel_preference=config.kernel_preference,
        act_quant_kwargs=QuantizeTensorToFloat8Kwargs(config.activation_dtype, activation,
                                                      kernel_preference=config.kernel_preference),
    )


def _fused_attention(denoiser: nn.Module) -> list[nn.Module]:
    return [m for m in denoiser.modules() if any(isinstance(getattr(m, f, None), nn.Linear) for f in lora.FUSED_PARTS)]


def _fused_parts(denoiser: nn.Module) -> set[str]:
    """Names of the projections whose weights are views of a fused Q/K/V projection's."""
    attention = set(map(id, _fused_attention(denoiser)))
    return {f"{name}.{part}" for name, m in denoiser.named_modules() if id(m) in attention
            for fused, parts in lora.FUSED_PARTS.items() if getattr(m, fused, None) is not None for part in parts}


def _import_torchao() -> Any:
    try:
        import torchao.quantization
    except ImportError:
        raise ValueError("fp8 needs torchao: pip install 'ditmesh[fp8]' (torchao>=0.18)") from None
    return torchao


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the storages `model`'s parameters hold (fp8 data and scales; a DTensor's local
    shard; views such as fused Q/K/V's parts counted once)."""
    storages: dict[int, int] = {}
    for param in model.parameters():
        tensor = param.to_local() if isinstance(param, DTensor) else param
        for inner in [getattr(tensor, attr) for attr in getattr(tensor, "tensor_data_names", ())] or [tensor]:
            storage = inner.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
