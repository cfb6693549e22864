"""Step caching under every strategy: one decision per step for the whole mesh, equal to serial's.

Each case runs `parallelize(tiny_pipeline(...), config, cache=...)` on the shared gloo pools and
compares, on rank 0, the computed-step list and the images (fp32, ``output_type="np"``, atol
1e-4) with the SAME tiny pipeline run in one process with the same cache (`cache.apply`, no
mesh), from the same seeds. Every rank's computed-step list must equal serial's. The fbcache
threshold (0.35) is tuned on the tiny random FLUX so that 5 steps compute [0, 1, 2] and cache 3, 4
(first-block change ratios 0.49, 0.40, 0.34, 0.30: margins far above fp32 noise).

PipeFusion takes the static policy (each stage adds its own residual, `pipefusion/cache.py`): with
``warmup_steps`` = steps every step is exact, so the same 1e-4 comparison holds; dropping a later
stage's residual moves the image by 4e-2 to 7e-2, dropping taylor's extrapolation by 1.3e-2.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ditmesh import ParallelConfig
from ditmesh.config import CacheConfig
from ditmesh.models import adapter_for
from ditmesh.models.tiny import flux_transformer_inputs, tiny_flux_transformer, tiny_pipeline
from ditmesh.parallel import cache as step_cache
from ditmesh.parallel import parallelize

# PipeFusion cases: static policy only (fbcache is refused); warmup_steps=STEPS is exact mode.
ATOL = 1e-4
SIZE, STEPS = 64, 5
FB = "fbcache,threshold=0.35"
GUIDANCE = {
    "tiny-flux": dict(true_cfg_scale=4.0, negative_prompt="blurry"),
    "tiny-sd3": dict(guidance_scale=5.0, negative_prompt="blurry"),
}
ONE, TWO = "a photo of a cat", ["a cat", "a dog"]

# (model, parallel config, cache, prompt, guided)
CASES_2 = [
    ("tiny-flux", "ulysses=2", FB, ONE, False),
    ("tiny-flux", "ring=2", FB, ONE, False),
    ("tiny-flux", "tensor=2", FB, ONE, False),
    ("tiny-flux", "cfg=2", FB, ONE, True),
    ("tiny-flux", "data=2", FB + ",taylor=1", TWO, False),
    ("tiny-flux", f"pipefusion=2,warmup_steps={STEPS}", "static,mask=10110", ONE, False),
]
CASES_4 = [
    ("tiny-flux", "ring=2,ulysses=2", FB, ONE, False),
    ("tiny-flux", "cfg=2,ulysses=2", FB + ",taylor=1", ONE, True),
    ("tiny-sd3", "cfg=2,ring=2", "static,warmup=2,every=2", ONE, True),
    ("tiny-flux", "data=2,tensor=2", "static,mask=11010,taylor=1", TWO, False),
    ("tiny-flux", f"pipefusion=4,warmup_steps={STEPS}", "static,mask=10110,taylor=1", ONE, False),
    ("tiny-sd3", f"pipefusion=2,cfg=2,warmup_steps={STEPS}", "static,mask=10110", ONE, True),
    ("tiny-flux", f"pipefusion=2,ulysses=2,warmup_steps={STEPS}", "static,mask=11010,taylor=1", ONE, False),
]

_BUILT: dict[str, object] = {}


def _fresh(name: str):
    if name not in _BUILT:
        _BUILT[name] = tiny_pipeline(name)
    return copy.deepcopy(_BUILT[name])


def _call(name: str, prompt, guided: bool, seed: int) -> dict:
    call = dict(prompt=prompt, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np",
                generator=torch.Generator().manual_seed(seed))
    return {**call, **(GUIDANCE[name] if guided else {})}


def _serial(name: str, spec: str, prompt: list[str], guided: bool) -> tuple[np.ndarray, list[list[int]]]:
    """Serial with cache, one call per image (data replicas decide for their own images)."""
    images, computed = [], []
    for i, text in enumerate(prompt):
        pipe = _fresh(name)
        pipe = step_cache.apply(pipe, adapter_for(pipe), CacheConfig.parse(spec))
        images.append(pipe(**_call(name, text, guided, 3 + i)).images)
        computed.append(pipe.computed_steps)
    return np.concatenate(images), computed


def _run_cases(cases: list) -> list:
    """On every rank: per case (error vs serial, this rank's computed steps, serial's per image)
    on rank 0, this rank's computed steps elsewhere."""
    results = []
    for name, text, spec, prompt, guided in cases:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)  # before the call can change the list
        pipe = parallelize(_fresh(name), ParallelConfig.parse(text), cache=spec)
        out = pipe(**_call(name, prompt, guided, 3))
        if dist.get_rank() == 0:
            images, computed = _serial(name, spec, prompts, guided)
            results.append((float(np.abs(out.images - images).max()), out.computed_steps, computed))
        else:
            results.append((None, pipe.computed_steps, None))
    return results


