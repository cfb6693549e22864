"""Tensor parallelism: tiny FLUX / SD3 sharded over 2 and 4 gloo ranks vs the same model run serially."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import ditmesh
from ditmesh import ParallelConfig
from ditmesh.models import adapter_for
from ditmesh.models.tiny import (
    flux_transformer_inputs,
    sd3_transformer_inputs,
    tiny_flux_transformer,
    tiny_pipeline,
    tiny_sd3_transformer,
    tiny_sdxl_unet,
)
from ditmesh.parallel import tensor
from ditmesh.parallel.mesh import ParallelMesh

FORWARD_ATOL = 1e-4  # fp32, max abs; only the summation order of the all-reduces differs
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def _build(family: str, num_heads: int = 4):
    if family == "flux":
        return tiny_flux_transformer(num_heads=num_heads), flux_transformer_inputs(height=16, width=16)
    return tiny_sd3_transformer(num_heads=num_heads), sd3_transformer_inputs(height=16, width=16)


def _tensor_mesh() -> ParallelMesh:
    return ParallelMesh.build(ParallelConfig(tensor_degree=dist.get_world_size()))


def _sharded(family: str, num_heads: int = 4):
    """(serial model, the same model sharded over all ranks, inputs, mesh)."""
    serial, inputs = _build(family, num_heads)
    model, _ = _build(family, num_heads)
    mesh = _tensor_mesh()
    tensor.apply(model, mesh, adapter_for(model), mesh.config)
    return serial, model, inputs, mesh


# ---- rank functions -----------------------------------------------------------------------


def _forward_diff(family: str, num_heads: int) -> float:
    serial, model, inputs, _ = _sharded(family, num_heads)
    with torch.no_grad():
        expected, got = serial(**inputs)[0], model(**inputs)[0]
    assert not isinstance(got, DTensor) and got.shape == expected.shape
    return (got - expected).abs().max().item()


def _check_grads(family: str) -> int:
    serial, model, inputs, mesh = _sharded(family)
    degree, rank = mesh.size("tensor"), mesh.rank("tensor")
    specs = tensor.shard_specs(serial, adapter_for(serial).tensor_plan, degree)
    for net in (serial, model):
        out = net(**inputs)[0]
        weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)  # same on every rank
        (out * weights).sum().backward()
    serial_params = dict(serial.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        expected = serial_params[name].grad
        got = param.grad
        if isinstance(got, DTensor):
            got = got.to_local()
        if name in specs:
            expected = tensor.local_slice(expected, specs[name], rank, degree)
        torch.testing.assert_close(got, expected, **GRAD_TOL, msg=lambda m: f"{name}: {m}")
        checked += 1
    return checked


def _parameter_bytes(family: str) -> dict[str, int]:
    serial, model, _, mesh = _sharded(family)
    degree = mesh.size("tensor")

    def block_bytes(net):
        return sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel() * 4
            for name, p in net.named_parameters()
            if name.startswith(BLOCKS)
        )

    with torch.device("meta"):
        meta = _build(family)[0]
    return dict(
        serial_blocks=block_bytes(serial),
        local_blocks=block_bytes(model),
        local=tensor.local_parameter_bytes(model),
        predicted=tensor.rank_parameter_bytes(meta, adapter_for(meta).tensor_plan, degree),
    )


def _load_diff(folder: str, family: str) -> float:
    serial, inputs = _build(family)
    mesh = _tensor_mesh()
    model = tensor.load_sharded(folder, mesh)
    degree = mesh.size("tensor")
    for name, param in model.named_parameters():
        assert not param.is_meta, name
    to_q = model.get_parameter("transformer_blocks.0.attn.to_q.weight")
    assert to_q.to_local().shape[0] == serial.transformer_blocks[0].attn.to_q.out_features // degree
    # parallelize() on a model load_sharded already sharded over the same ranks leaves it as it is.
    model = ditmesh.parallelize(model, ParallelConfig(tensor_degree=degree))
    expected, got = serial(**inputs)[0], model(**inputs)[0]
    # The replicated per-head norm weights are loaded after sharding: their gradient must still be summed.
    expected.sum().backward()
    got.sum().backward()
    norm_q = "transformer_blocks.0.attn.norm_q.weight"
    torch.testing.assert_close(model.get_parameter(norm_q).grad, serial.get_parameter(norm_q).grad, **GRAD_TOL)
    return (got - expected).abs().max().item()


def _composed_diff(family: str, spec: str) -> float:
    serial, inputs = _build(family)
    model, _ = _build(family)
    model = ditmesh.parallelize(model, ParallelConfig.parse(spec))
    with torch.no_grad():
        return (model(**inputs)[0] - serial(**inputs)[0]).abs().max().item()


def _pipeline_folder_diff(folder: str) -> float:
    """The documented path: transformer loaded sharded, the rest of the pipeline from the same folder."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    config = ParallelConfig(tensor_degree=dist.get_world_size())
    mesh = ParallelMesh.build(config)
    transformer = tensor.load_sharded(folder, mesh, subfolder="transformer")
    loaded = FluxPipeline.from_pretrained(folder, transformer=transformer)
    components = dict(loaded.components)  # parallelize drops the text encoders where it does not encode
    pipe = ditmesh.parallelize(loaded, config, mesh)
    assert pipe.transformer is transformer and isinstance(transformer.transformer_blocks[0].attn.to_q.weight, DTensor)
    # the serial twin shares every other component; only its transformer is loaded whole
    whole = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    serial = FluxPipeline(**{**components, "transformer": whole})
    call = dict(prompt="a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="latent")
    expected = serial(**call, generator=torch.Generator().manual_seed(0)).images
    got = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    return (got - expected).abs().max().item()


def _bad_degree_message(num_heads: int) -> str:
    model, _ = _build("flux", num_heads)
    mesh = _tensor_mesh()
    try:
        tensor.apply(model, mesh, adapter_for(model), mesh.config)
    except ValueError as exc:
        assert not any(isinstance(p, DTensor) for p in model.parameters()), "a failed apply must touch nothing"
        return str(exc)
    return "no error"


def _parallelize_transformer_diff(family: str) -> float:
    serial, inputs = _build(family)
    model, _ = _build(family)
    model = ditmesh.parallelize(model, ParallelConfig(tensor_degree=dist.get_world_size()))
    assert any(isinstance(p, DTensor) for p in model.parameters())
    with torch.no_grad():
        return (model(**inputs)[0] - serial(**inputs)[0]).abs().max().item()


def _parallelize_pipeline_diff(name: str) -> float:
    call = dict(prompt="a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="latent")
    serial = tiny_pipeline(name)
    pipe = ditmesh.parallelize(tiny_pipeline(name), ParallelConfig(tensor_degree=dist.get_world_size()))
    assert any(isinstance(p, DTensor) for p in pipe.transformer.parameters())
    expected = serial(**call, generator=torch.Generator().manual_seed(0)).images
    got = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    return (got - expected).abs().max().item()


def _compiled_diff() -> tuple[float, int, int]:
    """parallelize(compile=True) at tensor=W on a 1+1-block FLUX, Q/K/V fused on each rank's heads
    (what the CUDA fast path adds), vs the serial model: (max abs diff, fused modules, graphs)."""
    from torch._dynamo.utils import counters

    from ditmesh.parallel import fastpath

    build = lambda: tiny_flux_transformer(num_layers=1, num_single_layers=1)  # noqa: E731
    serial, model, inputs = build(), build(), flux_transformer_inputs(height=16, width=16)
    mesh = _tensor_mesh()
    # Inductor takes minutes on a shared CPU; aot_eager traces the same graphs (DTensor desugared,
    # functional collectives inside) and runs them eagerly. The GPU path (inductor) is measured
    # by benchmarks/tp_step.py.
    defaults = fastpath.compile_repeated_blocks.__kwdefaults__
    backend, defaults["backend"] = defaults["backend"], "aot_eager"
    counters.clear()
    try:
        model = ditmesh.parallelize(model, mesh.config, mesh, compile=True)
        fused = tensor.fuse_qkv(model, mesh, adapter_for(model))
        with torch.no_grad():
            got, expected = model(**inputs)[0], serial(**inputs)[0]
        graphs = counters["stats"]["unique_graphs"]
    finally:
        defaults["backend"] = backend
        torch._dynamo.reset()
    return (got - expected).abs().max().item(), fused, graphs


def _sdxl_message() -> str:
    try:
        ditmesh.parallelize(tiny_sdxl_unet(), ParallelConfig(tensor_degree=dist.get_world_size()))
    except ValueError as exc:
        return str(exc)
    return "no error"


# ---- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("world", [2, 4])
def test_forward_matches_serial(pools, family, world):
    diffs = pools(world).run(_forward_diff, family, 4)
    assert max(diffs) <= FORWARD_ATOL, diffs


@pytest.mark.slow
def test_forward_matches_serial_8_ranks(pools):
    diffs = pools(8).run(_forward_diff, "flux", 8)
    assert max(diffs) <= FORWARD_ATOL, diffs


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_gradients_match_serial(pools, family):
    checked = pools(2).run(_check_grads, family)
    assert checked[0] == len(list(tiny_flux_transformer().parameters() if family == "flux" else tiny_sd3_transformer().parameters()))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_gradients_match_serial_4_ranks(pools, family):
    pools(4).run(_check_grads, family)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_holds_a_tth_of_the_blocks(pools, family, world):
    for sizes in pools(world).run(_parameter_bytes, family):
        # Per-head q/k RMSNorm weights and rowwise biases stay replicated: a few % at tiny sizes.
        assert sizes["local_blocks"] <= sizes["serial_blocks"] / world * 1.05, sizes
        assert sizes["local"] == sizes["predicted"], sizes


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("max_shard_size", [None, "100KB"])
def test_load_sharded_matches_serial(pools, tmp_path, family, max_shard_size):
    model, _ = _build(family)
    kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    model.save_pretrained(tmp_path, **kwargs)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    assert index.exists() == (max_shard_size is not None)  # both layouts really are exercised
    diffs = pools(2).run(_load_diff, str(tmp_path), family)
    assert max(diffs) <= FORWARD_ATOL, diffs


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("spec", ["tensor=2,ulysses=2", "tensor=2,ring=2"])
def test_composes_with_sequence_parallelism(pools, family, spec):
    diffs = pools(4).run(_composed_diff, family, spec)
    assert max(diffs) <= FORWARD_ATOL, diffs


def test_load_sharded_pipeline_folder(pools, tmp_path):
    tiny_pipeline("tiny-flux").save_pretrained(tmp_path)
    diffs = pools(2).run(_pipeline_folder_diff, str(tmp_path))
    assert max(diffs) <= FORWARD_ATOL, diffs


def test_degree_not_dividing_heads_names_valid_degrees(pools):
    model = tiny_flux_transformer(num_heads=4)
    with pytest.raises(ValueError, match=r"tensor_degree 3 .* 4 attention heads .*valid tensor degrees: 1, 2, 4$"):
        tensor.shard_specs(model, adapter_for(model).tensor_plan, 3)
    for message in pools(2).run(_bad_degree_message, 3):
        assert "valid tensor degrees: 1, 3" in message, message


def test_parallelize_transformer(pools):
    diffs = pools(2).run(_parallelize_transformer_diff, "sd3")
    assert max(diffs) <= FORWARD_ATOL, diffs


def test_parallelize_pipeline(pools):
    diffs = pools(2).run(_parallelize_pipeline_diff, "tiny-flux")
    assert max(diffs) <= FORWARD_ATOL, diffs


def test_no_plan_is_a_value_error(pools):
    for message in pools(2).run(_sdxl_message):
        assert "no plan for sdxl" in message, message


def test_compiled_with_fused_qkv_matches_serial(pools):
    # Fails without the TP fusion (tensor.fuse_qkv missing) or when parallelize refuses compile=True.
    for diff, fused, graphs in pools(2).run(_compiled_diff, timeout=300):
        assert fused == 2, fused  # the double block's (image and text Q/K/V) and the single block's module
        assert graphs >= 2, graphs  # one per block class at least: the blocks really ran compiled
        assert diff <= FORWARD_ATOL, diff
