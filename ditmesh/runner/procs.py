"""How CPU rank processes start: forked from a server that has imported torch once.

A spawned rank re-imports torch, diffusers and ditmesh before it does anything: 5-6 s of CPU
per rank on a 2-core machine, so a 4-rank runner spent ~20 s starting (and a restart after a
lost rank as long again). On Linux, CPU (gloo) ranks come instead from multiprocessing's fork
server, which imports torch, diffusers and ditmesh once (`_preload.py`) and forks a fresh child
per rank: start-up falls to a fraction of a second, and the child re-imports its target's module
by name, as a spawned one does. GPU ranks are still spawned (`context`).

What spawn gave that a fork server does not, the child is given here: the parent's environment
as it is when the rank starts (the server's is that of its own start). Variables a library reads
when it is imported (not when first used) are the exception; `DITMESH_START_METHOD=spawn`
restores plain spawn for CPU ranks too.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from typing import Any, Callable

# Heavy, side-effect free imports only: nothing that starts threads or touches a device.
PRELOAD = ("ditmesh.runner._preload",)


def context(device_type: str = "cpu") -> multiprocessing.context.BaseContext:
    """The multiprocessing context rank processes of `device_type` are started with (see the
    module docstring). GPU ranks are spawned: importing diffusers and inductor asks torch about the
    GPUs (`torch.cuda.is_available`, triton's device check), which initialises the CUDA driver in
    the fork server, and a process forked after that cannot use CUDA."""
    if device_type != "cpu":
        return multiprocessing.get_context("spawn")
    method = os.environ.get("DITMESH_START_METHOD", "forkserver" if sys.platform == "linux" else "spawn")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"DITMESH_START_METHOD={method!r}: use 'forkserver' (Linux default) or 'spawn'")
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(PRELOAD))  # only takes effect before the server first starts
    return ctx


def process(ctx: multiprocessing.context.BaseContext, target: Callable[..., Any], args: tuple, **kwargs: Any):
    """``ctx.Process(target=target, args=args, **kwargs)`` whose child sees this process's
    environment of now (a fork server's child would otherwise see the server's)."""
    return ctx.Process(target=_with_environment, args=(dict(os.environ), target, *args), **kwargs)


def _with_environment(environ: dict[str, str], target: Callable[..., Any], *args: Any) -> Any:
    os.environ.clear()
    os.environ.update(environ)
    return target(*args)


def quiet_import_warnings() -> None:
    """Silence what every process printed at import when torchao is installed (the fp8 extra),
    none of it the user's business: torchao registers Enum pytree constants, which this torch
    reports as deprecated (``torch.utils._pytree``), and on a machine without its CUDA kernels
    it reports each compiled library it could not load ("Failed to load ...so")."""
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    torchao = logging.getLogger("torchao")
    if not any(f is _skip_kernel_loads for f in torchao.filters):
        torchao.addFilter(_skip_kernel_loads)


def _skip_kernel_loads(record: logging.LogRecord) -> bool:
    return not (record.getMessage().startswith("Failed to load ") and ".so" in record.getMessage())
