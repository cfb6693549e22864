"""Sequence parallelism (Ulysses, ring, USP) on tiny FLUX / SD3 vs the same model run serially.

Every rank builds the same tiny model from the same seed, runs it serially (the reference) and
through `ditmesh.parallel.sequence.apply` on the gloo mesh; outputs must agree to 1e-4 max abs
error (fp32, `assert_close(atol=1e-4, rtol=0)`), gradients to 1e-4 abs + 1e-3 rel.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ditmesh.config import ParallelConfig
from ditmesh.models import adapter_for
from ditmesh.models.tiny import flux_transformer_inputs, sd3_transformer_inputs, tiny_flux_transformer, tiny_sd3_transformer
from ditmesh.parallel import sequence
from ditmesh.parallel.mesh import ParallelMesh

OUT_TOL = dict(atol=1e-4, rtol=0)
GRAD_TOL = dict(atol=1e-4, rtol=1e-3)


def _mesh(config: ParallelConfig) -> ParallelMesh:
    return ParallelMesh.build(config)  # per job: the pool destroys a job's groups when it ends


def _tiny(family: str, num_heads: int, size: tuple[int, int], batch: int, text_len: int = 5):
    """(model, inputs): FLUX sizes are latent pixels (tokens = h/2 * w/2), SD3 latent size (patch 2)."""
    height, width = size
    if family == "flux":
        model = tiny_flux_transformer(num_heads=num_heads, head_dim=16, num_layers=1, num_single_layers=1)
        inputs = flux_transformer_inputs(batch=batch, height=height, width=width, text_len=text_len)
    elif family == "sd35m":  # SD3.5-medium: blocks with a second, image-only attention (attn2)
        model = _tiny_sd35_medium(num_heads)
        inputs = sd3_transformer_inputs(batch=batch, height=height, width=width, text_len=text_len)
    else:
        model = tiny_sd3_transformer(num_heads=num_heads, head_dim=16, num_layers=2)
        inputs = sd3_transformer_inputs(batch=batch, height=height, width=width, text_len=text_len)
    return model, inputs


def _tiny_sd35_medium(num_heads: int):
    from diffusers import SD3Transformer2DModel

    from ditmesh.models.tiny import CLIP_DIM, LATENT_CHANNELS, T5_DIM

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=16,
        num_attention_heads=num_heads, joint_attention_dim=T5_DIM, caption_projection_dim=num_heads * 16,
        pooled_projection_dim=2 * CLIP_DIM, out_channels=LATENT_CHANNELS, pos_embed_max_size=32,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()


def check_forward(family, degrees, num_heads=4, size=(16, 16), batch=1, backend="auto", text_len=5):
    config = ParallelConfig(**degrees, attention_backend=backend)
    mesh = _mesh(config)
    model, inputs = _tiny(family, num_heads, size, batch, text_len)
    seen = []  # (text, image) tokens entering the first block on this rank
    model.transformer_blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["encoder_hidden_states"].shape[1], kwargs["hidden_states"].shape[1])),
        with_kwargs=True)
    with torch.no_grad():
        expected = model(**inputs)[0]
        handle = sequence.apply(model, mesh, adapter_for(model), config)
        out = model(**inputs)[0]
        handle.remove()
        restored = model(**inputs)[0]  # serial again: original processors, no hooks
    torch.testing.assert_close(out, expected, **OUT_TOL)
    torch.testing.assert_close(restored, expected, atol=0, rtol=0)
    # Both streams are sharded: a rank holds ceil(n / degree) text and image tokens, no more.
    (text, image), degree = seen[0], mesh.size("sequence")
    assert seen[1] == (-(-text // degree), -(-image // degree)), (seen, degree)
    return (out - expected).abs().max().item()


def check_backward(family, degrees, num_heads=4, size=(12, 14), checkpointing=False, text_len=5):
    config = ParallelConfig(**degrees)
    mesh = _mesh(config)
    model, inputs = _tiny(family, num_heads, size, batch=1, text_len=text_len)
    if checkpointing:
        model.enable_gradient_checkpointing()
    grads_in = ("hidden_states", "encoder_hidden_states")
    weight = torch.randn(model(**inputs)[0].shape, generator=torch.Generator().manual_seed(1))

    def run(net):
        args = {k: (v.clone().requires_grad_(True) if k in grads_in else v) for k, v in inputs.items()}
        (net(**args)[0] * weight).sum().backward()
        return {name: p.grad for name, p in net.named_parameters()}, {k: args[k].grad for k in grads_in}

    expected_params, expected_inputs = run(model)
    parallel = copy.deepcopy(model)
    parallel.zero_grad(set_to_none=True)
    sequence.apply(parallel, mesh, adapter_for(parallel), config)
    params, input_grads = run(parallel)
    # Gradients on each sequence rank are partial sums (see docs/sequence.md): reduce them.
    sequence.reduce_sequence_grads(parallel, mesh)
    for grad in input_grads.values():
        torch.distributed.all_reduce(grad, group=mesh.group("sequence"))
    for name, grad in expected_params.items():
        torch.testing.assert_close(params[name], grad, **GRAD_TOL, msg=lambda m: f"grad of {name}: {m}")
    for name, grad in expected_inputs.items():
        torch.testing.assert_close(input_grads[name], grad, **GRAD_TOL, msg=lambda m: f"grad of input {name}: {m}")
    return len(params)


def check_parallelize(degrees):
    from ditmesh import parallelize

    config = ParallelConfig(**degrees)
    model, inputs = _tiny("flux", 4, (16, 16), 1)
    with torch.no_grad():
        expected = model(**inputs)[0]
        wrapped = parallelize(model, config, mesh=_mesh(config))
        out = wrapped(**inputs)[0]
    torch.testing.assert_close(out, expected, **OUT_TOL)
    with pytest.raises(ValueError, match="already applied"):
        sequence.apply(wrapped, _mesh(config), adapter_for(wrapped), config)
    return True


def check_compiled(family, degrees, size, text_len=5):
    """Blocks compiled whole (fullgraph) around the sequence-parallel attention, as `parallelize`
    does on CUDA: the Ulysses all-to-alls and the ring's all-gather trace into the graphs."""
    from torch._dynamo.utils import counters

    from ditmesh import parallelize
    from ditmesh.parallel.fastpath import compile_repeated_blocks

    config = ParallelConfig(**degrees)
    model, inputs = _tiny(family, 4, size, 1, text_len)
    with torch.no_grad():
        expected = model(**inputs)[0]
        wrapped = parallelize(model, config, mesh=_mesh(config), compile=False)
        compile_repeated_blocks(wrapped, backend="aot_eager")
        graphs = counters["stats"]["unique_graphs"]
        out = wrapped(**inputs)[0]
    assert counters["stats"]["unique_graphs"] > graphs, "nothing was compiled"
    torch.testing.assert_close(out, expected, **OUT_TOL)
    return (out - expected).abs().max().item()


