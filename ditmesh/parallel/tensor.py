"""Tensor parallelism: Megatron-style sharding of a diffusion transformer over the "tensor" axis.

Every rank of the tensor group holds 1/T of each block's weights and computes 1/T of its heads
and MLP width. Per attention: q/k/v (and the text stream's add_q/k/v) are colwise, so each rank
computes whole heads; the output projection is rowwise and ends in one all-reduce. Per MLP: the
up projection is colwise, the down projection rowwise (one all-reduce). Activations between
blocks stay replicated, so after the last layer every rank holds the full output.

The sharding goes through torch DTensor (`parallelize_module` with `ColwiseParallel` /
`RowwiseParallel`). Which linear gets which style is data: a `TensorPlan` on the model's adapter
(`ditmesh/models/flux.py`, `sd3.py`). Weights are sliced here rather than by
`distribute_tensor`, so the same slicing serves a model in memory and `load_sharded`, which reads
only this rank's slice of each tensor from a safetensors folder.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ditmesh.models import adapter_for
from ditmesh.parallel import lora
from ditmesh.plans import COLWISE, COLWISE_GATHER, ROWWISE, SHARDED_NORM, PackedRowwise, Style, TensorPlan


@dataclass(frozen=True)
class ShardSpec:
    """How one parameter is split over the tensor ranks."""

    dim: int | None
    """Dimension split over ranks; None = replicated (a rowwise layer's bias)."""
    blocks: tuple[int, ...] = ()
    """Sizes along `dim` of the blocks, each split evenly over ranks (one block unless packed)."""


# ---- plan -> per-parameter shard specs (pure: works on a meta-device model, no process group) ----


def shard_specs(model: nn.Module, plan: TensorPlan, degree: int) -> dict[str, ShardSpec]:
    """Parameter name -> `ShardSpec` for every parameter the plan shards at `degree`.

    Raises `ValueError` naming the valid degrees if `degree` does not divide the heads or a width.
    """
    specs = _plan_specs(model, plan)
    check_degree(model, plan, degree, specs)
    return specs


def _plan_specs(model: nn.Module, plan: TensorPlan) -> dict[str, ShardSpec]:
    specs: dict[str, ShardSpec] = {}
    for name, style in plan.resolve(model).items():
        specs.update(_linear_specs(model, name, style))
    return specs


def _linear_specs(model: nn.Module, name: str, style: Style) -> dict[str, ShardSpec]:
    linear = model.get_submodule(name)
    if hasattr(linear, "base_layer"):  # a peft LoRA layer around the Linear
        raise ValueError(f"{name!r} holds LoRA adapters: {LORA_FIX}")
    if style == SHARDED_NORM:  # the norm's weight is split like the features it normalises
        return {f"{name}.weight": ShardSpec(0, (linear.weight.shape[0],))}
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"tensor plan names {name!r}, a {type(linear).__name__}; only nn.Linear can be sharded")
    if style in (COLWISE, COLWISE_GATHER):  # weight (out, in): split the out rows; bias with them
        weight = bias = ShardSpec(0, (linear.out_features,))
    elif style == ROWWISE:  # split the in columns; the bias is added once, after the all-reduce
        weight, bias = ShardSpec(1, (linear.in_features,)), ShardSpec(None)
    elif isinstance(style, PackedRowwise):
        parent = name.rpartition(".")[0]
        sizes = tuple(model.get_submodule(f"{parent}.{part}" if parent else part).out_features for part in style.parts)
        assert sum(sizes) == linear.in_features, f"{name}: parts {style.parts} give {sizes}, in_features {linear.in_features}"
        weight, bias = ShardSpec(1, sizes), ShardSpec(None)
    else:
        raise ValueError(f"unknown tensor-parallel style {style!r} for {name!r}; use {COLWISE}, {ROWWISE}, {COLWISE_GATHER} or PackedRowwise")
    specs = {f"{name}.weight": weight}
    if linear.bias is not None:
        specs[f"{name}.bias"] = bias
    return specs


