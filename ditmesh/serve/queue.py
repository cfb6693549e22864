"""`MeshQueue`: first-come, first-served access to a `DistributedRunner`, one request at a time.

A request waits for its turn here, not on the ranks, so a client that leaves while waiting
costs the mesh nothing: its turn is given up and it never reaches a worker. A request whose
client leaves during its turn is abandoned through the runner (its events and result are
dropped, and the ranks stop it after their current denoising step; see
`DistributedWorker.cancel_requested`).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from ditmesh.runner.protocol import RemoteError, RunnerBroken, WorkerDied
from ditmesh.runner.runner import DistributedRunner
from ditmesh.serve.metrics import Metrics

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the server allows (HTTP 429)."""


class MeshUnavailable(Exception):
    """The ranks cannot serve this request: one died, hung or would not restart (HTTP 503)."""


class MeshQueue:
    """Hands out turns on `runner` in arrival order; at most `max_queue` requests wait.

    A rank that dies (or a request that times out: the ranks may be stuck) fails the request in
    its turn and the ranks restart at once, before the next turn.
    """

    def __init__(self, runner: DistributedRunner, max_queue: int, metrics: Metrics):
        self.runner = runner
        self.max_queue = max_queue
        self.metrics = metrics
        self.waiting = 0
        self.in_flight = 0
        self.restarts = 0
        self.closed = False
        self._turn = asyncio.Lock()  # wakes its waiters in arrival order
        self._restart_task: asyncio.Task | None = None
        self._stale = False  # restart even though running: a timed-out request may have the ranks stuck
        self._turn_started: float | None = None  # loop time at which the request in flight got the mesh

    def check_room(self) -> None:
        """Raise `QueueFull` if a request arriving now would have to wait and nobody more may."""
        if self._turn.locked() and self.waiting >= self.max_queue:
            raise QueueFull(f"{self.waiting} requests are waiting for the mesh, the most this server takes; "
                            "retry later, or start the server with a larger --max-queue")

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[DistributedRunner]:
        """Wait for this request's turn; inside the block the running runner is this request's alone."""
        self.check_room()
        self._count_waiting(+1)
        try:
            await self._turn.acquire()  # cancelled here: the request leaves the queue, nothing was sent
        finally:
            self._count_waiting(-1)
        try:
            await self._ensure_running()
            self._count_in_flight(1)
            self._turn_started = asyncio.get_running_loop().time()
            self.metrics.sent.inc()
            yield self.runner
        except TimeoutError:
            # The ranks may be stuck (in a collective, or in a step that never ends) where they cannot
            # see the cancel: they would block every later turn.
            self.restart_soon(stale=True)
            raise
        except (WorkerDied, RunnerBroken, RemoteError) as error:
            if not self.runner.needs_restart:
                raise  # a rank raised and the ranks carry on: the request's own error
            self.restart_soon()
            reason = str(error).splitlines()[0].split("; call")[0]
            raise MeshUnavailable(f"{reason}; the ranks are restarting: retry in a few seconds") from error
        finally:
            self._count_in_flight(0)
            self._turn_started = None
            self._turn.release()

    def turn_age(self) -> float | None:
        """Seconds the request in flight has had the mesh (None: the mesh is idle)."""
        if self._turn_started is None:
            return None
        return asyncio.get_running_loop().time() - self._turn_started

    async def probe(self, timeout: float) -> bool | None:
        """Whether idle ranks answer a request (``{"describe": True}``) within `timeout` seconds;
        None when a request holds the mesh (its age says more). Ranks that do not answer are
        restarted in the next turn."""
        if self._turn.locked() or not self.runner.is_running:
            return None
        async with self._turn:
            try:
                await self.runner.invoke({"describe": True}, timeout=timeout)
            except Exception:  # noqa: BLE001 - any failure to answer is the answer
                logger.warning("ditmesh serve: the idle ranks did not answer within %s s; restarting them", timeout)
                self._stale = True
                answered = False
            else:
                answered = True
        if not answered:
            self.restart_soon(stale=True)
        return answered

    def restart_soon(self, stale: bool = False) -> None:
        """Restart the ranks in the next turn if they are down (or `stale`: running, but stuck on an
        abandoned request); with no request waiting, that turn is now."""
        self._stale = self._stale or stale
        if self.closed or (self.runner.is_running and not self._stale):
            return
        if self._restart_task is None or self._restart_task.done():
            self._restart_task = asyncio.get_running_loop().create_task(self._restart_in_turn())

    async def close(self) -> None:
        """No more restarts (shutdown): a pending one is cancelled; the caller then stops the runner."""
        self.closed = True
        if self._restart_task is not None:
            self._restart_task.cancel()

    async def _restart_in_turn(self) -> None:
        async with self._turn:
            if self.closed:
                return
            try:
                await self._ensure_running()
            except MeshUnavailable:
                logger.exception("ditmesh serve: the ranks did not restart; the next request tries again")

    async def _ensure_running(self) -> None:
        if self.runner.is_running and not self._stale:
            return
        if self.closed:
            raise MeshUnavailable("the server is shutting down")
        self._stale = False
        self.restarts += 1
        self.metrics.restarts.inc()
        logger.warning("ditmesh serve: restarting the ranks (restart %d)", self.restarts)
        try:
            await self.runner.restart()
        except Exception as error:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            message = f"the ranks did not restart ({reason}); retry later, and read the server's log"
            raise MeshUnavailable(message) from error

    def _count_waiting(self, change: int) -> None:
        self.waiting += change
        self.metrics.queue_depth.set(self.waiting)

    def _count_in_flight(self, value: int) -> None:
        self.in_flight = value
        self.metrics.in_flight.set(value)