def check_graphs_refused_for_pipefusion():
    from ditmesh import parallelize

    # Tensor parallelism compiles and graphs now (tests/test_tensor.py); PipeFusion's P2P schedule
    # runs inside its one denoiser call, which no graph can hold.
    model, _ = _tiny("flux", 4, (16, 16), 1)
    with pytest.raises(ValueError, match="cuda_graphs=True cannot capture PipeFusion's P2P .* pass cuda_graphs=None or False"):
        parallelize(model, ParallelConfig(pipefusion_degree=2), cuda_graphs=True)
    return True


def check_pipeline(name, degrees):
    """A whole tiny pipeline call through `parallelize` vs the serial pipeline (rank 0's images)."""
    from ditmesh import parallelize
    from ditmesh.models.tiny import tiny_pipeline

    config = ParallelConfig(**degrees)
    call = dict(prompt="a cat", height=128, width=128, num_inference_steps=2, output_type="pt")
    expected = tiny_pipeline(name)(**call, generator=torch.Generator().manual_seed(0)).images
    pipe = parallelize(tiny_pipeline(name), config, mesh=_mesh(config))
    images = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    if torch.distributed.get_rank() == 0:
        torch.testing.assert_close(images, expected, **OUT_TOL)
    return True


def check_shard_order(degrees):
    """Shards follow the flattened sequence axis: ring-major, ulysses-minor."""
    mesh = _mesh(ParallelConfig(**degrees))
    return mesh.rank("sequence") == mesh.rank("ring") * mesh.size("ulysses") + mesh.rank("ulysses")


