"""`DistributedRunner`: one worker process per rank behind an asyncio API (fal.distributed's).

    runner = DistributedRunner(MyWorker, world_size=4)
    await runner.start(model_path="/models/flux")          # MyWorker.setup(model_path=...) on every rank
    result = await runner.invoke({"prompt": "a cat"})     # MyWorker.__call__(prompt=...) on every rank
    async for event in runner.stream({"prompt": "a cat"}):
        ...                                                # rank 0's add_streaming_result(...), then the result
    await runner.stop()

How it works: the runner binds one ZMQ ROUTER socket (ipc in a private 0700 temp dir, or tcp);
each worker connects a DEALER whose identity is its rank. A request is serialized once and sent
to every rank; each rank answers (rank 0 with the result, the others with an ack or an error).
One asyncio task receives all replies and routes them by request id, so late replies of
timed-out or cancelled requests are dropped. Worker deaths are seen through the processes'
sentinels registered with the event loop; ranks that stop answering are caught by a timer that
starts at a request's first reply (`collective_timeout`). Nothing polls or sleeps.
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
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from ditmesh.runner import procs, protocol
from ditmesh.runner.protocol import RanksStuck, RemoteError, RunnerBroken, WorkerDied
from ditmesh.runner.worker import (STACK_SIGNAL, DistributedWorker, WorkerSpec, rank_identity, stack_path,
                                   worker_main)

logger = logging.getLogger(__name__)

_SETUP_REQUEST = 0  # the request id `ready` / `setup_error` replies carry
_DONE = object()  # end of a request's event queue
_BIG_MESSAGE = 65536  # bytes; larger messages are sent zero-copy
_STACK_WAIT = 0.5  # s: how long stuck ranks get to write their stacks after the signal
_STACK_FRAMES = 6  # innermost frames of each stuck rank quoted in the error


@dataclass(eq=False)
class _Request:
    """One request in flight: the replies so far and how to hand the outcome to the caller."""

    id: int
    world_size: int
    future: asyncio.Future
    started: float  # time.monotonic() when it was sent
    events: asyncio.Queue | None = None  # stream events of rank 0 (streaming requests only)
    fail_fast: bool = False  # setup: the first error ends it (the other ranks may be stuck)
    replies: dict[int, tuple[bool, Any]] = field(default_factory=dict)  # rank -> (ok, frames | RemoteError)
    abandoned: bool = False  # the caller timed out or was cancelled: replies are only bookkept
    deadline: float | None = None  # time.monotonic() past which the caller no longer waits
    image_format: str | None = None  # the payload's "image_format": the final text event's format
    first_reply: float | None = None  # loop time of the first rank's reply
    stuck_due: float | None = None  # loop time at which ranks still working count as stuck
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

    The first ten arguments are fal.distributed's (`fal.distributed.DistributedRunner`, fal 1.83),
    in its order and with its meaning; the keyword-only ones after them are ditmesh's.

    Args:
        worker_cls: the worker class, defined at module level (the worker processes import it),
            or its path as ``"package.module:ClassName"``.
        world_size: number of ranks (GPUs on CUDA).
        master_addr: address the torch.distributed rendezvous (a TCP store the runner serves)
            listens on; one host, so loopback by default.
        master_port: its port (None: a free port the OS picks, so runners never collide; fal's
            default, 29500, is fixed).
        worker_addr: with `worker_port`, the address of the runner's ZMQ socket (tcp transport).
        worker_port: the port of that socket; None (default) with the ``ipc`` transport, where
            neither is used.
        timeout: seconds a rank waits in one torch.distributed collective before the process
            group fails (the process-group timeout, as fal's; None: torch's default, 30 min on
            gloo and 10 min on NCCL, where fal's default is 24 h). Requests are bounded
            separately: `request_timeout`, `collective_timeout`.
        keepalive_payload: what the runner sends to the workers every `keepalive_interval` s
            while no request runs (e.g. to keep a GPU clocked or a cache warm).
        keepalive_interval: seconds of idleness between keep-alive requests; None: no keep-alive.
        cwd: the worker processes' working directory (None: the runner's).
        device_type: ``"cuda"`` (NCCL, one GPU per rank) or ``"cpu"`` (gloo); default cuda if available.
        request_timeout: default seconds `invoke`/`stream` wait before raising `TimeoutError` (None: no limit).
        collective_timeout: seconds the other ranks get to finish a request once one rank has
            returned or raised. Past it they are taken to be stuck in a collective the finished
            rank never entered: the call raises (`RanksStuck`, or the failing rank's `RemoteError`)
            naming the ranks still working and where their Python stacks stand, and the
            processes are killed. Set it above the longest time one rank legitimately works
            alone at the end of a request (rank 0 encoding images, saving a checkpoint).
        failure_timeout: the same bound after a rank *raised* (the others are then almost always
            stuck), when shorter than `collective_timeout`.
        auto_restart: after a rank died or got stuck, restart the ranks at once with the last
            `start`'s setup kwargs; requests made meanwhile wait for it. False: every call raises
            `RunnerBroken` until you call `restart()`.
        start_timeout: seconds `start` waits for every rank's `setup` by default (None: no limit).
        stop_timeout: seconds `stop` waits for a clean exit by default before SIGTERM, then SIGKILL.
        num_threads: torch intra-op threads per worker (default: CPU cores / world_size, at least 1).
        setup_kwargs: what ``async with runner:`` passes to `start` when the block makes a request
            without having started the runner.
        transport: ``"ipc"`` (unix socket in a private temp dir) or ``"tcp"`` (`worker_addr`,
            loopback by default); default tcp when `worker_port` is given, else ipc.
        image_format: format of images in a text stream's final result (``"jpeg"``: quality 95,
            ``"png"``, ``"webp"``); a payload key ``"image_format"`` overrides it per request, as in fal.
    """

    def __init__(self, worker_cls: type[DistributedWorker] | str, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int | None = None,
                 worker_addr: str = "127.0.0.1", worker_port: int | None = None, timeout: float | None = None,
                 keepalive_payload: dict[str, Any] | None = None, keepalive_interval: float | None = None,
                 cwd: str | os.PathLike | None = None, *, device_type: str | None = None,
                 request_timeout: float | None = None, collective_timeout: float = 60.0,
                 failure_timeout: float = 10.0, auto_restart: bool = True, start_timeout: float | None = 1800.0,
                 stop_timeout: float = 30.0, num_threads: int | None = None,
                 setup_kwargs: dict[str, Any] | None = None, transport: str | None = None,
                 image_format: str = "jpeg"):
        self._worker_module, self._worker_qualname = _worker_reference(worker_cls)
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        self.transport = _check_transport(transport, worker_port)
        self.world_size = world_size
        self.master_addr, self.master_port = master_addr, master_port
        self.worker_addr, self.worker_port = worker_addr, worker_port
        self.timeout = timeout
        self.keepalive_payload = {} if keepalive_payload is None else keepalive_payload
        _encode_payload(self.keepalive_payload)  # a bad one fails here, not at the first keep-alive
        self.cwd = None if cwd is None else os.fspath(cwd)
        self.device_type = _check_device_type(device_type, world_size)
        self.request_timeout = request_timeout
        self.collective_timeout = collective_timeout
        self.failure_timeout = failure_timeout
        self.auto_restart = auto_restart
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.num_threads = num_threads or max(1, (os.cpu_count() or 1) // world_size)
        self.image_format = image_format
        self._setup_kwargs = setup_kwargs
        self._state = "new"  # new -> starting -> running [-> broken] -> stopping -> stopped
        self._broken_reason: BaseException | None = None
        self._errors: list[BaseException] = []  # what ended ranks, until `gather_errors` reads them
        self._ids = itertools.count(_SETUP_REQUEST + 1)
        self._requests: dict[int, _Request] = {}
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._exited: dict[int, asyncio.Future] = {}
        self._stopped: asyncio.Event | None = None
        self._auto_start = False
        self._start_lock = asyncio.Lock()
        self._restart_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by `start`
        self._keepalive_interval = keepalive_interval
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._keepalive_tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------ lifecycle

    @property
    def is_running(self) -> bool:
        """True when the ranks are up and accept requests."""
        return self._state == "running"

    @property
    def needs_restart(self) -> bool:
        """True after a rank died or got stuck, until the ranks are back (`auto_restart` brings them
        back by itself; without it, call `restart()`)."""
        return self._state == "broken" or self._restarting()

    @property
    def pids(self) -> list[int | None]:
        """Process ids of the ranks (index = rank)."""
        return [proc.pid for proc in self._procs]

    @property
    def alive(self) -> list[bool]:
        """Whether each rank's process is running (index = rank); empty before `start`."""
        return [proc.exitcode is None for proc in self._procs]  # exitcode: a non-blocking waitpid

    @property
    def keepalive_interval(self) -> float | None:
        """Seconds of idleness between keep-alive requests (None: off); settable while running."""
        return self._keepalive_interval

    @keepalive_interval.setter
    def keepalive_interval(self, seconds: float | None) -> None:
        self._keepalive_interval = seconds
        self._disarm_keepalive()
        self._arm_keepalive()

    def is_alive(self) -> bool:
        """Whether every rank's process runs (False before `start` and after `stop`/`terminate`)."""
        return bool(self._procs) and all(self.alive)

    def ensure_alive(self) -> None:
        """Raise `RunnerBroken` (a `RuntimeError`), with what ended the ranks, unless `is_alive()`."""
        if not self.is_alive():
            raise RunnerBroken(f"the ranks are not running ({self._state}); errors: {self.gather_errors()!r}")

    def gather_errors(self) -> list[BaseException]:
        """The errors that ended ranks since the last call (`WorkerDied`, `RanksStuck`, a rank's
        `RemoteError` that left the others stuck, a failed setup), oldest first; then forgets them."""
        errors, self._errors = self._errors, []
        return errors

    def oldest_request_age(self) -> float | None:
        """Seconds since the oldest request the ranks are still working on was sent (a request the
        caller gave up counts until the ranks let go of it); None when they are idle. Cheap."""
        started = [request.started for rid, request in self._requests.items() if rid != _SETUP_REQUEST]
        return time.monotonic() - min(started) if started else None

    def health(self) -> dict[str, Any]:
        """What a health check needs, without talking to the ranks:

        ``{"healthy", "state", "alive", "in_flight", "oldest_request_s", "overdue", "restarting"}``.
        `healthy` is False when a rank's process is gone, the ranks need (or are in) a restart, or
        `overdue`: a request is still on the ranks past its timeout (its caller gave up, yet the
        ranks have not let go of it, e.g. stuck where they never check `cancel_requested`). A
        request without a timeout never counts as overdue: compare `oldest_request_s` with your
        own bound for those.
        """
        now = time.monotonic()
        requests = [request for rid, request in self._requests.items() if rid != _SETUP_REQUEST]
        overdue = any(request.deadline is not None and now > request.deadline for request in requests)
        running = self._state == "running" and self.is_alive()
        return {"healthy": running and not overdue, "state": self._state, "alive": self.alive,
                "in_flight": len(requests), "oldest_request_s": self.oldest_request_age(),
                "overdue": overdue, "restarting": self._restarting()}

    async def start(self, timeout: float | None = None, **setup_kwargs: Any) -> None:
        """Spawn the ranks, initialise torch.distributed and call ``setup(**setup_kwargs)`` on each.

        `timeout` (default: the runner's `start_timeout`, 1800 s) bounds the whole start-up; it
        is not passed to `setup`. Raises `TimeoutError` past it, `RemoteError` if a rank's setup
        raised (all processes are stopped first), `WorkerDied` if a rank died during start-up,
        `TypeError` if `setup_kwargs` cannot be pickled.
        """
        if self._state in ("starting", "running", "stopping") or (
                self._restarting() and self._restart_task is not asyncio.current_task()):
            raise RuntimeError(f"the runner is {self._state}; call `await runner.restart()` to start it afresh")
        if self._state == "broken":
            await self.stop()
        protocol.encode(setup_kwargs)  # TypeError naming the bad value, before anything is spawned
        self._setup_kwargs = setup_kwargs
        await self._launch(_in_band(setup_kwargs), self.start_timeout if timeout is None else timeout)
        self._broken_reason = None

    async def stop(self, timeout: float | None = None) -> None:
        """Call `teardown` on every rank and end the processes: those not gone after `timeout`
        seconds (default: the runner's `stop_timeout`) get SIGTERM, then SIGKILL. Safe to call more
        than once (fal's raises when nothing runs; this one returns)."""
        await self._cancel_restart()
        if self._restart_task is not asyncio.current_task():
            self._broken_reason = None  # stopped on purpose: nothing to report any more
        if self._state in ("new", "stopped"):
            return
        if self._state == "stopping":
            await self._stopped.wait()
            return
        grace = self.stop_timeout if timeout is None else timeout
        await self._shutdown(graceful=self._state == "running", timeout=grace)

    def terminate(self, timeout: float = 10) -> None:
        """End the worker processes now, synchronously (SIGTERM, then SIGKILL after `timeout` s),
        as fal's `terminate`: for shutdown paths that cannot await. Pending calls fail with
        `RunnerBroken`; `await stop()` (or `start`/`restart`) later frees the sockets."""
        self._disarm_keepalive()
        if self._restart_task is not None:
            self._restart_task.cancel()
        for proc in self._procs:
            if proc.exitcode is None:
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        self._break(RunnerBroken("the runner was terminated"), restart=False)

    async def restart(self) -> None:
        """Stop (killing stuck or dead ranks) and start again with the last `start`'s setup kwargs.
        While an automatic restart is under way, wait for it instead."""
        if self._restarting():
            try:
                await asyncio.shield(self._restart_task)
            except Exception:
                pass  # it failed: start afresh below
            if self.is_running:
                return
        if self._setup_kwargs is None and self._state == "new":
            raise RuntimeError("the runner was never started; call `await runner.start(...)` first")
        await self.stop()
        await self.start(**(self._setup_kwargs or {}))

    async def __aenter__(self) -> DistributedRunner:
        # Start lazily: the block may call start(**kwargs) itself (as with fal); if it does not,
        # the first request starts the runner with the constructor's `setup_kwargs`.
        self._auto_start = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------ requests

    async def invoke(self, payload: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Run ``worker(streaming=False, **payload)`` on every rank; return rank 0's result.

        Raises `RemoteError` if any rank raised (fal returns ``{"error": str(e)}`` instead),
        `WorkerDied` if a rank died, `RanksStuck` if ranks never finished, `TimeoutError` after
        `timeout` seconds (default: the runner's `request_timeout`), `TypeError`/`ValueError` for a
        payload that is not a dict of picklable values (before anything is sent). A call
        cancelled or timed out tells the ranks to stop the request (see
        `DistributedWorker.cancel_requested`).
        """
        body = _encode_payload({} if payload is None else payload)
        await self._ready()
        timeout = self._timeout(timeout)
        request = self._submit(body, streaming=False, timeout=timeout)
        frames = await self._wait(request, timeout)
        return protocol.decode(frames)

    def stream(self, payload: dict[str, Any] | None = None, timeout: float | None = None,
               streaming_timeout: float | None = None, as_text_events: bool = False) -> AsyncIterator[Any]:
        """Run ``worker(streaming=True, **payload)`` on every rank; iterate over rank 0's
        `add_streaming_result` events, then its final result.

        With `as_text_events` every item is an SSE frame, ``b"data: <json>\\n\\n"``, in fal's
        shape (see `protocol.to_text_event`), ready for a ``text/event-stream`` response; without
        (the default, as in fal), the Python objects themselves. `timeout` bounds the whole
        stream, `streaming_timeout` the wait for each next item; both raise `TimeoutError`.
        Errors as in `invoke`, raised from the iteration. Leaving the loop early abandons the
        request: its rest is discarded and the ranks are told (see `DistributedWorker.cancel_requested`).
        """
        payload = {} if payload is None else payload
        body = _encode_payload(payload)  # bad payloads fail here, before iteration
        image_format = payload.get("image_format") if isinstance(payload.get("image_format"), str) else None
        return self._stream(body, as_text_events, self._timeout(timeout), streaming_timeout,
                            image_format or self.image_format)

    async def _stream(self, body: protocol.Frames, as_text: bool, timeout: float | None,
                      streaming_timeout: float | None, image_format: str) -> AsyncIterator[Any]:
        await self._ready()
        request = self._submit(body, streaming=True, timeout=timeout)
        try:
            while (item := await self._next_event(request, timeout, streaming_timeout)) is not _DONE:
                wants_text, event_format, frames = item
                event = protocol.decode(frames)
                if as_text and (wants_text or not isinstance(event, (bytes, str))):
                    event = protocol.to_text_event(event, event_format)
                yield event
            result = protocol.decode(request.future.result())  # raises the request's error
            yield protocol.to_text_event(result, image_format, is_final=True) if as_text else result
        finally:
            if not request.future.done():
                self._abandon(request)

    async def _next_event(self, request: _Request, timeout: float | None, streaming_timeout: float | None) -> Any:
        remaining = None if request.deadline is None else max(0.0, request.deadline - time.monotonic())
        wait = min((t for t in (remaining, streaming_timeout) if t is not None), default=None)
        try:
            return await asyncio.wait_for(request.events.get(), wait)
        except TimeoutError:
            what = (f"did not finish within {timeout} s" if wait == remaining
                    else f"sent nothing for streaming_timeout={streaming_timeout} s")
            raise TimeoutError(f"stream request {request.id} {what}; its late events and result will be "
                               "discarded") from None

    async def _ready(self) -> None:
        """Inside ``async with``, the first request starts a runner nobody started; during an
        automatic restart, requests wait for the ranks to be back."""
        if self._auto_start and self._state == "new":
            async with self._start_lock:  # concurrent first requests start it once
                if self._state == "new":
                    await self.start(**(self._setup_kwargs or {}))
        if self._restarting():
            try:
                await asyncio.shield(self._restart_task)
            except Exception:
                pass  # `_check_running` explains

    def _timeout(self, timeout: float | None) -> float | None:
        return self.request_timeout if timeout is None else timeout

    def _submit(self, body: protocol.Frames, streaming: bool, timeout: float | None) -> _Request:
        """Register a request and send it to every rank (one synchronous block: ranks see one order)."""
        self._check_running()
        self._disarm_keepalive()  # paused while the ranks work
        request = self._new_request(next(self._ids), events=streaming)
        if timeout is not None:
            request.deadline = request.started + timeout
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
        if self._broken_reason is not None and self._state in ("broken", "stopped"):
            fix = "the automatic restart failed; " if self._state == "stopped" else ""
            raise RunnerBroken(f"the runner needs a restart ({self._broken_reason.__class__.__name__}: "
                               f"{str(self._broken_reason).splitlines()[0]}); {fix}call `await runner.restart()`")
        raise RuntimeError(f"the runner is {self._state}; call `await runner.start(...)` first")

    def _new_request(self, request_id: int, events: bool = False, fail_fast: bool = False) -> _Request:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        future.add_done_callback(_mark_retrieved)
        request = _Request(request_id, self.world_size, future, time.monotonic(), asyncio.Queue() if events else None,
                           fail_fast)
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
                request.events.put_nowait((extra[0], extra[1], body))
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
        elif not request.fail_fast:  # setup: `start`'s timeout bounds the slow ranks
            self._bound_stragglers(request, bool(errors))

    def _bound_stragglers(self, request: _Request, failed: bool) -> None:
        """A rank has answered: the others get `collective_timeout` (after a failure, at most
        `failure_timeout`) from the first answer to answer too, or they count as stuck."""
        loop = asyncio.get_running_loop()
        if request.first_reply is None:
            request.first_reply = loop.time()
        bound = min(self.collective_timeout, self.failure_timeout) if failed else self.collective_timeout
        due = request.first_reply + bound
        if request.stuck_due is None or due < request.stuck_due:
            if request.stuck_timer is not None:
                request.stuck_timer.cancel()
            request.stuck_due = due
            request.stuck_timer = loop.call_at(due, self._on_stuck, request, bound)

    def _finish(self, request: _Request) -> None:
        del self._requests[request.id]
        errors = request.errors()
        if not errors:
            request.finish(result=request.replies[0][1])
        else:
            note = ""
            if len(errors) > 1:
                note = "also failed: " + ", ".join(f"rank {e.rank} ({e.exc_type}: {e.message})" for e in errors[1:])
            request.finish(exc=errors[0].with_note(note) if note else errors[0])
        self._arm_keepalive()

    def _on_stuck(self, request: _Request, bound: float) -> None:
        """Ask the ranks still working for their Python stacks; report once they had time to write them."""
        if self._requests.get(request.id) is not request:
            return
        waiting = sorted(set(range(self.world_size)) - set(request.replies))
        offsets = {}
        for rank in waiting:
            path = stack_path(self._tmpdir, rank)
            offsets[rank] = os.path.getsize(path) if os.path.exists(path) else 0
            if self._procs[rank].exitcode is None:
                os.kill(self._procs[rank].pid, STACK_SIGNAL)
        asyncio.get_running_loop().call_later(_STACK_WAIT, self._report_stuck, request, waiting, offsets, bound)

    def _report_stuck(self, request: _Request, waiting: list[int], offsets: dict[int, int], bound: float) -> None:
        if self._requests.get(request.id) is not request:
            return  # they finished after all
        stacks = {rank: _read_stack(stack_path(self._tmpdir, rank), offsets[rank]) for rank in waiting}
        where = "\n".join(f"  rank {rank} is at:\n{_innermost_frames(stacks[rank])}" for rank in waiting)
        fix = ("they are being restarted with the last setup kwargs (auto_restart)" if self.auto_restart
               else "call `await runner.restart()`")
        errors = request.errors()
        if errors:
            error = errors[0]
            reason: BaseException = error.with_note(
                f"ranks {waiting} did not finish within {bound} s after rank {error.rank} failed (they are "
                f"probably waiting in a collective rank {error.rank} never entered; see "
                f"collective_timeout/failure_timeout):\n{where}\nthe worker processes were killed; {fix}")
        else:
            finished = sorted(request.replies)
            reason = RanksStuck(
                f"rank(s) {waiting} did not finish request {request.id} within collective_timeout={bound} s "
                f"after rank(s) {finished} returned: they are probably waiting in a collective the others "
                f"never entered (or computing alone for longer than collective_timeout allows):\n{where}\n"
                f"the worker processes were killed; {fix}", waiting, stacks)
        self._break(reason)

    # ------------------------------------------------------------ keep-alive

    def _arm_keepalive(self) -> None:
        """Schedule a keep-alive request `keepalive_interval` s from now if the ranks are idle."""
        busy = any(rid != _SETUP_REQUEST for rid in self._requests)
        if self._keepalive_interval is None or self._state != "running" or busy or self._keepalive_timer:
            return
        self._keepalive_timer = self._loop.call_later(self._keepalive_interval, self._send_keepalive)

    def _disarm_keepalive(self) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None

    def _send_keepalive(self) -> None:
        self._keepalive_timer = None
        task = self._loop.create_task(self._keepalive())
        self._keepalive_tasks.add(task)  # a reference until it ends (the loop keeps only weak ones)
        task.add_done_callback(self._keepalive_tasks.discard)

    async def _keepalive(self) -> None:
        try:
            await self.invoke(self.keepalive_payload)
        except Exception as error:  # its failure is the next request's to report; log it here
            logger.warning("ditmesh runner: keep-alive request failed: %s", str(error).splitlines()[0])

    # ------------------------------------------------------------ processes

    async def _launch(self, setup_kwargs: bytes, timeout: float | None) -> None:
        self._state = "starting"
        self._loop = asyncio.get_running_loop()  # the runner's sockets and timers belong to it
        self._stopped = asyncio.Event()
        self._tmpdir = tempfile.mkdtemp(prefix="ditmesh-runner-")  # mode 0700: only this user
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        for option, value in ((zmq.ROUTER_MANDATORY, 1), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.LINGER, 0)):
            self._socket.setsockopt(option, value)
        address = self._bind()
        self._store = _rendezvous_store(self.master_addr, self.master_port)
        spec = WorkerSpec(self._worker_module, self._worker_qualname, self.world_size, address, self.master_addr,
                          self._store.port, self.device_type, self.num_threads, setup_kwargs, self.timeout,
                          self.cwd, self._tmpdir)
        self._receiver = asyncio.get_running_loop().create_task(self._receive_loop())
        setup = self._new_request(_SETUP_REQUEST, fail_fast=True)
        self._spawn(spec)
        try:
            await asyncio.wait_for(setup.future, timeout)
        except BaseException as exc:
            await self._shutdown(graceful=False)
            if isinstance(exc, TimeoutError):
                raise TimeoutError(f"the ranks' setup did not finish within the start timeout of {timeout} s") from None
            raise
        self._state = "running"
        self._arm_keepalive()

    def _bind(self) -> str:
        if self.transport == "tcp":
            self._socket.bind(f"tcp://{self.worker_addr}:{self.worker_port or '*'}")
            return self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        address = f"ipc://{os.path.join(self._tmpdir, 'runner.sock')}"
        self._socket.bind(address)
        return address

    def _spawn(self, spec: WorkerSpec) -> None:
        loop = asyncio.get_running_loop()
        context = procs.context(spec.device_type)
        self._procs, self._exited = [], {}
        for rank in range(self.world_size):
            proc = procs.process(context, worker_main, (rank, spec), daemon=True, name=f"ditmesh-rank-{rank}")
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

    def _break(self, reason: BaseException, restart: bool = True) -> None:
        """A rank is dead or stuck: fail every pending request with `reason`, kill the ranks and,
        with `auto_restart`, bring them back."""
        if self._state not in ("starting", "running"):
            return
        was_running = self._state == "running"
        self._state = "broken"
        self._broken_reason = reason
        self._errors.append(reason)
        self._disarm_keepalive()
        for request in list(self._requests.values()):
            del self._requests[request.id]
            request.finish(exc=reason)
        self._kill()
        if restart and was_running and self.auto_restart:
            logger.warning("ditmesh runner: restarting the ranks after %s", str(reason).splitlines()[0])
            self._restart_task = self._loop.create_task(self._restart_after_break())
            self._restart_task.add_done_callback(_mark_retrieved)

    async def _restart_after_break(self) -> None:
        reason = self._broken_reason
        try:
            # shielded: a `stop()` that cancels this restart then waits for the shutdown to end
            await asyncio.shield(self._shutdown(graceful=False))
            await self.start(**(self._setup_kwargs or {}))
        except Exception as error:
            logger.error("ditmesh runner: the automatic restart failed: %s", str(error).splitlines()[0])
            self._broken_reason = reason
            self._errors.append(error)
            raise

    def _restarting(self) -> bool:
        return self._restart_task is not None and not self._restart_task.done()

    async def _cancel_restart(self) -> None:
        if self._restarting() and self._restart_task is not asyncio.current_task():
            self._restart_task.cancel()
            await asyncio.gather(self._restart_task, return_exceptions=True)

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.exitcode is None:
                proc.kill()

    async def _shutdown(self, graceful: bool, timeout: float | None = None) -> None:
        """End the processes (politely when `graceful`), fail what is still pending, free everything."""
        self._state = "stopping"
        self._disarm_keepalive()
        if graceful:
            for rank in range(self.world_size):
                self._socket.send_multipart([rank_identity(rank), *protocol.pack(("stop",))])
            await self._wait_exits(timeout)
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


def _check_transport(transport: str | None, worker_port: int | None) -> str:
    if transport is None:
        return "ipc" if worker_port is None else "tcp"
    if transport not in ("ipc", "tcp"):
        raise ValueError(f"transport must be 'ipc' or 'tcp', got {transport!r}")
    if transport == "ipc" and worker_port is not None:
        raise ValueError(f"worker_port={worker_port} needs transport='tcp' (the ipc transport uses a unix "
                         "socket, no port); pass transport='tcp' or drop worker_port")
    return transport


def _rendezvous_store(addr: str, port: int | None) -> Any:
    """The workers' torch.distributed rendezvous: a TCP store served by this process, listening on
    `addr` only (loopback by default; torch's own would listen on every interface), on `port` or
    one chosen by the OS."""
    import torch.distributed as dist

    listener = socket.create_server((addr, port or 0))
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


def _read_stack(path: str, offset: int) -> str:
    """What a rank's faulthandler appended to `path` after `offset` (empty if it wrote nothing)."""
    try:
        with open(path, errors="replace") as file:
            file.seek(offset)
            return file.read()
    except OSError:
        return ""


def _innermost_frames(dump: str, count: int = _STACK_FRAMES) -> str:
    """The innermost frames (at most `count`) of the thread serving the request, from a
    faulthandler dump (thread blocks of ``File "...", line N in func`` lines, innermost first),
    down to the worker's own code: the runner's `_handle` frame and below are left out."""
    if not dump.strip():
        return "    (no stack: the rank did not answer the signal)"
    blocks = [block.splitlines()[1:] for block in dump.split("\n\n") if "most recent call first" in block]
    serving = [block for block in blocks if any(line.rstrip().endswith("in _handle") for line in block)]
    frames = (serving or blocks or [dump.splitlines()])[0]
    mine = next((i for i, line in enumerate(frames) if line.rstrip().endswith("in _handle")), len(frames))
    return "\n".join(f"    {line.strip()}" for line in frames[:min(mine, count)])


def _mark_retrieved(future: asyncio.Future) -> None:
    # An abandoned request's error has nobody to read it; reading it here silences asyncio's
    # "exception was never retrieved" log.
    if not future.cancelled():
        future.exception()
