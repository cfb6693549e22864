"""DistributedRunner / DistributedWorker on real spawned gloo ranks (CPU).

Each runner start spawns processes that import torch (seconds), so runners are shared per module
through `runners(world_size)`; a test that breaks one leaves it to be restarted by the next user.
All runner calls go through one module-wide event loop (the runner's sockets belong to it).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import runner_workers
from ditmesh import DistributedRunner, RanksStuck, RemoteError, RunnerBroken, WorkerDied
from ditmesh.runner.protocol import decode, encode, to_text_event

COLLECTIVE_TIMEOUT = 2.0  # s: how long the other ranks get after one raised, in these tests


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def runners(loop):
    """``runners(n)`` -> a started EchoWorker runner of n CPU ranks (setup scale=2), healthy."""
    made: dict[int, DistributedRunner] = {}

    def get(world_size: int) -> DistributedRunner:
        if world_size not in made:
            made[world_size] = DistributedRunner(runner_workers.EchoWorker, world_size, device_type="cpu",
                                                 collective_timeout=COLLECTIVE_TIMEOUT, num_threads=1)
            loop.run_until_complete(made[world_size].start(scale=2.0))
        runner = made[world_size]
        if not runner.is_running:
            loop.run_until_complete(runner.restart())
        return runner

    yield get

    async def stop_all():  # concurrently: each waits for its processes' interpreter exit
        await asyncio.gather(*(runner.stop() for runner in made.values()))

    loop.run_until_complete(stop_all())


def collect(loop, aiter) -> list:
    async def drain():
        return [item async for item in aiter]

    return loop.run_until_complete(drain())


def expected_sum(world_size: int, x: float, scale: float = 2.0) -> float:
    return x * scale * sum(rank + 1 for rank in range(world_size))


def child_pids() -> set[int]:
    """Children of this process, zombies included (a zombie is an unreaped child), except
    multiprocessing's long-lived resource tracker."""
    me = str(os.getpid())
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # fields: state, ppid, ...
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if fields[1] == me and b"resource_tracker" not in cmdline:
            pids.add(int(stat.parent.name))
    return pids


# ---------------------------------------------------------------- the basic contract


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_invoke_and_stream_match_serial_sum(loop, runners, world_size):
    runner = runners(world_size)
    result = loop.run_until_complete(runner.invoke({"x": 1.5}))
    assert result["sum"] == expected_sum(world_size, 1.5)  # exact: small integers in fp32
    assert result["world_size"] == world_size and result["streaming"] is False
    assert result["threads"] == 1  # the runner's num_threads reached torch in the worker

    items = collect(loop, runner.stream({"x": 1.0, "steps": 3}, as_text_events=False))
    assert [item["step"] for item in items[:-1]] == [0, 1, 2]
    assert all(item["rank"] == 0 for item in items[:-1])  # only rank 0's events reach the caller
    assert items[-1]["sum"] == expected_sum(world_size, 1.0) and items[-1]["streaming"] is True

    frames = collect(loop, runner.stream({"x": 1.0, "steps": 2}, as_text_events=True))
    assert all(frame.startswith(b"data: ") and frame.endswith(b"\n\n") for frame in frames)
    decoded = [json.loads(frame[len(b"data: "):]) for frame in frames]
    assert [d["step"] for d in decoded[:-1]] == [0, 1]
    assert decoded[-1]["sum"] == expected_sum(world_size, 1.0)


def test_concurrent_invokes_each_get_their_own_result(loop, runners):
    runner = runners(2)

    async def many():
        return await asyncio.gather(*(runner.invoke({"x": float(i), "echo": i}) for i in range(6)))

    for i, result in enumerate(loop.run_until_complete(many())):
        assert result["echo"] == i and result["sum"] == expected_sum(2, float(i))


