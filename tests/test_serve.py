"""`ditmesh serve` end to end: the real server (uvicorn in a subprocess, tiny FLUX on 2 gloo ranks)
talked to with httpx over loopback.

One server is started for the module (spawning it and its ranks costs seconds) and the tests
share it; the killed-rank test restarts its ranks, so it runs last.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from ditmesh.cli import main

API_KEY = "test-key"
PATH = "/v1/images/generations"
MAX_QUEUE = 20
START_TIMEOUT = 120.0  # s: the server's ranks import torch and build the pipeline on a loaded 2-core host
BASE = dict(prompt="a cat", height=64, width=64, steps=2)


class Server:
    """A `ditmesh serve` subprocess and everything it printed so far."""

    def __init__(self, proc: subprocess.Popen, url: str, output: list[str]):
        self.proc, self.url, self.output = proc, url, output

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120, **kwargs)

    def async_client(self, **kwargs) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", 120)
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, **kwargs)

    def log(self) -> str:
        return "".join(self.output[-60:])


@pytest.fixture(scope="module")
def server_process():
    """The `ditmesh serve` subprocess, started (not yet ready), its output lines and its log."""
    command = [sys.executable, "-c", "from ditmesh.cli import main; raise SystemExit(main())", "serve",
               "--model", "tiny-flux", "--parallel", "ulysses=2", "--device", "cpu", "--port", "0",
               "--max-queue", str(MAX_QUEUE), "--timeout", "60"]
    env = dict(os.environ, DITMESH_API_KEY=API_KEY, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    lines: queue.Queue = queue.Queue()

    def drain() -> None:  # keeps the pipe from filling up, and keeps the log for failure messages
        for line in proc.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    yield proc, lines, output
    proc.send_signal(signal.SIGTERM)  # uvicorn shuts down; the lifespan stops the ranks
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the server did not stop within 60 s of SIGTERM:\n" + "".join(output[-40:]))
    # uvicorn re-raises the signal it shut down on, after a clean shutdown.
    assert proc.returncode in (0, -signal.SIGTERM), "".join(output[-40:])
    assert "Application shutdown complete" in "".join(output[-10:])


@pytest.fixture(scope="module")
def server(server_process, serial):
    """The ready server (`serial` is built meanwhile: the server's ranks take seconds to start)."""
    proc, lines, output = server_process
    return Server(proc, _wait_ready(lines, output), output)


def _wait_ready(lines: queue.Queue, output: list[str]) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"no ready line within {START_TIMEOUT} s:\n" + "".join(output))
        if line is None:
            pytest.fail("the server exited before it was ready:\n" + "".join(output))
        if match := re.search(r"ready on (http://127\.0\.0\.1:\d+) \(tiny-flux, ulysses=2, 2 rank\(s\) on cpu\)", line):
            return match.group(1)


@pytest.fixture(scope="module")
def serial(server_process):
    """``serial(seed, height, width, prompt)`` -> the image one process draws with the tiny FLUX:
    the pipeline call `DiffusionWorker` (and so `ditmesh generate`) makes, without parallelism."""
    from ditmesh.models.loading import load_pipeline

    pipe = load_pipeline("tiny-flux")  # the trained default the server loads

    def draw(seed: int, height: int = 64, width: int = 64, prompt: str = "a cat", steps: int = 2) -> Image.Image:
        return pipe(prompt=prompt, num_inference_steps=steps, height=height, width=width, output_type="pil",
                    generator=torch.Generator().manual_seed(seed)).images[0]

    return draw


def decode(b64: str, expected_format: str = "PNG") -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == expected_format
    image.load()
    return image


def as_jpeg(image: Image.Image) -> Image.Image:
    """`image` through the server's JPEG encoding (quality 95)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return Image.open(buffer)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=int)


def metric(server: Server, name: str) -> float:
    """One sample of the server's Prometheus text (0 if it has not been counted yet)."""
    text = server.client().get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def sse_events(lines) -> list[tuple[str, dict]]:
    """(event name, decoded data) of a text/event-stream body, in order."""
    events, name, data = [], "message", []
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
        elif line == "" and data:
            events.append((name, json.loads("\n".join(data))))
            name, data = "message", []
    return events


