"""`DistributedRunner`: one worker process per rank behind an asyncio API.

    runner = DistributedRunner(MyWorker, world_size=4)
    await runner.start(model_path="/models/flux")          # MyWorker.setup(model_path=...) on every rank
    result = await runner.invoke({"prompt": "a cat"})     # MyWorker.__call__(prompt=...) on every rank
    async for event in runner.stream({"prompt": "a cat"}, as_text_events=False):
        ...                                                # rank 0's add_streaming_result(...), then the result
    await runner.stop()

How it works: the runner binds one ZMQ ROUTER socket (ipc in a private 0700 temp dir, or tcp on
127.0.0.1); each worker connects a DEALER whose identity is its rank. A request is serialized
once and sent to every rank; each rank answers (rank 0 with the result, the others with an ack
or an error). One asyncio task receives all replies and routes them by request id, so late
replies of timed-out or cancelled requests are dropped. Worker deaths are seen through the
processes' sentinels registered with the event loop. Nothing polls or sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from ditmesh.runner import protocol
from ditmesh.runner.protocol import RemoteError, RunnerBroken, WorkerDied
from ditmesh.runner.worker import DistributedWorker, WorkerSpec, rank_identity, worker_main

logger = logging.getLogger(__name__)

_SETUP_REQUEST = 0  # the request id `ready` / `setup_error` replies carry
_DONE = object()  # end of a request's event queue
_BIG_MESSAGE = 65536  # bytes; larger messages are sent zero-copy


@dataclass(eq=False)
class _Request:
    """One request in flight: the replies so far and how to hand the outcome to the caller."""

    id: int
    world_size: int
    future: asyncio.Future
    events: asyncio.Queue | None = None  # stream events of rank 0 (streaming requests only)
    fail_fast: bool = False  # setup: the first error ends it (the other ranks may be stuck)
    replies: dict[int, tuple[bool, Any]] = field(default_factory=dict)  # rank -> (ok, frames | RemoteError)
    abandoned: bool = False  # the caller timed out or was cancelled: replies are only bookkept
    stuck_timer: asyncio.TimerHandle | None = None

    def errors(self) -> list[RemoteError]:
        return [value for rank, (ok, value) in sorted(self.replies.items()) if not ok]

    def finish(self, result: Any = None, exc: BaseException | None = None) -> None:
        if self.stuck_timer is not None:
            self.stuck_timer.cancel()
        if not self.future.done():
            if exc is not None:
                self.future.set_exception(exc)
            else:
                self.future.set_result(result)
        if self.events is not None:
            self.events.put_nowait(_DONE)


class DistributedRunner:
    """Runs `worker_cls` (a `DistributedWorker` subclass) on `world_size` ranks, one process each.

    Args:
        worker_cls: the worker class, defined at module level (the worker processes import it),
            or its path as ``"package.module:ClassName"``.
        world_size: number of ranks (GPUs on CUDA).
        device_type: ``"cuda"`` (NCCL, one GPU per rank) or ``"cpu"`` (gloo); default cuda if available.
        timeout: default seconds `invoke`/`stream` wait before raising `TimeoutError` (None: no limit).
        collective_timeout: seconds the other ranks get to finish after one rank raised; if they do
            not, they are taken to be stuck in a collective the failing rank skipped: the call
            raises that rank's `RemoteError`, the processes are killed and `restart()` is needed.
        start_timeout: seconds `start` waits for every rank's `setup` (None: no limit).
        stop_timeout: seconds `stop` waits for a clean exit before SIGTERM, then SIGKILL.
        num_threads: torch intra-op threads per worker (default: CPU cores / world_size, at least 1).
        setup_kwargs: what ``async with runner:`` passes to `start` when the block makes a request
            without having started the runner.
        transport: ``"ipc"`` (unix socket in a private temp dir) or ``"tcp"`` (127.0.0.1 only).
        image_format: ``"png"`` or ``"jpeg"``, how text events encode PIL images.
    """

    def __init__(self, worker_cls: type[DistributedWorker] | str, world_size: int, *,
                 device_type: str | None = None, timeout: float | None = None,
                 collective_timeout: float = 10.0, start_timeout: float | None = None,
                 stop_timeout: float = 30.0, num_threads: int | None = None,
                 setup_kwargs: dict[str, Any] | None = None, transport: str = "ipc",
                 image_format: str = "png"):
        self._worker_module, self._worker_qualname = _worker_reference(worker_cls)
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', got {transport!r}")
        self.world_size = world_size
        self.device_type = _check_device_type(device_type, world_size)
        self.timeout = timeout
        self.collective_timeout = collective_timeout
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.num_threads = num_threads or max(1, (os.cpu_count() or 1) // world_size)
        self.transport = transport
        self.image_format = image_format
        self._setup_kwargs = setup_kwargs
        self._state = "new"  # new -> starting -> running [-> broken] -> stopping -> stopped
        self._broken_reason: BaseException | None = None
        self._ids = itertools.count(_SETUP_REQUEST + 1)
        self._requests: dict[int, _Request] = {}
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._exited: dict[int, asyncio.Future] = {}
        self._stopped: asyncio.Event | None = None
        self._auto_start = False
        self._start_lock = asyncio.Lock()

    # ------------------------------------------------------------ lifecycle

    @property
    def is_running(self) -> bool:
        """True when the ranks are up and accept requests."""
        return self._state == "running"

    @property
    def needs_restart(self) -> bool:
        """True after a rank died or got stuck in a collective: call `restart()`."""
        return self._state == "broken"

    @property
    def pids(self) -> list[int | None]:
        """Process ids of the ranks (index = rank)."""
        return [proc.pid for proc in self._procs]

    @property
    def alive(self) -> list[bool]:
        """Whether each rank's process is running (index = rank); empty before `start`."""
        return [not self._exited[rank].done() for rank in range(len(self._procs))]  # done: its sentinel fired

    async def start(self, **setup_kwargs: Any) -> None:
        """Spawn the ranks, initialise torch.distributed and call ``setup(**setup_kwargs)`` on each.

        Raises `RemoteError` if a rank's setup raised (all processes are stopped first),
        `WorkerDied` if a rank died during start-up, `TypeError` if `setup_kwargs` cannot be pickled.
        """
        if self._state in ("starting", "running", "stopping"):
            raise RuntimeError(f"the runner is {self._state}; call `await runner.restart()` to start it afresh")
        if self._state == "broken":
            await self.stop()
        protocol.encode(setup_kwargs)  # TypeError naming the bad value, before anything is spawned
        self._setup_kwargs = setup_kwargs
        await self._launch(_in_band(setup_kwargs))

    async def stop(self) -> None:
        """Call `teardown` on every rank and end the processes. Safe to call more than once."""
        if self._state in ("new", "stopped"):
            return
        if self._state == "stopping":
            await self._stopped.wait()
            return
        await self._shutdown(graceful=self._state == "running")

    async def restart(self) -> None:
        """Stop (killing stuck or dead ranks) and start again with the last `start`'s setup kwargs."""
        if self._setup_kwargs is None and self._state == "new":
            raise RuntimeError("the runner was never started; call `await runner.start(...)` first")
        await self.stop()
        await self.start(**(self._setup_kwargs or {}))

    async def __aenter__(self) -> DistributedRunner:
        # Start lazily: the block may call start(**kwargs) itself; if it does not, the first
        # request starts the runner with the constructor's `setup_kwargs`.
        self._auto_start = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------ requests

    async def invoke(self, payload: dict[str, Any], timeout: float | None = None) -> Any:
        """Run ``worker(streaming=False, **payload)`` on every rank; return rank 0's result.

        Raises `RemoteError` if any rank raised, `WorkerDied` if a rank died, `TimeoutError` after
        `timeout` seconds (default: the runner's `timeout`), `TypeError`/`ValueError` for a payload
        that is not a dict of picklable values (before anything is sent). A call cancelled or
        timed out tells the ranks to stop the request (see `DistributedWorker.cancel_requested`).
        """
        body = _encode_payload(payload)
        await self._start_if_auto()
        request = self._submit(body, streaming=False)
        frames = await self._wait(request, self._timeout(timeout))
        return protocol.decode(frames)

    def stream(self, payload: dict[str, Any], as_text_events: bool = True,
               timeout: float | None = None) -> AsyncIterator[Any]:
        """Run ``worker(streaming=True, **payload)`` on every rank; iterate over rank 0's
        `add_streaming_result` events, then its final result.

        With `as_text_events` every item is an SSE frame, ``"data: <json>\\n\\n"`` (images as
        base64 data URIs, tensors as lists), ready for a ``text/event-stream`` response; without,
        the Python objects. Errors as in `invoke`, raised from the iteration; `timeout` bounds
        the whole stream. Leaving the loop early abandons the request: its rest is discarded and
        the ranks are told (see `DistributedWorker.cancel_requested`).
        """
        body = _encode_payload(payload)  # bad payloads fail here, before iteration
        return self._stream(body, as_text_events, self._timeout(timeout))

    async def _stream(self, body: protocol.Frames, as_text: bool, timeout: float | None) -> AsyncIterator[Any]:
        await self._start_if_auto()
        request = self._submit(body, streaming=True)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            while (item := await self._next_event(request, deadline, timeout)) is not _DONE:
                wants_text, frames = item
                event = protocol.decode(frames)
                yield protocol.to_text_event(event, self.image_format) if as_text and wants_text else event
            result = protocol.decode(request.future.result())  # raises the request's error
            yield protocol.to_text_event(result, self.image_format) if as_text else result
        finally:
            if not request.future.done():
                self._abandon(request)

    async def _next_event(self, request: _Request, deadline: float | None, timeout: float | None) -> Any:
        remaining = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(request.events.get(), remaining)
        except TimeoutError:
            raise TimeoutError(f"stream request {request.id} did not finish within {timeout} s; "
                               "its late events and result will be discarded") from None

    async def _start_if_auto(self) -> None:
        """Inside ``async with``, the first request starts a runner nobody started."""
        if self._auto_start and self._state == "new":
            async with self._start_lock:  # concurrent first requests start it once
                if self._state == "new":
                    await self.start(**(self._setup_kwargs or {}))

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _submit(self, body: protocol.Frames, streaming: bool) -> _Request:
        """Register a request and send it to every rank (one synchronous block: ranks see one order)."""
        self._check_running()
        request = self._new_request(next(self._ids), events=streaming)
        message = protocol.pack(("call", request.id, streaming), body)
        copy = sum(memoryview(frame).nbytes for frame in message) <= _BIG_MESSAGE
        for rank in range(self.world_size):
            sent = self._socket.send_multipart([rank_identity(rank), *message], copy=copy)
            if sent.done() and sent.exception() is not None:  # EHOSTUNREACH: the rank is gone
                self._break(RunnerBroken(f"could not reach rank {rank}: {sent.exception()}"))
                break
        return request

    async def _wait(self, request: _Request, timeout: float | None) -> Any:
        try:
            return await asyncio.wait_for(request.future, timeout)
        except TimeoutError:
            raise TimeoutError(f"request {request.id} did not finish within {timeout} s; the workers are asked to "
                               "stop it (where they check `cancel_requested`) and its late result will be "
                               "discarded") from None
        finally:
            if not request.future.done() or request.future.cancelled():
                self._abandon(request)

    def _abandon(self, request: _Request) -> None:
        """Nobody waits for `request` any more: drop its events and result, and tell the ranks, which
        stop it where their worker checks `cancel_requested` (a worker that never checks finishes it)."""
        request.abandoned = True
        if self._state != "running" or self._requests.get(request.id) is not request:
            return
        message = protocol.pack(("cancel", request.id))
        for rank in range(self.world_size):  # a rank that is gone: its death is noticed through its sentinel
            self._socket.send_multipart([rank_identity(rank), *message]).add_done_callback(_mark_retrieved)

    def _check_running(self) -> None:
        if self._state == "running":
            return
        if self._state == "broken":
            raise RunnerBroken(f"the runner needs a restart ({self._broken_reason.__class__.__name__}: "
                               f"{str(self._broken_reason).splitlines()[0]}); call `await runner.restart()`")
        raise RuntimeError(f"the runner is {self._state}; call `await runner.start(...)` first")

    def _new_request(self, request_id: int, events: bool = False, fail_fast: bool = False) -> _Request:
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_mark_retrieved)
        request = _Request(request_id, self.world_size, future, asyncio.Queue() if events else None, fail_fast)
        self._requests[request_id] = request
        return request

    # ------------------------------------------------------------ replies

    async def _receive_loop(self) -> None:
        while True:
            frames = await self._socket.recv_multipart(copy=False)
            try:
                self._dispatch(frames[1:])  # frames[0]: the sender's identity
            except Exception:  # a bug here must not stop the replies of later requests
                logger.exception("ditmesh runner: could not handle a worker message")

    def _dispatch(self, message: protocol.Frames) -> None:
        (kind, request_id, rank, *extra), body = protocol.unpack(message)
        request = self._requests.get(request_id)
        if request is None:
            return  # a late reply of a request that already ended
        if kind == "event":
            if not request.abandoned and request.events is not None:
                request.events.put_nowait((extra[0], body))
            return
        if kind in ("result", "ready"):
            request.replies[rank] = (True, body)
        else:  # error, setup_error
            request.replies[rank] = (False, RemoteError(rank, *protocol.decode(body)))
        self._progress(request)

    def _progress(self, request: _Request) -> None:
        errors = request.errors()
        if len(request.replies) == request.world_size or (errors and request.fail_fast):
            self._finish(request)
        elif errors and request.stuck_timer is None:
            # The other ranks may be blocked in a collective the failing rank never entered.
            loop = asyncio.get_running_loop()
            request.stuck_timer = loop.call_later(self.collective_timeout, self._on_stuck, request)

    def _finish(self, request: _Request) -> None:
        del self._requests[request.id]
        errors = request.errors()
        if not errors:
            request.finish(result=request.replies[0][1])
            return
        note = ""
        if len(errors) > 1:
            note = "also failed: " + ", ".join(f"rank {e.rank} ({e.exc_type}: {e.message})" for e in errors[1:])
        request.finish(exc=errors[0].with_note(note) if note else errors[0])

    def _on_stuck(self, request: _Request) -> None:
        if self._requests.get(request.id) is not request:
            return
        error = request.errors()[0]
        waiting = sorted(set(range(self.world_size)) - set(request.replies))
        self._break(error.with_note(
            f"ranks {waiting} did not finish within collective_timeout={self.collective_timeout} s after "
            f"rank {error.rank} failed (they are probably waiting in a collective rank {error.rank} never "
            "entered); the worker processes were killed: call `await runner.restart()`"))

    # ------------------------------------------------------------ processes

    async def _launch(self, setup_kwargs: bytes) -> None:
        self._state = "starting"
        self._stopped = asyncio.Event()
        self._tmpdir = tempfile.mkdtemp(prefix="ditmesh-runner-")  # mode 0700: only this user
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        for option, value in ((zmq.ROUTER_MANDATORY, 1), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.LINGER, 0)):
            self._socket.setsockopt(option, value)
        address = self._bind()
        self._store = _loopback_store()
        spec = WorkerSpec(self._worker_module, self._worker_qualname, self.world_size, address,
                          self._store.port, self.device_type, self.num_threads, setup_kwargs)
        self._receiver = asyncio.get_running_loop().create_task(self._receive_loop())
        setup = self._new_request(_SETUP_REQUEST, fail_fast=True)
        self._spawn(spec)
        try:
            await asyncio.wait_for(setup.future, self.start_timeout)
        except BaseException as exc:
            await self._shutdown(graceful=False)
            if isinstance(exc, TimeoutError):
                raise TimeoutError(f"the ranks' setup did not finish within start_timeout={self.start_timeout} s") from None
            raise
        self._state = "running"

    def _bind(self) -> str:
        if self.transport == "tcp":
            self._socket.bind("tcp://127.0.0.1:*")
            return self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        address = f"ipc://{os.path.join(self._tmpdir, 'runner.sock')}"
        self._socket.bind(address)
        return address

    def _spawn(self, spec: WorkerSpec) -> None:
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        self._procs, self._exited = [], {}
        for rank in range(self.world_size):
            proc = context.Process(target=worker_main, args=(rank, spec), daemon=True, name=f"ditmesh-rank-{rank}")
            proc.start()
            self._procs.append(proc)
            self._exited[rank] = loop.create_future()
            # The sentinel becomes readable when the process ends: death is an event, not a poll.
            loop.add_reader(proc.sentinel, self._on_process_exit, rank, proc)

    def _on_process_exit(self, rank: int, proc: multiprocessing.process.BaseProcess) -> None:
        asyncio.get_running_loop().remove_reader(proc.sentinel)
        proc.join(timeout=1.0)  # reap it: no zombie
        if not self._exited[rank].done():
            self._exited[rank].set_result(proc.exitcode)
        if self._state in ("starting", "running"):
            self._break(WorkerDied(rank, proc.exitcode))

    def _break(self, reason: BaseException) -> None:
        """A rank is dead or stuck: fail every pending request with `reason` and kill the ranks."""
        if self._state not in ("starting", "running"):
            return
        self._state = "broken"
        self._broken_reason = reason
        for request in list(self._requests.values()):
            del self._requests[request.id]
            request.finish(exc=reason)
        self._kill()

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.exitcode is None:
                proc.kill()

    async def _shutdown(self, graceful: bool) -> None:
        """End the processes (politely when `graceful`), fail what is still pending, free everything."""
        self._state = "stopping"
        if graceful:
            for rank in range(self.world_size):
                self._socket.send_multipart([rank_identity(rank), *protocol.pack(("stop",))])
            await self._wait_exits(self.stop_timeout)
        for proc in self._procs:
            if proc.exitcode is None:
                proc.terminate()  # SIGTERM: the worker unwinds through teardown
        await self._wait_exits(5.0)
        self._kill()
        await self._wait_exits(None)
        for request in list(self._requests.values()):
            request.finish(exc=RuntimeError(f"the runner was stopped before request {request.id} finished"))
        self._requests.clear()
        self._release()
        self._state = "stopped"
        self._stopped.set()

    async def _wait_exits(self, timeout: float | None) -> None:
        pending = [future for future in self._exited.values() if not future.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    def _release(self) -> None:
        self._receiver.cancel()
        self._socket.close(linger=0)
        self._context.term()
        for proc in self._procs:
            proc.close()
        self._procs, self._exited = [], {}
        self._store = None
        shutil.rmtree(self._tmpdir, ignore_errors=True)


# ---------------------------------------------------------------- helpers


def _worker_reference(worker_cls: type | str) -> tuple[str, str]:
    """(module, qualname) by which a spawned process imports the worker class."""
    if isinstance(worker_cls, str):
        module, sep, qualname = worker_cls.partition(":")
        if not sep or not module or not qualname:
            raise ValueError(f"worker path must look like 'package.module:ClassName', got {worker_cls!r}")
        return module, qualname
    if not isinstance(worker_cls, type) or not issubclass(worker_cls, DistributedWorker):
        raise TypeError(f"worker_cls must be a DistributedWorker subclass, got {worker_cls!r}")
    if "<locals>" in worker_cls.__qualname__:
        raise ValueError(f"{worker_cls.__qualname__} is defined inside a function; define it at module level "
                         "so the worker processes can import it")
    return worker_cls.__module__, worker_cls.__qualname__


def _check_device_type(device_type: str | None, world_size: int) -> str:
    import torch

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    if device_type == "cuda" and world_size > torch.cuda.device_count():
        raise ValueError(f"world_size {world_size} needs {world_size} GPUs but {torch.cuda.device_count()} are "
                         f"visible; use world_size <= {torch.cuda.device_count()} or device_type='cpu'")
    return device_type


def _loopback_store() -> Any:
    """The workers' torch.distributed rendezvous: a TCP store served by this process, listening
    on 127.0.0.1 only (torch's own would listen on every interface), on a port chosen by the OS."""
    import torch.distributed as dist

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # detach(): the store owns the listening socket from here on and closes it.
    return dist.TCPStore("127.0.0.1", port, None, True, wait_for_workers=False, master_listen_fd=listener.detach())


def _encode_payload(payload: Any) -> protocol.Frames:
    """Check and serialize a request payload; raises before anything is sent."""
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict of keyword arguments for the worker's __call__, "
                        f"got {type(payload).__name__}")
    for key in payload:
        if not isinstance(key, str):
            raise TypeError(f"payload keys must be strings (they become keyword arguments), got {key!r}")
    if "streaming" in payload:
        raise ValueError("payload key 'streaming' is reserved (the runner sets it: True in stream(), "
                         "False in invoke()); rename the key")
    return protocol.encode(payload)


def _in_band(obj: Any) -> bytes:
    """`obj` pickled into one bytes object (setup kwargs travel as a process argument)."""
    import io

    stream = io.BytesIO()
    protocol._Pickler(stream, protocol=protocol.PROTOCOL).dump(obj)
    return stream.getvalue()


def _mark_retrieved(future: asyncio.Future) -> None:
    # An abandoned request's error has nobody to read it; reading it here silences asyncio's
    # "exception was never retrieved" log.
    if not future.cancelled():
        future.exception()