def _num_heads(model: nn.Module, plan: TensorPlan) -> int:
    heads = {module.heads for module in plan.attention_modules(model).values()}
    assert len(heads) == 1, f"attention modules disagree on the head count: {heads}"
    return heads.pop()


def valid_degrees(model: nn.Module, plan: TensorPlan, specs: dict[str, ShardSpec] | None = None) -> list[int]:
    """Tensor degrees `model` can be split into: divisors of the head count that divide every sharded width."""
    specs = specs if specs is not None else _plan_specs(model, plan)
    heads = _num_heads(model, plan)
    sizes = [size for spec in specs.values() for size in spec.blocks]
    return [d for d in range(1, heads + 1) if heads % d == 0 and all(size % d == 0 for size in sizes)]


def check_degree(model: nn.Module, plan: TensorPlan, degree: int, specs: dict[str, ShardSpec] | None = None) -> None:
    """Raise `ValueError` naming the valid degrees unless `model` splits evenly over `degree` ranks."""
    valid = valid_degrees(model, plan, specs)
    if degree not in valid:
        raise ValueError(
            f"tensor_degree {degree} does not split the {_num_heads(model, plan)} attention heads of "
            f"{type(model).__name__} evenly; valid tensor degrees: {', '.join(map(str, valid))}"
        )


def local_slice(source: Any, spec: ShardSpec, rank: int, degree: int) -> torch.Tensor:
    """This rank's part of a full tensor (or of a safetensors slice, read without loading the rest).

    For each block along ``spec.dim`` take the rank-th of `degree` equal chunks; concatenate.
    """
    if spec.dim is None:
        return source[:]
    ndim = source.dim() if isinstance(source, torch.Tensor) else len(source.get_shape())
    parts, offset = [], 0
    for size in spec.blocks:
        chunk = size // degree
        index = [slice(None)] * ndim
        index[spec.dim] = slice(offset + rank * chunk, offset + (rank + 1) * chunk)
        parts.append(source[tuple(index)])
        offset += size
    return torch.cat(parts, dim=spec.dim)  # a copy: never a view keeping the full tensor alive


# ---- memory -------------------------------------------------------------------------------


def rank_parameter_bytes(model: nn.Module, plan: TensorPlan, degree: int, dtype: torch.dtype | None = None) -> int:
    """Parameter bytes one rank holds after sharding `model` over `degree` tensor ranks.

    Pure arithmetic over shapes: `model` may live on the meta device. `dtype` overrides the
    parameters' own (e.g. torch.bfloat16 for inference sizes).
    """
    specs = shard_specs(model, plan, degree)
    total = 0
    for name, param in model.named_parameters():
        numel = param.numel() // degree if name in specs and specs[name].dim is not None else param.numel()
        total += numel * (dtype or param.dtype).itemsize
    return total


def local_parameter_bytes(model: nn.Module) -> int:
    """Parameter bytes this rank actually holds (DTensor parameters count their local shard)."""
    return sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel() * p.dtype.itemsize for p in model.parameters()
    )


# ---- sharding -----------------------------------------------------------------------------


def apply(target: nn.Module, mesh: Any, adapter: Any, config: Any) -> nn.Module:
    """Shard `target` (a denoiser of `adapter`'s family, weights in memory) over the mesh's
    "tensor" axis, in place; return it. No-op at tensor_degree 1.

    Call on every rank with identical weights (loaded from the same folder or seed): each rank
    keeps its own slice, nothing is broadcast. Then the ordinary forward runs tensor-parallel and
    returns the full output on every rank of the tensor group. A model `load_sharded` already
    sharded over the same ranks is returned as it is.
    """
    if config.tensor_degree == 1:
        return target
    plan = _plan_of(adapter)
    tp_mesh = mesh.submesh("tensor")
    sharded = [p for p in target.parameters() if isinstance(p, DTensor)]
    if sharded:  # sharded already: by `load_sharded` (fine if over the same ranks) or on another mesh
        if all(p.device_mesh.mesh.tolist() == tp_mesh.mesh.tolist() for p in sharded):
            return target
        raise ValueError(
            f"{type(target).__name__} is already tensor-parallel over other ranks; "
            "shard it once, with the mesh you pass to parallelize"
        )
    _refuse_loras(target)  # before anything is sharded: the model stays usable
    params = dict(target.named_parameters())
    _shard(target, plan, tp_mesh, source=lambda name: params[name].detach(), device=None, dtype=None)
    _localize_attention(target, plan, tp_mesh)
    # LoRAs loaded later would add full-width products to sharded outputs: refuse them when
    # loaded through the pipeline, else at the next forward (every rank loads the same ones, so
    # all raise before any collective).
    lora.refuse_loads(target, f"LoRAs cannot be loaded after parallelize: {LORA_FIX}")
    target.register_forward_pre_hook(lambda module, args: _refuse_loras(module))
    return target


