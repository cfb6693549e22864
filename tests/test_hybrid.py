"""Hybrid meshes: every combination of degrees composes, and the ones that cannot are refused early.

The matrix runs `parallelize(tiny_pipeline(...), config)` for several axis combinations at world
sizes 4 and 8 and compares the images (fp32, ``output_type="np"``) with the SAME tiny pipeline
run serially in one process from the same seeds (atol 1e-4). Each case is one `pool.run` on the
shared pools; each rank builds a tiny pipeline once and copies it per case.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist

import ditmesh
from ditmesh import ParallelConfig
from ditmesh.config import AXES
from ditmesh.models.tiny import tiny_flux_transformer, tiny_pipeline
from ditmesh.parallel import parallelize
from ditmesh.parallel.mesh import ParallelMesh
from ditmesh.parallel.validate import valid_configs

ATOL = 1e-4
SIZE = 64  # 8x8 latents: 16 image tokens, 4 token rows for FLUX and SD3
STEPS = 2
GUIDANCE = {
    "tiny-flux": dict(true_cfg_scale=4.0, negative_prompt="blurry"),
    "tiny-sd3": dict(guidance_scale=5.0, negative_prompt="blurry"),
}
ONE_PROMPT, TWO_PROMPTS = "a photo of a cat", ["a cat", "a dog"]

# (model, config, prompt, guided). PipeFusion cases run warm-up only (warmup_steps >= steps), which
# is exact; PipeFusion x cfg needs batched guidance, so it runs on SD3 (FLUX's true CFG is two calls).
CASES_4 = [
    ("tiny-flux", "data=2,cfg=2", TWO_PROMPTS, True),
    ("tiny-sd3", "cfg=2,ulysses=2", ONE_PROMPT, True),
    ("tiny-flux", "cfg=2,ring=2", ONE_PROMPT, True),
    ("tiny-sd3", "ring=2,ulysses=2", ONE_PROMPT, True),
    ("tiny-flux", "ring=2,ulysses=2", ONE_PROMPT, False),
    ("tiny-flux", "ulysses=2,tensor=2", ONE_PROMPT, False),
    ("tiny-sd3", "cfg=2,tensor=2", ONE_PROMPT, True),
    ("tiny-flux", "data=2,tensor=2", TWO_PROMPTS, False),
    ("tiny-sd3", f"pipefusion=2,cfg=2,warmup_steps={STEPS}", ONE_PROMPT, True),
    ("tiny-flux", f"pipefusion=2,ulysses=2,warmup_steps={STEPS}", ONE_PROMPT, False),
]
CASES_8 = [
    ("tiny-sd3", "data=2,cfg=2,ulysses=2", TWO_PROMPTS, True),
    ("tiny-flux", "cfg=2,ring=2,ulysses=2", ONE_PROMPT, True),
    ("tiny-sd3", "cfg=2,ulysses=2,tensor=2", ONE_PROMPT, True),
    ("tiny-sd3", f"pipefusion=2,ulysses=2,cfg=2,warmup_steps={STEPS}", ONE_PROMPT, True),
]
# Combinations a strategy does not support yet, with the reason; a strict xfail (so a case that
# starts passing fails until its entry goes). Empty: every combination above must match serial.
NOT_YET: dict[str, str] = {}


def _call(name: str, prompt, guided: bool, serial: bool) -> dict:
    num_images = 1 if isinstance(prompt, str) else len(prompt)
    call = dict(prompt=prompt, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np")
    # Parallel: one generator seeded s (image i draws from s + i); serial: the same per image.
    call["generator"] = [torch.Generator().manual_seed(3 + i) for i in range(num_images)] if serial else torch.Generator().manual_seed(3)
    return {**call, **(GUIDANCE[name] if guided else {})}


_BUILT: dict[str, object] = {}  # per rank process: each tiny pipeline built once, copied per case


def _fresh(name: str):
    """A new, unparallelized tiny pipeline (parallelize changes the one it gets)."""
    if name not in _BUILT:
        _BUILT[name] = tiny_pipeline(name)
    return copy.deepcopy(_BUILT[name])


def _run_cases(cases: list) -> dict[str, tuple[str, object]]:
    """Run on every rank: each case's (status, detail) on rank 0 — ("ok", max abs error vs the
    serial pipeline) or ("error", message); other ranks return {}."""
    rank0 = dist.get_rank() == 0
    serial_cache: dict[tuple, np.ndarray] = {}
    results = {}
    for name, text, prompt, guided in cases:
        key = (name, str(prompt), guided)
        if rank0 and key not in serial_cache:  # only rank 0 holds the parallel images: compare there
            serial_cache[key] = _fresh(name)(**_call(name, prompt, guided, serial=True)).images
        try:
            pipe = _fresh(name)
            denoiser = pipe.transformer
            pipe = parallelize(pipe, ParallelConfig.parse(text))
            out = pipe(**_call(name, prompt, guided, serial=False))
        except Exception as error:  # noqa: BLE001 - reported per case (a ValueError is raised alike on every rank)
            results[f"{name}:{text}"] = ("error", f"{type(error).__name__}: {error}")
            continue
        if rank0:
            error = float(np.abs(out.images - serial_cache[key]).max())
            results[f"{name}:{text}"] = ("ok", (error, _applied(pipe, denoiser)))
    return results if rank0 else {}


def _applied(pipe, denoiser) -> set[str]:
    """Which model-level strategies are really in place (so a match is not a serial run)."""
    types = {type(m).__name__ for m in pipe.transformer.modules()}
    applied = {"cfg"} if "CFGDenoiser" in types else set()
    applied |= {"pipefusion"} if "PipeFusionTransformer" in types else set()
    applied |= {"sequence"} if getattr(denoiser, "_ditmesh_sequence_parallel", None) is not None else set()
    applied |= {"tensor"} if any(type(p).__name__ == "DTensor" for p in denoiser.parameters()) else set()
    return applied


def _case_params(cases):
    params = []
    for case in cases:
        name, text = case[:2]
        marks = [pytest.mark.xfail(strict=True, reason=NOT_YET[text])] if text in NOT_YET else []
        params.append(pytest.param(case, marks=marks, id=f"{name}:{text}"))
    return params


def _run_case(pools, world_size: int, case: tuple) -> tuple[str, tuple[str, object]]:
    name, text = case[:2]
    return f"{name}:{text}", pools(world_size).run(_run_cases, [case])[0][f"{name}:{text}"]


def _assert_matches_serial(case: str, result: tuple[str, object]) -> None:
    status, detail = result
    assert status == "ok", detail
    error, applied = detail
    print(f"{case}: max abs error vs serial {error:.2e}; strategies in place: {sorted(applied)}")
    config = ParallelConfig.parse(case.split(":")[1])
    degrees = {"cfg": config.cfg_degree, "pipefusion": config.pipefusion_degree,
               "sequence": config.sequence_degree, "tensor": config.tensor_degree}
    assert applied == {axis for axis, degree in degrees.items() if degree > 1}
    assert error <= ATOL


@pytest.mark.parametrize("case", _case_params(CASES_4))
def test_world4_matches_serial(pools, case):
    _assert_matches_serial(*_run_case(pools, 4, case))


@pytest.mark.parametrize("case", _case_params(CASES_8))
def test_world8_matches_serial(pools, case):
    _assert_matches_serial(*_run_case(pools, 8, case))


# ---- refused before any collective or weight change ------------------------------------------


def _refusal(name: str, text: str, heads: int = 4):
    """Run on every rank: parallelize must raise ValueError leaving the weights untouched."""
    if name == "bare-flux":
        pipe = tiny_flux_transformer(num_heads=heads)
        model = pipe
    else:
        pipe = _fresh(name)
        model = pipe.unet if name == "tiny-sdxl" else pipe.transformer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        parallelize(pipe, ParallelConfig.parse(text))
    except ValueError as error:
        after = model.state_dict()
        untouched = before.keys() == after.keys() and all(
            type(after[k]) is torch.Tensor and torch.equal(before[k], after[k]) for k in before
        )
        return str(error), untouched
    return "no error", True


REFUSALS = [
    ("tiny-sdxl", "ulysses=2,cfg=2", "ring/ulysses parallelism has no plan for sdxl models.*use data, cfg for them"),
    ("tiny-sdxl", "tensor=2,data=2", "tensor parallelism has no plan for sdxl"),
    ("tiny-sdxl", "pipefusion=2,cfg=2", "pipefusion parallelism has no plan for sdxl"),
    ("tiny-flux", "pipefusion=2,cfg=2", "pipefusion x cfg supports batched guidance"),
    ("tiny-flux", "pipefusion=2,tensor=2", "pipefusion x ring/tensor is not supported yet.*pipefusion=2,ulysses=2,cfg=2"),
    ("tiny-sd3", "pipefusion=2,ring=2", "pipefusion x ring/tensor is not supported yet"),
    ("tiny-flux", "ring=4,attention_backend=sdpa", "returns no log-sum-exp"),
    ("bare-flux", "data=2,tensor=2", "data=2 splits pipeline calls; pass the flux pipeline"),
    ("tiny-sd3", "cfg=2,data=4", "needs 8 processes but the world has 4"),
]


@pytest.mark.parametrize("index", range(len(REFUSALS)), ids=[f"{n}:{t}" for n, t, _ in REFUSALS])
def test_refused_before_any_change(pools, index):
    name, text, match = REFUSALS[index]
    results = pools(4).run(_refusal, name, text)
    assert len({message for message, _ in results}) == 1, results  # every rank says the same
    message, untouched = results[0]
    assert re.search(match, message), message
    assert all(ok for _, ok in results), "a weight changed before the error"
    assert pools(4).run(dist.get_rank) == [0, 1, 2, 3]  # the pool is still usable


def test_tensor_degree_must_divide_heads(pools):
    message, untouched = pools(2).run(_refusal, "bare-flux", "tensor=2", heads=3)[0]
    assert "tensor_degree 2 does not split the 3 attention heads" in message and "valid tensor degrees: 1" in message
    assert untouched


def _presharded_diff() -> float:
    """A transformer sharded before parallelize (as `tensor.load_sharded` leaves it: 1 local head
    of 4 per rank) passes validation and matches the serial forward."""
    from ditmesh.models.base import adapter_for
    from ditmesh.models.tiny import flux_transformer_inputs
    from ditmesh.parallel import tensor

    config = ParallelConfig(tensor_degree=dist.get_world_size())
    mesh = ParallelMesh.build(config)
    model, inputs = tiny_flux_transformer(num_heads=4), flux_transformer_inputs(height=16, width=16)
    expected = model(**inputs)[0]
    tensor.apply(model, mesh, adapter_for(model), config)
    got = parallelize(model, config, mesh)(**inputs)[0]
    return float((got - expected).abs().max())


def test_presharded_transformer_passes_validation(pools):
    assert max(pools(4).run(_presharded_diff)) <= ATOL


# ---- valid_configs ----------------------------------------------------------------------------


def _degrees(configs) -> set[tuple[int, ...]]:
    return {tuple(c.degrees.values()) for c in configs}


def test_valid_configs_sdxl_only_data_and_cfg():
    configs = valid_configs(_fresh("tiny-sdxl"), 4)
    assert {str(c) for c in configs} == {"data=4", "data=2,cfg=2"}
    assert {str(c) for c in ditmesh.valid_configs(_fresh("tiny-sdxl"), 8)} == {"data=8", "data=4,cfg=2"}


def test_valid_configs_flux_at_8():
    pipe = _fresh("tiny-flux")  # 4 heads, 2 + 4 = 6 blocks, sequential (true) CFG
    configs = valid_configs(pipe, 8)
    strings = {str(c) for c in configs}
    assert all(c.world_size == 8 for c in configs)
    assert max(c.tensor_degree for c in configs) == 4  # tensor divides the 4 heads
    assert all(c.pipefusion_degree <= 6 for c in configs)  # a block per stage at least
    assert not any(c.pipefusion_degree > 1 and c.cfg_degree > 1 for c in configs)  # FLUX CFG is sequential
    assert not any(c.pipefusion_degree > 1 and (c.ring_degree > 1 or c.tensor_degree > 1) for c in configs)
    assert "pipefusion=2,ulysses=4" in strings  # Ulysses inside each PipeFusion stage
    assert {"ulysses=8", "cfg=2,ring=2,ulysses=2", "cfg=2,ulysses=2,tensor=2", "data=2,pipefusion=4", "data=8"} <= strings
    # Without head padding, ulysses divides the heads per tensor rank (4 / tensor).
    efficient = valid_configs(pipe, 8, allow_head_padding=False)
    assert efficient == [c for c in configs if (4 // c.tensor_degree) % c.ulysses_degree == 0]
    assert "ulysses=8" not in {str(c) for c in efficient}
    # A 32-pixel image has 2 token rows: 4 PipeFusion patches do not fit; 2 do.
    small = {str(c) for c in valid_configs(pipe, 4, height=32, width=32)}
    assert "pipefusion=4" not in small and "data=2,pipefusion=2" in small
    # ... and 2 token columns: PipeFusion's 2 ulysses ranks split them, 4 would not.
    assert "pipefusion=2,ulysses=2" in small
    assert "pipefusion=2,ulysses=4" not in {str(c) for c in valid_configs(pipe, 8, height=64, width=32)}
    with pytest.raises(ValueError, match="height 40 is not a multiple of 16"):
        valid_configs(pipe, 4, height=40, width=32)


def test_valid_configs_sd3_pipefusion_cfg_and_bare_denoiser():
    pipe = _fresh("tiny-sd3")
    assert "cfg=2,pipefusion=2" in {str(c) for c in valid_configs(pipe, 4)}  # batched guidance pairs up
    bare = _degrees(valid_configs(pipe.transformer, 4))
    data, cfg, pipefusion = (AXES.index(a) for a in ("data", "cfg", "pipefusion"))
    assert bare and all(d[data] == d[cfg] == d[pipefusion] == 1 for d in bare)  # only ring, ulysses, tensor


def test_valid_configs_all_listed_factorisations():
    # Every factorisation with cfg <= 2 is either listed or refused with a reason.
    from ditmesh.parallel.validate import _factorisations, config_problems

    pipe = _fresh("tiny-sd3")
    listed = _degrees(valid_configs(pipe, 8))
    for degrees in _factorisations(8, len(AXES)):
        if degrees[AXES.index("cfg")] > 2:
            continue
        config = ParallelConfig(**{f"{a}_degree": d for a, d in zip(AXES, degrees)})
        assert (degrees in listed) == (not config_problems(pipe, config)), config


# ---- rank layout of a 3-axis mesh -------------------------------------------------------------


def _groups(text: str):
    mesh = ParallelMesh.build(ParallelConfig.parse(text))
    return {axis: mesh.group_ranks(axis) for axis in AXES}, {axis: mesh.rank(axis) for axis in AXES}


def test_layout_cfg2_pipefusion2_tensor2(pools):
    reports = pools(8).run(_groups, "cfg=2,pipefusion=2,tensor=2")
    layout = torch.arange(8).reshape(2, 2, 2)  # (cfg, pipefusion, tensor): tensor innermost
    print("\nrank layout (cfg, pipefusion, tensor):\n", layout)
    for rank, (groups, coords) in enumerate(reports):
        c, p, t = (int(i) for i in (layout == rank).nonzero()[0])
        assert (coords["cfg"], coords["pipefusion"], coords["tensor"]) == (c, p, t)
        assert groups["tensor"] == layout[c, p, :].tolist()  # neighbours: {0,1}, {2,3}, ...
        assert groups["pipefusion"] == layout[c, :, t].tolist()  # stride 2: {0,2}, {1,3}, ...
        assert groups["cfg"] == layout[:, p, t].tolist()  # stride 4: {0,4}, {1,5}, ...
        assert groups["data"] == groups["ring"] == groups["ulysses"] == [rank]
    print("tensor groups:", sorted({tuple(g["tensor"]) for g, _ in reports}))
    print("pipefusion groups:", sorted({tuple(g["pipefusion"]) for g, _ in reports}))
    print("cfg groups:", sorted({tuple(g["cfg"]) for g, _ in reports}))
