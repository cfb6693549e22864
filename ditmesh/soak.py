"""A seeded, bounded soak of `DistributedRunner` + `DiffusionWorker` on the CPU.

    python benchmarks/soak.py --requests 200            # every valid mesh of world 1, 2, 4; prints the counts
    tests/test_soak.py                                  # a short one, in the suite

Meshes are drawn from `ditmesh.valid_configs` of the tiny models; each mesh gets a runner and a
few requests, each drawn at random: number of prompts (0 included) and images per prompt (fewer
than the data degree included), valid and invalid sizes, steps, guidance, invoke or stream, and
at most one disruption: leaving a stream after a random step, a timeout shorter than the request,
or a rank killed mid-request. Every request must end as documented:

- the images of the serial pipeline run in this process (uint8 levels within `PIXEL_TOLERANCE`),
- a `ValueError` naming the fix (bad size, no image asked for, cfg=2 without guidance),
- `TimeoutError` / a cancelled stream, or `WorkerDied` after a kill,

and the next request must work. A request that has not ended after `bound_s` is a hang (the
ranks are then killed so the soak goes on); the counts say how many there were, and how many
replies were lost or duplicated and processes or file descriptors leaked.

PipeFusion meshes run with `warmup_steps` above the steps drawn, so they are exact too: the soak
checks that every request ends, not PipeFusion's approximation (docs/pipefusion.md measures that).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ditmesh.config import ParallelConfig

MODELS = ("tiny-flux", "tiny-sd3", "tiny-sdxl")
PIXEL_TOLERANCE = 2
"""Largest uint8 difference from the serial image (fp32 sums in another order round differently)."""
SOAK_WARMUP_STEPS = 8  # above every step count drawn: PipeFusion meshes are exact


@dataclass(frozen=True)
class Request:
    """One drawn request: the payload and what is done to it."""

    payload: dict[str, Any]
    mode: str  # "invoke" or "stream"
    disruption: str | None = None  # None, "leave" (stream left after `at` events), "timeout", "kill"
    at: int = 1  # leave after this many events / kill after this many events
    kill_rank: int = 0
    expect: str = "images"  # "images" or "ValueError"


@dataclass
class Counts:
    """How the requests of a soak ended, and what went wrong."""

    requests: int = 0
    images: int = 0
    value_errors: int = 0
    left: int = 0
    timeouts: int = 0
    worker_died: int = 0
    hangs: int = 0
    lost: int = 0
    duplicated: int = 0
    mismatched: int = 0
    wrong_outcome: int = 0
    leaked_processes: int = 0
    leaked_fds: int = 0
    restarts: int = 0
    meshes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def bad(self) -> int:
        """Requests that did not end as documented, plus leaks: 0 is a passing soak."""
        return (self.hangs + self.lost + self.duplicated + self.mismatched + self.wrong_outcome
                + self.leaked_processes + self.leaked_fds)


def draw_meshes(rng: random.Random, worlds: tuple[int, ...], models: tuple[str, ...] = MODELS) -> list[tuple[str, str]]:
    """Every (model, config) valid on the given world sizes, shuffled by `rng`."""
    from ditmesh.models.loading import load_pipeline
    from ditmesh.parallel.validate import valid_configs

    meshes = []
    for model in models:
        pipe = load_pipeline(model, dtype="float32", device="cpu")
        for world in worlds:
            meshes += [(model, _soak_config(config)) for config in valid_configs(pipe, world)]
    rng.shuffle(meshes)
    return meshes


def _soak_config(config: ParallelConfig) -> str:
    text = str(config)
    return f"{text},warmup_steps={SOAK_WARMUP_STEPS}" if config.pipefusion_degree > 1 else text


def draw_request(rng: random.Random, model: str, config: ParallelConfig) -> Request:
    """A random request for `model` under `config`, with the outcome it must have."""
    num_prompts = rng.choice((0, 1, 1, 1, 2))
    size = 64 if model == "tiny-sdxl" else rng.choice((32, 64))
    bad_size = rng.random() < 0.1
    payload: dict[str, Any] = dict(
        prompt=[f"a {rng.choice(('red', 'blue'))} {rng.choice(('circle', 'square'))}" for _ in range(num_prompts)],
        num_images=rng.choice((1, 1, 2, 3)), steps=rng.randint(1, 3), seed=rng.randrange(1000),
        height=size + (4 if bad_size else 0), width=size,  # +4: a multiple of no model's
    )
    no_guidance = False
    if model == "tiny-flux" and config.cfg_degree > 1:
        no_guidance = rng.random() < 0.2
        if not no_guidance:  # FLUX's true CFG is what cfg=2 splits
            payload.update(negative_prompt="blurry", true_cfg_scale=2.0)
    # PipeFusion cuts the image into bands of token rows (16 px each): more patches than rows is refused.
    too_few_rows = config.pipefusion_degree > 1 and config.num_patches > size // 16
    expect = "ValueError" if (num_prompts == 0 or bad_size or no_guidance or too_few_rows) else "images"
    mode = rng.choice(("invoke", "stream"))
    roll = rng.random()
    if expect != "images" or roll < 0.7:
        return Request(payload, mode, expect=expect)
    if roll < 0.8:
        return Request(payload, "stream", "leave", at=rng.randint(1, payload["steps"]))
    if roll < 0.9:
        return Request(payload, "invoke", "timeout")
    return Request(payload, "stream", "kill", at=1, kill_rank=rng.randrange(config.world_size))


class Soak:
    """Runs drawn requests against one runner per mesh and counts how they end."""

    def __init__(self, bound_s: float = 60.0, collective_timeout: float = 20.0):
        self.bound_s = bound_s
        self.collective_timeout = collective_timeout
        self._serial: dict[str, Any] = {}
        self._fds: int | None = None  # descriptors open after the last mesh

    async def mesh(self, model: str, parallel: str, requests: list[Request]) -> Counts:
        """Start a runner for (model, parallel), run `requests` in order, stop it, count."""
        from ditmesh.runner.diffusion import DiffusionWorker
        from ditmesh.runner.runner import DistributedRunner

        config = ParallelConfig.parse(parallel)
        counts = Counts(meshes=[f"{model} {parallel}"])
        self._pipeline(model)
        runner = DistributedRunner(DiffusionWorker, config.world_size, device_type="cpu", num_threads=1,
                                   collective_timeout=self.collective_timeout, start_timeout=self.bound_s)
        await runner.start(model=model, parallel=parallel)
        pids = set(runner.pids)
        try:
            for request in requests:
                counts.requests += 1
                await self._one(runner, model, request, counts)
                pids |= set(runner.pids)
                if runner.needs_restart:
                    counts.restarts += 1
                    await runner.restart()
                    pids |= set(runner.pids)
        finally:
            await runner.stop()
        counts.leaked_processes += sum(pid_alive(pid) for pid in pids if pid is not None)
        # Descriptors open after each mesh's runner stopped: more than after the previous mesh is a
        # leak. (The first runner of a process opens some for good: multiprocessing's resource tracker.)
        fds = _open_fds()
        counts.leaked_fds += 0 if self._fds is None else max(0, fds - self._fds)
        self._fds = fds
        return counts

    async def _one(self, runner: Any, model: str, request: Request, counts: Counts) -> None:
        try:
            outcome = await asyncio.wait_for(self._issue(runner, request), self.bound_s)
        except TimeoutError:
            counts.hangs += 1
            counts.failures.append(f"hang: {request}")
            runner._break(RuntimeError("soak: request hung"))  # kill the ranks; the next request restarts them
            return
        kind, value = outcome
        expected = {"images": "images", "ValueError": "ValueError"}[request.expect]
        if request.disruption == "leave":
            expected = "left"
        elif request.disruption == "timeout":
            expected = ("timeout", "images")  # a fast request may beat its timeout
        elif request.disruption == "kill":
            expected = ("died", "images")  # the kill may land after rank 0 replied
        if kind not in (expected if isinstance(expected, tuple) else (expected,)):
            counts.wrong_outcome += 1
            counts.failures.append(f"{kind} ({value}) instead of {expected}: {request}")
            return
        counts_field = {"images": "images", "ValueError": "value_errors", "left": "left", "timeout": "timeouts",
                        "died": "worker_died", "duplicated": "duplicated"}[kind]
        setattr(counts, counts_field, getattr(counts, counts_field) + 1)
        if kind == "images" and not self._matches_serial(model, request.payload, value):
            counts.mismatched += 1
            counts.failures.append(f"images differ from serial: {request}")

    async def _issue(self, runner: Any, request: Request) -> tuple[str, Any]:
        from ditmesh.runner.protocol import RemoteError, RunnerBroken, WorkerDied

        try:
            if request.mode == "invoke":
                timeout = 0.05 if request.disruption == "timeout" else None
                return "images", (await runner.invoke(request.payload, timeout=timeout))["images"]
            return await self._stream(runner, request)
        except RemoteError as error:
            return ("ValueError" if error.exc_type.endswith("ValueError") else "error"), error.message
        except TimeoutError as error:
            return "timeout", str(error)
        except (WorkerDied, RunnerBroken) as error:
            return "died", str(error)

    async def _stream(self, runner: Any, request: Request) -> tuple[str, Any]:
        steps, results, events = request.payload["steps"], [], 0
        async with contextlib.aclosing(runner.stream(request.payload, as_text_events=False)) as stream:
            async for item in stream:  # leaving the block closes the stream: the ranks are told at once
                if "images" in item:
                    results.append(item)
                    continue
                if results or item.get("step") != events + 1:
                    return "duplicated", f"event {item} after {events} events and {len(results)} results"
                events += 1
                if request.disruption == "leave" and events == request.at:
                    return "left", events
                if request.disruption == "kill" and events == request.at:
                    os.kill(runner.pids[request.kill_rank], signal.SIGKILL)
        if len(results) != 1 or events != steps:
            return "duplicated", f"{events} events of {steps}, {len(results)} results"
        return "images", results[0]["images"]

    def _matches_serial(self, model: str, payload: dict[str, Any], images: list[Any]) -> bool:
        want = self.serial_images(model, payload)
        if len(want) != len(images):
            return False
        return all(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= PIXEL_TOLERANCE
                   for a, b in zip(images, want))

    def serial_images(self, model: str, payload: dict[str, Any]) -> list[Any]:
        """The images the serial pipeline draws for `payload` (DiffusionWorker's seeds: seed + i)."""
        prompts, per_prompt = payload["prompt"], payload["num_images"]
        extra = {key: payload[key] for key in ("negative_prompt", "true_cfg_scale") if key in payload}
        return self._pipeline(model)(
            prompt=prompts, num_images_per_prompt=per_prompt, num_inference_steps=payload["steps"],
            height=payload["height"], width=payload["width"], output_type="pil",
            generator=[torch.Generator().manual_seed(payload["seed"] + i) for i in range(len(prompts) * per_prompt)],
            **extra,
        ).images


    def _pipeline(self, model: str) -> Any:
        from ditmesh.models.loading import load_pipeline

        if model not in self._serial:
            self._serial[model] = load_pipeline(model, dtype="float32", device="cpu")
        return self._serial[model]


async def run_soak(num_requests: int, worlds: tuple[int, ...] = (1, 2, 4), seed: int = 0,
                   per_mesh: int = 4, bound_s: float = 60.0, models: tuple[str, ...] = MODELS,
                   meshes: list[tuple[str, str]] | None = None, log: Any = None) -> Counts:
    """Draw meshes and `num_requests` requests (`per_mesh` a mesh) with `seed`; run and count them."""
    rng = random.Random(seed)
    meshes = meshes if meshes is not None else draw_meshes(rng, worlds, models)
    soak, total = Soak(bound_s=bound_s), Counts()
    for index in range(0, num_requests, per_mesh):
        model, parallel = meshes[(index // per_mesh) % len(meshes)]
        config = ParallelConfig.parse(parallel)
        requests = [draw_request(rng, model, config) for _ in range(min(per_mesh, num_requests - index))]
        started = time.perf_counter()
        counts = await soak.mesh(model, parallel, requests)
        total.add(counts)
        if log is not None:
            log(f"{model:9s} {parallel:40s} {counts.requests} requests, {time.perf_counter() - started:5.1f} s, "
                f"bad {counts.bad}")
    return total


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def pid_alive(pid: int) -> bool:
    """Whether a process with this id still runs (a leak, once its runner has stopped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