LORA_FIX = ("tensor parallelism shards plain Linear layers; bake the LoRAs in before parallelize with "
            "pipe.fuse_lora() then pipe.unload_lora_weights(), or use ulysses, ring, cfg or data parallelism, "
            "which keep LoRAs switchable")


def _refuse_loras(model: nn.Module) -> None:
    layers = [name for name, _ in lora.tuner_layers(model)]
    if layers:
        raise ValueError(f"LoRA layers on {lora.short_list(layers)}: {LORA_FIX}")


def _plan_of(adapter: Any) -> TensorPlan:
    if adapter.tensor_plan is None:
        raise ValueError(
            f"tensor parallelism has no plan for {adapter.name} models; set tensor_degree=1 and use "
            "data, cfg or sequence parallelism instead"
        )
    return adapter.tensor_plan


def _shard(
    model: nn.Module,
    plan: TensorPlan,
    tp_mesh: DeviceMesh,
    source: Callable[[str], Any],
    device: torch.device | None,
    dtype: torch.dtype | None,
) -> None:
    """Replace the planned parameters by DTensors of this rank's slices and hook the layers."""
    degree, rank = tp_mesh.size(), tp_mesh.get_local_rank()
    specs = shard_specs(model, plan, degree)  # raises before anything is touched
    for name, spec in specs.items():
        old = model.get_parameter(name)
        local = _place(local_slice(source(name), spec, rank, degree), device or old.device, dtype)
        placement = Replicate() if spec.dim is None else Shard(spec.dim)
        dtensor = DTensor.from_local(local, tp_mesh, [placement], run_check=False)
        _set(model, name, nn.Parameter(dtensor, requires_grad=old.requires_grad))
    # The parameters are DTensors already, so these styles only add their input/output hooks
    # (distribute_tensor returns a DTensor with matching placements as it is).
    for name, style in plan.resolve(model).items():
        if style == SHARDED_NORM:
            _set(model, name, ShardedRMSNorm(model.get_submodule(name), tp_mesh))
        else:
            parallelize_module(model.get_submodule(name), tp_mesh, _torch_style(style))


class ShardedRMSNorm(nn.Module):
    """`nn.RMSNorm` over features split across the tensor ranks (`SHARDED_NORM`): each rank scales
    its slice by the root mean square of the whole width (sum of squares all-reduced over the
    tensor group: every rank of it must run every forward) and by its slice of the weight."""

    def __init__(self, norm: nn.RMSNorm, tp_mesh: DeviceMesh):
        super().__init__()
        if not isinstance(norm, nn.RMSNorm) or norm.weight is None:
            raise ValueError(f"{SHARDED_NORM} needs an nn.RMSNorm with a weight, got {type(norm).__name__}")
        self.weight = norm.weight  # DTensor, Shard(0): this rank's features
        self.width, self.eps, self.tp_mesh = norm.normalized_shape[-1], norm.eps, tp_mesh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = _wait(funcol.all_reduce(x.float().square().sum(-1, keepdim=True), "sum", self.tp_mesh))
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        return (x.float() * torch.rsqrt(squares / self.width + eps)).type_as(x) * weight


