"""Worker classes for tests/test_runner.py (module level: the spawned worker processes import them)."""

from __future__ import annotations

import os
import threading
import time

import torch
import torch.distributed as dist

from ditmesh import DistributedWorker, RequestCancelled


class EchoWorker(DistributedWorker):
    """Sums ``x * scale * (rank + 1)`` over ranks with an all_reduce; payload keys switch on
    streaming extras and faults."""

    def setup(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.calls = 0
        self.history: list[tuple[str, float, float]] = []  # (kind, start, end) in CLOCK_MONOTONIC s

    def __call__(self, streaming: bool = False, x: float = 0.0, steps: int = 0, echo: object = None,
                 raw_event: bytes | None = None, return_lock: bool = False,
                 fail_rank: int | None = None, fail_before_collective_rank: int | None = None,
                 die_rank: int | None = None, sleep: float = 0.0, return_early_rank: int | None = None,
                 slow_rank: int | None = None, slow: float = 0.0, stream_sleep: float = 0.0,
                 keepalive: bool = False, history: bool = False) -> object:
        if keepalive:  # the runner's keep-alive payload: note when it came
            self.history.append(("keepalive", time.monotonic(), time.monotonic()))
            return None
        if history:
            return {"history": list(self.history), "cwd": os.getcwd(), "pg_timeout_s": _pg_timeout_s()}
        started = time.monotonic()
        self.calls += 1
        if die_rank == self.rank:
            os._exit(3)
        if fail_before_collective_rank == self.rank:
            raise ValueError(f"rank {self.rank} refuses to join the all_reduce")
        if return_early_rank == self.rank:
            return None  # returns normally; the other ranks wait in the all_reduce below for ever
        if sleep:
            time.sleep(sleep)
        total = torch.tensor([x * self.scale * (self.rank + 1)], device=self.device)
        dist.all_reduce(total)  # the other ranks wait here for a rank that raised above
        if slow_rank == self.rank:
            time.sleep(slow)  # healthy, just slow: e.g. rank 0 encoding images after the last collective
        if stream_sleep:
            self.add_streaming_result({"first": True}, as_text_event=True)
            time.sleep(stream_sleep)
        self.history.append(("call", started, time.monotonic()))
        for step in range(steps):
            self.add_streaming_result({"step": step, "rank": self.rank, "t_ns": time.perf_counter_ns()})
        if echo is not None:
            self.add_streaming_result(echo, as_text_event=True)
        if raw_event is not None:
            self.add_streaming_result(raw_event, as_text_event=False)
        if fail_rank == self.rank:
            raise ValueError(f"boom on rank {self.rank}")
        if return_lock:
            if streaming:
                self.add_streaming_result(threading.Lock())  # raises TypeError in this rank
            return threading.Lock()
        return {"sum": total.item(), "world_size": self.world_size, "streaming": streaming,
                "calls": self.calls, "echo": echo, "pid": os.getpid(), "threads": torch.get_num_threads()}


def _pg_timeout_s() -> float:
    """The default process group's timeout, in seconds, as this rank's torch.distributed holds it."""
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    return backend.options._timeout.total_seconds()


class FailingSetupWorker(DistributedWorker):
    """setup() raises on rank 1 (rank 0 waits in a barrier that rank 1 never reaches)."""

    def setup(self, **kwargs: object) -> None:
        if self.rank == 1:
            raise KeyError("missing weights")
        dist.barrier()

    def __call__(self, streaming: bool = False) -> None:
        return None


class CudaWorker(DistributedWorker):
    """All-reduces a bf16 CUDA tensor over NCCL; returns and streams it still on the GPU."""

    def __call__(self, streaming: bool = False) -> dict:
        tensor = torch.full((4,), float(self.rank + 1), device=self.device, dtype=torch.bfloat16)
        dist.all_reduce(tensor)
        self.add_streaming_result({"tensor": tensor})
        return {"backend": dist.get_backend(), "device": str(self.device),
                "current_device": torch.cuda.current_device(), "tensor": tensor}


class StepsWorker(DistributedWorker):
    """Runs up to `steps` collective steps, checking `cancel_requested` after each, as a denoising
    loop does; ``report=True`` answers how many steps every rank ran in the previous request and
    how many step requests it has started."""

    def setup(self) -> None:
        self.ran = 0
        self.started = 0

    def __call__(self, streaming: bool = False, steps: int = 0, report: bool = False) -> object:
        if report:
            counts = [None] * self.world_size
            dist.all_gather_object(counts, self.ran)
            return {"ran": counts, "started": self.started}
        self.started += 1
        self.ran = 0
        for step in range(steps):
            total = torch.ones(1)
            dist.all_reduce(total)  # a rank that stopped a step early would leave the others here
            self.ran = step + 1
            self.add_streaming_result({"step": step})
            if self.cancel_requested():
                raise RequestCancelled(f"stopped after step {step + 1}")
        return {"ran": self.ran}
