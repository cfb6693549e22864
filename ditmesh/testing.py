"""Run a function on N gloo ranks: the harness every multi-rank test uses.

`RankPool(n)` spawns n processes once, initialises torch.distributed (gloo, loopback) in each,
and then runs any picklable module-level function on all of them, returning each rank's result.
Spawning costs seconds (each process imports torch); a pool is reused across test cases.

    with RankPool(4) as pool:
        outs = pool.run(my_check, arg)   # my_check(arg) runs on ranks 0..3; outs[r] is rank r's return
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import queue
import socket
import threading
import traceback
from typing import Any, Callable

from ditmesh.runner import procs

_ERROR_GRACE_S = 10.0  # after one rank fails, how long the others get before they are deemed stuck


class RankError(RuntimeError):
    """A function failed on a rank; carries the rank and its remote traceback."""

    def __init__(self, rank: int, remote_traceback: str):
        super().__init__(f"rank {rank} failed:\n{remote_traceback}")
        self.rank = rank
        self.remote_traceback = remote_traceback


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, conn: mpc.Connection, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    if os.path.exists("/sys/class/net/lo"):  # one host: keep gloo's traffic on loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        while True:
            job = conn.recv()
            if job is None:
                break
            fn, args, kwargs = job
            try:
                result = (True, fn(*args, **kwargs))
            except BaseException:  # noqa: BLE001 - report everything to the parent
                result = (False, traceback.format_exc())
            _release_groups()  # before replying: the next job must not start beside the old groups
            conn.send(result)
    finally:
        dist.destroy_process_group()


def _release_groups() -> None:
    """Destroy the process groups a job created (its meshes), keeping the world group.

    Every gloo group owns threads (two workers and a transport loop that wakes constantly). A
    pool that kept the groups of every test would hold thousands of threads per rank, and
    their wake-ups would take the cores from the tests (most of a 2-core host's time in the
    kernel). The groups' threads end when their objects are freed: collect the cycles that hold
    them, then freeze what survives, so the next collection scans only the next job's objects.

    DTensor caches sharding decisions keyed by `DeviceMesh`, and meshes compare equal by layout
    alone, so a later job's mesh of the same layout would be handed the destroyed one's groups:
    those caches are cleared too.
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d
    from torch.distributed.tensor import debug as dtensor_debug

    for group in list(c10d._world.pg_map):
        if group is not c10d.GroupMember.WORLD:
            dist.destroy_process_group(group)
    dtensor_debug._clear_sharding_prop_cache()
    gc.collect()
    gc.freeze()


class RankPool:
    """`world_size` spawned processes with a gloo process group, reused across `run` calls."""

    def __init__(self, world_size: int, threads: int = 1):
        self.world_size = world_size
        self._threads = threads
        self._procs: list[mp.Process] = []
        self._conns: list[mpc.Connection] = []
        self._start()

    def _start(self) -> None:
        ctx = procs.context()
        port = free_port()
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = procs.process(ctx, _rank_main, (rank, self.world_size, port, child, self._threads), daemon=True)
            proc.start()
            self._procs.append(proc)
            self._conns.append(parent)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results indexed by rank.

        Raises `RankError` (lowest failing rank first) if any rank raised, `TimeoutError` if the
        ranks do not finish in `timeout` seconds. A pool whose ranks may be stuck in a collective
        is restarted before the error is raised, so the next `run` starts clean.
        """
        if not self._procs:
            self._start()
        for conn in self._conns:
            conn.send((fn, args, kwargs))
        results: dict[int, tuple[bool, Any]] = {}
        pending = dict(enumerate(self._conns))
        deadline = timeout
        while pending:
            ready = mpc.wait(list(pending.values()), timeout=deadline)
            if not ready:
                break
            for rank, conn in list(pending.items()):
                if conn in ready:
                    results[rank] = self._receive(rank, conn)
                    del pending[rank]
            if any(not ok for ok, _ in results.values()):
                deadline = _ERROR_GRACE_S  # the other ranks may be waiting in a collective forever
        if pending or self._dead():
            self.close(force=True)
        failed = sorted(rank for rank, (ok, _) in results.items() if not ok)
        if failed:
            raise RankError(failed[0], results[failed[0]][1])
        if pending:
            raise TimeoutError(f"ranks {sorted(pending)} did not finish {fn.__name__} within {timeout} s")
        return [results[rank][1] for rank in range(self.world_size)]

    def _receive(self, rank: int, conn: mpc.Connection) -> tuple[bool, Any]:
        try:
            return conn.recv()
        except EOFError:
            self._procs[rank].join(timeout=5)
            code = self._procs[rank].exitcode
            return False, f"rank {rank} process died (exit code {code})"

    def _dead(self) -> bool:
        return any(not proc.is_alive() for proc in self._procs)

    def close(self, force: bool = False) -> None:
        """Stop the processes: cleanly if they are idle, killed if `force` or they do not stop."""
        if force:
            for proc in self._procs:
                proc.kill()
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._procs, self._conns = [], []

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
    """One-off: spawn `world_size` gloo ranks, run ``fn(*args, **kwargs)`` on each, return the results."""
    with RankPool(world_size) as pool:
        return pool.run(fn, *args, timeout=timeout, **kwargs)


# ---- NCCL's P2P ordering, enforced on gloo --------------------------------------------------


class NcclOrderDeadlock(RuntimeError):
    """A P2P wait that `NcclOrder`'s rules never let finish: this order would hang on NCCL."""


