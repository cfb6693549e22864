"""Tiny FLUX / SD3 / SDXL pipelines under data and CFG parallelism match the serial pipeline.

Every rank builds the same tiny pipeline (seeded), computes the serial reference itself, then
runs the parallelized pipeline; images are compared as float arrays (fp32, atol 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditmesh import ParallelConfig
from ditmesh.models.tiny import tiny_pipeline
from ditmesh.parallel import parallelize

ATOL = 1e-4
SIZE = 64  # 8x8 latents: 16 FLUX tokens, 16 SD3 tokens
CFG_ARGS = {
    "tiny-flux": dict(true_cfg_scale=4.0, negative_prompt="blurry"),
    "tiny-sd3": dict(guidance_scale=5.0, negative_prompt="blurry"),
    "tiny-sdxl": dict(guidance_scale=5.0, negative_prompt="blurry"),
}


def _generators(seed: int, num_images: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(num_images)]


def _call(name: str, prompt, *, cfg: bool, seed: int = 3, per_prompt: int = 1, serial: bool = False,
          extra: dict | None = None) -> dict:
    num_images = (1 if isinstance(prompt, str) else len(prompt)) * per_prompt
    call = dict(prompt=prompt, num_inference_steps=2, height=SIZE, width=SIZE, output_type="np",
                num_images_per_prompt=per_prompt)
    # Parallel: one generator seeded s; serial equivalent: generators s, s+1, ... per image.
    call["generator"] = _generators(seed, num_images) if serial else torch.Generator().manual_seed(seed)
    if cfg:
        call.update(CFG_ARGS[name])
    return {**call, **(extra or {})}


def _serial_and_parallel(name: str, parallel: str, prompt, cfg: bool, per_prompt: int = 1, extra: dict | None = None):
    """Run on every rank: (serial images, this rank's parallel images or None, the batch size of
    each denoiser call this rank made, whether sequence parallelism is on the denoiser)."""
    serial = tiny_pipeline(name)(**_call(name, prompt, cfg=cfg, per_prompt=per_prompt, serial=True, extra=extra)).images
    pipe = tiny_pipeline(name)
    denoiser = pipe.unet if name == "tiny-sdxl" else pipe.transformer
    batches = []
    denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
        with_kwargs=True,
    )
    pipe = parallelize(pipe, ParallelConfig.parse(parallel))
    out = pipe(**_call(name, prompt, cfg=cfg, per_prompt=per_prompt, extra=extra))
    sequence = getattr(denoiser, "_ditmesh_sequence_parallel", None) is not None
    return serial, None if out is None else out.images, batches, sequence


def _check(results, data_degree: int = 1):
    serial = results[0][0]
    assert serial.shape[1:] == (SIZE, SIZE, 3)
    world = len(results)
    for rank, (_, images, _, _) in enumerate(results):
        if rank < world // data_degree:  # data group 0 (data is the outermost mesh axis) holds all images
            np.testing.assert_allclose(images, serial, atol=ATOL, rtol=0)
    return serial


def _check_cfg_split(results, num_images: int, steps: int = 2):
    # Each rank ran only its branch: FLUX one call per step (serially two), SD3/SDXL one call on
    # half the guided batch (serially 2 * num_images rows).
    for _, _, batches, _ in results:
        assert batches == [num_images] * steps


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3", "tiny-sdxl"])
def test_data2_uneven_prompts(pools, name):
    prompts = ["a cat", "a dog", "a horse"]  # 3 prompts on 2 groups: 2 + 1
    results = pools(2).run(_serial_and_parallel, name, "data=2", prompts, False)
    serial = _check(results, data_degree=2)
    assert serial.shape[0] == 3
    assert results[1][1].shape[0] == 1  # rank 1 holds its own share only
    assert np.abs(serial[0] - serial[2]).max() > 1e-2  # the images differ: order is checked


def test_data2_images_per_prompt(pools):
    results = pools(2).run(_serial_and_parallel, "tiny-sd3", "data=2", ["a cat", "a dog"], True, 2)
    assert _check(results, data_degree=2).shape[0] == 4


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3", "tiny-sdxl"])
def test_cfg2(pools, name):
    results = pools(2).run(_serial_and_parallel, name, "cfg=2", "a photo of a cat", True)
    _check(results)
    _check_cfg_split(results, num_images=1)


def test_cfg2_batch_of_prompts(pools):
    results = pools(2).run(_serial_and_parallel, "tiny-sdxl", "cfg=2", ["a cat", "a dog"], True)
    _check(results)
    _check_cfg_split(results, num_images=2)


def test_cfg2_sd3_skip_layer_guidance(pools):
    # SD3.5's skip-layer guidance adds a third denoiser call on the cond rows only (step 2 here).
    slg = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    results = pools(2).run(_serial_and_parallel, "tiny-sd3", "cfg=2", "a photo of a cat", True, 1, slg)
    _check(results)
    assert results[0][2] == [1, 1, 1]  # guided half, guided half, the whole (odd) cond batch


def test_data2_cfg2(pools):
    results = pools(4).run(_serial_and_parallel, "tiny-flux", "data=2,cfg=2", ["a cat", "a dog", "a horse"], True)
    assert _check(results, data_degree=2).shape[0] == 3
    # data group 0 (ranks 0, 1) makes 2 images, group 1 (ranks 2, 3) one; one FLUX branch per rank
    assert [batches for _, _, batches, _ in results] == [[2, 2], [2, 2], [1, 1], [1, 1]]


@pytest.mark.slow
def test_data2_cfg2_ulysses2_on_8_ranks(pools):
    results = pools(8).run(_serial_and_parallel, "tiny-flux", "data=2,cfg=2,ulysses=2", ["a cat", "a dog", "a horse"], True)
    assert all(sequence for _, _, _, sequence in results), "parallelize must apply sequence parallelism (step 2)"
    assert _check(results, data_degree=2).shape[0] == 3
    assert [batches for _, _, batches, _ in results] == [[2, 2]] * 4 + [[1, 1]] * 4


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_cfg2_ulysses2(pools, name):
    results = pools(4).run(_serial_and_parallel, name, "cfg=2,ulysses=2", "a photo of a cat", True)
    assert all(sequence for _, _, _, sequence in results), "parallelize must apply sequence parallelism (step 2)"
    _check(results)
    _check_cfg_split(results, num_images=1)


# ---- user errors ------------------------------------------------------------------------------


def _call_error(name: str, parallel: str, call: dict) -> str:
    pipe = parallelize(tiny_pipeline(name), ParallelConfig.parse(parallel))
    try:
        pipe(prompt="a cat", num_inference_steps=1, output_type="np", **call)
    except ValueError as error:
        return str(error)
    return "no error"


def test_cfg2_without_guidance_names_the_fix(pools):
    flux, sdxl, size, sdxl_ulysses = pools(2).run(_errors_cfg)[0]
    assert "true_cfg_scale > 1" in flux and "negative_prompt" in flux and "drop cfg=2" in flux
    assert "guidance_scale is 1.0" in sdxl
    assert size == "height 100 is not a multiple of 16 (flux); use 96 or 112"
    assert "ulysses" in sdxl_ulysses and sdxl_ulysses != "no error"  # a degree a U-Net cannot use


def _errors_cfg():
    return (
        _call_error("tiny-flux", "cfg=2", dict(height=64, width=64)),
        _call_error("tiny-sdxl", "cfg=2", dict(height=64, width=64, guidance_scale=1.0)),
        _call_error("tiny-flux", "data=2", dict(height=100, width=64)),
        _parallelize_error("tiny-sdxl", "ulysses=2"),
    )


def _parallelize_error(name: str, parallel: str) -> str:
    try:
        parallelize(tiny_pipeline(name), ParallelConfig.parse(parallel))
    except ValueError as error:
        return str(error)
    return "no error"


def test_size_check_message():
    from ditmesh.models.flux import ADAPTER
    from ditmesh.parallel.data import check_size

    with pytest.raises(ValueError, match="height 1000 is not a multiple of 16 \\(flux\\); use 992 or 1008"):
        check_size(ADAPTER, 1000, 1024)
    with pytest.raises(ValueError, match="width 8 is not a multiple of 16 \\(flux\\); use 16"):
        check_size(ADAPTER, 1024, 8)
    check_size(ADAPTER, 1024, None)


def test_world_size_mismatch(pools):
    message = pools(2).run(_world_mismatch)[0]
    assert "needs 4 processes but the world has 2" in message


def _world_mismatch():
    try:
        parallelize(tiny_pipeline("tiny-sd3"), ParallelConfig.parse("cfg=2,data=2"))
    except ValueError as error:
        return str(error)
    return "no error"


def test_shard_is_balanced_and_ordered():
    from ditmesh.parallel.data import shard

    for num_items in range(0, 9):
        for num_shards in (1, 2, 3, 4):
            runs = [shard(num_items, num_shards, i) for i in range(num_shards)]
            assert runs[0][0] == 0 and runs[-1][1] == num_items
            assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
            sizes = [stop - start for start, stop in runs]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