async def until_waiting(client: httpx.AsyncClient, count: int, timeout: float = 30.0) -> None:
    """Wait until exactly `count` requests wait for the mesh (the test polls /healthz; the server never polls)."""
    deadline = time.monotonic() + timeout
    while (waiting := (await client.get("/healthz")).json()["queue"]["waiting"]) != count:
        assert time.monotonic() < deadline, f"{waiting} requests waiting after {timeout} s, expected {count}"
        await asyncio.sleep(0.02)


SENT = "ditmesh_mesh_requests_total"


def status_count(mode: str, status: int) -> str:
    return f'ditmesh_requests_total{{mode="{mode}",status="{status}"}}'


# ---------------------------------------------------------------- generation


def test_generation_is_a_png_of_the_requested_size_equal_to_the_serial_pipeline(server, serial):
    with server.client() as client:
        response = client.post(PATH, json=dict(BASE, width=96, seed=7))
        assert response.status_code == 200, response.text
        body = response.json()
        jpeg = client.post(PATH, json=dict(BASE, seed=7, num_images=2, output_format="jpeg")).json()
    assert body["seed"] == 7 and body["model"] == "tiny-flux" and body["output_format"] == "png"
    assert (body["width"], body["height"]) == (96, 64) and len(body["images"]) == 1
    image = decode(body["images"][0])
    assert image.size == (96, 64)
    # ulysses=2 on two ranks draws what one process draws: fp32, at most one level of uint8 rounding.
    assert np.abs(pixels(image) - pixels(serial(7, 64, 96))).max() <= 1
    timings = body["timings"]
    assert 0 < timings["generation_s"] <= timings["mesh_s"] <= timings["total_s"]
    assert timings["queued_s"] >= 0 and timings["encode_s"] >= 0
    # Image i is drawn with seed + i: the second JPEG is the serial image of seed 8.
    first, second = (decode(b64, "JPEG") for b64 in jpeg["images"])
    assert first.size == second.size == (64, 64) and jpeg["output_format"] == "jpeg"
    assert np.abs(pixels(second) - pixels(as_jpeg(serial(8)))).mean() < 0.5  # a 1-level difference can grow in JPEG
    assert np.abs(pixels(first) - pixels(second)).mean() > 1  # other noise (the trained model draws alike objects)


def test_sse_streams_step_events_with_previews_then_the_result(server):
    with server.client() as client:
        with client.stream("POST", PATH, json=dict(BASE, seed=11, preview=True),
                           headers={"Accept": "text/event-stream"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response.iter_lines())
        with client.stream("POST", PATH, json=dict(BASE, seed=11, stream=True)) as response:  # no Accept header
            plain = sse_events(response.iter_lines())
        reference = client.post(PATH, json=dict(BASE, seed=11)).json()
    assert [name for name, _ in events] == ["step", "step", "result"]
    assert [(data["step"], data["of"]) for _, data in events[:2]] == [(1, 2), (2, 2)]
    preview_uri = events[0][1]["preview"]
    assert preview_uri.startswith("data:image/png;base64,")
    assert max(decode(preview_uri.split(",", 1)[1]).size) == 64
    result = events[-1][1]
    assert result["seed"] == 11 and (result["width"], result["height"]) == (64, 64)
    assert [name for name, _ in plain] == ["step", "step", "result"] and "preview" not in plain[0][1]
    # The stream's image is the JSON answer's image for the same seed, pixel for pixel.
    assert np.array_equal(pixels(decode(result["images"][0])), pixels(decode(reference["images"][0])))
    assert np.array_equal(pixels(decode(plain[-1][1]["images"][0])), pixels(decode(reference["images"][0])))


def test_twenty_concurrent_requests_all_complete_and_none_is_lost(server):
    sent_before = metric(server, SENT)

    async def twenty():
        async with server.async_client() as client:
            requests = [dict(BASE, prompt=f"cat number {i}", steps=1, seed=100 + i) for i in range(20)]
            return await asyncio.gather(*(client.post(PATH, json=request) for request in requests))

    responses = asyncio.run(twenty())
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses if r.status_code != 200]
    bodies = [r.json() for r in responses]
    assert [b["seed"] for b in bodies] == list(range(100, 120))  # each answer is its own request's
    assert all(decode(b["images"][0]).size == (64, 64) for b in bodies)
    assert len({b["images"][0] for b in bodies}) == 20
    assert max(b["timings"]["queued_s"] for b in bodies) > 0  # they waited their turn: one at a time
    assert metric(server, SENT) == sent_before + 20


