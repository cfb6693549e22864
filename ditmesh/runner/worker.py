"""`DistributedWorker`: the code that runs on every rank behind a `DistributedRunner`.

Subclass it, load the model in `setup`, serve requests in `__call__`. Every request reaches
every rank with the same payload, so `__call__` may use collectives (all ranks enter them in
the same order); only rank 0's return value and stream events reach the caller.

    class Adder(DistributedWorker):
        def setup(self, scale=1.0):
            self.scale = scale

        def __call__(self, streaming=False, x=0.0):
            total = torch.tensor([x * self.scale], device=self.device)
            torch.distributed.all_reduce(total)
            if streaming:
                self.add_streaming_result({"partial": total.item()})
            return {"sum": total.item()}

`worker_main` is the body of each spawned process: it initialises torch.distributed, builds the
worker and answers requests from the runner's socket until told to stop.
"""

from __future__ import annotations

import collections
import datetime
import faulthandler
import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import traceback
from dataclasses import dataclass
from typing import Any

import zmq

from ditmesh.runner import protocol


class DistributedWorker:
    """One rank of a `DistributedRunner`. Override `setup`, `__call__` and `teardown`.

    Do the expensive work (loading weights, `parallelize`) in `setup`, not in ``__init__``: the
    runner constructs the class with no arguments and `rank`, `world_size` and `device` are set
    before `setup` runs.
    """

    _rank: int = 0
    _world_size: int = 1
    _device: Any = None
    _channel: _Channel | None = None
    _request_id: int | None = None
    _streaming: bool = False
    _gloo_group: Any = None

    bind_device_at_init: bool = True
    """On CUDA, pass ``device_id`` to `init_process_group`, so NCCL binds this rank's GPU at once.
    A worker whose library makes its own NCCL groups with `new_group` and breaks on a bound
    default group (xDiT) sets it False; its device is still selected first."""

    def setup(self, **kwargs: Any) -> None:
        """Called once per rank with `DistributedRunner.start`'s keyword arguments."""

    def __call__(self, streaming: bool = False, **payload: Any) -> Any:
        """Serve one request; every rank gets the same `payload`. Rank 0's return value is the result.

        `streaming` is True when the caller used `DistributedRunner.stream`; then
        `add_streaming_result` delivers intermediate results.
        """
        raise NotImplementedError(f"{type(self).__name__} must define __call__(self, streaming=False, **payload)")

    def teardown(self) -> None:
        """Called once per rank when the runner stops (free memory, close files)."""

    @property
    def rank(self) -> int:
        """This process's global rank, 0 .. world_size - 1."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of worker processes."""
        return self._world_size

    @property
    def device(self) -> Any:
        """This rank's `torch.device`: ``cuda:<local rank>`` on GPUs, ``cpu`` otherwise."""
        return self._device

    def add_streaming_result(self, result: Any, image_format: str = "jpeg", as_text_event: bool = False) -> None:
        """Send `result` to the caller now, as an intermediate result of the current request.

        Only rank 0's events reach the caller: on other ranks, and in requests made with
        `invoke` (not `stream`), this does nothing, so every rank may call it unconditionally.
        In a ``stream(..., as_text_events=True)`` every event becomes an SSE frame in
        fal.distributed's shape (PIL images as JPEG quality 60 data URLs, or `image_format`
        ``"png"``/``"webp"``); ``as_text_event`` is accepted for fal code and only matters for
        `bytes`/`str` events: with False they pass through a text stream untouched (an SSE frame
        you formatted yourself). Without text events the caller gets `result` itself, exactly
        (images lossless). Raises `TypeError` if `result` cannot be pickled.
        """
        if self._rank != 0 or not self._streaming or self._channel is None:
            return
        meta = ("event", self._request_id, self._rank, as_text_event, image_format)
        self._channel.send(meta, protocol.encode(result))

    def add_streaming_error(self, error: BaseException) -> None:
        """Send ``{"error": str(error)}`` to a `stream` caller as an event (fal.distributed's form);
        the request carries on. To end it with an error, raise: the caller gets a `RemoteError`."""
        self.add_streaming_result({"error": str(error)}, as_text_event=True)

    def rank_print(self, message: Any, debug: bool = False) -> None:
        """``print`` with a ``[rank N]`` prefix (``[debug] [rank N]`` when `debug`), flushed at once."""
        prefix = "[debug] " if debug else ""
        print(f"{prefix}[rank {self._rank}] {message}", flush=True)

    def cancel_requested(self, group: Any = None) -> bool:
        """Whether the caller has given up the current request: it cancelled or timed out its
        `invoke`, or left its `stream` early. Check it between units of work (e.g. after each
        denoising step) and stop there, by raising `RequestCancelled`, so the ranks move on to the
        next request instead of finishing one nobody waits for.

        A collective over `group` (default: all ranks): every rank of it must call it at the same
        points of a request, and every rank gets the same answer (the ranks' local flags are
        max-reduced), so all of them stop at the same point and no collective is left half-entered.
        Where ranks do different work (an idle data group runs no denoising steps), pass a gloo
        group of the ranks that step together (`torch.distributed.new_subgroups_by_enumeration`,
        made on every rank in `setup`): a rank that never reaches the check must not be in it.
        The reduction is one number on a CPU (gloo) group: it never synchronises a GPU. Outside a
        request it is False and communicates nothing.
        """
        if self._channel is None or self._request_id is None:
            return False
        local = self._channel.was_cancelled(self._request_id)
        if self._world_size == 1:
            return local
        group = self._cancel_group() if group is None else group
        if group.size() == 1:
            return local
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(local)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def _cancel_group(self) -> Any:
        """A gloo group over all ranks, its own (also where the default group is gloo, so CPU runs
        take the path GPU runs take), made at the first `cancel_requested`: every rank is at the
        same call then, as `new_group` needs."""
        import torch.distributed as dist

        if self._gloo_group is None:
            self._gloo_group = dist.new_group(backend="gloo")
        return self._gloo_group


