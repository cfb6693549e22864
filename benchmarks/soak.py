"""Soak: many seeded random requests, each bounded; counts how they ended. Nothing may hang.

    python benchmarks/soak.py --requests 200                     # DistributedRunner + DiffusionWorker, CPU
    python benchmarks/soak.py --serve --requests 60 --clients 4  # `ditmesh serve` over loopback HTTP

Runner mode (`ditmesh.soak`): every valid mesh of the tiny FLUX, SD3 and SDXL at world 1, 2 and 4
(`ditmesh.valid_configs`), a few requests each: prompts 0-2, images 1-3 (fewer than the data
degree included), valid and invalid sizes, 1-3 steps, invoke or stream, a stream left early, a
timeout, a rank killed mid-request. Every request must end with the serial pipeline's images or
the documented error, and the next one must work.

Serve mode: one `ditmesh serve` subprocess (`--model`, `--parallel`, a small `--max-queue` so 429
happens), `--clients` concurrent loopback clients sending random requests (JSON or SSE, valid or
invalid sizes, clients that disconnect mid-stream), and a rank killed once. Every request must get
200, 422, 429, 503 or 504 (or be the client's own disconnect) within the bound; afterwards a plain
request must succeed and `/healthz` must say 200 again, without a person.

Writes benchmarks/results/soak_cpu.json|md (runner) or soak_serve_cpu.json|md (serve).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)

from ditmesh.soak import pid_alive, run_soak
PATH = "/v1/images/generations"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worlds", default="1,2,4", help="runner mode: world sizes whose valid meshes are drawn")
    parser.add_argument("--per-mesh", type=int, default=4, help="runner mode: requests per started runner")
    parser.add_argument("--bound-s", type=float, default=120.0, help="a request not ended by then is a hang")
    parser.add_argument("--serve", action="store_true", help="soak `ditmesh serve` over HTTP instead")
    parser.add_argument("--model", default="tiny-flux", help="serve mode")
    parser.add_argument("--parallel", default="data=2", help="serve mode")
    parser.add_argument("--clients", type=int, default=4, help="serve mode: concurrent clients")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.serve:
        counts = asyncio.run(serve_soak(args))
        name = f"soak_serve_{args.tag}"
    else:
        worlds = tuple(int(w) for w in args.worlds.split(","))
        counts = asdict(asyncio.run(run_soak(args.requests, worlds, args.seed, args.per_mesh, args.bound_s,
                                             log=lambda line: print(line, flush=True))))
        name = f"soak_{args.tag}"
    counts["seconds"] = round(time.perf_counter() - started, 1)
    write(name, vars(args), counts)


def write(name: str, args: dict, counts: dict) -> None:
    record = {"args": args, "machine": platform.node(), "cpus": os.cpu_count(), "counts": counts}
    rows = [(key, value) for key, value in counts.items() if not isinstance(value, list)]
    command = "python benchmarks/soak.py " + " ".join(sys.argv[1:])
    lines = [f"# {name}", "", f"`{command}` on {os.cpu_count()} CPU cores", "", "| count | value |", "| --- | ---: |"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    if counts.get("failures"):
        lines += ["", "Failures:", ""] + [f"- {failure}" for failure in counts["failures"]]
    if counts.get("meshes"):
        lines += ["", f"Meshes ({len(counts['meshes'])}): " + ", ".join(sorted(set(counts["meshes"])))]
    text = "\n".join(lines) + "\n"
    harness.write_results(harness.RESULTS / name, record, text)
    print(text)


# ---------------------------------------------------------------- serve mode


async def serve_soak(args: argparse.Namespace) -> dict:
    import httpx

    server, url = start_server(args.model, args.parallel)
    rng = random.Random(args.seed)
    counts: dict = {"requests": 0, "hangs": 0, "other": 0, "failures": []}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=args.bound_s) as client:
            pids = [rank["pid"] for rank in (await client.get("/healthz")).json()["ranks"]]
            requests = [draw_http(rng) for _ in range(args.requests)]
            kill_at = args.requests // 2
            queue = asyncio.Queue()
            for index, request in enumerate(requests):
                queue.put_nowait((index, request))

            async def client_loop() -> None:
                while not queue.empty():
                    index, request = queue.get_nowait()
                    if index == kill_at:  # a rank dies while requests are in flight
                        health = (await client.get("/healthz")).json()
                        pids.extend(rank["pid"] for rank in health["ranks"])
                        os.kill(health["ranks"][-1]["pid"], signal.SIGKILL)
                    outcome = await one_http(client, request, args.bound_s)
                    counts["requests"] += 1
                    counts[outcome] = counts.get(outcome, 0) + 1
                    if outcome in ("hangs", "other"):
                        counts["failures"].append(f"{outcome}: {request}")

            await asyncio.gather(*(client_loop() for _ in range(args.clients)))
            counts["recovered"] = await recovered(client, args.bound_s)
            health = (await client.get("/healthz")).json()
            pids.extend(rank["pid"] for rank in health["ranks"])
            counts["restarts"] = health["restarts"]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    counts["leaked_processes"] = sum(pid_alive(pid) for pid in set(pids))
    return counts


def start_server(model: str, parallel: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "ditmesh.cli", "serve", "--model", model, "--parallel", parallel,
               "--port", "0", "--max-queue", "2", "--timeout", "60", "--device", "cpu"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        print(line, end="", flush=True)
        if match := re.search(r"ready on (http://\S+)", line):
            return proc, match.group(1)
    raise RuntimeError("the server exited before it was ready")


def draw_http(rng: random.Random) -> dict:
    body = {"prompt": f"a {rng.choice(('red', 'blue'))} {rng.choice(('circle', 'square'))}",
            "steps": rng.randint(1, 3), "num_images": rng.choice((1, 1, 2, 3)), "seed": rng.randrange(1000),
            "height": rng.choice((32, 64)) + (4 if rng.random() < 0.15 else 0), "width": 32,
            "stream": rng.random() < 0.5}
    return {"body": body, "leave": body["stream"] and rng.random() < 0.2}


async def one_http(client, request: dict, bound_s: float) -> str:
    """How one request ended: its status ("200", "422", ...), "left" (this client disconnected),
    "hangs" (no answer within the bound) or "other" (a status the API does not document)."""
    try:
        return await asyncio.wait_for(_send(client, request), bound_s)
    except TimeoutError:
        return "hangs"


async def _send(client, request: dict) -> str:
    import httpx

    try:
        if not request["body"]["stream"]:
            status = (await client.post(PATH, json=request["body"])).status_code
        else:
            async with client.stream("POST", PATH, json=request["body"]) as response:
                status = response.status_code
                async for line in response.aiter_lines():
                    if request["leave"] and line.startswith("event: step"):
                        return "left"  # closing the response disconnects mid-stream
                    if line.startswith("data: ") and '"status"' in line:  # an error event carries its status
                        status = json.loads(line[6:])["status"]
    except httpx.TransportError:
        return "other"
    return str(status) if status in (200, 422, 429, 503, 504) else "other"


async def recovered(client, bound_s: float) -> bool:
    """After the soak (and the kill), a plain request must succeed and /healthz say 200 within the bound."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        response = await client.post(PATH, json={"prompt": "a red circle", "steps": 1, "height": 32, "width": 32})
        if response.status_code == 200 and (await client.get("/healthz")).status_code == 200:
            return True
        await asyncio.sleep(1.0)  # a restart is under way (503): ask again
    return False


if __name__ == "__main__":
    main()