def test_client_disconnects_free_the_mesh_and_a_full_queue_answers_429(server):
    sent_before, left_before = metric(server, SENT), metric(server, status_count("json", 499))
    sse_left_before = metric(server, status_count("sse", 499))

    async def scenario():
        async with server.async_client(limits=httpx.Limits(max_connections=64)) as client:
            # A long stream holds the mesh; its client reads one step event and goes away.
            # 50 steps outlast what follows (about 1 s on an idle machine); once the client leaves, the
            # ranks stop it after the step they are in, then serve the queue.
            holder = dict(BASE, steps=50, seed=1)
            async with client.stream("POST", PATH, json=holder, headers={"Accept": "text/event-stream"}) as stream:
                lines = stream.aiter_lines()
                assert await anext(lines) == "event: step"
                # A client waiting in the queue gives up: its request must never reach the ranks.
                with pytest.raises(httpx.ReadTimeout):
                    await client.post(PATH, json=dict(BASE, seed=2), timeout=0.3)
                await until_waiting(client, 0)  # it left the queue
                # MAX_QUEUE requests wait; one more is refused at once.
                waiting = [asyncio.ensure_future(client.post(PATH, json=dict(BASE, steps=1, seed=10 + i)))
                           for i in range(MAX_QUEUE)]
                await until_waiting(client, MAX_QUEUE)
                refused = await client.post(PATH, json=dict(BASE, steps=1, seed=99))
            # The stream's connection is closed here, mid-generation.
            return refused, await asyncio.gather(*waiting)

    refused, served = asyncio.run(scenario())
    assert refused.status_code == 429, "the holding stream ended before the queue filled: " + refused.text
    assert "--max-queue" in refused.json()["detail"]
    assert refused.headers["retry-after"] == "1"
    assert [r.status_code for r in served] == [200] * MAX_QUEUE
    assert [r.json()["seed"] for r in served] == [10 + i for i in range(MAX_QUEUE)]
    # Reached the ranks: the abandoned stream and the MAX_QUEUE served ones, not the impatient request.
    assert metric(server, SENT) == sent_before + 1 + MAX_QUEUE
    assert metric(server, status_count("json", 499)) == left_before + 1
    assert metric(server, status_count("sse", 499)) == sse_left_before + 1


# ---------------------------------------------------------------- refusals


BAD_BODIES = [
    (dict(BASE, colour="red"), "colour", "unknown field 'colour'; the fields are prompt, negative_prompt"),
    (dict(BASE, height=100), "height", "height 100 is not a multiple of 16 (flux); use 96 or 112"),
    (dict(BASE, width=8), "width", "width 8 is not a multiple of 16 (flux); use 16"),
    (dict(BASE, steps=0), "steps", "steps: Input should be greater than or equal to 1"),
    (dict(BASE, steps=5000), "steps", "steps: Input should be less than or equal to 200"),
    (dict(BASE, steps="4"), "steps", "steps: Input should be a valid integer"),
    (dict(BASE, prompt=5), "prompt", "prompt: Input should be a valid string"),
    (dict(BASE, prompt=["a", "b"]), "prompt", "prompt: Input should be a valid string"),
    ({"steps": 2}, "prompt", "prompt is required"),
    (dict(BASE, output_format="gif"), "output_format", "gif is a video format; this server's flux model makes images: use png or jpeg"),
    (dict(BASE, num_images=100), "num_images", "num_images: Input should be less than or equal to 8"),
    (dict(BASE, true_cfg_scale=4.0), "true_cfg_scale", "true_cfg_scale needs a negative_prompt"),
    (dict(BASE, seed=-1), "seed", "seed: Input should be greater than or equal to 0"),
]