class _Channel:
    """The worker's end of the runner's socket (a DEALER whose identity is the rank).

    The runner sends ``call`` and ``stop`` messages, served in order, and ``cancel`` messages,
    which are noted as they arrive: a blocking `recv` notes them while idle, `was_cancelled`
    reads whatever has arrived (without waiting) while a request runs and keeps the calls it
    finds for `recv`.
    """

    def __init__(self, address: str, rank: int):
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.IDENTITY, rank_identity(rank))
        self._socket.setsockopt(zmq.SNDHWM, 0)  # never drop a result
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.connect(address)
        self._lock = threading.Lock()  # user code may stream from its own threads
        self._pending: collections.deque = collections.deque()  # calls read early by was_cancelled
        self._cancelled: set[int] = set()
        self._finished = -1  # the last request id served: later cancels of it are dropped

    def send(self, meta: tuple, body: protocol.Frames | None = None) -> None:
        frames = protocol.pack(meta, body)
        big = sum(memoryview(frame).nbytes for frame in frames) > 65536
        with self._lock:
            self._socket.send_multipart(frames, copy=not big)

    def recv(self) -> tuple[tuple, protocol.Frames]:
        """The next call or stop message; blocks (no polling) until there is one."""
        while not self._pending:
            self._note(protocol.unpack(self._socket.recv_multipart(copy=False)))
        return self._pending.popleft()

    def was_cancelled(self, request_id: int) -> bool:
        """Whether a cancel of `request_id` has arrived; reads what is waiting, never blocks."""
        while True:  # one non-blocking read per waiting message, then back to work: no polling loop
            try:
                frames = self._socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return request_id in self._cancelled
            self._note(protocol.unpack(frames))

    def finished(self, request_id: int) -> None:
        self._finished = request_id
        self._cancelled.discard(request_id)

    def _note(self, message: tuple[tuple, protocol.Frames]) -> None:
        meta = message[0]
        if meta[0] != "cancel":
            self._pending.append(message)
        elif meta[1] > self._finished:  # request ids increase: an older one has ended here
            self._cancelled.add(meta[1])

    def close(self) -> None:
        self._socket.close(linger=1000)  # let the last replies out, but never block exit for long
        self._context.term()


def rank_identity(rank: int) -> bytes:
    """The ZMQ routing identity of a rank's socket."""
    return b"rank-%d" % rank


@dataclass(frozen=True)
class WorkerSpec:
    """What a spawned process needs to become rank `rank` (all picklable, no torch objects)."""

    worker_module: str
    worker_qualname: str
    world_size: int
    address: str
    store_addr: str
    store_port: int
    device_type: str
    num_threads: int
    setup_kwargs: bytes
    pg_timeout: float | None  # seconds: torch.distributed's process-group timeout (fal's `timeout`); None: torch's
    cwd: str | None  # the worker's working directory (None: the runner's)
    stack_dir: str  # where each rank's faulthandler writes its stack when asked (see `stack_path`)


def stack_path(stack_dir: str, rank: int) -> str:
    """The file rank `rank` appends its Python stacks to on `STACK_SIGNAL`."""
    return os.path.join(stack_dir, f"stack-rank{rank}.txt")


STACK_SIGNAL = signal.SIGUSR1
"""The signal on which a worker dumps every thread's Python stack (the runner sends it to ranks
that do not finish: the stack says which collective they wait in)."""


