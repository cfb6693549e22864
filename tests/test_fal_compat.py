"""ditmesh as a drop-in for `fal.distributed` (fal 1.83): issue 26, one test per row of its table,
then the two fal-demos workers run with only the import changed.

fal's semantics, read from fal-ai/fal `projects/fal/src/fal/distributed/{worker,utils}.py`:
constructor `timeout` is the process-group timeout; `start(timeout=)` bounds start-up; text events
are ``b"data: <json>\\n\\n"`` with images as ``{"content_type", "width", "height", "url"}`` (JPEG
quality 60 in events, 95 or the payload's ``image_format`` in the final result).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import time

import pytest
import torch
from PIL import Image

import runner_workers
from ditmesh import DistributedRunner, DistributedWorker, RunnerBroken  # fal: from fal.distributed import ...


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return server.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def parse_event(frame: bytes) -> dict:
    """What a fal front-end does with one SSE frame."""
    assert isinstance(frame, bytes) and frame.startswith(b"data: ") and frame.endswith(b"\n\n"), frame[:40]
    return json.loads(frame[len(b"data: "):])


def image_of(event_image: dict) -> Image.Image:
    header, data = event_image["url"].split(",", 1)
    assert header == f"data:{event_image['content_type']};base64"
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.size == (event_image["width"], event_image["height"])
    return image


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def fal_runner(loop, tmp_path_factory):
    """One world-1 runner built as fal code builds it: every fal argument, positionally, in fal's order."""
    ports = {"master": free_port(), "worker": free_port()}
    cwd = tmp_path_factory.mktemp("fal-cwd")
    runner = DistributedRunner(runner_workers.EchoWorker, 1, "127.0.0.1", ports["master"], "127.0.0.1",
                               ports["worker"], 600, {"keepalive": True}, None, cwd,
                               device_type="cpu", num_threads=1)
    loop.run_until_complete(runner.start(timeout=600, scale=2.0))  # timeout: start-up's, not setup's
    yield runner, ports, cwd
    loop.run_until_complete(runner.stop())


# ---------------------------------------------------------------- the table, row by row


def test_row1_constructor_takes_fals_arguments_with_fals_meaning(loop, fal_runner):
    runner, ports, cwd = fal_runner
    assert runner.world_size == 1  # `world_size=1` default: the runner was built without a keyword
    report = loop.run_until_complete(runner.invoke({"history": True}))
    assert report["cwd"] == str(cwd)  # cwd: the workers' working directory
    assert report["pg_timeout_s"] == 600  # timeout: torch.distributed's process-group timeout, as fal's
    assert listening(ports["master"]) and listening(ports["worker"])  # the rendezvous and the ZMQ socket
    assert runner.keepalive_payload == {"keepalive": True}


def test_row2_start_timeout_bounds_startup_and_never_reaches_setup(loop, fal_runner):
    runner, _, _ = fal_runner
    # The fixture's start(timeout=600, scale=2.0) called setup(scale=2.0) only (EchoWorker.setup takes no timeout).
    assert loop.run_until_complete(runner.invoke({"x": 1.0}))["sum"] == 2.0
    slow = DistributedRunner(runner_workers.EchoWorker, device_type="cpu", num_threads=1)
    started = time.perf_counter()
    with pytest.raises(TimeoutError, match="start timeout of 0.002 s"):
        # No rank can start, join the process group and set up in 2 ms (forked from the preloaded
        # fork server a rank is up in ~50 ms; spawned, it imports torch for seconds).
        loop.run_until_complete(slow.start(timeout=0.002))
    assert time.perf_counter() - started < 10 and not slow.is_alive()


def test_row3_stream_takes_timeout_streaming_timeout_as_text_events_in_fals_order(loop, fal_runner):
    runner, _, _ = fal_runner

    async def first_then_silence():
        items = []
        with pytest.raises(TimeoutError, match="streaming_timeout=0.5"):
            # positional, in fal's order: payload, timeout, streaming_timeout, as_text_events
            async for item in runner.stream({"stream_sleep": 2.0}, None, 0.5, True):
                items.append(item)
        return items

    started = time.perf_counter()
    items = loop.run_until_complete(first_then_silence())
    assert time.perf_counter() - started < 1.9  # the gap between events ended it, not the whole stream
    assert [parse_event(item) for item in items] == [{"first": True}]
    done = loop.run_until_complete(collect(runner.stream({"x": 1.0}, streaming_timeout=30)))  # waits the 2 s out
    assert done[-1]["sum"] == 2.0  # as_text_events defaults to False, as in fal: Python objects


def test_row5_worker_api_image_format_streaming_error_rank_print_debug(loop, fal_runner):
    runner, _, _ = fal_runner
    frames = loop.run_until_complete(collect(runner.stream({"fal_api": True}, as_text_events=True)))
    q60, png, error, plain, final = [parse_event(frame) for frame in frames]
    image = Image.new("RGB", (16, 8), (200, 30, 60))
    assert base64.b64decode(q60["image"]["url"].split(",", 1)[1]) == jpeg_bytes(image, 60)
    assert png["image"]["content_type"] == "image/png" and image_of(png["image"]).tobytes() == image.tobytes()
    assert error == {"error": "a bad frame, carrying on"}
    assert plain == {"plain": 1}  # fal's default as_text_event=False, still a JSON event here
    assert base64.b64decode(final["image"]["url"].split(",", 1)[1]) == jpeg_bytes(image, 95)
    assert final["printed"] == "[debug] [rank 0] fal api worker running\n"