class NcclOrder:
    """Run gloo P2P calls under ProcessGroupNCCL's ordering rules, so that an order which would
    hang on GPUs hangs here too, and fails after `timeout` seconds naming the stuck batch.

        with NcclOrder(timeout=10.0) as order:   # in a rank function, around the code under test
            ...                                  # dist.batch_isend_irecv / dist.isend / dist.irecv
        order.log                                # every batch this rank posted, per stream

    gloo runs each operation on its own and matches it by tag, so any order of posts completes.
    NCCL does not; the rules modelled (read from ProcessGroupNCCL):

    - Each communicator has one stream per device: its batches run one at a time, in the order
      posted, and a batch ends only when each of its operations has met the peer's matching one.
      (gloo's send waits for the receiver too: its TCP pair transmits only once the receive is
      announced.) So a receive posted ahead of a send on one stream blocks that send.
    - `batch_isend_irecv` on a group is one batch on the group's communicator: a matched
      exchange inside one batch cannot block itself.
    - A lone isend/irecv is a batch of one on a two-rank communicator of (group, peer pair),
      made at its first use: a blocking rendezvous with the peer, on the host.
    - `device=True` (the default): one queue for all of the rank's communicators. NCCL warns that
      operations on different communicators must be posted in the same order on every rank: their
      kernels can serialise on the device, and any CUDA call that synchronises the device while one
      of them spins waits for it (a cudaFree, an allocation inside NCCL). `device=False` keeps one
      stream per communicator only.

    A work's `wait()` blocks the host here; NCCL's blocks the compute stream instead, which gives
    everything posted after it the same dependency. Collectives are not routed through the
    queues: keep P2P batches from being pending across collectives, or check those by hand.
    """

    _NAMES = ("isend", "irecv", "batch_isend_irecv")
    _HANDSHAKE_TAG = 1 << 20

    def __init__(self, timeout: float = 10.0, device: bool = True):
        self.timeout = timeout
        self.device = device
        self.log: dict[str, list[str]] = {}
        self._streams: dict[Any, _Stream] = {}
        self._paired: set[tuple[str, int]] = set()
        self._saved: dict[str, tuple[Any, Any]] = {}

    def __enter__(self) -> NcclOrder:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        self._original = {name: getattr(c10d, name) for name in self._NAMES}
        wrappers = {"isend": self._lone_isend, "irecv": self._lone_irecv, "batch_isend_irecv": self._batch}
        for name in self._NAMES:
            self._saved[name] = (getattr(c10d, name), getattr(dist, name))
            # Both names: P2POp checks its op against c10d's, callers use torch.distributed's.
            setattr(c10d, name, wrappers[name])
            setattr(dist, name, wrappers[name])
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        for name, (c10d_fn, dist_fn) in self._saved.items():
            setattr(c10d, name, c10d_fn)
            setattr(dist, name, dist_fn)
        for stream in self._streams.values():
            stream.stop()

    # -- the three entry points --

    def _lone_isend(self, tensor, dst=None, group=None, tag=0, group_dst=None):
        return self._lone("send", tensor, dst, group, tag, group_dst)

    def _lone_irecv(self, tensor, src=None, group=None, tag=0, group_src=None):
        return self._lone("recv", tensor, src, group, tag, group_src)

    def _lone(self, kind: str, tensor, peer, group, tag, group_peer):
        from torch.distributed import distributed_c10d as c10d

        group = group or c10d._get_default_group()
        peer = peer if group_peer is None else c10d.get_global_rank(group, group_peer)
        self._rendezvous(group, peer)
        key = "device" if self.device else f"{group.group_name}:pair{sorted((c10d.get_rank(), peer))}"
        return self._post(key, [(kind, tensor, peer, group, tag)])[0]

    def _batch(self, p2p_op_list):
        from torch.distributed import distributed_c10d as c10d

        group = p2p_op_list[0].group or c10d._get_default_group()
        sends = (self._lone_isend, self._original["isend"])  # P2POps made inside or outside the checker
        ops = [("send" if p.op in sends else "recv", p.tensor, p.peer, group, p.tag) for p in p2p_op_list]
        return self._post("device" if self.device else group.group_name, ops)

    # -- streams --

    def _rendezvous(self, group, peer: int) -> None:
        """A lone P2P call's first use of a peer pair makes its communicator: both ranks must meet."""
        if (group.group_name, peer) in self._paired:
            return
        self._paired.add((group.group_name, peer))
        import torch

        token, inbox = torch.zeros(1), torch.empty(1)
        works = [self._original["isend"](token, peer, group, self._HANDSHAKE_TAG),
                 self._original["irecv"](inbox, peer, group, self._HANDSHAKE_TAG)]
        for work in works:
            if not _wait_gloo(work, self.timeout):
                raise NcclOrderDeadlock(
                    f"a lone P2P call's first use of the pair with rank {peer} on group {group.group_name} waited "
                    f"{self.timeout} s for the peer to make the same two-rank communicator (it is making another)")

    def _post(self, key, ops: list) -> list[_CheckedWork]:
        stream = self._streams.get(key)
        if stream is None:
            # The stream gives up a little after the host's wait, so a stuck test ends promptly.
            stream = self._streams[key] = _Stream(str(key), self._original, self.timeout + 1.0)
        batch = _Batch(ops, len(self.log.setdefault(str(key), [])))
        self.log[str(key)].append(batch.describe())
        stream.queue.put(batch)
        return [_CheckedWork(batch, stream, self.timeout) for _ in ops]


