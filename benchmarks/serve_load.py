"""Load on `ditmesh serve`: N concurrent loopback HTTP clients for a bounded time, side by side with
the same requests made straight through `runner.invoke`, in one run.

    python benchmarks/serve_load.py                                   # 2 CPU ranks; 1, 4, 16 clients; 5 s each
    python benchmarks/serve_load.py --concurrency 1 8 --seconds 10 --world-size 2

The worker is a null one (an all_reduce of one number and a 64x64 image, no model), so the
difference between the two paths is what the server adds: HTTP and JSON, validation, the FIFO
queue, PNG + base64 encoding of the image, and the client's own cost (httpx). The server runs in
a subprocess of this script (its own event loop and ranks, as `ditmesh serve` runs); the direct
runner and every client run here. At one client nothing queues, so the p50 difference is the
per-request overhead; with more clients the server runs one request at a time on the mesh while
direct `invoke`s overlap on the ranks' sockets, so throughput shows what that order costs.
"in-server" is the server's own time per request from its timings (total - queued - mesh). "bare"
is a route on the same server with the same body model that answers a fixed body of the same
size without the runner: what FastAPI + uvicorn + httpx cost on this host by themselves;
"bare+invoke" is that route calling `runner.invoke` first (no queue, checks, encoding, metrics):
the full route minus it is ditmesh's own handling.
"CPU ms/req" is the CPU time per request of the process calling the runner (this script for
`invoke`, the server process for HTTP; from /proc, so it holds on a loaded machine where
latencies do not).
Prints a table; writes benchmarks/results/serve_load_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from ditmesh import DistributedRunner, DistributedWorker
from ditmesh.serve.schema import GenerationRequest  # module level: FastAPI resolves /bare's annotation here

RESULTS = Path(__file__).parent / "results"
PATH = "/v1/images/generations"
REQUEST = {"prompt": "a cat", "height": 64, "width": 64, "steps": 2, "seed": 0}


class NullWorker(DistributedWorker):
    """Answers `DiffusionWorker`'s contract at once: one all_reduce, a fixed 64x64 image."""

    def setup(self) -> None:
        self.image = Image.new("RGB", (64, 64), (12, 34, 56))

    def __call__(self, streaming: bool = False, describe: bool = False, steps: int = 2, seed: int = 0,
                 **ignored: object) -> dict | None:
        if describe:
            return {"model": "null", "family": "null", "size_multiple": 8, "default_size": 64, "parallel": "null"}
        total = torch.ones(1)
        dist.all_reduce(total)
        for step in range(steps):
            self.add_streaming_result({"step": step + 1, "of": steps})
        return {"images": [self.image], "seed": seed, "seconds": 0.0} if self.rank == 0 else None


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in samples_s)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {"p50_ms": round(statistics.median(ms), 3), "p99_ms": round(p99, 3), "n": len(ms)}


async def closed_loop(call, clients: int, seconds: float) -> tuple[list[float], float, list]:
    """`clients` tasks each calling `call()` back to back until `seconds` pass: latencies, wall time, results."""
    latencies, results = [], []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            results.append(await call())
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - started, results


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def direct_row(runner: DistributedRunner, clients: int, seconds: float) -> dict:
    payload = GenerationRequest.model_validate(REQUEST).payload(seed=0, streaming=False)
    cpu = cpu_seconds(os.getpid())
    latencies, wall, _ = await closed_loop(lambda: runner.invoke(payload), clients, seconds)
    cpu_ms = (cpu_seconds(os.getpid()) - cpu) * 1e3 / len(latencies)
    return {"rps": round(len(latencies) / wall, 1), **percentiles(latencies), "caller_cpu_ms": round(cpu_ms, 3)}


async def http_row(url: str, path: str, clients: int, seconds: float, server_pid: int) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=clients)) as client:

        async def call() -> dict:
            response = await client.post(path, json=REQUEST)
            response.raise_for_status()
            return response.json().get("timings")

        await closed_loop(call, clients, 0.5)  # warm up the connections
        cpu = cpu_seconds(server_pid)
        latencies, wall, timings = await closed_loop(call, clients, seconds)
        cpu_ms = (cpu_seconds(server_pid) - cpu) * 1e3 / len(latencies)
    row = {"rps": round(len(latencies) / wall, 1), **percentiles(latencies), "server_cpu_ms": round(cpu_ms, 3)}
    if timings[0] is not None:
        in_server = [t["total_s"] - t["queued_s"] - t["mesh_s"] for t in timings]
        row["in_server_p50_ms"] = round(statistics.median(in_server) * 1e3, 3)
    return row