def test_invoke_before_start_names_the_fix(loop):
    runner = DistributedRunner(runner_workers.EchoWorker, 2, device_type="cpu")
    with pytest.raises(RuntimeError, match=r"runner.start"):
        loop.run_until_complete(runner.invoke({}))
    loop.run_until_complete(runner.stop())  # stop on a never-started runner is a no-op


def test_worker_class_must_be_importable():
    class Local(runner_workers.EchoWorker):
        pass

    with pytest.raises(ValueError, match="module level"):
        DistributedRunner(Local, 1, device_type="cpu")
    with pytest.raises(TypeError, match="DistributedWorker subclass"):
        DistributedRunner(object, 1, device_type="cpu")


def test_no_polling_sleeps_in_runner_code():
    # Guarantee 1: replies, events and deaths are events (sockets, futures, sentinels), never polls.
    for path in Path(__file__).parents[1].joinpath("ditmesh", "runner").glob("*.py"):
        source = path.read_text()
        assert not re.search(r"\bsleep\(", source), f"{path.name} sleeps"
        assert not re.search(r"\.poll\(", source), f"{path.name} polls"


# ---------------------------------------------------------------- errors on ranks


@pytest.mark.parametrize("fail_rank", [0, 1])
def test_exception_on_any_rank_is_reraised_with_rank_and_traceback(loop, runners, fail_rank):
    runner = runners(2)
    with pytest.raises(RemoteError) as info:
        loop.run_until_complete(runner.invoke({"x": 1.0, "fail_rank": fail_rank}))
    error = info.value
    assert isinstance(error, RuntimeError)
    assert error.rank == fail_rank and error.exc_type == "ValueError"
    assert f"boom on rank {fail_rank}" in error.remote_traceback
    assert "runner_workers.py" in error.remote_traceback and error.remote_traceback in str(error)
    # The workers carry on: the next request works on the same processes.
    assert loop.run_until_complete(runner.invoke({"x": 1.0}))["sum"] == expected_sum(2, 1.0)
    assert runner.is_running


def test_unpicklable_result_or_event_is_a_remote_error_and_workers_survive(loop, runners):
    runner = runners(2)
    with pytest.raises(RemoteError, match="cannot be sent between processes") as info:
        loop.run_until_complete(runner.invoke({"return_lock": True}))
    assert info.value.rank == 0 and info.value.exc_type == "TypeError"
    with pytest.raises(RemoteError, match="cannot be sent between processes"):
        collect(loop, runner.stream({"return_lock": True}, as_text_events=False))
    assert loop.run_until_complete(runner.invoke({"x": 2.0}))["sum"] == expected_sum(2, 2.0)


def test_dead_rank_raises_worker_died_promptly_and_restart_recovers(loop, runners):
    runner = runners(2)
    runner.auto_restart = False  # the manual path: RunnerBroken until restart()
    try:
        before = loop.run_until_complete(runner.invoke({"x": 1.0}))["pid"]
        pids = runner.pids
        assert runner.alive == [True, True] and runner.is_alive()
        start = time.perf_counter()
        with pytest.raises(WorkerDied) as info:
            loop.run_until_complete(runner.invoke({"die_rank": 1}))
        elapsed = time.perf_counter() - start
        assert info.value.rank == 1 and info.value.exitcode == 3
        assert runner.alive[1] is False and not runner.is_alive()  # a health check sees the dead rank
        assert elapsed < 30.0, f"death noticed after {elapsed:.2f} s"  # sentinel-driven: ms; without it, never
        assert runner.needs_restart and not runner.health()["healthy"]
        loop.run_until_complete(asyncio.sleep(0))  # let the kill of rank 0 be reaped
        with pytest.raises(RunnerBroken, match=r"runner.restart\(\)"):
            loop.run_until_complete(runner.invoke({"x": 1.0}))
        with pytest.raises(RunnerBroken, match="WorkerDied"):  # fal's: names the errors and forgets them
            runner.ensure_alive()
        assert runner.gather_errors() == []

        loop.run_until_complete(runner.restart())
    finally:
        runner.auto_restart = True
    assert not set(pids) & child_pids(), "old ranks left as zombies or orphans"
    result = loop.run_until_complete(runner.invoke({"x": 1.0}))
    assert result["sum"] == expected_sum(2, 1.0) and result["pid"] != before and result["calls"] == 1
    assert runner.alive == [True, True] and runner.health()["healthy"]