# (world, degrees) — degrees not filling the world are completed with data replicas.
MODES = {
    "ulysses2": (2, dict(ulysses_degree=2)),
    "ring2": (2, dict(ring_degree=2)),
    "ulysses4": (4, dict(ulysses_degree=4)),
    "ring4": (4, dict(ring_degree=4)),
    "usp2x2": (4, dict(ring_degree=2, ulysses_degree=2)),
    "ulysses2_data2": (4, dict(ulysses_degree=2, data_degree=2)),
}


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("mode", list(MODES))
def test_forward_matches_serial(pools, family, mode):
    world, degrees = MODES[mode]
    errors = pools(world).run(check_forward, family, degrees)
    assert max(errors) <= 1e-4


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("mode", ["ulysses4", "ring4", "usp2x2"])
def test_uneven_tokens_and_heads(pools, family, mode):
    # FLUX 10x14 latents -> 5*7 = 35 tokens; SD3 14x10 latents, patch 2 -> 35 tokens: not a
    # multiple of 4 (or 2). 3 heads do not divide by ulysses 2 or 4. Batch 2.
    world, degrees = MODES[mode]
    pools(world).run(check_forward, family, degrees, num_heads=3, size=(10, 14) if family == "flux" else (14, 10), batch=2)


def test_more_ranks_than_tokens_per_block(pools):
    # 3x3 packed tokens = 9 image tokens over 4 ranks: the last rank's shard is mostly padding.
    pools(4).run(check_forward, "flux", dict(ring_degree=2, ulysses_degree=2), size=(6, 6))


def test_math_backend(pools):
    pools(2).run(check_forward, "sd3", dict(ulysses_degree=2), backend="math")


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("mode", ["ulysses2", "ring2", "usp2x2"])
def test_backward_matches_serial(pools, family, mode):
    world, degrees = MODES[mode]
    pools(world).run(check_backward, family, degrees)


def test_backward_with_gradient_checkpointing(pools):
    # Checkpointed blocks re-run their forward (and its exchanges) during backward.
    pools(4).run(check_backward, "flux", MODES["usp2x2"][1], checkpointing=True)


@pytest.mark.parametrize("mode", ["ulysses2", "ring2"])
def test_sd35_medium_image_only_attention(pools, mode):
    world, degrees = MODES[mode]
    pools(world).run(check_forward, "sd35m", degrees, num_heads=3, size=(14, 10))


def test_parallelize_entry_point(pools):
    assert all(pools(2).run(check_parallelize, dict(ulysses_degree=2)))


@pytest.mark.parametrize("name,mode", [("tiny-flux", "ulysses2"), ("tiny-sd3", "ring2")])
def test_pipeline_end_to_end(pools, name, mode):
    world, degrees = MODES[mode]
    assert all(pools(world).run(check_pipeline, name, degrees))


@pytest.mark.parametrize("degrees", [dict(tensor_degree=2, ulysses_degree=2), dict(tensor_degree=2, ring_degree=2)])
def test_composes_with_tensor_parallel(pools, degrees):
    # parallelize applies tensor parallelism first (heads per rank halve), then sequence.
    pools(4).run(check_parallelize_uneven, degrees)


def check_parallelize_uneven(degrees):
    from ditmesh import parallelize

    config = ParallelConfig(**degrees)
    model, inputs = _tiny("flux", 4, (10, 14), 1)
    with torch.no_grad():
        expected = model(**inputs)[0]
        out = parallelize(model, config, mesh=_mesh(config))(**inputs)[0]
    torch.testing.assert_close(out, expected, **OUT_TOL)


def test_shard_order_is_ring_major(pools):
    assert all(pools(4).run(check_shard_order, dict(ring_degree=2, ulysses_degree=2)))


def check_sdpa_backend_refused_for_ring():
    config = ParallelConfig(ring_degree=2, attention_backend="sdpa")
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
    with pytest.raises(ValueError, match="log-sum-exp"):
        sequence.apply(model, _mesh(ParallelConfig(ring_degree=2)), adapter_for(model), config)
    return True


def test_sdpa_backend_refused_for_ring(pools):
    assert all(pools(2).run(check_sdpa_backend_refused_for_ring))


@pytest.mark.parametrize("family,mode,size", [("flux", "usp2x2", (12, 14)), ("sd3", "ring2", (16, 16))])
def test_compiled_blocks_match_serial(pools, family, mode, size):
    world, degrees = MODES[mode]
    assert max(pools(world).run(check_compiled, family, degrees, size)) <= 1e-4


def test_cuda_graphs_refused_under_pipefusion(pools):
    assert all(pools(2).run(check_graphs_refused_for_pipefusion))


# ---- Ulysses in pipelined head groups ---------------------------------------------------------


