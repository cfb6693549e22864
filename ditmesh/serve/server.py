"""Run the app with uvicorn: bind first (so ``--port 0`` can be told), then start the ranks."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from ditmesh.runner.runner import DistributedRunner
from ditmesh.serve.app import ServeSettings, create_app


def run_server(runner: DistributedRunner, setup_kwargs: dict[str, Any], settings: ServeSettings = ServeSettings(),
               host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve image generation on `runner` over HTTP at host:port until SIGINT/SIGTERM.

    Binds at once (port 0: a free port), starts the ranks with ``setup(**setup_kwargs)``, then
    prints ``ditmesh serve: ready on http://HOST:PORT ...`` and serves. Raises `ValueError` for a
    host other than loopback without an API key, or a port that cannot be bound.
    """
    import uvicorn

    check_exposure(host, settings.api_key)
    sock = listen(host, port)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"

    def announce(info: dict[str, Any]) -> None:
        warmup = f", compiled and captured in {info['warmup_s']:.1f} s" if "warmup_s" in info else ""
        print(f"ditmesh serve: ready on {url} ({info['model']}, {info['parallel']}, {runner.world_size} "
              f"rank(s) on {runner.device_type}{warmup}); API docs at {url}/docs", flush=True)

    app = create_app(runner, setup_kwargs, settings, on_ready=announce)
    # asyncio's own loop: the runner's sockets and process sentinels are tested on it.
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", loop="asyncio", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to serve beyond this machine without an API key."""
    if api_key or is_loopback(host):
        return
    raise ValueError(f"--host {host} serves beyond this machine without an API key; pass --api-key KEY (or set "
                     "DITMESH_API_KEY; clients send 'Authorization: Bearer KEY'), or keep --host 127.0.0.1 "
                     "behind a proxy of your own")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening (connections wait in its backlog until the
    ranks are up and uvicorn accepts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they
    # are TCP; with it on, a response written in two parts waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port "
                         "(0: any free port) or --host") from None
    return sock