def test_rank_raising_before_a_collective_fails_the_call_and_restart_recovers(loop, runners):
    runner = runners(2)
    start = time.perf_counter()
    with pytest.raises(RemoteError) as info:  # rank 0 waits in all_reduce for rank 1 forever
        loop.run_until_complete(runner.invoke({"x": 1.0, "fail_before_collective_rank": 1}))
    elapsed = time.perf_counter() - start
    assert info.value.rank == 1 and "refuses to join the all_reduce" in info.value.remote_traceback
    assert "ranks [0] did not finish" in str(info.value) and "all_reduce" in info.value.note
    assert COLLECTIVE_TIMEOUT <= elapsed < COLLECTIVE_TIMEOUT + 5.0  # rank 0 would wait forever without it
    assert runner.needs_restart  # restarting by itself (auto_restart)
    assert loop.run_until_complete(runner.invoke({"x": 3.0}, timeout=60))["sum"] == expected_sum(2, 3.0)


def test_rank_left_in_a_collective_after_another_returned_is_named_with_its_stack(loop, runners):
    """Issue 24: rank 1 returns normally, rank 0 waits in an all_reduce rank 1 never entered. The
    call fails within collective_timeout + 5 s naming rank 0 and where it waits; the ranks restart
    by themselves and the next request works."""
    runner = runners(2)
    start = time.perf_counter()
    with pytest.raises(RanksStuck) as info:  # without the bound: TimeoutError from the invoke's own timeout
        loop.run_until_complete(runner.invoke({"x": 1.0, "return_early_rank": 1}, timeout=COLLECTIVE_TIMEOUT + 20))
    elapsed = time.perf_counter() - start
    assert COLLECTIVE_TIMEOUT <= elapsed < COLLECTIVE_TIMEOUT + 5.0, elapsed
    error = info.value
    assert isinstance(error, RunnerBroken) and error.ranks == [0]
    assert "rank(s) [0] did not finish" in str(error) and "after rank(s) [1] returned" in str(error)
    # where: the innermost frames of rank 0's stack, the collective inside the worker's own line
    assert "in all_reduce" in str(error) and "runner_workers.py" in error.stacks[0]
    assert loop.run_until_complete(runner.invoke({"x": 2.0}, timeout=60))["sum"] == expected_sum(2, 2.0)
    assert any(isinstance(e, RanksStuck) for e in runner.gather_errors())


def test_slow_but_healthy_rank_is_not_killed(loop, runners):
    runner = runners(2)
    pids = runner.pids
    # rank 0 works alone for half the collective_timeout after rank 1 returned: a healthy request
    result = loop.run_until_complete(runner.invoke({"x": 1.0, "slow_rank": 0, "slow": COLLECTIVE_TIMEOUT / 2}))
    assert result["sum"] == expected_sum(2, 1.0) and runner.pids == pids and runner.is_running


def test_health_reports_in_flight_age_and_overdue_requests(loop, runners):
    runner = runners(2)

    async def probe():
        assert runner.health() == {"healthy": True, "state": "running", "alive": [True, True], "in_flight": 0,
                                   "oldest_request_s": None, "overdue": False, "restarting": False}
        task = asyncio.ensure_future(runner.invoke({"sleep": 0.6}))
        await asyncio.sleep(0.3)
        busy = runner.health()
        with pytest.raises(TimeoutError):
            await runner.invoke({"sleep": 0.6}, timeout=0.1)  # queued behind the first: past its bound
        overdue = runner.health()
        await task
        await runner.invoke({})  # after the abandoned one: the ranks have let go of it
        return busy, overdue, runner.health()

    busy, overdue, idle = loop.run_until_complete(probe())
    assert busy["healthy"] and busy["in_flight"] == 1 and 0.2 < busy["oldest_request_s"] < 5
    assert not overdue["healthy"] and overdue["overdue"] and overdue["in_flight"] == 2
    assert idle["healthy"] and idle["in_flight"] == 0 and runner.oldest_request_age() is None