def _check(pools, world_size: int, case: tuple) -> None:
    per_rank = pools(world_size).run(_run_cases, [case], timeout=600)
    error, computed, serial = per_rank[0][0]
    data = ParallelConfig.parse(case[1]).data_degree
    print(f"{case[0]} {case[1]} {case[2]}: computed {computed} (serial {serial}), max abs error {error:.2e}")
    assert 0 < len(computed) < STEPS, "the case must both compute and cache steps"
    assert computed == serial[0]
    for rank in range(world_size):  # data replica r (ranks r * world/data ...) decides for image r
        assert per_rank[rank][0][1] == serial[rank * data // world_size], f"rank {rank}"
    assert error <= ATOL


@pytest.mark.parametrize("case", CASES_2, ids=[f"{c[0]}:{c[1]}" for c in CASES_2])
def test_world2_matches_serial(pools, case):
    _check(pools, 2, case)


@pytest.mark.parametrize("case", CASES_4, ids=[f"{c[0]}:{c[1]}" for c in CASES_4])
def test_world4_matches_serial(pools, case):
    _check(pools, 4, case)


def test_pipefusion_stale_close_to_serial(pools):
    """PipeFusion after warm-up (patches, stale K/V) with Ulysses in each stage: step 1 is cached
    from the whole-image residuals of warm-up step 0 (each rank gathers them, then reads its shard
    of each patch), step 4 from patch residuals. Not exact (staleness): measured 5.4e-4 from serial
    with the same cache, as uncached PipeFusion is from uncached serial (5.8e-4); the cache itself
    moves the image by 2.7e-2, so a patch reading another's rows lands far outside 2e-3."""
    case = ("tiny-flux", "pipefusion=2,ulysses=2,warmup_steps=1", "static,mask=10110,taylor=1", ONE, False)
    per_rank = pools(4).run(_run_cases, [case], timeout=600)
    error, computed, serial = per_rank[0][0]
    print(f"{case[1]} {case[2]}: computed {computed}, max abs error vs serial {error:.2e}")
    assert all(rank[0][1] == serial[0] == [0, 2, 3] for rank in per_rank)
    assert error <= 2e-3


# ---- one rank's shard says "skip", the whole image says "compute" ----------------------------


def _local_vs_global(threshold: float) -> tuple[list[int], list[tuple[float, float, float, float]]]:
    """Bare tiny FLUX under ulysses=2, three calls; the third changes only the tokens of rank 1's
    shard, so rank 0's own residual barely moves while the whole image's does."""
    model = tiny_flux_transformer()
    serial = copy.deepcopy(model)
    cache = CacheConfig(policy="fbcache", threshold=threshold, warmup=0)
    model = parallelize(model, ParallelConfig(ulysses_degree=2), cache=cache)
    inputs = flux_transformer_inputs(height=8, width=8)  # 4x4 = 16 image tokens
    second = dict(inputs, hidden_states=inputs["hidden_states"] * 1.001)
    third = dict(second, hidden_states=second["hidden_states"].clone())
    third["hidden_states"][:, 8:] += 0.2  # rank 1's image tokens (16 tokens, 8 per rank)
    handle = getattr(model, step_cache._HANDLE_ATTR)
    for call in (inputs, second, third):
        model(**call)
    step_cache.apply(serial, adapter_for(serial), cache)
    for call in (inputs, second, third):
        serial(**call)
    return handle.calls.computed, handle.calls.stats, getattr(serial, step_cache._HANDLE_ATTR).calls.computed


def test_global_decision_not_local(pools):
    threshold = 0.11  # between rank 0's own ratio (0.08) and the whole image's (0.14)
    (computed0, stats0, serial), (computed1, _, _) = pools(2).run(_local_vs_global, threshold, timeout=300)
    local_diff, local_prev, diff, prev = stats0[-1]
    # Rank 0 on its own shard would cache step 2; the whole image (serial, and the reduced sums) computes it.
    assert local_diff / local_prev < threshold < diff / prev
    assert serial == computed0 == computed1 == [0, 2]


def test_pipefusion_takes_static_only():
    model = tiny_flux_transformer()
    config, adapter = ParallelConfig(pipefusion_degree=2), adapter_for(model)
    with pytest.raises(ValueError, match="under pipefusion takes the static policy"):
        step_cache.check(model, config, CacheConfig.parse(FB), adapter)
    step_cache.check(model, config, CacheConfig.parse("static,mask=10110,taylor=1"), adapter)  # accepted


def test_cache_config_parse():
    assert CacheConfig.parse("static,warmup=2,every=3") == CacheConfig(policy="static", warmup=2, every=3)
    assert [CacheConfig.parse("static,warmup=2,every=2").scheduled(s) for s in range(6)] == [True, True, False, True, False, True]
    assert str(CacheConfig.parse("fbcache,threshold=0.2,taylor=1")) == "fbcache,threshold=0.2,taylor=1"
    assert not CacheConfig.parse("off").enabled
    with pytest.raises(ValueError, match="unknown; use one of"):
        CacheConfig.parse("teacache")
    with pytest.raises(ValueError, match="is not key=value"):
        CacheConfig.parse("fbcache,thresh=0.1")


def test_compiled_blocks_keep_their_bodies():
    """Compiled blocks (dynamo, eager backend on CPU): the cache runs their compiled bodies and
    its own logic outside them; the result equals the uncompiled cached run."""
    from ditmesh.parallel import fastpath

    torch._dynamo.reset()
    eager, compiled = tiny_flux_transformer(), tiny_flux_transformer()
    fastpath.compile_repeated_blocks(compiled, backend="eager")
    cache = CacheConfig.parse("static,mask=101")
    for model in (eager, compiled):
        step_cache.apply(model, adapter_for(model), cache)
    inputs = flux_transformer_inputs()
    outs = [[model(**inputs)[0] for _ in range(3)] for model in (eager, compiled)]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert getattr(compiled, step_cache._HANDLE_ATTR).calls.computed == [0, 2]


def test_served_request_reports_its_computed_steps():
    """`serve --cache`: the ranks (ulysses=2, a real runner) run the cached pipeline and the HTTP
    response names the steps computed, the same as the serial pipeline's with the same cache."""
    import asyncio
    import base64
    import io

    import httpx
    from PIL import Image

    from ditmesh.runner.diffusion import DiffusionWorker
    from ditmesh.runner.runner import DistributedRunner
    from ditmesh.serve import ServeSettings
    from ditmesh.serve.app import create_app

    cache = "static,mask=1011"
    serial = parallelize(tiny_pipeline("tiny-flux"), ParallelConfig(), cache=cache)
    serial("a red circle", num_inference_steps=5, height=32, width=32, output_type="np")

    async def ask():
        runner = DistributedRunner(DiffusionWorker, world_size=2, device_type="cpu", num_threads=1)
        app = create_app(runner, dict(model="tiny-flux", parallel="ulysses=2", cache=cache), ServeSettings())
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                body = dict(prompt="a red circle", height=32, width=32, steps=5, seed=1)
                return await client.post("/v1/images/generations", json=body, timeout=60)

    answer = asyncio.run(ask())
    assert answer.status_code == 200, answer.text
    assert answer.json()["computed_steps"] == serial.computed_steps == [0, 2, 3, 4]  # past the mask's end: computed
    assert Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).size == (32, 32)
