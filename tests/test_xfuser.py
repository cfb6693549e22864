"""`XFuserWorker` without xfuser (it refuses to import without an accelerator): the mapping of our
parallel string to `xFuserArgs`, the refusals, and the routing of images from the ranks xDiT
returns them on to rank 0, with a stand-in pipeline that keeps xDiT's contract (step callback on
the last pipeline stage only under PipeFusion, images only on the last rank of each data replica).
The GPU tests in tests/test_gpu.py run the real xfuser."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ditmesh import cli
from ditmesh.config import ParallelConfig
from ditmesh.runner.xfuser import XFuserWorker, replica_ranks, share, xfuser_args


def _image(generator: torch.Generator, prompt: str) -> np.ndarray:
    pixels = torch.randint(0, 256, (4, 4, 3), generator=generator, dtype=torch.uint8).numpy()
    return (pixels + len(prompt)).astype(np.uint8)  # the prompt shows: a prompt sent to the wrong replica fails


class StandInPipe:
    """An xDiT pipeline's contract, on the CPU: `callback_on_step_end` after each step on the last
    pipeline stage (every rank without PipeFusion), images only on the last rank of the replica."""

    def __init__(self, rank: int, replica: list[int], pipefusion: int):
        self.rank, self.replica, self.pipefusion = rank, replica, pipefusion

    def __call__(self, prompt, num_images_per_prompt, generator, callback_on_step_end, num_inference_steps,
                 fail_rank=None, step_seconds=0.0, **ignored):
        assert isinstance(prompt, str) and len(generator) == num_images_per_prompt  # xDiT must not split it again
        if fail_rank == self.rank:
            raise KeyError(f"stand-in fails on rank {self.rank}")
        last = self.rank == self.replica[-1]
        for step in range(num_inference_steps):
            time.sleep(step_seconds)
            if last or self.pipefusion == 1:
                callback_on_step_end(self, step, step, {})
        return SimpleNamespace(images=[_image(g, prompt) for g in generator]) if last else None


class StandInWorker(XFuserWorker):
    def load(self, model, args, dtype):
        self.args = args
        return StandInPipe(self.rank, self.replicas[self.replica], self.config.pipefusion_degree)


def expected(prompts: list[str], num_images: int, seed: int) -> list[np.ndarray]:
    return [_image(torch.Generator().manual_seed(seed + i), prompts[i // num_images])
            for i in range(len(prompts) * num_images)]


# ---------------------------------------------------------------- mapping and refusals (no processes)


def test_parallel_string_maps_to_xfuser_args():
    config = ParallelConfig.parse("data=2,cfg=2,pipefusion=2,ring=2,ulysses=2,tensor=2,pipefusion_patches=4,warmup_steps=2")
    args = xfuser_args(config, "tiny-sd3", use_parallel_vae=True)
    assert args == dict(model="tiny-sd3", use_cfg_parallel=True, data_parallel_degree=2, pipefusion_parallel_degree=2,
                        ring_degree=2, ulysses_degree=2, tensor_parallel_degree=2, num_pipeline_patch=4, warmup_steps=2,
                        use_parallel_vae=True)
    assert xfuser_args(ParallelConfig(), "m")["use_cfg_parallel"] is False
    assert replica_ranks(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # xDiT's "tp-sp-pp-cfg-dp": data outermost
    assert [list(share(3, 2, r)) for r in range(2)] == [[0, 1], [2]]
    assert [list(share(1, 2, r)) for r in range(2)] == [[0], []]


def test_what_xdit_cannot_do_is_refused_before_any_process_starts(tmp_path, capsys):
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="without cfg parallelism; use data, pipefusion, ring, ulysses, tensor"):
        xfuser_args(ParallelConfig.parse("cfg=2"), str(flux))
    with pytest.raises(ValueError, match="without pipefusion, ulysses parallelism; use data, cfg, tensor"):
        xfuser_args(ParallelConfig.parse("pipefusion=2,ulysses=2"), "tiny-sdxl")
    with pytest.raises(ValueError, match="attention_backend are ditmesh settings"):
        xfuser_args(ParallelConfig.parse("ulysses=2,attention_backend=math"), "tiny-flux")
    with pytest.raises(ValueError, match="come from `parallel`"):
        xfuser_args(ParallelConfig.parse("ulysses=2"), "tiny-flux", ulysses_degree=4)
    # the CLI refuses too, before spawning: a run that started processes would take seconds, not this
    started = time.perf_counter()
    assert cli.main(["generate", "--engine", "xfuser", "--model", str(flux), "--parallel", "cfg=2"]) == 2
    assert "without cfg parallelism" in capsys.readouterr().err and time.perf_counter() - started < 2


# ---------------------------------------------------------------- routing (gloo ranks of the shared pool)


def _generate(parallel: str, payload: dict) -> list | None:
    worker = StandInWorker()
    worker._rank, worker._world_size, worker._device = dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    worker.setup(model="stand-in", parallel=parallel)
    result = worker(**payload)
    return None if result is None else [np.asarray(image) for image in result["images"]]


@pytest.mark.parametrize("parallel, prompts, num_images", [
    ("pipefusion=2", ["a cat"], 2),  # one replica: its last rank (1) holds the images
    ("data=2", ["a cat", "a black dog"], 2),  # replica 0: the cat's two images, replica 1: the dog's
    ("data=2", ["a cat"], 3),  # replica 0: images 0 and 1, replica 1: image 2
    ("data=2", ["a cat"], 1),  # replica 1 has nothing to do and still joins the gather
])
def test_images_reach_rank_0_in_seed_order(pools, parallel, prompts, num_images):
    results = pools(2).run(_generate, parallel, dict(prompt=prompts, num_images=num_images, seed=7, steps=2),
                           timeout=170)  # the first call may wait for the shared pool to start (180 s test limit)
    assert results[1] is None
    want = expected(prompts, num_images, seed=7)
    assert len(results[0]) == len(want)
    for got, image in zip(results[0], want):
        np.testing.assert_array_equal(got, image)


def test_an_error_on_any_rank_reaches_rank_0_and_no_rank_waits(pools):
    for parallel in ("pipefusion=2", "data=2"):  # rank 0 idle at the gather; rank 0 busy in another replica
        with pytest.raises(Exception) as error:
            pools(2).run(_generate, parallel, dict(prompt="a cat", num_images=2, fail_rank=1), timeout=60)
        message = str(error.value)  # the lowest failing rank's: rank 0 re-raised rank 1's error
        assert message.startswith("rank 0 failed") and "KeyError: 'stand-in fails on rank 1'" in message


# ---------------------------------------------------------------- through the runner: streaming, cancellation


def test_streams_progress_and_stops_a_given_up_request_on_every_rank():
    from ditmesh.runner.runner import DistributedRunner

    async def scenario(parallel: str, steps: int):
        runner = DistributedRunner(StandInWorker, 2, device_type="cpu", num_threads=1,
                                   setup_kwargs=dict(model="stand-in", parallel=parallel))
        async with runner:
            events = [e async for e in runner.stream(dict(prompt="a cat", steps=steps), as_text_events=False)]
            with pytest.raises(TimeoutError):  # a request minutes long, given up after 0.3 s
                await runner.invoke(dict(prompt="a cat", steps=100_000, step_seconds=0.001), timeout=0.3)
            after = await runner.invoke(dict(prompt="a cat", steps=1, seed=3), timeout=30)
        return events, after

    events, after = asyncio.run(scenario("ulysses=2", 3))
    assert events[:-1] == [{"step": 1, "of": 3}, {"step": 2, "of": 3}, {"step": 3, "of": 3}]
    np.testing.assert_array_equal(np.asarray(after["images"][0]), expected(["a cat"], 1, seed=3)[0])