# ---------------------------------------------------------------- timeouts and cancellation


def test_timeout_raises_and_late_result_is_discarded(loop, runners):
    runner = runners(2)
    with pytest.raises(TimeoutError, match="late result will be discarded"):
        loop.run_until_complete(runner.invoke({"sleep": 0.5, "echo": "old"}, timeout=0.05))
    result = loop.run_until_complete(runner.invoke({"x": 1.0, "echo": "new"}))
    assert result["echo"] == "new" and result["sum"] == expected_sum(2, 1.0)


def test_cancelled_invoke_and_abandoned_stream_leave_runner_usable(loop, runners):
    runner = runners(2)

    async def cancel_invoke():
        task = asyncio.ensure_future(runner.invoke({"sleep": 0.3, "echo": "cancelled"}))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(TimeoutError):  # asyncio.wait_for around invoke cancels it too
            await asyncio.wait_for(runner.invoke({"sleep": 0.3, "echo": "cancelled"}), 0.05)
        return await runner.invoke({"echo": "after-cancel"})

    assert loop.run_until_complete(cancel_invoke())["echo"] == "after-cancel"

    async def leave_stream_early():
        stream = runner.stream({"steps": 5, "echo": "abandoned"}, as_text_events=False)
        async for item in stream:
            assert item["step"] == 0
            break
        await stream.aclose()
        return [item async for item in runner.stream({"steps": 1, "echo": "next"}, as_text_events=False)]

    items = loop.run_until_complete(leave_stream_early())
    assert len(items) == 3  # step event, echo event, result: nothing left over from the abandoned stream
    assert items[0]["step"] == 0 and items[1] == "next" and items[2]["echo"] == "next"


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_given_up_requests_stop_on_every_rank_after_the_same_step(loop, world_size):
    """A stream left early, a cancelled invoke and a timed-out invoke each stop at the ranks'
    next `cancel_requested` (all ranks after the same step), and the next request runs at once."""
    steps = 1_000_000  # minutes of collective steps: a request that is not stopped fails the report's timeout
    runner = DistributedRunner(runner_workers.StepsWorker, world_size, device_type="cpu", num_threads=1)

    async def ran_before() -> list[int]:
        report = await runner.invoke({"report": True}, timeout=30)
        assert report["started"] == len(ran) + 1  # the given-up request reached the ranks and started
        return report["ran"]

    ran: list[list[int]] = []

    async def give_up_three_ways() -> list[list[int]]:
        await runner.start()
        stream = runner.stream({"steps": steps}, as_text_events=False)
        async for event in stream:
            if event["step"] == 2:
                break
        await stream.aclose()
        ran.append(await ran_before())
        task = asyncio.ensure_future(runner.invoke({"steps": steps}))
        await asyncio.sleep(0.05)
        task.cancel()
        ran.append(await ran_before())
        with pytest.raises(TimeoutError, match="asked to stop it"):
            await runner.invoke({"steps": steps}, timeout=0.05)
        ran.append(await ran_before())
        ran.append([(await runner.invoke({"steps": 3}, timeout=30))["ran"]])
        return ran

    try:
        left, cancelled, timed_out, whole = loop.run_until_complete(give_up_three_ways())
    finally:
        loop.run_until_complete(runner.stop())
    for counts in (left, cancelled, timed_out):
        assert len(set(counts)) == 1, counts  # every rank stopped after the same step
        assert 0 < counts[0] < steps
    assert left[0] >= 3 and whole == [3]