def check_head_groups(family, degrees, num_heads, size, batch=1, backward=False, compiled=False):
    """`check_forward` / `check_backward` / `check_compiled` with `ulysses_head_groups` set;
    returns the all-to-alls started per forward (each head group travels on its own)."""
    from ditmesh.parallel import ulysses

    started = []
    original = ulysses.start_exchange
    ulysses.start_exchange = lambda *a, **k: started.append(1) or original(*a, **k)
    try:
        if backward:
            check_backward(family, degrees, num_heads=num_heads, size=size)
        elif compiled:
            assert check_compiled(family, degrees, size) <= 1e-4
        else:
            check_forward(family, degrees, num_heads=num_heads, size=size, batch=batch)
    finally:
        ulysses.start_exchange = original
    return len(started)


# (family, world, degrees, heads, size, batch, exchanges per forward: 2 attention layers x 2 ways x groups)
HEAD_GROUPS = {
    "flux-ulysses2-2groups": ("flux", 2, dict(ulysses_degree=2, ulysses_head_groups=2), 4, (16, 16), 1, 2 * 2 * 2),
    # 6 heads pad to 8 at degree 4: 2 per rank, so 3 groups are capped at 2; 35 tokens, batch 2.
    "sd3-ulysses4-capped": ("sd3", 4, dict(ulysses_degree=4, ulysses_head_groups=3), 6, (14, 10), 2, 2 * 2 * 2),
    # 6 heads at ulysses 2: 3 per rank in 3 groups, the ring inside each group's attention.
    "flux-usp2x2-3groups": ("flux", 4, dict(ring_degree=2, ulysses_degree=2, ulysses_head_groups=3), 6, (10, 14), 2, 2 * 2 * 3),
}


@pytest.mark.parametrize("case", list(HEAD_GROUPS))
def test_ulysses_head_groups_match_serial(pools, case):
    family, world, degrees, heads, size, batch, exchanges = HEAD_GROUPS[case]
    assert pools(world).run(check_head_groups, family, degrees, heads, size, batch) == [exchanges] * world


def test_ulysses_head_groups_backward_matches_serial(pools):
    # 2 forwards (serial reference untouched: no exchange) -> one forward's 2 x 2 x 2 exchanges.
    degrees = dict(ulysses_degree=2, ulysses_head_groups=2)
    assert pools(2).run(check_head_groups, "flux", degrees, 4, (12, 14), backward=True) == [8, 8]


def test_ulysses_head_groups_compiled_match_serial(pools):
    # Traced once per block class (double, single): each trace starts 2 ways x 2 groups.
    degrees = dict(ulysses_degree=2, ulysses_head_groups=2)
    assert pools(2).run(check_head_groups, "flux", degrees, 4, (12, 14), compiled=True) == [8, 8]


def test_head_groups_split_a_ranks_heads_evenly():
    from ditmesh.parallel.ulysses import head_groups

    assert head_groups(12, 3) == [(0, 4), (4, 8), (8, 12)]
    assert head_groups(3, 2) == [(0, 2), (2, 3)]
    assert head_groups(2, 5) == [(0, 1), (1, 2)]
    assert head_groups(5, 1) == [(0, 5)]


def check_reorder_comms_reaches_inductor(degrees):
    """parallelize(compile=True) gives each block's compile the reordering options when the config
    asks for them (or for head groups, which need them); none otherwise."""
    from ditmesh import parallelize
    from ditmesh.parallel.fastpath import REORDER_COMMS_KNOBS

    seen = []
    original = torch.nn.Module.compile
    torch.nn.Module.compile = lambda self, **kwargs: seen.append(kwargs.get("options"))
    try:
        model, _ = _tiny("flux", 4, (16, 16), 1)
        parallelize(model, ParallelConfig(**degrees), mesh=_mesh(ParallelConfig(**degrees)), compile=True)
    finally:
        torch.nn.Module.compile = original
    return len(seen), all(options == REORDER_COMMS_KNOBS for options in seen), all(options is None for options in seen)


@pytest.mark.parametrize("degrees,reordered", [(dict(ulysses_degree=2, reorder_comms=True), True),
                                               (dict(ulysses_degree=2, ulysses_head_groups=2), True),
                                               (dict(ulysses_degree=2), False)])
def test_reorder_comms_options_reach_the_block_compiles(pools, degrees, reordered):
    for blocks, with_knobs, without in pools(2).run(check_reorder_comms_reaches_inductor, degrees):
        assert blocks == 2 and (with_knobs if reordered else without)


# ---- Ulysses over unpadded joint sequences: packed once, no unpacking -------------------------


