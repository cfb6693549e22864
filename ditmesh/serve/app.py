"""The FastAPI app: routes, API key, body limit, error mapping, and the runner's lifespan.

Everything the app holds lives on ``app.state``: the runner, its queue, the metrics, the
worker's description of its model (asked once at start-up), the settings.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ditmesh import __version__
from ditmesh.runner.protocol import RemoteError
from ditmesh.runner.runner import DistributedRunner
from ditmesh.serve.metrics import CONTENT_TYPE, Metrics
from ditmesh.serve.queue import MeshQueue, MeshUnavailable, QueueFull
from ditmesh.serve.schema import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    GenerationRequest,
    GenerationResponse,
    field_error,
    model_errors,
)

CLIENT_LEFT = 499  # nginx's "client closed request": the status counted when a client disconnects
PROBE_TIMEOUT_S = 10.0  # idle ranks answer `/healthz`'s probe within this, or they are restarted
STUCK_GRACE_S = 5.0  # a request in flight this long past the server's timeout makes `/healthz` 503
INLINE_ENCODE_PIXELS = 256 * 256  # smaller results are encoded on the event loop (well under 1 ms)


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """How the server guards the mesh."""

    max_queue: int = 64
    """Requests that may wait for the mesh while one runs; one more gets 429."""
    timeout: float | None = 600.0
    """Seconds one generation may take on the ranks; a longer one gets 504 and the ranks restart."""
    api_key: str | None = None
    """If set, every route but the docs wants ``Authorization: Bearer <api_key>`` (401 otherwise)."""
    max_body_bytes: int = 65536
    """Larger request bodies get 422 before they are read whole."""

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"max_queue (--max-queue) must be >= 1, got {self.max_queue}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout (--timeout) must be > 0 seconds, got {self.timeout}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024 (a long prompt's request), got {self.max_body_bytes}")


@dataclass
class _Job:
    """One generation request on its way through the queue."""

    request: GenerationRequest
    seed: int
    mode: str  # "json" or "sse"
    arrived: float
    started: float = 0.0
    finished: float = 0.0

    def payload(self) -> dict[str, Any]:
        return self.request.payload(self.seed, streaming=self.mode == "sse")


class ClientLeft(Exception):
    """The client disconnected before its response was ready."""


def create_app(runner: DistributedRunner, setup_kwargs: dict[str, Any] | None = None,
               settings: ServeSettings = ServeSettings(),
               on_ready: Callable[[dict[str, Any]], None] | None = None) -> FastAPI:
    """A FastAPI app serving image generation on `runner` (not yet started).

    The app's lifespan starts the ranks with ``setup(**setup_kwargs)``, asks the worker to
    describe its model (``invoke({"describe": True})``, as `DiffusionWorker` answers), calls
    `on_ready` with that description, and stops the ranks at shutdown. The worker must follow
    `DiffusionWorker`'s contract: generation keyword arguments in, ``{"images": [PIL...],
    "seconds": ...}`` out, ``{"step", "of"[, "preview"]}`` stream events.
    """
    app = FastAPI(title="ditmesh", version=__version__, lifespan=_lifespan,
                  summary="Diffusion models on many GPUs: images from prompts, with server-sent progress events.")
    metrics = Metrics()
    app.state.runner = runner
    app.state.setup_kwargs = setup_kwargs or {}
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.queue = MeshQueue(runner, settings.max_queue, metrics)
    app.state.info = None
    app.state.on_ready = on_ready
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_failed)
    guard = [Depends(_api_key_check(settings.api_key))] if settings.api_key else []
    app.add_api_route("/v1/images/generations", generations, methods=["POST"], dependencies=guard,
                      response_model=GenerationResponse, responses=_GENERATION_RESPONSES)
    app.add_api_route("/healthz", healthz, methods=["GET"], dependencies=guard)
    app.add_api_route("/metrics", metrics_text, methods=["GET"], dependencies=guard, response_class=Response)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    await state.runner.start(**state.setup_kwargs)
    try:
        state.info = await state.runner.invoke({"describe": True})
        if state.on_ready is not None:
            state.on_ready(state.info)
        yield
    finally:
        await state.queue.close()
        await state.runner.stop()


# ---------------------------------------------------------------- routes


async def generations(body: GenerationRequest, request: Request) -> Response:
    """Generate images from a prompt.

    Answers JSON by default. With ``Accept: text/event-stream`` or ``"stream": true`` it answers
    server-sent events instead: ``event: step`` after each denoising step (``{"step", "of"}``, and
    ``"preview"``, a small PNG data URI, with ``"preview": true``), then ``event: result`` with the
    JSON body, or ``event: error`` with ``{"status", "detail"}``.
    """
    state = request.app.state
    arrived = time.perf_counter()
    if errors := model_errors(body, state.info):
        raise RequestValidationError(errors)
    streaming = body.stream or "text/event-stream" in request.headers.get("accept", "")
    job = _Job(body, body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1),
               "sse" if streaming else "json", arrived)
    try:
        state.queue.check_room()  # before a stream starts, while 429 can still be its status
    except QueueFull as error:
        _count(state, job, 429)
        raise HTTPException(429, str(error), headers={"Retry-After": "1"}) from None
    if streaming:
        return StreamingResponse(_events(state, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _answer_json(state, job, request)


async def healthz(request: Request) -> JSONResponse:
    """The ranks (pid, alive), the model and parallel config, the queue, restarts so far.

    200 when the ranks serve: idle ranks must answer a probe request within `PROBE_TIMEOUT_S`,
    and no request may be on the ranks past its bound (`DistributedRunner.health`, and the
    server's timeout for the request in flight). 503 otherwise, with ``status`` "restarting"
    (ranks down; a restart is under way), "stuck" (a request has run past its bound; the ranks
    restart when it is given up) or "not answering" (idle ranks did not answer the probe; they
    restart)."""
    state = request.app.state
    runner, queue, bound = state.runner, state.queue, state.settings.timeout
    health, age = runner.health(), queue.turn_age()
    status = "ok"
    if not runner.is_running or health["restarting"]:
        status = "restarting"
        queue.restart_soon()
    elif health["overdue"] or (age is not None and bound is not None and age > bound + STUCK_GRACE_S):
        status = "stuck"
    elif age is None and await queue.probe(PROBE_TIMEOUT_S) is False:
        status = "not answering"
    ok = status == "ok"
    ranks = [{"rank": rank, "pid": pid, "alive": alive}
             for rank, (pid, alive) in enumerate(zip(runner.pids, runner.alive))]
    body = {"status": status, **(state.info or {}), "world_size": runner.world_size,
            "device": runner.device_type, "ranks": ranks, "ranks_alive": sum(rank["alive"] for rank in ranks),
            "queue": {"waiting": queue.waiting, "in_flight": queue.in_flight, "max_queue": queue.max_queue},
            "restarts": queue.restarts}
    return JSONResponse(body, status_code=200 if ok else 503)


async def metrics_text(request: Request) -> Response:
    """Prometheus metrics: requests by status, latency histograms, queue depth, worker restarts."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


# ---------------------------------------------------------------- generation


async def _answer_json(state: Any, job: _Job, request: Request) -> Response:
    try:
        body = await _unless_client_leaves(request, _generate(state, job))
    except ClientLeft:
        _count(state, job, CLIENT_LEFT)
        return Response(status_code=CLIENT_LEFT)
    except Exception as error:
        status, detail, headers = _failure(error, state.settings)
        _count(state, job, status)
        raise HTTPException(status, detail, headers=headers) from None
    _count(state, job, 200)
    return JSONResponse(body)


async def _generate(state: Any, job: _Job) -> dict[str, Any]:
    async with state.queue.turn() as runner:
        job.started = time.perf_counter()
        result = await runner.invoke(job.payload(), timeout=state.settings.timeout)
        job.finished = time.perf_counter()
    return await _response_body(state, job, result)


async def _events(state: Any, job: _Job) -> AsyncIterator[str]:
    """The body of a streaming answer. A client that disconnects cancels this generator where it
    waits (Starlette listens for the disconnect), which gives up its turn or abandons its request."""
    try:
        async with state.queue.turn() as runner:
            job.started = time.perf_counter()
            stream = runner.stream(job.payload(), as_text_events=False, timeout=state.settings.timeout)
            async with aclosing(stream) as items:
                async for item in items:
                    if isinstance(item, dict) and "step" in item:
                        yield _sse("step", _step_data(item))
                    else:
                        result = item
            job.finished = time.perf_counter()
        body = await _response_body(state, job, result)
    except (asyncio.CancelledError, GeneratorExit):  # the client left (cancelled here, or closed at a yield)
        _count(state, job, CLIENT_LEFT)
        raise
    except Exception as error:
        status, detail, _ = _failure(error, state.settings)
        _count(state, job, status)
        yield _sse("error", {"status": status, "detail": detail})
        return
    _count(state, job, 200)
    yield _sse("result", body)


async def _response_body(state: Any, job: _Job, result: dict[str, Any]) -> dict[str, Any]:
    state.metrics.mesh_seconds.observe(job.finished - job.started)
    encoding = time.perf_counter()
    encode = _encoded_videos if "videos" in result else _encoded_images
    media, first = await encode(job.request, result)
    done = time.perf_counter()
    timings = {"queued_s": job.started - job.arrived, "mesh_s": job.finished - job.started,
               "generation_s": result.get("seconds", 0.0), "encode_s": done - encoding, "total_s": done - job.arrived}
    return {"images": [], **media, "output_format": job.request.output_format, "width": first.width,
            "height": first.height, "seed": job.seed, "model": state.info["model"],
            "timings": {key: round(value, 6) for key, value in timings.items()},
            "computed_steps": result.get("computed_steps")}


async def _encoded_images(request: Any, result: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The response fields of an image model's result, and its first image."""
    images = result["images"]
    if sum(image.width * image.height for image in images) <= INLINE_ENCODE_PIXELS:
        encoded = encode_images(images, request.output_format)
    else:  # tens of ms per megapixel: off the event loop
        encoded = await asyncio.to_thread(encode_images, images, request.output_format)
    return {"images": encoded}, images[0]


async def _encoded_videos(request: Any, result: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The response fields of a video model's result (each video, a list of PIL frames, one
    base64 file), and its first frame."""
    videos = result["videos"]
    encoded = await asyncio.to_thread(lambda: [encode_video(frames, request.output_format, request.fps) for frames in videos])
    return {"videos": encoded, "frames": len(videos[0]), "fps": request.fps}, videos[0][0]


async def _unless_client_leaves(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result; if the client disconnects first, `work` is cancelled and `ClientLeft` raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (shutdown)
        watcher.cancel()
        task.cancel()  # no-op once done
    if task.done() and not task.cancelled():
        return task.result()
    await asyncio.wait((task,))  # let it give up its turn or abandon its request
    raise ClientLeft()


async def _client_left(request: Request) -> None:
    # The body has been read: the next ASGI message is the disconnect (or the response's end).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _failure(error: Exception, settings: ServeSettings) -> tuple[int, Any, dict[str, str] | None]:
    """(HTTP status, detail, headers) for what went wrong with a generation."""
    if isinstance(error, QueueFull):
        return 429, str(error), {"Retry-After": "1"}
    if isinstance(error, MeshUnavailable):
        return 503, str(error), {"Retry-After": "5"}
    if isinstance(error, TimeoutError):
        return 504, (f"the generation took longer than the server's timeout of {settings.timeout} s; the ranks "
                     "are restarting. Ask for fewer steps or a smaller image, or start the server with a larger "
                     "--timeout"), None
    if isinstance(error, RemoteError) and error.exc_type.endswith("ValueError"):
        return 422, [field_error(None, None, error.message)], None  # the pipeline refused the request
    if isinstance(error, RemoteError):
        return 500, f"rank {error.rank} raised {error.exc_type}: {error.message}", None
    return 500, f"{type(error).__name__}: {error}", None


def _count(state: Any, job: _Job, status: int) -> None:
    state.metrics.requests.labels(job.mode, str(status)).inc()
    if status == 200:
        state.metrics.latency.labels(job.mode).observe(time.perf_counter() - job.arrived)


def _step_data(event: dict[str, Any]) -> dict[str, Any]:
    data = {"step": event["step"], "of": event.get("of")}
    if event.get("preview") is not None:
        data["preview"] = "data:image/png;base64," + encode_images([event["preview"]], "png")[0]
    return data


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def encode_images(images: list[Any], output_format: str) -> list[str]:
    """PIL images as base64 PNG or JPEG files."""
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        if output_format == "jpeg":
            image.convert("RGB").save(buffer, format="JPEG", quality=95)
        else:  # zlib level 1: a quarter of the default level 6 time (1024², CPU), a file a quarter larger
            image.save(buffer, format="PNG", compress_level=1)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def encode_video(frames: list[Any], output_format: str, fps: int) -> str:
    """PIL frames as one base64 video file: mp4 through diffusers' `export_to_video` (imageio-ffmpeg),
    png (animated), gif and webp by PIL, as `ditmesh generate -o` writes them."""
    if output_format == "mp4":
        import tempfile
        from pathlib import Path

        from diffusers.utils import export_to_video

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "video.mp4"
            export_to_video(frames, str(path), fps=fps)
            data = path.read_bytes()
    else:
        buffer = io.BytesIO()
        frames[0].save(buffer, format=output_format.upper(), save_all=True, append_images=frames[1:],
                       duration=round(1000 / fps), loop=0)
        data = buffer.getvalue()
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------- guards


def _api_key_check(api_key: str) -> Callable[..., Awaitable[None]]:
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key")

    async def check_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>' "
                                     "with the server's --api-key", headers={"WWW-Authenticate": "Bearer"})

    return check_api_key


class BodyLimit:
    """ASGI middleware: reads a request body (up to `max_bytes`) before the app does; a larger one
    gets 422 naming the limit, without being read whole."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(int(declared), scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its whole body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(len(body), scope, receive, send)
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _refuse(self, size: int, scope: dict, receive: Callable, send: Callable) -> None:
        message = (f"the body is {size} bytes, over this server's limit of {self.max_bytes}; send a shorter body "
                   f"(a prompt has at most {MAX_PROMPT_CHARS} characters)")
        app = scope.get("app")
        if app is not None:
            app.state.metrics.requests.labels("json", "422").inc()
        response = JSONResponse({"detail": [field_error(None, None, message, "body_too_large")]}, status_code=422)
        await response(scope, receive, send)


def _replay(body: bytes, receive: Callable) -> Callable:
    """An ASGI receive that gives `body` first, then passes on to `receive` (the disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> dict:
        return pending.pop() if pending else await receive()

    return replayed


async def _validation_failed(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 listing every refused field, each message naming the field and what to send instead."""
    mode = "sse" if "text/event-stream" in request.headers.get("accept", "") else "json"
    request.app.state.metrics.requests.labels(mode, "422").inc()
    return JSONResponse({"detail": [_explained(item) for item in error.errors()]}, status_code=422)


def _explained(error: dict[str, Any]) -> dict[str, Any]:
    loc = list(error.get("loc", ()))
    field = loc[1] if len(loc) > 1 and loc[0] == "body" else None
    kind, message = error.get("type", "value_error"), error.get("msg", "")
    if kind == "extra_forbidden":
        message = f"unknown field {field!r}; the fields are {', '.join(GenerationRequest.model_fields)}"
    elif kind == "json_invalid":
        field = None
        message = (f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')}); "
                   'send a JSON object such as {"prompt": "a cat"}')
    elif kind == "missing":
        message = f"{field} is required"
    elif kind in ("model_attributes_type", "dict_type", "model_type"):
        message = 'the body must be a JSON object such as {"prompt": "a cat"}'
    elif field is not None and not message.startswith(str(field)):
        message = f"{field}: {message}"
    explained = {"type": kind, "loc": loc, "msg": message}
    if "input" in error and kind not in ("json_invalid", "missing"):
        explained["input"] = _jsonable_input(error["input"])
    return explained


def _jsonable_input(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"},
                                            "example": 'event: step\ndata: {"step":1,"of":28}\n\n'}},
          "description": "The images (JSON), or server-sent events: step..., then result (or error)"},
    401: {"description": "Missing or wrong API key (only when the server has one)"},
    422: {"description": "A field was refused; each error names the field and what to send instead"},
    429: {"description": "The queue is full; retry after Retry-After seconds"},
    503: {"description": "A rank died during the request; the ranks restart, retry"},
    504: {"description": "The generation took longer than the server's timeout; the ranks restart"},
}