# ---------------------------------------------------------------- payloads and results


def test_bad_payloads_fail_in_the_caller_before_sending(loop, runners):
    runner = runners(2)
    pids = runner.pids
    bad = [
        (["x", 1.0], TypeError, "payload must be a dict"),
        ({"echo": lambda: 1}, TypeError, r"key 'echo' \(function\) cannot be sent"),
        ({"echo": threading.Lock()}, TypeError, r"key 'echo' \(lock\) cannot be sent"),
        ({1: 2}, TypeError, "keys must be strings"),
        ({"streaming": True}, ValueError, "'streaming' is reserved"),
    ]
    for payload, error, message in bad:
        with pytest.raises(error, match=message):
            loop.run_until_complete(runner.invoke(payload))
        with pytest.raises(error, match=message):
            runner.stream(payload)  # raised at the call, before iterating
    assert runner.pids == pids and runner.is_running
    assert loop.run_until_complete(runner.invoke({"x": 1.0}))["sum"] == expected_sum(2, 1.0)


def rich_value():
    image = Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(64, 48, 3), "RGB")
    return {
        "images": [image, image.convert("L")],
        "bf16": torch.linspace(-3, 3, 1000, dtype=torch.bfloat16).reshape(10, 100),
        "fp32": torch.randn(3, 256, 256),  # 768 KiB: out-of-band frame
        "int64_scalar": torch.tensor(7),
        "empty": torch.empty(0, 4),
        "array": np.arange(20000, dtype=np.float64).reshape(100, 200),
        "raw": bytes(range(256)) * 100,
        "nested": {"a": [1, (2, 3), {"b": None}], "s": "é"},
    }


def assert_same(actual, expected):
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e)
    elif isinstance(expected, torch.Tensor):
        assert actual.device.type == "cpu"
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    elif isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(actual, expected)
        assert actual.dtype == expected.dtype and actual.flags.writeable
    elif isinstance(expected, Image.Image):
        assert actual.mode == expected.mode and actual.size == expected.size
        assert actual.tobytes() == expected.tobytes()
    else:
        assert actual == expected


def test_protocol_round_trip_is_binary_and_exact():
    value = rich_value()
    frames = encode(value)
    assert len(frames) >= 3  # big tensors/arrays travel as separate frames, not inside the pickle
    assert sum(memoryview(f).nbytes for f in frames) < 1.1 * (3 * 256 * 256 * 4 + 20000 * 8 + 25600 + 30000)
    assert_same(decode([bytes(f) for f in frames]), value)


def test_results_with_images_tensors_arrays_bytes_arrive_intact(loop, runners):
    runner = runners(2)
    value = rich_value()
    result = loop.run_until_complete(runner.invoke({"echo": value}))
    assert_same(result["echo"], value)
    event, final = collect(loop, runner.stream({"echo": value}, as_text_events=False))
    assert_same(event, value)
    assert_same(final["echo"], value)


def test_text_events_are_sse_with_base64_images_and_raw_passthrough(loop, runners):
    runner = runners(2)
    image = Image.new("RGB", (8, 4), (255, 0, 0))
    echo = {"image": image, "t": torch.tensor([1.5, 2.0], dtype=torch.bfloat16)}
    frames = collect(loop, runner.stream({"echo": echo, "raw_event": b"event: custom\n\n"}, as_text_events=True))
    echo_frame, raw, final = frames
    assert raw == b"event: custom\n\n"  # as_text_event=False: passed through untouched
    data = json.loads(echo_frame.removeprefix(b"data: "))
    assert data["t"]["content_type"] == "application/tensor" and data["t"]["shape"] == [2]
    tensor = torch.load(io.BytesIO(base64.b64decode(data["t"]["url"].split(",", 1)[1])))
    assert tensor.dtype == torch.bfloat16 and tensor.tolist() == [1.5, 2.0]
    assert data["image"]["content_type"] == "image/jpeg" and (data["image"]["width"], data["image"]["height"]) == (8, 4)
    prefix = "data:image/jpeg;base64,"
    assert data["image"]["url"].startswith(prefix)
    decoded = Image.open(io.BytesIO(base64.b64decode(data["image"]["url"][len(prefix):])))
    assert decoded.size == (8, 4) and max(abs(a - b) for a, b in zip(decoded.getpixel((0, 0)), (255, 0, 0))) < 8
    assert json.loads(final.removeprefix(b"data: "))["echo"]["t"]["dtype"] == "torch.bfloat16"
    with pytest.raises(TypeError, match="text event"):
        to_text_event({"x": object()})


