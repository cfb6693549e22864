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
import socket
import traceback
from typing import Any, Callable

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
        ctx = mp.get_context("spawn")
        port = free_port()
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_rank_main, args=(rank, self.world_size, port, child, self._threads), daemon=True)
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