def test_bad_bodies_get_422_naming_the_field_and_the_fix_and_reach_no_rank(server):
    sent_before = metric(server, SENT)
    with server.client() as client:
        for body, field, message in BAD_BODIES:
            response = client.post(PATH, json=body)
            assert response.status_code == 422, (body, response.text)
            errors = response.json()["detail"]
            assert any(e["loc"] == ["body", field] and message in e["msg"] for e in errors), (body, errors)
        streaming = client.post(PATH, json=dict(BASE, height=100), headers={"Accept": "text/event-stream"})
        assert streaming.status_code == 422 and "use 96 or 112" in streaming.text  # refused before any stream starts
        whole_errors = [
            (client.post(PATH, content=b'{"prompt": "a cat",', headers={"Content-Type": "application/json"}),
             "the body is not valid JSON"),
            (client.post(PATH, json=["a cat"]), "the body must be a JSON object"),
            (client.post(PATH, json=dict(BASE, prompt="x" * 70_000)), "over this server's limit of 65536"),
            # Chunked, without Content-Length: counted as it arrives.
            (client.post(PATH, content=iter([b'{"prompt": "', b"x" * 70_000, b'"}']),
                         headers={"Content-Type": "application/json"}), "over this server's limit of 65536"),
        ]
    for response, message in whole_errors:
        assert response.status_code == 422, response.text
        assert any(message in e["msg"] and e["loc"][0] == "body" for e in response.json()["detail"]), response.text
    assert metric(server, SENT) == sent_before  # nothing reached the ranks