def start_server(world_size: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, "--role", "server", "--world-size", str(world_size)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if match := re.search(r"ready on (http://\S+)", line):
            return proc, match.group(1)
        print(line, end="")
    raise RuntimeError("the server exited before it was ready")


def serve(world_size: int) -> None:
    """The server process: `ditmesh serve`'s app on the null worker, plus ``POST /bare`` (the same
    body model, a fixed answer of the same size, no runner): FastAPI + uvicorn + httpx on their own."""
    import uvicorn
    from fastapi import Response

    from ditmesh.serve import ServeSettings, create_app
    from ditmesh.serve.app import encode_images
    from ditmesh.serve.server import listen

    sock = listen("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    runner = DistributedRunner(NullWorker, world_size, device_type="cpu", num_threads=1)
    app = create_app(runner, {}, ServeSettings(max_queue=4096),
                     on_ready=lambda info: print(f"ready on {url}", flush=True))
    answer = json.dumps({"images": encode_images([Image.new("RGB", (64, 64), (12, 34, 56))], "png"), "seed": 0})

    async def bare(body: GenerationRequest) -> Response:
        return Response(answer, media_type="application/json")

    async def bare_invoke(body: GenerationRequest) -> Response:
        await runner.invoke(body.payload(seed=0, streaming=False))
        return Response(answer, media_type="application/json")

    app.add_api_route("/bare", bare, methods=["POST"])
    app.add_api_route("/bare-invoke", bare_invoke, methods=["POST"])
    uvicorn.Server(uvicorn.Config(app, log_level="warning", loop="asyncio")).run(sockets=[sock])


async def measure(world_size: int, concurrency: list[int], seconds: float, url: str, server_pid: int) -> list[dict]:
    rows = []
    async with DistributedRunner(NullWorker, world_size, device_type="cpu", num_threads=1) as runner:
        await runner.start()
        await direct_row(runner, 1, 0.5)  # warm up
        for clients in concurrency:
            direct = await direct_row(runner, clients, seconds)
            http = await http_row(url, PATH, clients, seconds, server_pid)
            bare = await http_row(url, "/bare", clients, seconds, server_pid)
            bare_invoke = await http_row(url, "/bare-invoke", clients, seconds, server_pid)
            rows.append({"clients": clients, "invoke": direct, "http": http, "bare_fastapi": bare,
                         "bare_fastapi_invoke": bare_invoke,
                         "overhead_p50_ms": round(http["p50_ms"] - direct["p50_ms"], 3)})
            print(f"  {clients} client(s): invoke p50 {direct['p50_ms']} ms, http p50 {http['p50_ms']} ms", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| clients | invoke req/s | invoke p50 / p99 ms | HTTP req/s | HTTP p50 / p99 ms | added p50 ms "
             "| in-server p50 ms | bare / bare+invoke p50 ms | CPU ms/req: caller; server, bare, bare+invoke |",
             "|" + " --- |" * 9]
    for row in rows:
        d, h, b, bi = row["invoke"], row["http"], row["bare_fastapi"], row["bare_fastapi_invoke"]
        lines.append(f"| {row['clients']} | {d['rps']} | {d['p50_ms']} / {d['p99_ms']} | {h['rps']} "
                     f"| {h['p50_ms']} / {h['p99_ms']} | {row['overhead_p50_ms']} | {h['in_server_p50_ms']} "
                     f"| {b['p50_ms']} / {bi['p50_ms']} | {d['caller_cpu_ms']}; {h['server_cpu_ms']}, "
                     f"{b['server_cpu_ms']}, {bi['server_cpu_ms']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=5.0, help="per row and path")
    parser.add_argument("--out", default=str(RESULTS / "serve_load_cpu"), help="writes OUT.json and OUT.md")
    parser.add_argument("--role", choices=("bench", "server"), default="bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "server":
        serve(args.world_size)
        return
    proc, url = start_server(args.world_size)
    try:
        rows = asyncio.run(measure(args.world_size, args.concurrency, args.seconds, url, proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    command = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    report = {"command": command.strip(), "world_size": args.world_size, "device": "cpu", "worker": "NullWorker",
              "request": REQUEST, "seconds_per_row": args.seconds, "cpu_count": os.cpu_count(),
              "load_avg_1min": os.getloadavg()[0], "python": platform.python_version(), "torch": torch.__version__,
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    summary = (f"# serve_load: `ditmesh serve` vs `runner.invoke`\n\n`{report['command']}` — {args.world_size} CPU "
               f"ranks, null worker, 64x64 PNG, {args.seconds} s per row, {report['cpu_count']} cores, load "
               f"{report['load_avg_1min']:.1f}, {report['date_utc']}\n\n{table(rows)}\n")
    out.with_suffix(".md").write_text(summary)
    print(table(rows))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
