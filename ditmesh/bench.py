"""`ditmesh bench`: the same generation under several parallel configs, timed side by side.

Each config gets its own `DistributedRunner` of `DiffusionWorker` ranks (one process per rank,
started and stopped in turn, so configs never share GPUs). A config runs `warmup` untimed
generations (process groups, kernels and, on CUDA, the compile of the first call), then
`repeats` timed ones with the same seed. A row reports the generation time measured on rank 0
(median and best), the speed-up against the first config that ran, and the largest pixel
difference of its first image from that config's. Data parallelism makes more images per call,
so images per second is the throughput to compare there. A video model (Wan) reports videos:
its rows give the seconds per video and videos per second, and the pixel difference covers every
frame of the first video. A config that cannot run gets the
`ValueError` that names the fix in its row, and the others still run.
"""

from __future__ import annotations

import asyncio
import platform
import statistics
from typing import Any

import numpy as np

from ditmesh.config import ParallelConfig
from ditmesh.runner.diffusion import DiffusionWorker
from ditmesh.runner.protocol import RemoteError
from ditmesh.runner.runner import DistributedRunner


def run_configs(configs: list[ParallelConfig], setup: dict[str, Any], payload: dict[str, Any], *, repeats: int = 3,
                warmup: int = 1, device_type: str | None = None, worker: Any = DiffusionWorker) -> list[dict[str, Any]]:
    """Time `payload` (a `DiffusionWorker` request) under each config; one row per config. `worker`:
    the worker class (or "module:Class") that serves the request, e.g. `XFuserWorker`."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    rows: list[dict[str, Any]] = []
    baseline: dict[str, Any] | None = None
    for config in configs:
        row, first_image = asyncio.run(_time_config(config, setup, payload, repeats, warmup, device_type, worker))
        if first_image is not None:
            if baseline is None:
                baseline = dict(row, image=first_image)
            row["speedup"] = baseline["median_s"] / row["median_s"]
            row["max_pixel_diff"] = _pixel_diff(first_image, baseline["image"])
            row["baseline"] = baseline["config"]
        rows.append(row)
    return rows


async def _time_config(config, setup, payload, repeats, warmup, device_type, worker) -> tuple[dict[str, Any], Any]:
    row: dict[str, Any] = dict(config=str(config), processes=config.world_size)
    runner = DistributedRunner(worker, world_size=config.world_size, device_type=device_type,
                               setup_kwargs=dict(setup, parallel=str(config)))
    try:
        async with runner:
            for _ in range(warmup):
                await runner.invoke(payload)
            results = [await runner.invoke(payload) for _ in range(repeats)]
    except RemoteError as error:
        if not error.exc_type.endswith("ValueError"):
            raise
        row["refused"] = error.message
        return row, None
    seconds = [r["seconds"] for r in results]
    kind = "videos" if "videos" in results[0] else "images"  # a video is a list of PIL frames
    outputs = results[0][kind]
    row.update(median_s=statistics.median(seconds), best_s=min(seconds), **{kind: len(outputs)},
               **{f"{kind}_per_s": len(outputs) / statistics.median(seconds)}, device=runner.device_type)
    if kind == "videos":
        row.update(frames=len(outputs[0]), s_per_video=statistics.median(seconds) / len(outputs))
    return row, outputs[0]


def _pixel_diff(image: Any, reference: Any) -> int | None:
    """Largest pixel difference of two images (or two videos: lists of frames), None if sizes differ."""
    a, b = (np.stack([np.asarray(x, dtype=np.int16) for x in (v if isinstance(v, list) else [v])]) for v in (image, reference))
    return int(np.abs(a - b).max()) if a.shape == b.shape else None


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (video rows: seconds per video and videos per second)."""
    video = any("videos" in r for r in rows)
    lines = [f"| config | processes | median s | best s | speed-up | {'s/video | videos/s' if video else 'images/s'} "
             "| max pixel diff |", "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if video else "")]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['config']} | {r['processes']} | refused: {r['refused']} | | | |{' |' if video else ''}")
            continue
        diff = "n/a (size)" if r["max_pixel_diff"] is None else str(r["max_pixel_diff"])
        rate = f"{r['s_per_video']:.3f} | {r['videos_per_s']:.3f}" if video else f"{r['images_per_s']:.2f}"
        lines.append(f"| {r['config']} | {r['processes']} | {r['median_s']:.3f} | {r['best_s']:.3f} | "
                     f"{r['speedup']:.2f}x | {rate} | {diff} |")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return dict(torch=torch.__version__, python=platform.python_version(), gpus=gpus, cpu=platform.processor() or platform.machine())
