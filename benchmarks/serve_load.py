"""Load on `ditmesh serve`: N concurrent loopback HTTP clients for a bounded time, side by side with
the same requests made straight through `runner.invoke`, in one run.

    python benchmarks/serve_load.py                                   # 2 CPU ranks; 1, 4, 16 clients; 5 s each
    python benchmarks/serve_load.py --concurrency 1 8 --seconds 10 --world-size 2
    python benchmarks/serve_load.py --server-loops asyncio uvloop     # two servers, side by side

The worker is a null one (an all_reduce of one number and a 64x64 image, no model), so the
difference between the two paths is what the server adds: HTTP and JSON, validation, the FIFO
queue, PNG + base64 encoding of the image, and the client's own cost: "added" with httpx, "raw
client" with `RawClient`, a minimal keep-alive HTTP/1.1 client that leaves the client library's
cost out. The server runs in a subprocess of this script (its own event loop and ranks, as
`ditmesh serve` runs); the direct runner and every client run here. Every way of making the
request is measured in short bursts, interleaved round by round, so the drift of a shared machine
falls on all of them alike. At one client nothing queues, so the p50 difference is the
per-request overhead; with more clients the server runs one request at a time on the mesh while
direct `invoke`s overlap on the ranks' sockets, so throughput shows what that order costs.
"in-server" is the server's own time per request from its timings (total - queued - mesh), and
"invoke seen in server" its `timings.mesh_s` (the runner call inside the server). "bare"
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
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
import torch.distributed as dist
from PIL import Image

from ditmesh import DistributedRunner, DistributedWorker
from ditmesh.serve.schema import GenerationRequest  # module level: FastAPI resolves /bare's annotation here

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
    return harness.percentiles((s * 1e3 for s in samples_s), ndigits=3)


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


class Way:
    """One way of making the request, measured in bursts: latencies, wall time and CPU add up."""

    def __init__(self, name: str, call, pid: int):
        self.name, self.call, self.pid = name, call, pid
        self.latencies: list[float] = []
        self.results: list = []
        self.wall = self.cpu = 0.0

    async def burst(self, clients: int, seconds: float) -> None:
        cpu = cpu_seconds(self.pid)
        latencies, wall, results = await closed_loop(self.call, clients, seconds)
        self.cpu += cpu_seconds(self.pid) - cpu
        self.latencies += latencies
        self.results += results
        self.wall += wall

    def row(self, cpu_key: str) -> dict:
        row = {"rps": round(len(self.latencies) / self.wall, 1), **percentiles(self.latencies),
               cpu_key: round(self.cpu * 1e3 / len(self.latencies), 3)}
        if self.results and isinstance(self.results[0], dict) and "total_s" in self.results[0]:
            in_server = [t["total_s"] - t["queued_s"] - t["mesh_s"] for t in self.results]
            row["in_server_p50_ms"] = round(statistics.median(in_server) * 1e3, 3)
            row["mesh_p50_ms"] = round(statistics.median(t["mesh_s"] for t in self.results) * 1e3, 3)
        return row


def http_call(client, path: str):
    async def call() -> dict | None:
        response = await client.post(path, json=REQUEST)
        response.raise_for_status()
        return response.json().get("timings")

    return call


class RawClient:
    """A minimal HTTP/1.1 keep-alive client (one connection per concurrent caller): what a request
    costs the server without an HTTP library's own per-request work on the client's side."""

    def __init__(self, url: str, path: str):
        self.host, self.port = url.removeprefix("http://").rsplit(":", 1)
        body = json.dumps(REQUEST).encode()
        self.request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.idle: list = []

    async def __call__(self) -> dict | None:
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, int(self.port))
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        body = await reader.readexactly(length)
        self.idle.append((reader, writer))
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        return json.loads(body).get("timings")

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


def start_server(world_size: int, loop: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, "--role", "server", "--world-size", str(world_size),
                             "--loop", loop],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if match := re.search(r"ready on (http://\S+)", line):
            return proc, match.group(1)
        print(line, end="")
    raise RuntimeError("the server exited before it was ready")


def serve(world_size: int, loop: str) -> None:
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
    uvicorn.Server(uvicorn.Config(app, log_level="warning", loop=loop)).run(sockets=[sock])


async def measure(world_size: int, concurrency: list[int], seconds: float, rounds: int,
                  servers: dict[str, tuple[str, int]]) -> list[dict]:
    """Per concurrency: `rounds` rounds, each a burst of every way in turn (direct invoke, then each
    server's three routes; seconds / rounds each), so slow drifts of a shared machine fall on all
    ways alike. `servers`: server loop -> (url, pid). One row per server loop."""
    import httpx

    payload = GenerationRequest.model_validate(REQUEST).payload(seed=0, streaming=False)
    rows = []
    async with DistributedRunner(NullWorker, world_size, device_type="cpu", num_threads=1) as runner:
        await runner.start()
        for clients in concurrency:
            limits = httpx.Limits(max_connections=clients)
            clients_of = {loop: httpx.AsyncClient(base_url=url, timeout=60, limits=limits)
                          for loop, (url, _) in servers.items()}
            raw_of = {loop: RawClient(url, PATH) for loop, (url, _) in servers.items()}
            direct = Way("invoke", lambda: runner.invoke(payload), os.getpid())
            routes = {loop: [*(Way(route, http_call(clients_of[loop], route), pid)
                               for route in (PATH, "/bare", "/bare-invoke")), Way("raw", raw_of[loop], pid)]
                      for loop, (_, pid) in servers.items()}
            ways = [direct, *(way for group in routes.values() for way in group)]
            try:
                for way in ways:  # warm up: connections, first-call paths
                    await closed_loop(way.call, clients, 0.3)
                for _ in range(rounds):
                    for way in ways:
                        await way.burst(clients, seconds / rounds)
            finally:
                for client in clients_of.values():
                    await client.aclose()
                for raw in raw_of.values():
                    raw.close()
            invoke = direct.row("caller_cpu_ms")
            for loop, ways_of_server in routes.items():
                http, bare, bare_invoke, raw = (way.row("server_cpu_ms") for way in ways_of_server)
                rows.append({"clients": clients, "server_loop": loop, "invoke": invoke, "http": http,
                             "bare_fastapi": bare, "bare_fastapi_invoke": bare_invoke, "http_raw_client": raw,
                             "overhead_p50_ms": round(http["p50_ms"] - invoke["p50_ms"], 3),
                             "overhead_raw_client_p50_ms": round(raw["p50_ms"] - invoke["p50_ms"], 3)})
                print(f"  {clients} client(s), {loop} server: invoke p50 {invoke['p50_ms']} ms, http p50 "
                      f"{http['p50_ms']} ms", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| clients | server loop | invoke req/s | invoke p50 / p99 ms | HTTP req/s | HTTP p50 / p99 ms "
             "| added p50 ms | raw client: HTTP p50 ms, added | in-server p50 ms | invoke seen in server p50 ms "
             "| bare / bare+invoke p50 ms | CPU ms/req: caller; server, bare, bare+invoke |",
             "|" + " --- |" * 12]
    for row in rows:
        d, h, b, bi, r = (row[key] for key in ("invoke", "http", "bare_fastapi", "bare_fastapi_invoke",
                                                "http_raw_client"))
        lines.append(f"| {row['clients']} | {row['server_loop']} | {d['rps']} | {d['p50_ms']} / {d['p99_ms']} "
                     f"| {h['rps']} | {h['p50_ms']} / {h['p99_ms']} | {row['overhead_p50_ms']} "
                     f"| {r['p50_ms']}, {row['overhead_raw_client_p50_ms']} | {h['in_server_p50_ms']} "
                     f"| {h['mesh_p50_ms']} | {b['p50_ms']} / {bi['p50_ms']} | {d['caller_cpu_ms']}; "
                     f"{h['server_cpu_ms']}, {b['server_cpu_ms']}, {bi['server_cpu_ms']} |")
    return "\n".join(lines)


def resolve(loop: str) -> str:
    """auto -> uvloop when installed (as uvicorn's loop="auto" picks), else asyncio."""
    if loop != "auto":
        return loop
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def uvloop_new_loop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=5.0, help="per row and path")
    parser.add_argument("--rounds", type=int, default=10, help="bursts per row and path, interleaved")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="this script's event loop (the direct runner's and the clients'); auto: uvloop "
                             "when installed, as `ditmesh serve` picks")
    parser.add_argument("--server-loops", nargs="+", choices=("auto", "asyncio", "uvloop"), default=["asyncio"],
                        help="one server per loop, measured side by side (`ditmesh serve` runs asyncio's)")
    parser.add_argument("--out", default=str(harness.RESULTS / "serve_load_cpu"), help="writes OUT.json and OUT.md")
    parser.add_argument("--role", choices=("bench", "server"), default="bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "server":
        serve(args.world_size, args.loop)
        return
    loop = resolve(args.loop)
    procs = {}
    try:
        for server_loop in dict.fromkeys(resolve(name) for name in args.server_loops):
            procs[server_loop] = start_server(args.world_size, server_loop)
        servers = {name: (url, proc.pid) for name, (proc, url) in procs.items()}
        run = measure(args.world_size, args.concurrency, args.seconds, args.rounds, servers)
        with asyncio.Runner(loop_factory=uvloop_new_loop if loop == "uvloop" else asyncio.new_event_loop) as runner:
            rows = runner.run(run)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(timeout=60)
    command = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    report = {"command": command.strip(), "world_size": args.world_size, "device": "cpu", "worker": "NullWorker",
              "request": REQUEST, "seconds_per_row": args.seconds, "rounds": args.rounds, "client_loop": loop,
              **harness.host_env(), "rows": rows}
    out = Path(args.out)
    summary = (f"# serve_load: `ditmesh serve` vs `runner.invoke`\n\n`{report['command']}` — {args.world_size} CPU "
               f"ranks, null worker, 64x64 PNG, {args.seconds} s per row and path in {args.rounds} interleaved bursts, "
               f"clients on {loop}, {report['cpu_count']} cores, load "
               f"{report['load_avg_1min']:.1f}, {report['date_utc']}\n\n{table(rows)}\n")
    harness.write_results(out, report, summary)
    print(table(rows))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