# ---------------------------------------------------------------- start-up and shutdown


def test_setup_error_raises_remote_error_and_leaves_no_processes(loop):
    before = child_pids()
    runner = DistributedRunner(runner_workers.FailingSetupWorker, 2, device_type="cpu", num_threads=1)
    with pytest.raises(RemoteError) as info:
        loop.run_until_complete(runner.start())
    assert info.value.rank == 1 and info.value.exc_type == "KeyError"
    assert "missing weights" in info.value.remote_traceback and "setup" in info.value.remote_traceback
    assert child_pids() <= before, "setup failure left worker processes behind"
    loop.run_until_complete(runner.stop())  # idempotent after a failed start


def test_async_with_starts_and_stops_idempotently(loop):
    before = child_pids()
    runner = DistributedRunner(runner_workers.EchoWorker, device_type="cpu", setup_kwargs={"scale": 3.0},
                               transport="tcp")  # world_size defaults to 1, as fal's

    async def use():
        async with runner as started:  # not started yet: the first request starts it (scale=3)
            first = await started.invoke({"x": 1.0})
        await runner.stop()
        async with runner:  # fal style: start explicitly inside the block
            await runner.start(scale=5.0)
            second = await runner.invoke({"x": 1.0})
        await runner.stop()
        return first, second

    first, second = loop.run_until_complete(use())
    assert first["sum"] == 3.0 and second["sum"] == 5.0 and not runner.is_running
    assert child_pids() <= before
    with pytest.raises(RuntimeError, match="start"):
        loop.run_until_complete(runner.invoke({}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ranks_use_nccl_on_their_own_gpu_and_return_cpu_tensors(loop):
    world_size = min(2, torch.cuda.device_count())
    runner = DistributedRunner(runner_workers.CudaWorker, world_size)  # device_type defaults to cuda
    loop.run_until_complete(runner.start())
    try:
        result = loop.run_until_complete(runner.invoke({}))
        event, final = collect(loop, runner.stream({}, as_text_events=False))
    finally:
        loop.run_until_complete(runner.stop())
    assert result["backend"] == "nccl" and result["device"] == "cuda:0" and result["current_device"] == 0
    expected = torch.full((4,), float(sum(range(1, world_size + 1))), dtype=torch.bfloat16)
    for tensor in (result["tensor"], event["tensor"], final["tensor"]):
        assert tensor.device.type == "cpu"
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0)


def test_cpu_ranks_fork_from_the_preloaded_server_and_gpu_ranks_are_spawned(monkeypatch):
    # A fork server's imports initialise the CUDA driver on a GPU machine; a child forked after
    # that cannot use CUDA, so GPU ranks must never come from it.
    import sys

    from ditmesh.runner import procs

    assert procs.context("cuda").get_start_method() == "spawn"
    assert procs.context("cpu").get_start_method() == ("forkserver" if sys.platform == "linux" else "spawn")
    monkeypatch.setenv("DITMESH_START_METHOD", "spawn")
    assert procs.context("cpu").get_start_method() == "spawn"
    monkeypatch.setenv("DITMESH_START_METHOD", "fork")
    with pytest.raises(ValueError, match="use 'forkserver'"):
        procs.context("cpu")