def test_api_key_guards_every_route_but_the_docs(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for method, path in (("POST", PATH), ("GET", "/healthz"), ("GET", "/metrics")):
            response = anonymous.request(method, path, json=BASE if method == "POST" else None)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer" in response.json()["detail"]
        wrong = anonymous.post(PATH, json=BASE, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert anonymous.get("/docs").status_code == 200
        schema = anonymous.get("/openapi.json").json()
    operation = schema["paths"][PATH]["post"]
    assert set(operation["responses"]) >= {"200", "422", "429", "503"}
    request_schema = schema["components"]["schemas"]["GenerationRequest"]
    assert request_schema["properties"]["steps"]["maximum"] == 200 and request_schema["additionalProperties"] is False


def test_healthz_and_metrics_describe_the_mesh(server):
    with server.client() as client:
        health = client.get("/healthz").json()
        text = client.get("/metrics").text
    assert health["status"] == "ok" and health["model"] == "tiny-flux" and health["family"] == "flux"
    assert health["parallel"] == "ulysses=2" and health["size_multiple"] == 16 and health["device"] == "cpu"
    assert health["ranks_alive"] == 2 and [r["rank"] for r in health["ranks"]] == [0, 1]
    assert all(isinstance(r["pid"], int) and r["alive"] for r in health["ranks"])
    assert health["queue"] == {"waiting": 0, "in_flight": 0, "max_queue": MAX_QUEUE}
    for name in ("ditmesh_requests_total", "ditmesh_request_seconds_bucket", "ditmesh_queue_depth",
                 "ditmesh_worker_restarts_total", "ditmesh_mesh_seconds_bucket"):
        assert re.search(rf"^{name}\b", text, re.MULTILINE), name


class FakeRunner:
    """What `MeshQueue` uses of a runner: its state and `restart()`."""

    def __init__(self):
        self.is_running, self.needs_restart, self.restarted = True, False, 0

    async def restart(self):
        self.restarted += 1
        self.is_running, self.needs_restart = True, False


def test_mesh_queue_is_fifo_bounded_drops_waiters_that_leave_and_restarts_after_a_death():
    from ditmesh.runner.protocol import WorkerDied
    from ditmesh.serve.metrics import Metrics
    from ditmesh.serve.queue import MeshQueue, MeshUnavailable, QueueFull

    async def scenario():
        runner = FakeRunner()
        mesh = MeshQueue(runner, max_queue=2, metrics=Metrics())
        order, release = [], asyncio.Event()

        async def use(name):
            async with mesh.turn():
                order.append(name)
                await release.wait()

        first = asyncio.ensure_future(use("first"))
        await asyncio.sleep(0)  # first holds the mesh
        waiting = [asyncio.ensure_future(use(name)) for name in ("second", "leaves", "third")]
        await asyncio.sleep(0)
        assert isinstance(waiting[2].exception(), QueueFull)  # two may wait, the third is refused
        waiting[1].cancel()  # a client leaves the queue
        await asyncio.sleep(0)
        assert mesh.waiting == 1
        release.set()
        await asyncio.gather(first, waiting[0])
        with pytest.raises(MeshUnavailable, match=r"rank 1 died .*restarting"):
            async with mesh.turn():
                runner.is_running, runner.needs_restart = False, True
                raise WorkerDied(1, -9)
        await asyncio.sleep(0)  # the restart runs in the next turn, here at once
        await asyncio.sleep(0)
        return order, runner.restarted, mesh.restarts

    order, restarted, counted = asyncio.run(scenario())
    assert order == ["first", "second"]  # in arrival order; the one that left never got a turn
    assert restarted == counted == 1


def test_healthz_probe_finds_idle_ranks_that_no_longer_answer_and_restarts_them():
    # A mesh whose processes live but never answer (a deadlock) once kept /healthz at 200.
    from ditmesh.serve.metrics import Metrics
    from ditmesh.serve.queue import MeshQueue

    class Deaf(FakeRunner):
        async def invoke(self, payload, timeout=None):
            await asyncio.sleep(timeout)  # no answer within the bound
            raise TimeoutError(f"no answer within {timeout} s")

    async def scenario():
        runner = Deaf()
        mesh = MeshQueue(runner, max_queue=2, metrics=Metrics())
        answered = await mesh.probe(0.01)
        for _ in range(3):
            await asyncio.sleep(0)  # the restart runs in the next turn, here at once
        busy = None
        async with mesh.turn():
            busy = (await mesh.probe(0.01), mesh.turn_age() >= 0)  # a request holds the mesh: no probe
        return answered, runner.restarted, busy, mesh.turn_age()

    answered, restarted, busy, idle_age = asyncio.run(scenario())
    assert answered is False and restarted == 1
    assert busy == (None, True) and idle_age is None


def test_no_polling_sleeps_in_server_code():
    for path in Path(__file__).parents[1].joinpath("ditmesh", "serve").glob("*.py"):
        source = path.read_text()
        assert not re.search(r"\bsleep\(", source), f"{path.name} sleeps"
        assert not re.search(r"\.poll\(|is_disconnected\(", source), f"{path.name} polls"


def test_non_loopback_host_without_api_key_is_refused_before_anything_starts(capsys, monkeypatch):
    monkeypatch.delenv("DITMESH_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "pass --api-key KEY" in capsys.readouterr().err


# ---------------------------------------------------------------- a dead rank (last: restarts the ranks)


def test_killed_rank_fails_the_request_in_flight_with_503_then_the_ranks_restart(server, serial):
    with server.client() as client:
        old_pids = [rank["pid"] for rank in client.get("/healthz").json()["ranks"]]

    async def kill_during_request():
        async with server.async_client() as client:
            in_flight = asyncio.ensure_future(client.post(PATH, json=dict(BASE, steps=50, seed=3)))
            deadline = time.monotonic() + 30
            while (await client.get("/healthz")).json()["queue"]["in_flight"] == 0:  # the test may poll
                assert time.monotonic() < deadline and not in_flight.done(), "the request never went in flight"
                await asyncio.sleep(0.02)
            os.kill(old_pids[1], signal.SIGKILL)
            return await in_flight

    failed = asyncio.run(kill_during_request())
    assert failed.status_code == 503, failed.text
    detail = failed.json()["detail"]
    assert "rank 1 died (killed by signal 9)" in detail and "restarting" in detail
    assert failed.headers["retry-after"] == "5"
    with server.client() as client:
        recovered = client.post(PATH, json=dict(BASE, seed=5))  # waits for the restart, then runs
        health = client.get("/healthz").json()
    assert recovered.status_code == 200, recovered.text + server.log()
    assert np.abs(pixels(decode(recovered.json()["images"][0])) - pixels(serial(5))).max() <= 1
    assert health["status"] == "ok" and health["restarts"] == 1 and health["ranks_alive"] == 2
    assert not set(old_pids) & {rank["pid"] for rank in health["ranks"]}
    assert metric(server, "ditmesh_worker_restarts_total") == 1
    assert metric(server, status_count("json", 503)) == 1
