"""A short seeded soak of `DistributedRunner` + `DiffusionWorker` (`ditmesh.soak`): every request
ends with the serial pipeline's images or its documented error, and nothing hangs or leaks.
`python benchmarks/soak.py --requests 200` is the long one."""

from __future__ import annotations

import asyncio
import random

from ditmesh.config import ParallelConfig
from ditmesh.soak import Request, Soak, draw_meshes, draw_request


def _requests(seed: int, model: str, parallel: str, count: int) -> list[Request]:
    rng = random.Random(seed)
    return [draw_request(rng, model, ParallelConfig.parse(parallel)) for _ in range(count)]


async def _soak() -> list:
    soak = Soak(bound_s=60.0, collective_timeout=20.0)
    # data=2 with fewer images than data groups hung for ever (issue 24): one image, invoked and
    # streamed, a stream left after its first step, no image at all, then three images.
    one = dict(prompt=["a red circle"], num_images=1, steps=2, seed=3, height=32, width=32)
    pinned = [Request(one, "invoke"), Request(one, "stream"), Request(dict(one, steps=3), "stream", "leave", at=1),
              Request(dict(one, prompt=[]), "invoke", expect="ValueError"), Request(dict(one, num_images=3), "stream")]
    counts = [await soak.mesh("tiny-flux", "data=2", pinned)]
    # Then a mesh and requests drawn at random (seeded), a rank killed among them.
    model, parallel = draw_meshes(random.Random(0), (2,))[0]
    drawn = _requests(5, model, parallel, 4) + [Request(one, "stream", "kill", at=1, kill_rank=1), Request(one, "invoke")]
    counts.append(await soak.mesh(model, parallel, drawn))
    return counts


def test_soak_every_request_ends_as_documented_and_nothing_hangs_or_leaks():
    pinned, drawn = asyncio.run(_soak())
    for counts in (pinned, drawn):
        assert counts.bad == 0, counts.failures
        assert counts.hangs == counts.lost == counts.leaked_processes == counts.leaked_fds == 0
    assert (pinned.images, pinned.left, pinned.value_errors) == (3, 1, 1), pinned
    assert drawn.worker_died + drawn.images >= 2 and drawn.restarts <= 1, drawn  # the kill, then a working request
    assert drawn.requests == 6