def _localize_attention(model: nn.Module, plan: TensorPlan, tp_mesh: DeviceMesh) -> None:
    """Make the attention modules work on this rank's heads (after every parameter is real)."""
    degree = tp_mesh.size()
    for attn in plan.attention_modules(model).values():
        # diffusers' processors reshape q/k/v with the public `attn.heads` (SD3's JointAttnProcessor2_0:
        # head_dim = inner_dim // attn.heads); after colwise q/k/v a rank holds heads // degree of them.
        attn.heads //= degree
        _sum_grads_over_heads(attn, tp_mesh)


def _sum_grads_over_heads(attn: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Replicated parameters inside an attention module (the per-head q/k RMSNorm weights) see
    only this rank's heads, so each rank's gradient is a partial sum: all-reduce it in backward.

    Hazard: the hooks run collectives in backward order; every rank of the tensor group runs
    the same graph with the same trainable parameters, else they deadlock.
    """
    for param in attn.parameters():
        if not isinstance(param, DTensor) and param.requires_grad:
            param.register_hook(lambda grad: _wait(funcol.all_reduce(grad, "sum", tp_mesh)))


# ---- fused Q/K/V on sharded heads (the CUDA fast path's step 1, under tensor parallelism) ----


def fuse_qkv(target: nn.Module, mesh: Any, adapter: Any) -> int:
    """One colwise Q/K/V matmul per attention module of a tensor-parallel `target` (after `apply`),
    where its processors support diffusers' fused projections (FLUX); returns how many were fused.

    diffusers' own `fuse_qkv_projections` would concatenate the DTensor weights along their
    sharded dim (an all-gather, and the whole width on every rank). Here each rank concatenates its
    local rows instead: [q_r; k_r; v_r] for its heads, a `Shard(0)` DTensor whose global view is
    in rank order (like `PackedRowwise`), so ``to_qkv(x).chunk(3, -1)`` gives this rank's q, k, v.
    The unfused projections become views of it: no weight is stored twice.
    """
    if not lora.fusable(target):
        return 0
    tp_mesh, count = mesh.submesh("tensor"), 0
    for attn in _plan_of(adapter).attention_modules(target).values():
        if not getattr(attn, "_supports_qkv_fusion", False) or getattr(attn, "is_cross_attention", False) \
                or getattr(attn, "fused_projections", False):
            continue
        # Every group the module has (to_q/k/v; add_q/k/v_proj where text is projected apart) is
        # fused, or none: a fused processor reads both fused projections.
        groups = {name: [getattr(attn, part, None) for part in parts] for name, parts in lora.FUSED_PARTS.items()}
        groups = {name: linears for name, linears in groups.items() if any(linear is not None for linear in linears)}
        if not groups or not all(isinstance(linear, nn.Linear) and isinstance(linear.weight, DTensor)
                                 for linears in groups.values() for linear in linears):
            continue
        for fused_name, linears in groups.items():
            setattr(attn, fused_name, _fused_colwise(linears, tp_mesh))
        attn.fused_projections = True
        count += 1
    return count


def _fused_colwise(linears: list[nn.Linear], tp_mesh: DeviceMesh) -> nn.Linear:
    """A colwise Linear of this rank's rows of `linears`, stacked; each of `linears` then holds a view."""
    fused = nn.Linear(linears[0].in_features, sum(linear.out_features for linear in linears),
                      bias=linears[0].bias is not None, device="meta")
    for pname in ("weight", "bias") if fused.bias is not None else ("weight",):
        local = torch.cat([getattr(linear, pname).to_local() for linear in linears])  # (3 * out / T, ...)
        requires_grad = getattr(linears[0], pname).requires_grad
        setattr(fused, pname, nn.Parameter(DTensor.from_local(local, tp_mesh, [Shard(0)], run_check=False), requires_grad))
        offset = 0
        for linear in linears:
            rows = getattr(linear, pname).to_local().shape[0]
            view = DTensor.from_local(local[offset:offset + rows], tp_mesh, [Shard(0)], run_check=False)
            setattr(linear, pname, nn.Parameter(view, requires_grad))
            offset += rows
    return parallelize_module(fused, tp_mesh, ColwiseParallel())


def _wait(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.wait() if isinstance(tensor, funcol.AsyncCollectiveTensor) else tensor


def _torch_style(style: Style):
    if style == COLWISE:
        return ColwiseParallel()  # output Shard(-1), handed on as the local tensor
    if style == COLWISE_GATHER:
        return ColwiseParallel(output_layouts=Replicate())  # all-gather of the (small) output
    return RowwiseParallel()  # input Shard(-1) -> partial sums -> all-reduce -> + bias


def _place(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=dtype)


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, value)


# ---- loading ------------------------------------------------------------------------------


def load_sharded(
    folder: str | Path,
    mesh: Any,
    *,
    subfolder: str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a denoiser from a local diffusers folder, each rank reading only its slice.

    `folder` (or ``folder/subfolder``, e.g. subfolder="transformer" of a pipeline folder) holds
    config.json and ``diffusion_pytorch_model.safetensors``, or shards listed in
    ``diffusion_pytorch_model.safetensors.index.json``. The model is built on the meta device,
    its planned parameters become DTensors of this rank's slice (read with safetensors'
    ``get_slice``), the rest are read whole; the full model never exists on a rank. Collective:
    call on every rank. Returns the model in eval mode on the mesh's device.
    """
    import diffusers  # on first use: importing diffusers takes seconds

    folder = Path(folder) / (subfolder or "")
    config = json.loads((folder / "config.json").read_text())
    model_cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        model = model_cls.from_config(config)
    plan, tp_mesh = _plan_of(adapter_for(model)), mesh.submesh("tensor")
    with ExitStack() as stack:
        checkpoint = _Checkpoint(folder, stack)
        _shard(model, plan, tp_mesh, checkpoint.slice, mesh.device, dtype)
        _load_replicated(model, checkpoint, mesh.device, dtype)
    _localize_attention(model, plan, tp_mesh)
    return model.eval()


class _Checkpoint:
    """The tensors of a diffusers safetensors folder, read lazily: whole or one slice at a time."""

    def __init__(self, folder: Path, stack: ExitStack):
        from safetensors import safe_open

        self.folder = folder
        self.handles: dict[str, Any] = {}  # tensor name -> open file
        for file in self._files():
            handle = stack.enter_context(safe_open(str(folder / file), framework="pt", device="cpu"))
            self.handles.update(dict.fromkeys(handle.keys(), handle))

    def _files(self) -> list[str]:
        index = self.folder / "diffusion_pytorch_model.safetensors.index.json"
        if index.exists():
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if (self.folder / "diffusion_pytorch_model.safetensors").exists():
            return ["diffusion_pytorch_model.safetensors"]
        found = ", ".join(sorted(p.name for p in self.folder.iterdir())) or "nothing"
        raise ValueError(
            f"{self.folder} has no diffusion_pytorch_model.safetensors(.index.json) (found: {found}); "
            "save the model with save_pretrained(folder) (safetensors is the default)"
        )

    def _handle(self, name: str) -> Any:
        if name not in self.handles:
            raise ValueError(f"{self.folder} has no tensor {name!r}; is it a checkpoint of this model class?")
        return self.handles[name]

    def slice(self, name: str) -> Any:
        """A lazy view: indexing it reads only the selected part from disk."""
        return self._handle(name).get_slice(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)


def _load_replicated(model: nn.Module, checkpoint: _Checkpoint, device: torch.device, dtype: torch.dtype | None) -> None:
    """Read every parameter and persistent buffer still on the meta device whole."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, DTensor) or not tensor.is_meta:
            continue
        value = _place(checkpoint.tensor(name), device, dtype)
        _set(model, name, nn.Parameter(value, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else value)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if not isinstance(t, DTensor) and t.is_meta]
    if left:
        raise ValueError(f"{type(model).__name__} has tensors the checkpoint cannot fill (non-persistent buffers?): {left}")
