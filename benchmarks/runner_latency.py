"""Runner overhead: invoke round trip, first-stream-event latency, image result round trip.

    python benchmarks/runner_latency.py                      # 2 CPU workers, 200 calls each
    python benchmarks/runner_latency.py --world-size 4 --calls 500

The worker does no work, so the numbers are the runner's own cost (serialize, ZMQ over ipc,
route the replies of every rank). Stream latency is measured from the worker's
``add_streaming_result`` call (a `time.perf_counter_ns` stamp inside the event; CLOCK_MONOTONIC,
shared by all processes of the machine) to the caller receiving the decoded event.
Prints a table and writes benchmarks/results/runner_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
from PIL import Image

from ditmesh import DistributedRunner, DistributedWorker

RESULTS = harness.RESULTS / "runner_latency"


class NullWorker(DistributedWorker):
    """Answers at once; in a stream, first sends one event stamped with the send time."""

    def setup(self) -> None:
        self.image = Image.new("RGB", (1024, 1024), (12, 34, 56))

    def __call__(self, streaming: bool = False, image: bool = False) -> dict:
        if streaming:
            self.add_streaming_result({"t_ns": time.perf_counter_ns()})
        return {"image": self.image} if image else {"ok": True}


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    return harness.percentiles(s / 1e6 for s in samples_ns)


async def time_invoke(runner: DistributedRunner, calls: int, payload: dict) -> list[int]:
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        await runner.invoke(payload)
        samples.append(time.perf_counter_ns() - start)
    return samples


async def time_first_event(runner: DistributedRunner, calls: int, as_text: bool) -> list[int]:
    samples = []
    for _ in range(calls):
        async for item in runner.stream({}, as_text_events=as_text):
            received = time.perf_counter_ns()
            sent = json.loads(item.removeprefix(b"data: "))["t_ns"] if as_text else item["t_ns"]
            samples.append(received - sent)
            break
    return samples


async def measure(world_size: int, calls: int, warmup: int) -> dict:
    async with DistributedRunner(NullWorker, world_size, device_type="cpu", num_threads=1) as runner:
        await time_invoke(runner, warmup, {})
        await time_first_event(runner, warmup, as_text=False)
        return {
            "invoke_round_trip": percentiles(await time_invoke(runner, calls, {})),
            "first_stream_event": percentiles(await time_first_event(runner, calls, as_text=False)),
            "first_stream_event_sse": percentiles(await time_first_event(runner, calls, as_text=True)),
            "invoke_1024px_rgb_image": percentiles(await time_invoke(runner, max(20, calls // 4), {"image": True})),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    results = asyncio.run(measure(args.world_size, args.calls, args.warmup))
    print(f"DistributedRunner overhead, {args.world_size} CPU workers, {args.calls} calls (ms)")
    print(f"{'measurement':<26}{'p50':>9}{'p99':>9}{'mean':>9}")
    for name, row in results.items():
        print(f"{name:<26}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}{row['mean_ms']:>9.3f}")
    harness.write_results(RESULTS, {
        "command": f"python benchmarks/runner_latency.py --world-size {args.world_size} --calls {args.calls}",
        "world_size": args.world_size, "device": "cpu", **harness.host_env(), "results": results})
    print(f"wrote {RESULTS}.json")


if __name__ == "__main__":
    main()