def test_row6_text_events_have_fals_shape(loop, fal_runner):
    runner, _, _ = fal_runner
    image = Image.new("RGB", (24, 12), (10, 120, 240))
    frames = loop.run_until_complete(collect(runner.stream({"echo": {"image": image}}, as_text_events=True)))
    event, final = (parse_event(frame) for frame in frames)
    assert set(event["image"]) == {"content_type", "width", "height", "data", "url"}
    assert event["image"]["content_type"] == "image/jpeg"
    assert event["image"]["url"].startswith("data:image/jpeg;base64,")
    assert base64.b64decode(event["image"]["url"].split(",", 1)[1]) == jpeg_bytes(image, 60)  # intermediate: q60
    assert base64.b64decode(final["echo"]["image"]["url"].split(",", 1)[1]) == jpeg_bytes(image, 95)  # final: q95
    png = [parse_event(f) for f in loop.run_until_complete(
        collect(runner.stream({"echo": {"image": image}, "image_format": "png"}, as_text_events=True)))]
    assert png[-1]["echo"]["image"]["content_type"] == "image/png"  # the payload's image_format, as fal reads it


def test_row4_stop_terminate_is_alive_ensure_alive_gather_errors_keepalive(loop, fal_runner):
    runner, _, _ = fal_runner  # last user of the shared runner: it ends it

    async def keepalive_then_call():
        runner.keepalive_interval = 0.2
        await asyncio.sleep(1.0)  # idle: keep-alives
        await runner.invoke({"sleep": 1.0})  # busy: none
        runner.keepalive_interval = None
        return (await runner.invoke({"history": True}))["history"]

    history = loop.run_until_complete(keepalive_then_call())
    calls = [(start, end) for kind, start, end in history if kind == "call"]
    pings = [start for kind, start, _ in history if kind == "keepalive"]
    assert len(pings) >= 2, history
    start, end = calls[-1]
    assert not [t for t in pings if start < t < end], "keep-alive sent while a call ran"

    assert runner.is_alive()
    runner.ensure_alive()
    runner.terminate()
    assert not runner.is_alive()
    with pytest.raises(RuntimeError, match="terminated"):
        runner.ensure_alive()
    assert runner.gather_errors() == []  # ensure_alive reported and forgot them, as fal's
    loop.run_until_complete(runner.stop(timeout=1))
    loop.run_until_complete(runner.stop(timeout=1))  # idempotent


# ---------------------------------------------------------------- fal-demos workers, unchanged


def collect(aiter):
    async def drain():
        return [item async for item in aiter]

    return drain()


def test_fal_demo_parallel_sdxl_worker_runs_with_only_the_import_changed(loop):
    async def app():
        # fal-demos' ExampleDistributedApp.setup / run / stream, as written
        runner = DistributedRunner(worker_cls=runner_workers.FalParallelSDXLWorker, world_size=2)
        await runner.start()
        request = {"prompt": "a cat wearing a hat", "negative_prompt": "blurry, low quality",
                   "num_inference_steps": 3, "width": 64, "height": 64}
        try:
            warmup_result = await runner.invoke(request)
            assert "image" in warmup_result, "Warm-up failed, no image returned from the worker"
            events = [item async for item in runner.stream(request, as_text_events=True)]
        finally:
            await runner.stop()
        return warmup_result, events

    result, frames = loop.run_until_complete(app())
    assert isinstance(result["image"], Image.Image) and result["image"].size == (128, 64)  # two ranks' images
    *previews, final = [parse_event(frame) for frame in frames]
    assert len(previews) == 2  # steps 0 and 2 of 3, gathered to rank 0
    for preview in previews:
        assert preview["image"]["content_type"] == "image/jpeg" and image_of(preview["image"]).size == (128, 64)
    assert final["image"]["content_type"] == "image/jpeg" and image_of(final["image"]).size == (128, 64)


def test_fal_demo_flux_lora_trainer_runs_with_only_the_import_changed(loop, tmp_path):
    from safetensors.torch import load_file

    from ditmesh.models.tiny import T5_DIM, CLIP_DIM, tiny_flux_transformer

    tiny_flux_transformer().save_pretrained(tmp_path / "flux" / "transformer")
    samples, text_len = 4, 8
    torch.save({"latents": torch.randn(samples, 4, 8, 8), "text_embeddings": torch.randn(samples, text_len, T5_DIM),
                "pooled_embeddings": torch.randn(samples, CLIP_DIM), "text_ids": torch.zeros(text_len, 3)},
               tmp_path / "data.pt")

    async def app():
        runner = DistributedRunner(worker_cls=runner_workers.FalFluxLoRATrainingWorker, world_size=2)
        await runner.start(model_path=str(tmp_path / "flux"), use_torch_compile=False)
        try:
            return [item async for item in runner.stream(
                {"training_data_path": str(tmp_path / "data.pt"), "max_train_steps": 3, "batch_size": 2},
                as_text_events=True)]
        finally:
            await runner.stop()

    *progress, final = [parse_event(frame) for frame in loop.run_until_complete(app())]
    assert [event["step"] for event in progress] == [0, 2] and progress[-1]["progress"] == "2/3"
    assert all(event["loss"] > 0 for event in progress)
    assert final["num_steps"] == 3 and final["final_loss"] > 0
    try:
        weights = load_file(final["checkpoint_path"])
    finally:
        os.remove(final["checkpoint_path"])
    assert weights and all("lora" in key for key in weights)


def test_imports_match_fal_distributed():
    import ditmesh

    assert ditmesh.DistributedRunner is DistributedRunner and issubclass(runner_workers.EchoWorker, DistributedWorker)
    assert issubclass(RunnerBroken, RuntimeError)  # fal's ensure_alive raises RuntimeError