def check_packed(family, degrees, num_heads, size, batch, text_len, how="forward"):
    """`check_forward` / `check_backward` / `check_compiled` where no stream needs padding and
    the heads divide by the ulysses degree; returns how many exchanges took the packed layout."""
    from ditmesh.parallel import ulysses

    packed = []
    original = ulysses.start_packed_exchange
    ulysses.start_packed_exchange = lambda *a, **k: packed.append(1) or original(*a, **k)
    try:
        if how == "backward":
            check_backward(family, degrees, num_heads=num_heads, size=size, text_len=text_len)
        elif how == "compiled":
            assert check_compiled(family, degrees, size, text_len) <= 1e-4
        else:
            check_forward(family, degrees, num_heads=num_heads, size=size, batch=batch, text_len=text_len)
    finally:
        ulysses.start_packed_exchange = original
    return len(packed)


# (family, world, degrees, heads, size, batch, text tokens, packed exchanges per forward: 2 layers x groups)
PACKED = {
    # FLUX 16x16 latents -> 64 image tokens, 6 text tokens: both divide by 2.
    "flux-ulysses2": ("flux", 2, dict(ulysses_degree=2), 4, (16, 16), 1, 6, 2),
    "flux-ulysses2-batch2-2groups": ("flux", 2, dict(ulysses_degree=2, ulysses_head_groups=2), 4, (16, 16), 2, 6, 4),
    # SD3 16x16 latents, patch 2 -> 64 image tokens, 8 text tokens over 4 ranks; 8 heads.
    "sd3-ulysses4": ("sd3", 4, dict(ulysses_degree=4), 8, (16, 16), 1, 8, 2),
    "sd3-ulysses2-data2": ("sd3", 4, dict(ulysses_degree=2, data_degree=2), 4, (16, 16), 2, 8, 2),
}


@pytest.mark.parametrize("case", list(PACKED))
def test_packed_ulysses_matches_serial(pools, case):
    family, world, degrees, heads, size, batch, text_len, exchanges = PACKED[case]
    assert pools(world).run(check_packed, family, degrees, heads, size, batch, text_len) == [exchanges] * world


@pytest.mark.parametrize("how", ["backward", "compiled"])
def test_packed_ulysses_backward_and_compiled_match_serial(pools, how):
    # compiled: traced once per block class (double, single) = 2 exchanges.
    assert pools(2).run(check_packed, "flux", dict(ulysses_degree=2), 4, (16, 16), 1, 6, how) == [2, 2]


def test_padding_or_ring_keeps_the_general_layout(pools):
    # 5 text tokens over 2 ranks need padding; ring inside USP: neither takes the packed layout.
    assert pools(2).run(check_packed, "flux", dict(ulysses_degree=2), 4, (16, 16), 1, 5) == [0, 0]
    assert pools(4).run(check_packed, "flux", dict(ulysses_degree=2, ring_degree=2), 4, (16, 16), 1, 8) == [0] * 4


def check_cuda_graph_default(degrees, compile):
    """Which configs `parallelize` graphs by default on CUDA (the device check and the compile
    stubbed, so this runs on gloo)."""
    import importlib

    from ditmesh.parallel import fastpath, graphs

    entry = importlib.import_module("ditmesh.parallel.parallelize")  # the module (the package exports the function)

    applied = []
    saved = entry._on_cuda, fastpath.compile_repeated_blocks, graphs.apply
    entry._on_cuda = lambda pipe: True
    fastpath.compile_repeated_blocks = lambda *a, **k: None
    graphs.apply = lambda pipe, adapter, *rest: applied.append(1) or pipe
    try:
        model, _ = _tiny("flux", 4, (16, 16), 1)
        entry.parallelize(model, ParallelConfig(**degrees), mesh=_mesh(ParallelConfig(**degrees)), compile=compile)
    finally:
        entry._on_cuda, fastpath.compile_repeated_blocks, graphs.apply = saved
    return bool(applied)


# CUDA graphs by default on CUDA, compiled or eager (eager host issue is the lock-step loss under
# a process group), and tensor parallelism compiled and graphed too; never under PipeFusion.
@pytest.mark.parametrize("degrees,compile,graphed", [(dict(ulysses_degree=2), None, True),
                                                     (dict(ring_degree=2), None, True),
                                                     (dict(ulysses_degree=2), False, True),
                                                     (dict(tensor_degree=2), None, True)])
def test_cuda_graphs_by_default_where_blocks_are_compiled(pools, degrees, compile, graphed):
    assert pools(2).run(check_cuda_graph_default, degrees, compile) == [graphed, graphed]