def worker_main(rank: int, spec: WorkerSpec) -> None:
    """Body of a worker process: connect, set up, serve requests until ``stop``."""
    if spec.cwd is not None:
        os.chdir(spec.cwd)
    _install_signal_handlers(stack_path(spec.stack_dir, rank))
    _exit_with_parent()
    channel = _Channel(spec.address, rank)
    worker = _set_up(rank, spec, channel)
    try:
        if worker is not None:
            _serve(worker, channel)
        else:
            _wait_for_stop(channel)  # setup failed: the runner has the error and will stop us
    finally:
        if worker is not None:
            _tear_down(worker)
        channel.close()


def _install_signal_handlers(stack_file: str) -> None:
    # Ctrl-C reaches every process of the terminal's group: the runner owns shutdown, so workers
    # ignore SIGINT; SIGTERM (stop() after its grace period) unwinds through teardown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    # faulthandler writes from the C signal handler: it works while the main thread blocks inside
    # a collective (gloo/NCCL wait in C++ without returning to the interpreter). Append mode: the
    # runner reads what each dump adds. The file stays open for the life of the process.
    faulthandler.register(STACK_SIGNAL, file=open(stack_file, "a"), all_threads=True, chain=False)


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _exit_with_parent() -> None:
    """If the runner's process dies (even by SIGKILL), exit instead of lingering as an orphan."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])  # blocks until the parent is gone
        os._exit(70)

    threading.Thread(target=watch, name="ditmesh-parent-watch", daemon=True).start()


def _set_up(rank: int, spec: WorkerSpec, channel: _Channel) -> DistributedWorker | None:
    """Initialise torch.distributed, build the worker, run its setup; report ready or the error."""
    try:
        worker_cls = _import_worker_class(spec.worker_module, spec.worker_qualname)
        device = _init_distributed(rank, spec, bind_device=worker_cls.bind_device_at_init)
        worker = worker_cls()
        worker._rank, worker._world_size, worker._device, worker._channel = rank, spec.world_size, device, channel
        worker.setup(**protocol.decode([spec.setup_kwargs]))
    except Exception as exc:
        channel.send(("setup_error", 0, rank), protocol.encode(protocol.error_info(exc, traceback.format_exc())))
        return None
    channel.send(("ready", 0, rank))
    return worker


def _init_distributed(rank: int, spec: WorkerSpec, bind_device: bool = True) -> Any:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(spec.world_size),
                      LOCAL_WORLD_SIZE=str(spec.world_size), MASTER_ADDR=spec.store_addr,
                      MASTER_PORT=str(spec.store_port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(spec.num_threads)
    if spec.device_type == "cuda":
        device = torch.device("cuda", rank)  # one host: local rank == rank
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    store = dist.TCPStore(spec.store_addr, spec.store_port, is_master=False)  # served by the runner
    group = dict(store=store, rank=rank, world_size=spec.world_size)
    if spec.pg_timeout is not None:
        group["timeout"] = datetime.timedelta(seconds=spec.pg_timeout)
    if spec.device_type == "cuda":  # device_id: NCCL binds this rank's GPU now, not at the first collective
        dist.init_process_group("nccl", **(dict(device_id=device) if bind_device else {}), **group)
    else:
        if os.path.exists("/sys/class/net/lo"):  # one host: keep gloo's traffic on loopback
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", **group)
    return device


def _import_worker_class(module: str, qualname: str) -> type:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _serve(worker: DistributedWorker, channel: _Channel) -> None:
    """Answer requests in arrival order (the same on every rank, so collectives line up)."""
    while True:
        meta, body = channel.recv()
        if meta[0] == "stop":
            return
        _, request_id, streaming = meta
        _handle(worker, channel, request_id, streaming, body)


def _handle(worker: DistributedWorker, channel: _Channel, request_id: int, streaming: bool,
            body: protocol.Frames) -> None:
    """Run one request; an exception becomes an error reply and the loop carries on."""
    rank = worker.rank
    worker._request_id, worker._streaming = request_id, streaming
    try:
        payload = protocol.decode(body)
        result = worker(streaming=streaming, **payload)
        # Only rank 0's result is returned; the other ranks acknowledge (saves copying N results).
        reply = protocol.encode(result if rank == 0 else None)
    except Exception as exc:
        error = protocol.error_info(exc, traceback.format_exc())
        channel.send(("error", request_id, rank), protocol.encode(error))
    else:
        channel.send(("result", request_id, rank), reply)
    finally:
        worker._request_id, worker._streaming = None, False
        channel.finished(request_id)


def _wait_for_stop(channel: _Channel) -> None:
    while channel.recv()[0][0] != "stop":
        pass


def _tear_down(worker: DistributedWorker) -> None:
    try:
        worker.teardown()
    except Exception:
        print(f"[rank {worker.rank}] teardown failed:\n{traceback.format_exc()}", flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