class _Batch:
    """P2P operations posted together: (kind, tensor, peer, group, tag) each."""

    def __init__(self, ops: list, index: int):
        self.ops, self.index = ops, index
        self.done = threading.Event()
        self.error: BaseException | None = None

    def describe(self) -> str:
        parts = [f"{kind} {'->' if kind == 'send' else '<-'} {peer} ({group.group_name}, tag {tag}, {tuple(tensor.shape)})"
                 for kind, tensor, peer, group, tag in self.ops]
        return f"#{self.index} [" + ", ".join(parts) + "]"


class _Stream:
    """One NCCL stream as a thread: runs its batches one at a time, in the order posted."""

    def __init__(self, name: str, original: dict, timeout: float):
        self.name, self._original, self._timeout = name, original, timeout
        self.queue: queue.Queue = queue.Queue()
        self.running: _Batch | None = None
        self._thread = threading.Thread(target=self._loop, name=f"nccl-order-{name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        broken: BaseException | None = None
        while (batch := self.queue.get()) is not None:
            self.running = batch
            if broken is None:
                try:
                    self._run(batch)
                except BaseException as error:  # noqa: BLE001 - the stream is stuck; later batches fail too
                    broken = error
            batch.error = broken
            batch.done.set()
        self.running = None

    def _run(self, batch: _Batch) -> None:
        post = {"send": self._original["isend"], "recv": self._original["irecv"]}
        works = [post[kind](tensor, peer, group, tag) for kind, tensor, peer, group, tag in batch.ops]
        for work in works:
            if not _wait_gloo(work, self._timeout):
                raise NcclOrderDeadlock(f"batch {batch.describe()} never matched")

    def stop(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=self._timeout + 1.0)


class _CheckedWork:
    """What the wrappers return in place of gloo's work: done when its batch has run."""

    def __init__(self, batch: _Batch, stream: _Stream, timeout: float):
        self._batch, self._stream, self._timeout = batch, stream, timeout

    def wait(self, timeout: Any = None) -> bool:
        if not self._batch.done.wait(self._timeout):
            running = self._stream.running
            raise NcclOrderDeadlock(
                f"batch {self._batch.describe()} on stream {self._stream.name} did not complete in {self._timeout} s "
                f"(the stream is stuck at batch {running.describe() if running else '?'}): under NCCL's in-order "
                "rules this order hangs")
        if self._batch.error is not None:
            raise NcclOrderDeadlock(f"batch {self._batch.describe()} failed: the stream was stuck") from self._batch.error
        return True

    def is_completed(self) -> bool:
        return self._batch.done.is_set()


def _wait_gloo(work: Any, timeout: float) -> bool:
    """Wait for a gloo work up to `timeout` s; False if it timed out (gloo then closes the pair)."""
    from datetime import timedelta

    try:
        work.wait(timedelta(seconds=timeout))
    except RuntimeError as error:
        if "timed out" in str(error).lower() or "timeout" in str(error).lower():
            return False
        raise
    return True
